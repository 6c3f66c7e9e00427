"""sim.streams and sim.runner on two small Amaranth stream components, on both simulators.

``fifo``: a 4-deep buffered FIFO (``ready`` depends on state only).  ``reg``: one pipeline
register whose input ``ready`` is combinational in the output's ``ready`` (``~valid | ready``),
the case that breaks testbenches sampling at the wrong point of the cycle.  Both rotate the
payload right by one bit so the check depends on every bit.  Width 100 > 64 exercises
multi-word GPI values.
"""

import random

import pytest
from amaranth import Cat, Module, Signal
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from flexcim.sim import runner
from flexcim.sim.streams import Scoreboard, no_pauses, random_pauses

WIDTH = 100


class RotateFifo(wiring.Component):
    def __init__(self, width: int, depth: int = 4):
        self._width, self._depth = width, depth
        super().__init__({"i": In(stream.Signature(width)), "o": Out(stream.Signature(width))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.fifo = q = fifo.SyncFIFOBuffered(width=self._width, depth=self._depth)
        m.d.comb += [
            q.w_data.eq(self.i.payload), q.w_en.eq(self.i.valid), self.i.ready.eq(q.w_rdy),
            self.o.payload.eq(Cat(q.r_data[1:], q.r_data[0])), self.o.valid.eq(q.r_rdy),
            q.r_en.eq(self.o.ready),
        ]
        return m


class RotateReg(wiring.Component):
    def __init__(self, width: int):
        self._width = width
        super().__init__({"i": In(stream.Signature(width)), "o": Out(stream.Signature(width))})

    def elaborate(self, platform):
        m = Module()
        data = Signal(self._width)
        m.d.comb += [
            self.i.ready.eq(~self.o.valid | self.o.ready),
            self.o.payload.eq(Cat(data[1:], data[0])),
        ]
        with m.If(self.i.ready):
            m.d.sync += [self.o.valid.eq(self.i.valid), data.eq(self.i.payload)]
        return m


COMPONENTS = {"fifo": lambda: RotateFifo(WIDTH), "reg": lambda: RotateReg(WIDTH)}


@pytest.mark.slow
@pytest.mark.parametrize("sim", runner.SIMULATORS)
@pytest.mark.parametrize("kind", sorted(COMPONENTS))
def test_stream_agents_on_rtl(sim, kind, tmp_path_factory):
    if not runner.available(sim):
        pytest.skip(f"{sim} is not installed")
    build_dir = runner.build_dir_for(f"streams-{kind}", sim, {"width": WIDTH})
    top = f"rotate_{kind}"
    source = runner.amaranth_verilog(COMPONENTS[kind](), top, build_dir / f"{top}.v")
    result = runner.run(sim, [source], top, "cocotb_streams", build_dir,
                        extra_env={"STREAM_WIDTH": str(WIDTH), "STREAM_BEATS": "300"})
    names = {t.name.rsplit(".", 1)[-1]: t for t in result.tests}
    assert set(names) == {"full_throughput", "random_idle_and_backpressure",
                          "scoreboard_catches_a_wrong_expectation"}
    assert result.passed and result.results_xml.is_file()
    assert names["full_throughput"].sim_time_ns > 300 * runner.CLOCK_PERIOD_NS


def test_run_reports_a_failing_cocotb_test(tmp_path):
    """A failing test must raise with the test's name and the seed, not pass silently."""
    sim = "icarus" if runner.available("icarus") else "verilator"
    build_dir = runner.build_dir_for("streams-fail", sim, {"width": 8})
    source = runner.amaranth_verilog(RotateReg(8), "rotate_reg8", build_dir / "rotate_reg8.v")
    # 'full_throughput' expects STREAM_BEATS beats; a wrong width breaks the rotation check.
    with pytest.raises(runner.SimulationError, match=r"seed 1234.*full_throughput: rotated beats"):
        runner.run(sim, [source], "rotate_reg8", "cocotb_streams", build_dir, seed=1234,
                   testcase="full_throughput",
                   extra_env={"STREAM_WIDTH": "7", "STREAM_BEATS": "20"})


def test_scoreboard_reports_mismatch_missing_and_unexpected():
    board = Scoreboard("y")
    board.expect([1, 2, 3])
    board.got(1)
    board.got(5)
    assert not board.clean
    with pytest.raises(AssertionError, match=r"1 matched, 1 mismatched, 0 unexpected, 1 missing"):
        board.check()
    assert "item 1: expected 2, got 5" in board.reports[0]
    board.got(3)
    board.got(4)
    with pytest.raises(AssertionError, match="item 3: unexpected 4"):
        board.check()


def test_scoreboard_clean_only_when_all_matched():
    board = Scoreboard("y")
    board.expect([7, 8])
    board.got(7)
    assert not board.clean  # one still missing
    board.got(8)
    board.check()


def test_random_pauses_rate_and_bursts():
    gen = random_pauses(random.Random(1), probability=0.25, max_run=4)
    draws = [next(gen) for _ in range(20000)]
    share = sum(draws) / len(draws)
    # Expected share: p*E[run] / (p*E[run] + (1-p)) with E[run] = 2.5 -> 0.4545...
    assert 0.42 < share < 0.49
    runs, current = [], 0
    for d in draws:
        if d:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    assert max(runs) > 4  # back-to-back bursts merge, but single bursts are at most 4
    assert not any(next(no_pauses()) for _ in range(10))
    with pytest.raises(ValueError, match="probability"):
        next(random_pauses(random.Random(0), 1.0))
