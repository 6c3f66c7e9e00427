"""The packed top (hw/packed.py: the macro behind the weight unpacker) on Icarus through its
cocotb testbench (flexcim.sim.packed_tb).

Both tests of the testbench run: ``full_rate`` (bit-exact against the beat-level golden model
and sparse_matmul, activity counters against the energy model, ``packed_words`` against
spec.layouts.compact_words, cycles equal to golden.perf's plus the command lead) and
``random_stalls`` (random idle cycles on cmd, packed and act, random back-pressure on
result).  ``make regress`` runs more patterns of tiny and tiny3 on both simulators.
"""

import pytest
from flexcim.golden import perf
from flexcim.sim import runner
from flexcim.sim.regress import Case, run_case, sweep
from flexcim.spec import layouts
from flexcim.spec.config import preset

pytestmark = pytest.mark.slow


def test_layer_through_the_packed_top():
    # 8:16 on tiny: K = 96 in chunks of 64 and 32, two column tiles: four loading commands,
    # each first packed beat two words (4 values and 4 codes of 14 bits on a 48-bit word).
    case = Case("icarus", "tiny", "8:16", 2, 96, 6, bus="packed")
    if not runner.available(case.sim):
        pytest.skip(f"{case.sim} is not installed")
    record = run_case(case)
    assert record["passed"], record["message"]
    cfg = preset("tiny")
    cmds = perf.schedule(cfg, "8:16", 2, 96, 6)
    assert [(c.k, c.load_weights) for c in cmds] == [(64, True), (32, True)] * 2
    words = sum(layouts.compact_words(cfg, "8:16", cfg.weight_beats("8:16", c.k)) for c in cmds)
    # by hand: a pass of 8 rows of 4 values and 1 group of 4 codes of 14 bits: 8 x 32 + 56
    # = 312 bits; 4 passes take 26 words of 48 bits, 2 passes 13
    assert words == 2 * (26 + 13)
    full, stalled = record["full_rate"], record["random_stalls"]
    assert full["cycles"] == full["model_cycles"] == perf.layer_cycles(cfg, cmds) + 2
    assert stalled["cycles"] > full["cycles"]  # the pauses really stalled it
    assert full["commands"] == 4
    for run in (full, stalled):
        assert run["activity"]["packed_words"] == run["activity"]["compact_words"] == words
        assert run["activity"]["weight_beats"] == sum(cfg.weight_beats("8:16", c.k)
                                                      for c in cmds)


def test_regress_runs_the_packed_top_on_both_simulators():
    packed = {(c.sim, c.preset, c.pattern) for c in sweep() if c.bus == "packed"}
    for sim in runner.SIMULATORS:
        for name, patterns in (("tiny", {"1:1", "2:4", "1:8", "4:8", "8:16"}),
                               ("tiny3", {"3:4", "3:8", "12:16"})):
            assert {p for s, n, p in packed if (s, n) == (sim, name)} == patterns


def test_bus_option_selects_the_packed_cases():
    """``python -m flexcim.sim.regress --bus packed``: the sweep's packed cases; with a
    configuration of its own (``--config``/``--set``) every one of its patterns through it."""
    from flexcim.sim.regress import select

    from flexcim.errors import FlexCimError

    cases = sweep(("icarus",))
    chosen = select(cases, ["packed"])
    assert chosen and {c.bus for c in chosen} == {"packed"}
    assert len(chosen) == len([c for c in cases if c.bus == "packed"])
    custom = preset("tiny").replace(cols=8)
    own = sweep(("icarus",), {custom: ["1:1", "2:4"]})
    assert {(c.pattern, c.bus) for c in select(own, ["packed"], custom=True)} == {
        ("1:1", "packed"), ("2:4", "packed")}
    with pytest.raises(FlexCimError, match=r"^the sweep has no case through --bus packed for "
                                           r"default$"):
        select(sweep(("verilator",), {"default": ["2:4"]}), ["packed"])
