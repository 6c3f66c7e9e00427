"""The FlexCiM top on Verilator and Icarus through cocotb (the `make test` RTL tier).

Every case runs both tests of flexcim.sim.tb: ``full_rate`` (bit-exact, cycles equal to
golden.perf's) and ``random_stalls`` (random idle cycles on every input, random back-pressure).
The tiny preset keeps builds and runs to seconds; the full sweep is ``make regress``.
"""

import json

import numpy as np
import pytest
from flexcim.golden import nm_prune, sparse_matmul
from flexcim.sim import runner
from flexcim.sim.regress import TB_MODULE, Case, run_case, top_verilog, toplevel
from flexcim.spec.config import module_name, preset
from flexcim.spec.nm import NMTensor

from flexcim import cli
from flexcim.errors import FlexCimError

pytestmark = pytest.mark.slow
pytest.importorskip("flexcim.hw.top", reason="the FlexCiM top (hw/top.py) is not here yet")

CASES = [
    # Verilator: two K chunks and two column tiles (4 commands), M=16 patterns, act pruning.
    Case("verilator", "tiny", "2:4", 5, 64, 6),
    Case("verilator", "tiny", "8:16", 4, 96, 4),
    Case("verilator", "tiny", "1:8", 4, 128, 4, act_pattern="8:16"),
    # Icarus: input-bandwidth-bound dense, and 4:8.
    # Dense is pattern code 0, the controller registers' initial value: it hung on Icarus when
    # compiled as SystemVerilog (see tests/sim/test_runner.py).
    Case("icarus", "tiny", "1:1", 5, 32, 5),
    Case("icarus", "tiny", "4:8", 3, 48, 4),
    # N not a power of two (12 cell rows): 3:8 over 3 passes of 32 and two column tiles;
    # 12:16 over two K chunks (max_k_for = 4 words x 16).
    Case("verilator", "tiny3", "3:8", 4, 96, 6),
    Case("icarus", "tiny3", "12:16", 3, 80, 4),
    # The weight port (weight_port_rows, weight_overlap): 2 rows per beat, passes chasing the
    # loader (4 beats per word = 4 cycles per pass), over two K chunks; one row per beat with
    # overlap: 8 beats per word, so passes wait for their words (bubbles inside a token).
    # (The second on Icarus: a Verilator build of a configuration costs about 50 s of make test.)
    # The adder trees' pipeline register (tree_pipeline): the results one cycle later, 8:16
    # over two K chunks and two column tiles (Icarus: a build in seconds).
    *(Case(sim, module_name(cfg), pattern, tokens, k, c, config=cfg.to_json())
      for sim, cfg, pattern, tokens, k, c in [
          ("verilator", preset("tiny").replace(weight_port_rows=2, weight_overlap=1), "2:4", 1,
           128, 6),
          ("icarus", preset("tiny").replace(weight_overlap=1), "1:1", 2, 32, 4),
          ("icarus", preset("tiny").replace(tree_pipeline=1), "8:16", 3, 96, 6)]),
]


def _skip_unless(sim):
    if not runner.available(sim):
        pytest.skip(f"{sim} is not installed")


@pytest.mark.parametrize("case", CASES, ids=lambda c: getattr(c, "name", None))
def test_layer_on_rtl(case):
    _skip_unless(case.sim)
    record = run_case(case)
    assert record["passed"], record["message"]
    full, stalled = record["full_rate"], record["random_stalls"]
    assert full["cycles"] == full["model_cycles"]
    assert stalled["cycles"] > full["cycles"]  # the stalls really stalled the macro
    assert full["commands"] >= 1
    # The testbench compared the RTL's activity counters with the model in both runs (each
    # draws its own data); the stalls change the time, not the compute cycles.
    for record in (full, stalled):
        assert record["activity"]["compute_cycles"] == full["ideal_cycles"]
        assert record["activity"]["mac_cycles"] > 0


def test_testbench_fails_on_a_wrong_golden_config():
    """Told the wrong accumulator width, the TB must fail: the check can fail."""
    sim = "verilator" if runner.available("verilator") else "icarus"
    _skip_unless(sim)
    cfg = preset("tiny")
    source, build_dir = top_verilog(cfg, sim)
    wrong = cfg.replace(acc_bits=cfg.acc_bits + 1)
    with pytest.raises(runner.SimulationError, match="full_rate"):
        runner.run(sim, [source], toplevel(cfg), TB_MODULE, build_dir, testcase="full_rate",
                   extra_env={"FLEXCIM_HW_CONFIG": wrong.to_json(),
                              "FLEXCIM_CASE": json.dumps({"pattern": "2:4", "tokens": 2,
                                                          "k": 32, "c": 4}),
                              "FLEXCIM_TIMEOUT_NS": "200000"})


def test_parallel_cases_on_one_build_keep_their_own_results_file():
    """Cases of a parallel regression share a build directory; cocotb deletes its results file
    when a test starts, so each process must have its own (a shared results.xml made a case
    fail with 'no results file' when the next case on that build started first)."""
    import os

    sim = "verilator" if runner.available("verilator") else "icarus"
    _skip_unless(sim)
    cfg = preset("tiny")
    source, build_dir = top_verilog(cfg, sim)
    other = build_dir / f"results-{os.getpid() + 1}.xml"  # another worker's, still being read
    other.write_text("<testsuites/>")
    try:
        result = runner.run(sim, [source], toplevel(cfg), TB_MODULE, build_dir,
                            testcase="full_rate",
                            extra_env={"FLEXCIM_HW_CONFIG": cfg.to_json(),
                                       "FLEXCIM_CASE": json.dumps({"pattern": "2:4", "tokens": 2,
                                                                   "k": 32, "c": 4}),
                                       "FLEXCIM_TIMEOUT_NS": "200000"})
        assert result.passed and result.results_xml.name == f"results-{os.getpid()}.xml"
        assert other.read_text() == "<testsuites/>"
    finally:
        other.unlink(missing_ok=True)


def _matmul_args(folder, x, w, pattern: str) -> list[str]:
    """Save ``x`` and ``w`` in ``folder``; the ``flexcim matmul`` arguments that read them."""
    np.save(folder / "x.npy", x)
    np.save(folder / "w.npy", w)
    return ["matmul", "--x", str(folder / "x.npy"), "--w", str(folder / "w.npy"),
            "--pattern", pattern]


def test_cli_matmul_engine_rtl_any_shape(tmp_path):
    """flexcim matmul --engine rtl: C not a multiple of cols, K in two chunks, T above
    max_tokens=255 (two token blocks); Y equals the golden engine's, stats are written."""
    _skip_unless("verilator")
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, (260, 160), dtype=np.int8)
    w = nm_prune(rng.integers(-128, 128, (6, 160), dtype=np.int8), "1:4")
    args = [*_matmul_args(tmp_path, x, w, "1:4"), "--acc-bits", "20", "--preset", "tiny"]
    assert cli.main([*args, "--engine", "rtl", "--sim", "verilator",
                     "--stats", str(tmp_path / "s.json"), "-o", str(tmp_path / "y.npy")]) == 0
    y = np.load(tmp_path / "y.npy")
    expected = sparse_matmul(x, NMTensor.compress(w, "1:4"), acc_bits=20)
    np.testing.assert_array_equal(y, expected)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["commands"] == 2 * 2 * 2  # column tiles x K chunks x token blocks
    assert abs(stats["cycles"] / stats["model_cycles"] - 1) <= 0.02
    assert 0 < stats["utilization"] <= 1


@pytest.mark.extended
def test_cli_matmul_engine_rtl_on_any_config(tmp_path, capsys):
    """--config FILE and --set reach the RTL (here tiny with 8 columns, not a preset: its own
    module name and build) and Y equals golden; they mean nothing to the golden engine."""
    _skip_unless("icarus")
    rng = np.random.default_rng(11)
    x = rng.integers(-128, 128, (3, 32), dtype=np.int8)
    w = nm_prune(rng.integers(-128, 128, (10, 32), dtype=np.int8), "2:4")
    (tmp_path / "tiny.json").write_text(preset("tiny").to_json())
    args = [*_matmul_args(tmp_path, x, w, "2:4"), "--config", str(tmp_path / "tiny.json"),
            "--set", "cols=8"]
    assert cli.main([*args, "--engine", "rtl", "--sim", "icarus", "--stats",
                     str(tmp_path / "s.json"), "-o", str(tmp_path / "y.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), sparse_matmul(
        x, NMTensor.compress(w, "2:4"), acc_bits=20))
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["config"] == preset("tiny").replace(cols=8).to_dict()
    assert stats["commands"] == 2  # 10 output channels in two tiles of 8 columns
    capsys.readouterr()
    assert cli.main([*args, "-o", str(tmp_path / "g.npy")]) == 2
    assert "--config and --set choose the macro of --engine rtl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: --preset and --config exclude each other
        cli.main([*args, "--engine", "rtl", "--preset", "tiny", "-o", str(tmp_path / "g.npy")])
    assert info.value.code == 2 and not (tmp_path / "g.npy").exists()


@pytest.mark.extended
def test_regress_sweeps_any_config(tmp_path):
    """A configuration that is no preset (``regress --config F --set k=v``): every pattern of
    it, the cases named by its module name and carrying its JSON to the worker processes."""
    _skip_unless("icarus")
    from flexcim.sim import regress

    cfg = preset("tiny").replace(cols=8)
    cases = regress.sweep(("icarus",), {cfg: [str(p) for p in cfg.patterns]})
    assert [c.pattern for c in cases] == [str(p) for p in cfg.patterns]
    assert {c.preset for c in cases} == {module_name(cfg)} and all(c.hw() == cfg for c in cases)
    record = run_case(next(c for c in cases if c.pattern == "2:4"), testcase="full_rate")
    assert record["passed"], record.get("message")
    assert record["full_rate"]["cycles"] == record["full_rate"]["model_cycles"]
    (tmp_path / "c.json").write_text(cfg.to_json())
    with pytest.raises(FlexCimError, match="--config and --set take one configuration"):
        regress.main(["--config", str(tmp_path / "c.json"), "--preset", "tiny"])


def test_cli_a_failed_simulation_exits_1(tmp_path, capsys, monkeypatch):
    """A simulation that fails (here the testbench's timeout cut to 50 ns: the layer cannot
    finish) is a failure of the work: one line naming the log, exit status 1 (not 2, which
    means bad input)."""
    _skip_unless("verilator")
    from flexcim.sim import host

    monkeypatch.setattr(host, "tb_timeout_ns", lambda *a, **k: 50)
    x = np.ones((2, 16), dtype=np.int8)
    w = nm_prune(np.ones((4, 16), dtype=np.int8), "2:4")
    code = cli.main([*_matmul_args(tmp_path, x, w, "2:4"), "--engine", "rtl", "--preset",
                     "tiny", "-o", str(tmp_path / "y.npy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("flexcim: error: ") and "(log: " in err[-1], err
    assert not (tmp_path / "y.npy").exists()


def test_cli_engine_rtl_rejects_a_pattern_the_preset_lacks(tmp_path, capsys):
    x = np.zeros((2, 16), dtype=np.int8)
    w = np.zeros((4, 16), dtype=np.int8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    code = cli.main(["matmul", "--x", str(tmp_path / "x.npy"), "--w", str(tmp_path / "w.npy"),
                     "--pattern", "1:8", "--engine", "rtl", "--preset", "fixed24",
                     "-o", str(tmp_path / "y.npy")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flexcim: error: pattern 1:8 is not supported by this macro")
    code = cli.main(["matmul", "--x", str(tmp_path / "x.npy"), "--w", str(tmp_path / "w.npy"),
                     "--pattern", "2:4", "--engine", "rtl", "--preset", "nope",
                     "-o", str(tmp_path / "y.npy")])
    assert code == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_build_directory_follows_the_verilog_text(monkeypatch, tmp_path):
    """A changed generator (new hw/ digest) re-elaborates, but an unchanged netlist keeps its
    simulator build (minutes for the default preset); another netlist gets another one."""
    from flexcim.sim import regress

    monkeypatch.setattr(runner, "BUILD_ROOT", tmp_path)
    cfg = preset("tiny").replace(cols=2, depth=2, max_k=16)  # elaborates in half tiny's time
    source, build_dir = top_verilog(cfg, "verilator")
    monkeypatch.setattr(regress, "hw_digest", lambda: "an-edited-docstring")
    source2, build_dir2 = top_verilog(cfg, "verilator")
    assert (source2, build_dir2) == (source, build_dir)
    assert source.parent == build_dir  # a fixed source path: Verilator can skip re-verilating
    assert len(list(tmp_path.glob("verilog-*/flexcim_top.v"))) == 2
    assert top_verilog(cfg.replace(acc_bits=24), "verilator")[1] != build_dir


def test_sweep_every_tiny_pattern_on_both_simulators_default_on_verilator():
    from flexcim.sim.regress import SWEEP_PRESETS, sweep

    cases = sweep()
    for name in ("tiny", "tiny3"):
        tiny = {(c.sim, c.pattern) for c in cases if c.preset == name}
        assert tiny == {(s, p) for s in runner.SIMULATORS for p in SWEEP_PRESETS[name]}
        assert set(SWEEP_PRESETS[name]) == {str(p) for p in preset(name).patterns}
    for name in ("default", "flex8"):
        assert {c.sim for c in cases if c.preset == name} == {"verilator"}
        assert {c.pattern for c in cases if c.preset == name} == {
            str(p) for p in preset(name).patterns}
    assert len({c.name for c in cases}) == len(cases)


def test_activity_check_names_every_counter_that_differs():
    """The testbench's comparison of the RTL counters with the energy model (pure Python)."""
    from flexcim.golden import energy, perf
    from flexcim.sim.tb import check_activity, random_layer

    cfg = preset("tiny")
    x, w = random_layer(cfg, "2:4", 3, 64, 6, np.random.default_rng(0))
    cmds = perf.schedule(cfg, w.pattern, 3, 64, 6)
    right = {**energy.layer_events(cfg, cmds), "mac_cycles": energy.mac_cycles(cfg, x, w)}
    record = check_activity(cfg, right, cmds, x, w)
    assert record["mac_ratio"] == pytest.approx(
        right["mac_cycles"] / (right["compute_cycles"] * cfg.cells * np.count_nonzero(x) / x.size))
    for name in right:
        wrong = {**right, name: right[name] + 1}
        with pytest.raises(AssertionError, match=f"'{name}': \\({right[name] + 1}, "):
            check_activity(cfg, wrong, cmds, x, w)
