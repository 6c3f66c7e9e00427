"""The packed top (hw/packed.py, ``flexcim verilog --bus packed``): the macro behind the weight
unpacker, one command stream, packed weight words in.  amaranth.sim against golden (int64
sparse_matmul, golden.perf cycles, golden.energy events) and spec.layouts' word counts; the
export, its lint and its one-line refusals.  The cocotb runs are tests/sim/test_packed_tb.py."""

import json

import numpy as np
import pytest
from flexcim.golden import energy, host, perf
from flexcim.golden.matmul import sparse_matmul
from flexcim.golden.prune import nm_prune
from flexcim.hw.export import default_name
from flexcim.hw.packed import MAX_LEAD, PackedFlexCiM, command_lead
from flexcim.hw.pysim import PySim
from flexcim.spec import layouts
from flexcim.spec.config import PRESETS
from flexcim.spec.nm import NMPattern, NMTensor

from flexcim.cli import main
from flexcim.errors import FlexCimError

# A configuration whose 16:32 groups carry 30-bit codes: the first packed beat of a pass is
# 4 x (8 + 30) = 152 bits, 3 words of 4 x (8 + 5) = 52 bits.
WIDE_CODES = PRESETS["tiny"].with_overrides(["rows=8", "patterns=1:1,16:32", "max_k=256"])


def layers_of(cfg, rng, patterns=None, tokens=1):
    """Per pattern (default: every pattern of ``cfg``) one layer over two K chunks and two
    column tiles: four loading commands, partial last passes and tiles."""
    layers = []
    for p in cfg.patterns if patterns is None else map(NMPattern.parse, patterns):
        k = (cfg.max_k_for(p) // p.m + 1) * p.m
        x = rng.integers(-128, 128, size=(tokens, k), dtype=np.int8)
        w = nm_prune(rng.integers(-128, 128, size=(cfg.cols + 1, k), dtype=np.int8), p)
        layers.append((x, NMTensor.compress(w, p)))
    return layers


def expected_words(cfg, cmds):
    """spec.layouts.compact_words summed over the loading commands (golden.system's traffic)."""
    return sum(layouts.compact_words(cfg, c.pattern, cfg.weight_beats(c.pattern, c.k))
               for c in cmds if c.load_weights)


# Patterns whose first packed beat takes one word and two (2:8, 8:16, 3:8, 12:16), groups of
# 1 to 12 rows; the cocotb sweep (make regress) runs more patterns on both simulators.
CONFIGS = [("tiny", (), ("1:1", "2:4", "2:8", "8:16"), True),
           ("tiny3", (), ("3:4", "3:8", "12:16"), False),
           ("tiny", ("weight_port_rows=2", "weight_overlap=1"), ("1:2", "4:8"), False)]


@pytest.mark.parametrize("name, sets, patterns, stalls", CONFIGS)
def test_layers_are_exact_in_the_macros_cycles_plus_the_lead(name, sets, patterns, stalls):
    """Layers of several patterns back to back in one run (the unpacker switches pattern per
    command): y equals sparse_matmul of the original weights, the cycles equal golden.perf's
    plus the command lead, the activity counters the energy model's events, and packed_words
    the compact_words of every load.  With gaps on every input and back-pressure: the same
    results and words, more cycles."""
    cfg = PRESETS[name].with_overrides(sets)
    layers = layers_of(cfg, np.random.default_rng(len(name) + len(sets)), patterns)
    lead = command_lead(cfg)
    assert lead == 2  # both presets have patterns whose first beat needs two words
    runs = None
    for in_gap, out_stall in ((0.0, 0.0), (0.3, 0.3))[:1 + stalls]:
        engine = PySim(cfg, packed=True, counters=True, in_gap=in_gap, out_stall=out_stall,
                       seed=5)
        runs = host.run_layers(cfg, layers, engine.execute)
        for (x, w), run in zip(layers, runs, strict=True):
            np.testing.assert_array_equal(run.y, sparse_matmul(x, w, cfg.acc_bits),
                                          str(w.pattern))
        cmds = [cmd for run in runs for cmd in run.commands]
        assert engine.counters["packed_words"] == expected_words(cfg, cmds)
        events = energy.layer_events(cfg, cmds)
        assert {k: engine.counters[k] for k in events} == events
        assert not engine.error
        if not in_gap:
            assert engine.cycles == perf.layer_cycles(cfg, cmds) + lead
        else:
            assert engine.cycles > perf.layer_cycles(cfg, cmds) + lead


def test_rows_swapped_across_groups_change_the_result():
    """The checks can fail: words packed from weight beats whose first two groups (rows 0-1
    and 2-3, each group still valid) were exchanged give a y unlike sparse_matmul's."""
    cfg = PRESETS["tiny"]
    [(x, w)] = layers_of(cfg, np.random.default_rng(7), ["2:4"])
    streams = host.layer_streams(cfg, x, w)
    values, indices = layouts.unpack_weights(cfg, streams.weight_beats)
    order = [2, 3, 0, 1, *range(4, len(values))]  # group 0 <-> group 1
    values, indices = values[order], indices[order]
    swapped = [int(b) for b in _pack_rows(cfg, values, indices)]
    engine = PySim(cfg, packed=True)
    beats = engine.execute(streams.cmd_beats, swapped, streams.act_beats)
    y = host.collect(cfg, streams.commands, beats, x.shape[0], w.out_features)
    assert not np.array_equal(y, sparse_matmul(x, w, cfg.acc_bits))


def _pack_rows(cfg, values, indices):
    """Row words back to weight beats (W = 1), through the layout's own offsets."""
    layout = layouts.weight_layout(cfg)
    shift = layout["indices"].offset
    out = []
    for v, i in zip(values, indices, strict=True):
        beat = 0
        for c in range(cfg.cols):
            beat |= (int(v[c]) & 0xFF) << (8 * c)
            beat |= int(i[c]) << (shift + c * cfg.index_bits)
        out.append(beat)
    return out


def test_a_command_the_macro_drops_forks_nothing():
    """A loading command with k = 0 sets error and takes no words: the next commands' words
    still line up, their results are exact, and packed_words counts only theirs."""
    cfg = PRESETS["tiny"]
    [(x, w)] = layers_of(cfg, np.random.default_rng(3), ["2:8"])
    streams = host.layer_streams(cfg, x, w)
    layout = layouts.cmd_layout(cfg)
    bad = (1 << layout["load_weights"].offset) | (1 << layout["tokens"].offset)  # k = 0
    assert layouts.compact_loads(cfg, [bad]) == []
    engine = PySim(cfg, packed=True, counters=True)
    beats = engine.execute([bad, *streams.cmd_beats], streams.weight_beats, streams.act_beats)
    y = host.collect(cfg, streams.commands, beats, x.shape[0], w.out_features)
    np.testing.assert_array_equal(y, sparse_matmul(x, w, cfg.acc_bits))
    assert engine.error
    assert engine.counters["packed_words"] == expected_words(cfg, streams.commands)


def test_pack_compact_stream_is_each_loads_pack_compact():
    cfg = PRESETS["tiny3"]
    [(x, w)] = layers_of(cfg, np.random.default_rng(1), ["3:8"])
    streams = host.layer_streams(cfg, x, w)
    loads = layouts.compact_loads(cfg, streams.cmd_beats)
    assert loads == [(c.pattern, cfg.weight_beats(c.pattern, c.k)) for c in streams.commands]
    words = layouts.pack_compact_stream(cfg, streams.cmd_beats, streams.weight_beats)
    assert len(words) == expected_words(cfg, streams.commands)
    at, got = 0, []
    for pattern, n in loads:
        got += layouts.pack_compact(cfg, pattern, streams.weight_beats[at:at + n])
        at += n
    assert words == got
    # 2 column tiles x (4 + 1 passes: K = 136 in chunks of 128 and 8) x 12 beats of one row
    assert len(streams.weight_beats) == 2 * (4 + 1) * 12
    with pytest.raises(FlexCimError, match=r"^the commands load 120 weight beats, not the 119 "
                                           r"given$"):
        layouts.pack_compact_stream(cfg, streams.cmd_beats, streams.weight_beats[:-1])


def test_lead_is_the_unpackers_first_words_and_wide_codes_are_refused():
    assert [command_lead(PRESETS[n]) for n in ("tiny", "dense", "fixed24", "default")] == [
        2, 1, 2, 2]
    message = (r"^--bus packed cannot build this configuration: the first packed beat of "
               r"pattern 16:32 is 152 bits \(4 group codes of 30 bits\), 3 words of 52 bits; "
               rf"the packed top allows at most {MAX_LEAD} \(patterns whose codes fit\)$")
    with pytest.raises(FlexCimError, match=message):
        PackedFlexCiM(WIDE_CODES)
    with pytest.raises(TypeError, match="counters must be True or False, not 1"):
        PackedFlexCiM(PRESETS["tiny"], counters=1)
    with pytest.raises(TypeError, match="cfg must be a HwConfig, not dict"):
        PackedFlexCiM({})


@pytest.fixture(scope="module")
def packed_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "tiny_packed.v"
    assert main(["-q", "verilog", "--preset", "tiny", "--bus", "packed", "--counters", "-o",
                 str(out), "--lint"]) == 0
    return out


def test_packed_export_ports_sidecar_and_lint(packed_export):
    """``--bus packed --counters --lint`` (Verilator lint clean apart from WIDTH): module
    ``flexcim_tiny_counters_packed`` with a ``packed`` word port of the macro's beat width and
    no ``weights`` port, the counters and packed_words, and a sidecar that says so."""
    cfg = PRESETS["tiny"]
    text = packed_export.read_text()
    sidecar = json.loads(packed_export.with_suffix(".json").read_text())
    name = "flexcim_tiny_counters_packed"
    assert sidecar["top"] == name == default_name(cfg, True, "packed")
    assert f"module {name}(" in text and "weights__" not in text.split(");")[0]
    ports = {p["name"]: p for p in sidecar["ports"]}
    bus = layouts.compact_bus_bits(cfg)
    assert bus == layouts.weight_layout(cfg).size == 4 * (8 + 4)
    assert ports["packed__payload"] == {"name": "packed__payload", "dir": "in", "width": bus}
    assert ports["packed_words"]["width"] == layouts.COUNTER_BITS
    assert {"clk", "rst", "cmd__payload", "act__payload", "result__payload", "error",
            "counters"} <= set(ports)
    assert not any(p.startswith("weights") for p in ports)
    for port in ports.values():  # every port of the map is a port of the module
        width = f"[{port['width'] - 1}:0] " if port["width"] > 1 else ""
        decl = "input" if port["dir"] == "in" else "output"
        assert f"{decl} {width}{port['name']};" in text or \
            f"{decl} reg {width}{port['name']};" in text, port
    packed = sidecar["packed"]
    assert sidecar["bus"] == "packed" and packed["word_bits"] == bus
    assert packed["command_lead"] == 2
    assert packed["code_bits"] == {"1:1": 0, "1:2": 1, "1:4": 2, "2:4": 3, "1:8": 3, "2:8": 5,
                                   "4:8": 7, "8:16": 14}
    assert packed["packed_words"]["port"] == "packed_words"


def test_module_names_per_bus():
    cfg = PRESETS["tiny"]
    assert {default_name(cfg, c, "packed") for c in (False, True)} == {
        "flexcim_tiny_packed", "flexcim_tiny_counters_packed"}


def test_wide_codes_are_one_line_and_nothing_written(tmp_path, capsys):
    """A configuration the packed top cannot build is refused before any file is written (an
    unknown --bus: tests/hw/test_axis.py)."""
    assert main(["verilog", "--preset", "tiny", "--set", "rows=8", "--set",
                 "patterns=1:1,16:32", "--set", "max_k=256", "--bus", "packed", "-o",
                 str(tmp_path / "m.v")]) == 2
    assert capsys.readouterr().err == (
        "flexcim: error: --bus packed cannot build this configuration: the first packed beat "
        "of pattern 16:32 is 152 bits (4 group codes of 30 bits), 3 words of 52 bits; the "
        f"packed top allows at most {MAX_LEAD} (patterns whose codes fit)\n")
    assert list(tmp_path.iterdir()) == []
