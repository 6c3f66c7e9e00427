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
:func:`pack_compact`) is the weight storage of an accelerator with compact indices: per group of
N cell rows and column one code of ``ceil(log2 C(M, N))`` bits (the rank of the group's kept
positions) instead of an ``index_bits`` index per weight;
:class:`~flexcim.hw.unpack.WeightUnpacker` expands it into the macro's weight beats
(docs/architecture.md, section 8).
"""

from __future__ import annotations

import math

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
    "passes": "passes computed, one per token per pass (one weight word and one pass window "
              "each)",
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
    "buffer_read_bits": "bits read from the activation buffer's memories: the enabled read "
                        "ports' word width (granule x slice bits), summed over cycles",
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
# (flexcim.hw.unpack.WeightUnpacker) expands it into the macro's weight beats.  Instead of an
# index per kept weight it carries, per group of N cell rows and column, the *rank* of the set of
# the group's kept positions: ceil(log2 C(M, N)) bits (docs/architecture.md, section 8).
#
# * Row q of a command (beat q // W, slot q % W) belongs to group q // N; groups never straddle a
#   pass (N divides rows_total), and a command loads whole passes, hence whole groups.
# * A group's rows are in *canonical order*: their indices strictly descending, each non-zero
#   weight with its own index, the zero-valued slots given the smallest indices no non-zero
#   weight of the group uses.  The macro sums a group's rows (a wrapped sum), so the order and
#   the indices of zero weights do not change any result.
# * Code of a group (one per column) = sum_s C(c_s, N - s) over its canonical indices c_0 > c_1
#   > ... (the combinatorial number system; 0 bits for 1:1).  Greedy unranking (largest c with
#   C(c, k) <= R, R -= C(c, k), k = N .. 1) gives c_0, c_1, ... back: one row per step, so the
#   decoder emits the rows in the order they are stored.
# * Packed beat b = its W * cols values (the bits of the macro beat's ``values`` field, rows in
#   canonical order) then the codes of the groups whose first row is in the beat, group by
#   group, cols codes each (column c of the i-th such group at bits (i * cols + c) * code bits).
# * The packed beats are concatenated LSB-first without gaps and cut into bus words of
#   ``compact_bus_bits`` (the macro's beat width), the command's last word padded with zeros.
def compact_code_bits(cfg: HwConfig, pattern) -> int:
    """Bits of one group's code in the packed stream of ``pattern`` (N:M): ``ceil(log2 C(M,
    N))``, 0 for 1:1 (at most ``N * log2 M``: 14 instead of 32 for 8:16, 3 instead of 4 for
    2:4).  Raises a one-line FlexCimError for a pattern the macro does not support."""
    cfg.pattern_code(pattern)
    p = NMPattern.parse(pattern)
    return (math.comb(p.m, p.n) - 1).bit_length()


def compact_starts(cfg: HwConfig, pattern, beat: int) -> int:
    """Groups of ``pattern`` whose first row is in weight beat ``beat`` of a command (rows
    ``beat * W .. beat * W + W - 1``): the number of codes that travel with that beat."""
    n, w = NMPattern.parse(pattern).n, cfg.weight_port_rows
    return (beat * w + w - 1) // n - (beat * w - 1) // n  # multiples of N in the beat's rows


def compact_beat_layout(cfg: HwConfig, pattern, starts: int) -> data.StructLayout:
    """One packed weight beat of ``pattern`` that carries the codes of ``starts`` groups
    (:func:`compact_starts`): ``values``, the beat's ``W * cols`` values (the bits of the
    macro beat's ``values`` field), then ``codes``, ``starts * cols`` codes of
    :func:`compact_code_bits` (absent when there are none)."""
    fields = {"values": data.ArrayLayout(signed(WEIGHT_BITS), cfg.cols * cfg.weight_port_rows)}
    bits = compact_code_bits(cfg, pattern)
    if bits and starts:
        fields["codes"] = data.ArrayLayout(unsigned(bits), starts * cfg.cols)
    return data.StructLayout(fields)


def compact_bus_bits(cfg: HwConfig) -> int:
    """Width of one word of the packed stream: the macro's weight beat width
    (``weight_layout(cfg).size``).  A packed beat can be wider (a group's codes travel with its
    first row), but a command's packed stream never takes more words than it has beats
    (``ceil(log2 C(M, N)) <= N * log2 M``)."""
    return weight_layout(cfg).size


def compact_first_words(cfg: HwConfig, pattern) -> int:
    """Bus words that the first packed beat of a command of ``pattern`` spans: its values and
    the codes of the groups that start in it (:func:`compact_beat_layout`), in words of
    :func:`compact_bus_bits`; 2 when the codes are wider than the beat's index field."""
    first = compact_beat_layout(cfg, pattern, compact_starts(cfg, pattern, 0)).size
    return -(-first // compact_bus_bits(cfg))


def compact_max_beats(cfg: HwConfig) -> int:
    """The most weight beats one command loads: ``depth`` passes of ``beats_per_word``."""
    return cfg.depth * cfg.beats_per_word


def _check_beats(cfg: HwConfig, beats) -> int:
    """``beats`` as an int: a whole number of passes, 1 .. ``depth`` (what a command loads)."""
    per = cfg.beats_per_word
    if isinstance(beats, bool) or not isinstance(beats, (int, np.integer)) or not (
        1 <= beats <= compact_max_beats(cfg) and beats % per == 0
    ):
        raise FlexCimError(
            f"a command loads whole passes of weight beats: a multiple of {per} from {per} to "
            f"{compact_max_beats(cfg)} (depth={cfg.depth}), not {beats!r}"
        )
    return int(beats)


def compact_words(cfg: HwConfig, pattern, beats: int) -> int:
    """Bus words of the packed stream of one command of ``beats`` weight beats (whole
    passes): ``ceil((rows * cols * 8 + rows / N * cols * code bits) / compact_bus_bits)``
    with ``rows = beats * W``."""
    rows = _check_beats(cfg, beats) * cfg.weight_port_rows
    n = NMPattern.parse(pattern).n
    bits = rows * cfg.cols * WEIGHT_BITS + rows // n * cfg.cols * compact_code_bits(cfg, pattern)
    return -(-bits // compact_bus_bits(cfg))


def compact_bits(cfg: HwConfig, pattern, beats: int) -> int:
    """Bits a weight buffer stores and sends for one command of ``beats`` weight beats with
    ``pattern``: :func:`compact_words` x :func:`compact_bus_bits`, the last word's padding
    included."""
    return compact_words(cfg, pattern, beats) * compact_bus_bits(cfg)


def compact_cmd_layout(cfg: HwConfig) -> data.StructLayout:
    """Command of the unpacker: the ``pattern`` code (as in :func:`cmd_layout`, absent when only
    1:1 is supported) and the number of ``passes`` (of ``beats_per_word`` weight beats) to
    produce."""
    fields = {}
    if cfg.pattern_bits:
        fields["pattern"] = unsigned(cfg.pattern_bits)
    fields["passes"] = unsigned(cfg.depth.bit_length())
    return data.StructLayout(fields)


def pack_compact_cmd(cfg: HwConfig, pattern, beats: int) -> int:
    """One unpacker command beat for ``beats`` weight beats; refuses (one line) a pattern the
    macro lacks or a beat count that is not 1 .. ``depth`` whole passes."""
    layout = compact_cmd_layout(cfg)
    code = cfg.pattern_code(pattern)
    beat = _check_beats(cfg, beats) // cfg.beats_per_word << _offset(layout, "passes")
    if cfg.pattern_bits:
        beat |= code << _offset(layout, "pattern")
    return beat


def compact_rank_cap(cfg: HwConfig) -> int:
    """``S``, the largest ``C(M, N)`` of the configured patterns: every valid code and every
    rank left during its unranking is below it, so the decoder's binomial table saturates at
    ``S`` (a larger entry compares the same) and stays ``S.bit_length()`` bits wide."""
    return max(math.comb(p.m, p.n) for p in cfg.patterns)


def compact_binomial(cfg: HwConfig, c: int, k: int) -> int:
    """Entry ``(c, k)`` of the decoder's table: ``min(C(c, k), S)`` (:func:`compact_rank_cap`)."""
    return min(math.comb(c, k), compact_rank_cap(cfg))


def _binomials(m: int, n: int) -> np.ndarray:
    """``C(c, k)`` for ``c`` in ``0 .. m`` and ``k`` in ``0 .. n``, int64."""
    return np.array([[math.comb(c, k) for k in range(n + 1)] for c in range(m + 1)],
                    dtype=np.int64)


def _groups(cfg: HwConfig, pattern, beats: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``beats`` as ``[groups, N, cols]`` values and indices; refuses an index at
    or above M."""
    p = NMPattern.parse(pattern)
    values, indices = unpack_weights(cfg, beats)
    if np.any(indices >= p.m):
        row, c = np.argwhere(indices >= p.m)[0]
        w = cfg.weight_port_rows
        raise FlexCimError(
            f"weight beat {row // w} holds index {indices[row, c]} in element "
            f"{row % w * cfg.cols + c}, not below M={p.m}: the packed stream cannot carry it"
        )
    return (values.reshape(-1, p.n, cfg.cols).astype(np.int64),
            indices.reshape(-1, p.n, cfg.cols).astype(np.int64))


def compact_canonical(cfg: HwConfig, pattern, beats) -> tuple[np.ndarray, np.ndarray]:
    """The canonical order of the rows of ``beats`` (one command's weight beats): per group
    and column the kept indices descending, zero weights on the smallest unused indices.
    Returns ``(values, indices)`` ``[groups, N, cols]`` int64.  Refuses (one line) an index at
    or above M and a group whose non-zero weights share an index."""
    cfg.pattern_code(pattern)
    p = NMPattern.parse(pattern)
    beats = [int(b) for b in beats]
    _check_beats(cfg, len(beats))
    vals, idx = _groups(cfg, pattern, beats)
    nonzero = vals != 0
    lanes = np.arange(p.m)
    hits = nonzero[..., None] & (idx[..., None] == lanes)       # [G, N, cols, M]
    used = hits.sum(axis=1)                                      # [G, cols, M]
    if np.any(used > 1):
        g, c, i = np.argwhere(used > 1)[0]
        raise FlexCimError(
            f"group {g} (rows {g * p.n}..{g * p.n + p.n - 1}) of column {c} keeps two non-zero "
            f"weights at index {i}: the packed stream keeps one weight per index"
        )
    free = np.cumsum(used == 0, axis=-1)                         # unused lanes up to here
    spare = p.n - nonzero.sum(axis=1)                            # [G, cols] zero slots
    keep = (used > 0) | ((used == 0) & (free <= spare[..., None]))
    order = np.sort(np.where(keep, lanes, -1), axis=-1)[..., ::-1][..., :p.n]  # [G, cols, N]
    by_lane = (hits * vals[..., None]).sum(axis=1)               # [G, cols, M]
    canon_vals = np.take_along_axis(by_lane, order, axis=-1)
    return canon_vals.transpose(0, 2, 1), order.transpose(0, 2, 1)


def pack_compact(cfg: HwConfig, pattern, beats) -> list[int]:
    """The packed stream (bus words, Python ints) of one command's weight beats ``beats``
    (:func:`pack_weights`' ints, whole passes): rows in canonical order
    (:func:`compact_canonical`, whose refusals apply) and one code per group and column."""
    p = NMPattern.parse(pattern)
    vals, order = compact_canonical(cfg, pattern, beats)
    binom = _binomials(p.m, p.n)
    steps = p.n - np.arange(p.n)                                 # k = N .. 1
    codes = binom[order, steps[None, :, None]].sum(axis=1)       # [G, cols]
    bits = compact_code_bits(cfg, pattern)
    w, cols = cfg.weight_port_rows, cfg.cols
    beat_values = _pack_lanes(vals.reshape(-1, w * cols), WEIGHT_BITS)
    code_words = _pack_lanes(codes, bits) if bits else np.zeros(len(codes), dtype=object)
    stream, at, group = 0, 0, 0
    for b, value_bits in enumerate(beat_values):
        stream |= int(value_bits) << at
        at += w * cols * WEIGHT_BITS
        for _ in range(compact_starts(cfg, p, b)):
            stream |= int(code_words[group]) << at
            at += cols * bits
            group += 1
    bus = compact_bus_bits(cfg)
    count = compact_words(cfg, pattern, len(beats))
    return [(stream >> (i * bus)) & ((1 << bus) - 1) for i in range(count)]


def unpack_compact(cfg: HwConfig, pattern, words, beats: int) -> list[int]:
    """Inverse of :func:`pack_compact`: the ``beats`` weight beats (:func:`pack_weights`' ints,
    indices zero-extended to ``index_bits``) that ``words`` carry, in canonical order, decoded
    by greedy unranking as the RTL does.  The padding of the last word is ignored, as by the
    RTL; a code past ``C(M, N) - 1`` decodes to whatever the greedy steps give, as in the RTL."""
    words = [int(w) for w in words]
    expected = compact_words(cfg, pattern, beats)
    if len(words) != expected:
        raise FlexCimError(
            f"{beats} weight beats with pattern {NMPattern.parse(pattern)} take {expected} "
            f"packed words, not {len(words)}"
        )
    p = NMPattern.parse(pattern)
    bits = compact_code_bits(cfg, pattern)
    w, cols, bus = cfg.weight_port_rows, cfg.cols, compact_bus_bits(cfg)
    stream = 0
    for i, word in enumerate(words):
        stream |= word << (i * bus)
    values, codes, at = [], [], 0
    for b in range(beats):
        values.append((stream >> at) & ((1 << w * cols * WEIGHT_BITS) - 1))
        at += w * cols * WEIGHT_BITS
        for _ in range(compact_starts(cfg, p, b)):
            codes.append([(stream >> (at + c * bits)) & ((1 << bits) - 1) for c in range(cols)])
            at += cols * bits
    # The RTL's decoder: the greedy step over all m_max lanes with the saturated table.
    table = {k: [compact_binomial(cfg, x, k) for x in range(cfg.m_max)]
             for k in range(1, p.n + 1)}
    indices = np.zeros((beats * w // p.n, p.n, cols), dtype=np.int64)
    for g, group in enumerate(codes):
        for c, rank in enumerate(group):
            for s, k in enumerate(range(p.n, 0, -1)):
                lane = max(x for x in range(cfg.m_max) if table[k][x] <= rank)
                rank -= table[k][lane]
                indices[g, s, c] = lane
    out = np.array(values, dtype=object)
    if cfg.index_bits:
        lanes = _pack_lanes(indices.reshape(beats, w * cols), cfg.index_bits)
        out = out | (lanes << _offset(weight_layout(cfg), "indices"))
    return [int(b) for b in out]


def command_runs(cfg: HwConfig, fields: dict) -> bool:
    """Whether the macro runs a command of these :func:`unpack_cmd` ``fields``: a configured
    pattern code, ``k`` in ``1 .. max_k_for`` and ``tokens >= 1``.  The controller drops any
    other command without consuming data and sets ``error`` (hw/controller.py)."""
    code = fields["pattern"]
    return code < len(cfg.patterns) and fields["tokens"] >= 1 and (
        1 <= fields["k"] <= cfg.max_k_for(cfg.patterns[code]))


def compact_loads(cfg: HwConfig, cmd_beats) -> list[tuple[NMPattern, int]]:
    """``(pattern, weight beats)`` of every command of ``cmd_beats`` that loads weights and
    that the macro runs (a command it drops, :func:`command_runs`, loads nothing), in order:
    the commands the packed top (hw/packed.py) forks to its unpacker."""
    loads = []
    for beat in cmd_beats:
        f = unpack_cmd(cfg, beat)
        if f["load_weights"] and command_runs(cfg, f):
            pattern = cfg.patterns[f["pattern"]]
            loads.append((pattern, cfg.weight_beats(pattern, f["k"])))
    return loads


def pack_compact_stream(cfg: HwConfig, cmd_beats, weight_beats) -> list[int]:
    """The ``packed`` stream of the packed top for a command stream and its weight beats (as
    the macro would take them): :func:`pack_compact` of each loading command's beats
    (:func:`compact_loads`), concatenated.  Refuses (one line) weight beats the commands do
    not account for exactly."""
    weight_beats = [int(b) for b in weight_beats]
    loads = compact_loads(cfg, cmd_beats)
    need = sum(n for _, n in loads)
    if need != len(weight_beats):
        raise FlexCimError(
            f"the commands load {need} weight beats, not the {len(weight_beats)} given")
    words, at = [], 0
    for pattern, n in loads:
        words += pack_compact(cfg, pattern, weight_beats[at:at + n])
        at += n
    return words


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
