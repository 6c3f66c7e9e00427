"""The double-buffered activation buffer, in memories with synchronous read ports.

Two banks of ``lanes`` int8 activations.  The loader writes one beat of ``in_lanes``
activations per cycle into the bank that is being filled; the compute side reads the window of
the current pass of the other bank, one bit-slice per cycle.  Both live in ``lib.memory.Memory``
blocks with one write port and one synchronous read port each, so an ASIC flow can map them to
SRAM macros and an FPGA flow to block RAM (issue 14, item 3; the banks used to be registers
that shifted down by the pass width after every pass).

Organisation (docs/architecture.md, section 2).  Let ``G`` be the greatest common divisor of
``in_lanes``, ``window_lanes`` and every pass width (24 in the default preset).  A bank is cut
into *granules* of ``G`` lanes, and a memory word is one bit-slice of one granule (``G x b``
bits, ``b = slice_bits``), so a cycle reads only the slice it computes on.  Slice ``s`` of
granule ``g`` lives in memory ``(g + s*I) mod NB`` (``I = in_lanes / G``, the granules of a
beat), at address (row ``g div NB``, bank, slice ``s``).  The skew by ``s*I`` lets a beat write
all slices of its ``I`` granules at once, one word into each of ``I * 8/b`` distinct memories,
and a pass of ``w = W / G`` granules read slice ``s`` of all of them at once from ``w`` distinct
memories, if ``NB = I * S`` with ``S = max(ceil(window_lanes / in_lanes), 8/b)`` slots (beat
``b`` is row ``b div S``, slot ``b mod S``).  Reading slice ``s`` of the pass at granule
``base``, memory ``m`` holds granule ``base + ((m - e) mod NB)``, ``e = (base + s*I) mod NB``,
so a rotation by ``e`` granules puts the words in window order; writing, the beat's slices
rotate by its slot onto the memories of each granule.  Nothing needs a divider: the pass
position is kept as a running quotient and remainder of ``NB``.

Read enables.  A memory's read port is enabled only when the cycle after uses new data
(``read``, the controller's ``fetch``) and only if the memory holds one of the ``w`` granules of
the pass (clipped at the end of the bank): the ports rotated by ``e`` from a thermometer of
``w`` ones.  A port that is not enabled keeps its word, so the window holds through stalls and
a cycle reads ``min(pass width, lanes - base) x b`` bits, a pass that width times 8: what the
energy model charges (:func:`flexcim.golden.energy.command_events`, ``buffer_read_bits``).
"""

from __future__ import annotations

import math
import operator

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import balanced_sum, index_shape, validating
from flexcim.spec.config import ACT_BITS


def beats_per_row(*, window_lanes: int, in_lanes: int, slice_bits: int) -> int:
    """Beats that fill one row of the buffer's memories, ``S = max(ceil(window_lanes /
    in_lanes), 8 / slice_bits)``: the loader addresses beat ``b`` as row ``b div S``, slot
    ``b mod S``."""
    return max(-(-operator.index(window_lanes) // operator.index(in_lanes)),
               ACT_BITS // operator.index(slice_bits))


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
    activity : bool
        Add the ``read_words`` output (an activity counter's input; default off: no logic).

    Members
    -------
    we, wbank, wrow, wslot, wdata : In
        Write beat ``wdata`` into bank ``wbank``; beat ``b`` of a token is row ``b div S``,
        slot ``b mod S`` (:func:`beats_per_row`).  The beat is in the memories the next cycle.
    rbank, slice, read : In
        Bank and bit-slice the window shows from the *next* cycle on (the memories' synchronous
        read ports: latency 1, as the cells' ``Controller.r_pass_next``), read in the cycles
        with ``read`` (``Controller.fetch``: the next cycle computes on a new window); without
        ``read`` the window holds.  A word written in the cycle it is read is read through.
    shift, shift_sel, restart : In
        At this clock edge the pass advances by ``shifts[shift_sel]`` lanes (``shift``), or
        returns to lane 0 (``restart``, the token's last cycle; it wins over ``shift``).
    window : Out, ``window_lanes`` x unsigned ``slice_bits``
        Slice ``slice`` of the lanes ``base .. base + w - 1`` of bank ``rbank`` (``w =
        shifts[shift_sel]``, ``base``: the current pass's first lane), as read by the last
        ``read``; lanes past ``lanes`` read 0.  Lanes past the pass width are not read (their
        memories keep older words; the distribution unit routes none of them).
    read_words : Out (only with ``activity``)
        Read ports enabled in this cycle; each reads ``granule x slice_bits`` bits.

    Latency 1 (``read`` to ``window``).  Throughput: one window per cycle, one beat written per
    cycle into the other bank.
    """

    def __init__(self, *, lanes: int, in_lanes: int, window_lanes: int, shifts, slice_bits: int,
                 activity: bool = False):
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
        self._slices = ACT_BITS // self._b
        self._per_beat = self._in_lanes // g
        self._slots = beats_per_row(window_lanes=self._window, in_lanes=self._in_lanes,
                                    slice_bits=self._b)
        self._memories = self._slots * self._per_beat
        self._granules = self._lanes // g
        self._rows = -(-self._granules // self._memories)
        self._activity = bool(activity)
        ports = {
            "we": In(1),
            "wbank": In(1),
            "wrow": In(index_shape(self._rows)),
            "wslot": In(index_shape(self._slots)),
            "wdata": In(data.ArrayLayout(signed(ACT_BITS), self._in_lanes)),
            "rbank": In(1),
            "slice": In(index_shape(self._slices)),
            "read": In(1),
            "shift": In(1),
            "restart": In(1),
            "window": Out(data.ArrayLayout(unsigned(self._b), self._window)),
        }
        if len(self._shifts) > 1:
            ports["shift_sel"] = In(range(len(self._shifts)))
        if self._activity:
            ports["read_words"] = Out(range(self._memories + 1))
        super().__init__(ports)

    @property
    def granule(self) -> int:
        """Lanes per memory word, ``G``."""
        return self._granule

    @property
    def word_bits(self) -> int:
        """Bits of one memory word, read by one enabled port: ``G x slice_bits``."""
        return self._granule * self._b

    @property
    def memories(self) -> int:
        """Memories of the buffer, ``NB`` (each holds words of both banks and every slice)."""
        return self._memories

    def _residue(self, m: int, s: int) -> int:
        """``g mod NB`` of the granules whose slice ``s`` memory ``m`` holds."""
        return (m - s * self._per_beat) % self._memories

    def memory_rows(self, m: int) -> int:
        """Rows of memory ``m`` per bank and slice: the most granules any slice puts there."""
        return max(max(0, -(-(self._granules - self._residue(m, s)) // self._memories))
                   for s in range(self._slices))

    @property
    def memory_bits(self) -> int:
        """Storage bits of all memories: ``2 * lanes * 8``, plus the unused words of memories
        that hold more granules of one slice than of another (none when ``NB`` divides
        ``lanes / G``)."""
        return sum(2 * self._slices * self.memory_rows(m) * self._granule * self._b
                   for m in range(self._memories))

    def elaborate(self, platform):
        m = Module()
        g, nb, b, slices = self._granule, self._memories, self._b, self._slices
        per_beat, slots = self._per_beat, self._slots
        steps = [s // g for s in self._shifts]

        # The current pass's first granule: quotient q and remainder r of base / NB, and base
        # itself where a window can run past the last granule (masked to 0 there).
        q = Signal(range(self._rows + 1), name="q")
        r = Signal(index_shape(nb), name="r")
        q_next = Signal.like(q, name="q_next")
        r_next = Signal.like(r, name="r_next")
        step = Signal(range(nb + 1), name="step")
        reach = Signal(nb, name="reach")  # the pass's granules from base: w ones
        if len(steps) > 1:
            # The last width is the default branch (shift_sel never exceeds it), so the case
            # statement is complete (Verilator CASEINCOMPLETE) for any number of widths.
            with m.Switch(self.shift_sel):
                for i, w in enumerate(steps):
                    with m.Case(i) if i < len(steps) - 1 else m.Default():
                        m.d.comb += [step.eq(w), reach.eq((1 << w) - 1)]
        else:
            m.d.comb += [step.eq(steps[0]), reach.eq((1 << steps[0]) - 1)]
        wrapped = Signal(range(2 * nb), name="wrapped")
        m.d.comb += [wrapped.eq(r + step), q_next.eq(q), r_next.eq(r)]
        with m.If(self.restart):
            m.d.comb += [q_next.eq(0), r_next.eq(0)]
        with m.Elif(self.shift):
            with m.If(wrapped >= nb):
                m.d.comb += [q_next.eq(q + 1), r_next.eq(wrapped - nb)]
            with m.Else():
                m.d.comb += r_next.eq(wrapped)
        m.d.sync += [q.eq(q_next), r.eq(r_next)]
        # A window runs past the last granule when the last position of some pass width plus
        # the window's granules exceeds it; only then is anything masked.
        masked = any((-(-self._granules // w) - 1) * w + self._window // g > self._granules
                     for w in steps)
        if masked:
            base = Signal(range(self._granules + self._window // g + 1), name="base")
            base_next = Signal.like(base, name="base_next")
            m.d.comb += base_next.eq(base)
            with m.If(self.restart):
                m.d.comb += base_next.eq(0)
            with m.Elif(self.shift):
                m.d.comb += base_next.eq(base + step)
            m.d.sync += base.eq(base_next)

        def rotate(values, amount, count, name, sign=1):
            """``out[j] = values[(j + sign * amount) mod count]`` (``amount < count``, ``sign``
            +1 or -1): a barrel rotator, stage ``k`` moving by ``2**k`` places when bit ``k``
            is set."""
            for k in range((count - 1).bit_length()):
                moved = []
                for j in range(count):
                    v = Signal.like(values[j], name=f"{name}{k}_{j}")
                    m.d.comb += v.eq(Mux(amount[k], values[(j + sign * (1 << k)) % count],
                                         values[j]))
                    moved.append(v)
                values = moved
            return values

        # Writing: memory k*I + i takes slice (k - slot) mod S of the beat's granule i, so per
        # granule the beat's slices rotate by the slot (slices past 8/b are no slice: no write).
        lane_shape = data.ArrayLayout(unsigned(b), g)
        back = Signal(index_shape(slots), name="back")  # rotating right by slot = left by back
        m.d.comb += back.eq(Mux(self.wslot == 0, 0, slots - self.wslot))
        incoming = []
        for i in range(per_beat):
            cut = []
            for s in range(slots):
                word = Signal(lane_shape, name=f"in{i}_{s}")
                if s < slices:
                    m.d.comb += [word[j].eq(self.wdata[i * g + j].as_unsigned()
                                            .word_select(s, b) if slices > 1
                                            else self.wdata[i * g + j]) for j in range(g)]
                cut.append(word)
            incoming.append(rotate(cut, back, slots, f"wrot{i}_"))

        slice_bits = (slices - 1).bit_length()
        # Reading slice s of the pass at granule base, memory (e + j) mod NB holds the pass's
        # granule base + j, e = (r + s*I) mod NB.  The read ports take the next cycle's e; the
        # words, read one cycle earlier, the current one (e_next registered, held with them).
        if slices > 1:
            e_raw = Signal(range(2 * nb), name="e_raw")
            e_next = Signal(index_shape(nb), name="e_next")
            e = Signal(index_shape(nb), name="e")
            m.d.comb += [e_raw.eq(r_next + self.slice * per_beat),
                         e_next.eq(Mux(e_raw >= nb, e_raw - nb, e_raw))]
            m.d.sync += e.eq(e_next)
        else:
            e_next, e = r_next, r
        # Read enables: memory j holds the pass's granule d = (j - e_next) mod NB, one of the
        # pass's w when d < w and, where a pass can run past the bank, base + d < lanes / G.
        # A thermometer of those granules, rotated onto the memories (NB log2 NB one-bit muxes).
        wanted = []
        for d in range(nb):
            want = Signal(name=f"want{d}")
            inside = self._granules - d
            if masked:
                m.d.comb += want.eq(reach[d] & (base_next < inside) if inside > 0 else 0)
            else:
                m.d.comb += want.eq(reach[d])
            wanted.append(want)
        enables = rotate(wanted, e_next, nb, "ren", sign=-1)
        read_ens = []
        words = []
        for j in range(nb):
            k, i = divmod(j, per_beat)
            rows = self.memory_rows(j)
            word = Signal(lane_shape, name=f"word{j}")
            words.append(word)
            if rows == 0:  # no granule of the bank maps here (a bank narrower than NB)
                continue
            mem = Memory(shape=lane_shape, depth=2 * slices * rows, init=[])
            m.submodules[f"mem{j}"] = mem
            write = mem.write_port()
            read = mem.read_port(domain="sync", transparent_for=(write,))
            ws = Signal(index_shape(slots), name=f"ws{j}")  # the slice memory j writes
            if k < slots - 1:
                m.d.comb += ws.eq(Mux(self.wslot > k, k + slots - self.wslot, k - self.wslot))
            else:  # the slot is never above the last (Verilator CMPCONST)
                m.d.comb += ws.eq(k - self.wslot)
            m.d.comb += [
                write.en.eq(self.we & (ws < slices) if slots > slices else self.we),
                write.addr.eq(Cat(ws[:slice_bits], self.wbank, self.wrow)),
                write.data.eq(incoming[i][k]),
            ]
            # Memory j holds, for slice s, the granules of residue t = (j - s*I) mod NB: the
            # pass's one is a row further when t comes before base's remainder.
            ahead = Signal(name=f"ahead{j}")
            with m.Switch(self.slice if slices > 1 else 0):
                for s in range(slices):
                    t = self._residue(j, s)
                    with m.Case(s) if s < slices - 1 else m.Default():
                        m.d.comb += ahead.eq(r_next > t if t < nb - 1 else 0)
            row = Signal(range(self._rows + 2), name=f"row{j}")
            m.d.comb += row.eq(q_next + ahead)
            if rows & (rows - 1):
                # A row past the bank (a granule past `lanes`, masked below) stays inside the
                # memory: a non-power-of-two depth has addresses with no word.
                row = Mux(row < rows, row, 0)
            m.d.comb += [read.addr.eq(Cat(self.slice[:slice_bits], self.rbank, row)),
                         read.en.eq(self.read & enables[j]),
                         word.eq(read.data)]
            read_ens.append(read.en)
        if self._activity:
            m.d.comb += self.read_words.eq(balanced_sum(read_ens))

        # The words in window order: rotate by e.
        ordered = rotate(words, e, nb, "rot")
        for j in range(self._window):
            group, i = divmod(j, g)
            value = ordered[group][i]
            if j >= self._lanes:
                m.d.comb += self.window[j].eq(0)
            elif masked:
                # Granule base + group exists only below lanes / G.
                m.d.comb += self.window[j].eq(Mux(base < self._granules - group, value, 0))
            else:
                m.d.comb += self.window[j].eq(value)
        return m
