"""An optional AXI4-Stream wrapper of the macro (``flexcim verilog --bus axis``).

:class:`AxisFlexCiM` puts AXI4-Stream names, byte-padded data, ``tlast`` and an active-low
reset around :class:`~flexcim.hw.top.FlexCiM`, for integrators whose interconnect, DMA or
verification IP (Vivado's interface inference, cocotbext-axi) expects them.  It adds no cycle:
every stream is wired straight through, and the result stream's ``tlast`` comes from a small
FIFO of the accepted commands' token counts (docs/architecture.md, section "AXI4-Stream
wrapper").

========  =================  ============================================================
stream    AXI4-Stream port   ``tlast``
========  =================  ============================================================
cmd       ``s_axis_cmd``     every beat is a whole packet (one command); ignored
weights   ``s_axis_weights`` the last weight beat of a command; ignored
act       ``s_axis_act``     the last activation beat of a command; ignored
result    ``m_axis_result``  driven: high on the last result beat (last token) of a command
========  =================  ============================================================

``tdata`` is the native payload (:mod:`flexcim.spec.layouts`, same bit offsets) zero-padded to a
whole number of bytes: the payload in the low bits; the wrapper ignores the padding bits of an
input and drives those of the output to 0.  The macro counts the beats of a command itself, so
input ``tlast`` carries no information it needs: it is accepted and ignored (a master that
sends one packet per command, as DMA engines and cocotbext-axi frames do, is what the column
above describes).
"""

from __future__ import annotations

from amaranth.hdl import ClockDomain, Module, Mux, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw.array import validating
from flexcim.hw.top import RESULT_FIFO_DEPTH, FlexCiM
from flexcim.spec.config import HwConfig
from flexcim.spec.layouts import counters_layout

from flexcim.errors import FlexCimError

MAX_TDATA_BITS = 4096
"""The widest ``tdata`` accepted: 512 bytes, the largest AXI4-Stream port of Vitis HLS (UG1399,
"AXI4-Stream Interfaces": "the maximum supported port width is 4096 bits") and of AMD's
AXI4-Stream infrastructure IP; a wider stream is refused rather than generated unusable."""

COMMANDS_IN_FLIGHT = RESULT_FIFO_DEPTH + 2
"""Depth of the FIFO of accepted commands' token counts.  A command is outstanding from its
handshake to its last result beat.  The controller takes a command only once the previous one
has computed its last token, and computes a token only with one of ``RESULT_FIFO_DEPTH``
result credits (returned when the result leaves): at most ``RESULT_FIFO_DEPTH`` computed
commands with results waiting plus the one being computed, one entry to spare.  So the FIFO
never holds ``cmd`` back and the wrapper costs no cycle (tests/sim/test_axis_tb.py compares cycle
counts); ``s_axis_cmd_tready`` still waits for room, so ``tlast`` is right regardless."""

TLAST = {
    "cmd": "every beat (a command is one beat); ignored on input",
    "weights": "the last weight beat of a command (load_weights = 1); ignored on input",
    "act": "the last activation beat of a command (tokens * ceil(k / in_lanes) beats); "
           "ignored on input",
    "result": "driven high on the result beat of a command's last token (a command's tokens "
              "results form one packet)",
}
"""What ``tlast`` means on each stream (for the sidecar and the docs)."""


def tdata_bytes(width: int) -> int:
    """Bytes of a ``tdata`` carrying a ``width``-bit payload (zero-padded in the high bits)."""
    return -(-width // 8)


def axis_ports(cfg: HwConfig, counters: bool = False) -> dict[str, dict]:
    """Per stream of the macro: ``{stream: {interface, role, payload_width, tdata_width,
    tdata_bytes, ports, tlast}}`` (``interface`` is the AXI4-Stream prefix, ``s_axis_cmd``,
    ``m_axis_result``; ``role`` is ``slave`` for an input stream, ``master`` for the output).

    Raises
    ------
    FlexCimError
        A stream whose ``tdata`` would be wider than :data:`MAX_TDATA_BITS`.
    """
    from flexcim.hw.interface import streams

    out = {}
    for name, s in streams(cfg, counters).items():
        width = s["width"]
        nbytes = tdata_bytes(width)
        if 8 * nbytes > MAX_TDATA_BITS:
            raise FlexCimError(
                f"--bus axis cannot wrap this configuration: its {name} stream is {width} bits "
                f"({nbytes} bytes of tdata); AXI4-Stream tdata is expected to be at most "
                f"{MAX_TDATA_BITS} bits ({MAX_TDATA_BITS // 8} bytes)")
        prefix = f"{'s' if s['dir'] == 'in' else 'm'}_axis_{name}"
        out[name] = {
            "interface": prefix,
            "role": "slave" if s["dir"] == "in" else "master",
            "payload_width": width,
            "tdata_width": 8 * nbytes,
            "tdata_bytes": nbytes,
            "ports": {p: f"{prefix}_{p}" for p in ("tdata", "tvalid", "tready", "tlast")},
            "tlast": TLAST[name],
        }
    return out


class AxisFlexCiM(wiring.Component):
    """The macro for ``cfg`` with AXI4-Stream ports, ``aclk`` and ``aresetn``.

    Parameters
    ----------
    cfg : HwConfig
    counters : bool
        As for :class:`~flexcim.hw.top.FlexCiM` (the ``counters`` port passed through).

    Members
    -------
    aclk : In(1)
        The clock (rising edge).
    aresetn : In(1)
        Active-low reset, sampled on ``aclk`` (the macro's synchronous reset).  As AXI
        requires, it may be asserted asynchronously but must be released synchronously to
        ``aclk``: every ``tvalid`` and ``tready`` the wrapper drives is forced low while it is
        low (combinationally, so no transfer happens even before the first edge of reset), and
        the macro resets on the first rising edge that samples it low.
    s_axis_<stream>_tdata/tvalid/tready/tlast : for ``cmd``, ``weights``, ``act``
        Slave (input) streams; ``tdata`` is ``8 * ceil(payload / 8)`` bits, payload in the low
        bits, padding ignored; ``tlast`` ignored (:data:`TLAST`).
    m_axis_result_tdata/tvalid/tready/tlast : master (output) stream
        Padding bits 0; ``tlast`` on a command's last result beat.
    error : Out(1)
        The macro's sticky command error.  After a rejected command (dropped by the macro,
        but counted here) the result ``tlast`` is meaningless until reset.
    counters : Out (only with ``counters``)

    Latency and throughput: those of the macro; the wrapper adds no register on any stream.
    ``s_axis_cmd_tready`` also waits for room in the command FIFO
    (:data:`COMMANDS_IN_FLIGHT`), which by construction never fills.

    Raises
    ------
    FlexCimError
        A stream wider than :data:`MAX_TDATA_BITS` (:func:`axis_ports`).
    """

    def __init__(self, cfg: HwConfig, *, counters: bool = False):
        with validating(self):
            # cfg and counters are checked by the FlexCiM whose signature this reads.
            self._axis = axis_ports(cfg, counters)
        self._cfg = cfg
        self._counters = counters
        members = {"aclk": In(1), "aresetn": In(1)}
        for s in self._axis.values():
            inward = In if s["role"] == "slave" else Out
            outward = Out if s["role"] == "slave" else In
            p = s["ports"]
            members.update({p["tdata"]: inward(s["tdata_width"]), p["tvalid"]: inward(1),
                            p["tready"]: outward(1), p["tlast"]: inward(1)})
        members["error"] = Out(1)
        if counters:
            members["counters"] = Out(counters_layout())
        super().__init__(members)

    @property
    def cfg(self) -> HwConfig:
        return self._cfg

    def elaborate(self, platform):
        m = Module()
        # The macro's sync domain, clocked by aclk and reset (synchronously) by aresetn low.
        m.domains.sync = cd = ClockDomain("sync", local=True)
        m.d.comb += [cd.clk.eq(self.aclk), cd.rst.eq(~self.aresetn)]
        live = self.aresetn  # no transfer in either direction while reset is asserted

        m.submodules.core = core = FlexCiM(self._cfg, counters=self._counters)
        # Token counts of accepted commands, oldest first: where each result packet ends.
        m.submodules.commands = commands = fifo.SyncFIFO(
            width=len(core.cmd.payload.tokens), depth=COMMANDS_IN_FLIGHT)
        for name, s in self._axis.items():
            port = {k: getattr(self, v) for k, v in s["ports"].items()}
            native = getattr(core, name)
            width = s["payload_width"]
            if s["role"] == "slave":
                room = commands.w_rdy if name == "cmd" else 1
                m.d.comb += [
                    native.payload.as_value().eq(port["tdata"][:width]),
                    native.valid.eq(port["tvalid"] & live & room),
                    port["tready"].eq(native.ready & live & room),
                ]
            else:
                m.d.comb += [
                    port["tdata"].eq(native.payload.as_value()),
                    port["tvalid"].eq(native.valid & live),
                    native.ready.eq(port["tready"] & live),
                ]
        m.d.comb += [
            commands.w_en.eq(core.cmd.valid & core.cmd.ready),
            commands.w_data.eq(core.cmd.payload.tokens),
        ]
        # The result beat's place in its command's packet.
        result = self._axis["result"]["ports"]
        beat = Signal.like(core.cmd.payload.tokens, name="result_beat")
        last = Signal()
        m.d.comb += [
            last.eq(commands.r_rdy & (beat + 1 == commands.r_data)),
            getattr(self, result["tlast"]).eq(last),
            commands.r_en.eq(core.result.valid & core.result.ready & last),
        ]
        with m.If(core.result.valid & core.result.ready):
            m.d.sync += beat.eq(Mux(last, 0, beat + 1))
        m.d.comb += self.error.eq(core.error)
        if self._counters:
            m.d.comb += self.counters.eq(core.counters)
        return m


__all__ = ["COMMANDS_IN_FLIGHT", "MAX_TDATA_BITS", "TLAST", "AxisFlexCiM", "axis_ports",
           "tdata_bytes"]
