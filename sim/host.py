"""Run a layer on the generated RTL: the host driver behind ``flexcim matmul --engine rtl``.

:func:`run_rtl` is the Python API (``make demo`` calls it): it elaborates the FlexCiM top for a
configuration (cached per configuration and simulator), writes the layer to an ``.npz`` in the
build directory, runs the ``full_rate`` test of :mod:`flexcim.sim.tb` on Verilator or Icarus
(the testbench tiles any shape with :mod:`flexcim.golden.host`, streams it through the macro,
checks every result beat against the golden model) and returns ``y`` with the measurements.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import uuid

import numpy as np
from flexcim.golden.matmul import check_activations
from flexcim.sim import runner
from flexcim.sim.regress import (
    TB_MODULE,
    save_layer_data,
    tb_timeout_ns,
    top_verilog,
    toplevel,
)
from flexcim.spec.config import HwConfig, from_args
from flexcim.spec.nm import NMTensor

from flexcim.errors import FlexCimError, WorkError

log = logging.getLogger("flexcim.sim")


@dataclasses.dataclass(frozen=True)
class RtlRun:
    """``y`` of a layer computed by the RTL, and what it cost.

    Members
    -------
    y : ndarray ``[T, C]``
    stats : dict
        ``cycles`` (measured, first command to last result), ``model_cycles``
        (:mod:`flexcim.golden.perf`), ``model_error``, ``ideal_cycles``, ``utilization``
        (compute cycles / measured), ``commands``, and ``simulator``, ``preset``/``config``,
        ``seed``, ``build_s``, ``sim_s`` (wall), ``dense_macs_per_s`` (``T*K*C`` per second of
        simulation wall time).
    """

    y: np.ndarray
    stats: dict


def run_rtl(x: np.ndarray, w: NMTensor, cfg: HwConfig, *, sim: str = "verilator",
            seed: int | None = None, waves: bool | None = None) -> RtlRun:
    """``y = x @ W.T`` on the FlexCiM RTL for ``cfg``, checked bit-exact against golden.

    Parameters
    ----------
    x : ndarray, int8 ``[T, K]``
    w : NMTensor ``[C, K]``
        Any shape; its pattern must be one of ``cfg.patterns``.
    cfg : HwConfig
    sim : {"verilator", "icarus"}
    seed : int, optional
        cocotb seed (logged); the full-rate run has no random stalls, so it only matters for
        reproducing logs.
    waves : bool, optional
        Record a waveform in the build directory (default: the ``WAVES`` variable).

    Raises
    ------
    FlexCimError
        Bad shapes or dtypes, a pattern the macro lacks, a missing simulator, or a failed run
        (a mismatch against golden, cycles outside 2 % of the model, a hang).
    """
    if not isinstance(w, NMTensor):
        raise FlexCimError(f"weight must be an NMTensor, not {type(w).__name__}")
    if not isinstance(cfg, HwConfig):
        raise FlexCimError(f"cfg must be a HwConfig, not {type(cfg).__name__}")
    x = check_activations(x, w.in_features)
    cfg.pattern_code(w.pattern)
    runner.check_simulator(sim)
    if not runner.available(sim):
        raise FlexCimError(f"simulator {sim} is not installed")
    t0 = time.perf_counter()
    source, build_dir = top_verilog(cfg, sim, waves=runner.waves_requested(waves))
    job = build_dir / "host" / uuid.uuid4().hex[:12]
    job.mkdir(parents=True)
    data, out = job / "layer.npz", job / "out.json"
    t, k = x.shape
    c = w.out_features
    keep = False  # this run's scratch folder goes, unless a failed simulation needs its log
    try:
        save_layer_data(data, x, w)
        result = runner.run(
            sim, [source], toplevel(cfg), TB_MODULE, build_dir, testcase="full_rate", seed=seed,
            waves=waves, log_file=job / "sim.log",
            extra_env={
                "FLEXCIM_HW_CONFIG": cfg.to_json(),
                "FLEXCIM_DATA": str(data),
                "FLEXCIM_OUT": str(out),
                "FLEXCIM_TIMEOUT_NS": str(tb_timeout_ns(cfg, w.pattern, t, k, c)),
            },
        )
        stats = json.loads(out.read_text())["full_rate"]
        y = np.load(out.with_suffix(".npy"), allow_pickle=False)
    except runner.BuildError:
        raise  # nothing ran; the message names the build log
    except runner.SimulationError as exc:
        keep = True
        raise WorkError(f"{exc} (log: {job / 'sim.log'})") from None
    finally:
        if not keep:
            shutil.rmtree(job, ignore_errors=True)
    sim_s = result.tests[0].wall_s
    stats.update(
        simulator=sim,
        config=cfg.to_dict(),
        pattern=str(w.pattern),
        shape={"tokens": t, "in_features": k, "out_features": c},
        seed=result.seed,
        build_s=result.build_s,
        sim_s=sim_s,
        wall_s=time.perf_counter() - t0,
        dense_macs_per_s=t * k * c / sim_s if sim_s else None,
    )
    log.info("RTL (%s): %d cycles measured, %d modelled, utilization %.1f %%, %.1f s",
             sim, stats["cycles"], stats["model_cycles"], 100 * stats["utilization"],
             stats["wall_s"])
    return RtlRun(y=y, stats=stats)


def layer_operands(layer, *, tokens: int | None = None, in_features: int | None = None,
                   out_features: int | None = None) -> tuple[np.ndarray, NMTensor]:
    """``(x, w)`` of an exported layer (:class:`flexcim.golden.layer_io.SparseLayer`, e.g. from
    ``flexcim flow export``), optionally its first ``tokens`` rows, ``in_features`` inputs (a
    multiple of the pattern's M) and ``out_features`` outputs: a corner that fits a small
    preset and keeps the real values, pattern and (top-k'd) activations."""
    if layer.act is None:
        raise FlexCimError(f"layer {layer.name or '?'} holds no activations "
                           "(export it with --act-tokens)")
    pattern = layer.weight.pattern
    t_all, (c_all, k_all) = layer.act.shape[0], layer.weight.shape
    t, k, c = (all_ if v is None else v for v, all_ in
               ((tokens, t_all), (in_features, k_all), (out_features, c_all)))
    for what, value, limit in (("tokens", t, t_all), ("in_features", k, k_all),
                               ("out_features", c, c_all)):
        if not 1 <= value <= limit:
            raise FlexCimError(f"{what} must be from 1 to {limit} for this layer, not {value!r}")
    if k % pattern.m:
        raise FlexCimError(f"in_features must be a multiple of M={pattern.m} ({pattern}), "
                           f"not {k!r}")
    w = layer.weight if (c, k) == (c_all, k_all) else NMTensor.compress(
        layer.weight.decompress()[:c, :k], pattern)
    return np.ascontiguousarray(layer.act[:t, :k]), w


def rtl_matmul(x: np.ndarray, weight: NMTensor, args) -> RtlRun:
    """The ``flexcim matmul --engine rtl`` handler: ``args`` carries ``preset`` or ``config``
    (a HwConfig JSON file), ``set`` (overrides), ``sim`` and ``acc_bits`` (None: the config's);
    the caller writes ``y`` and the stats."""
    cfg = from_args(getattr(args, "preset", None), getattr(args, "config", None),
                    getattr(args, "set", None) or ())
    acc_bits = getattr(args, "acc_bits", None)
    if acc_bits is not None and acc_bits != cfg.acc_bits:
        log.info("generating the macro with acc_bits=%d (preset has %d)", acc_bits, cfg.acc_bits)
        cfg = cfg.replace(acc_bits=acc_bits)
    return run_rtl(x, weight, cfg, sim=getattr(args, "sim", None) or "verilator")
