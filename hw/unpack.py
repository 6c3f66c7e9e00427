"""The weight unpacker: compact weight storage expanded into the macro's weight beats (issue 17).

A weight buffer that stores ``8 + log2 M`` bits per kept weight (the packed stream of
:func:`flexcim.spec.layouts.pack_compact`; ``golden.system.Accelerator(compact_indices=True)``
charges exactly its words) feeds the macro through this gearbox: it takes bus words of the
macro's own beat width and emits :func:`~flexcim.spec.layouts.weight_layout` beats with the
indices zero-extended to ``index_bits``; the macro forces the bits at and above ``log2 M``
itself (hw/top.py), so the zeros are never read.  docs/architecture.md, section 8.

Structure: a buffer register of ``2 * bus - g`` bits (``g`` = the gcd of the bus width and of
every pattern's packed beat width: every fill level is a multiple of it) holding ``fill`` valid
bits from bit 0 up, bits above ``fill`` zero.  A beat leaves from the low bits (values wired,
indices through a multiplexer over the distinct ``log2 M``), the buffer shifts down by the
packed beat width, and an accepted word is ORed in at the fill level left after that shift
(a multiplexer over ``bus / g`` positions, no barrel shifter).
"""

from __future__ import annotations

import math

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import validating
from flexcim.hw.controller import cases, lookup
from flexcim.spec.config import WEIGHT_BITS, HwConfig
from flexcim.spec.layouts import (
    compact_beat_layout,
    compact_bus_bits,
    compact_cmd_layout,
    compact_index_bits,
    compact_max_beats,
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
        Pattern code and weight beat count of the next command.  Taken when the unpacker is
        idle or in the cycle its current command's last beat leaves.  A beat count of 0 is
        taken and does nothing; a pattern code past the configured ones runs as the last
        pattern (the host never sends either: :func:`~flexcim.spec.layouts.pack_compact_cmd`
        refuses them).
    packed : In(stream), :func:`~flexcim.spec.layouts.compact_bus_bits` wide
        The command's :func:`~flexcim.spec.layouts.compact_words` bus words; exactly those
        are taken, and the padding of the last one is dropped after the last beat.
    weights : Out(stream), :func:`~flexcim.spec.layouts.weight_layout`
        The command's beats, indices zero-extended; drives the macro's ``weights`` port.

    ``weights.valid`` is a function of registers only; ``packed.ready`` and ``cmd.ready``
    depend combinationally on ``weights.ready`` (a word is taken in the cycle a beat leaves
    when the two fit together), as ``amaranth.lib.stream`` allows.  Latency: a word taken in
    cycle ``t`` can complete a beat in cycle ``t + 1``; the first word of a command is taken
    the cycle after its ``cmd``, so its first beat is valid 2 cycles after the ``cmd``.
    Throughput: one beat per cycle inside a command while a word is offered every cycle (a
    packed beat is never wider than a word), with one idle output cycle between commands.
    Driving a macro, it adds no cycle when its first command leads the macro's by one cycle:
    the macro asks for a command's first beat the cycle after taking the command, and takes
    the next command only after computing the previous one's tokens
    (tests/hw/test_unpack.py checks the cycles against ``golden.perf``).

    Registers: :meth:`register_bits` (388 flip-flops on ``default``, 109 on ``tiny``).
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

    @property
    def index_widths(self) -> tuple[int, ...]:
        """The distinct ``log2 M`` of the patterns, ascending (the latched selector's range)."""
        cfg = self._cfg
        return tuple(sorted({compact_index_bits(cfg, p) for p in cfg.patterns}))

    @property
    def granule(self) -> int:
        """``g``: the gcd of the bus width and every packed beat width, in bits."""
        cfg = self._cfg
        return math.gcd(compact_bus_bits(cfg),
                        *(compact_beat_layout(cfg, p).size for p in cfg.patterns))

    @property
    def buffer_bits(self) -> int:
        """Bits of the buffer register: ``2 * bus - g`` (a word lands at a fill of at most
        ``bus - g`` bits)."""
        return 2 * compact_bus_bits(self._cfg) - self.granule

    def register_bits(self) -> dict[str, int]:
        """Flip-flops by register: ``buffer``, ``fill`` and ``need`` (in granules of ``g``
        bits) and the latched index-width selector ``sel`` (absent with one width)."""
        cfg, g = self._cfg, self.granule
        bus_g = compact_bus_bits(cfg) // g
        regs = {
            "buffer": self.buffer_bits,
            "fill": (2 * bus_g - 1).bit_length(),
            "need": (compact_max_beats(cfg) * bus_g).bit_length(),
        }
        if len(self.index_widths) > 1:
            regs["sel"] = (len(self.index_widths) - 1).bit_length()
        return regs

    def elaborate(self, platform):
        cfg, g = self._cfg, self.granule
        m = Module()
        n = cfg.cols * cfg.weight_port_rows
        widths = self.index_widths
        bus_g = compact_bus_bits(cfg) // g
        beat_g = [n * (WEIGHT_BITS + lg) // g for lg in widths]  # packed beat, in granules
        regs = self.register_bits()

        buf = Signal(self.buffer_bits)
        fill = Signal(regs["fill"])  # granules held, bits 0 .. fill*g - 1 of buf
        need = Signal(regs["need"])  # granules the command's remaining beats take; 0: idle
        if len(widths) > 1:
            sel = Signal(regs["sel"])  # index into widths, latched per command
        else:
            sel = 0  # one width: every lookup below is a constant

        # ------------------------------------------------------------------ output side
        step = Signal(range(bus_g + 1))
        lookup(m, sel, beat_g, step)
        out = self.weights
        m.d.comb += out.valid.eq((need != 0) & (fill >= step))
        fire = out.valid & out.ready
        last = fire & (need == step)
        base = n * WEIGHT_BITS
        m.d.comb += out.payload.values.eq(buf[:base])
        if cfg.index_bits:
            # The bits at and above log2 M stay 0 here; the macro forces them (hw/top.py).
            for i in cases(m, sel, len(widths)):
                lg = widths[i]
                if lg:
                    m.d.comb += [out.payload.indices[e].eq(buf[base + e * lg:base + (e + 1) * lg])
                                 for e in range(n)]

        # ------------------------------------------------------------------ input side
        # Fill left after this cycle's beat; a word fits when it lands below bus - g, which
        # also keeps the output busy: a refused word leaves at least one whole beat behind.
        rest = Signal(range(2 * bus_g))
        m.d.comb += rest.eq(fill - Mux(fire, step, 0))
        word = self.packed
        m.d.comb += word.ready.eq((need != 0) & (fill < need) & (rest < bus_g))
        take = word.valid & word.ready

        drained = Signal(self.buffer_bits)
        for i in cases(m, sel, len(widths)):
            m.d.comb += drained.eq(Mux(fire, buf >> (beat_g[i] * g), buf))
        landed = Signal(self.buffer_bits)
        for p in cases(m, rest, bus_g):
            m.d.comb += landed.eq(word.payload << (p * g))

        m.d.sync += [
            buf.eq(drained | Mux(take, landed, 0)),
            fill.eq(rest + Mux(take, bus_g, 0)),
            need.eq(need - Mux(fire, step, 0)),
        ]
        with m.If(last):  # drop the last word's padding
            m.d.sync += [buf.eq(0), fill.eq(0)]

        # ------------------------------------------------------------------ commands
        code = self.cmd.payload.pattern if cfg.pattern_bits else 0
        if len(widths) > 1:
            sel_in = Signal.like(sel)
            lookup(m, code, [widths.index(compact_index_bits(cfg, p)) for p in cfg.patterns],
                   sel_in)
        else:
            sel_in = 0
        m.d.comb += self.cmd.ready.eq((need == 0) | last)
        with m.If(self.cmd.valid & self.cmd.ready):
            if len(widths) > 1:
                m.d.sync += sel.eq(sel_in)
            for i in cases(m, sel_in, len(widths)):
                m.d.sync += need.eq(self.cmd.payload.beats * beat_g[i])
        return m


def verilog(cfg: HwConfig, name: str | None = None) -> tuple[str, str]:
    """Reproducible Verilog of the unpacker (``emit_src=False``, as hw/export.py): ``(text,
    module name)``; the name defaults to the macro's (:func:`~flexcim.spec.config.module_name`)
    with ``_unpack``."""
    from amaranth.back import verilog as back
    from flexcim.spec.config import module_name

    top = name or f"{module_name(cfg)}_unpack"
    return back.convert(WeightUnpacker(cfg), name=top, emit_src=False), top


__all__ = ["WeightUnpacker", "verilog"]
