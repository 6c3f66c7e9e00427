"""The cocotb testbench of the FlexCiM top (``flexcim.hw.top.FlexCiM``) and its tests.

:class:`TB` owns the clock, the reset, one :class:`~flexcim.sim.streams.StreamDriver` per input
stream (``cmd``, ``weights``, ``act``), a :class:`~flexcim.sim.streams.StreamMonitor` on
``result``, the golden adapter (the beat-level :class:`flexcim.golden.host.MacroModel` gives the
expected result beats) and an in-order :class:`~flexcim.sim.streams.Scoreboard`.  A layer of any
shape is tiled and packed by :mod:`flexcim.golden.host`; the final ``y`` is also checked against
the closed-form :func:`flexcim.golden.sparse_matmul`, an independent reference.

The top is built with its activity counters (``FlexCiM(cfg, counters=True)``), read once before
and once after a layer: the compute cycles, passes, activation and weight beats must equal the
energy model's counts (:func:`flexcim.golden.energy.layer_events`) and the active cell-cycles
:func:`flexcim.golden.energy.mac_cycles` of the operands, exactly, in every run.

The tests below read their parameters from the environment (set by :mod:`flexcim.sim.regress`,
the pytest runner tests, ``make sim`` and the host driver):

===================  =====================================================================
``FLEXCIM_HW_CONFIG``  the :class:`~flexcim.spec.config.HwConfig` as JSON (required)
``FLEXCIM_CASE``       JSON: ``pattern``, ``tokens``, ``k``, ``c``, optional ``act_pattern``
                       (an N:M top-k applied to the random activations), ``idle`` and
                       ``backpressure`` probabilities of the stalled run
``FLEXCIM_DATA``       instead of a random case: an ``.npz`` with ``x``, ``values``,
                       ``indices``, ``pattern``, ``shape`` (the host driver writes it)
``FLEXCIM_OUT``        where to write a JSON of measurements (and ``y`` next to it, ``.npy``)
``FLEXCIM_TIMEOUT_NS`` simulated-time limit of every test (default 5 ms)
===================  =====================================================================

The seed is cocotb's (``COCOTB_RANDOM_SEED``, logged by cocotb and by the runner).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import cocotb
import numpy as np
from flexcim.golden import energy, perf, sparse_matmul
from flexcim.golden.host import MacroModel, collect, layer_streams
from flexcim.golden.prune import act_topk, nm_prune
from flexcim.sim.runner import CLOCK_PERIOD_NS
from flexcim.sim.streams import (
    ClockedLoop,
    Scoreboard,
    StreamDriver,
    StreamMonitor,
    no_pauses,
    random_pauses,
)
from flexcim.spec.config import HwConfig
from flexcim.spec.nm import NMPattern, NMTensor

from flexcim.fileio import atomic_paths


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What one layer did on the RTL.

    Members
    -------
    y : ndarray ``[T, C]``
    cycles : int
        First command handshake to last result handshake, inclusive.
    model_cycles : int
        :func:`flexcim.golden.perf.layer_cycles` of the same schedule (unstalled streams).
    ideal_cycles : int
        Compute cycles alone: ``cycles`` can at best reach this.
    commands : int
    activity : dict
        The RTL's activity counters over the layer (:data:`flexcim.spec.layouts.COUNTERS`), the
        energy model's estimate of the active cell-cycles from the global non-zero fraction
        of ``x`` (``mac_estimate = compute_cycles * cells * act_density``) and their ratio.
    """

    y: np.ndarray
    cycles: int
    model_cycles: int
    ideal_cycles: int
    commands: int
    activity: dict = dataclasses.field(default_factory=dict)

    @property
    def utilization(self) -> float:
        """Share of the measured cycles in which the cell array computed."""
        return self.ideal_cycles / self.cycles

    def stats(self) -> dict:
        return {
            "cycles": self.cycles,
            "model_cycles": self.model_cycles,
            "model_error": self.cycles / self.model_cycles - 1,
            "ideal_cycles": self.ideal_cycles,
            "utilization": self.utilization,
            "commands": self.commands,
            "activity": self.activity,
        }


def random_layer(cfg: HwConfig, pattern, tokens: int, k: int, c: int, rng: np.random.Generator,
                 act_pattern=None) -> tuple[np.ndarray, NMTensor]:
    """Random int8 activations and an N:M weight, with the int8 extremes present.

    Full-range values (``-128`` included) and a few rows of all-extreme values make the
    accumulators wrap in small presets, which is exactly what has to be bit-exact.
    """
    pattern = NMPattern.parse(pattern)
    x = rng.integers(-128, 128, size=(tokens, k), dtype=np.int8)
    w = rng.integers(-128, 128, size=(c, k), dtype=np.int8)
    x[0, :] = -128
    w[0, :] = -128
    if c > 1:
        w[1, :] = 127
    w = nm_prune(w, pattern)
    if act_pattern is not None:
        x = act_topk(x, act_pattern)
    return x, NMTensor.compress(w, pattern)


def check_activity(cfg: HwConfig, measured: dict[str, int], commands, x: np.ndarray,
                   w: NMTensor) -> dict:
    """Activity counters of a layer against the energy model: the events must equal
    :func:`flexcim.golden.energy.layer_events` and ``mac_cycles``
    :func:`flexcim.golden.energy.mac_cycles`, exactly (AssertionError naming each difference).

    Returns the counts with the model's estimate of the active cell-cycles from the global
    non-zero fraction of ``x`` (``mac_estimate = compute_cycles * cells * act_density``), the
    ratio ``mac_cycles / mac_estimate`` and the exact ``gated_density``.
    """
    expected = {**energy.layer_events(cfg, commands), "mac_cycles": energy.mac_cycles(cfg, x, w)}
    wrong = {k: (measured.get(k), v) for k, v in expected.items() if measured.get(k) != v}
    assert not wrong, f"RTL activity counters differ from the model (got, expected): {wrong}"
    density = float(np.count_nonzero(x)) / x.size
    cell_cycles = measured["compute_cycles"] * cfg.cells
    estimate = cell_cycles * density
    return {
        **measured,
        "act_density": density,
        "mac_estimate": estimate,
        "mac_ratio": measured["mac_cycles"] / estimate if estimate else None,
        "gated_density": measured["mac_cycles"] / cell_cycles,
    }


class TB:
    """Clock, reset, stream agents, golden adapter and scoreboard around one FlexCiM top.

    Parameters
    ----------
    dut : cocotb handle
    cfg : HwConfig
        The configuration the top was elaborated with.
    rng : random.Random
        Source of the pause patterns.
    idle : float
        Probability of starting a burst of idle cycles on every input stream (0 = never).
    backpressure : float
        Probability of starting a burst of ``ready`` low on the result stream.

    A top whose weights come in on another stream is driven by a subclass that sets
    :attr:`WEIGHT_PORT`, :meth:`weight_stream` and :meth:`model_cycles`
    (:mod:`flexcim.sim.packed_tb`).
    """

    WEIGHT_PORT = "weights"
    """The input stream that carries the layer's weights."""

    def __init__(self, dut, cfg: HwConfig, rng: random.Random, *, idle: float = 0.0,
                 backpressure: float = 0.0):
        self.dut, self.cfg = dut, cfg

        def pauses(p):
            return random_pauses(random.Random(rng.getrandbits(32)), p) if p else no_pauses()

        self.cmd = StreamDriver(dut, "cmd", pauses(idle))
        self.weights = StreamDriver(dut, self.WEIGHT_PORT, pauses(idle))
        self.act = StreamDriver(dut, "act", pauses(idle))
        self.board = Scoreboard("result beats", describe=self._describe)
        self.result = StreamMonitor(dut, "result", pauses(backpressure),
                                    callback=self.board.got)
        self.loop = ClockedLoop(dut.clk, [self.cmd, self.weights, self.act, self.result])

    def _describe(self, expected: int, got: int) -> str:
        from flexcim.spec.layouts import unpack_result

        e, g = unpack_result(self.cfg, [expected])[0], unpack_result(self.cfg, [got])[0]
        cols = np.flatnonzero(e != g)
        return f"columns {cols.tolist()} expected {e[cols].tolist()}, got {g[cols].tolist()}"

    async def start(self) -> None:
        from cocotb.clock import Clock
        from cocotb.triggers import ClockCycles

        Clock(self.dut.clk, CLOCK_PERIOD_NS, unit="ns").start()
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 4)
        self.dut.rst.value = 0
        self.loop.start()

    async def run_layer(self, x: np.ndarray, w: NMTensor, *, max_cycles: int | None = None
                        ) -> LayerResult:
        """Stream a whole layer through the macro; scoreboard every result beat in order."""
        cfg = self.cfg
        streams = layer_streams(cfg, x, w)
        expected = MacroModel(cfg).execute(streams.cmd_beats, streams.weight_beats,
                                           streams.act_beats)
        model_cycles = self.model_cycles(streams.commands)
        if max_cycles is None:
            max_cycles = 20 * model_cycles + 1000
        for agent in self.loop.agents:
            agent.mark()
        counters_before = self.counters()
        start = self.result.count
        self.board.expect(expected)
        self.cmd.send(streams.cmd_beats)
        self.weights.send(self.weight_stream(streams))
        self.act.send(streams.act_beats)
        await self.loop.wait_until(lambda: self.result.count - start >= len(expected),
                                   max_cycles=max_cycles, what=f"{len(expected)} result beats")
        assert not (self.cmd.pending or self.weights.pending or self.act.pending), (
            f"the macro left beats unconsumed: cmd {self.cmd.pending}, weights "
            f"{self.weights.pending}, act {self.act.pending}"
        )
        await self.loop.cycles(8)  # a spurious extra result would show up here
        self.board.check()
        beats = self.result.received[start:]
        y = collect(cfg, streams.commands, beats, x.shape[0], w.out_features)
        reference = sparse_matmul(x, w, acc_bits=cfg.acc_bits)
        if not np.array_equal(y, reference):
            bad = np.argwhere(y != reference)[0]
            raise AssertionError(
                f"y differs from golden.sparse_matmul at {bad.tolist()}: "
                f"{y[tuple(bad)]} != {reference[tuple(bad)]}"
            )
        return LayerResult(
            y=y,
            cycles=self.result.last_cycle - self.cmd.first_cycle + 1,
            model_cycles=model_cycles,
            ideal_cycles=perf.ideal_cycles(cfg, streams.commands),
            commands=len(streams.commands),
            activity=self.check_activity(counters_before, streams.commands, x, w),
        )

    def weight_stream(self, streams) -> list[int]:
        """What :attr:`WEIGHT_PORT` gets for the host's streams (``golden.host.layer_streams``):
        the weight beats."""
        return streams.weight_beats

    def model_cycles(self, commands) -> int:
        """The cycles of an unstalled run: :func:`flexcim.golden.perf.layer_cycles`."""
        return perf.layer_cycles(self.cfg, commands)

    def counters(self) -> dict[str, int]:
        """The macro's activity counters now (one read of one port)."""
        from flexcim.spec.layouts import unpack_counters

        return unpack_counters(self.dut.counters.value.to_unsigned())

    def check_activity(self, before: dict[str, int], commands, x: np.ndarray, w: NMTensor
                       ) -> dict:
        """The counters since ``before`` through :func:`check_activity`."""
        from flexcim.spec.layouts import COUNTER_BITS

        now = self.counters()
        measured = {k: (now[k] - before[k]) % (1 << COUNTER_BITS) for k in now}
        return check_activity(self.cfg, measured, commands, x, w)


# ----------------------------------------------------------------------------- cocotb tests


def _env_json(name: str, default=None):
    text = os.environ.get(name)
    return json.loads(text) if text else default


def timeout_ns() -> float:
    return float(os.environ.get("FLEXCIM_TIMEOUT_NS", 5e6))


def case_layer(cfg: HwConfig):
    """The layer of this run: the host's data file, or a random case from FLEXCIM_CASE."""
    path = os.environ.get("FLEXCIM_DATA")
    if path:
        from flexcim.sim.regress import load_layer_data

        return (*load_layer_data(Path(path)), {})
    case = _env_json("FLEXCIM_CASE", {})
    rng = np.random.default_rng(cocotb.RANDOM_SEED)
    pattern = NMPattern.parse(case.get("pattern", "1:1"))
    # Default: two passes (or as many as one command holds), one and a half column tiles.
    k = int(case.get("k", min(2 * cfg.pass_width(pattern), perf.k_chunk(cfg, pattern))))
    c = int(case.get("c", cfg.cols + cfg.cols // 2))
    x, w = random_layer(cfg, pattern, int(case.get("tokens", 3)), k, c, rng,
                        case.get("act_pattern"))
    return x, w, case


def write_out(result: LayerResult, extra: dict) -> None:
    path = os.environ.get("FLEXCIM_OUT")
    if not path:
        return
    out = Path(path)
    records = json.loads(out.read_text()) if out.is_file() else {}
    records.update(extra)
    # the record and its outputs appear together: a record never describes another run's y
    files = [out, out.with_suffix(".npy")] if "full_rate" in extra else [out]
    with atomic_paths(files) as tmps:
        tmps[0].write_text(json.dumps(records, indent=2, sort_keys=True))
        if len(tmps) > 1:
            with open(tmps[1], "wb") as f:
                np.save(f, result.y)


async def run_full_rate(dut, tb_class=None, what: str = "full rate") -> None:
    """No stalls: bit-exact against golden, cycles equal to golden.perf's (every weight port
    and overlap setting: the model is exact, golden/perf.py).  ``tb_class`` drives the ports
    (:class:`TB` for the native top; the AXI4-Stream wrapper's testbench passes its own)."""
    cfg = HwConfig.from_json(os.environ["FLEXCIM_HW_CONFIG"])
    x, w, _ = case_layer(cfg)
    tb = (tb_class or TB)(dut, cfg, random.Random(cocotb.RANDOM_SEED))
    await tb.start()
    result = await tb.run_layer(x, w)
    dut._log.info("%s: %d cycles measured, %d modelled (%+.2f %%), utilization %.1f %%", what,
                  result.cycles, result.model_cycles, 100 * (result.cycles /
                                                          result.model_cycles - 1),
                  100 * result.utilization)
    dut._log.info("activity counters equal the model; active cell-cycles %d, global-density "
                  "estimate %.0f (RTL/estimate %.3f)", result.activity["mac_cycles"],
                  result.activity["mac_estimate"], result.activity["mac_ratio"] or 0)
    write_out(result, {"full_rate": result.stats()})
    assert result.cycles == result.model_cycles, (
        f"{what}: measured {result.cycles} cycles, golden.perf predicts {result.model_cycles}"
    )


async def run_random_stalls(dut, tb_class=None) -> None:
    """Random idle cycles on every input and random back-pressure: still bit-exact, and never
    faster than the model allows."""
    cfg = HwConfig.from_json(os.environ["FLEXCIM_HW_CONFIG"])
    x, w, case = case_layer(cfg)
    tb = (tb_class or TB)(dut, cfg, random.Random(cocotb.RANDOM_SEED + 1),
                          idle=case.get("idle", 0.2), backpressure=case.get("backpressure", 0.2))
    await tb.start()
    result = await tb.run_layer(x, w)
    write_out(result, {"random_stalls": result.stats()})
    assert result.cycles >= result.model_cycles


@cocotb.test(timeout_time=timeout_ns(), timeout_unit="ns")
async def full_rate(dut):
    """No stalls: bit-exact, cycles equal to golden.perf's."""
    await run_full_rate(dut)


@cocotb.test(timeout_time=timeout_ns(), timeout_unit="ns")
async def random_stalls(dut):
    """Random idle cycles and back-pressure: bit-exact, never faster than the model."""
    await run_random_stalls(dut)
