"""The AXI4-Stream wrapper on Icarus through its cocotbext-axi testbench (flexcim.sim.axis_tb).

Both tests of the testbench run per case: ``full_rate`` (bit-exact, one result packet per
command, cycles equal to golden.perf's, which the native top meets exactly) and
``random_stalls`` (cocotbext-axi pause generators on every source and on the sink).  Icarus:
its build takes seconds where Verilator's takes most of a minute, and these cases are small.
``make regress`` runs every tiny pattern through the wrapper on both simulators.
"""

import pytest
from flexcim.sim import runner
from flexcim.sim.regress import Case, run_case

pytestmark = pytest.mark.slow
pytest.importorskip("cocotbext.axi", reason="cocotbext-axi is not installed (make setup)")

CASES = [
    # Two column tiles: two commands of 3 tokens, two result packets of 3 beats.
    Case("icarus", "tiny", "2:4", 3, 32, 6, bus="axis"),
    # Three one-token commands (column tiles of 4, 4 and 4): packets of one beat, the
    # command FIFO's busiest use.
    Case("icarus", "tiny", "8:16", 1, 32, 12, bus="axis"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_layer_through_axis_wrapper(case):
    if not runner.available(case.sim):
        pytest.skip(f"{case.sim} is not installed")
    record = run_case(case)
    assert record["passed"], record["message"]
    full, stalled = record["full_rate"], record["random_stalls"]
    assert full["cycles"] == full["model_cycles"]
    assert stalled["cycles"] > full["cycles"]  # the pause generators really stalled it
    assert full["commands"] == -(-case.c // 4)


def test_regress_runs_every_tiny_pattern_through_the_wrapper_on_both_simulators():
    from flexcim.sim.regress import sweep
    from flexcim.spec.config import preset

    axis = {(c.sim, c.pattern) for c in sweep() if c.bus == "axis"}
    assert axis == {(s, str(p)) for s in runner.SIMULATORS for p in preset("tiny").patterns}
