"""Energy model of the FlexCiM macro, and whole-model prefill latency/energy for a FLOW plan.

Energy = sum over actions of (activity count x energy per action).  Activity counts come from
the same command schedule as the cycle model (:func:`flexcim.golden.perf.schedule`); the
per-action energies are in :data:`ENERGY_45NM`, each with its source.

Sources and scaling assumptions (all 45 nm, 0.9 V, from M. Horowitz, "Computing's energy
problem (and what we can do about it)", ISSCC 2014, Fig. 1.1.9):

* 8-bit integer multiply 0.2 pJ.  A bit-serial DCiM cell multiplies its int8 weight by a
  ``b``-bit activation slice per cycle: an 8 x ``b`` array multiplier is ``b/8`` of the 8 x 8 one,
  so the cell costs ``0.2 / 8 = 0.025 pJ`` per activation bit (assumption: multiplier energy
  proportional to its partial-product bits).
* 8-bit add 0.03 pJ, 32-bit add 0.1 pJ: a ripple adder's energy is proportional to its width;
  we use ``0.1 / 32 = 0.003125 pJ`` per bit (the 32-bit figure, 4 % above the 8-bit one).
* 8 KB SRAM, 64-bit read, 10 pJ: ``10 / 64 = 0.156 pJ`` per bit read from the activation buffer
  (its 2 x ``max_k`` bytes are 3 KB in the default preset: an upper bound).  Writes are taken
  equal to reads (assumption), for the buffer and for the cells' weight words.  The bits read
  are what the buffer's read ports read (hw/buffer.py): each compute cycle's slice of the
  pass's lanes, read in the cycle before and held through stalls, only from the memories
  holding them, so a pass reads ``pass_width x 8`` bits, fewer where it runs past the bank's
  ``max_k`` lanes (:func:`read_lanes`); the RTL counts them (``buffer_read_bits``).
* Multiplexers have no entry in Horowitz's table.  A 2:1 mux bit is charged one adder bit,
  0.003125 pJ (assumption: an upper bound, a full adder has more switching nodes than a mux).
  What switches is what the RTL lets switch (hw/distribution.py, hw/array.py), with the
  pattern code and the stored indices static during a pass, so a multiplexer switches when
  its *selected* input toggles (an unselected input's toggle costs only its input
  capacitance, not modelled):

  - distribution unit: every row lane is a one-hot AND-OR multiplexer over the distinct
    values the patterns route to it; the ``M`` lanes of the command's pattern switch
    ``ceil(log2(alternatives))`` two-input stages each (``HwConfig.route_alternatives``), the
    lanes past ``M`` are tied to 0 and do not switch;
  - cell selection (issue 14): a one-hot AND-OR network per cell (hw/array.py, CellRow).
    The cell's index, masked to the bits below the tap of the command's M, is decoded to a
    one-hot enable; one AND gate per lane passes only the enabled lane; the gated lanes meet
    in a chain of OR trees whose link at level ``L`` is cut by index bit ``L - 1`` (set on
    write above ``log2 M``), and the tap takes the chain at level ``ceil(log2 M)``.  With
    every lane toggling each cycle (bit-serial slices), what switches per cell and cycle is
    the enabled AND and one OR or chain gate per level on its path: ``1 + ceil(log2 M)``
    gates per slice bit (``select_muxes``; a multiplexer tree switched all ``M - 1`` of its
    multiplexers), none in 1:1 (lane 0 bypasses the network, the decoder is disabled).  An
    AND or OR gate is charged as one 2:1 multiplexer bit (an upper bound again).
  - the cell's decoder: its inputs are the stored index bits, read from the cell's word, so
    they can change only when the word read changes, once per pass (``passes`` events; the
    address is held within a pass).  It is a tree of AND stages from the most significant bit
    down; the bits the tap masks are 0, so their stages are static, and each of the
    ``ceil(log2 M)`` live bits switches at most its masking AND and two lines of its stage
    (one rises, one falls): ``decode_bits = passes x cells x 3 ceil(log2 M)`` single-bit
    gates, an upper bound (0 when consecutive words hold the same indices), charged one
    multiplexer bit each and not multiplied by the slice width (the enables are one bit).
    The change of tap between commands is not counted (at most once per command).

  The one-hot tap and the operand isolation are one AND-OR gate at the multiplier's input,
  counted with the cell's multiplication.
  A dense-only macro has none of them.  The RTL counts ``route_bits`` and ``select_muxes``
  (activity counters; ``select_muxes`` runs every cell's network on its enables, so a second
  enabled lane or an uncut chain link changes the count) and checks that the stages charged
  nothing are quiet (``quiet_faults``: a lane gate whose enable is off, a chain node above the
  tap, a row lane past M carrying a non-zero value).  ``decode_bits`` is ``passes`` (counted)
  times a per-pass constant of the structure; the RTL has no counter of the decoder's actual
  toggles.

The weight unpacker (hw/unpack.py), which only an accelerator with packed weight storage has
(:mod:`flexcim.golden.system`, ``compact_indices``), is priced the same way: its structure's
bit operations (:func:`unpack_bits`: gearbox shifters and buffer register, the decoder's binomial
table, comparators, one-hot multiplexers and subtractors, every flip-flop), a multiplexer or
flip-flop bit 0.003125 pJ and a comparator or subtractor bit one adder bit, all switching once
(the decoder's only in commands whose pattern has codes, not 1:1) in every cycle in which the
unpacker emits a beat or takes a word (:func:`unpack_pj`: ``weight beats + packed words``, both
counted by the RTL's counters).  That is an upper bound of its glitch-free switching, not an
estimate (the count is 1.1-1.5x the gates and flip-flops Yosys maps it to, and most cycles that
take a word also emit a beat).

Zero operands: a cell whose weight or selected activation slice is zero is **gated** (operand
isolation in hw/array.py: its multiplier's activation input and its adder-tree input stay 0),
the cycle count does not change (no zero *skipping*: the bit-serial schedule is fixed).  So the
gated fraction ``act_density`` scales the cell-MAC and adder-tree energies, and nothing else:
buffers, distribution and weights move the same data.  Leakage and clock-tree energy are not
modelled here (:mod:`flexcim.golden.system` adds leakage, DRAM and buffer traffic for a whole
accelerator).

How well the global ``act_density`` estimates the gated cells is measured against the RTL: a
macro generated with ``FlexCiM(cfg, counters=True)`` counts the cell-cycles whose weight and
selected activation *slice* are both non-zero, and :func:`mac_cycles` computes exactly that
count from the operands (the cocotb testbench asserts they are equal).  A bit-serial cell sees
slices, not whole activations, and a zero weight (pruning padding, unused columns) needs no
multiplication either, so the global estimate is systematically high; :func:`gated_density`
is the exact fraction, and ``layer_cost(..., operands=(x, w))`` uses it
(docs/architecture.md, section 7, has the measured table).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping

import numpy as np
from flexcim.golden import perf
from flexcim.spec.config import ACT_BITS, WEIGHT_BITS, HwConfig
from flexcim.spec.nm import NMPattern

from flexcim.errors import FlexCimError

HOROWITZ_2014 = "Horowitz, ISSCC 2014, 45 nm"


@dataclasses.dataclass(frozen=True)
class ActionEnergies:
    """Energy per action in picojoules; see the module docstring for each figure's source.

    Parameters
    ----------
    cell_mac_per_bit : float
        One cell multiplying its int8 weight by one activation bit.
    add_per_bit : float
        One bit of a ripple adder (adder trees, merging, accumulators).
    buffer_per_bit : float
        One bit read from or written to the activation buffer (SRAM).
    weight_write_per_bit : float
        One bit of a weight word (value or index) written into a cell.
    mux_per_bit : float
        One bit through a 2:1 multiplexer (distribution unit, cell lane selection).
    """

    cell_mac_per_bit: float = 0.2 / 8
    add_per_bit: float = 0.1 / 32
    buffer_per_bit: float = 10.0 / 64
    weight_write_per_bit: float = 10.0 / 64
    mux_per_bit: float = 0.1 / 32
    source: str = HOROWITZ_2014


ENERGY_45NM = ActionEnergies()
"""The default energies (45 nm, Horowitz ISSCC 2014, with the scalings stated above)."""

ACTIONS = ("cell_mac", "adder_tree", "merge_accumulate", "buffer_write", "buffer_read",
           "distribution", "weight_write")


def _log2_ceil(n: int) -> int:
    return max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Activity:
    """Counts of each action for a layer (bits or bit-operations, see :func:`activity`)."""

    counts: dict[str, float]

    def energy_pj(self, e: ActionEnergies = ENERGY_45NM) -> dict[str, float]:
        per = {
            "cell_mac": e.cell_mac_per_bit,
            "adder_tree": e.add_per_bit,
            "merge_accumulate": e.add_per_bit,
            "buffer_write": e.buffer_per_bit,
            "buffer_read": e.buffer_per_bit,
            "distribution": e.mux_per_bit,
            "weight_write": e.weight_write_per_bit,
        }
        return {name: self.counts[name] * per[name] for name in ACTIONS}


EVENTS = ("compute_cycles", "passes", "act_beats", "weight_beats", "route_bits", "select_muxes",
          "quiet_faults", "buffer_read_bits")
"""The events the model multiplies by per-event bits; the RTL counters count the same ones
(:data:`flexcim.spec.layouts.COUNTERS`)."""


@functools.lru_cache(maxsize=64)
def route_stages(cfg: HwConfig, pattern: NMPattern) -> int:
    """Two-input stages that switch per compute cycle and slice bit in the distribution unit
    for ``pattern``: over the ``M`` driven lanes of every row, ``ceil(log2(alternatives))``."""
    return sum(_log2_ceil(cfg.route_alternatives(r, i))
               for r in range(cfg.rows_total) for i in range(pattern.m))


def select_gates(cfg: HwConfig, pattern: NMPattern) -> int:
    """Selection gates that switch per cell, compute cycle and slice bit for ``pattern``: the
    enabled lane's AND and one OR or chain gate per level up to the tap, ``1 +
    ceil(log2 M)``; 0 for 1:1 (the bypass) and on a dense-only macro."""
    level = _log2_ceil(pattern.m)
    return 1 + level if level and cfg.index_bits else 0


def decode_gates(cfg: HwConfig, pattern: NMPattern) -> int:
    """Decoder gates of one cell that can switch when a new word is read, for ``pattern``:
    the masking AND and two one-hot lines per live index bit, ``3 ceil(log2 M)`` (0 for 1:1)."""
    return 3 * _log2_ceil(pattern.m) if cfg.index_bits else 0


def read_lanes(cfg: HwConfig, pattern, k: int) -> int:
    """Activation lanes the buffer reads for one token of a ``k``-channel reduction: every
    pass's ``pass_width`` lanes that lie in the bank, ``min(passes x pass_width, max_k)``.

    Each lane is read once per bit-slice, ``8`` bits in all.  The buffer's memory words hold
    ``G`` lanes, ``G`` dividing every pass width and ``in_lanes`` (hence ``max_k``), so a pass
    (at a multiple of its width) reads whole words, and only the last pass can run past the
    bank (``k <= max_k``): its lanes past ``max_k`` are in no memory and are not read.  Lanes
    past ``k`` inside the pass are read (multiplied by padding weights)."""
    return min(cfg.passes(pattern, k) * cfg.pass_width(pattern), cfg.max_k)


def command_events(cfg: HwConfig, cmd: perf.Command) -> dict[str, int]:
    """Event counts of one command: compute cycles, passes (one weight word and one pass
    window each), activation beats (buffer writes), weight beats (cell-row word writes), the
    switching distribution stages (``route_bits``) and cell selection gates
    (``select_muxes``, :func:`select_gates`) over its compute cycles, ``quiet_faults``
    (always 0) and the bits read from the activation buffer (``buffer_read_bits``,
    :func:`read_lanes` x 8 per token)."""
    passes = cfg.passes(cmd.pattern, cmd.k)
    cycles = cmd.tokens * passes * cfg.cycles_per_pass
    return {
        "compute_cycles": cycles,
        "passes": cmd.tokens * passes,
        "act_beats": cmd.tokens * perf.act_beats(cfg, cmd.k),
        "weight_beats": cfg.weight_beats(cmd.pattern, cmd.k) if cmd.load_weights else 0,
        "route_bits": cycles * route_stages(cfg, cmd.pattern),
        "select_muxes": cycles * cfg.cells * select_gates(cfg, cmd.pattern),
        "quiet_faults": 0,
        "buffer_read_bits": cmd.tokens * read_lanes(cfg, cmd.pattern, cmd.k) * ACT_BITS,
    }


@functools.lru_cache(maxsize=64)
def unpack_bits(cfg: HwConfig) -> dict[str, int]:
    """Bit operations of the weight unpacker (hw/unpack.py) that can switch in a cycle in which
    it moves a beat out or a word in, counted from its structure: ``{"gearbox": ...,
    "decoder": ..., "compare": ..., "ff": ...}``, the first two and the last charged one 2:1
    multiplexer bit each, ``compare`` one adder bit each (:func:`unpack_event_pj`).

    * gearbox: the buffer register (``B`` bits: the widest packed beat plus a word less a
      granule ``g``), shifted down by a beat (one ``B``-bit multiplexer stage per bit of the
      beat's width in granules) and a word shifted up to the fill level (one stage per bit of
      the fill level, at most ``B`` bits each) and ORed in: ``B x (stages + 1)`` mux bits;
    * ``decoder`` and ``compare`` (none without indices): per row slot of the beat a table of
      ``m_max - 1`` binomials of ``width = S.bit_length()`` bits selected by the step ``k``
      (``ceil(log2 (n_max + 1))`` mux levels per bit); per slot and column the code taken
      from the buffer (one rank-wide multiplexer per further pattern and group it can come
      from), the rank in (``r`` bits: the code or the carried rank), ``m_max - 1``
      comparators of ``width`` bits (``compare``), the ``m_max`` one-hot gates, the OR
      multiplexers of the index and of the chosen entry (``(m_max - 1) x (index_bits +
      width)``) and the ``r``-bit subtractor (``compare``);
    * registers: every flip-flop (buffer, fill and need counters, the latched pattern, the
      group's row counter and the per-column ranks when a group can span two beats), charged
      one multiplexer bit each (its data toggle and hold mux; clock power is not modelled, as
      everywhere in this module).

    tests/golden/test_energy.py checks the registers against
    ``WeightUnpacker.register_bits()`` and the sum against the gates and flip-flops that
    ``make synth`` maps the RTL to (``docs/area.json``, every preset: the count is 1.1-1.5x
    the netlist's cells, so it bounds them from above).
    """
    from flexcim.spec import layouts

    bus, w, cols = layouts.compact_bus_bits(cfg), cfg.weight_port_rows, cfg.cols
    value_bits = w * cols * WEIGHT_BITS
    codes = {p: layouts.compact_code_bits(cfg, p) for p in cfg.patterns}
    g = math.gcd(bus, value_bits, *(cols * c for c in codes.values()))
    starts = {p: [layouts.compact_starts(cfg, p, b) for b in range(cfg.beats_per_word)]
              for p in cfg.patterns}
    steps = {p: [layouts.compact_beat_layout(cfg, p, s).size // g for s in starts[p]]
             for p in cfg.patterns}
    max_step, bus_g = max(max(v) for v in steps.values()), bus // g
    buffer = (max_step + bus_g - 1) * g
    fill_bits = (max_step + bus_g - 1).bit_length()
    ff = (buffer + fill_bits + (cfg.depth * max(sum(v) for v in steps.values())).bit_length()
          + cfg.pattern_bits)
    gearbox = buffer * (max_step.bit_length() + fill_bits + 1)
    mux = add = 0
    if cfg.index_bits:
        lanes, n_max = cfg.m_max, max(p.n for p in cfg.patterns)
        cap = layouts.compact_rank_cap(cfg)
        width, rank = cap.bit_length(), (cap - 1).bit_length()
        sources = sum(max(starts[p]) for p in cfg.patterns if codes[p])
        mux = w * (lanes - 1) * width * n_max.bit_length()
        mux += w * cols * ((sources - 1) * rank + rank + lanes
                           + (lanes - 1) * (cfg.index_bits + width))
        add = w * cols * ((lanes - 1) * width + rank)
        if any(w % p.n for p in cfg.patterns):  # a group can span two beats
            ff += (n_max - 1).bit_length() + cols * rank
    return {"gearbox": gearbox, "decoder": mux, "compare": add, "ff": ff}


def unpack_event_pj(cfg: HwConfig, pattern, energies: ActionEnergies = ENERGY_45NM) -> float:
    """Energy of the weight unpacker per beat it emits or word it takes in a command of
    ``pattern`` (pJ): every bit operation of :func:`unpack_bits` switching once, an upper
    bound of its glitch-free switching (see :func:`unpack_pj`).  A pattern without codes (1:1)
    leaves the decoder out: no code bits are read, every row starts a group of one, so the
    rank in is 0, the step ``k`` is 1 and every comparator, multiplexer and subtractor holds
    (it can switch once when the command starts, not counted, like the cells' tap)."""
    from flexcim.spec.layouts import compact_code_bits

    bits = unpack_bits(cfg)
    decoding = compact_code_bits(cfg, pattern) > 0
    return ((bits["gearbox"] + bits["ff"] + decoding * bits["decoder"]) * energies.mux_per_bit
            + decoding * bits["compare"] * energies.add_per_bit)


def unpack_pj(cfg: HwConfig, pattern, weight_beats: int, packed_words: int,
              energies: ActionEnergies = ENERGY_45NM) -> float:
    """Energy of the weight unpacker that emits ``weight_beats`` beats of ``pattern`` from
    ``packed_words`` bus words: :func:`unpack_event_pj` x ``(weight_beats + packed_words)``.

    Activity: the unpacker's registers change only in a cycle in which a beat leaves or a word
    is taken, and its other inputs (the word offered, the pattern) are held otherwise (a
    stream's payload does not change while it waits; assumed: the weight buffer's output is
    registered, so it holds its last word while it offers none), so no gate switches in the
    other cycles, and at most ``weight_beats + packed_words`` cycles are active.  Both are counted
    in the RTL: the macro's ``weight_beats`` counter (the unpacker's output beats in the packed
    top) and the packed top's ``packed_words``, which ``flexcim.sim.packed_tb`` checks against
    :func:`flexcim.spec.layouts.compact_words` on every run.  Charging every bit operation
    once per such cycle is an **upper bound** of the glitch-free switching: most words are
    taken in a cycle in which a beat leaves (at full rate the active cycles are the beats plus
    the first word or two of each command), so the count is up to about twice the active
    cycles, and a gate rarely toggles in every cycle.  Glitches in the decoder's chain of
    comparators, multiplexers and subtractor are not bounded by it."""
    return unpack_event_pj(cfg, pattern, energies) * (weight_beats + packed_words)


def layer_events(cfg: HwConfig, cmds: list[perf.Command]) -> dict[str, int]:
    """:func:`command_events` summed over a schedule."""
    totals = dict.fromkeys(EVENTS, 0)
    for cmd in cmds:
        for name, count in command_events(cfg, cmd).items():
            totals[name] += count
    return totals


def nonzero_slices(x: np.ndarray, slice_bits: int) -> np.ndarray:
    """How many of each int8 activation's ``8 / slice_bits`` bit-slices are non-zero (int64,
    the shape of ``x``).  The top slice is signed in the cell, but it is zero exactly when its
    bits are, so the two's-complement bits decide."""
    if slice_bits not in (1, 2, 4, 8):
        raise FlexCimError(f"slice_bits must be 1, 2, 4 or 8, not {slice_bits!r}")
    u = np.asarray(x, dtype=np.int8).view(np.uint8).astype(np.int64)
    mask = (1 << slice_bits) - 1
    return sum(((u >> s) & mask) != 0 for s in range(0, ACT_BITS, slice_bits)).astype(np.int64)


def slice_density(x: np.ndarray, slice_bits: int) -> float:
    """Fraction of the ``b``-bit slices of ``x`` that are non-zero: an estimate of the gated
    cell activity from the activations alone, for whole-model figures without the weights
    (pass it as ``act_density``).  On three real SmolLM2 layers with 8:16 activations it is
    0.26 against an exact :func:`gated_density` of 0.24-0.31 (within 16 %), where the global
    non-zero fraction, 0.50, is 1.6-2.1x too high (docs/architecture.md, section 7)."""
    return float(nonzero_slices(x, slice_bits).mean()) / (ACT_BITS // slice_bits)


def mac_cycles(cfg: HwConfig, x: np.ndarray, w) -> int:
    """Exact count of cell-cycles with a non-zero weight and a non-zero selected activation
    slice when ``y = x @ W.T`` runs on ``cfg`` (what the RTL's ``mac_cycles`` counter counts).

    Each stored weight ``W[c, k]`` sits in one cell for every token of its tile (tiling never
    duplicates a weight), and that cell sees activation ``x[t, k]`` slice by slice; padding,
    unused columns and lanes past a group's M carry zero weights.  So the count is
    ``sum over W[c,k] != 0 of sum_t nonzero_slices(x[t, k])``, independent of the schedule.
    """
    from flexcim.golden.matmul import check_activations
    from flexcim.spec.nm import NMTensor

    dense = w.decompress() if isinstance(w, NMTensor) else np.asarray(w)
    x = check_activations(x, dense.shape[1])
    per_channel = nonzero_slices(x, cfg.act_bits_per_cycle).sum(axis=0)  # [K]
    return int(np.count_nonzero(dense, axis=0).astype(np.int64) @ per_channel)


def gated_density(cfg: HwConfig, x: np.ndarray, w) -> float:
    """:func:`mac_cycles` over all cell-cycles of the layer: the exact fraction of the
    ``cell_mac`` and ``adder_tree`` activity a zero-gated macro performs (the ``act_density``
    that makes :func:`layer_cost` exact for these operands)."""
    from flexcim.spec.nm import NMTensor

    if not isinstance(w, NMTensor):
        raise FlexCimError(f"weight must be an NMTensor, not {type(w).__name__}")
    cmds = perf.schedule(cfg, w.pattern, x.shape[0], w.in_features, w.out_features)
    return mac_cycles(cfg, x, w) / (perf.ideal_cycles(cfg, cmds) * cfg.cells)


def command_activity(cfg: HwConfig, cmd: perf.Command, act_density: float = 1.0) -> Activity:
    """Action counts of one command.

    Counted per compute cycle (``tokens * passes * cycles_per_pass`` of them); the cells and
    their adder-tree inputs are charged for the gated fraction ``act_density`` of the cell-cycles
    (operand isolation: a zero weight or selected slice holds them).  Without operands the
    caller's estimate counts every zero weight (padding rows, unused columns) as active: an
    upper bound; :func:`layer_cost` with operands uses the exact :func:`gated_density`.

    ==================  ==============================================================  =======
    action              count                                                           unit
    ==================  ==============================================================  =======
    cell_mac            cycles x rows_total x cols x b x act_density                    bit-op
    adder_tree          cycles x P x cols x (R-1) x (8 + b + log2 R) x act_density      adder bit
    merge_accumulate    cycles x cols x ((P-1) x (w_tree + log2 P) + acc_bits)          adder bit
    buffer_write        tokens x ceil(k/in_lanes) x in_lanes x 8                        bit
    buffer_read         tokens x min(passes x pass_width, max_k) x 8                    bit
    distribution        (route_bits + select_muxes) x b + passes x cells x decode       mux bit
    weight_write        weight beats x weight_port_rows x cols x (8 + index_bits)       bit
    ==================  ==============================================================  =======

    ``decode`` is :func:`decode_gates`, the cell's decoder gates that can switch per word read.
    ``buffer_read`` is the ``buffer_read_bits`` event (:func:`read_lanes`), which the RTL
    counts from its read-port enables.
    """
    if not 0 <= act_density <= 1:
        raise FlexCimError(f"act_density must be from 0 to 1, not {act_density!r}")
    b = cfg.act_bits_per_cycle
    events = command_events(cfg, cmd)
    cycles = events["compute_cycles"]
    tree_width = WEIGHT_BITS + b + _log2_ceil(cfg.rows)
    merge = (cfg.sub_macros - 1) * (tree_width + _log2_ceil(cfg.sub_macros)) + cfg.acc_bits
    counts = {
        "cell_mac": cycles * cfg.cells * b * act_density,
        "adder_tree": cycles * cfg.sub_macros * cfg.cols * (cfg.rows - 1) * tree_width
        * act_density,
        "merge_accumulate": cycles * cfg.cols * merge,
        "buffer_write": events["act_beats"] * cfg.in_lanes * ACT_BITS,
        "buffer_read": events["buffer_read_bits"],
        "distribution": (events["route_bits"] + events["select_muxes"]) * b
        + events["passes"] * cfg.cells * decode_gates(cfg, cmd.pattern),
        "weight_write": events["weight_beats"] * cfg.weight_port_rows * cfg.cols
        * (WEIGHT_BITS + cfg.index_bits),
    }
    return Activity({k: float(v) for k, v in counts.items()})


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Cycles and energy of one layer on one macro.

    Members
    -------
    cycles : int
        :func:`flexcim.golden.perf.layer_cycles` of the layer's schedule.
    energy_pj : dict of str to float
        Energy per action (keys :data:`ACTIONS`).
    pattern : NMPattern
        The pattern the layer ran with on this macro.
    """

    cycles: int
    energy_pj: dict[str, float]
    pattern: NMPattern

    @property
    def total_pj(self) -> float:
        return sum(self.energy_pj.values())


def layer_cost(cfg: HwConfig, pattern, tokens: int, k: int, c: int, *, act_density: float = 1.0,
               energies: ActionEnergies = ENERGY_45NM, operands=None) -> LayerCost:
    """Cycles and energy of ``y = x @ W.T`` (``x`` ``[tokens, k]``, ``W`` ``[c, k]``).

    ``act_density`` is the estimate of the gated fraction without operands; given the
    operands ``(x, w)`` (``w`` an NMTensor of this shape and pattern) the exact
    :func:`gated_density` replaces it.
    """
    pattern = NMPattern.parse(pattern)
    if operands is not None:
        x, w = operands
        if (tuple(np.shape(x)), tuple(w.shape), w.pattern) != ((tokens, k), (c, k), pattern):
            raise FlexCimError(f"operands {np.shape(x)} x {w.shape} ({w.pattern}) do not match "
                               f"the layer [{tokens}, {k}] x [{c}, {k}] ({pattern})")
        act_density = gated_density(cfg, x, w)
    cmds = perf.schedule(cfg, pattern, tokens, k, c)
    totals = dict.fromkeys(ACTIONS, 0.0)
    for cmd in cmds:
        for name, pj in command_activity(cfg, cmd, act_density).energy_pj(energies).items():
            totals[name] += pj
    return LayerCost(cycles=perf.layer_cycles(cfg, cmds), energy_pj=totals, pattern=pattern)


# ----------------------------------------------------------------------------- FLOW plans


@dataclasses.dataclass(frozen=True)
class PlanLayer:
    """One entry of a plan: a pattern shared by the linears of a decoder block.

    Parameters
    ----------
    name : str
    pattern : NMPattern
    linears : tuple of (str, int, int)
        ``(name, out_features, in_features)`` of every projection that runs with ``pattern``.
    mask_24 : bool or None
        Whether the pruned masks also satisfy 2:4 (decides the ``fixed24`` baseline);
        ``None`` = not recorded, decided from the pattern (see :func:`runs_as_24`).
    """

    name: str
    pattern: NMPattern
    linears: tuple[tuple[str, int, int], ...]
    mask_24: bool | None = None


def runs_as_24(layer: PlanLayer) -> bool:
    """Whether a fixed-2:4 macro may run ``layer`` sparse: its masks satisfy 2:4.

    Recorded (``mask_24``) when the plan says; otherwise only when the pattern guarantees it:
    ``N <= 2`` and ``4 | M`` (at most two non-zeros in a group of M leave at most two in any
    aligned quarter-group of 4).  4:8 or 8:16 masks *may* satisfy 2:4 but nothing guarantees it,
    so an unrecorded one runs dense (conservative).
    """
    if layer.mask_24 is not None:
        return layer.mask_24
    p = layer.pattern
    return p.n <= 2 and p.m % 4 == 0


def _shape(value, where: str) -> tuple[int, int]:
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise FlexCimError(f"{where}: a linear shape must be [out_features, in_features], "
                           f"not {value!r}")
    return int(value[0]), int(value[1])


def parse_plan(plan: Mapping) -> tuple[PlanLayer, ...]:
    """Read a plan: ``{"layers": [{"name", "pattern", "linears", "mask_24"?}, ...]}``.

    ``linears`` maps projection names to ``[out_features, in_features]`` (a list of shapes is
    accepted too).  Every problem raises one FlexCimError line naming the entry.
    """
    if not isinstance(plan, Mapping) or not isinstance(plan.get("layers"), list):
        raise FlexCimError("a plan must be a JSON object with a list 'layers'")
    layers = []
    for i, entry in enumerate(plan["layers"]):
        where = f"plan layer {i}"
        if not isinstance(entry, Mapping):
            raise FlexCimError(f"{where} must be an object, not {entry!r:.40}")
        name = str(entry.get("name", i))
        where = f"plan layer {i} ({name})"
        if "pattern" not in entry:
            raise FlexCimError(f"{where} has no 'pattern'")
        pattern = NMPattern.parse(entry["pattern"])
        raw = entry.get("linears")
        if isinstance(raw, Mapping):
            items = [(str(k), v) for k, v in raw.items()]
        elif isinstance(raw, list):
            items = [(str(j), v) for j, v in enumerate(raw)]
        else:
            raise FlexCimError(f"{where}: 'linears' must map names to [out, in] shapes")
        if not items:
            raise FlexCimError(f"{where} has no linears")
        linears = tuple((n, *_shape(v, f"{where} linear {n}")) for n, v in items)
        for n, _, k in linears:
            if k % pattern.m:
                raise FlexCimError(f"{where} linear {n}: in_features={k} is not a multiple "
                                   f"of M={pattern.m}")
        mask_24 = entry.get("mask_24")
        if mask_24 is not None and not isinstance(mask_24, bool):
            raise FlexCimError(f"{where}: 'mask_24' must be true or false, not {mask_24!r}")
        layers.append(PlanLayer(name, pattern, linears, mask_24))
    if not layers:
        raise FlexCimError("the plan has no layers")
    return tuple(layers)


def load_plan(path: str | os.PathLike) -> tuple[PlanLayer, ...]:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise FlexCimError(f"cannot read plan {os.fspath(path)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise FlexCimError(f"plan {os.fspath(path)!r} is not valid JSON: {exc}") from None
    return parse_plan(data)


def pattern_on(cfg: HwConfig, layer: PlanLayer) -> NMPattern:
    """The pattern ``layer`` runs with on ``cfg``: its own if supported; on a macro whose only
    sparse pattern is 2:4, 2:4 when :func:`runs_as_24`; dense otherwise."""
    if cfg.supports(layer.pattern):
        return layer.pattern
    if cfg.supports(NMPattern(2, 4)) and runs_as_24(layer):
        return NMPattern(2, 4)
    return NMPattern(1, 1)


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Prefill of a whole plan on one macro."""

    cycles: int
    energy_pj: dict[str, float]
    layers: tuple[tuple[str, str, int, float], ...]  # (name, pattern run, cycles, pJ)

    @property
    def total_pj(self) -> float:
        return sum(self.energy_pj.values())

    def seconds(self, clock_hz: float) -> float:
        return self.cycles / clock_hz


def prefill_cost(cfg: HwConfig, plan, tokens: int, *,
                 act_density: float | Mapping[str, float] = 1.0,
                 energies: ActionEnergies = ENERGY_45NM) -> ModelCost:
    """Cycles and energy of prefilling ``tokens`` tokens through every linear of ``plan``.

    Linears run one after another on one macro (no overlap between layers).  ``act_density``
    is one fraction for every linear, or a mapping from linear names to their fractions
    (absent names: 1.0), e.g. 0.5 for only the projections whose activations are pruned 8:16.
    """
    layers = parse_plan(plan) if isinstance(plan, Mapping) else tuple(plan)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise FlexCimError(f"tokens must be a positive integer, not {tokens!r}")
    totals = dict.fromkeys(ACTIONS, 0.0)
    cycles, rows = 0, []
    memo = {}  # a model repeats a few shapes in every block: cost each once
    for layer in layers:
        pattern = pattern_on(cfg, layer)
        layer_cycles, layer_pj = 0, 0.0
        for linear, c, k in layer.linears:
            density = (act_density.get(linear, 1.0) if isinstance(act_density, Mapping)
                       else act_density)
            key = (pattern, k, c, density)
            if key not in memo:
                memo[key] = layer_cost(cfg, pattern, tokens, k, c, act_density=density,
                                       energies=energies)
            cost = memo[key]
            layer_cycles += cost.cycles
            layer_pj += cost.total_pj
            for name, pj in cost.energy_pj.items():
                totals[name] += pj
        cycles += layer_cycles
        rows.append((layer.name, str(pattern), layer_cycles, layer_pj))
    return ModelCost(cycles=cycles, energy_pj=totals, layers=tuple(rows))


def compare(plan, tokens: int, configs: Mapping[str, HwConfig], *,
            act_density: float | Mapping[str, float] = 1.0, reference: str = "fixed24") -> dict:
    """Prefill cycles/energy of ``plan`` on every config, with ratios to ``reference``
    (``act_density`` as in :func:`prefill_cost`).

    Returns a JSON-ready dict ``{name: {"cycles", "energy_pj", "latency_vs_ref",
    "energy_vs_ref"}}``; ratios are reference / this (> 1 means this macro is better).
    """
    costs = {name: prefill_cost(cfg, plan, tokens, act_density=act_density)
             for name, cfg in configs.items()}
    if reference not in costs:
        raise FlexCimError(f"reference {reference!r} is not one of {', '.join(costs)}")
    ref = costs[reference]
    return {
        name: {
            "cycles": cost.cycles,
            "energy_pj": cost.total_pj,
            "energy_by_action_pj": cost.energy_pj,
            "latency_vs_ref": ref.cycles / cost.cycles,
            "energy_vs_ref": ref.total_pj / cost.total_pj if cost.total_pj else math.inf,
            "layers": [list(row) for row in cost.layers],
        }
        for name, cost in costs.items()
    }


# ----------------------------------------------------------------------------- pattern table


def pattern_energies(configs: Mapping[str, HwConfig], tokens: int = 128, k: int = 576,
                     c: int = 576) -> list[dict]:
    """Cycles and energy of one ``[tokens, k] x [c, k]`` layer for every pattern of every
    macro in ``configs`` (dense activations), to price a pattern set: a richer set costs every
    pattern more (wider lane selection, more mux levels, more index bits per weight).

    Returns JSON-ready rows ``{"preset", "pattern", "sparsity", "cycles", "energy_pj",
    "energy_by_action_pj"}``, in the order of ``configs`` and of each macro's patterns.
    """
    rows = []
    for name, cfg in configs.items():
        for pattern in cfg.patterns:
            if k % pattern.m:
                continue
            cost = layer_cost(cfg, pattern, tokens, k, c)
            rows.append({"preset": name, "pattern": str(pattern), "sparsity": pattern.sparsity,
                         "cycles": cost.cycles, "energy_pj": cost.total_pj,
                         "energy_by_action_pj": cost.energy_pj})
    return rows


def format_pattern_energies(rows: list[dict], reference: str | None = None) -> str:
    """A Markdown table of :func:`pattern_energies`: one line per pattern (by sparsity), the
    layer's cycles and its energy in nJ on every preset (``-``: not supported), and, with
    ``reference`` (another preset), the last preset's energy over the reference's for the same
    pattern."""
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    by = {(r["preset"], r["pattern"]): r for r in rows}
    patterns = sorted({NMPattern.parse(r["pattern"]) for r in rows},
                      key=lambda p: (p.sparsity, p.m))
    if reference == presets[-1]:
        reference = None
    head = ["pattern", "sparsity", "cycles", *(f"{p} nJ" for p in presets)]
    if reference:
        head.append(f"{presets[-1]} / {reference}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in patterns:
        cells = [by.get((name, str(p))) for name in presets]
        cycles = sorted({r["cycles"] for r in cells if r})
        line = [str(p), f"{100 * p.sparsity:.1f} %", "/".join(str(v) for v in cycles)]
        line += [f"{r['energy_pj'] / 1e3:.1f}" if r else "-" for r in cells]
        if reference:
            ref, last = by.get((reference, str(p))), cells[-1]
            line.append(f"{last['energy_pj'] / ref['energy_pj']:.3f}" if ref and last else "-")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _energy_cmd(args) -> int:
    from flexcim.spec.config import preset

    from flexcim.fileio import atomic_write, check_output

    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    if args.reference and args.reference not in names:
        raise FlexCimError(f"--reference {args.reference!r} is not one of --presets {names}")
    if args.json:
        check_output(args.json, "--json")
    rows = pattern_energies({n: preset(n) for n in names}, args.tokens, args.k, args.c)
    print(f"[{args.tokens} x {args.k}] x [{args.c} x {args.k}] layer, dense activations "
          f"({ENERGY_45NM.source})\n")
    print(format_pattern_energies(rows, args.reference or None))
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "energy",
        help="energy model: cycles and energy of one layer for every pattern of some presets",
        description="Cycles (golden.perf) and energy (golden.energy, 45 nm) of one "
        "[tokens x k] x [c x k] layer with dense activations, for every pattern of every "
        "preset: what a richer pattern set costs each pattern.",
    )
    p.add_argument("--presets", default="dense,fixed24,flex8,default",
                   help="comma-separated presets (default: %(default)s)")
    p.add_argument("--reference", default="flex8",
                   help="preset the last one is compared with per pattern ('' for none)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=576, help="in_features")
    p.add_argument("--c", type=int, default=576, help="out_features")
    p.add_argument("--json", metavar="FILE", help="also write the rows there")
    p.set_defaults(func=_energy_cmd)
