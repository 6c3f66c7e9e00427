"""The compute array: cell rows, column adder trees and sub-macros.

A cell holds ``depth`` words of (int8 weight, in-group index) and, in every cycle, multiplies
the word of the current pass by the activation bit-slice its index selects among the M lanes
its row receives from the distribution unit (docs/architecture.md, section 2).  The cells of a
row share a word line, so a row is one memory of ``depth`` words x ``cols`` cells.
"""

from __future__ import annotations

import contextlib
import operator

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from flexcim.spec.config import WEIGHT_BITS
from flexcim.spec.layouts import word_layout


def ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def product_bits(slice_bits: int) -> int:
    """Width of a cell product: int8 weight x (``slice_bits`` + 1)-bit signed slice."""
    return WEIGHT_BITS + slice_bits + 1


def _add_level(level: list) -> list:
    """One level of a balanced adder tree: adjacent pairs summed, an odd last one carried."""
    pairs = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
    return pairs + ([level[-1]] if len(level) % 2 else [])


def balanced_sum(values):
    """Sum of ``values`` as a balanced tree of two-input adders (depth ``ceil_log2(n)``); each
    adder is as wide as its operands plus one bit, so no partial sum overflows."""
    level = list(values)
    while len(level) > 1:
        level = _add_level(level)
    return level[0]


def or_tree(values):
    """Bitwise OR of ``values`` (a balanced tree)."""
    level = list(values)
    while len(level) > 1:
        level = [level[i] | level[i + 1] for i in range(0, len(level) - 1, 2)] + (
            [level[-1]] if len(level) % 2 else [])
    return level[0]


def _any(conditions):
    """One-bit OR of ``conditions`` (0 for none)."""
    conditions = list(conditions)
    return or_tree(conditions) if conditions else Const(0, 1)


@contextlib.contextmanager
def validating(component):
    """Parameter checks of a component: on a ``ValueError`` the half-built component will never
    be elaborated, so Amaranth's "created but never used" warning is silenced."""
    try:
        yield
    except (ValueError, TypeError):
        component._MustUse__silence = True
        raise


def index_shape(count: int):
    """Shape of an index into ``count`` things: ``range(count)`` but never zero bits wide.

    Amaranth writes a zero-width signal as ``[-1:0]``, which Verilator rejects (ASCRANGE); the
    one bit of a one-entry index (``depth=1``, ``sub_macros=1``, bit-parallel slices, ...) is
    constant 0 and synthesis removes it.
    """
    return unsigned(max(1, ceil_log2(count)))


def _positive(name: str, value) -> int:
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def _or_gates(values: list):
    """A balanced OR tree over ``values`` (``len(values)`` a power of 2): its root and the
    outputs of its ``len(values) - 1`` two-input gates."""
    gates, level = [], list(values)
    while len(level) > 1:
        level = [level[i] | level[i + 1] for i in range(0, len(level), 2)]
        gates += level
    return level[0], gates


def _selection(leaves: list, index):
    """The selection network over the gated ``leaves`` (``2**k`` of them, at most one non-zero
    in a correct macro): ``nodes[L]`` carries the leaves ``0 .. 2**L - 1`` and is the chain
    gate ``(nodes[L-1] & ~index[L-1]) | OR(leaves[2**(L-1) : 2**L])`` (an AO21 per bit), so a
    set index bit cuts the chain above its level.  Returns ``nodes`` and every two-input gate's
    output (the OR trees' and the chain's), the gates that switch when a live leaf does."""
    nodes, gates = [leaves[0]], []
    for level in range(1, len(leaves).bit_length()):
        upper, ors = _or_gates(leaves[1 << (level - 1):1 << level])
        nodes.append(Mux(index[level - 1], 0, nodes[-1]) | upper)
        gates += ors + [nodes[-1]]
    return nodes, gates


def _gate(enable, lane):
    """A lane's AND gate: ``lane`` where ``enable`` is set, else 0 (one AND per slice bit)."""
    return Mux(enable, lane, 0)


def _decoder(index, low: list, enable):
    """One-hot decode of ``index & low`` (``low``: the index bits below the tap), enabled by
    ``enable``: a binary tree of AND stages from the most significant bit down, so stages of
    bits the mask holds at 0 are static.  Returns the ``2**k`` enables (bit ``j``: the masked
    index is ``j``)."""
    lines = [enable]
    for bit in reversed(range(len(low))):
        masked = index[bit] & low[bit]
        lines = [x for line in lines for x in (line & ~masked, line & masked)]
    return lines


def tap_level(m: int) -> int:
    """Level of a cell's selection tree that selects among ``m`` lanes: ``ceil(log2(m))``
    (level 0 is lane 0 itself: the 1:1 bypass)."""
    return (m - 1).bit_length()


def tree_taps(patterns) -> tuple[int, ...]:
    """Levels of a cell's selection tree that the ``patterns`` use (:func:`tap_level` of every
    distinct M)."""
    return tuple(sorted({tap_level(p.m) for p in patterns}))


def forced_index_bits(m: int, index_bits: int) -> int:
    """Index bits the weight port sets on every word written for a pattern of group size
    ``m``: the tree levels above ``log2(m)`` then select their upper halves, whose lanes (at
    positions ``>= m``) the distribution unit ties to 0, so those stages never switch."""
    return ((1 << index_bits) - 1) & ~(m - 1)


def _taps(taps, index_bits: int) -> tuple[int, ...]:
    """Normalised tap levels (default: the full tree); ``ValueError`` for a level outside it."""
    levels = (index_bits,) if taps is None else taps
    normal = tuple(sorted({operator.index(t) for t in levels}))
    if not normal or not all(0 <= t <= index_bits for t in normal):
        raise ValueError(f"taps must be tree levels from 0 to {index_bits}, not {taps!r}")
    return normal


class CellRow(wiring.Component):
    """The ``cols`` cells of one row: weight storage, lane selection and multiplication.

    Every cell selects its activation slice with a one-hot AND-OR network (issue 14): its
    index, masked to the bits below the tap of the command's M (``tap``), is decoded to a
    one-hot enable, static while a word is read (it changes at most once per pass); each of
    the ``2**index_bits`` lanes has an AND gate with its enable, so only the enabled lane's gate
    can switch; the gated lanes meet in a chain ``nodes[L] = (nodes[L-1] & ~index[L-1]) |
    OR(lanes 2**(L-1) .. 2**L - 1)`` of balanced OR trees, so a one-hot input switches one gate
    per level on its path: ``1 + tap_level(M)`` gates per slice bit and cycle, against
    ``M - 1`` for a multiplexer tree.  The tap takes the chain at the level of the command's M;
    at level 0 (1:1) the slice is lane 0 itself, bypassing the network, and the decoder is
    disabled.  Words written for a group size M have their index bits above ``log2(M)`` set
    (:func:`forced_index_bits`): those bits cut the chain above the tap, whose OR trees see
    only the lanes the distribution unit ties to 0, so the stages above the tap stay quiet.
    Operand isolation: a cell whose weight is zero holds its multiplier's activation input at
    0, so a cell whose weight or selected slice is zero feeds 0 to its multiplier and its
    adder-tree input.  The tap and the isolation are one AND-OR gate per slice bit.

    Parameters
    ----------
    cols : int
        Cells (columns) in the row.
    depth : int
        Weight words per cell.
    index_bits : int
        Bits of the in-group index per weight (0: dense only, one lane, no selection).
    slice_bits : int
        Activation bits per cycle (1, 2, 4 or 8).
    taps : sequence of int
        Tree levels the supported patterns use (:func:`tree_taps`); default: the full tree.
    activity : bool
        Add the ``active`` and ``faults`` outputs (activity counters' inputs; default off).

    Members
    -------
    we, waddr, wdata : In
        Write word ``wdata`` (:func:`~flexcim.spec.layouts.word_layout`) at ``waddr``.
    raddr : In
        Word of the *next* cycle's pass: the words are read synchronously (an SRAM or block-RAM
        read port with its output register), so the word addressed in cycle ``t`` multiplies
        the lanes of cycle ``t + 1``; a word written in cycle ``t`` is read through (transparent).
    lanes : In, ``2**index_bits`` x unsigned ``slice_bits``
        The activation bit-slices of the row's group, from the distribution unit.
    tap : In, one-hot over ``taps`` (only with more than one tap)
        The tree level of the command's M.
    top : In
        The slices are the most significant ones of their activations: signed.
    products : Out, ``cols`` x signed ``product_bits(slice_bits)``
        Combinational from ``lanes`` (latency 0) and from the word addressed in the previous
        cycle (latency 1 from ``raddr``); one set of products per cycle.
    active : Out, ``cols`` bits (only with ``activity``)
        Bit ``c``: cell ``c``'s weight and its selected activation slice are both non-zero:
        its multiplier and adder-tree input are not isolated (combinational).
    faults : Out, ``cols`` bits (only with ``activity``)
        Bit ``c``: a selection stage that should be quiet carries a non-zero value (a chain
        node above the tap, a lane gate whose enable is off, or a lane at or past the tapped
        M): always 0 in a correct macro.
    selects : Out, ``range(cols * 2**(index_bits + 1) + 1)`` (only with ``activity``)
        The selection gates that can switch in this cycle, over the row's cells: the enabled
        lane gates and the OR and chain gates downstream of them, found by running each
        cell's network on its enables (combinational; ``1 + tap_level(M)`` per cell).
    """

    def __init__(self, *, cols: int, depth: int, index_bits: int, slice_bits: int,
                 taps=None, activity: bool = False):
        with validating(self):
            self._cols = _positive("cols", cols)
            self._depth = _positive("depth", depth)
            self._index_bits = operator.index(index_bits)
            if not 0 <= self._index_bits <= 5:
                raise ValueError(f"index_bits must be from 0 to 5, not {index_bits!r}")
            self._slice_bits = operator.index(slice_bits)
            if self._slice_bits not in (1, 2, 4, 8):
                raise ValueError(f"slice_bits must be 1, 2, 4 or 8, not {slice_bits!r}")
            self._taps = _taps(taps, self._index_bits)
        self._word = word_layout(cols=self._cols, index_bits=self._index_bits)
        self._activity = bool(activity)
        super().__init__({
            "we": In(1),
            "waddr": In(index_shape(self._depth)),
            "wdata": In(self._word),
            "raddr": In(index_shape(self._depth)),
            "lanes": In(data.ArrayLayout(unsigned(self._slice_bits), 1 << self._index_bits)),
            **({"tap": In(len(self._taps))} if len(self._taps) > 1 else {}),
            "top": In(1),
            "products": Out(data.ArrayLayout(signed(product_bits(self._slice_bits)), self._cols)),
            **({"active": Out(self._cols), "faults": Out(self._cols),
                "selects": Out(range(self._cols * (2 << self._index_bits) + 1))}
               if self._activity else {}),
        })

    @property
    def cols(self) -> int:
        return self._cols

    @property
    def taps(self) -> tuple[int, ...]:
        return self._taps

    def elaborate(self, platform):
        m = Module()
        if self._depth == 1:
            # A one-word memory would have a zero-width address ([-1:0], Verilator ASCRANGE).
            word = Signal(self._word, name="word")
            with m.If(self.we):
                m.d.sync += word.eq(self.wdata)
        else:
            m.submodules.words = words = Memory(shape=self._word, depth=self._depth, init=[])
            write = words.write_port()
            # Synchronous read, as an SRAM macro or FPGA block RAM has it: the controller
            # addresses the next cycle's word (Controller.r_pass_next), so no cycle is added.
            read = words.read_port(domain="sync", transparent_for=(write,))
            m.d.comb += [
                write.en.eq(self.we),
                write.addr.eq(self.waddr),
                write.data.eq(self.wdata),
                read.addr.eq(self.raddr),
            ]
            word = read.data
        lanes = [self.lanes[i] for i in range(1 << self._index_bits)]
        tap = self.tap if len(self._taps) > 1 else Const(1, 1)
        # Shared by the row's cells, static during a command: the index bits below the tap.
        low = []
        for bit in range(self._index_bits):
            low.append(Signal(name=f"low{bit}"))
            m.d.comb += low[-1].eq(_any(tap[t] for t, level in enumerate(self._taps)
                                        if level > bit))
        if self._activity:
            # A lane at or past the tapped M must be tied low by the distribution unit.
            loud = Signal(name="loud_lane")
            m.d.comb += loud.eq(_any(
                tap[t] & _any(lanes[i] != 0 for i in range(1 << level, len(lanes)))
                for t, level in enumerate(self._taps)))
            selects = []
        for c in range(self._cols):
            nodes = [lanes[0]]
            if self._index_bits:
                index = word.indices[c]
                enables = Signal(1 << self._index_bits, name=f"sel{c}")
                # Disabled at level 0 (1:1): low[0] is set for every tap above it.
                m.d.comb += enables.eq(Cat(*_decoder(index, low, low[0])))
                gated = [_gate(enables[j], lanes[j]) for j in range(len(lanes))]
                nodes, _ = _selection(gated, index)
            value = word.values[c]
            nonzero = Signal(name=f"wnz{c}")
            m.d.comb += nonzero.eq(value != 0)
            # The tap and the operand isolation: one AND-OR gate per slice bit.
            act = Signal(unsigned(self._slice_bits), name=f"act{c}")
            m.d.comb += act.eq(or_tree(Mux(tap[t] & nonzero, nodes[level] if level else lanes[0],
                                           0) for t, level in enumerate(self._taps)))
            # Lower slices are unsigned digits; the top slice carries the two's-complement sign.
            digit = Signal(signed(self._slice_bits + 1), name=f"digit{c}")
            m.d.comb += digit.eq(Mux(self.top, act.as_signed(), act))
            m.d.comb += self.products[c].eq(value * digit)
            if self._activity:
                above = _any(tap[t] & _any(nodes[L] != 0 for L in range(level + 1, len(nodes)))
                             for t, level in enumerate(self._taps))
                if self._index_bits:
                    leaked = _any(~enables[j] & (gated[j] != 0) for j in range(len(lanes)))
                    # The same network on the enables: a gate is live (can switch) when an
                    # enabled lane reaches it.
                    _, live = _selection([enables[j] for j in range(len(lanes))], index)
                    selects += [enables[j] for j in range(len(lanes))] + live
                else:
                    leaked = Const(0, 1)
                m.d.comb += [self.active[c].eq(act != 0),
                             self.faults[c].eq(above | leaked | loud)]
        if self._activity:
            m.d.comb += self.selects.eq(balanced_sum(selects) if selects else 0)
        return m


def pipeline_stage(inputs: int) -> int:
    """Level of an adder tree of ``inputs`` addends after which ``tree_pipeline`` registers its
    partial sums: after the second level of adders (``ceil(inputs / 4)`` partial sums), or the
    deepest level short of the sum in a smaller tree (0: the addends themselves).

    Measured on ``default`` (18-input trees, docs/architecture.md section 6, 2026-12-05): a
    tree of ripple adders is about as deep as its first adder's carry chain plus a gate per
    further level, so a cut anywhere inside it leaves that chain on the cells' side.  The
    longest path is 39 gates with the register on the products (then the merging unit's
    accumulation is the longest), 40 after level 1, 41 after level 2 and 45 after level 3,
    against 51 without it.  Level 2 holds 5 partial sums per tree (3,782 flip-flops in
    ``default``), 0.60x level 1's and 0.33x the products', for 1-2 more gates: within ABC's
    run-to-run variation of the cells' selection (11-16 gates in these runs)."""
    return min(2, ceil_log2(inputs) - 1) if inputs > 1 else 0


class AdderTree(wiring.Component):
    """Balanced tree summing ``inputs`` signed values.

    Parameters
    ----------
    inputs : int
        Number of addends.
    width : int
        Width of each signed addend; the sum has ``width + ceil_log2(inputs)`` bits, so it
        never overflows.
    stage : int or None
        ``None`` (default): combinational, latency 0.  A level ``L`` from 0 to
        ``ceil_log2(inputs) - 1``: a pipeline register holds the partial sums after ``L``
        levels of adders (0: the addends themselves), so ``sum`` has latency 1 and throughput
        1 per cycle, and the longest path through the tree is cut there.
    """

    def __init__(self, *, inputs: int, width: int, stage: int | None = None):
        with validating(self):
            self._inputs = _positive("inputs", inputs)
            self._width = _positive("width", width)
            if stage is not None:
                stage = operator.index(stage)
                if not 0 <= stage < ceil_log2(self._inputs):
                    raise ValueError(
                        f"stage must be a tree level from 0 to {ceil_log2(self._inputs) - 1} "
                        f"for {self._inputs} inputs, not {stage!r}"
                        if self._inputs > 1 else
                        f"a tree of one input has no level to register, not stage {stage!r}")
            self._stage = stage
        super().__init__({
            "addends": In(data.ArrayLayout(signed(self._width), self._inputs)),
            "sum": Out(signed(self.sum_bits)),
        })

    @property
    def sum_bits(self) -> int:
        return self._width + ceil_log2(self._inputs)

    @property
    def latency(self) -> int:
        """Cycles from ``addends`` to ``sum``: 0, or 1 with a pipeline ``stage``."""
        return 0 if self._stage is None else 1

    def elaborate(self, platform):
        m = Module()
        level = [self.addends[i] for i in range(self._inputs)]
        if self._stage is not None:
            for _ in range(self._stage):
                level = _add_level(level)
            held = []
            for i, value in enumerate(level):
                held.append(Signal(value.shape(), name=f"stage{i}"))
                m.d.sync += held[-1].eq(value)
            level = held
        m.d.comb += self.sum.eq(balanced_sum(level))
        return m


class SubMacro(wiring.Component):
    """``rows`` cell rows and a per-column adder tree, with a registered partial-sum output.

    Parameters
    ----------
    rows, cols, depth, index_bits, slice_bits : int
        As :class:`CellRow`; ``rows`` is the number of rows of this sub-macro.
    taps : sequence of int
        As :class:`CellRow`.
    activity : bool
        Add the ``active`` and ``faults`` outputs (default off: no logic).
    port_rows : int
        Cell rows one write writes (``W``, a divisor of ``rows``; default 1).
    pipeline : bool
        A pipeline register inside every column's adder tree (:func:`pipeline_stage`; needs
        ``rows >= 2``): ``psums`` then has latency 2 (default off: latency 1).

    Members
    -------
    we, wrow, waddr, wdata : In
        Write the ``W`` row words of ``wdata`` (:func:`~flexcim.spec.layouts.word_layout` of
        ``W * cols`` columns, element ``j * cols + c`` for row ``j``) into word ``waddr`` of rows
        ``wrow * W .. wrow * W + W - 1``: one write per cycle, ``W`` rows at once.
    raddr, tap, top : In
        As :class:`CellRow`, shared by all rows (``tap`` only with more than one tap).
    lanes : In, ``rows`` x ``2**index_bits`` x unsigned ``slice_bits``
    psums : Out, ``cols`` x signed ``psum_bits``
        Column sums of the products, registered: latency :attr:`latency` (1, or 2 with
        ``pipeline``), throughput 1 per cycle.
    active : Out, ``range(rows * cols + 1)`` (only with ``activity``)
        How many cells are active (:class:`CellRow`) in this cycle; combinational.
    faults : Out, ``range(rows * cols + 1)`` (only with ``activity``)
        How many cells have a selection fault (:class:`CellRow`) in this cycle.
    selects : Out (only with ``activity``)
        The cells' selection gates that can switch in this cycle (:class:`CellRow`).
    """

    def __init__(self, *, rows: int, cols: int, depth: int, index_bits: int, slice_bits: int,
                 taps=None, activity: bool = False, port_rows: int = 1,
                 pipeline: bool = False):
        with validating(self):
            self._rows = _positive("rows", rows)
            if not isinstance(pipeline, bool):
                raise TypeError(f"pipeline must be True or False, not {pipeline!r}")
            if pipeline and self._rows < 2:
                raise ValueError(f"pipeline needs rows >= 2 (one row has no adder tree), not "
                                 f"rows={rows!r}")
            self._pipeline = pipeline
            self._cols = _positive("cols", cols)
            self._taps = _taps(taps, operator.index(index_bits))
            self._port_rows = _positive("port_rows", port_rows)
            if self._rows % self._port_rows:
                raise ValueError(f"port_rows must divide rows={self._rows}, not {port_rows!r}")
        self._index_bits = operator.index(index_bits)
        self._activity = bool(activity)
        self._row_args = dict(cols=cols, depth=depth, index_bits=index_bits,
                              slice_bits=slice_bits, taps=taps, activity=self._activity)
        self._tree_width = product_bits(slice_bits)
        lane = data.ArrayLayout(unsigned(slice_bits), 1 << index_bits)
        super().__init__({
            "we": In(1),
            "wrow": In(index_shape(self._rows // self._port_rows)),
            "waddr": In(index_shape(depth)),
            "wdata": In(word_layout(cols=self._cols * self._port_rows, index_bits=index_bits)),
            "raddr": In(index_shape(depth)),
            "lanes": In(data.ArrayLayout(lane, self._rows)),
            **({"tap": In(len(self._taps))} if len(self._taps) > 1 else {}),
            "top": In(1),
            "psums": Out(data.ArrayLayout(signed(self.psum_bits), self._cols)),
            **({"active": Out(range(self._rows * self._cols + 1)),
                "faults": Out(range(self._rows * self._cols + 1)),
                "selects": Out(range(self._rows * self._cols * (2 << index_bits) + 1))}
               if self._activity else {}),
        })

    @property
    def psum_bits(self) -> int:
        return self._tree_width + ceil_log2(self._rows)

    @property
    def latency(self) -> int:
        """Cycles from a compute cycle (its lanes, ``top``, the word read the cycle before) to
        its ``psums``: 1, or 2 with ``pipeline``."""
        return 1 + self._pipeline

    def elaborate(self, platform):
        m = Module()
        rows = []
        w, cols, ib = self._port_rows, self._cols, self._index_bits
        bits = self.wdata.as_value()
        for r in range(self._rows):
            row = CellRow(**self._row_args)
            m.submodules[f"row{r}"] = row
            if w == 1:
                word = self.wdata
            else:  # row j of the beat: its values, then its indices (word_layout's bit order)
                j = r % w
                word = bits[j * cols * 8:(j + 1) * cols * 8]
                if ib:
                    base = w * cols * 8
                    word = Cat(word, bits[base + j * cols * ib:base + (j + 1) * cols * ib])
            m.d.comb += [
                row.we.eq(self.we & (self.wrow == r // w)),
                row.waddr.eq(self.waddr),
                row.wdata.eq(word),
                row.raddr.eq(self.raddr),
                row.lanes.eq(self.lanes[r]),
                row.top.eq(self.top),
            ]
            if len(self._taps) > 1:
                m.d.comb += row.tap.eq(self.tap)
            rows.append(row)
        for c in range(self._cols):
            tree = AdderTree(inputs=self._rows, width=self._tree_width,
                             stage=pipeline_stage(self._rows) if self._pipeline else None)
            m.submodules[f"tree{c}"] = tree
            m.d.comb += [tree.addends[r].eq(rows[r].products[c]) for r in range(self._rows)]
            m.d.sync += self.psums[c].eq(tree.sum)
        if self._activity:
            for name in ("active", "faults"):
                m.d.comb += getattr(self, name).eq(balanced_sum(
                    getattr(row, name)[c] for row in rows for c in range(self._cols)))
            m.d.comb += self.selects.eq(balanced_sum(row.selects for row in rows))
        return m


__all__ = ["AdderTree", "CellRow", "SubMacro", "balanced_sum", "ceil_log2", "forced_index_bits",
           "index_shape", "or_tree", "pipeline_stage", "product_bits", "tap_level",
           "tree_taps"]
