"""Leaf components in amaranth.sim against NumPy / naive-loop references."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from flexcim.hw.array import AdderTree, CellRow, SubMacro, forced_index_bits
from flexcim.hw.distribution import Distribution
from flexcim.hw.merging import Merging
from flexcim.spec.config import preset
from flexcim.spec.nm import NMPattern


def run(dut, bench, clock=True):
    sim = Simulator(dut)
    if clock:
        sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


def digits(x, b):
    """Slices of int8 ``x``, least significant first; the top one signed (the spec)."""
    u = int(x) & 0xFF
    out = [(u >> (s * b)) & ((1 << b) - 1) for s in range(8 // b)]
    if out[-1] >= 1 << (b - 1):
        out[-1] -= 1 << b
    assert sum(d << (s * b) for s, d in enumerate(out)) == x
    return out


@pytest.mark.parametrize("b", [1, 2, 4, 8])
def test_cell_row_selects_by_index_and_multiplies_signed_slices(b):
    rng = np.random.default_rng(b)
    cols, depth, index_bits = 3, 4, 3
    dut = CellRow(cols=cols, depth=depth, index_bits=index_bits, slice_bits=b)
    values = rng.integers(-128, 128, size=(depth, cols))
    values[0] = -128  # edges
    values[1] = 127
    indices = rng.integers(0, 8, size=(depth, cols))

    async def bench(ctx):
        for w in range(depth):
            ctx.set(dut.we, 1)
            ctx.set(dut.waddr, w)
            ctx.set(dut.wdata, {"values": values[w].tolist(), "indices": indices[w].tolist()})
            await ctx.tick()
        ctx.set(dut.we, 0)
        for _ in range(40):
            w = int(rng.integers(depth))
            lanes = rng.integers(0, 1 << b, size=8)
            top = int(rng.integers(2)) if b < 8 else 1
            ctx.set(dut.raddr, w)
            await ctx.tick()  # synchronous read: the word is there the next cycle
            ctx.set(dut.raddr, int(rng.integers(depth)))  # the next address changes nothing yet
            ctx.set(dut.lanes, lanes.tolist())
            ctx.set(dut.top, top)
            for c in range(cols):
                a = int(lanes[indices[w, c]])
                if top and a >= 1 << (b - 1):
                    a -= 1 << b
                assert ctx.get(dut.products[c]) == values[w, c] * a
            await ctx.tick()

    run(dut, bench)


def test_cell_row_reads_a_word_written_in_the_same_cycle():
    """The read port is transparent for the write port: the controller may start a pass the
    cycle after the last weight beat, whose word is being written while it is addressed."""
    dut = CellRow(cols=2, depth=4, index_bits=1, slice_bits=8)

    async def bench(ctx):
        ctx.set(dut.lanes, [3, 5])
        ctx.set(dut.top, 0)
        for value, index in ((7, 0), (-2, 1)):
            ctx.set(dut.we, 1)
            ctx.set(dut.waddr, 2)
            ctx.set(dut.raddr, 2)
            ctx.set(dut.wdata, {"values": [value, 1], "indices": [index, 0]})
            await ctx.tick()
            assert ctx.get(dut.products[0]) == value * [3, 5][index]

    run(dut, bench)


@pytest.mark.parametrize("b", [1, 4])
def test_cell_row_taps_its_tree_at_the_commands_m_and_isolates_zero_operands(b):
    """Taps at M = 1 (the bypass), 4 and 8: the product is the weight times the lane the
    index selects among the first M (lane 0 for 1:1, whatever the index); ``active`` is the
    isolation enable (weight and selected slice non-zero); ``faults`` flags a stage above the
    tap or a lane past M carrying a value, which forced index bits and zero lanes prevent."""
    rng = np.random.default_rng(10 + b)
    cols = 4
    dut = CellRow(cols=cols, depth=2, index_bits=3, slice_bits=b, taps=(0, 2, 3),
                  activity=True)
    assert dut.taps == (0, 2, 3)

    async def bench(ctx):
        for m, tap in ((1, 0b001), (4, 0b010), (8, 0b100)):
            values = rng.integers(-128, 128, size=cols)
            values[1] = 0  # isolated whatever its slice
            indices = rng.integers(0, m, size=cols)
            for forced in (True, False):
                stored = indices | (forced_index_bits(m, 3) if forced else 0)
                ctx.set(dut.we, 1)
                ctx.set(dut.waddr, 1)
                ctx.set(dut.wdata, {"values": values.tolist(), "indices": stored.tolist()})
                await ctx.tick()
                ctx.set(dut.we, 0)
                ctx.set(dut.raddr, 1)
                await ctx.tick()
                ctx.set(dut.tap, tap)
                ctx.set(dut.top, 0)
                for _ in range(12):
                    lanes = rng.integers(0, 1 << b, size=8)
                    lanes[m:] = 0  # the distribution unit ties the lanes past M low
                    lanes[rng.integers(m)] = 0  # and some selected slices are zero
                    ctx.set(dut.lanes, lanes.tolist())
                    for c in range(cols):
                        a = int(lanes[0] if m == 1 else lanes[indices[c]])
                        assert ctx.get(dut.products[c]) == values[c] * a
                        assert ctx.get(dut.active[c]) == int(values[c] != 0 and a != 0)
                        # Unforced indices (bit 2 clear) leave the top chain link passing
                        # the tapped value: a fault whenever it is non-zero (not in 1:1, whose
                        # decoder is disabled: no lane gate opens).
                        fault = not forced and 1 < m < 8 and lanes[indices[c]] != 0
                        assert ctx.get(dut.faults[c]) == int(fault), (m, forced, c)
                    # Switching selection gates: the enabled lane's AND and one gate per level
                    # up to the tap (log2 M), plus the uncut top link of an unforced index.
                    level = m.bit_length() - 1
                    per_cell = 1 + level + (not forced and 1 < m < 8) if m > 1 else 0
                    assert ctx.get(dut.selects) == cols * per_cell, (m, forced)
                lanes = np.zeros(8, dtype=int)
                lanes[7] = 1  # a lane past M that is not tied low
                ctx.set(dut.lanes, lanes.tolist())
                if m < 8:
                    assert [ctx.get(dut.faults[c]) for c in range(cols)] == [1] * cols

    run(dut, bench)


def test_cell_row_flags_a_lane_gate_that_leaks(monkeypatch):
    """Lane gates that pass their lane whatever the enable: the OR trees mix the lanes, and
    ``faults`` flags every cell whose disabled gates carry a non-zero slice."""
    import flexcim.hw.array

    monkeypatch.setattr(flexcim.hw.array, "_gate", lambda enable, lane: lane)
    dut = CellRow(cols=2, depth=1, index_bits=2, slice_bits=1, activity=True)

    async def bench(ctx):
        ctx.set(dut.we, 1)
        ctx.set(dut.wdata, {"values": [5, 7], "indices": [1, 2]})
        await ctx.tick()
        for lanes, want in (([0, 1, 0, 0], [0, 1]), ([1, 1, 0, 0], [1, 1]),
                            ([0, 0, 1, 0], [1, 0]), ([0, 0, 0, 1], [1, 1])):
            ctx.set(dut.lanes, lanes)
            assert [ctx.get(dut.faults[c]) for c in range(2)] == want, lanes

    run(dut, bench)


def test_dense_cell_row_has_one_lane():
    dut = CellRow(cols=2, depth=1, index_bits=0, slice_bits=8)
    assert dut.lanes.shape().length == 1

    async def bench(ctx):
        ctx.set(dut.we, 1)
        ctx.set(dut.wdata, {"values": [-128, 127]})
        await ctx.tick()
        ctx.set(dut.lanes, [0x80])  # -128 as the (signed) only slice
        ctx.set(dut.top, 1)
        assert [ctx.get(dut.products[c]) for c in range(2)] == [16384, -16256]

    run(dut, bench)


@pytest.mark.parametrize("inputs", [1, 2, 5, 18])
def test_adder_tree_sums_extremes_without_overflow(inputs):
    rng = np.random.default_rng(inputs)
    dut = AdderTree(inputs=inputs, width=10)

    async def bench(ctx):
        for vec in [[-512] * inputs, [511] * inputs, *rng.integers(-512, 512, (20, inputs))]:
            ctx.set(dut.addends, [int(v) for v in vec])
            assert ctx.get(dut.sum) == sum(int(v) for v in vec)

    run(dut, bench, clock=False)


@pytest.mark.parametrize("inputs, stage", [(2, 0), (5, 0), (5, 1), (5, 2), (18, 1), (18, 4)])
def test_adder_tree_with_a_pipeline_stage_sums_one_cycle_later(inputs, stage):
    """A register after ``stage`` levels: every sum appears exactly one cycle after its
    addends, at full throughput (a new vector every cycle), extremes included."""
    rng = np.random.default_rng(inputs + 10 * stage)
    dut = AdderTree(inputs=inputs, width=10, stage=stage)
    assert dut.latency == 1
    vectors = [[-512] * inputs, [511] * inputs, *rng.integers(-512, 512, (20, inputs)).tolist()]

    async def bench(ctx):
        previous = None
        for vec in [*vectors, [0] * inputs]:
            ctx.set(dut.addends, vec)
            if previous is not None:
                assert ctx.get(dut.sum) == sum(previous)
            await ctx.tick()
            previous = vec

    run(dut, bench)


@pytest.mark.parametrize("pipeline", [False, True])
def test_sub_macro_registers_column_sums(pipeline):
    rng = np.random.default_rng(7)
    rows, cols, b = 3, 2, 2
    dut = SubMacro(rows=rows, cols=cols, depth=2, index_bits=1, slice_bits=b, pipeline=pipeline)
    assert dut.latency == 1 + pipeline
    values = rng.integers(-128, 128, size=(rows, cols))
    indices = rng.integers(0, 2, size=(rows, cols))

    async def bench(ctx):
        for r in range(rows):
            ctx.set(dut.we, 1)
            ctx.set(dut.wrow, r)
            ctx.set(dut.waddr, 1)
            ctx.set(dut.wdata, {"values": values[r].tolist(), "indices": indices[r].tolist()})
            await ctx.tick()
        ctx.set(dut.we, 0)
        ctx.set(dut.raddr, 1)
        await ctx.tick()  # synchronous read of word 1
        lanes = rng.integers(0, 4, size=(rows, 2))
        ctx.set(dut.lanes, lanes.tolist())
        ctx.set(dut.top, 0)
        await ctx.tick()
        ctx.set(dut.lanes, np.zeros_like(lanes).tolist())  # the next cycle's lanes
        expect = [sum(values[r, c] * lanes[r, indices[r, c]] for r in range(rows))
                  for c in range(cols)]
        if pipeline:  # the sums are still in the trees' pipeline register
            assert [ctx.get(dut.psums[c]) for c in range(cols)] != expect
            await ctx.tick()
        assert [ctx.get(dut.psums[c]) for c in range(cols)] == expect

    run(dut, bench)


@pytest.mark.parametrize("name", ["tiny", "tiny3"])
def test_distribution_routes_every_tiny_pattern_like_the_spec(name):
    cfg = preset(name)  # tiny3: N = 3, 6, 12 on 12 rows
    dut = Distribution(rows=cfg.rows_total, patterns=cfg.patterns, slice_bits=2)
    assert dut.window_lanes == max(cfg.rows_total * p.m // p.n for p in cfg.patterns)
    rng = np.random.default_rng(3)
    window = rng.integers(0, 4, size=dut.window_lanes)

    async def bench(ctx):
        ctx.set(dut.window, window.tolist())
        for code, p in enumerate(cfg.patterns):
            ctx.set(dut.code, code)
            for r in range(cfg.rows_total):
                for i in range(cfg.m_max):
                    expect = window[(r // p.n) * p.m + i] if i < p.m else 0
                    assert ctx.get(dut.lanes[r][i]) == expect, (p, r, i)

    run(dut, bench, clock=False)


def test_distribution_drives_only_the_lanes_of_the_commands_m():
    cfg = preset("tiny")
    dut = Distribution(rows=cfg.rows_total, patterns=cfg.patterns, slice_bits=2, activity=True)
    window = np.random.default_rng(4).integers(1, 4, size=dut.window_lanes)  # no zero lane

    async def bench(ctx):
        ctx.set(dut.window, window.tolist())
        for code, p in enumerate(cfg.patterns):
            ctx.set(dut.code, code)
            for r in range(cfg.rows_total):
                assert ctx.get(dut.driven[r]) == (1 << p.m) - 1, (p, r)
                assert all(ctx.get(dut.lanes[r][i]) == 0 for i in range(p.m, cfg.m_max))

    run(dut, bench, clock=False)


def test_distribution_rejects_patterns_that_straddle_rows():
    with pytest.raises(ValueError, match="pattern 4:8: N=4 must divide rows=6"):
        Distribution(rows=6, patterns=[NMPattern(4, 8)], slice_bits=1)


@pytest.mark.parametrize("b", [1, 2, 8])
def test_merging_accumulates_slices_and_passes_with_wrap(b):
    rng = np.random.default_rng(b)
    p_count, cols, acc_bits, psum_bits = 2, 3, 16, 14
    dut = Merging(sub_macros=p_count, cols=cols, psum_bits=psum_bits, slice_bits=b,
                  acc_bits=acc_bits)
    slices = 8 // b

    async def bench(ctx):
        for _token in range(3):
            passes = int(rng.integers(1, 4))
            total = np.zeros(cols, dtype=np.int64)
            ctx.set(dut.valid, 1)
            for t in range(passes):
                for s in range(slices):
                    lo, hi = -(2 ** (psum_bits - 1)), 2 ** (psum_bits - 1)
                    ps = rng.integers(lo, hi, size=(p_count, cols))
                    total += ps.sum(axis=0) << (s * b)
                    ctx.set(dut.psums, ps.tolist())
                    ctx.set(dut.slice, s)
                    ctx.set(dut.first, t == 0 and s == 0)
                    last = t == passes - 1 and s == slices - 1
                    ctx.set(dut.last, last)
                    assert ctx.get(dut.done) == last
                    if last:
                        wrapped = (total + 2**15) % 2**16 - 2**15
                        assert [ctx.get(dut.result[c]) for c in range(cols)] == wrapped.tolist()
                    await ctx.tick()
            ctx.set(dut.valid, 0)
            await ctx.tick()  # an idle cycle must not disturb the accumulators

    run(dut, bench)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CellRow(cols=2, depth=1, index_bits=0, slice_bits=3),
         "slice_bits must be 1, 2, 4 or 8, not 3"),
        (lambda: AdderTree(inputs=0, width=8), "inputs must be a positive integer, not 0"),
        (lambda: SubMacro(rows=4, cols=2, depth=1, index_bits=0, slice_bits=1, port_rows=3),
         "port_rows must divide rows=4, not 3"),
        (lambda: AdderTree(inputs=5, width=8, stage=3),
         "stage must be a tree level from 0 to 2 for 5 inputs, not 3"),
        (lambda: AdderTree(inputs=1, width=8, stage=0),
         "a tree of one input has no level to register, not stage 0"),
        (lambda: SubMacro(rows=1, cols=2, depth=1, index_bits=0, slice_bits=1, pipeline=True),
         "pipeline needs rows >= 2 \\(one row has no adder tree\\), not rows=1"),
    ],
)
def test_leaf_parameters_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make()
