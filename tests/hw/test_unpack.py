"""The packed weight stream (spec.layouts) against naive references (the group codes as
positions in an enumeration of itertools.combinations, the canonical row order by hand, the
words as a bit string), and the RTL weight unpacker (hw/unpack.py) in amaranth.sim against the
beats it was packed from, alone and driving a macro."""

import itertools
import math
import random

import numpy as np
import pytest
from amaranth.hdl import Module, Value
from amaranth.lib import wiring
from amaranth.sim import Simulator
from flexcim.golden import host, perf
from flexcim.golden.matmul import sparse_matmul
from flexcim.golden.prune import nm_prune
from flexcim.hw import tools
from flexcim.hw.top import FlexCiM
from flexcim.hw.unpack import WeightUnpacker, verilog
from flexcim.spec import layouts
from flexcim.spec.config import PRESETS
from flexcim.spec.nm import NMPattern, NMTensor

from flexcim.errors import FlexCimError

PRESET_NAMES = ("tiny", "tiny3", "default", "fixed24")
# Configurations whose beats carry several rows, so groups start at any row slot of a beat
# and span beats (tiny3: 12 rows of 3 per beat against N = 2, 3, 6, 12).
WIDE_PORTS = (("tiny", ("weight_port_rows=2",)), ("tiny3", ("weight_port_rows=3",)),
              ("default", ("weight_port_rows=9",)))


def config(name, sets=()):
    return PRESETS[name].with_overrides(sets)


_COLEX = {}


def colex(m, n):
    """``{subset: rank}``: the n-subsets of range(m) in colexicographic order (ascending tuples
    compared from their largest element), enumerated by itertools, not computed."""
    if (m, n) not in _COLEX:
        subsets = sorted(itertools.combinations(range(m), n), key=lambda t: t[::-1])
        _COLEX[m, n] = {frozenset(s): r for r, s in enumerate(subsets)}
    return _COLEX[m, n]


def code_bits(pattern) -> int:
    """Bits of a group's code: enough for every subset of the enumeration."""
    count = len(colex(pattern.m, pattern.n))
    return math.ceil(math.log2(count)) if count > 1 else 0


def rows_of(cfg, beats):
    """Macro beats (ints) to per-row lists of ``cols`` (value, index) pairs, by bit offsets
    computed here: values first (8 bits, two's complement), then indices of index_bits."""
    n = cfg.cols * cfg.weight_port_rows
    rows = []
    for beat in beats:
        for j in range(cfg.weight_port_rows):
            row = []
            for c in range(cfg.cols):
                e = j * cfg.cols + c
                v = (beat >> (8 * e)) & 0xFF
                i = (beat >> (8 * n + cfg.index_bits * e)) & ((1 << cfg.index_bits) - 1)
                row.append((v - 256 if v >= 128 else v, i))
            rows.append(row)
    return rows


def beats_of(cfg, rows):
    """Per-row (value, index) lists back to macro beats, through Amaranth's layout constants."""
    layout = layouts.weight_layout(cfg)
    w = cfg.weight_port_rows
    out = []
    for b in range(len(rows) // w):
        flat = [e for row in rows[b * w:(b + 1) * w] for e in row]
        fields = {"values": [v for v, _ in flat]}
        if cfg.index_bits:
            fields["indices"] = [i for _, i in flat]
        out.append(layout.const(fields).as_value().value)
    return out


def naive_canonical(cfg, pattern, beats):
    """The beats in the packed stream's canonical order, by hand: per group and column the
    non-zero weights and, for the zero ones, the smallest indices they leave free, all sorted
    by index, largest first."""
    rows = rows_of(cfg, beats)
    out = [[None] * cfg.cols for _ in rows]
    for g in range(len(rows) // pattern.n):
        mine = range(g * pattern.n, (g + 1) * pattern.n)
        for c in range(cfg.cols):
            kept = [rows[r][c] for r in mine if rows[r][c][0] != 0]
            used = {i for _, i in kept}
            free = [i for i in range(pattern.m) if i not in used][:pattern.n - len(kept)]
            entries = sorted(kept + [(0, i) for i in free], key=lambda e: -e[1])
            for r, e in zip(mine, entries, strict=True):
                out[r][c] = e
    return beats_of(cfg, out)


def naive_pack(cfg, pattern, beats):
    """The packed words as a string of '0'/'1', bit 0 first: per beat the values of its
    canonical rows (8 bits each), then for every group whose first row is in the beat its
    columns' colex ranks, padded with '0' to whole words of the macro's beat width."""
    rows = rows_of(cfg, naive_canonical(cfg, pattern, beats))
    bits, cb, w = "", code_bits(pattern), cfg.weight_port_rows
    for b in range(len(rows) // w):
        for r in range(b * w, (b + 1) * w):
            bits += "".join(format(v & 0xFF, "08b")[::-1] for v, _ in rows[r])
        for r in range(b * w, (b + 1) * w):
            if r % pattern.n == 0 and cb:
                for c in range(cfg.cols):
                    subset = frozenset(rows[q][c][1] for q in range(r, r + pattern.n))
                    bits += format(colex(pattern.m, pattern.n)[subset], f"0{cb}b")[::-1]
    bus = (8 + cfg.index_bits) * cfg.cols * w
    bits += "0" * (-len(bits) % bus)
    return [int(bits[i:i + bus][::-1], 2) for i in range(0, len(bits), bus)]


def random_beats(cfg, pattern, beats, rng, zeros=0.3):
    """``beats`` macro weight beats (ints) of valid groups in random row order: per group and
    column N distinct random indices below M, random values of which about ``zeros`` are 0,
    the zero weights' indices redrawn at random (they may repeat another row's index)."""
    n, m = pattern.n, pattern.m
    rows = [[None] * cfg.cols for _ in range(beats * cfg.weight_port_rows)]
    for g in range(len(rows) // n):
        for c in range(cfg.cols):
            indices = rng.permutation(m)[:n]
            for s in range(n):
                v = int(rng.integers(-128, 128)) if rng.random() >= zeros else 0
                i = int(indices[s]) if v else int(rng.integers(0, m))
                rows[g * n + s][c] = (v, i)
    return beats_of(cfg, rows)


def unpacker(cfg):
    """A WeightUnpacker whose geometry only is read (never elaborated: no Amaranth warning)."""
    u = WeightUnpacker(cfg)
    u._MustUse__silence = True
    return u


def passes_of(cfg, count):
    return count * cfg.beats_per_word


def test_code_bits_by_hand():
    """The code widths of `default`, by hand: ceil(log2 C(M, N)), never above N log2 M."""
    cfg = PRESETS["default"]
    assert {str(p): layouts.compact_code_bits(cfg, p) for p in cfg.patterns} == {
        "1:1": 0, "1:4": 2, "2:4": 3, "1:8": 3, "2:8": 5, "4:8": 7, "2:16": 7, "4:16": 11,
        "6:16": 13, "8:16": 14, "12:16": 11}
    for name in PRESET_NAMES:
        for p in PRESETS[name].patterns:
            assert layouts.compact_code_bits(PRESETS[name], p) == code_bits(p)
            assert code_bits(p) <= p.n * int(math.log2(p.m))


@pytest.mark.parametrize("name, sets", [(n, ()) for n in PRESET_NAMES] + list(WIDE_PORTS))
def test_packer_matches_naive_references_and_round_trips(name, sets):
    cfg = config(name, sets)
    rng = np.random.default_rng(len(name) + len(sets))
    bus = (8 + cfg.index_bits) * cfg.cols * cfg.weight_port_rows
    assert layouts.compact_bus_bits(cfg) == bus
    for pattern in cfg.patterns:
        for count in sorted({1, 2, int(rng.integers(1, cfg.depth + 1))}):
            beats = passes_of(cfg, count)
            original = random_beats(cfg, pattern, beats, rng)
            words = layouts.pack_compact(cfg, pattern, original)
            assert words == naive_pack(cfg, pattern, original), (pattern, beats)
            rows = beats * cfg.weight_port_rows
            bits = rows * cfg.cols * 8 + rows // pattern.n * cfg.cols * code_bits(pattern)
            assert len(words) == layouts.compact_words(cfg, pattern, beats) == -(-bits // bus)
            assert bits == sum(layouts.compact_beat_layout(
                cfg, pattern, layouts.compact_starts(cfg, pattern, b)).size for b in range(beats))
            assert layouts.compact_bits(cfg, pattern, beats) == len(words) * bus
            canonical = naive_canonical(cfg, pattern, original)
            assert layouts.unpack_compact(cfg, pattern, words, beats) == canonical
            if pattern.n > 1:  # the row order really changes (a group is rarely sorted)
                assert canonical != original
            # the canonical beats pack to the same words: a fixed point
            assert layouts.pack_compact(cfg, pattern, canonical) == words


def test_zero_weights_and_padding_take_free_indices():
    """A group with fewer non-zero weights than N, and an all-zero group (the padding of a
    partial tile or pass), get distinct indices: the smallest the non-zero ones leave free."""
    cfg = PRESETS["tiny"]  # 8 cell rows, 4 columns
    p = NMPattern(4, 8)
    rows = [[(0, 0)] * cfg.cols for _ in range(cfg.beats_per_word)]
    rows[0][1], rows[2][1] = (5, 3), (-7, 1)  # group 0 of column 1: two non-zero weights
    rows[3][1] = (0, 3)                       # a zero weight sharing index 3: ignored
    words = layouts.pack_compact(cfg, p, beats_of(cfg, rows))
    got = rows_of(cfg, layouts.unpack_compact(cfg, p, words, cfg.beats_per_word))
    assert [got[r][1] for r in range(4)] == [(5, 3), (0, 2), (-7, 1), (0, 0)]
    assert [got[r][0] for r in range(4)] == [(0, 3), (0, 2), (0, 1), (0, 0)]  # all zero
    assert [got[r][1] for r in range(4, 8)] == [(0, 3), (0, 2), (0, 1), (0, 0)]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_another_patterns_stream_does_not_unpack(name):
    """The test data tell the patterns apart: reading a stream with another pattern's N:M
    never gives back the canonical beats (neither the NumPy unpacker nor the RTL can use a
    wrong code width or group size unnoticed)."""
    cfg = PRESETS[name]
    rng = np.random.default_rng(7)
    beats = cfg.beats_per_word
    for p in cfg.patterns:
        original = random_beats(cfg, p, beats, rng)
        canonical = naive_canonical(cfg, p, original)
        words = layouts.pack_compact(cfg, p, original)
        for q in cfg.patterns:
            if q == p:
                continue
            want = layouts.compact_words(cfg, q, beats)
            resized = (words + [0] * want)[:want]
            assert layouts.unpack_compact(cfg, q, resized, beats) != canonical, (p, q)


def test_bad_input_is_one_line():
    tiny = PRESETS["tiny"]
    p = NMPattern(2, 4)
    with pytest.raises(FlexCimError, match=r"^pattern 3:4 is not supported by this macro; "
                       r"supported: 1:1, .*8:16$"):
        layouts.compact_words(tiny, "3:4", 8)
    with pytest.raises(FlexCimError, match="pattern 3:4 is not supported"):
        layouts.pack_compact(tiny, "3:4", [0] * 8)
    with pytest.raises(FlexCimError, match="pattern 2:16 is not supported"):
        layouts.pack_compact_cmd(tiny, "2:16", 8)
    for bad in (0, 4, 33, 40, 8.0, True):
        with pytest.raises(FlexCimError, match=r"^a command loads whole passes of weight beats: "
                           rf"a multiple of 8 from 8 to 32 \(depth=4\), not {bad!r}$"):
            layouts.pack_compact_cmd(tiny, "2:4", bad)
    with pytest.raises(FlexCimError, match="not 12$"):
        layouts.compact_bits(tiny, "2:4", 12)
    with pytest.raises(FlexCimError, match="not 7$"):
        layouts.pack_compact(tiny, p, [0] * 7)
    rows = [[(0, 0)] * 4 for _ in range(8)]
    rows[5][2] = (9, 4)  # index 4 of 2:4: past M
    with pytest.raises(FlexCimError, match=r"^weight beat 5 holds index 4 in element 2, not "
                       r"below M=4: the packed stream cannot carry it$"):
        layouts.pack_compact(tiny, p, beats_of(tiny, rows))
    rows[5][2] = (9, 1)
    rows[4][2] = (-3, 1)  # rows 4 and 5 are group 2: two non-zero weights at index 1
    with pytest.raises(FlexCimError, match=r"^group 2 \(rows 4\.\.5\) of column 2 keeps two "
                       r"non-zero weights at index 1: the packed stream keeps one weight per "
                       r"index$"):
        layouts.pack_compact(tiny, p, beats_of(tiny, rows))
    # 8 rows x 4 values x 8 bits + 4 groups x 4 codes x 3 bits = 304 bits: 7 words of 48
    with pytest.raises(FlexCimError, match="8 weight beats with pattern 2:4 take 7 packed "
                       "words, not 2$"):
        layouts.unpack_compact(tiny, "2:4", [0, 0], 8)
    with pytest.raises(TypeError, match="cfg must be a HwConfig, not str"):
        WeightUnpacker("tiny")


def packed(cfg, commands, *, garbage=True, seed=0):
    """``commands`` (``[(pattern, beats)]``) as the unpacker receives them: ``[(pattern, beat
    count, words)]`` packed by :func:`layouts.pack_compact`.  With ``garbage`` the padding bits
    of each command's last word are random (the RTL must drop them)."""
    rng = random.Random(seed)
    bus = layouts.compact_bus_bits(cfg)
    out = []
    for pattern, beats in commands:
        words = layouts.pack_compact(cfg, pattern, beats)
        rows = len(beats) * cfg.weight_port_rows
        bits = rows * cfg.cols * 8 + rows // pattern.n * cfg.cols * code_bits(pattern)
        pad = len(words) * bus - bits
        if garbage and pad:
            words[-1] |= rng.getrandbits(pad) << (bus - pad)
        out.append((pattern, len(beats), words))
    return out


def simulate(cfg, stream, *, in_gap=0.0, out_stall=0.0, seed=0):
    """Drive ``stream`` (``[(pattern, beat count, words)]``) through the RTL with random gaps on
    both inputs and random back-pressure on the output; returns ``(output beats, the cycles
    they left in, the words taken)``."""
    rng = random.Random(seed)
    dut = WeightUnpacker(cfg)
    cmd_beats = [layouts.pack_compact_cmd(cfg, p, beats) for p, beats, _ in stream]
    words = [w for _, _, ws in stream for w in ws]
    expected = sum(beats for _, beats, _ in stream)
    out, cycles, taken = [], [], []

    async def drive(ctx, port, items, log):
        for item in items:
            while rng.random() < in_gap:
                ctx.set(port.valid, 0)
                await ctx.tick()
            ctx.set(Value.cast(port.payload), item)
            ctx.set(port.valid, 1)
            while True:
                _, _, ready = await ctx.tick().sample(port.ready)
                if ready:
                    break
            log.append(item)
        ctx.set(port.valid, 0)

    async def cmd_bench(ctx):
        await drive(ctx, dut.cmd, cmd_beats, [])

    async def word_bench(ctx):
        await drive(ctx, dut.packed, words, taken)

    async def sink(ctx):
        cycle = 0
        while len(out) < expected and cycle < 50 * (expected + len(words)) + 100:
            ready = rng.random() >= out_stall
            ctx.set(dut.weights.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.weights.valid,
                                                            dut.weights.payload.as_value())
            if valid and ready:
                out.append(int(payload))
                cycles.append(cycle)
            cycle += 1
        for _ in range(8):  # nothing more may come out
            ctx.set(dut.weights.ready, 1)
            _, _, valid = await ctx.tick().sample(dut.weights.valid)
            assert not valid

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(cmd_bench, background=True)
    sim.add_testbench(word_bench, background=True)
    sim.add_testbench(sink)
    sim.run()
    return out, cycles, taken


def command_mix(cfg, rng, passes_max):
    """Every pattern of ``cfg`` in a random order, then as many random ones, each command
    loading a random number of passes up to ``passes_max``, but one loading one pass and one
    the most a command loads (``depth`` passes: every bit of ``need``)."""
    patterns = list(cfg.patterns)
    rng.shuffle(patterns)
    patterns += [rng.choice(cfg.patterns) for _ in range(len(patterns))]
    counts = [int(rng.integers(1, passes_max + 1)) for _ in patterns]
    counts[0], counts[1] = 1, cfg.depth
    return [(p, random_beats(cfg, p, passes_of(cfg, c), rng))
            for p, c in zip(patterns, counts, strict=True)]


RTL_CONFIGS = [(n, ()) for n in PRESET_NAMES] + list(WIDE_PORTS)


@pytest.mark.parametrize("name, sets", RTL_CONFIGS)
def test_rtl_unpacks_back_to_back_commands_with_stalls(name, sets):
    cfg = config(name, sets)
    rng = np.random.default_rng(11 + len(name) + len(sets))
    commands = command_mix(cfg, rng, passes_max=1 if cfg.beats_per_word > 24 else 3)
    out, _, taken = simulate(cfg, packed(cfg, commands, seed=len(name)), in_gap=0.3,
                             out_stall=0.3, seed=len(name))
    canonical = [b for p, beats in commands for b in naive_canonical(cfg, p, beats)]
    assert len(out) == len(canonical)
    assert out == canonical
    assert len(taken) == sum(layouts.compact_words(cfg, p, len(b)) for p, b in commands)


def first_beat_words(cfg, pattern):
    """Bus words a command's first beat needs, by hand: its values and the codes of the
    groups starting in it (every group of its W rows whose first row is there)."""
    w = cfg.weight_port_rows
    starts = len(range(0, w, pattern.n))
    bits = w * cfg.cols * 8 + starts * cfg.cols * code_bits(pattern)
    return -(-bits // ((8 + cfg.index_bits) * cfg.cols * w))


@pytest.mark.parametrize("name, sets", RTL_CONFIGS)
def test_rtl_sustains_one_beat_per_cycle(name, sets):
    """Without stalls every command's beats leave in consecutive cycles; the next command's
    first beat leaves 1 + (the words it needs) cycles after the previous command's last; every
    packed word is taken exactly once."""
    cfg = config(name, sets)
    rng = np.random.default_rng(5)
    commands = command_mix(cfg, rng, passes_max=1 if cfg.beats_per_word > 24 else 2)
    out, cycles, taken = simulate(cfg, packed(cfg, commands, garbage=False))
    assert out == [b for p, beats in commands for b in naive_canonical(cfg, p, beats)]
    assert taken == [w for p, beats in commands for w in layouts.pack_compact(cfg, p, beats)]
    at = 0
    for i, (p, beats) in enumerate(commands):
        mine = cycles[at:at + len(beats)]
        assert mine == list(range(mine[0], mine[0] + len(beats))), i
        if i:  # the command is taken with the last beat, then its first words come
            assert mine[0] == cycles[at - 1] + 1 + first_beat_words(cfg, p), i
        at += len(beats)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_rtl_reads_each_patterns_own_format(name):
    """A stream packed for one pattern and announced as another does not come out as the
    canonical beats, and comes out exactly as the NumPy unpacker reads it: the unpacker really
    switches code widths and group sizes per command, even on garbage codes."""
    cfg = PRESETS[name]
    rng = np.random.default_rng(3)
    p, q = cfg.patterns[-1], cfg.patterns[len(cfg.patterns) // 2]
    q = q if q != p else cfg.patterns[0]
    stream = []
    for x, y in ((p, q), (q, p), (p, cfg.patterns[0])):
        beats = random_beats(cfg, x, cfg.beats_per_word, rng)
        want = layouts.compact_words(cfg, y, len(beats))
        words = (layouts.pack_compact(cfg, x, beats) + [0] * want)[:want]
        stream.append((y, len(beats), words, naive_canonical(cfg, x, beats)))
    out, _, _ = simulate(cfg, [s[:3] for s in stream])
    expected = [b for y, n, words, _ in stream for b in layouts.unpack_compact(cfg, y, words, n)]
    assert out == expected
    at = 0
    for _, n, _, canonical in stream:
        assert out[at:at + n] != canonical
        at += n


def test_gearbox_rules_never_starve_inside_a_command():
    """The RTL's input and output rules (a beat leaves when ``fill >= step``, a word is taken
    while the command needs more and it lands below ``max_step``), stepped by hand with a word
    offered every cycle: every command of every pattern, on every preset with every weight
    port width, emits one beat per cycle after its first (the amaranth.sim tests above check
    the RTL itself on seven of these configurations)."""
    cases = 0
    for name, base in PRESETS.items():
        for w in (d for d in range(1, base.rows + 1) if base.rows % d == 0):
            cfg = base.replace(weight_port_rows=w)
            u = unpacker(cfg)
            bus = (8 + cfg.index_bits) * cfg.cols * w
            for p in cfg.patterns:
                steps = [(cfg.cols * w * 8 + layouts.compact_starts(cfg, p, b) * cfg.cols
                          * code_bits(p)) for b in range(cfg.beats_per_word)] * cfg.depth
                need, fill, fired, cycle = sum(steps), 0, [], 0
                while len(fired) < len(steps):
                    step = steps[len(fired)]
                    fire = fill >= step
                    rest = fill - step * fire
                    take = fill < need and rest < u.max_step * u.granule  # this cycle's regs
                    if fire:
                        fired.append(cycle)
                        need -= step
                    fill = rest + bus * take
                    cycle += 1
                assert fired == list(range(fired[0], fired[0] + len(steps))), (name, w, p)
                assert fired[0] == -(-steps[0] // bus) <= u.first_words  # words it needs
                cases += 1
    assert cases > 150


def test_unpacker_verilog_lints_clean(tmp_path):
    """hw/export.py's way (emit_src=False) on `default`: Verilator lint clean apart from WIDTH;
    the module has the three streams' ports."""
    cfg = PRESETS["default"]
    text, top = verilog(cfg)
    assert top == "flexcim_default_unpack"
    out = tmp_path / f"{top}.v"
    out.write_text(text)
    tools.lint(out, top)
    for port in ("cmd__payload", "packed__payload", "weights__payload", "weights__ready"):
        assert port in text


def test_register_bits_by_hand():
    """`default`: buffer = widest packed beat (8:16's first row: 16 x (8 + 14) bits) + a word
    - a granule (16 bits); fill; need (8 passes of 2:16, the longest packed pass: 72 rows of
    16 values and 36 groups of 16 7-bit codes, in granules); the pattern code; `left` (N up to
    12) and a 14-bit rank per column.  Without a group spanning beats the last two go."""
    u = unpacker(PRESETS["default"])
    assert u.granule == 16
    assert u.register_bits() == {"buffer": 16 * 22 + 192 - 16, "fill": 6,
                                 "need": (8 * (72 * 8 + 36 * 7)).bit_length(), "pattern": 4,
                                 "left": 4, "rank": 16 * 14}
    aligned = config("default", ("weight_port_rows=6", "patterns=1:1,2:4,6:16"))
    assert set(unpacker(aligned).register_bits()) == {"buffer", "fill", "need",
                                                             "pattern"}


class CompactEngine:
    """``execute(cmd_beats, weight_beats, act_beats)`` (golden/host.py) on the macro whose
    ``weights`` port is driven by the unpacker: the weight beats of every loading command are
    packed (:func:`layouts.pack_compact`) and the unpacker gets its own command per load, so it
    runs ahead of the macro as a weight buffer's loader would.  ``cycles``: first macro command
    handshake to last result handshake, inclusive (as :class:`flexcim.hw.pysim.PySim`)."""

    def __init__(self, cfg, *, word_gap=0.0, seed=0):
        self.cfg, self.word_gap, self.seed = cfg, word_gap, seed
        self.cycles = 0

    def execute(self, cmd_beats, weight_beats, act_beats):
        cfg = self.cfg
        unpack_cmds, words, at = [], [], 0
        for beat in cmd_beats:
            f = layouts.unpack_cmd(cfg, beat)
            if f["load_weights"]:
                pattern = cfg.patterns[f["pattern"]]
                n = cfg.weight_beats(pattern, f["k"])
                unpack_cmds.append(layouts.pack_compact_cmd(cfg, pattern, n))
                words += layouts.pack_compact(cfg, pattern, weight_beats[at:at + n])
                at += n
        assert at == len(weight_beats)
        m = Module()
        m.submodules.macro = macro = FlexCiM(cfg)
        m.submodules.unpack = unpack = WeightUnpacker(cfg)
        wiring.connect(m, unpack.weights, macro.weights)
        rng = random.Random(self.seed)
        expected = sum(layouts.unpack_cmd(cfg, b)["tokens"] for b in cmd_beats)
        results, first_cmd, last_result = [], [], []

        async def drive(ctx, port, items, gap, log=None, lead=0):
            cycle = 0
            for _ in range(lead):
                await ctx.tick()
                cycle += 1
            for item in items:
                while rng.random() < gap:
                    ctx.set(port.valid, 0)
                    await ctx.tick()
                    cycle += 1
                ctx.set(Value.cast(port.payload), item)
                ctx.set(port.valid, 1)
                while True:
                    _, _, ready = await ctx.tick().sample(port.ready)
                    cycle += 1
                    if ready:
                        break
                if log is not None and not log:
                    log.append(cycle - 1)
            ctx.set(port.valid, 0)

        async def sink(ctx):
            ctx.set(macro.result.ready, 1)
            cycle = 0
            while len(results) < expected and cycle < 20000:
                _, _, valid, payload = await ctx.tick().sample(
                    macro.result.valid, Value.cast(macro.result.payload))
                if valid:
                    results.append(int(payload))
                    last_result[:] = [cycle]
                cycle += 1

        sim = Simulator(m)
        sim.add_clock(1e-6)
        # The unpacker's first beat is valid 2 cycles after its command (3 when it needs two
        # words: first_words), the macro asks for it the cycle after its own: a loader that
        # starts the unpacker first_words cycles earlier hides it.
        ahead = unpack.first_words
        for port, items, gap, log, lead in ((macro.cmd, cmd_beats, 0.0, first_cmd, ahead),
                                            (macro.act, act_beats, 0.0, None, ahead),
                                            (unpack.cmd, unpack_cmds, 0.0, None, 0),
                                            (unpack.packed, words, self.word_gap, None, 0)):
            async def bench(ctx, port=port, items=items, gap=gap, log=log, lead=lead):
                await drive(ctx, port, items, gap, log, lead)

            sim.add_testbench(bench, background=True)
        sim.add_testbench(sink)
        sim.run()
        self.cycles = last_result[0] - first_cmd[0] + 1 if results else 0
        return results


def compact_layers(cfg, rng):
    """Per pattern of ``cfg``: two column tiles, a reduction over two K chunks (several loads,
    partial last passes and packed words), and a one-group layer."""
    layers = []
    for p in cfg.patterns:
        k = (cfg.max_k_for(p) // p.m + 1) * p.m
        for t, kk, c in ((2, k, cfg.cols + 1), (1, p.m, 2)):
            x = rng.integers(-128, 128, size=(t, kk), dtype=np.int8)
            w = nm_prune(rng.integers(-128, 128, size=(c, kk), dtype=np.int8), p)
            layers.append((x, NMTensor.compress(w, p)))
    return layers


@pytest.mark.parametrize("name, sets", [("tiny", ()),
                                        ("tiny", ("weight_port_rows=2", "weight_overlap=1")),
                                        ("tiny3", ()),
                                        ("tiny3", ("weight_port_rows=3", "weight_overlap=1"))])
def test_macro_fed_by_the_unpacker_is_exact_in_the_macros_own_cycles(name, sets):
    """The whole path: compact words -> unpacker -> macro.  Every pattern's results equal
    sparse_matmul of the original weights (the macro gets each group's rows in the canonical
    order, zero weights on other indices), and the cycles equal golden.perf's (the unpacker
    adds none: it takes its next command as the previous one's last beat leaves and has its
    first beat 2 or 3 cycles later, and the macro asks for it at least three cycles later).
    Beats of several rows put group starts at every row slot and groups across beats.  With
    gaps in the packed words the results stay exact and only the cycles grow."""
    cfg = PRESETS[name].with_overrides(sets)
    layers = compact_layers(cfg, np.random.default_rng(len(name) + len(sets)))
    engine = CompactEngine(cfg)
    runs = host.run_layers(cfg, layers, engine.execute)
    for (x, w), run in zip(layers, runs, strict=True):
        np.testing.assert_array_equal(run.y, sparse_matmul(x, w, cfg.acc_bits), str(w.pattern))
    cmds = [cmd for run in runs for cmd in run.commands]
    assert engine.cycles == perf.layer_cycles(cfg, cmds)
    if "weight_port_rows=2" not in sets:
        return
    stalled = CompactEngine(cfg, word_gap=0.5, seed=1)
    runs = host.run_layers(cfg, layers, stalled.execute)
    for (x, w), run in zip(layers, runs, strict=True):
        np.testing.assert_array_equal(run.y, sparse_matmul(x, w, cfg.acc_bits), str(w.pattern))
    assert stalled.cycles > engine.cycles
