"""The packed top (hw/packed.py, ``flexcim verilog --bus packed``): the macro behind the weight
unpacker, one command stream, packed weight words in.  amaranth.sim against golden (int64
sparse_matmul, golden.perf cycles, golden.energy events) and spec.layouts' word counts; the
export, its lint and its one-line refusals; its C header (a C driver built on it packs the
words of pack_compact_stream) and SystemVerilog package.  The cocotb runs are
tests/sim/test_packed_tb.py."""

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from flexcim.golden import energy, host, perf
from flexcim.golden.matmul import sparse_matmul
from flexcim.golden.prune import nm_prune
from flexcim.hw import interface
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


# --------------------------------------------------------------------------- header and package
def _defines(header: str, prefix: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(rf"^#define {prefix}_(\w+) (\d+)u\b", header,
                                                 re.M)}


def _localparams(package: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"localparam bit \[31:0\] (\w+) = 32'd(\d+);",
                                                 package)}


def test_packed_header_and_package_carry_the_sidecars_numbers(packed_export):
    """The export's header and package: the macro's constants unchanged, plus the ``packed``
    section's word width, command lead and code bits per pattern, each equal to the sidecar's
    number and to the spec function it comes from (code bits also to ceil(log2 C(M, N)))."""
    cfg = PRESETS["tiny"]
    sidecar = json.loads(packed_export.with_suffix(".json").read_text())
    name, packed = sidecar["top"], sidecar["packed"]
    header = (packed_export.parent / sidecar["c_header"]).read_text()
    package = (packed_export.parent / sidecar["sv_package"]).read_text()
    consts = _defines(header, name.upper())
    assert consts == _localparams(package)
    macro = _defines(interface.c_header(cfg, name, "0.1.0", True), name.upper())
    new = {k: v for k, v in consts.items() if k not in macro}
    assert {k: consts[k] for k in macro} == macro
    codes = {f"PATTERN_{p.n}_{p.m}_CODE_BITS": p for p in cfg.patterns}
    assert set(new) == {"PACKED_WIDTH", "PACKED_COMMAND_LEAD", *codes}
    ports = {p["name"]: p["width"] for p in sidecar["ports"]}
    bus = layouts.compact_bus_bits(cfg)
    assert new["PACKED_WIDTH"] == packed["word_bits"] == bus == \
        ports["packed__payload"] == 48
    assert new["PACKED_COMMAND_LEAD"] == packed["command_lead"] == command_lead(cfg) == max(
        layouts.compact_first_words(cfg, p) for p in cfg.patterns) == 2
    for const, p in codes.items():
        assert new[const] == packed["code_bits"][str(p)] == layouts.compact_code_bits(cfg, p) \
            == (math.comb(p.m, p.n) - 1).bit_length()
    assert f"  typedef logic [{bus - 1}:0] packed_t;" in package
    assert f"#define {name.upper()}_PACKED_WORDS(n, code_bits, beats)" in header


DRIVER_C = r"""
static unsigned char stream[STREAM_BYTES];

static void put(uint64_t at, uint64_t v, unsigned bits) {
  unsigned i;
  for (i = 0; i < bits; i++)
    if ((v >> i) & 1u)
      stream[(at + i) / 8] |= (unsigned char)(1u << ((at + i) % 8));
}

static unsigned bit(uint64_t at) { return (stream[at / 8] >> (at % 8)) & 1u; }

static uint64_t binomial(unsigned c, unsigned k) {
  uint64_t r = 1;
  unsigned i;
  if (k > c)
    return 0;
  for (i = 1; i <= k; i++)
    r = r * (c - k + i) / i;
  return r;
}

/* Rows first .. first + n - 1 of column c in canonical order: lanes descending, each non-zero
   weight on its own index, the zero ones on the smallest lanes left free. */
static void canonical(unsigned first, unsigned n, unsigned m, unsigned c, unsigned *lane,
                      int *value) {
  int at_lane[64] = {0}, used[64] = {0}, keep[64];
  unsigned s, l, kept = 0, free_seen = 0;
  for (s = 0; s < n; s++)
    if (VALUES[first + s][c] != 0) {
      used[INDICES[first + s][c]] = 1;
      at_lane[INDICES[first + s][c]] = VALUES[first + s][c];
      kept++;
    }
  for (l = 0; l < m; l++)
    keep[l] = used[l] || ++free_seen <= n - kept;
  for (l = m, s = 0; l-- > 0;)
    if (keep[l]) {
      lane[s] = l;
      value[s] = at_lane[l];
      s++;
    }
}

int main(void) {
  const unsigned w = H(WEIGHT_PORT_ROWS);
  unsigned a, b, e, r, c, s, row = 0, lane[64];
  int value[64];
  uint64_t i, j, word = 0;
  for (a = 0; a < sizeof LOADS / sizeof LOADS[0]; a++) {
    const struct load *ld = &LOADS[a];
    uint64_t at = word * H(PACKED_WIDTH), words = H(PACKED_WORDS)(ld->n, ld->code_bits,
                                                                    ld->beats);
    for (b = 0; b < ld->beats; b++) {
      /* the beat's values: element j * cols + c is column c of the beat's row j */
      for (e = 0; e < H(WEIGHTS_VALUES_COUNT); e++) {
        unsigned q = b * w + e / H(COLS);
        canonical(row + q - q % ld->n, ld->n, ld->m, e % H(COLS), lane, value);
        put(at, (uint8_t)value[q % ld->n], H(WEIGHTS_VALUES_ELEMENT_WIDTH));
        at += H(WEIGHTS_VALUES_ELEMENT_WIDTH);
      }
      /* then cols codes per group whose first row is in the beat */
      for (r = b * w; r < b * w + w; r++)
        for (c = 0; r % ld->n == 0 && c < H(COLS); c++) {
          uint64_t code = 0;
          canonical(row + r, ld->n, ld->m, c, lane, value);
          for (s = 0; s < ld->n; s++)
            code += binomial(lane[s], ld->n - s);
          put(at, code, ld->code_bits);
          at += ld->code_bits;
        }
    }
    if (at > (word + words) * H(PACKED_WIDTH) || at <= (word + words - 1) * H(PACKED_WIDTH)) {
      printf("load %u: %llu bits do not fill %llu words\n", a, (unsigned long long)at,
             (unsigned long long)words);
      return 1;
    }
    printf("%llu\n", (unsigned long long)words);
    word += words;
    row += ld->beats * w;
  }
  /* every word as little-endian bytes, in hex */
  for (i = 0; i < word; i++) {
    for (j = 0; j < H(PACKED_WIDTH); j += 8) {
      unsigned byte = 0, k;
      for (k = 0; k < 8 && j + k < H(PACKED_WIDTH); k++)
        byte |= bit(i * H(PACKED_WIDTH) + j + k) << k;
      printf("%02x", byte);
    }
    printf("\n");
  }
  return 0;
}
"""


def _c_array(rows) -> str:
    return "{" + ", ".join("{" + ", ".join(str(int(v)) for v in row) + "}" for row in rows) + "}"


@pytest.mark.parametrize("name, sets", [("tiny", ()), ("tiny3", ()), ("tiny", ("cols=3",)),
                                        ("tiny", ("weight_port_rows=2",))])
def test_c_driver_from_the_header_packs_like_pack_compact_stream(name, sets, tmp_path):
    """A C driver that packs a layer's weight beats with the header's constants alone (word
    width, code bits per pattern, PACKED_WORDS, and the macro's COLS, WEIGHT_PORT_ROWS and
    WEIGHTS_VALUES_*) gives pack_compact_stream's words byte for byte: one layer per pattern,
    two column tiles, a partial pass, zero weights; 36-bit words with cols=3, groups starting
    mid-beat with two rows per beat."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc)")
    cfg = PRESETS[name].with_overrides(sets)
    top = default_name(cfg, bus="packed")
    header = tmp_path / f"{top}.h"
    header.write_text(interface.c_header(cfg, top, "0.1.0", packed=True))
    proc = subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                           "-x", "c", str(header)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rng = np.random.default_rng(11)
    cmd_beats, weight_beats = [], []
    for p in cfg.patterns:
        k = cfg.pass_width(p) + p.m  # a partial second pass
        dense = rng.integers(-128, 128, size=(cfg.cols + 1, k), dtype=np.int8)
        dense[rng.random(dense.shape) < 0.3] = 0  # groups with fewer than N non-zero weights
        w = NMTensor.compress(nm_prune(dense, p), p)
        streams = host.layer_streams(cfg, np.zeros((1, k), dtype=np.int8), w)
        cmd_beats += streams.cmd_beats
        weight_beats += streams.weight_beats
    loads = layouts.compact_loads(cfg, cmd_beats)
    values, indices = layouts.unpack_weights(cfg, weight_beats)
    table = ", ".join(f"{{{p.n}u, {p.m}u, H(PATTERN_{p.n}_{p.m}_CODE_BITS), {n}u}}"
                      for p, n in loads)
    src = tmp_path / "driver.c"
    src.write_text(
        "#include <stdint.h>\n#include <stdio.h>\n"
        f'#include "{header.name}"\n#define H(c) {top.upper()}_##c\n'
        f"#define STREAM_BYTES {len(values) * cfg.cols * 3 + 64}\n"
        f"static const signed char VALUES[{len(values)}][H(COLS)] = {_c_array(values)};\n"
        f"static const unsigned char INDICES[{len(values)}][H(COLS)] = {_c_array(indices)};\n"
        "struct load { unsigned n, m, code_bits, beats; };\n"
        f"static const struct load LOADS[] = {{{table}}};\n" + DRIVER_C)
    exe = tmp_path / "driver"
    proc = subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                           str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    words = layouts.pack_compact_stream(cfg, cmd_beats, weight_beats)
    bus = layouts.compact_bus_bits(cfg)
    assert [int(n) for n in out[:len(loads)]] == [layouts.compact_words(cfg, p, n)
                                                   for p, n in loads]
    assert out[len(loads):] == [w.to_bytes(-(-bus // 8), "little").hex() for w in words]
    assert len(words) > 2 * len(cfg.patterns)


SV_PACKED_CHECK = """module chk;
  import {pkg}::*;
  initial begin
    if ($bits(packed_t) != PACKED_WIDTH || $bits(packed_t) != $bits(weights_t))
      $display("FAIL: a packed word is not PACKED_WIDTH bits, the macro's beat width");
    else
      $display("PASS");
{show}  end
endmodule
"""


@pytest.mark.parametrize("name", ["tiny", "tiny3"])
def test_packed_sv_package_lints_and_states_the_spec(name, tmp_path, sv_check):
    """Verilator lints the packed top's package and a module using it (-Wall); Icarus runs the
    module, whose packed_t is PACKED_WIDTH bits and whose constants print as the spec's."""
    cfg = PRESETS[name]
    top = default_name(cfg, bus="packed")
    pkg = tmp_path / f"{top}_pkg.sv"
    pkg.write_text(interface.sv_package(cfg, top, "0.1.0", packed=True))
    consts = {"PACKED_WIDTH": layouts.compact_bus_bits(cfg),
              "PACKED_COMMAND_LEAD": command_lead(cfg),
              **{f"PATTERN_{p.n}_{p.m}_CODE_BITS": layouts.compact_code_bits(cfg, p)
                 for p in cfg.patterns}}
    show = "".join(f'    $display("{c} %0d", {c});\n' for c in consts)
    (tmp_path / "chk.sv").write_text(SV_PACKED_CHECK.format(pkg=f"{top}_pkg", show=show))
    lines = sv_check(pkg, tmp_path / "chk.sv")
    if lines:  # Icarus ran the check
        assert lines[0] == "PASS", lines
        assert dict(line.split() for line in lines[1:]) == {c: str(v) for c, v in
                                                            consts.items()}
