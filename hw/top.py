"""The FlexCiM macro: the top-level component of the generator.

Dataflow (docs/architecture.md, section 2): the controller sequences commands; weights go to
the cell rows of the sub-macros; activations go to the double-buffered activation buffer, whose
window the distribution unit routes to the rows for the command's pattern; the sub-macros'
registered column sums go to the merging unit, whose finished tokens enter a small result FIFO
that decouples the result stream's back-pressure (the controller holds a credit per FIFO entry,
so no result is ever dropped).
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import (
    SubMacro,
    balanced_sum,
    ceil_log2,
    forced_index_bits,
    tap_level,
    tree_taps,
    validating,
)
from flexcim.hw.buffer import ActivationBuffer
from flexcim.hw.controller import Controller, lookup
from flexcim.hw.distribution import Distribution
from flexcim.hw.merging import Merging
from flexcim.spec.config import HwConfig
from flexcim.spec.layouts import (
    act_layout,
    cmd_layout,
    counters_layout,
    result_layout,
    weight_layout,
)

RESULT_FIFO_DEPTH = 4
"""Results the macro can hold while the result stream is stalled; with the pipeline latency
of result_latency (flexcim.spec.timing: 2, or 3 with tree_pipeline) this keeps one-cycle tokens
stall-free when the stream is ready (a credit is out from a token's start until the cycle after
its result leaves: at most result_latency tokens at once)."""


class FlexCiM(wiring.Component):
    """A FlexCiM macro generated from a :class:`~flexcim.spec.config.HwConfig`.

    Parameters
    ----------
    cfg : HwConfig
    counters : bool
        Add the activity counters (the ``counters`` port), for simulation: they check the
        energy model's activity counts (golden/energy.py).  Off by default, so ``flexcim
        verilog`` and ``make synth`` get the macro without them (unchanged area).  Not a
        :class:`HwConfig` field: they change no computed result, cycle or payload layout, and
        the golden models must not depend on them.

    Members
    -------
    cmd : In(stream), weights : In(stream), act : In(stream)
        Input streams (payloads in :mod:`flexcim.spec.layouts`).
    result : Out(stream)
        One beat per token, in order; :func:`~flexcim.spec.timing.result_latency` cycles after
        the token's last compute cycle when the stream is ready.
    error : Out
        Sticky: a command was rejected (pattern code, ``k`` or ``tokens`` out of range).
    counters : Out, :func:`~flexcim.spec.layouts.counters_layout` (only with ``counters``)
        Free-running counts since reset (:data:`~flexcim.spec.layouts.COUNTERS`), registered:
        an event shows up the cycle after it happened.  Read them once after a layer.

    Throughput: one activation bit-slice of every cell per cycle; a token of ``k`` inputs takes
    ``passes * cycles_per_pass`` cycles, overlapped with loading the next (golden/perf.py).
    """

    def __init__(self, cfg: HwConfig, *, counters: bool = False):
        with validating(self):
            if not isinstance(cfg, HwConfig):
                raise TypeError(f"cfg must be a HwConfig, not {type(cfg).__name__}")
            if not isinstance(counters, bool):
                raise TypeError(f"counters must be True or False, not {counters!r}")
        self._cfg = cfg
        self._counters = counters
        super().__init__({
            "cmd": In(stream.Signature(cmd_layout(cfg))),
            "weights": In(stream.Signature(weight_layout(cfg))),
            "act": In(stream.Signature(act_layout(cfg))),
            "result": Out(stream.Signature(result_layout(cfg))),
            "error": Out(1),
            **({"counters": Out(counters_layout())} if counters else {}),
        })

    @property
    def cfg(self) -> HwConfig:
        return self._cfg

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        b = cfg.act_bits_per_cycle
        m.submodules.ctrl = ctrl = Controller(cfg, fifo_depth=RESULT_FIFO_DEPTH)
        wiring.connect(m, wiring.flipped(self.cmd), ctrl.cmd)
        m.d.comb += [
            ctrl.w_valid.eq(self.weights.valid),
            self.weights.ready.eq(ctrl.w_ready),
            ctrl.a_valid.eq(self.act.valid),
            self.act.ready.eq(ctrl.a_ready),
            self.error.eq(ctrl.error),
        ]

        dist = Distribution(rows=cfg.rows_total, patterns=cfg.patterns, slice_bits=b,
                            activity=self._counters)
        m.submodules.distribution = dist
        shifts = sorted({cfg.pass_width(p) for p in cfg.patterns})
        m.submodules.buffer = buf = ActivationBuffer(
            lanes=cfg.max_k, in_lanes=cfg.in_lanes, window_lanes=dist.window_lanes,
            shifts=shifts, slice_bits=b, activity=self._counters,
        )
        m.d.comb += [
            buf.we.eq(ctrl.a_we),
            buf.wbank.eq(ctrl.a_bank),
            buf.wrow.eq(ctrl.a_row),
            buf.wslot.eq(ctrl.a_slot),
            buf.wdata.eq(self.act.payload),
            # The buffer reads synchronously, as the cells do: next cycle's bank and slice.
            buf.rbank.eq(ctrl.r_bank_next),
            buf.slice.eq(ctrl.r_slice_next),
            buf.read.eq(ctrl.fetch),
            buf.shift.eq(ctrl.shift),
            buf.restart.eq(ctrl.last),
            dist.window.eq(buf.window),
        ]
        if len(shifts) > 1:
            lookup(m, ctrl.code, [shifts.index(cfg.pass_width(p)) for p in cfg.patterns],
                   buf.shift_sel)
        if len(cfg.patterns) > 1:
            m.d.comb += dist.code.eq(ctrl.code)

        # The cells' selection: the tree level of the command's M (one-hot), and the index bits
        # above it set on every word written, so those stages stay quiet (hw/array.py).
        taps = tree_taps(cfg.patterns)
        tap = Signal(len(taps))
        lookup(m, ctrl.code if len(cfg.patterns) > 1 else 0,
               [1 << taps.index(tap_level(p.m)) for p in cfg.patterns], tap)
        wdata = Signal(weight_layout(cfg))
        m.d.comb += wdata.values.eq(self.weights.payload.values)
        if cfg.index_bits:
            forced = Signal(cfg.index_bits)
            lookup(m, ctrl.code if len(cfg.patterns) > 1 else 0,
                   [forced_index_bits(p.m, cfg.index_bits) for p in cfg.patterns], forced)
            m.d.comb += [wdata.indices[c].eq(self.weights.payload.indices[c] | forced)
                         for c in range(cfg.cols * cfg.weight_port_rows)]

        subs = []
        for p in range(cfg.sub_macros):
            sub = SubMacro(rows=cfg.rows, cols=cfg.cols, depth=cfg.depth,
                           index_bits=cfg.index_bits, slice_bits=b, taps=taps,
                           activity=self._counters, port_rows=cfg.weight_port_rows,
                           pipeline=bool(cfg.tree_pipeline))
            m.submodules[f"sub{p}"] = sub
            if len(taps) > 1:
                m.d.comb += sub.tap.eq(tap)
            m.d.comb += [
                sub.we.eq(ctrl.w_we & (ctrl.w_sub == p)),
                sub.wrow.eq(ctrl.w_row),
                sub.waddr.eq(ctrl.w_word),
                sub.wdata.eq(wdata),
                sub.raddr.eq(ctrl.r_pass_next),
                sub.top.eq(ctrl.top),
            ]
            m.d.comb += [sub.lanes[r].eq(dist.lanes[p * cfg.rows + r]) for r in range(cfg.rows)]
            subs.append(sub)

        merge = Merging(sub_macros=cfg.sub_macros, cols=cfg.cols, psum_bits=subs[0].psum_bits,
                        slice_bits=b, acc_bits=cfg.acc_bits)
        m.submodules.merging = merge
        # The sub-macros register their sums (and, with tree_pipeline, their trees' partial
        # sums too): the slice's flags follow as many cycles later.
        for name in ("valid", "slice", "first", "last"):
            delayed = {"valid": ctrl.issue, "slice": ctrl.r_slice, "first": ctrl.first,
                       "last": ctrl.last}[name]
            for stage in range(subs[0].latency):
                source = delayed
                delayed = Signal.like(source, name=f"{name}_d" + "d" * stage)
                m.d.sync += delayed.eq(source)
            m.d.comb += getattr(merge, name).eq(delayed)
        m.d.comb += [merge.psums[p].eq(subs[p].psums) for p in range(cfg.sub_macros)]

        m.submodules.results = results = fifo.SyncFIFO(
            width=len(self.result.payload.as_value()), depth=RESULT_FIFO_DEPTH
        )
        m.d.comb += [
            results.w_en.eq(merge.done),
            results.w_data.eq(merge.result),
            self.result.valid.eq(results.r_rdy),
            self.result.payload.eq(results.r_data),
            results.r_en.eq(self.result.ready),
            ctrl.result_taken.eq(self.result.valid & self.result.ready),
        ]
        if self._counters:
            self._count(m, ctrl, subs, dist, buf)
        return m

    def _count(self, m: Module, ctrl: Controller, subs: list[SubMacro],
               dist: Distribution, buf: ActivationBuffer) -> None:
        """The activity counters: one increment per event, from the controller's handshakes and
        compute flags, the cells' isolation enables, the distribution unit's lane enables and
        the buffer's read-port enables (the same signals that move the data, so they cannot
        disagree)."""
        cfg = self._cfg
        active = Signal(range(cfg.cells + 1))
        faults = Signal(range(cfg.cells + 1))
        m.d.comb += [active.eq(balanced_sum(sub.active for sub in subs)),
                     faults.eq(balanced_sum(sub.faults for sub in subs))]
        # Per cycle: the two-input stages on the selected paths of the driven row lanes, and
        # the cells' selection gates that an enabled lane reaches (hw/array.py, CellRow).
        route_bits = Signal(range(cfg.rows_total * cfg.m_max * 8 + 1))
        select = Signal(range(cfg.cells * (2 << cfg.index_bits) + 1))
        m.d.comb += route_bits.eq(balanced_sum(
            dist.driven[r][i] * ceil_log2(cfg.route_alternatives(r, i))
            for r in range(cfg.rows_total) for i in range(cfg.m_max)))
        m.d.comb += select.eq(balanced_sum(sub.selects for sub in subs))
        events = {
            "weight_beats": ctrl.w_we,
            "act_beats": ctrl.a_we,
            "compute_cycles": ctrl.issue,
            "passes": ctrl.shift,
            "mac_cycles": Mux(ctrl.issue, active, 0),
            "route_bits": Mux(ctrl.issue, route_bits, 0),
            "select_muxes": Mux(ctrl.issue, select, 0),
            "quiet_faults": Mux(ctrl.issue, faults, 0),
            "buffer_read_bits": buf.read_words * buf.word_bits,
        }
        for name, increment in events.items():
            counter = self.counters[name]
            m.d.sync += counter.eq(counter + increment)


__all__ = ["RESULT_FIFO_DEPTH", "FlexCiM"]
