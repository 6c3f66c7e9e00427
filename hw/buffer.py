"""The double-buffered activation buffer, in memories with synchronous read ports.

Two banks of ``lanes`` int8 activations.  The loader writes one beat of ``in_lanes``
activations per cycle into the bank that is being filled; the compute side reads the window of
the current pass of the other bank, one bit-slice per cycle.  Both live in ``lib.memory.Memory``
blocks with one write port and one synchronous read port each, so an ASIC flow can map them to
SRAM macros and an FPGA flow to block RAM (issue 14, item 3; the banks used to be registers
that shifted down by the pass width after every pass).

Organisation (docs/architecture.md, section 2).  Let ``G`` be the greatest common divisor of
``in_lanes``, ``window_lanes`` and every pass width (24 in the default preset).  A bank is cut
into *granules* of ``G`` lanes; granule ``g`` lives in memory ``g mod NB``, at row ``g div NB``,
and a memory word holds the eight bits of its ``G`` lanes.  A pass of width ``W`` at position
``p`` covers the ``w = W / G`` granules ``p*w .. p*w + w - 1``: as ``w <= NB`` they sit in ``w``
distinct memories, so every memory reads one word per cycle, memory ``m`` at row
``base div NB + (m < base mod NB)`` (``base = p*w``), and a rotation by ``base mod NB`` granules
puts them in window order.  ``NB`` is the number of window granules rounded up to a multiple
of the granules of a beat (``in_lanes / G``): then beat ``b`` writes the ``in_lanes / G``
memories of slot ``b mod S`` (``S = NB * G / in_lanes``) at row ``b div S``, always the same
lanes of the beat into the same memory (fixed wires, no write rotator).  Nothing needs a
divider: the pass position is kept as a running quotient and remainder.
"""

from __future__ import annotations

import math
import operator

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import index_shape, validating
from flexcim.spec.config import ACT_BITS


def beats_per_row(*, window_lanes: int, in_lanes: int) -> int:
    """Beats that fill one row of the buffer's memories, ``S = ceil(window_lanes /
    in_lanes)``: the loader addresses beat ``b`` as row ``b div S``, slot ``b mod S``."""
    return -(-operator.index(window_lanes) // operator.index(in_lanes))


class ActivationBuffer(wiring.Component):
    """Two activation banks: one filled by beats while the other feeds the window.

    Parameters
    ----------
    lanes : int
        Activations per bank (``max_k``), a multiple of ``in_lanes``.
    in_lanes : int
        Activations per loader beat.
    window_lanes : int
        Lanes of the compute window, at least every pass width.
    shifts : sequence of int
        The pass widths; ``shift_sel`` picks the command's.
    slice_bits : int
        Bits per activation slice, 1, 2, 4 or 8.

    Members
    -------
    we, wbank, wrow, wslot, wdata : In
        Write beat ``wdata`` into bank ``wbank``; beat ``b`` of a token is row ``b div S``,
        slot ``b mod S`` (:func:`beats_per_row`).
    rbank, slice : In
        Bank and bit-slice the window shows in the *next* cycle (the memories' synchronous read
        ports: latency 1, as the cells' ``Controller.r_pass_next``).  The words are read only
        when ``slice`` is 0 (the first slice of a pass, or between passes) and held for the
        pass's other slices.  A word written in the cycle it is addressed is read through.
    shift, shift_sel, restart : In
        At this clock edge the pass advances by ``shifts[shift_sel]`` lanes (``shift``), or
        returns to lane 0 (``restart``, the token's last cycle; it wins over ``shift``).
    window : Out, ``window_lanes`` x unsigned ``slice_bits``
        Slice ``slice`` of the lanes ``base .. base + window_lanes - 1`` of bank ``rbank``, as
        addressed one cycle earlier (``base``: the current pass's first lane); lanes past
        ``lanes`` read 0.  Lanes past the pass width carry the next lanes of the bank (the
        distribution unit routes none of them).

    Throughput: one window per cycle, one beat written per cycle into the other bank.
    """

    def __init__(self, *, lanes: int, in_lanes: int, window_lanes: int, shifts, slice_bits: int):
        with validating(self):
            self._lanes = operator.index(lanes)
            self._in_lanes = operator.index(in_lanes)
            self._window = operator.index(window_lanes)
            self._shifts = tuple(operator.index(s) for s in shifts)
            self._b = operator.index(slice_bits)
            if self._in_lanes < 1 or self._lanes < 1 or self._lanes % self._in_lanes:
                raise ValueError(
                    f"lanes must be a positive multiple of in_lanes={in_lanes}, not {lanes!r}"
                )
            if not self._shifts or min(self._shifts) < 1:
                raise ValueError(f"shifts must be positive lane counts, not {shifts!r}")
            if self._window < max(self._shifts):
                raise ValueError(
                    f"window_lanes must be at least the widest pass, {max(self._shifts)}, "
                    f"not {window_lanes!r}"
                )
            if self._b not in (1, 2, 4, 8):
                raise ValueError(f"slice_bits must be 1, 2, 4 or 8, not {slice_bits!r}")
        g = math.gcd(self._in_lanes, self._window, *self._shifts)
        self._granule = g
        self._slots = beats_per_row(window_lanes=self._window, in_lanes=self._in_lanes)
        self._memories = self._slots * (self._in_lanes // g)
        self._granules = self._lanes // g
        self._rows = -(-self._granules // self._memories)
        ports = {
            "we": In(1),
            "wbank": In(1),
            "wrow": In(index_shape(self._rows)),
            "wslot": In(index_shape(self._slots)),
            "wdata": In(data.ArrayLayout(signed(ACT_BITS), self._in_lanes)),
            "rbank": In(1),
            "slice": In(index_shape(ACT_BITS // self._b)),
            "shift": In(1),
            "restart": In(1),
            "window": Out(data.ArrayLayout(unsigned(self._b), self._window)),
        }
        if len(self._shifts) > 1:
            ports["shift_sel"] = In(range(len(self._shifts)))
        super().__init__(ports)

    @property
    def granule(self) -> int:
        """Lanes per memory word, ``G``."""
        return self._granule

    @property
    def memories(self) -> int:
        """Memories per buffer, ``NB`` (each holds its granules of both banks)."""
        return self._memories

    def memory_rows(self, m: int) -> int:
        """Rows (granules) of one bank in memory ``m``: ``ceil((lanes / G - m) / NB)``."""
        return max(0, -(-(self._granules - m) // self._memories))

    @property
    def memory_bits(self) -> int:
        """Storage bits of all memories: exactly ``2 * lanes * 8``."""
        return sum(2 * self.memory_rows(m) * self._granule * ACT_BITS
                   for m in range(self._memories))

    def elaborate(self, platform):
        m = Module()
        g, nb, b = self._granule, self._memories, self._b
        per_beat = self._in_lanes // g
        # Every pass position is a multiple of u granules (u divides NB): the remainder and the
        # rotation count in units of u, so the rotator has no stage that never switches.
        steps = [s // g for s in self._shifts]
        u = math.gcd(nb, *steps)
        groups = nb // u

        # The current pass's first granule: quotient q and remainder r*u of base / NB, and base
        # itself where a window can run past the last granule (masked to 0 there).
        q = Signal(range(self._rows + 1), name="q")
        r = Signal(index_shape(groups), name="r")
        q_next = Signal.like(q, name="q_next")
        r_next = Signal.like(r, name="r_next")
        step = Signal(range(groups + 1), name="step")
        if len(steps) > 1:
            # The last width is the default branch (shift_sel never exceeds it), so the case
            # statement is complete (Verilator CASEINCOMPLETE) for any number of widths.
            with m.Switch(self.shift_sel):
                for i, s in enumerate(steps):
                    with m.Case(i) if i < len(steps) - 1 else m.Default():
                        m.d.comb += step.eq(s // u)
        else:
            m.d.comb += step.eq(steps[0] // u)
        wrapped = Signal(range(2 * groups), name="wrapped")
        m.d.comb += [wrapped.eq(r + step), q_next.eq(q), r_next.eq(r)]
        with m.If(self.restart):
            m.d.comb += [q_next.eq(0), r_next.eq(0)]
        with m.Elif(self.shift):
            with m.If(wrapped >= groups):
                m.d.comb += [q_next.eq(q + 1), r_next.eq(wrapped - groups)]
            with m.Else():
                m.d.comb += r_next.eq(wrapped)
        m.d.sync += [q.eq(q_next), r.eq(r_next)]
        # A window runs past the last granule when the last position of some pass width plus
        # the window's granules exceeds it; only then is anything masked.
        masked = any((-(-self._granules // s) - 1) * s + self._window // g > self._granules
                     for s in steps)
        if masked:
            base = Signal(range(self._granules + self._window // g + 1), name="base")
            with m.If(self.restart):
                m.d.sync += base.eq(0)
            with m.Elif(self.shift):
                m.d.sync += base.eq(base + step * u)

        # Bit-serial: a word holds every slice of its lanes; read once per pass, the slice
        # taken after the read (the registered slice of the cycle the word is used in).
        slices = ACT_BITS // b
        if slices > 1:
            fetch = self.slice == 0
            slice_now = Signal.like(self.slice, name="slice_now")
            m.d.sync += slice_now.eq(self.slice)
        else:
            fetch = Const(1)
        word_shape = data.ArrayLayout(signed(ACT_BITS), g)
        lane_shape = data.ArrayLayout(unsigned(b), g)
        words = []
        for j in range(nb):
            rows = self.memory_rows(j)
            word = Signal(lane_shape, name=f"word{j}")
            words.append(word)
            if rows == 0:  # no granule of the bank maps here (a bank narrower than NB)
                continue
            mem = Memory(shape=word_shape, depth=2 * rows, init=[])
            m.submodules[f"mem{j}"] = mem
            write = mem.write_port()
            read = mem.read_port(domain="sync", transparent_for=(write,))
            # The beat's lanes (j mod per_beat)*G .. + G-1, in the slot that writes memory j.
            m.d.comb += [
                write.en.eq(self.we & (self.wslot == j // per_beat)),
                write.addr.eq(Cat(self.wbank, self.wrow)),
                write.data.eq(Cat(self.wdata[(j % per_beat) * g + i] for i in range(g))),
                read.en.eq(fetch),
            ]
            # Memory j holds the pass's granule base + ((j - base) mod NB): one row further
            # when j comes before base's remainder.
            row = Signal(range(self._rows + 2), name=f"row{j}")
            if j // u < groups - 1:
                m.d.comb += row.eq(q_next + (r_next > j // u))
            else:  # r_next is never above the last group (Verilator CMPCONST)
                m.d.comb += row.eq(q_next)
            if rows & (rows - 1):
                # A row past the bank (a granule past `lanes`, masked below) stays inside the
                # memory: a non-power-of-two depth has addresses with no word.
                m.d.comb += read.addr.eq(Cat(self.rbank, Mux(row < rows, row, 0)))
            else:
                m.d.comb += read.addr.eq(Cat(self.rbank, row))
            for i in range(g):
                lane = read.data[i]
                if slices > 1:
                    m.d.comb += word[i].eq(lane.as_unsigned().word_select(slice_now, b))
                else:
                    m.d.comb += word[i].eq(lane)

        # Rotate by r*u granules: the barrel stage for bit k moves groups of u granules by
        # 2**k places (mod NB), so stage after stage group j gets memory (j + r*u) mod NB.
        stage = words
        for k in range((groups - 1).bit_length()):
            shift = (1 << k) * u
            nxt = []
            for j in range(nb):
                moved = Signal(lane_shape, name=f"rot{k}_{j}")
                m.d.comb += moved.eq(Mux(r[k], stage[(j + shift) % nb], stage[j]))
                nxt.append(moved)
            stage = nxt
        for j in range(self._window):
            group, i = divmod(j, g)
            value = stage[group][i]
            if j >= self._lanes:
                m.d.comb += self.window[j].eq(0)
            elif masked:
                # Granule base + group exists only below lanes / G.
                m.d.comb += self.window[j].eq(Mux(base < self._granules - group, value, 0))
            else:
                m.d.comb += self.window[j].eq(value)
        return m
