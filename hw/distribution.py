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

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import or_tree, validating
from flexcim.spec.config import route
from flexcim.spec.nm import NMPattern


class Distribution(wiring.Component):
    """Pattern-selected routing of window lanes to row lanes (combinational, latency 0).

    Every row lane is a one-hot AND-OR multiplexer over the distinct window lanes the patterns
    route to it (:func:`~flexcim.spec.config.route`), selected by the decoded pattern code: with
    the code fixed for a command, only the selected input's path switches, and a lane past the
    command's M has no selected input, so it stays 0 (the cells' selection relies on that).

    Parameters
    ----------
    rows : int
        Cell rows fed (all sub-macros together).
    patterns : sequence of NMPattern or str
        Supported patterns; pattern code ``i`` selects ``patterns[i]``.  N must divide
        ``rows`` (any N, not only powers of two: 3:8 on 12 rows is 4 groups of 8 lanes).
    slice_bits : int
        Bits per lane (the activation bit-slice of the cycle).
    activity : bool
        Add the ``driven`` output (an activity counter's input; default off: no logic).

    Members
    -------
    code : In
        Pattern code (absent with a single pattern: no mux at all).
    window : In, ``window_lanes`` x unsigned ``slice_bits``
        The pass window; ``window_lanes`` is the widest pass, ``max(rows * M / N)``.
    lanes : Out, ``rows`` x ``max M`` x unsigned ``slice_bits``
        Row ``r``'s lane ``i``; lanes ``i >= M`` of the selected pattern are 0.
    driven : Out, ``rows`` x ``max M`` bits (only with ``activity``)
        Bit ``i`` of row ``r``: lane ``i`` carries a window lane (``i < M``).
    """

    def __init__(self, *, rows: int, patterns, slice_bits: int, activity: bool = False):
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
        self._activity = bool(activity)
        lane = unsigned(self._slice_bits)
        ports = {
            "window": In(data.ArrayLayout(lane, self.window_lanes)),
            "lanes": Out(data.ArrayLayout(data.ArrayLayout(lane, self._m_max), self._rows)),
        }
        if len(self._patterns) > 1:
            ports["code"] = In(range(len(self._patterns)))
        if self._activity:
            ports["driven"] = Out(data.ArrayLayout(unsigned(self._m_max), self._rows))
        super().__init__(ports)

    @property
    def window_lanes(self) -> int:
        """The widest pass: ``rows / N`` groups of M lanes (exact: N divides ``rows``), not
        ``rows * (M // N)``, which is short when N is not a power of two."""
        return max(self._rows // p.n * p.m for p in self._patterns)

    def elaborate(self, platform):
        m = Module()
        picks = []  # picks[k]: pattern k is the command's (one-hot)
        for k in range(len(self._patterns)):
            pick = Signal(name=f"pick{k}")
            m.d.comb += pick.eq(self.code == k if len(self._patterns) > 1 else 1)
            picks.append(pick)
        for r in range(self._rows):
            for i in range(self._m_max):
                sources: dict[int, list[int]] = {}
                for k, p in enumerate(self._patterns):
                    s = route(p, r, i)
                    if s is not None:
                        sources.setdefault(s, []).append(k)
                terms, enables = [], []
                if len(sources) == 1 and all(route(p, r, i) is not None for p in self._patterns):
                    # Every pattern routes the same window lane here: a wire, always driven.
                    (s,) = sources
                    m.d.comb += self.lanes[r][i].eq(self.window[s])
                    if self._activity:
                        m.d.comb += self.driven[r][i].eq(1)
                    continue
                for s, codes in sources.items():
                    enable = or_tree(picks[k] for k in codes)
                    terms.append(Mux(enable, self.window[s], 0))
                    enables.append(enable)
                m.d.comb += self.lanes[r][i].eq(or_tree(terms) if terms else 0)
                if self._activity:
                    m.d.comb += self.driven[r][i].eq(or_tree(enables) if enables else 0)
        return m
