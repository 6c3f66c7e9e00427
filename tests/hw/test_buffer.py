"""hw/buffer.py: the memory-built activation buffer against a plain list model of its window.

The reference knows nothing of granules, memories or rotations: a bank is a list of ``lanes``
int8 values, beat ``b`` overwrites lanes ``b*in_lanes ..``, and the window of a pass starting at
lane ``start`` shows slice ``s`` of the pass's lanes ``start .. start + w - 1`` (0 past ``lanes``;
the window's lanes past the pass width are not read).  The driver plays the controller's
protocol: the read address (bank, slice) one cycle ahead, ``read`` only in the cycle before a
new window (the window holds through stalls), ``shift`` at a pass's last slice, ``restart`` at
a token's last cycle, stalls before passes, and the other bank loaded meanwhile with random idle
cycles; a token's first window is read in the cycle its bank's last beat is written or later.
Every cycle, the enabled read ports must read exactly the pass's lanes inside the bank.
"""

import math

import numpy as np
import pytest
from amaranth.hdl import Cat
from amaranth.sim import Simulator
from flexcim.hw.buffer import ActivationBuffer, beats_per_row
from flexcim.sim.rewire import wrapping

#: (lanes, in_lanes, window_lanes, pass widths, slice bits): the default preset's widths scaled
#: down (G = 2, 4 memories per beat), tiny3's (G = 4, one memory per beat, 16 memories), a beat
#: that does not divide the window (6 memories for 4 window granules, 2 or 3 rows per memory),
#: a beat wider than the window, and widths whose positions are all even granules (u = 2).
GEOMETRIES = [
    (128, 8, 48, (6, 8, 12, 16, 24, 48), 1),
    (128, 4, 64, (12, 16, 24, 32, 64), 2),
    (30, 6, 8, (4, 8), 4),
    (16, 8, 4, (2, 4), 8),
    (24, 2, 8, (4, 8), 2),
]


class Reference:
    """Two banks of int8 lanes as plain lists."""

    def __init__(self, lanes: int):
        self.lanes = lanes
        self.banks = [[0] * lanes, [0] * lanes]

    def write(self, bank: int, beat: int, values) -> None:
        n = len(values)
        self.banks[bank][beat * n:(beat + 1) * n] = [int(v) for v in values]

    def window(self, bank: int, start: int, s: int, b: int, width: int) -> list[int]:
        lanes = [self.banks[bank][j] if j < self.lanes else 0
                 for j in range(start, start + width)]
        return [((v & 0xFF) >> (s * b)) & ((1 << b) - 1) for v in lanes]


def schedule(rng, lanes: int, width: int, slices: int, bank: int):
    """One token's compute cycles: (bank, start lane, slice, shift, restart), with 0-2 stall
    cycles (slice 0, no event) before every pass, as a pass waiting for its weights."""
    k = int(rng.integers(1, lanes + 1))
    passes = math.ceil(k / width)
    cycles = []
    for p in range(passes):
        cycles += [(bank, p * width, 0, 0, 0)] * int(rng.integers(0, 3))
        for s in range(slices):
            end = s == slices - 1
            cycles.append((bank, p * width, s, int(end), int(end and p == passes - 1)))
    return k, cycles


def check_buffer(dut, geometry, seed: int, tokens: int | None = None):
    """Drive ``dut`` through tokens of every pass width on both banks; assert every compute
    cycle's window equals the reference's on the pass's lanes, and every cycle's read bits
    (``read_words x word_bits``) equal the pass's lanes in the bank times ``b`` in the cycles
    with ``read``, 0 otherwise."""
    lanes, in_lanes, window, widths, b = geometry
    slices = 8 // b
    per_row = beats_per_row(window_lanes=window, in_lanes=in_lanes, slice_bits=b)
    rng = np.random.default_rng(seed)
    ref = Reference(lanes)
    tokens = tokens or 2 * len(widths) + 1  # every width on bank 0 and on bank 1
    plan = []
    for t in range(tokens):
        w = widths[(t // 2) % len(widths)]
        k, cycles = schedule(rng, lanes, w, slices, t % 2)
        beats = [rng.integers(-128, 128, size=in_lanes) for _ in range(math.ceil(k / in_lanes))]
        plan.append((w, cycles, beats))
    checked = []

    async def bench(ctx):
        # Phase i computes token i-1 while token i loads into the other bank.
        for phase in range(tokens + 1):
            compute = plan[phase - 1][1] if phase else []
            loads = []
            if phase < tokens:
                for beat, values in enumerate(plan[phase][2]):
                    loads += [None] * int(rng.integers(0, 3)) + [(beat, values)]
            sel = widths.index(plan[phase - 1][0]) if phase else 0
            upcoming = (phase % 2, 0, 0, 0, 0)  # the next token's first cycle
            cycles = max(len(compute), len(loads))
            for c in range(cycles):
                now = compute[c] if c < len(compute) else None
                ahead = compute[c + 1] if c + 1 < len(compute) else upcoming
                load = loads[c] if c < len(loads) else None
                # Read a new window of this token, or the next token's first one in the phase's
                # last cycle (its bank complete, the last beat read through), with its width.
                if c + 1 < len(compute):
                    read, width = ahead[:3] != now[:3], widths[sel]
                else:
                    read = c == cycles - 1 and phase < tokens
                    width = plan[phase][0] if phase < tokens else widths[sel]
                ctx.set(dut.read, read)
                ctx.set(dut.we, load is not None)
                if load is not None:
                    row, slot = divmod(load[0], per_row)
                    ctx.set(dut.wbank, phase % 2)
                    ctx.set(dut.wrow, row)
                    ctx.set(dut.wslot, slot)
                    ctx.set(dut.wdata, [int(v) for v in load[1]])
                ctx.set(dut.rbank, ahead[0])
                ctx.set(dut.slice, ahead[2])
                if len(widths) > 1:
                    # A token's width from its first read on (the command's pattern code); in
                    # the token's last cycle the restart does not use it.
                    ctx.set(dut.shift_sel, widths.index(width))
                ctx.set(dut.shift, now[3] if now else 0)
                ctx.set(dut.restart, now[4] if now else 0)
                bits = ctx.get(dut.read_words) * dut.word_bits
                want_bits = min(width, lanes - ahead[1]) * b if read else 0
                assert bits == want_bits, (f"token {phase - 1}: {bits} bits read, not "
                                           f"{want_bits}, before lanes {ahead[1]}.. slice "
                                           f"{ahead[2]} (pass width {width})")
                if now is not None:
                    bank, start, s = now[:3]
                    got = ctx.get(dut.window.as_value())
                    got = [(got >> (j * b)) & ((1 << b) - 1) for j in range(widths[sel])]
                    want = ref.window(bank, start, s, b, widths[sel])
                    assert got == want, (f"token {phase - 1} (bank {bank}, pass width "
                                         f"{widths[sel]}) lanes {start}.. slice {s}")
                    checked.append((bank, widths[sel]))
                await ctx.tick()
                if load is not None:
                    ref.write(phase % 2, load[0], load[1])

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return checked


def make(geometry) -> ActivationBuffer:
    lanes, in_lanes, window, widths, b = geometry
    return ActivationBuffer(lanes=lanes, in_lanes=in_lanes, window_lanes=window, shifts=widths,
                            slice_bits=b, activity=True)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}w{g[2]}b{g[4]}")
def test_window_matches_the_list_model_for_every_width_and_bank(geometry):
    dut = make(geometry)
    checked = check_buffer(dut, geometry, seed=sum(geometry[:3]))
    assert {(bank, w) for bank, w in checked} == {(k, w) for k in (0, 1) for w in geometry[3]}
    # The storage is the banks' bits exactly when NB memories divide a bank's granules, else
    # a few unused words (a memory holds more granules of one slice than of another).
    bits = 2 * geometry[0] * 8
    granules = geometry[0] // dut.granule
    assert dut.memory_bits == bits if granules % dut.memories == 0 else dut.memory_bits > bits
    assert dut.granule == math.gcd(geometry[1], geometry[2], *geometry[3])


def _random_geometry(seed: int):
    """Pass widths of a random cell-row count and pattern set, a random beat width and bank."""
    rng = np.random.default_rng(seed)
    rows = int(rng.choice([2, 3, 4, 6, 8, 12]))
    ratios = {(m, n) for m in (1, 2, 4, 8, 16) for n in range(1, m + 1) if rows % n == 0}
    picks = rng.choice(len(ratios), size=int(rng.integers(1, 4)), replace=False)
    widths = tuple(sorted({rows // n * m for i, (m, n) in enumerate(sorted(ratios))
                           if i in picks}))
    in_lanes = int(rng.integers(1, 13))
    lanes = in_lanes * int(rng.integers(1, 9))
    return lanes, in_lanes, max(widths), widths, int(rng.choice([1, 2, 4, 8]))


@pytest.mark.parametrize("seed", range(8))
def test_window_matches_the_list_model_on_random_geometries(seed):
    geometry = _random_geometry(seed)
    checked = check_buffer(make(geometry), geometry, seed=seed, tokens=2 * len(geometry[3]) + 1)
    assert {w for _, w in checked} == set(geometry[3]), geometry


def _mutant(geometry, *, turn: int = 0, swap: bool = False, always: bool = False):
    """The real buffer behind a rewiring: ``window`` rotated by ``turn`` lanes (a wrong
    rotation), the first two granules of every beat swapped (a wrong granule), or ``read``
    tied high (every pass's memories read in every cycle)."""
    inputs, outputs = {}, {}
    if always:
        inputs[("read",)] = 1
    if swap:
        def swapped(outer, real):
            g = real.granule
            lanes = list(range(len(outer.wdata)))
            lanes[:2 * g] = lanes[g:2 * g] + lanes[:g]
            return Cat(*(outer.wdata[i] for i in lanes))
        inputs[("wdata",)] = swapped
    if turn:
        def rotated(outer, real):
            n = len(real.window)
            return Cat(*(real.window[(j + turn) % n] for j in range(n)))
        outputs[("window",)] = rotated
    mutant = wrapping(ActivationBuffer, "a faulty buffer", inputs=inputs, outputs=outputs)
    lanes, in_lanes, window, widths, b = geometry
    return mutant(lanes=lanes, in_lanes=in_lanes, window_lanes=window, shifts=widths,
                  slice_bits=b, activity=True)


@pytest.mark.parametrize("mutant", ["rotation", "granule"])
def test_the_check_refutes_a_wrong_rotation_and_a_wrong_granule(mutant):
    geometry = GEOMETRIES[0]
    g = math.gcd(geometry[1], geometry[2], *geometry[3])
    dut = _mutant(geometry, turn=g if mutant == "rotation" else 0, swap=mutant == "granule")
    with pytest.raises(AssertionError, match=r"token \d+ \(bank"):
        check_buffer(dut, geometry, seed=1, tokens=3)


def test_the_check_refutes_a_read_enable_tied_high():
    """With ``read`` tied high the windows stay right (a stalled cycle re-reads the same
    words) but the ports read in cycles whose data nobody uses: the read bits differ."""
    geometry = GEOMETRIES[0]
    with pytest.raises(AssertionError, match="bits read, not 0"):
        check_buffer(_mutant(geometry, always=True), geometry, seed=1, tokens=3)



@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lanes=10, in_lanes=4, window_lanes=4, shifts=(4,), slice_bits=1),
         "lanes must be a positive multiple of in_lanes=4, not 10"),
        (dict(lanes=16, in_lanes=4, window_lanes=4, shifts=(4, 8), slice_bits=1),
         "window_lanes must be at least the widest pass, 8, not 4"),
        (dict(lanes=16, in_lanes=4, window_lanes=8, shifts=(4, 8), slice_bits=3),
         "slice_bits must be 1, 2, 4 or 8, not 3"),
    ],
)
def test_parameters_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActivationBuffer(**kwargs)
