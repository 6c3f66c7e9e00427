"""Run any layer on a FlexCiM macro: tiling, stream packing and partial-sum accumulation.

:func:`run_layer` is the host side shared by every engine that can execute the macro's streams:
:class:`MacroModel` (the beat-level NumPy model below), ``amaranth.sim`` (flexcim.hw.pysim) and
the cocotb driver on Verilator/Icarus (flexcim.sim).  An engine is one callable,

``execute(cmds, weight_beats, act_beats) -> result_beats``

taking three lists of packed beats (Python ints, layouts of :mod:`flexcim.spec.layouts`) in
stream order for a whole layer and returning the result beats in the order the macro emitted
them.  The three input streams are independent: an engine may present them with any gaps, as
long as each stream's order is kept.  The host checks that exactly one result beat per token
of every command came back; it unpacks them and adds the partial results of K chunks with the
``acc_bits`` wrap (bit-exact, see golden/matmul.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from flexcim.golden import perf
from flexcim.golden.matmul import check_activations, wrap
from flexcim.spec import layouts
from flexcim.spec.config import HwConfig
from flexcim.spec.nm import NMTensor

from flexcim.errors import FlexCimError

Execute = Callable[[Sequence[int], Sequence[int], Sequence[int]], Sequence[int]]


@dataclasses.dataclass(frozen=True)
class Streams:
    """The packed input streams of a layer and the schedule they encode."""

    commands: list[perf.Command]
    cmd_beats: list[int]
    weight_beats: list[int]
    act_beats: list[int]


def weight_tile(w: NMTensor, c0: int, c: int, k0: int, k: int) -> NMTensor:
    """Rows ``c0 .. c0+c-1`` and input channels ``k0 .. k0+k-1`` of ``w`` (whole groups)."""
    n, m = w.pattern.n, w.pattern.m
    q0, q1 = k0 // m * n, (k0 + k) // m * n
    return NMTensor(
        values=w.values[c0 : c0 + c, q0:q1],
        indices=w.indices[c0 : c0 + c, q0:q1],
        pattern=w.pattern,
        shape=(c, k),
    )


def layer_streams(cfg: HwConfig, x: np.ndarray, w: NMTensor) -> Streams:
    """Schedule ``y = x @ W.T`` on the macro and pack its three input streams."""
    if not isinstance(w, NMTensor):
        raise FlexCimError(f"weight must be an NMTensor, not {type(w).__name__}")
    x = check_activations(x, w.in_features)
    cmds = perf.schedule(cfg, w.pattern, x.shape[0], w.in_features, w.out_features)
    cmd_beats, weight_beats, act_beats = [], [], []
    for cmd in cmds:
        cmd_beats.append(layouts.pack_cmd(cfg, cmd.pattern, cmd.k, cmd.tokens, cmd.load_weights))
        if cmd.load_weights:
            weight_beats += layouts.pack_weights(cfg, weight_tile(w, cmd.c0, cmd.c, cmd.k0, cmd.k))
        act_beats += layouts.pack_act(cfg, x[cmd.t0 : cmd.t0 + cmd.tokens, cmd.k0 : cmd.k0 + cmd.k])
    return Streams(cmds, cmd_beats, weight_beats, act_beats)


def collect(cfg: HwConfig, cmds: list[perf.Command], result_beats, tokens: int, c: int):
    """Add the per-command result beats into ``y`` ``[tokens, c]`` with the ``acc_bits`` wrap."""
    result_beats = list(result_beats)
    expected = sum(cmd.tokens for cmd in cmds)
    if len(result_beats) != expected:
        raise FlexCimError(
            f"the macro returned {len(result_beats)} result beats; the schedule expects {expected}"
        )
    y = np.zeros((tokens, c), dtype=np.int64)
    parts = layouts.unpack_result(cfg, result_beats).astype(np.int64)
    at = 0
    for cmd in cmds:
        part = parts[at : at + cmd.tokens, : cmd.c]
        if np.any(parts[at : at + cmd.tokens, cmd.c :]):
            raise FlexCimError(
                f"the macro returned non-zero results in unused columns {cmd.c}.. of a tile"
            )
        block = y[cmd.t0 : cmd.t0 + cmd.tokens, cmd.c0 : cmd.c0 + cmd.c]
        block[...] = wrap(block + part, cfg.acc_bits)
        at += cmd.tokens
    return wrap(y, cfg.acc_bits)


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """Result of :func:`run_layer`: ``y`` ``[T, C]`` and the schedule that produced it."""

    y: np.ndarray
    commands: list[perf.Command]


def run_layer(cfg: HwConfig, x: np.ndarray, w: NMTensor, execute: Execute) -> LayerRun:
    """``y = wrap(x @ W.T, acc_bits)`` computed by ``execute`` on a macro configured by ``cfg``.

    Parameters
    ----------
    cfg : HwConfig
        The macro; ``w.pattern`` must be one of ``cfg.patterns``.
    x : ndarray, int8 ``[T, K]``
    w : NMTensor ``[C, K]``
        Any shape: the host tiles it (see :func:`flexcim.golden.perf.schedule`).
    execute : callable
        The engine, ``execute(cmd_beats, weight_beats, act_beats) -> result_beats``.
    """
    return run_layers(cfg, [(x, w)], execute)[0]


def run_layers(cfg: HwConfig, layers, execute: Execute) -> list[LayerRun]:
    """Several layers ``[(x, w), ...]`` back to back in one ``execute`` call (patterns may
    differ from layer to layer: the macro switches pattern per command)."""
    streams = [layer_streams(cfg, x, w) for x, w in layers]
    results = list(
        execute(
            [b for s in streams for b in s.cmd_beats],
            [b for s in streams for b in s.weight_beats],
            [b for s in streams for b in s.act_beats],
        )
    )
    expected = sum(cmd.tokens for s in streams for cmd in s.commands)
    if len(results) != expected:
        raise FlexCimError(
            f"the macro returned {len(results)} result beats; the schedule expects {expected}"
        )
    runs, at = [], 0
    for (x, w), s in zip(layers, streams, strict=True):
        n = sum(cmd.tokens for cmd in s.commands)
        y = collect(cfg, s.commands, results[at : at + n], x.shape[0], w.out_features)
        runs.append(LayerRun(y=y, commands=s.commands))
        at += n
    return runs


class MacroModel:
    """Beat-level NumPy model of the macro: an ``execute`` engine for :func:`run_layer`.

    It decodes the streams as the hardware does: row word ``q`` of a command (beat ``q div
    weight_port_rows``) goes to cell row ``r = q mod rows_total``, word ``t = q div
    rows_total``; in pass ``t`` row ``r`` sees
    the M activations from ``t*pass_width + (r div N)*M`` (distribution unit) and each cell
    picks the one its index names, ``index mod M``: the index bits at and above ``log2 M`` are
    ignored, as the RTL ignores them (so storage need not hold them).  Commands the hardware
    rejects (pattern code not configured, ``k`` outside ``1..max_k_for``, ``tokens == 0``) are
    dropped without consuming data, as the RTL does, and counted in :attr:`rejected`.
    """

    def __init__(self, cfg: HwConfig):
        self.cfg = cfg
        self.rejected = 0
        self._values = np.zeros((0, cfg.cols), dtype=np.int64)
        self._indices = np.zeros((0, cfg.cols), dtype=np.int64)

    def execute(self, cmd_beats, weight_beats, act_beats) -> list[int]:
        cfg = self.cfg
        weight_beats, act_beats = list(weight_beats), list(act_beats)
        results = []
        for beat in cmd_beats:
            f = layouts.unpack_cmd(cfg, beat)
            if not layouts.command_runs(cfg, f):
                self.rejected += 1
                continue
            pattern, k, tokens = cfg.patterns[f["pattern"]], f["k"], f["tokens"]
            passes, rows = cfg.passes(pattern, k), cfg.rows_total
            if f["load_weights"]:
                nb = cfg.weight_beats(pattern, k)
                beats, weight_beats = weight_beats[:nb], weight_beats[nb:]
                if len(beats) < nb:
                    raise FlexCimError("the weight stream ended inside a command's weight load")
                values, indices = layouts.unpack_weights(cfg, beats)
                self._values, self._indices = values.astype(np.int64), indices.astype(np.int64)
            if len(self._values) < passes * rows:
                raise FlexCimError("a command without load_weights needs a previous weight load")
            per_token = perf.act_beats(cfg, k)
            need = tokens * per_token
            beats, act_beats = act_beats[:need], act_beats[need:]
            if len(beats) < need:
                raise FlexCimError("the activation stream ended inside a command")
            acts = layouts.unpack_act(cfg, beats).astype(np.int64).reshape(tokens, -1)
            pass_width = cfg.pass_width(pattern)
            window = np.zeros((tokens, max(passes * pass_width, acts.shape[1])), dtype=np.int64)
            window[:, : acts.shape[1]] = acts
            q = np.arange(passes * rows)
            t, r = q // rows, q % rows
            base = t * pass_width + (r // pattern.n) * pattern.m  # [Q]
            # The weight port forces the index bits at and above log2(M) on every word it
            # writes and the cells decode only the bits below (hw/array.py): a cell selects
            # lane ``index mod M`` whatever the upper bits carry (1:1: lane 0).
            lanes = self._indices[: passes * rows] & (pattern.m - 1)
            values = self._values[: passes * rows]
            pos = base[:, None] + lanes  # [Q, C]
            y = np.einsum("tqc,qc->tc", window[:, pos], values)
            results += layouts.pack_result(cfg, wrap(y, cfg.acc_bits))
        return results
