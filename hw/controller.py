"""The controller: commands, weight loading, activation loading and the compute schedule.

Three independent engines share the latched command (docs/architecture.md, section 4):

* the weight loader accepts ``passes * rows_total / W`` weight beats (``W =
  weight_port_rows`` cell rows per beat); row word ``q`` (beat ``q div W``) goes to cell row
  ``q mod rows_total``, word ``q div rows_total``;
* the activation loader fills the two buffer banks alternately, ``ceil(k/in_lanes)`` beats per
  token, whenever the bank it is due to fill is empty (overlapping the weight load);
* the compute sequencer starts a token when its bank is full, the weights are loaded, the
  previous token is done and the result FIFO has room for it (credits), then issues
  ``passes x cycles_per_pass`` slice cycles without a bubble.  With ``weight_overlap`` the
  weights need only be loaded *up to the pass being computed*: a token starts once the word of
  pass 0 is written, and a pass whose word is still loading waits (no cycle is issued) until
  its last beat is in.  The loader only ever writes words the command has not read yet, so no
  second weight bank is needed.

Pass counts come from running positions compared with ``k`` (``pos + pass_width >= k``), not
from dividers.  A command the macro cannot run (pattern code not configured, ``k`` outside
``1..max_k_for``, ``tokens == 0``) is consumed and dropped, and ``error`` is set until reset.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import index_shape
from flexcim.hw.buffer import beats_per_row
from flexcim.spec.config import HwConfig
from flexcim.spec.layouts import cmd_layout


def cases(m: Module, index, count: int):
    """Yield ``0 .. count-1``, each inside ``m.Case(i)`` of a switch on ``index``, the last one
    the ``default`` branch, so the case statement covers every index value (Verilator's
    CASEINCOMPLETE); for one value no switch at all, so a dense-only macro has no zero-width
    code signal (Verilator's ASCRANGE on ``[-1:0]``).  ``index`` must be known to stay below
    ``count`` (the controller latches only valid pattern codes)."""
    if count == 1:
        yield 0
        return
    with m.Switch(index):
        for i in range(count):
            with m.Case(i) if i < count - 1 else m.Default():
                yield i


def lookup(m: Module, index, values, target) -> None:
    """Drive ``target`` with the constant ``values[index]`` (combinational; :func:`cases`)."""
    values = list(values)
    for i in cases(m, index, len(values)):
        m.d.comb += target.eq(values[i])


class Controller(wiring.Component):
    """Sequencer of one FlexCiM macro (takes the whole :class:`HwConfig`).

    Members
    -------
    cmd : In(stream)
        The command stream (:func:`~flexcim.spec.layouts.cmd_layout`).
    w_valid, w_ready : In, Out
        Handshake of the weight stream; ``w_we`` with ``w_sub``, ``w_row``, ``w_word`` address
        the group of ``weight_port_rows`` cell rows (``w_row``: the group in sub-macro
        ``w_sub``) and the word the beat goes to.
    a_valid, a_ready : In, Out
        Handshake of the activation stream; ``a_we``, ``a_bank``, ``a_row``, ``a_slot`` address
        the buffer (beat ``b`` of a token is row ``b div S``, slot ``b mod S``:
        :func:`~flexcim.hw.buffer.beats_per_row`).
    issue, code, r_bank, r_pass, r_slice, top, first, last, shift : Out
        The compute cycle (combinational): bank, pass (weight word), slice and its flags;
        ``shift`` at the last slice of a pass.  ``code`` (the latched pattern code) exists only
        when more than one pattern is configured.
    r_pass_next, r_bank_next, r_slice_next : Out
        ``r_pass``, ``r_bank``, ``r_slice`` of the next cycle (combinational): the addresses of
        the cells' and the activation buffer's synchronous read ports, so the word of a pass
        and its window are there in its first cycle (no added latency).
    fetch : Out
        The activation buffer reads the window at ``r_bank_next`` / ``r_slice_next`` in this
        cycle (its read enable; it holds the window otherwise): once per compute cycle, in the
        cycle before it.  Within a token, every cycle that issues but the last; a token's first
        window in the last cycle of the previous token if its bank is full by then (its last
        beat may be written in that cycle: the read port is transparent), else in the cycle
        its last beat is written (no token runs then).
    result_taken : In
        A result left the result stream (returns a FIFO credit).
    error : Out
        Sticky: a command was rejected.
    """

    def __init__(self, cfg: HwConfig, *, fifo_depth: int):
        if not isinstance(cfg, HwConfig):
            raise TypeError(f"cfg must be a HwConfig, not {type(cfg).__name__}")
        self._cfg = cfg
        self._fifo_depth = fifo_depth
        self._slots = slots = beats_per_row(window_lanes=cfg.window_lanes, in_lanes=cfg.in_lanes,
                                            slice_bits=cfg.act_bits_per_cycle)
        a_rows = -(-(cfg.max_k // cfg.in_lanes) // slots)
        code = {"code": Out(range(len(cfg.patterns)))} if len(cfg.patterns) > 1 else {}
        super().__init__({
            "cmd": In(stream.Signature(cmd_layout(cfg))),
            "w_valid": In(1), "w_ready": Out(1), "w_we": Out(1),
            "w_sub": Out(index_shape(cfg.sub_macros)),
            "w_row": Out(index_shape(cfg.rows // cfg.weight_port_rows)),
            "w_word": Out(index_shape(cfg.depth)),
            "a_valid": In(1), "a_ready": Out(1), "a_we": Out(1),
            "a_bank": Out(1), "a_row": Out(index_shape(a_rows)),
            "a_slot": Out(index_shape(slots)),
            "issue": Out(1), **code, "r_bank": Out(1), "r_bank_next": Out(1),
            "r_pass": Out(index_shape(cfg.depth)), "r_pass_next": Out(index_shape(cfg.depth)),
            "r_slice": Out(index_shape(cfg.cycles_per_pass)),
            "r_slice_next": Out(index_shape(cfg.cycles_per_pass)),
            "top": Out(1), "first": Out(1), "last": Out(1), "shift": Out(1), "fetch": Out(1),
            "result_taken": In(1),
            "error": Out(1),
        })

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        n_pat = len(cfg.patterns)
        code = self.code if n_pat > 1 else 0

        active = Signal()
        k = Signal(range(cfg.max_k + 1))
        tokens = Signal(range(cfg.max_tokens + 1))
        pw = Signal(range(max(cfg.pass_width(p) for p in cfg.patterns) + 1))
        lookup(m, code, [cfg.pass_width(p) for p in cfg.patterns], pw)

        # ---------------------------------------------------------------- commands
        payload = self.cmd.payload
        code_in = payload.pattern if cfg.pattern_bits else 0
        max_k_in = Signal(range(cfg.max_k + 1))
        lookup(m, code_in, [cfg.max_k_for(p) for p in cfg.patterns], max_k_in)
        ok = Signal()
        m.d.comb += ok.eq(
            (code_in < n_pat)
            & (payload.k >= 1)
            & (payload.k <= max_k_in)
            & (payload.tokens >= 1)
        )
        m.d.comb += self.cmd.ready.eq(~active)
        w_loading = Signal()
        a_loading = Signal()
        with m.If(self.cmd.valid & self.cmd.ready):
            with m.If(ok):
                m.d.sync += [
                    active.eq(1),
                    k.eq(payload.k),
                    tokens.eq(payload.tokens),
                    w_loading.eq(payload.load_weights),
                    a_loading.eq(1),
                ]
                if n_pat > 1:
                    m.d.sync += self.code.eq(code_in)
            with m.Else():
                m.d.sync += self.error.eq(1)

        # ---------------------------------------------------------------- weight loader
        w_pos = Signal(range(cfg.max_k + max(cfg.pass_width(p) for p in cfg.patterns) + 1))
        m.d.comb += [
            self.w_ready.eq(w_loading),
            self.w_we.eq(self.w_valid & w_loading),
        ]
        groups = cfg.rows // cfg.weight_port_rows  # beats per sub-macro and word
        with m.If(self.w_we):
            last_row = (self.w_sub == cfg.sub_macros - 1) & (self.w_row == groups - 1)
            with m.If(self.w_row == groups - 1):
                m.d.sync += self.w_row.eq(0)
                with m.If(self.w_sub == cfg.sub_macros - 1):
                    m.d.sync += self.w_sub.eq(0)
                with m.Else():
                    m.d.sync += self.w_sub.eq(self.w_sub + 1)
            with m.Else():
                m.d.sync += self.w_row.eq(self.w_row + 1)
            with m.If(last_row):
                with m.If(w_pos + pw >= k):
                    m.d.sync += [w_loading.eq(0), self.w_word.eq(0), w_pos.eq(0)]
                with m.Else():
                    m.d.sync += [self.w_word.eq(self.w_word + 1), w_pos.eq(w_pos + pw)]

        # ---------------------------------------------------------------- activation loader
        full = Signal(2)
        set_full = Signal(2)
        clear_full = Signal(2)
        a_pos = Signal(range(cfg.max_k + cfg.in_lanes + 1))
        a_tokens = Signal(range(cfg.max_tokens + 1))
        m.d.comb += [
            self.a_ready.eq(a_loading & ~full.bit_select(self.a_bank, 1)),
            self.a_we.eq(self.a_valid & self.a_ready),
        ]
        with m.If(self.a_we):
            with m.If(a_pos + cfg.in_lanes >= k):
                m.d.comb += set_full.bit_select(self.a_bank, 1).eq(1)
                m.d.sync += [
                    a_pos.eq(0),
                    self.a_row.eq(0),
                    self.a_slot.eq(0),
                    self.a_bank.eq(~self.a_bank),
                    a_tokens.eq(a_tokens + 1),
                ]
                with m.If(a_tokens + 1 == tokens):
                    m.d.sync += [a_loading.eq(0), a_tokens.eq(0)]
            with m.Else():
                m.d.sync += a_pos.eq(a_pos + cfg.in_lanes)
                with m.If(self.a_slot == self._slots - 1):
                    m.d.sync += [self.a_slot.eq(0), self.a_row.eq(self.a_row + 1)]
                with m.Else():
                    m.d.sync += self.a_slot.eq(self.a_slot + 1)

        # ---------------------------------------------------------------- compute sequencer
        running = Signal()  # inside a token
        start = Signal()
        c_pos = Signal.like(w_pos)
        c_tokens = Signal(range(cfg.max_tokens + 1))
        credits = Signal(range(self._fifo_depth + 1), init=self._fifo_depth)
        last_slice = self.r_slice == cfg.cycles_per_pass - 1
        # The weights the next compute cycle reads are in: all of them, or with weight_overlap
        # the word of the current pass (r_pass, 0 between tokens).  w_word counts the words
        # completed by earlier cycles' writes; a word completed in this cycle is read through
        # (the read port is transparent) in the next, so no cycle is lost.
        if cfg.weight_overlap:
            word_ok = Signal()
            m.d.comb += word_ok.eq(~w_loading | (self.w_word > self.r_pass))
        else:
            word_ok = ~w_loading
        m.d.comb += [
            start.eq(
                active & ~running & word_ok & full.bit_select(self.r_bank, 1)
                & (credits != 0) & (c_tokens != tokens)
            ),
            # Without overlap no load runs inside a token (word_ok holds while running).
            self.issue.eq(((running & word_ok) if cfg.weight_overlap else running) | start),
            self.top.eq(last_slice),
            self.first.eq(start),
            self.shift.eq(self.issue & last_slice),
            self.last.eq(self.issue & last_slice & (c_pos + pw >= k)),
        ]
        m.d.sync += credits.eq(credits - start + self.result_taken)
        # The pass, slice and bank registers' next values, computed combinationally for the
        # read ports of the cells and the activation buffer.
        m.d.comb += [self.r_pass_next.eq(self.r_pass), self.r_slice_next.eq(self.r_slice),
                     self.r_bank_next.eq(self.r_bank)]
        m.d.sync += [self.r_pass.eq(self.r_pass_next), self.r_slice.eq(self.r_slice_next),
                     self.r_bank.eq(self.r_bank_next)]
        with m.If(self.issue):
            m.d.sync += running.eq(1)
            with m.If(last_slice):
                m.d.comb += [self.r_pass_next.eq(self.r_pass + 1), self.r_slice_next.eq(0)]
                m.d.sync += c_pos.eq(c_pos + pw)
            with m.Else():
                m.d.comb += self.r_slice_next.eq(self.r_slice + 1)
        with m.If(self.last):
            m.d.comb += [clear_full.bit_select(self.r_bank, 1).eq(1), self.r_pass_next.eq(0),
                         self.r_bank_next.eq(~self.r_bank)]
            m.d.sync += [
                running.eq(0),
                c_pos.eq(0),
                c_tokens.eq(c_tokens + 1),
            ]
            with m.If(c_tokens + 1 == tokens):
                m.d.sync += [active.eq(0), c_tokens.eq(0)]
        m.d.sync += full.eq((full | set_full) & ~clear_full)
        # The buffer's read enable (see ``fetch``): a bank is written only while not full and
        # computed on only while full, so its first window, read once it is complete, stays
        # valid until the token starts, and a window is read exactly once per compute cycle.
        ready = Signal(2)
        m.d.comb += ready.eq(full | set_full)
        with m.If(self.last):
            m.d.comb += self.fetch.eq(ready.bit_select(self.r_bank_next, 1))
        with m.Else():
            m.d.comb += self.fetch.eq(self.issue | set_full.bit_select(self.r_bank, 1))
        return m
