"""Run the generated macro in ``amaranth.sim``: an ``execute`` engine for golden/host.py.

:class:`PySim` drives the three input streams from packed beats with optional random gaps,
pulls results with optional random back-pressure, and measures the cycles from the first
command handshake to the last result handshake (comparable with
:func:`flexcim.golden.perf.layer_cycles` when there are no gaps and no back-pressure).
For the fast test tier on small presets; cocotb on Verilator (sim/) is the fast path for
large ones.  With ``packed=True`` the same engine runs :class:`~flexcim.hw.packed.PackedFlexCiM`
(the macro behind the weight unpacker): the weight beats are sent as their packed words
(:func:`flexcim.spec.layouts.pack_compact_stream`).
"""

from __future__ import annotations

import random

from amaranth.hdl import Value
from amaranth.sim import Simulator
from flexcim.hw.top import FlexCiM
from flexcim.spec import layouts
from flexcim.spec.config import HwConfig
from flexcim.spec.timing import result_latency

from flexcim.errors import WorkError


class PySim:
    """``execute(cmd_beats, weight_beats, act_beats) -> result_beats`` on the RTL.

    Parameters
    ----------
    cfg : HwConfig
    in_gap : float
        Probability that an input stream idles a cycle before presenting its next beat.
    out_stall : float
        Probability that the result stream is not ready in a cycle.
    seed : int
        Seed of the gap and stall generator.
    vcd : str, optional
        Write a waveform.
    counters : bool
        Elaborate the macro with its activity counters and read them after each run.
    packed : bool
        Run the packed top (:class:`~flexcim.hw.packed.PackedFlexCiM`) on the packed words of
        the weight beats; with ``counters`` its ``packed_words`` counter joins ``counters``.

    Members
    -------
    cycles : int
        Of the last :meth:`execute`: first command handshake to last result handshake,
        inclusive.
    error : bool
        The macro's sticky ``error`` output at the end of the last run.
    counters : dict of str to int or None
        With ``counters``: the activity counters (:data:`flexcim.spec.layouts.COUNTERS`) at the
        end of the last run (each run elaborates a fresh macro, so they count that run only).
    """

    IDLE_LIMIT = 2000
    """Cycles without any handshake after which a run is declared hung (longer than any
    command's compute or weight load on the presets this engine is meant for)."""

    def __init__(self, cfg: HwConfig, *, in_gap: float = 0.0, out_stall: float = 0.0,
                 seed: int = 0, vcd: str | None = None, counters: bool = False,
                 packed: bool = False):
        self.cfg = cfg
        self.packed = packed
        self.in_gap, self.out_stall = float(in_gap), float(out_stall)
        self.seed, self.vcd = seed, vcd
        self.with_counters = counters
        self.cycles = 0
        self.error = False
        self.counters: dict[str, int] | None = None

    def _expected_results(self, cmd_beats) -> int:
        cfg, total = self.cfg, 0
        for beat in cmd_beats:
            f = layouts.unpack_cmd(cfg, beat)
            if layouts.command_runs(cfg, f):
                total += f["tokens"]
        return total

    def execute(self, cmd_beats, weight_beats, act_beats) -> list[int]:
        cfg = self.cfg
        if self.packed:
            from flexcim.hw.packed import PackedFlexCiM

            weight_beats = layouts.pack_compact_stream(cfg, cmd_beats, weight_beats)
            dut = PackedFlexCiM(cfg, counters=self.with_counters)
            weight_port = dut.packed
        else:
            dut = FlexCiM(cfg, counters=self.with_counters)
            weight_port = dut.weights
        rng = random.Random(self.seed)
        expected = self._expected_results(cmd_beats)
        results: list[int] = []
        handshakes = {"cmd": [], "result": []}
        # A hang (a lost result) must fail, not spin: give up after IDLE_LIMIT cycles without
        # a handshake on any stream.
        state = {"done": False, "active": 0}

        async def drive(ctx, port, beats, log):
            cycle, i = 0, 0
            pending = False
            while i < len(beats) and not state["done"]:
                if not pending and rng.random() >= self.in_gap:
                    pending = True
                    ctx.set(Value.cast(port.payload), beats[i])  # a View or a plain word
                ctx.set(port.valid, pending)
                _, _, ready = await ctx.tick().sample(port.ready)
                if pending and ready:
                    state["active"] = cycle
                    if log is not None:
                        log.append(cycle)
                    pending, i = False, i + 1
                cycle += 1
            ctx.set(port.valid, 0)

        async def monitor(ctx):
            cycle = 0
            drain = 0
            while cycle - state["active"] < self.IDLE_LIMIT:
                ready = rng.random() >= self.out_stall
                ctx.set(dut.result.ready, ready)
                _, _, valid, payload = await ctx.tick().sample(
                    dut.result.valid, dut.result.payload.as_value()
                )
                if valid and ready:
                    state["active"] = cycle
                    results.append(int(payload))
                    handshakes["result"].append(cycle)
                cycle += 1
                if len(results) >= expected:
                    drain += 1  # keep watching: a duplicated result would show up here
                    if drain > 4 * result_latency(self.cfg) + 8:
                        break
            state["done"] = True
            self.error = bool(ctx.get(dut.error))
            if self.with_counters:
                self.counters = layouts.unpack_counters(ctx.get(dut.counters.as_value()))
                if self.packed:
                    self.counters["packed_words"] = ctx.get(dut.packed_words)

        sim = Simulator(dut)
        sim.add_clock(1e-6)
        for port, beats, log in ((dut.cmd, cmd_beats, handshakes["cmd"]),
                                 (weight_port, weight_beats, None), (dut.act, act_beats, None)):

            async def driver(ctx, port=port, beats=beats, log=log):
                await drive(ctx, port, beats, log)

            sim.add_testbench(driver)
        sim.add_testbench(monitor)
        if self.vcd:
            with sim.write_vcd(self.vcd):
                sim.run()
        else:
            sim.run()
        if len(results) < expected:
            raise WorkError(
                f"the macro produced {len(results)} of {expected} results and then nothing for "
                f"{self.IDLE_LIMIT} cycles"
            )
        if handshakes["cmd"] and handshakes["result"]:
            self.cycles = handshakes["result"][-1] - handshakes["cmd"][0] + 1
        else:
            self.cycles = 0
        return results
