"""The double-buffered activation buffer.

Two banks of ``lanes`` int8 activations.  The loader writes one beat of ``in_lanes``
activations per cycle into the bank that is being filled, at beat position ``wbeat`` (the
lanes of a beat are fixed wires: no alignment network).  The compute side reads a window of
the first ``window_lanes`` activations of the other bank, one bit-slice per cycle, and at the end
of each pass shifts that bank down by the pass width of the pattern, so the next pass's
activations arrive at the window without a wide read multiplexer.  A bank is consumed once per
token, so the shift destroys nothing that is needed again.
"""

from __future__ import annotations

import operator

from amaranth.hdl import Array, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import index_shape, validating
from flexcim.spec.config import ACT_BITS


class ActivationBuffer(wiring.Component):
    """Two activation banks: one filled by beats while the other feeds the window.

    Parameters
    ----------
    lanes : int
        Activations per bank (``max_k``), a multiple of ``in_lanes``.
    in_lanes : int
        Activations per loader beat.
    window_lanes : int
        Lanes of the compute window.
    shifts : sequence of int
        Selectable shift amounts (pass widths); ``shift_sel`` picks one.
    slice_bits : int
        Bits per activation slice.

    Members
    -------
    we, wbank, wbeat, wdata : In
        Write beat ``wdata`` at beat position ``wbeat`` of bank ``wbank``.
    rbank, slice : In
        Bank and bit-slice the window shows (combinational: latency 0).
    shift, shift_sel : In
        Shift bank ``rbank`` down by ``shifts[shift_sel]`` lanes at the clock edge (zeros in).
    window : Out, ``window_lanes`` x unsigned ``slice_bits``
        Slice ``slice`` of lanes ``0 .. window_lanes-1`` of bank ``rbank`` (0 past ``lanes``).
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
        self._beats = self._lanes // self._in_lanes
        ports = {
            "we": In(1),
            "wbank": In(1),
            "wbeat": In(index_shape(self._beats)),
            "wdata": In(data.ArrayLayout(signed(ACT_BITS), self._in_lanes)),
            "rbank": In(1),
            "slice": In(index_shape(ACT_BITS // self._b)),
            "shift": In(1),
            "window": Out(data.ArrayLayout(unsigned(self._b), self._window)),
        }
        if len(self._shifts) > 1:
            ports["shift_sel"] = In(range(len(self._shifts)))
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        banks = [
            [Signal(signed(ACT_BITS), name=f"bank{k}_{j}") for j in range(self._lanes)]
            for k in range(2)
        ]
        # One decoded select per shift amount, shared by every lane; the last amount is the
        # fall-through of each lane's mux chain (shift_sel never exceeds it), so no lane has an
        # incomplete case statement (Verilator CASEINCOMPLETE) for 3 or 5+ amounts.
        picks = []
        for s in range(len(self._shifts) - 1):
            pick = Signal(name=f"pick{s}")
            m.d.comb += pick.eq(self.shift_sel == s)
            picks.append(pick)

        def moved_value(moved):
            value = moved[-1]
            for s in reversed(range(len(moved) - 1)):
                value = Mux(picks[s], moved[s], value)
            return value

        for k, bank in enumerate(banks):
            loading = Signal(name=f"loading{k}")
            shifting = Signal(name=f"shifting{k}")
            m.d.comb += [
                loading.eq(self.we & (self.wbank == k)),
                shifting.eq(self.shift & (self.rbank == k)),
            ]
            for beat in range(self._beats):
                hit = Signal(name=f"hit{k}_{beat}")
                m.d.comb += hit.eq(loading & (self.wbeat == beat))
                for i in range(self._in_lanes):
                    j = beat * self._in_lanes + i
                    moved = [bank[j + s] if j + s < self._lanes else 0 for s in self._shifts]
                    with m.If(hit):
                        m.d.sync += bank[j].eq(self.wdata[i])
                    with m.Elif(shifting):
                        m.d.sync += bank[j].eq(moved_value(moved))
        for j in range(self._window):
            if j >= self._lanes:
                m.d.comb += self.window[j].eq(0)
                continue
            lane = Signal(signed(ACT_BITS), name=f"lane{j}")
            m.d.comb += lane.eq(Array([banks[0][j], banks[1][j]])[self.rbank])
            if self._b == ACT_BITS:  # bit-parallel: the one-bit slice index is always 0
                m.d.comb += self.window[j].eq(lane)
            else:
                m.d.comb += self.window[j].eq(lane.word_select(self.slice, self._b))
        return m
