"""The packed weight stream (spec.layouts) against a naive bit-string reference, and the RTL
weight unpacker (hw/unpack.py) in amaranth.sim against the beats it was packed from."""

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


def log2m(pattern) -> int:
    return int(math.log2(pattern.m))  # by another route than the code's bit_length


def random_beats(cfg, pattern, beats, rng):
    """``beats`` macro weight beats (ints) with random values and random indices below M (the
    high index bits zero), built through Amaranth's own layout constants."""
    layout = layouts.weight_layout(cfg)
    n = cfg.cols * cfg.weight_port_rows
    values = rng.integers(-128, 128, size=(beats, n))
    indices = rng.integers(0, pattern.m, size=(beats, n))
    out = []
    for b in range(beats):
        fields = {"values": values[b].tolist()}
        if cfg.index_bits:
            fields["indices"] = indices[b].tolist()
        out.append(layout.const(fields).as_value().value)
    return out


def naive_pack(cfg, pattern, beats):
    """The packed words as a string of '0'/'1', bit 0 first: per beat its values (8 bits each)
    then its indices (log2 M bits each), padded with '0' to whole words of the beat width."""
    n = cfg.cols * cfg.weight_port_rows
    lg = log2m(pattern)
    bits = ""
    for beat in beats:
        values = [(beat >> (8 * e)) & 0xFF for e in range(n)]
        indices = [(beat >> (8 * n + cfg.index_bits * e)) & ((1 << cfg.index_bits) - 1)
                   for e in range(n)]
        bits += "".join(format(v, "08b")[::-1] for v in values)
        bits += "".join(format(i, f"0{lg}b")[::-1] if lg else "" for i in indices)
    bus = (8 + cfg.index_bits) * n
    bits += "0" * (-len(bits) % bus)
    return [int(bits[i:i + bus][::-1], 2) for i in range(0, len(bits), bus)]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_packer_matches_a_naive_bit_string_and_round_trips(name):
    cfg = PRESETS[name]
    rng = np.random.default_rng(len(name))
    bus = (8 + cfg.index_bits) * cfg.cols * cfg.weight_port_rows
    assert layouts.compact_bus_bits(cfg) == bus
    for pattern in cfg.patterns:
        for beats in (1, 2, 3, int(rng.integers(4, 40))):
            original = random_beats(cfg, pattern, beats, rng)
            words = layouts.pack_compact(cfg, pattern, original)
            assert words == naive_pack(cfg, pattern, original), (pattern, beats)
            entry = 8 + log2m(pattern)
            expected_words = -(-beats * cfg.cols * cfg.weight_port_rows * entry // bus)
            assert len(words) == layouts.compact_words(cfg, pattern, beats) == expected_words
            assert layouts.compact_bits(cfg, pattern, beats) == expected_words * bus
            assert layouts.unpack_compact(cfg, pattern, words, beats) == original


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_another_patterns_entry_width_does_not_unpack(name):
    """The test data tell the entry widths apart: reading a stream with another pattern's
    log2 M never gives the original beats back (neither the NumPy unpacker nor the RTL can get
    a width wrong unnoticed)."""
    cfg = PRESETS[name]
    rng = np.random.default_rng(7)
    beats = 6
    for p in cfg.patterns:
        original = random_beats(cfg, p, beats, rng)
        words = layouts.pack_compact(cfg, p, original)
        for q in cfg.patterns:
            if log2m(q) == log2m(p):
                continue
            want = layouts.compact_words(cfg, q, beats)
            resized = (words + [0] * want)[:want]
            assert layouts.unpack_compact(cfg, q, resized, beats) != original, (p, q)


def test_bad_input_is_one_line():
    tiny = PRESETS["tiny"]
    with pytest.raises(FlexCimError, match=r"^pattern 3:4 is not supported by this macro; "
                       r"supported: 1:1, .*8:16$"):
        layouts.compact_words(tiny, "3:4", 8)
    with pytest.raises(FlexCimError, match="pattern 3:4 is not supported"):
        layouts.pack_compact(tiny, "3:4", [0])
    with pytest.raises(FlexCimError, match="pattern 2:16 is not supported"):
        layouts.pack_compact_cmd(tiny, "2:16", 1)
    with pytest.raises(FlexCimError, match=r"a command loads 1\.\.32 weight beats .*, not 0$"):
        layouts.pack_compact_cmd(tiny, "2:4", 0)
    with pytest.raises(FlexCimError, match="not 33"):
        layouts.compact_bits(tiny, "2:4", 33)
    beat = random_beats(tiny, NMPattern(2, 4), 1, np.random.default_rng(0))[0]
    beat |= 1 << (8 * 4 + 4 * 2 + 2)  # element 2's index: bit 2 set, so it is >= 4
    with pytest.raises(FlexCimError, match=r"weight beat 0 holds index \d+ in element 2, not "
                       r"below M=4: the packed stream has 2 index bits"):
        layouts.pack_compact(tiny, "2:4", [beat])
    with pytest.raises(FlexCimError, match="3 weight beats with pattern 2:4 take 3 packed "
                       "words, not 2"):
        layouts.unpack_compact(tiny, "2:4", [0, 0], 3)
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
        pad = len(words) * bus - len(beats) * layouts.compact_beat_layout(cfg, pattern).size
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


def command_mix(cfg, rng, beats_max):
    """Every pattern of ``cfg`` in a random order, then as many random ones, each command with
    a random beat count up to ``beats_max``, but one loading a whole weight word
    (``beats_per_word``) and one the most a command loads (``compact_max_beats``)."""
    patterns = list(cfg.patterns)
    rng.shuffle(patterns)
    patterns += [rng.choice(cfg.patterns) for _ in range(len(patterns))]
    counts = [int(rng.integers(1, beats_max + 1)) for _ in patterns]
    counts[0] = cfg.beats_per_word
    counts[1] = layouts.compact_max_beats(cfg)  # the longest command: every bit of `need`
    return [(p, random_beats(cfg, p, c, rng)) for p, c in zip(patterns, counts, strict=True)]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_rtl_unpacks_back_to_back_commands_with_stalls(name):
    cfg = PRESETS[name]
    rng = np.random.default_rng(11 + len(name))
    commands = command_mix(cfg, rng, beats_max=9)
    out, _, taken = simulate(cfg, packed(cfg, commands, seed=len(name)), in_gap=0.3,
                             out_stall=0.3, seed=len(name))
    original = [b for _, beats in commands for b in beats]
    assert len(out) == len(original)
    assert out == original
    assert len(taken) == sum(layouts.compact_words(cfg, p, len(b)) for p, b in commands)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_rtl_sustains_one_beat_per_cycle(name):
    """Without stalls every command's beats leave in consecutive cycles, with one idle cycle
    between commands; every packed word is taken exactly once."""
    cfg = PRESETS[name]
    rng = np.random.default_rng(5)
    commands = command_mix(cfg, rng, beats_max=16)
    out, cycles, taken = simulate(cfg, packed(cfg, commands, garbage=False))
    assert out == [b for _, beats in commands for b in beats]
    assert taken == [w for p, beats in commands for w in layouts.pack_compact(cfg, p, beats)]
    at = 0
    for i, (_, beats) in enumerate(commands):
        mine = cycles[at:at + len(beats)]
        assert mine == list(range(mine[0], mine[0] + len(beats))), i
        if i:
            assert mine[0] == cycles[at - 1] + 2, i  # the next command's first word: +1 cycle
        at += len(beats)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_rtl_reads_each_patterns_own_entry_width(name):
    """A stream packed for one pattern and announced as another (of another log2 M) does not
    come out as the original beats: the unpacker really switches entry widths per command."""
    cfg = PRESETS[name]
    rng = np.random.default_rng(3)
    p, q = cfg.patterns[-1], cfg.patterns[0]  # the widest and the 1:1 entries
    beats = random_beats(cfg, p, 5, rng)
    want = layouts.compact_words(cfg, q, 5)
    words = (layouts.pack_compact(cfg, p, beats) + [0] * want)[:want]
    out, _, _ = simulate(cfg, [(q, 5, words)])
    assert out == layouts.unpack_compact(cfg, q, words, 5)
    assert out != beats


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
        # The unpacker's first beat is valid 2 cycles after its command, the macro asks for it
        # the cycle after its own: a loader that starts the unpacker a cycle earlier hides it.
        for port, items, gap, log, lead in ((macro.cmd, cmd_beats, 0.0, first_cmd, 1),
                                            (macro.act, act_beats, 0.0, None, 1),
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
                                        ("tiny3", ())])
def test_macro_fed_by_the_unpacker_is_exact_in_the_macros_own_cycles(name, sets):
    """The whole path: compact words -> unpacker -> macro.  Every pattern's results equal
    sparse_matmul, and the cycles equal golden.perf's (the unpacker adds none: it takes its
    next command as the previous one's last beat leaves, and the macro asks for that command's
    first beat at least three cycles later).  With gaps in the packed words the results stay
    exact and only the cycles grow."""
    cfg = PRESETS[name].with_overrides(sets)
    layers = compact_layers(cfg, np.random.default_rng(len(name) + len(sets)))
    engine = CompactEngine(cfg)
    runs = host.run_layers(cfg, layers, engine.execute)
    for (x, w), run in zip(layers, runs, strict=True):
        np.testing.assert_array_equal(run.y, sparse_matmul(x, w, cfg.acc_bits), str(w.pattern))
    cmds = [cmd for run in runs for cmd in run.commands]
    assert engine.cycles == perf.layer_cycles(cfg, cmds)
    if not sets:
        return
    stalled = CompactEngine(cfg, word_gap=0.5, seed=1)
    runs = host.run_layers(cfg, layers, stalled.execute)
    for (x, w), run in zip(layers, runs, strict=True):
        np.testing.assert_array_equal(run.y, sparse_matmul(x, w, cfg.acc_bits), str(w.pattern))
    assert stalled.cycles > engine.cycles
