"""The weight unpacker: compact weight storage expanded into the macro's weight beats (issue 17).

A weight buffer that stores, per kept weight, its 8 value bits and per group of N cell rows and
column one code of ``ceil(log2 C(M, N))`` bits (the packed stream of
:func:`flexcim.spec.layouts.pack_compact`; ``golden.system.Accelerator(compact_indices=True)``
charges exactly its words) feeds the macro through this loader: it takes bus words of the
macro's own beat width and emits :func:`~flexcim.spec.layouts.weight_layout` beats, each row's
index decoded from its group's code and zero-extended to ``index_bits``.  docs/architecture.md,
section 8.

Structure.  *Gearbox*: a buffer register holding ``fill`` granules of ``g`` bits (``g`` = the
gcd of the bus width, the beat's value bits and every pattern's ``cols`` codes) from bit 0 up,
bits above ``fill`` zero.  A beat's packed bits (its values, then the codes of the groups that
start in it, so a beat can be wider than a word) leave from the low bits; the buffer shifts down
by their width and an accepted word is ORed in at the fill level left after that shift (two
logarithmic shifters in granules).  The buffer holds the widest packed beat and a word less a
granule; a word is taken only when it lands below the widest beat, so a refused word always
leaves a whole beat behind.
*Decoder*: a shared down-counter ``left`` (rows of the current group still to come) gives every
row slot of the beat its step ``k`` (N at a group's first row, then N - 1, ... 1) and whether a
group starts there; a shared table of binomials ``min(C(x, k), S)`` selected by ``k``; per
column and row slot ``m_max - 1`` comparators of the rank against the table (a thermometer: the
greedy step's index is its length), a multiplexer of the chosen entry and a subtractor; per
column a rank register carries a group's remaining rank into the next beat.
"""

from __future__ import annotations

import math

from amaranth.hdl import Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import validating
from flexcim.hw.controller import cases, lookup
from flexcim.spec.config import WEIGHT_BITS, HwConfig
from flexcim.spec.layouts import (
    compact_beat_layout,
    compact_binomial,
    compact_bus_bits,
    compact_cmd_layout,
    compact_code_bits,
    compact_first_words,
    compact_rank_cap,
    compact_starts,
    weight_layout,
)


class WeightUnpacker(wiring.Component):
    """Expand the packed weight stream of each command into the macro's weight beats.

    Takes the whole :class:`~flexcim.spec.config.HwConfig`, like the macro it feeds: it sits
    beside the macro's ``weights`` port and shares its pattern codes and beat layout.

    Parameters
    ----------
    cfg : HwConfig

    Members
    -------
    cmd : In(stream), :func:`~flexcim.spec.layouts.compact_cmd_layout`
        Pattern code and pass count of the next command (``beats_per_word`` beats a pass).
        Taken when the unpacker is idle or in the cycle its current command's last beat leaves.
        A pass count of 0 is taken and does nothing; a pattern code past the configured ones
        runs as the last pattern (the host never sends either:
        :func:`~flexcim.spec.layouts.pack_compact_cmd` refuses them).
    packed : In(stream), :func:`~flexcim.spec.layouts.compact_bus_bits` wide
        The command's :func:`~flexcim.spec.layouts.compact_words` bus words; exactly those
        are taken, and the padding of the last one is dropped after the last beat.
    weights : Out(stream), :func:`~flexcim.spec.layouts.weight_layout`
        The command's beats in the packed stream's canonical row order, indices decoded and
        zero-extended; drives the macro's ``weights`` port.

    ``weights.valid`` is a function of registers only; ``packed.ready`` and ``cmd.ready``
    depend combinationally on ``weights.ready`` (a word is taken in the cycle a beat leaves
    when the two fit together), as ``amaranth.lib.stream`` allows.  Latency: a word taken in
    cycle ``t`` can complete a beat in cycle ``t + 1``; the first word of a command is taken
    the cycle after its ``cmd``, so its first beat is valid 2 cycles after the ``cmd`` when
    it fits one word, 3 when it needs two (its group codes are wider than the beat's index
    field: 2:8, 4:8 and every M = 16 pattern on ``default``; :attr:`first_words`).
    Throughput: one beat per cycle inside a command while a word is offered every cycle (a
    command's packed beats average no more than a word, and the buffer holds the widest beat
    while it waits for room; tests/hw/test_unpack.py steps the rules for every preset and
    weight port width), with one idle output cycle between commands, two before a first beat
    that needs two words.  Driving a macro, it adds no cycle when its first command leads the
    macro's by :attr:`first_words` cycles and ``first_words <= 2`` (every preset; M = 32
    patterns can need 3): the macro asks for a command's first beat the cycle after taking
    the command, and takes the next command only after computing the previous one's tokens,
    at least 3 cycles after the last beat (tests/hw/test_unpack.py checks the cycles against
    ``golden.perf``).  Weight port
    configurations (``weight_port_rows`` > 1) are handled: groups may start at any row slot of
    a beat and continue into the next one, and a column's W decode steps chain in one cycle
    (231 gate levels with 9 rows on ``default``, docs/architecture.md section 8).

    Registers: :meth:`register_bits` (779 flip-flops on ``default``: buffer 528, rank 224,
    need 13, fill 6, pattern 4, left 4; 209 on ``tiny``).
    """

    def __init__(self, cfg: HwConfig):
        with validating(self):
            if not isinstance(cfg, HwConfig):
                raise TypeError(f"cfg must be a HwConfig, not {type(cfg).__name__}")
        self._cfg = cfg
        super().__init__({
            "cmd": In(stream.Signature(compact_cmd_layout(cfg))),
            "packed": In(stream.Signature(compact_bus_bits(cfg))),
            "weights": Out(stream.Signature(weight_layout(cfg))),
        })

    @property
    def cfg(self) -> HwConfig:
        return self._cfg

    # ------------------------------------------------------------------ geometry
    @property
    def value_bits(self) -> int:
        """Value bits of a beat, ``W * cols * 8``."""
        cfg = self._cfg
        return cfg.weight_port_rows * cfg.cols * WEIGHT_BITS

    @property
    def granule(self) -> int:
        """``g``: the gcd of the bus width, the beat's value bits and every pattern's ``cols``
        codes, in bits: every packed beat, word and fill level is a multiple of it."""
        cfg = self._cfg
        return math.gcd(compact_bus_bits(cfg), self.value_bits,
                        *(cfg.cols * compact_code_bits(cfg, p) for p in cfg.patterns))

    def _steps(self, pattern) -> list[int]:
        """Packed bits of each beat of a pass of ``pattern`` (the phases repeat every pass)."""
        cfg = self._cfg
        return [compact_beat_layout(cfg, pattern, compact_starts(cfg, pattern, b)).size
                for b in range(cfg.beats_per_word)]

    @property
    def max_step(self) -> int:
        """The widest packed beat, in granules."""
        return max(max(self._steps(p)) for p in self._cfg.patterns) // self.granule

    @property
    def first_words(self) -> int:
        """Bus words the widest first beat of a command needs: 1, or 2 when a beat that
        starts groups is wider than a word (its beat then leaves a cycle later)."""
        return max(compact_first_words(self._cfg, p) for p in self._cfg.patterns)

    @property
    def buffer_bits(self) -> int:
        """Bits of the buffer register: ``(max_step + bus / g - 1) * g``.  A word is taken only
        when it lands below ``max_step`` granules, so a refused word always leaves a whole beat
        behind, and the widest beat fits."""
        return (self.max_step + compact_bus_bits(self._cfg) // self.granule - 1) * self.granule

    @property
    def rank_bits(self) -> int:
        """Bits of a rank: ``ceil(log2 S)`` with ``S`` the largest ``C(M, N)``
        (:func:`~flexcim.spec.layouts.compact_rank_cap`), the widest code."""
        return (compact_rank_cap(self._cfg) - 1).bit_length()

    @property
    def _straddle(self) -> bool:
        """Some group spans two beats (N does not divide W): ``left`` and ``rank`` registers."""
        cfg = self._cfg
        return any(cfg.weight_port_rows % p.n for p in cfg.patterns)

    def register_bits(self) -> dict[str, int]:
        """Flip-flops by register: ``buffer``, ``fill`` and ``need`` (granules held and still
        to come for the command's remaining beats), the latched pattern code ``pattern`` (absent
        with one pattern), ``left`` (rows of the current group still to come) and ``rank`` (per
        column, the rank left for them), the last two only when a group can span two beats."""
        cfg, g = self._cfg, self.granule
        bus_g = compact_bus_bits(cfg) // g
        per_pass = max(self._pass_granules(p) for p in cfg.patterns)
        regs = {
            "buffer": self.buffer_bits,
            "fill": (self.max_step + bus_g - 1).bit_length(),
            "need": (cfg.depth * per_pass).bit_length(),
        }
        if cfg.pattern_bits:
            regs["pattern"] = cfg.pattern_bits
        if self._straddle:
            regs["left"] = (max(p.n for p in cfg.patterns) - 1).bit_length()
            if self.rank_bits:
                regs["rank"] = cfg.cols * self.rank_bits
        return regs

    def _pass_granules(self, pattern) -> int:
        return sum(self._steps(pattern)) // self.granule

    # ------------------------------------------------------------------ logic
    def elaborate(self, platform):
        cfg, g = self._cfg, self.granule
        m = Module()
        w, cols, patterns = cfg.weight_port_rows, cfg.cols, cfg.patterns
        n_max = max(p.n for p in patterns)
        bus_g = compact_bus_bits(cfg) // g
        value_g = self.value_bits // g
        code_bits = [compact_code_bits(cfg, p) for p in patterns]
        starts_max = [max(compact_starts(cfg, p, b) for b in range(cfg.beats_per_word))
                      for p in patterns]
        regs = self.register_bits()
        max_step = self.max_step

        buf = Signal(self.buffer_bits)
        fill = Signal(regs["fill"])  # granules held, bits 0 .. fill*g - 1 of buf
        need = Signal(regs["need"])  # granules the command's remaining beats take; 0: idle
        # The pattern code, latched per command.
        pat = Signal(cfg.pattern_bits, name="pattern") if cfg.pattern_bits else 0
        if self._straddle:
            left = Signal(regs["left"], name="left")  # rows of the group still to come; 0: new
            rank = [Signal(self.rank_bits, name=f"rank{c}") for c in range(cols)] \
                if self.rank_bits else [0] * cols
        else:
            left, rank = 0, [0] * cols

        # ------------------------------------------------------------------ row slots
        # Shared by all columns: each slot's step k and whether a group starts at it (so
        # takes its code from the buffer), and which of the beat's groups that is.
        n_sel = Signal(range(n_max + 1))
        lookup(m, pat, [p.n for p in patterns], n_sel)
        k, start, group = [], [], []
        before, at = left, Const(0, range(max(starts_max) + 1))
        for j in range(w):
            s = Signal(name=f"start{j}")
            kj = Signal(range(n_max + 1), name=f"k{j}")
            m.d.comb += [s.eq(before == 0), kj.eq(Mux(s, n_sel, before))]
            k.append(kj)
            start.append(s)
            group.append(at)
            nxt = Signal(range(n_max + 1), name=f"left{j}")
            m.d.comb += nxt.eq(kj - 1)
            count = Signal(range(max(starts_max) + 1), name=f"starts{j}")
            m.d.comb += count.eq(at + s)
            before, at = nxt, count
        left_next, starts = before, at

        # Packed bits of this beat, in granules: its values and the codes of `starts` groups.
        step = Signal(range(max_step + 1))
        for i in cases(m, pat, len(patterns)):
            m.d.comb += step.eq(value_g + starts * (cols * code_bits[i] // g))

        # ------------------------------------------------------------------ output side
        out = self.weights
        m.d.comb += out.valid.eq((need != 0) & (fill >= step))
        fire = out.valid & out.ready
        last = fire & (need == step)
        m.d.comb += out.payload.values.eq(buf[:self.value_bits])
        rank_next = list(rank)
        if cfg.index_bits:
            rank_next = self._decoder(m, buf, pat, k, start, group, rank, code_bits, starts_max,
                                      n_max)

        # ------------------------------------------------------------------ input side
        # Fill left after this cycle's beat; a word fits when it lands below max_step, which
        # also keeps the output busy: a refused word leaves at least the widest beat behind.
        rest = Signal(range(max_step + bus_g))
        m.d.comb += rest.eq(fill - Mux(fire, step, 0))
        word = self.packed
        m.d.comb += word.ready.eq((need != 0) & (fill < need) & (rest < max_step))
        take = word.valid & word.ready

        drained = buf
        for b in range(len(step)):  # shift down by `step` granules, one stage per step bit
            drained = Mux(fire & step[b], drained >> ((1 << b) * g), drained)
        landed = word.payload  # shifted up by `rest` granules, one stage per bit of rest
        for b in range(len(rest)):
            landed = Mux(rest[b], landed << ((1 << b) * g), landed)
        landed = landed[:self.buffer_bits]

        m.d.sync += [
            buf.eq(drained | Mux(take, landed, 0)),
            fill.eq(rest + Mux(take, bus_g, 0)),
            need.eq(need - Mux(fire, step, 0)),
        ]
        if self._straddle:
            with m.If(fire):
                m.d.sync += left.eq(left_next)
                if self.rank_bits:
                    m.d.sync += [r.eq(v) for r, v in zip(rank, rank_next, strict=True)]
        with m.If(last):  # drop the last word's padding
            m.d.sync += [buf.eq(0), fill.eq(0)]

        # ------------------------------------------------------------------ commands
        code = self.cmd.payload.pattern if cfg.pattern_bits else 0
        m.d.comb += self.cmd.ready.eq((need == 0) | last)
        with m.If(self.cmd.valid & self.cmd.ready):
            if cfg.pattern_bits:
                m.d.sync += pat.eq(code)
            for i in cases(m, code, len(patterns)):
                m.d.sync += need.eq(self.cmd.payload.passes * self._pass_granules(patterns[i]))
        return m

    def _decoder(self, m, buf, pat, k, start, group, rank, code_bits, starts_max, n_max):
        """Drive the beat's indices; returns each column's rank after the beat's last slot."""
        cfg = self._cfg
        cols, patterns, lanes = cfg.cols, cfg.patterns, cfg.m_max
        out = self.weights.payload
        width = compact_rank_cap(cfg).bit_length()  # table entries saturate at S
        # The table of binomials, shared by the columns: lanes 1 .. m_max - 1 of step k (lane
        # 0 is C(0, k) = 0 <= any rank).
        tables = []
        for j, kj in enumerate(k):
            row = Signal((lanes - 1) * width, name=f"binom{j}")
            lookup(m, kj, [sum(compact_binomial(cfg, x, kk) << (x - 1) * width
                               for x in range(1, lanes)) for kk in range(n_max + 1)], row)
            tables.append([row[(x - 1) * width:x * width] for x in range(1, lanes)])
        ranks = []
        for c in range(cols):
            prev = rank[c]
            for j in range(len(k)):
                code = Signal(self.rank_bits, name=f"code{j}_{c}")
                for i in cases(m, pat, len(patterns)):
                    bits = code_bits[i]
                    if not bits:
                        continue
                    for gi in cases(m, group[j], starts_max[i]):
                        at = self.value_bits + (gi * cols + c) * bits
                        m.d.comb += code.eq(buf[at:at + bits])
                r_in = Signal(self.rank_bits, name=f"r{j}_{c}")
                m.d.comb += r_in.eq(Mux(start[j], code, prev))
                # The greedy step: the largest lane x with C(x, k) <= rank.  The comparisons
                # form a thermometer (C(x, k) grows with x); its one-hot edge picks the entry.
                t = [Const(1)] + [r_in >= e for e in tables[j]] + [Const(0)]
                onehot = [t[x] & ~t[x + 1] for x in range(lanes)]
                index = Signal(cfg.index_bits, name=f"index{j}_{c}")
                taken = Signal(width, name=f"taken{j}_{c}")
                m.d.comb += [
                    index.eq(_or(Mux(onehot[x], x, 0) for x in range(1, lanes))),
                    taken.eq(_or(Mux(onehot[x], tables[j][x - 1], 0) for x in range(1, lanes))),
                    out.indices[j * cols + c].eq(index),
                ]
                r_out = Signal(self.rank_bits, name=f"rest{j}_{c}")
                m.d.comb += r_out.eq(r_in - taken)
                prev = r_out
            ranks.append(prev)
        return ranks


def _or(values):
    """OR of ``values`` (0 when empty)."""
    acc = Const(0)
    for v in values:
        acc = acc | v
    return acc


def verilog(cfg: HwConfig, name: str | None = None) -> tuple[str, str]:
    """Reproducible Verilog of the unpacker (``emit_src=False``, as hw/export.py): ``(text,
    module name)``; the name defaults to the macro's (:func:`~flexcim.spec.config.module_name`)
    with ``_unpack``."""
    from amaranth.back import verilog as back
    from flexcim.spec.config import module_name

    top = name or f"{module_name(cfg)}_unpack"
    return back.convert(WeightUnpacker(cfg), name=top, emit_src=False), top


__all__ = ["WeightUnpacker", "verilog"]
