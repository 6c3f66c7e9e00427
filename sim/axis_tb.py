"""The cocotb testbench of the AXI4-Stream wrapper (:class:`flexcim.hw.axis.AxisFlexCiM`).

The same layers and checks as :mod:`flexcim.sim.tb` (the host packing of
:mod:`flexcim.golden.host`, the beat-level golden model, the closed-form
:func:`flexcim.golden.sparse_matmul`, the activity counters against the energy model, the cycle
model), but every stream goes through cocotbext-axi's ``AxiStreamSource``/``AxiStreamSink`` on
the AXI4-Stream ports (``s_axis_cmd``, ``s_axis_weights``, ``s_axis_act``, ``m_axis_result``),
clocked by ``aclk`` and reset by ``aresetn``:

* each command is one frame on ``s_axis_cmd``, its weight beats one frame on ``s_axis_weights``
  and its activation beats one frame on ``s_axis_act`` (``tlast`` where the wrapper documents
  it; the macro ignores it);
* a beat is its packed payload as ``tdata_bytes`` little-endian bytes (payload in the low bits);
* every frame the sink returns must be one command's result beats: that checks ``tlast``.

Cycles are counted the way :mod:`flexcim.sim.tb` counts them (first command handshake to last
result handshake, sampled after the falling edge by :class:`~flexcim.sim.streams.ClockedLoop`),
so ``full_rate`` asserts the wrapper's cycles equal golden.perf's model, which the native top
meets exactly: the wrapper adds no cycle.  ``random_stalls`` uses cocotbext-axi's pause
generators (idle cycles on every source, back-pressure on the sink).

Environment: as :mod:`flexcim.sim.tb` (``FLEXCIM_HW_CONFIG``, ``FLEXCIM_CASE``,
``FLEXCIM_DATA``, ``FLEXCIM_OUT``, ``FLEXCIM_TIMEOUT_NS``).
"""

from __future__ import annotations

import logging
import random

import cocotb
import numpy as np
from flexcim.golden import perf, sparse_matmul
from flexcim.golden.host import MacroModel, collect, layer_streams
from flexcim.hw.axis import axis_ports
from flexcim.sim.runner import CLOCK_PERIOD_NS
from flexcim.sim.streams import ClockedLoop, random_pauses
from flexcim.sim.tb import LayerResult, check_activity, run_full_rate, run_random_stalls, timeout_ns
from flexcim.spec.config import HwConfig
from flexcim.spec.layouts import COUNTER_BITS, unpack_counters
from flexcim.spec.nm import NMTensor


class Handshakes:
    """A passive :class:`~flexcim.sim.streams.ClockedLoop` agent: the cycles of the transfers
    on one AXI4-Stream interface (``tvalid and tready``, sampled with everything settled)."""

    def __init__(self, dut, prefix: str):
        self._valid = getattr(dut, f"{prefix}_tvalid")
        self._ready = getattr(dut, f"{prefix}_tready")
        self.cycles: list[int] = []

    def drive(self, cycle: int) -> None:
        pass

    def sample(self, cycle: int) -> None:
        if self._valid.value and self._ready.value:
            self.cycles.append(cycle)


def command_frames(cfg: HwConfig, commands, beats: list[int], per_command) -> list[list[int]]:
    """Split one stream's beats into per-command frames (``per_command(cmd)`` beats each;
    commands with none get no frame)."""
    frames, at = [], 0
    for cmd in commands:
        n = per_command(cmd)
        if n:
            frames.append(beats[at:at + n])
            at += n
    assert at == len(beats), f"{len(beats)} beats, the commands account for {at}"
    return frames


class AxisTB:
    """Clock, reset, cocotbext-axi sources and sink, and cycle counters around the wrapper.

    Parameters
    ----------
    dut : cocotb handle
        ``AxisFlexCiM(cfg, counters=True)``.
    cfg : HwConfig
    rng : random.Random
        Source of the pause patterns.
    idle, backpressure : float
        Probability of starting a burst of idle cycles on every source, of ``tready`` low on
        the sink (0 = never).
    """

    def __init__(self, dut, cfg: HwConfig, rng: random.Random, *, idle: float = 0.0,
                 backpressure: float = 0.0):
        from cocotbext.axi import AxiStreamBus, AxiStreamSink, AxiStreamSource

        self.dut, self.cfg = dut, cfg
        self.ports = axis_ports(cfg, counters=True)
        sources = {}
        for name, s in self.ports.items():
            bus = AxiStreamBus.from_prefix(dut, s["interface"])
            if s["role"] == "slave":
                sources[name] = AxiStreamSource(bus, dut.aclk, dut.aresetn,
                                                reset_active_level=False)
            else:
                self.sink = AxiStreamSink(bus, dut.aclk, dut.aresetn, reset_active_level=False)
        for agent in (*sources.values(), self.sink):
            agent.log.setLevel(logging.WARNING)  # one INFO line per frame otherwise
        self.sources = sources

        def pauses(p):
            return random_pauses(random.Random(rng.getrandbits(32)), p) if p else None

        for source in sources.values():
            if idle:
                source.set_pause_generator(pauses(idle))
        if backpressure:
            self.sink.set_pause_generator(pauses(backpressure))
        self.cmd_handshakes = Handshakes(dut, self.ports["cmd"]["interface"])
        self.result_handshakes = Handshakes(dut, self.ports["result"]["interface"])
        self.loop = ClockedLoop(dut.aclk, [self.cmd_handshakes, self.result_handshakes])

    async def start(self) -> None:
        from cocotb.clock import Clock
        from cocotb.triggers import ClockCycles, ReadOnly

        Clock(self.dut.aclk, CLOCK_PERIOD_NS, unit="ns").start()
        self.dut.aresetn.value = 0
        await ClockCycles(self.dut.aclk, 4)
        await ReadOnly()
        # In reset no transfer may happen (AXI): the wrapper holds its tvalid and treadys low.
        driven = [s["ports"]["tready" if s["role"] == "slave" else "tvalid"]
                  for s in self.ports.values()]
        high = [p for p in driven if getattr(self.dut, p).value != 0]
        assert not high, f"{', '.join(high)} high while aresetn is low"
        await ClockCycles(self.dut.aclk, 1, rising=False)
        self.dut.aresetn.value = 1
        self.loop.start()

    def _bytes(self, stream: str, beat: int) -> bytes:
        return int(beat).to_bytes(self.ports[stream]["tdata_bytes"], "little")

    def send(self, stream: str, frames: list[list[int]]) -> None:
        """Queue ``frames`` (lists of packed beats) on the stream's source, one packet each."""
        from cocotbext.axi import AxiStreamFrame

        for frame in frames:
            data = b"".join(self._bytes(stream, beat) for beat in frame)
            self.sources[stream].send_nowait(AxiStreamFrame(data))

    async def run_layer(self, x: np.ndarray, w: NMTensor, *, max_cycles: int | None = None
                        ) -> LayerResult:
        """Stream a layer through the wrapper; every result frame checked in order."""
        from cocotb.triggers import with_timeout

        cfg = self.cfg
        streams = layer_streams(cfg, x, w)
        cmds = streams.commands
        expected = MacroModel(cfg).execute(streams.cmd_beats, streams.weight_beats,
                                           streams.act_beats)
        model_cycles = perf.layer_cycles(cfg, cmds)
        if max_cycles is None:
            max_cycles = 20 * model_cycles + 1000
        before = unpack_counters(self.dut.counters.value.to_unsigned())
        self.cmd_handshakes.cycles.clear()
        self.result_handshakes.cycles.clear()
        frames = {
            "cmd": [[beat] for beat in streams.cmd_beats],
            "weights": command_frames(
                cfg, cmds, streams.weight_beats,
                lambda c: c.load_weights and cfg.weight_beats(c.pattern, c.k)),
            "act": command_frames(cfg, cmds, streams.act_beats,
                                  lambda c: c.tokens * -(-c.k // cfg.in_lanes)),
        }
        for name, stream_frames in frames.items():
            self.send(name, stream_frames)
        nbytes = self.ports["result"]["tdata_bytes"]
        beats = []
        for i, cmd in enumerate(cmds):
            frame = await with_timeout(self.sink.recv(), max_cycles * CLOCK_PERIOD_NS, "ns")
            data = bytes(frame.tdata)
            got = len(data) // nbytes
            assert got == cmd.tokens and len(data) % nbytes == 0, (
                f"result frame {i} (command {cmd}) has {len(data)} bytes = {got} beats: "
                f"m_axis_result_tlast should end it after {cmd.tokens} beats"
            )
            frame_beats = [int.from_bytes(data[j:j + nbytes], "little")
                           for j in range(0, len(data), nbytes)]
            at = len(beats)
            for j, (e, g) in enumerate(zip(expected[at:at + got], frame_beats, strict=True)):
                assert e == g, f"result beat {at + j} (frame {i}): expected {e:#x}, got {g:#x}"
            beats += frame_beats
        await self.loop.cycles(8)  # a spurious extra result would show up here
        assert self.sink.empty() and len(self.result_handshakes.cycles) == len(expected), (
            f"{len(self.result_handshakes.cycles)} result beats, expected {len(expected)}")
        assert all(s.empty() and s.idle() for s in self.sources.values()), (
            "the wrapper left input beats unconsumed")
        y = collect(cfg, cmds, beats, x.shape[0], w.out_features)
        reference = sparse_matmul(x, w, acc_bits=cfg.acc_bits)
        if not np.array_equal(y, reference):
            bad = np.argwhere(y != reference)[0]
            raise AssertionError(f"y differs from golden.sparse_matmul at {bad.tolist()}: "
                                 f"{y[tuple(bad)]} != {reference[tuple(bad)]}")
        now = unpack_counters(self.dut.counters.value.to_unsigned())
        measured = {k: (now[k] - before[k]) % (1 << COUNTER_BITS) for k in now}
        return LayerResult(
            y=y,
            cycles=self.result_handshakes.cycles[-1] - self.cmd_handshakes.cycles[0] + 1,
            model_cycles=model_cycles,
            ideal_cycles=perf.ideal_cycles(cfg, cmds),
            commands=len(cmds),
            activity=check_activity(cfg, measured, cmds, x, w),
        )


@cocotb.test(timeout_time=timeout_ns(), timeout_unit="ns")
async def full_rate(dut):
    """No pauses: bit-exact, tlast per command, cycles equal to golden.perf's (= the native
    top's: the wrapper adds none)."""
    await run_full_rate(dut, AxisTB, "AXI4-Stream, full rate")


@cocotb.test(timeout_time=timeout_ns(), timeout_unit="ns")
async def random_stalls(dut):
    """cocotbext-axi pause generators: idle cycles on every source, back-pressure on the sink;
    still bit-exact with tlast per command, never faster than the model."""
    await run_random_stalls(dut, AxisTB)
