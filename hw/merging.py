"""The merging unit: sub-macro partial sums into ``acc_bits`` accumulators.

Sums the partial sums of the P sub-macros per column (they split the reduction of a pass),
weights the sum by the bit position of the cycle's activation slice, and accumulates across
slices and passes in two's-complement ``acc_bits`` registers (FlexCiM, Ramachandran et al.,
ISLPED 2025, section III-B: a merging unit combines the sub-macro outputs).  Every stage before
the accumulator is wide enough not to overflow, so the result is ``wrap(x @ W.T, acc_bits)``
whatever the order of additions (golden/matmul.py).
"""

from __future__ import annotations

import operator

from amaranth.hdl import Array, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import ceil_log2, index_shape, validating


class Merging(wiring.Component):
    """Adds sub-macro partial sums and accumulates bit-slices and passes.

    Parameters
    ----------
    sub_macros : int
        Partial sums per column ``P``.
    cols : int
        Columns.
    psum_bits : int
        Width of a signed partial sum.
    slice_bits : int
        Activation bits per slice ``b``; slice ``s`` weighs ``2**(s*b)``.
    acc_bits : int
        Accumulator width (results wrap).

    Members
    -------
    psums : In, ``sub_macros`` x ``cols`` x signed ``psum_bits``
    valid, slice, first, last : In
        A slice's partial sums are present; its index; it is the first / last of a token.
    result : Out, ``cols`` x signed ``acc_bits``
        The accumulators including this cycle's slice: combinational, meaningful when
        ``done``.
    done : Out
        ``valid & last``: ``result`` is a token's final result (latency 0 from the last slice).
    acc : Out, ``cols`` x signed ``acc_bits``
        The accumulator registers themselves (what ``result`` adds to unless ``first``): for
        observation, e.g. the formal proof's invariant; unconnected in the macro.
    """

    def __init__(self, *, sub_macros: int, cols: int, psum_bits: int, slice_bits: int,
                 acc_bits: int):
        with validating(self):
            self._p = operator.index(sub_macros)
            self._cols = operator.index(cols)
            self._psum_bits = operator.index(psum_bits)
            self._b = operator.index(slice_bits)
            self._acc_bits = operator.index(acc_bits)
            if self._b not in (1, 2, 4, 8):
                raise ValueError(f"slice_bits must be 1, 2, 4 or 8, not {slice_bits!r}")
            if self._p < 1 or self._cols < 1:
                raise ValueError(f"sub_macros and cols must be positive, not {sub_macros}, {cols}")
        self._slices = 8 // self._b
        psum = data.ArrayLayout(signed(self._psum_bits), self._cols)
        super().__init__({
            "psums": In(data.ArrayLayout(psum, self._p)),
            "valid": In(1),
            "slice": In(index_shape(self._slices)),
            "first": In(1),
            "last": In(1),
            "result": Out(data.ArrayLayout(signed(self._acc_bits), self._cols)),
            "done": Out(1),
            "acc": Out(data.ArrayLayout(signed(self._acc_bits), self._cols)),
        })

    def elaborate(self, platform):
        m = Module()
        sum_bits = self._psum_bits + ceil_log2(self._p)
        for c in range(self._cols):
            total = Signal(signed(sum_bits), name=f"total{c}")
            m.d.comb += total.eq(sum(self.psums[p][c] for p in range(self._p)))
            if self._slices == 1:  # bit-parallel: a one-bit slice index that is always 0
                weighted = total
            else:
                weighted = Array([total << (s * self._b) for s in range(self._slices)])[self.slice]
            acc = Signal(signed(self._acc_bits), name=f"acc{c}")
            # Addition modulo 2**acc_bits: truncating the sum is the two's-complement wrap.
            m.d.comb += [self.result[c].eq(Mux(self.first, 0, acc) + weighted),
                         self.acc[c].eq(acc)]
            with m.If(self.valid):
                m.d.sync += acc.eq(self.result[c])
        m.d.comb += self.done.eq(self.valid & self.last)
        return m
