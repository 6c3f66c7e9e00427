"""What an integrator needs without Python: the macro's interface as data, a C header and a
SystemVerilog package, all generated from the one layout definition (:mod:`flexcim.spec.layouts`,
through the stream signatures of :class:`~flexcim.hw.top.FlexCiM`) and the :class:`HwConfig`.

:func:`describe` is the ``interface`` section of the ``flexcim verilog`` sidecar: every payload
field of every stream with its bit offset and width, the pattern-code table, the beat order of a
command, the latencies and the limits.  :func:`c_header` and :func:`sv_package` render the same
numbers as ``#define`` constants and ``localparam`` s (with packed struct types), prefixed by
the module name, in the style of register generators' field maps (one offset and one width per
field).  Field order is bit order: the first field of a payload is in its low bits; element 0
of an array is in the array's low bits.

For the packed top (``flexcim verilog --bus packed``) :func:`packed_stream` gives the numbers of
its ``packed`` stream; they are the sidecar's ``packed`` section and, with ``packed=True``, the
header's and package's ``PACKED_*`` and ``PATTERN_<n>_<m>_CODE_BITS`` constants.
"""

from __future__ import annotations

from amaranth.hdl import Shape
from amaranth.lib import data
from flexcim.spec.config import ACT_BITS, HwConfig

from flexcim.errors import FlexCimError

# What each stream's payload elements mean (the layouts' docstrings, as integrators read them).
_ARRAY_MEANING = {
    ("weights", "values"): "element j*cols + c (j < weight_port_rows): column c of the beat's "
                           "cell row j, the weight of output channel c",
    ("weights", "indices"): "element j*cols + c: the in-group index (0..M-1) of that weight",
    ("act", "lanes"): "lane i of beat b of a token: input channel b*in_lanes + i",
    ("result", "acc"): "element c: output channel c of the column tile (wraps at acc_bits)",
}
# A stream whose payload is an array (not a struct) gets one field of this name.
_ARRAY_PAYLOAD = {"act": "lanes", "result": "acc"}


def _field(stream: str, name: str, offset: int, shape) -> dict:
    field = {"name": name, "offset": offset}
    if isinstance(shape, data.ArrayLayout):
        elem = Shape.cast(shape.elem_shape)
        field.update(width=shape.size, count=shape.length, element_width=elem.width,
                     signed=elem.signed, element=_ARRAY_MEANING[(stream, name)])
    else:
        s = Shape.cast(shape)
        field.update(width=s.width, signed=s.signed)
    return field


def payload_fields(stream: str, layout) -> list[dict]:
    """The fields of one payload layout, low bits first: ``name``, ``offset``, ``width``,
    ``signed``, and for an array ``count``, ``element_width`` and what element ``i`` is."""
    if isinstance(layout, data.StructLayout):
        return [_field(stream, name, f.offset, f.shape) for name, f in layout]
    return [_field(stream, _ARRAY_PAYLOAD[stream], 0, layout)]


def streams(cfg: HwConfig, counters: bool = False) -> dict[str, dict]:
    """``{stream: {dir, width, ports, fields}}`` read from the stream members of the macro's
    signature (the layouts it was built with)."""
    from amaranth.lib import stream as lib_stream
    from flexcim.hw.top import FlexCiM

    top = FlexCiM(cfg, counters=counters)
    top._MustUse__silence = True  # only its signature is needed
    out = {}
    for name, member in top.signature.members.items():
        if not (member.is_signature and isinstance(member.signature, lib_stream.Signature)):
            continue
        shape = member.signature.members["payload"].shape
        out[name] = {
            "dir": "in" if member.flow.name == "In" else "out",
            "width": Shape.cast(shape).width,
            "ports": {p: f"{name}__{p}" for p in ("payload", "valid", "ready")},
            "fields": payload_fields(name, shape),
        }
    return out


def pattern_table(cfg: HwConfig) -> list[dict]:
    """One row per pattern code: the pattern, the input channels a pass covers, the longest
    ``k`` of one command and the weight beats per pass."""
    return [{"code": cfg.pattern_code(p), "pattern": str(p), "n": p.n, "m": p.m,
             "pass_width": cfg.pass_width(p), "max_k": cfg.max_k_for(p),
             "weight_beats_per_pass": cfg.beats_per_word} for p in cfg.patterns]


BEAT_ORDER = [
    "cmd: one beat per command; the macro takes the next command the cycle after the previous "
    "command's last compute cycle",
    "weights (load_weights = 1 only): passes * rows_total / weight_port_rows beats, passes = "
    "ceil(k / pass_width); beat q holds compressed weight columns q * weight_port_rows + j "
    "(j < weight_port_rows) of every output channel of the tile (values[j * cols + c], "
    "indices[j * cols + c] for channel c); columns past the tile's channels are zero; may "
    "overlap the activations",
    "with weight_overlap = 1 a token's pass starts once the weight beats of its pass are in "
    "(beat (t + 1) * rows_total / weight_port_rows - 1 for pass t); with 0 once all are in",
    "act: tokens * ceil(k / in_lanes) beats, token after token; lane i of beat b of a token is "
    "input channel b * in_lanes + i; the last beat of a token is zero-padded",
    "result: tokens beats, in token order; element c is output channel c of the column tile",
    "load_weights = 0 reuses the weights of the previous command (same pattern and k)",
    "a command the macro cannot run (pattern code not configured, k outside 1..max_k of its "
    "pattern, tokens = 0) is dropped without consuming weights or activations and sets the "
    "sticky error output",
]


def describe(cfg: HwConfig, counters: bool = False) -> dict:
    """The ``interface`` section of the sidecar (see the module docstring)."""
    from flexcim.hw.top import RESULT_FIFO_DEPTH
    from flexcim.spec.timing import result_latency

    return {
        "streams": streams(cfg, counters),
        "handshake": "amaranth.lib.stream: a beat moves on a rising clk edge with valid and "
                     "ready both high; valid never waits for ready",
        "pattern_codes": pattern_table(cfg),
        "beat_order": BEAT_ORDER,
        "limits": {
            "max_k": cfg.max_k, "max_tokens": cfg.max_tokens, "k_min": 1, "tokens_min": 1,
            "rows_total": cfg.rows_total, "cols": cfg.cols, "in_lanes": cfg.in_lanes,
            "depth": cfg.depth, "acc_bits": cfg.acc_bits, "index_bits": cfg.index_bits,
            "pattern_bits": cfg.pattern_bits, "k_bits": cfg.k_bits,
            "token_bits": cfg.token_bits, "weight_port_rows": cfg.weight_port_rows,
            "weight_overlap": cfg.weight_overlap,
        },
        "latency": {
            "cycles_per_pass": cfg.cycles_per_pass,
            "compute_cycles_per_token": "ceil(k / pass_width) * cycles_per_pass",
            "result_latency": result_latency(cfg),
            "result_latency_means": "cycles from a token's last compute cycle to its result "
                                    "beat when result is ready",
            "result_fifo_depth": RESULT_FIFO_DEPTH,
            "act_bits_per_cycle": cfg.act_bits_per_cycle,
            "activation_bits": ACT_BITS,
        },
    }


def packed_stream(cfg: HwConfig) -> dict:
    """The ``packed`` stream of the packed top (:class:`~flexcim.hw.packed.PackedFlexCiM`): its
    ports, ``word_bits`` (its width, :func:`~flexcim.spec.layouts.compact_bus_bits`),
    ``code_bits`` of each pattern (:func:`~flexcim.spec.layouts.compact_code_bits`) and
    ``command_lead`` (:func:`~flexcim.hw.packed.command_lead`, which refuses in one line a
    configuration the packed top cannot build)."""
    from flexcim.hw.packed import command_lead
    from flexcim.spec.layouts import compact_bus_bits, compact_code_bits

    lead = command_lead(cfg)  # first: it checks cfg
    return {
        "stream": "packed",
        "ports": {p: f"packed__{p}" for p in ("payload", "valid", "ready")},
        "word_bits": compact_bus_bits(cfg),
        "code_bits": {str(p): compact_code_bits(cfg, p) for p in cfg.patterns},
        "command_lead": lead,
    }


# --------------------------------------------------------------------------- constants
def _constants(cfg: HwConfig, info: dict,
               packed: dict | None = None) -> list[tuple[str, int, str]]:
    """``(NAME, value, comment)`` of every constant the header and the package carry; with
    ``packed`` (:func:`packed_stream`) those of the packed stream after the macro's."""
    consts = [(k.upper(), v, "") for k, v in info["limits"].items()]
    consts += [("CYCLES_PER_PASS", cfg.cycles_per_pass, "cycles of one pass (bit-serial)"),
               ("RESULT_LATENCY", info["latency"]["result_latency"],
                "cycles from a token's last compute cycle to its result beat"),
               ("RESULT_FIFO_DEPTH", info["latency"]["result_fifo_depth"], "")]
    for stream, s in info["streams"].items():
        consts.append((f"{stream}_WIDTH".upper(), s["width"], f"{stream} payload bits"))
        for f in s["fields"]:
            base = f"{stream}_{f['name']}".upper()
            consts += [(f"{base}_OFFSET", f["offset"], ""), (f"{base}_WIDTH", f["width"], ""),
                       (f"{base}_SIGNED", int(f["signed"]), "")]
            if "count" in f:
                consts += [(f"{base}_COUNT", f["count"], f["element"]),
                           (f"{base}_ELEMENT_WIDTH", f["element_width"], "")]
    for row in info["pattern_codes"]:
        p = f"PATTERN_{row['n']}_{row['m']}"
        consts += [(p, row["code"], f"pattern code of {row['pattern']}"),
                   (f"{p}_PASS_WIDTH", row["pass_width"], "input channels per pass"),
                   (f"{p}_MAX_K", row["max_k"], "longest k of one command")]
    consts.append(("PATTERN_COUNT", len(info["pattern_codes"]), ""))
    if packed is not None:
        consts += [("PACKED_WIDTH", packed["word_bits"],
                    "packed payload bits: one word, the unit the stream is cut into"),
                   ("PACKED_COMMAND_LEAD", packed["command_lead"],
                    "command registers before the macro: cycles the unpacker starts early")]
        for row in info["pattern_codes"]:
            consts.append((f"PATTERN_{row['n']}_{row['m']}_CODE_BITS",
                           packed["code_bits"][row["pattern"]],
                           "bits of one group code (N rows, one column) in the packed stream"))
    return consts


def _banner(name: str, version: str, comment: str) -> str:
    return (f"{comment} Generated by flexcim {version} (`flexcim verilog`) for module {name}: "
            f"do not edit.\n{comment} Field order is bit order: a payload's first field is in "
            f"its low bits; element 0 of an array is in the array's low bits.\n")


def c_header(cfg: HwConfig, name: str, version: str, counters: bool = False, *,
             packed: bool = False) -> str:
    """``<name>.h``: the interface constants as ``#define``, prefixed ``NAME_``; when the
    command payload fits 64 bits, ``NAME_CMD(pattern, k, tokens, load_weights)`` packs one.
    With ``packed`` (the packed top) also the packed stream's constants and
    ``NAME_PACKED_WORDS(n, code_bits, beats)``, the words of one command
    (:func:`~flexcim.spec.layouts.compact_words`)."""
    info = describe(cfg, counters)
    prefix = name.upper()
    guard = f"{prefix}_H"
    lines = ["/*", *(" *" + line[2:] for line in _banner(name, version, "//").splitlines()),
             " */", f"#ifndef {guard}", f"#define {guard}", "", "#include <stdint.h>", ""]
    for const, value, comment in _constants(cfg, info, packed_stream(cfg) if packed else None):
        tail = f"  /* {comment} */" if comment else ""
        lines.append(f"#define {prefix}_{const} {value}u{tail}")
    cmd = info["streams"]["cmd"]
    if cmd["width"] <= 64:
        names = [f["name"] for f in cmd["fields"]]
        lines += ["", f"/* {prefix}_CMD_FIELD(v, FIELD): v masked to the field, at its offset */",
                  f"#define {prefix}_CMD_FIELD(v, FIELD) \\",
                  f"  (((uint64_t)(v) & ((UINT64_C(1) << {prefix}_CMD_##FIELD##_WIDTH) - 1u)) \\",
                  f"   << {prefix}_CMD_##FIELD##_OFFSET)",
                  "/* One command beat; pattern is a PATTERN_n_m code"
                  + (" (unused: this macro is dense only)" if "pattern" not in names else "")
                  + " */",
                  f"#define {prefix}_CMD(pattern, k, tokens, load_weights) ("
                  + " | ".join(f"{prefix}_CMD_FIELD({n}, {n.upper()})" for n in names) + ")"]
    if packed:
        # rows * cols * 8 value bits and rows / n * cols codes, rows = beats * weight_port_rows
        lines += ["", f"/* {prefix}_PACKED_WORDS(n, code_bits, beats): packed words of one "
                  f"command of beats weight beats (whole passes) of an n:m pattern, code_bits "
                  f"its PATTERN_n_m_CODE_BITS; the last word zero-padded */",
                  f"#define {prefix}_PACKED_WORDS(n, code_bits, beats) \\",
                  f"  (((uint64_t)(beats) * {prefix}_WEIGHTS_VALUES_WIDTH \\",
                  f"    + (uint64_t)(beats) * {prefix}_WEIGHT_PORT_ROWS / (n) * {prefix}_COLS "
                  f"* (code_bits) \\",
                  f"    + {prefix}_PACKED_WIDTH - 1u) / {prefix}_PACKED_WIDTH)"]
    lines += ["", f"#endif /* {guard} */", ""]
    return "\n".join(lines)


def _sv_type(stream: str, fields: list[dict]) -> list[str]:
    """A packed struct of the payload, most significant field first as SystemVerilog packs."""
    lines = ["  typedef struct packed {"]
    for f in reversed(fields):
        sign = "signed" if f["signed"] else ""
        if "count" in f:
            dims = f"[{f['count'] - 1}:0][{f['element_width'] - 1}:0]"
            sign = ""  # a packed array of signed elements: sign them where they are used
        else:
            dims = f"[{f['width'] - 1}:0]" if f["width"] > 1 else ""
        lines.append("    " + " ".join(x for x in ("logic", sign, dims, f["name"]) if x) + ";")
    lines.append(f"  }} {stream}_t;")
    return lines


def sv_package(cfg: HwConfig, name: str, version: str, counters: bool = False, *,
               packed: bool = False) -> str:
    """``<name>_pkg.sv``: package ``<name>_pkg`` with the same constants as ``localparam``
    and one packed struct type per stream payload (``cmd_t``, ``weights_t``, ``act_t``,
    ``result_t``; element 0 of a packed array ``[n-1:0][w-1:0]`` is in its low bits); with
    ``packed`` (the packed top) also the packed stream's constants and ``packed_t``, one
    word."""
    info = describe(cfg, counters)
    section = packed_stream(cfg) if packed else None
    lines = [_banner(name, version, "//").rstrip("\n"), f"package {name}_pkg;", ""]
    for const, value, comment in _constants(cfg, info, section):
        if not 0 <= value < 2**32:
            raise FlexCimError(f"constant {const} = {value} does not fit the package's 32 bits")
        tail = f"  // {comment}" if comment else ""
        # bit [31:0], not int unsigned: the same 32-bit unsigned value, and Icarus 11 reads it
        lines.append(f"  localparam bit [31:0] {const} = 32'd{value};{tail}")
    for stream, s in info["streams"].items():
        lines += ["", *_sv_type(stream, s["fields"])]
    if section is not None:
        lines += ["", f"  typedef logic [{section['word_bits'] - 1}:0] packed_t;  "
                  f"// one word of the packed stream"]
    lines += ["", f"endpackage : {name}_pkg", ""]
    return "\n".join(lines)
