"""Payload layouts of the macro's four streams, and NumPy packers for testbenches and hosts.

The layouts are defined once here; :class:`~flexcim.hw.top.FlexCiM` uses them for its
``amaranth.lib.stream`` ports and sim/ (cocotb) and golden/host.py use the packers below, which
read their bit offsets from the same layouts, to push and pull whole beats as Python ints.

=========  =====================================================================================
stream     payload (field order = bit order, first field in the low bits)
=========  =====================================================================================
cmd        ``pattern`` (``pattern_bits``, absent when only 1:1 is supported), ``k``
           (``k_bits``), ``tokens`` (``token_bits``), ``load_weights`` (1)
weights    ``values``: ``W * cols`` x signed 8, ``indices``: ``W * cols`` x unsigned
           ``index_bits`` (absent when ``index_bits == 0``); ``W = weight_port_rows`` cell
           rows per beat, element ``j * cols + c`` is column ``c`` of the beat's row ``j``
act        ``in_lanes`` x signed 8, input channel ``b*in_lanes + i`` in lane ``i`` of beat ``b``
result     ``cols`` x signed ``acc_bits``, output channel ``c`` of the tile in element ``c``
=========  =====================================================================================

The activity counters of a macro generated with ``counters=True`` (:func:`counters_layout`) are
one read-only port, unpacked by :func:`unpack_counters`.

The *packed* weight stream (:func:`compact_beat_layout`, :func:`compact_words`,
:func:`pack_compact`) is the weight storage of an accelerator with compact indices: ``log2 M``
index bits per weight instead of ``index_bits``; :class:`~flexcim.hw.unpack.WeightUnpacker`
expands it into the macro's weight beats (docs/architecture.md, section 8).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import signed, unsigned
from amaranth.lib import data
from flexcim.spec.config import ACT_BITS, WEIGHT_BITS, HwConfig
from flexcim.spec.nm import NMPattern, NMTensor

from flexcim.errors import FlexCimError


def cmd_layout(cfg: HwConfig) -> data.StructLayout:
    """Command: run ``tokens`` tokens of a ``k``-channel reduction with pattern code ``pattern``.

    ``load_weights`` = 1 first consumes ``passes * rows_total`` weight beats; 0 reuses the
    weights of the previous command (same pattern and ``k``).
    """
    fields = {}
    if cfg.pattern_bits:
        fields["pattern"] = unsigned(cfg.pattern_bits)
    fields["k"] = unsigned(cfg.k_bits)
    fields["tokens"] = unsigned(cfg.token_bits)
    fields["load_weights"] = unsigned(1)
    return data.StructLayout(fields)


def word_layout(*, cols: int, index_bits: int) -> data.StructLayout:
    """One weight word of a cell row: a value and an in-group index per column."""
    fields = {"values": data.ArrayLayout(signed(WEIGHT_BITS), cols)}
    if index_bits:
        fields["indices"] = data.ArrayLayout(unsigned(index_bits), cols)
    return data.StructLayout(fields)


def weight_layout(cfg: HwConfig) -> data.StructLayout:
    """One beat of the weight stream: the words of ``weight_port_rows`` (``W``) consecutive
    cell rows.  ``W = 1``: the word of one cell row (:func:`word_layout`); otherwise the same
    two fields with ``W * cols`` elements, element ``j * cols + c`` being column ``c`` of the
    beat's row ``j`` (all values first, then all indices)."""
    rows = cfg.weight_port_rows
    return word_layout(cols=cfg.cols * rows, index_bits=cfg.index_bits)


def act_layout(cfg: HwConfig) -> data.ArrayLayout:
    """``in_lanes`` consecutive int8 activations of one token."""
    return data.ArrayLayout(signed(ACT_BITS), cfg.in_lanes)


def result_layout(cfg: HwConfig) -> data.ArrayLayout:
    """The ``cols`` accumulators of one token, two's complement ``acc_bits`` each."""
    return data.ArrayLayout(signed(cfg.acc_bits), cfg.cols)


COUNTER_BITS = 48
"""Width of every activity counter: a whole SmolLM2 layer on the default preset counts about
1e9 cell-cycles, past 32 bits; 48 bits last 2.8e14 cycles of the busiest counter."""

COUNTERS = {
    "weight_beats": "weight words written into cell rows (weight-stream handshakes)",
    "act_beats": "activation beats written into the buffer (activation-stream handshakes)",
    "compute_cycles": "cycles in which the cell array computed a bit-slice",
    "passes": "passes computed: buffer window reads of one pass width, one per token per pass",
    "mac_cycles": "cell-cycles with a non-zero weight and a non-zero selected activation slice "
                  "(the cells whose multiplier and adder-tree input operand isolation lets "
                  "switch)",
    "route_bits": "two-input stages on the selected paths of the distribution unit's driven "
                  "row lanes, summed over compute cycles (per slice bit)",
    "select_muxes": "cells' selection gates that can switch, summed over compute cycles (per "
                    "slice bit): the enabled lane's AND gate and the OR and chain gates it "
                    "reaches, 1 + log2 M per cell, 0 for 1:1 (the bypass)",
    "quiet_faults": "cell-cycles in which a selection stage that should be quiet (a lane gate "
                    "whose enable is off, a chain node above the tap, or a row lane past M) "
                    "carried a non-zero value: 0 in a correct macro",
}
"""The counters, in bit order (first in the low bits), with what each counts since reset."""


def counters_layout() -> data.StructLayout:
    """The activity counters (:data:`COUNTERS`), ``COUNTER_BITS`` each, wrapping."""
    return data.StructLayout({name: unsigned(COUNTER_BITS) for name in COUNTERS})


def unpack_counters(value: int) -> dict[str, int]:
    """The ``counters`` port's value to ``{name: count}``."""
    mask = (1 << COUNTER_BITS) - 1
    return {name: (int(value) >> field.offset) & mask for name, field in counters_layout()}


# --------------------------------------------------------------------------- NumPy packers
def _pack_lanes(lanes: np.ndarray, width: int) -> np.ndarray:
    """Pack ``[beats, n]`` integers (two's complement, ``width`` bits each) into ``beats`` ints.

    Lane ``i`` lands in bits ``i*width ..``.  Returns an object array of Python ints.
    """
    lanes = np.asarray(lanes)
    mask = (1 << width) - 1
    # Python ints: a 64-bit mask would overflow int64, and the beat is wider than any dtype.
    masked = lanes.astype(object) & mask
    out = np.zeros(lanes.shape[0], dtype=object)
    for i in range(lanes.shape[1]):
        out = out | (masked[:, i] << (i * width))
    return out


def _unpack_lanes(beats, n: int, width: int, signed_: bool) -> np.ndarray:
    """Inverse of :func:`_pack_lanes`: ``beats`` ints to ``[beats, n]`` int64."""
    beats = np.array([int(b) for b in beats], dtype=object)
    mask = (1 << width) - 1
    out = np.zeros((len(beats), n), dtype=np.int64)
    for i in range(n):
        lane = (beats >> (i * width)) & mask
        if signed_:
            lane = np.where(lane >= 1 << (width - 1), lane - (1 << width), lane)
        out[:, i] = lane.astype(np.int64)
    return out


def _offset(layout: data.StructLayout, name: str) -> int:
    return layout[name].offset


def pack_cmd(cfg: HwConfig, pattern, k: int, tokens: int, load_weights: bool) -> int:
    """One command beat; refuses (one line) what the macro cannot run, as the hardware would.

    Raises
    ------
    FlexCimError
        Unsupported pattern, ``k`` outside ``1..max_k_for(pattern)`` or ``tokens`` outside
        ``1..max_tokens`` (see :meth:`HwConfig.check_command`).
    """
    cfg.check_command(pattern, k, tokens)
    layout = cmd_layout(cfg)
    beat = int(k) << _offset(layout, "k")
    beat |= int(tokens) << _offset(layout, "tokens")
    beat |= int(bool(load_weights)) << _offset(layout, "load_weights")
    if cfg.pattern_bits:
        beat |= cfg.pattern_code(pattern) << _offset(layout, "pattern")
    return beat


def unpack_cmd(cfg: HwConfig, beat: int) -> dict:
    """Fields of a command beat as ints (``pattern`` is the code, 0 for a dense-only macro)."""
    layout = cmd_layout(cfg)
    fields = {}
    for name, field in layout:
        fields[name] = (int(beat) >> field.offset) & ((1 << field.width) - 1)
    fields.setdefault("pattern", 0)
    return fields


def weight_rows(cfg: HwConfig, tile: NMTensor) -> tuple[np.ndarray, np.ndarray]:
    """The cell-row words of a weight tile: ``values`` int8 and ``indices`` ``[rows, cols]``.

    ``tile`` holds at most ``cols`` output channels and a reduction that fits one command.  Row
    word ``q`` is compressed column ``q`` (all channels of the tile); words run to a whole
    number of passes (``passes * rows_total``), padded with zero values and index 0, and
    channels past the tile's ``C`` are zero too, so stale activations and unused columns
    contribute nothing.  Beat ``b`` of the weight stream carries row words ``b * W ..
    b * W + W - 1`` (``W = weight_port_rows``, :func:`pack_weights`).
    """
    if not isinstance(tile, NMTensor):
        raise FlexCimError(f"weight tile must be an NMTensor, not {type(tile).__name__}")
    c, k = tile.shape
    if c > cfg.cols:
        raise FlexCimError(f"weight tile has {c} output channels; the macro has cols={cfg.cols}")
    cfg.check_command(tile.pattern, k, 1)
    beats = cfg.passes(tile.pattern, k) * cfg.rows_total
    values = np.zeros((beats, cfg.cols), dtype=np.int8)
    indices = np.zeros((beats, cfg.cols), dtype=np.uint8)
    kept = tile.values.shape[1]
    values[:kept, :c] = tile.values.T
    indices[:kept, :c] = tile.indices.T
    return values, indices


def pack_weights(cfg: HwConfig, tile: NMTensor) -> list[int]:
    """Weight beats of one command with ``load_weights`` (see :func:`weight_rows`)."""
    values, indices = weight_rows(cfg, tile)
    layout = weight_layout(cfg)
    # W consecutive row words side by side: element j * cols + c of beat b is row b * W + j.
    width = cfg.cols * cfg.weight_port_rows
    values, indices = values.reshape(-1, width), indices.reshape(-1, width)
    beats = _pack_lanes(values, WEIGHT_BITS)
    if cfg.index_bits:
        beats = beats | (_pack_lanes(indices, cfg.index_bits) << _offset(layout, "indices"))
    elif np.any(indices):
        raise FlexCimError("a dense-only macro (index_bits=0) cannot hold non-zero indices")
    return [int(b) for b in beats]


def unpack_weights(cfg: HwConfig, beats) -> tuple[np.ndarray, np.ndarray]:
    """Weight beats to the row words they write: ``values`` int8 and ``indices`` uint8
    ``[beats * weight_port_rows, cols]``."""
    width = cfg.cols * cfg.weight_port_rows
    values = _unpack_lanes(beats, width, WEIGHT_BITS, True).astype(np.int8)
    if cfg.index_bits:
        shift = _offset(weight_layout(cfg), "indices")
        shifted = [int(b) >> shift for b in beats]
        indices = _unpack_lanes(shifted, width, cfg.index_bits, False).astype(np.uint8)
    else:
        indices = np.zeros_like(values, dtype=np.uint8)
    return values.reshape(-1, cfg.cols), indices.reshape(-1, cfg.cols)


# --------------------------------------------------------------------------- compact weights
# The packed weight stream of one command, as a weight buffer stores it and the unpacker
# (flexcim.hw.unpack.WeightUnpacker) expands it into the macro's weight beats: the beats in
# order, each as ``compact_beat_layout`` (its ``W * cols`` values, then their indices in exactly
# ``log2 M`` bits), concatenated LSB-first without gaps, cut into words of
# ``compact_bus_bits`` (the macro's own beat width, so the unpacker never needs more input
# bandwidth than the macro's port), the command's last word padded with zeros.
def compact_index_bits(cfg: HwConfig, pattern) -> int:
    """Index bits per weight in the packed stream of ``pattern``: ``log2 M`` (0 for 1:1), the
    bits the RTL reads; it forces those at and above ``log2 M`` (hw/top.py).  Raises a
    one-line FlexCimError for a pattern the macro does not support."""
    cfg.pattern_code(pattern)
    return (NMPattern.parse(pattern).m - 1).bit_length()


def compact_beat_layout(cfg: HwConfig, pattern) -> data.StructLayout:
    """One weight beat in the packed stream of ``pattern``: :func:`weight_layout`'s two fields
    with ``log2 M``-bit indices, i.e. the beat's ``W * cols`` values first (the same bits as in
    the macro's beat) and then its indices (none for 1:1)."""
    return word_layout(cols=cfg.cols * cfg.weight_port_rows,
                       index_bits=compact_index_bits(cfg, pattern))


def compact_bus_bits(cfg: HwConfig) -> int:
    """Width of one word of the packed stream: the macro's weight beat width
    (``weight_layout(cfg).size``), never narrower than a packed beat."""
    return weight_layout(cfg).size


def compact_max_beats(cfg: HwConfig) -> int:
    """The most weight beats one command loads: ``depth`` passes of ``beats_per_word``."""
    return cfg.depth * cfg.beats_per_word


def _check_beats(cfg: HwConfig, beats) -> int:
    if isinstance(beats, bool) or not isinstance(beats, (int, np.integer)) or not (
        1 <= beats <= compact_max_beats(cfg)
    ):
        raise FlexCimError(
            f"a command loads 1..{compact_max_beats(cfg)} weight beats (depth={cfg.depth} "
            f"passes of {cfg.beats_per_word}), not {beats!r}"
        )
    return int(beats)


def compact_words(cfg: HwConfig, pattern, beats: int) -> int:
    """Bus words of the packed stream of one command of ``beats`` weight beats:
    ``ceil(beats * compact_beat_layout.size / compact_bus_bits)``."""
    bits = _check_beats(cfg, beats) * compact_beat_layout(cfg, pattern).size
    return -(-bits // compact_bus_bits(cfg))


def compact_bits(cfg: HwConfig, pattern, beats: int) -> int:
    """Bits a weight buffer stores and sends for one command of ``beats`` weight beats with
    ``pattern``: :func:`compact_words` x :func:`compact_bus_bits`, the last word's padding
    included (``beats * W * cols * (8 + log2 M)`` rounded up to whole words)."""
    return compact_words(cfg, pattern, beats) * compact_bus_bits(cfg)


def compact_cmd_layout(cfg: HwConfig) -> data.StructLayout:
    """Command of the unpacker: the ``pattern`` code (as in :func:`cmd_layout`, absent when only
    1:1 is supported) and the number of weight ``beats`` to produce."""
    fields = {}
    if cfg.pattern_bits:
        fields["pattern"] = unsigned(cfg.pattern_bits)
    fields["beats"] = unsigned(compact_max_beats(cfg).bit_length())
    return data.StructLayout(fields)


def pack_compact_cmd(cfg: HwConfig, pattern, beats: int) -> int:
    """One unpacker command beat; refuses (one line) a pattern the macro lacks or a beat count
    outside ``1..compact_max_beats``."""
    layout = compact_cmd_layout(cfg)
    code = cfg.pattern_code(pattern)
    beat = _check_beats(cfg, beats) << _offset(layout, "beats")
    if cfg.pattern_bits:
        beat |= code << _offset(layout, "pattern")
    return beat


def pack_compact(cfg: HwConfig, pattern, beats) -> list[int]:
    """The packed stream (bus words, Python ints) of one command's weight beats ``beats``
    (:func:`pack_weights`' ints).  Refuses, in one line, a beat whose index has a bit at or
    above ``log2 M`` set: the packed format cannot carry it (the macro would ignore it)."""
    beats = [int(b) for b in beats]
    lg = compact_index_bits(cfg, pattern)
    n = cfg.cols * cfg.weight_port_rows
    _check_beats(cfg, len(beats))
    full, packed = weight_layout(cfg), compact_beat_layout(cfg, pattern)
    chunks = [b & ((1 << n * WEIGHT_BITS) - 1) for b in beats]  # the values: same bits
    if cfg.index_bits:
        shift = _offset(full, "indices")
        indices = _unpack_lanes([b >> shift for b in beats], n, cfg.index_bits, False)
        if np.any(indices >> lg):
            b, e = np.argwhere(indices >> lg)[0]
            raise FlexCimError(
                f"weight beat {b} holds index {indices[b, e]} in element {e}, not below "
                f"M={NMPattern.parse(pattern).m}: the packed stream has {lg} index bits"
            )
        if lg:
            shift = _offset(packed, "indices")
            lanes = _pack_lanes(indices, lg)
            chunks = [v | (int(i) << shift) for v, i in zip(chunks, lanes, strict=True)]
    words, acc, held = [], 0, 0
    width, bus = packed.size, compact_bus_bits(cfg)
    for chunk in chunks:
        acc |= chunk << held
        held += width
        while held >= bus:
            words.append(acc & ((1 << bus) - 1))
            acc >>= bus
            held -= bus
    if held:
        words.append(acc)  # the zero padding of the last word
    return words


def unpack_compact(cfg: HwConfig, pattern, words, beats: int) -> list[int]:
    """Inverse of :func:`pack_compact`: the ``beats`` weight beats (:func:`pack_weights`' ints,
    indices zero-extended to ``index_bits``) that ``words`` carry.  The padding of the last word
    is ignored, as by the RTL."""
    words = [int(w) for w in words]
    expected = compact_words(cfg, pattern, beats)
    if len(words) != expected:
        raise FlexCimError(
            f"{beats} weight beats with pattern {NMPattern.parse(pattern)} take {expected} "
            f"packed words, not {len(words)}"
        )
    lg = compact_index_bits(cfg, pattern)
    n = cfg.cols * cfg.weight_port_rows
    packed, bus = compact_beat_layout(cfg, pattern), compact_bus_bits(cfg)
    stream = 0
    for i, w in enumerate(words):
        stream |= w << (i * bus)
    width = packed.size
    chunks = [(stream >> (b * width)) & ((1 << width) - 1) for b in range(beats)]
    out = [c & ((1 << n * WEIGHT_BITS) - 1) for c in chunks]
    if lg:
        indices = _unpack_lanes([c >> _offset(packed, "indices") for c in chunks], n, lg, False)
        lanes = _pack_lanes(indices, cfg.index_bits)
        shift = _offset(weight_layout(cfg), "indices")
        out = [v | (int(i) << shift) for v, i in zip(out, lanes, strict=True)]
    return out


def pack_act(cfg: HwConfig, x: np.ndarray) -> list[int]:
    """Activation beats of tokens ``x`` int8 ``[T, k]``: ``ceil(k/in_lanes)`` beats per token,
    the last one of each token padded with zeros."""
    if not isinstance(x, np.ndarray) or x.dtype != np.int8 or x.ndim != 2:
        raise FlexCimError(f"activations must be an int8 [tokens, k] array, not {x!r:.60}")
    t, k = x.shape
    per_token = -(-k // cfg.in_lanes)
    padded = np.zeros((t, per_token * cfg.in_lanes), dtype=np.int8)
    padded[:, :k] = x
    return [int(b) for b in _pack_lanes(padded.reshape(-1, cfg.in_lanes), ACT_BITS)]


def unpack_act(cfg: HwConfig, beats) -> np.ndarray:
    """Activation beats to int8 ``[beats, in_lanes]``."""
    return _unpack_lanes(beats, cfg.in_lanes, ACT_BITS, True).astype(np.int8)


def pack_result(cfg: HwConfig, y: np.ndarray) -> list[int]:
    """Result beats of ``y`` ``[tokens, cols]`` (what the macro would emit; for models/tests)."""
    return [int(b) for b in _pack_lanes(np.asarray(y), cfg.acc_bits)]


def unpack_result(cfg: HwConfig, beats) -> np.ndarray:
    """Result beats to ``[tokens, cols]`` signed values (int32 if ``acc_bits <= 32``, else
    int64)."""
    y = _unpack_lanes(beats, cfg.cols, cfg.acc_bits, True)
    return y.astype(np.int32 if cfg.acc_bits <= 32 else np.int64)
