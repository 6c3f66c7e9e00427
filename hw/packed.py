"""The macro behind the weight unpacker: packed weight words in (``flexcim verilog --bus packed``).

:class:`PackedFlexCiM` is the top a weight buffer with compact storage feeds: its ``packed``
stream carries the bus words of :func:`flexcim.spec.layouts.pack_compact` (8 value bits per kept
weight and one ``ceil(log2 C(M, N))``-bit code per group of N rows and column, cut into words of
the macro's weight beat width), and :class:`~flexcim.hw.unpack.WeightUnpacker` expands them into
the macro's weight beats.  The host drives one command stream, the macro's own
(:func:`~flexcim.spec.layouts.cmd_layout`): every command the macro will run that loads weights
forks one unpacker command (its pattern code and ``ceil(k / pass_width)`` passes) in the cycle
the top takes it, and reaches the macro through :func:`command_lead` command registers.
So the unpacker starts a command's words ``lead`` cycles before the macro asks for its first
beat, and the macro runs in exactly its own cycles (docs/architecture.md, sections 3 and 8).

Rules of the fork (the host's commands are those :func:`~flexcim.spec.layouts.pack_cmd`
accepts; these only matter for the others):

* a command that does not load weights forks nothing and waits only for a free command
  register;
* a loading command is taken only when the unpacker takes its fork in the same cycle (idle, or
  leaving its previous command's last beat), so the unpacker's commands are the loading
  commands in order;
* a command the macro will drop (pattern code not configured, ``k`` outside
  ``1 .. max_k_for``, ``tokens = 0``: the controller's own test) forks nothing, so the words
  of the next commands still line up; the macro sets ``error`` as usual.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import balanced_sum, validating
from flexcim.hw.controller import cases, lookup
from flexcim.hw.top import FlexCiM
from flexcim.hw.unpack import WeightUnpacker
from flexcim.spec.config import HwConfig
from flexcim.spec.layouts import (
    COUNTER_BITS,
    act_layout,
    cmd_layout,
    compact_bus_bits,
    counters_layout,
    result_layout,
)

from flexcim.errors import FlexCimError

MAX_LEAD = 2
"""The most bus words the first packed beat of a command may take.  The unpacker takes a
command's first word the cycle after the command and its first beat leaves ``1 + words``
cycles after it; the macro takes the next command at the earliest the cycle after its
previous command's last compute cycle, which is at least one cycle after its last weight
beat, when the unpacker takes the next fork.  With a lead of ``words`` command registers the
first beat is there when the macro asks for it as long as ``words - 1`` cycles fit in that
gap: always for 2 words, not for 3 when a pass computes in one cycle."""


def command_lead(cfg: HwConfig) -> int:
    """Command registers between the packed top's ``cmd`` and the macro's: the unpacker's
    :attr:`~flexcim.hw.unpack.WeightUnpacker.first_words` (1 or 2 on every preset), so the
    unpacker starts every command that many cycles before the macro and has its first beat
    when the macro asks for it.

    Raises
    ------
    FlexCimError
        A pattern whose first packed beat takes more than :data:`MAX_LEAD` words (group codes
        much wider than the index field: M = 32 with N = 8 .. 24), for which the packed top
        could not keep the macro's cycles.
    """
    from flexcim.spec.layouts import (
        compact_beat_layout,
        compact_code_bits,
        compact_first_words,
        compact_starts,
    )

    if not isinstance(cfg, HwConfig):
        raise TypeError(f"cfg must be a HwConfig, not {type(cfg).__name__}")
    words = {p: compact_first_words(cfg, p) for p in cfg.patterns}
    for p in cfg.patterns:
        if words[p] > MAX_LEAD:
            first = compact_beat_layout(cfg, p, compact_starts(cfg, p, 0)).size
            raise FlexCimError(
                f"--bus packed cannot build this configuration: the first packed beat of "
                f"pattern {p} is {first} bits ({cfg.cols} group codes of "
                f"{compact_code_bits(cfg, p)} bits), {words[p]} words of "
                f"{compact_bus_bits(cfg)} bits; the packed top allows at most {MAX_LEAD} "
                f"(patterns whose codes fit)")
    return max(words.values())


class PackedFlexCiM(wiring.Component):
    """The macro for ``cfg`` fed by the weight unpacker: packed weight words in, one command
    stream.

    Parameters
    ----------
    cfg : HwConfig
    counters : bool
        The macro's activity counters (``counters``, as on :class:`~flexcim.hw.top.FlexCiM`)
        and ``packed_words``.

    Members
    -------
    cmd : In(stream), :func:`~flexcim.spec.layouts.cmd_layout`
        The macro's commands; a loading one is taken together with its unpacker command
        (module docstring).
    packed : In(stream), :func:`~flexcim.spec.layouts.compact_bus_bits` wide
        Per loading command, in command order, its
        :func:`~flexcim.spec.layouts.compact_words` words of
        :func:`~flexcim.spec.layouts.pack_compact` (the padding of its last word ignored).
    act : In(stream), result : Out(stream), error : Out
        As on the macro.
    counters : Out, :func:`~flexcim.spec.layouts.counters_layout` (only with ``counters``)
        The macro's activity counters.  The ``weight_beats`` it counts are the unpacker's
        output beats.
    packed_words : Out(COUNTER_BITS) (only with ``counters``)
        Packed words taken since reset (wrapping), registered like the macro's counters.

    Latency and throughput: those of the macro plus :attr:`lead` cycles from a command
    handshake on ``cmd`` to the macro's.  With words offered every cycle the unpacker has
    every first beat ready when the macro asks for it and one beat per cycle after, so with
    no stalls a layer takes ``golden.perf.layer_cycles + lead`` cycles from the first ``cmd``
    handshake to the last ``result`` handshake (the cocotb regressions assert it); gaps in the
    words only make it slower.  Registers beside the macro's and the unpacker's:
    ``lead`` command registers and, with ``counters``, the 48-bit word counter.
    """

    def __init__(self, cfg: HwConfig, *, counters: bool = False):
        with validating(self):
            self._lead = command_lead(cfg)  # checks cfg
            if not isinstance(counters, bool):
                raise TypeError(f"counters must be True or False, not {counters!r}")
        self._cfg = cfg
        self._counters = counters
        members = {
            "cmd": In(stream.Signature(cmd_layout(cfg))),
            "packed": In(stream.Signature(compact_bus_bits(cfg))),
            "act": In(stream.Signature(act_layout(cfg))),
            "result": Out(stream.Signature(result_layout(cfg))),
            "error": Out(1),
        }
        if counters:
            members.update(counters=Out(counters_layout()), packed_words=Out(COUNTER_BITS))
        super().__init__(members)

    @property
    def cfg(self) -> HwConfig:
        return self._cfg

    @property
    def lead(self) -> int:
        """:func:`command_lead` of the configuration."""
        return self._lead

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        m.submodules.core = core = FlexCiM(cfg, counters=self._counters)
        m.submodules.unpack = unpack = WeightUnpacker(cfg)
        wiring.connect(m, unpack.weights, core.weights)
        wiring.connect(m, wiring.flipped(self.packed), unpack.packed)
        wiring.connect(m, wiring.flipped(self.act), core.act)
        wiring.connect(m, wiring.flipped(self.result), core.result)
        m.d.comb += self.error.eq(core.error)

        # The command registers: a pipe of `lead` stages, each taking a command when it is
        # empty or handing its own on in the same cycle.
        lead = self._lead
        valid = [Signal(name=f"cmd_valid{i}") for i in range(lead)]
        held = [Signal(cmd_layout(cfg), name=f"cmd{i}") for i in range(lead)]
        room = [Signal(name=f"cmd_room{i}") for i in range(lead)]
        m.d.comb += [core.cmd.valid.eq(valid[-1]), core.cmd.payload.eq(held[-1])]
        for i in range(lead):
            m.d.comb += room[i].eq(~valid[i] | (core.cmd.ready if i == lead - 1
                                                else room[i + 1]))

        # The fork: the command's unpacker command, when the macro will load weights for it.
        payload = self.cmd.payload
        code = payload.pattern if cfg.pattern_bits else 0
        runs = Signal()  # the controller's test: the macro will run the command
        max_k = Signal(range(cfg.max_k + 1))
        lookup(m, code, [cfg.max_k_for(p) for p in cfg.patterns], max_k)
        m.d.comb += runs.eq((code < len(cfg.patterns)) & (payload.k >= 1)
                            & (payload.k <= max_k) & (payload.tokens >= 1))
        fork = Signal()
        m.d.comb += fork.eq(runs & payload.load_weights)
        # ceil(k / pass_width) without a divider: one comparison per further pass.
        passes = unpack.cmd.payload.passes
        for i in cases(m, code, len(cfg.patterns)):
            p = cfg.patterns[i]
            width = cfg.pass_width(p)
            more = [payload.k > j * width for j in range(1, cfg.passes(p, cfg.max_k_for(p)))]
            m.d.comb += passes.eq(1 + balanced_sum(more) if more else 1)
        if cfg.pattern_bits:
            m.d.comb += unpack.cmd.payload.pattern.eq(code)
        m.d.comb += [
            unpack.cmd.valid.eq(self.cmd.valid & room[0] & fork),
            self.cmd.ready.eq(room[0] & (~fork | unpack.cmd.ready)),
        ]
        taken = self.cmd.valid & self.cmd.ready
        for i in range(lead):
            with m.If(room[i]):
                m.d.sync += [valid[i].eq(taken if i == 0 else valid[i - 1]),
                             held[i].eq(payload if i == 0 else held[i - 1])]

        if self._counters:
            m.d.comb += self.counters.eq(core.counters)
            m.d.sync += self.packed_words.eq(
                self.packed_words + (self.packed.valid & self.packed.ready))
        return m


__all__ = ["MAX_LEAD", "PackedFlexCiM", "command_lead"]
