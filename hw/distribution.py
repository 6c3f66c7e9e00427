"""The distribution unit: routes the activation window of a pass to the cell rows.

For pattern N:M, cell row ``r`` (counting across all sub-macros) holds slot ``r mod N`` of
group ``r div N`` of the pass, so it receives window lanes ``(r div N)*M .. (r div N)*M + M-1``
(docs/architecture.md, section 2).  This is fixed wiring per supported pattern, selected by the
command's pattern code: each pattern adds one input to a mux per row lane, which is the
hardware price of supporting it (FlexCiM, Ramachandran et al., ISLPED 2025, section III-B:
a distribution unit between the activation buffer and the sub-macros).
"""

from __future__ import annotations

import operator

from amaranth.hdl import Module, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from flexcim.golden.nm import NMPattern
from flexcim.hw.array import validating


class Distribution(wiring.Component):
    """Pattern-selected routing of window lanes to row lanes (combinational, latency 0).

    Parameters
    ----------
    rows : int
        Cell rows fed (all sub-macros together).
    patterns : sequence of NMPattern or str
        Supported patterns; pattern code ``i`` selects ``patterns[i]``.  N must divide
        ``rows`` (any N, not only powers of two: 3:8 on 12 rows is 4 groups of 8 lanes).
    slice_bits : int
        Bits per lane (the activation bit-slice of the cycle).

    Members
    -------
    code : In
        Pattern code (absent with a single pattern: no mux at all).
    window : In, ``window_lanes`` x unsigned ``slice_bits``
        The pass window; ``window_lanes`` is the widest pass, ``max(rows * M / N)``.
    lanes : Out, ``rows`` x ``max M`` x unsigned ``slice_bits``
        Row ``r``'s lane ``i``; lanes ``i >= M`` of the selected pattern are 0.
    """

    def __init__(self, *, rows: int, patterns, slice_bits: int):
        with validating(self):
            self._rows = operator.index(rows)
            self._patterns = tuple(NMPattern.parse(p) for p in patterns)
            self._slice_bits = operator.index(slice_bits)
            if self._rows < 1:
                raise ValueError(f"rows must be a positive integer, not {rows!r}")
            if not self._patterns:
                raise ValueError("the distribution unit needs at least one pattern")
            for p in self._patterns:
                if self._rows % p.n:
                    raise ValueError(f"pattern {p}: N={p.n} must divide rows={self._rows}")
        self._m_max = max(p.m for p in self._patterns)
        lane = unsigned(self._slice_bits)
        ports = {
            "window": In(data.ArrayLayout(lane, self.window_lanes)),
            "lanes": Out(data.ArrayLayout(data.ArrayLayout(lane, self._m_max), self._rows)),
        }
        if len(self._patterns) > 1:
            ports["code"] = In(range(len(self._patterns)))
        super().__init__(ports)

    @property
    def window_lanes(self) -> int:
        """The widest pass: ``rows / N`` groups of M lanes (exact: N divides ``rows``), not
        ``rows * (M // N)``, which is short when N is not a power of two."""
        return max(self._rows // p.n * p.m for p in self._patterns)

    def _route(self, m, pattern: NMPattern):
        for r in range(self._rows):
            base = (r // pattern.n) * pattern.m
            for i in range(self._m_max):
                source = self.window[base + i] if i < pattern.m else 0
                m.d.comb += self.lanes[r][i].eq(source)

    def elaborate(self, platform):
        m = Module()
        if len(self._patterns) == 1:
            self._route(m, self._patterns[0])
            return m
        # The last pattern is the default branch: the code is always a configured one, and a
        # complete case statement keeps Verilator's CASEINCOMPLETE lint quiet.
        with m.Switch(self.code):
            for code, pattern in enumerate(self._patterns[:-1]):
                with m.Case(code):
                    self._route(m, pattern)
            with m.Default():
                self._route(m, self._patterns[-1])
        return m
