"""The Python API of flow/: load, plan, prune, measure (what ``make demo`` and the CLI call).

Typical use::

    from flexcim.flow import pipeline as fp
    s = fp.load()                                  # bundled SmolLM2 + Austen text
    calib = fp.calibration_windows(s, count=16)
    plan = fp.make_plan(s.model, calib, fp.SelectConfig(method="flow", target=0.5))
    fp.apply_plan(s.model, plan, calib, metric="wanda")
    ppl = fp.evaluate(s, count=16)                 # held-out Pride and Prejudice
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import time

import torch
from flexcim.flow import calib, prune
from flexcim.flow.eval import perplexity
from flexcim.flow.model import (
    LoadedModel,
    decoder_blocks,
    linear_layers,
    lm_head,
    load_model,
    untie_lm_head,
)
from flexcim.flow.select import Plan, SelectConfig, select
from flexcim.flow.text import Corpus, load_corpus, token_windows
from flexcim.spec.nm import NMPattern
from torch import nn

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_dir

log = logging.getLogger("flexcim.flow")

__all__ = ["CALIB_WINDOWS", "Plan", "SPARSEGPT_CALIB_WINDOWS", "SelectConfig", "Session",
           "apply_plan", "calibration_windows", "default_calib_windows", "measure",
           "energy_plan", "export_projection",
           "check_plan", "evaluate", "layer_scores", "load", "make_plan", "save_model"]


@dataclasses.dataclass
class Session:
    """A loaded model and its disjoint calibration/evaluation texts."""

    lm: LoadedModel
    corpus: Corpus

    @property
    def model(self) -> nn.Module:
        return self.lm.model


def load(model: str | os.PathLike | None = None, text: str | os.PathLike | None = None
         ) -> Session:
    """Load a model (default: bundled SmolLM2) and text (default: Austen)."""
    torch.set_grad_enabled(False)
    return Session(lm=load_model(model), corpus=load_corpus(text))


CALIB_WINDOWS = 16
"""Calibration windows (of 128 tokens) by default: Wanda ranks by per-channel input norms, which
2,048 tokens measure well enough (64 windows were not better on validation, docs/flow.md)."""

SPARSEGPT_CALIB_WINDOWS = 64
"""Calibration windows by default when SparseGPT prunes: its update solves a least-squares fit
on each projection's ``X^T X``, and 16 windows are 2,048 positions for the 1,536 inputs of
SmolLM2's ``down_proj``; 64 (8,192 positions) gave 17 % lower validation perplexity at 62.5 %
(docs/flow.md, "More calibration text for SparseGPT")."""


def default_calib_windows(metric: str) -> int:
    """Calibration windows to draw by default for pruning with ``metric``."""
    return SPARSEGPT_CALIB_WINDOWS if metric == "sparsegpt" else CALIB_WINDOWS


def calibration_windows(session: Session, *, count: int = CALIB_WINDOWS, seq_len: int = 128,
                        seed: int = 0) -> torch.Tensor:
    """``count`` seeded windows from the calibration text (a larger ``count`` draws a superset
    of a smaller one's windows: the same seeded permutation, cut later)."""
    return token_windows(session.lm.tokenizer, session.corpus.calibration, seq_len=seq_len,
                         count=count, seed=seed)


def evaluate(session: Session, *, text: str = "held-out", count: int = 16, seq_len: int = 128,
             seed: int = 0, progress: bool = True, quant=None,
             calib: torch.Tensor | None = None, prefill: int | None = None) -> float:
    """Perplexity of the session's model on ``count`` seeded windows of an evaluation text;
    in W8A8 with ``quant`` (:class:`flexcim.flow.quant.W8A8Config`; ``calib``: the windows its
    smoothing is measured on), else in float.  With ``prefill``: of each window's tokens after
    a prompt of its first ``prefill`` (:func:`flexcim.flow.eval.continuation_nll`)."""
    from flexcim.flow.quant import arithmetic

    if text not in session.corpus.evaluation:
        raise FlexCimError(f"evaluation text must be one of {list(session.corpus.evaluation)}, "
                           f"not {text!r}")
    windows = token_windows(session.lm.tokenizer, session.corpus.evaluation[text],
                            seq_len=seq_len, count=count, seed=seed)
    with arithmetic(session.model, quant, calib):
        return perplexity(session.model, windows, progress=progress, desc=f"perplexity {text}",
                          prefill=prefill)


def layer_scores(model: nn.Module, stats: dict[str, calib.LayerStats] | None, metric: str
                 ) -> dict[str, torch.Tensor]:
    """Selection scores of every projection: Wanda (also for SparseGPT) or magnitude."""
    layers = linear_layers(model)
    if metric == "magnitude":
        return {name: prune.magnitude_scores(layer.weight) for name, layer in layers.items()}
    if stats is None:
        raise ValueError("wanda scores need calibration statistics")
    return {name: prune.wanda_scores(layer.weight, stats[name].act_sq_mean)
            for name, layer in layers.items()}


def _check_metric(metric: str) -> None:
    if metric not in prune.METRICS:
        raise FlexCimError(f"metric must be one of {prune.METRICS}, not {metric!r}")


def make_plan(model: nn.Module, windows: torch.Tensor | None, config: SelectConfig, *,
              metric: str = "wanda", stats: dict | None = None, progress: bool = True,
              outliers: list | None = None, sensitivity=None) -> Plan:
    """Calibrate (dense model) and select an N:M per block (per projection for ``auto``).

    ``stats`` reuses a calibration; ``outliers`` (:func:`flexcim.flow.select.all_outliers`)
    reuses the per-block statistics too, and ``sensitivity``
    (:func:`flexcim.flow.auto.measure_sensitivity`) the measurements of ``auto``, so many plans
    cost milliseconds each.
    """
    _check_metric(metric)
    start = time.perf_counter()
    if config.method == "auto":
        from flexcim.flow import auto

        plan = auto.auto_plan(model, windows, config, sensitivity=sensitivity,
                              progress=progress, metric=metric)
        plan.settings["metric"] = metric
        log.info("auto plan: target %.4g, achieved %.4g, %s (%.1f s)", plan.target_sparsity,
                 plan.achieved_sparsity, " ".join(b["pattern"] for b in plan.blocks),
                 time.perf_counter() - start)
        return plan
    if metric != "magnitude" and stats is None and outliers is None:
        if windows is None:
            raise FlexCimError(f"metric {metric!r} needs calibration windows")
        stats = calib.calibrate(model, windows, progress=progress)
    scores = None if outliers is not None else layer_scores(model, stats, metric)
    plan = select(decoder_blocks(model), scores, config, outliers=outliers)
    plan.settings["metric"] = metric
    log.info("%s plan: target %.4g, achieved %.4g, %s (%.1f s)", config.method,
             plan.target_sparsity, plan.achieved_sparsity,
             " ".join(b["pattern"] for b in plan.blocks), time.perf_counter() - start)
    return plan


SEQUENTIAL = {"magnitude": False, "wanda": False, "sparsegpt": True}
"""Whether :func:`apply_plan` calibrates each projection on the already-pruned model (True) or
prunes every projection from the dense model's statistics (False; magnitude needs none), per
metric; measured on the
validation text (docs/flow.md, "Pruning order", 2026-12-04): SparseGPT's uniform 6:16 plan
94.28 sequential inside blocks vs 94.63 block by block vs 99.58 one-shot (its `auto` plan
87.62 / 91.25 / 88.97); Wanda's uniform 6:16 283.3 one-shot vs 321.1 block by block (8:16
97.68 vs 99.34)."""


def _plan_layers(model: nn.Module, plan: Plan) -> tuple[dict[str, nn.Linear], str | None]:
    """The projections ``plan`` may name: the decoder blocks', and the LM head when the plan
    names it (then also its path, else None)."""
    layers = linear_layers(model)
    if set(plan.layers) - set(layers):
        with contextlib.suppress(FlexCimError):  # a model without an nn.Linear head
            path, module = lm_head(model)
            if path in plan.layers:
                layers[path] = module
                return layers, path
    return layers, None


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan, windows: torch.Tensor | None, *,
               metric: str = "wanda", progress: bool = True, last_block: int | None = None,
               stats: dict[str, calib.LayerStats] | None = None) -> None:
    """Prune ``model`` in place to ``plan`` from its statistics on ``windows`` (not for
    magnitude), in the order :data:`SEQUENTIAL` gives the metric: SparseGPT calibrates every
    group of projections on the model pruned before it (the earlier blocks, and the groups of
    its own block that read earlier inputs: q, k, v before o, gate and up before down); Wanda
    prunes every projection one-shot from the dense model's input norms.  ``last_block`` stops
    after that block (export needs no more).  With ``stats`` (from one dense
    :func:`calib.calibrate`; with ``keep_hessians=True`` for SparseGPT) the model is pruned
    one-shot from those statistics, without running it, whatever the metric.

    A plan that names the LM head (``auto`` with ``lm_head``) prunes it too, after the blocks:
    it is untied from the embedding first, and calibrated on the dense model (Wanda) or on the
    pruned blocks' outputs (SparseGPT), with one more pass over ``windows``.
    """
    _check_metric(metric)
    layers, head = _plan_layers(model, plan)
    if head is not None:
        untie_lm_head(model)
    missing = sorted(set(plan.layers) - set(layers))
    if missing:
        raise FlexCimError(f"plan names layer {missing[0]!r}, which this model does not have")
    patterns = {name: NMPattern.parse(p) for name, p in plan.layers.items()}
    for name, pattern in patterns.items():
        if layers[name].in_features % pattern.m:
            raise FlexCimError(f"pattern {pattern}: M={pattern.m} does not divide the input "
                               f"width {layers[name].in_features} of {name}")

    def prune_layer(name: str, stats: calib.LayerStats | None) -> None:
        pattern = patterns.get(name)
        if pattern is None or pattern.is_dense:
            return
        weight = layers[name].weight
        weight.copy_(prune.prune_weight(
            weight, metric, n_keep=pattern.n, m=pattern.m,
            act_sq_mean=stats.act_sq_mean if metric == "wanda" else None,
            hessian=stats.hessian if metric == "sparsegpt" else None))

    if stats is not None:
        for name, pattern in patterns.items():
            if not pattern.is_dense and name not in stats:
                raise FlexCimError(f"the plan prunes {name!r}, and the statistics given have "
                                   f"none for it")
    elif metric != "magnitude":
        if windows is None:
            raise FlexCimError(f"metric {metric!r} needs calibration windows")
        with_head = head is not None and last_block is None

        def head_stats() -> dict[str, calib.LayerStats]:
            return calib.collect(model, windows, {head: layers[head]},
                                 hessian=metric == "sparsegpt")

        if SEQUENTIAL[metric]:
            def on_block(_block, block_stats) -> bool:
                for name in block_stats:
                    prune_layer(name, block_stats[name])
                return any(not patterns[n].is_dense for n in block_stats if n in patterns)

            calib.calibrate(model, windows, on_block=on_block, hessian=metric == "sparsegpt",
                            progress=progress, last_block=last_block, sequential=True)
            if with_head:  # on the outputs of the pruned blocks, as the blocks were on theirs
                for name, s in head_stats().items():
                    prune_layer(name, s)
            return
        stats = head_stats() if with_head else {}  # one-shot: before any block is pruned
        stats.update(calib.calibrate(model, windows, progress=progress, last_block=last_block))
    for name in (layers if stats is None else stats):
        prune_layer(name, None if stats is None else stats[name])


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raise unless every projection's weight satisfies its pattern in ``plan``."""
    layers, _ = _plan_layers(model, plan)
    for name, text in plan.layers.items():
        pattern = NMPattern.parse(text)
        w = layers[name].weight.detach()
        counts = (w.reshape(-1, pattern.m) != 0).sum(dim=1)
        if int(counts.max()) > pattern.n:
            raise FlexCimError(f"{name} violates its pattern {pattern}: a group keeps "
                               f"{int(counts.max())} weights")


def save_model(session_or_lm, directory: str | os.PathLike, *,
               files: dict[str, str] | None = None) -> pathlib.Path:
    """Write a loadable Hugging Face directory (config, tokenizer, safetensors weights) and
    ``files`` (name to text) in it.  The folder is built under a temporary name and renamed
    into place as a whole: it appears complete or not at all, and a failure keeps the
    previous one."""
    lm = session_or_lm.lm if isinstance(session_or_lm, Session) else session_or_lm
    directory = pathlib.Path(directory)
    if not directory.parent.is_dir():
        raise FlexCimError(f"output directory {str(directory.parent)!r} does not exist")
    with atomic_dir(directory) as tmp:
        lm.model.save_pretrained(str(tmp))
        if lm.tokenizer is not None and hasattr(lm.tokenizer, "save_pretrained"):
            lm.tokenizer.save_pretrained(str(tmp))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return directory


def measure(session: Session, plan: Plan | None, *, calib: torch.Tensor | None = None,
            metric: str = "wanda", act_pattern: str | None = "8:16", eval_windows: int = 16,
            seq_len: int = 128, progress: bool = True, quant=None) -> dict:
    """Perplexity dense, with ``plan`` applied, and with ``act_pattern`` activation pruning on
    top; the model is left pruned to ``plan`` (reload for a dense model).  With ``quant``
    (:class:`flexcim.flow.quant.W8A8Config`) every figure is W8A8 (recorded as ``arith``).

    Returns a JSON-ready dict: ``dense``, ``weights`` (with the plan), ``weights+act``, and
    the relative increases.
    """
    from flexcim.flow import act

    def ev() -> float:
        return evaluate(session, count=eval_windows, seq_len=seq_len, progress=progress,
                        quant=quant, calib=calib)

    record = {"eval_windows": eval_windows, "seq_len": seq_len,
              **(quant.to_dict() if quant is not None else {"arith": "float"}), "dense": ev()}
    if plan is not None:
        apply_plan(session.model, plan, None if metric == "magnitude" else calib,
                   metric=metric, progress=progress)
        check_plan(session.model, plan)
        record.update(weights=ev(), weight_sparsity=plan.achieved_sparsity, metric=metric)
    base = record.get("weights", record["dense"])
    if act_pattern:
        with act.activation_pruning(session.model, act.ActConfig(pattern=act_pattern)):
            record["weights+act" if plan is not None else "act"] = ev()
        record["act_pattern"] = act_pattern
        record["act_increase"] = record.get("weights+act", record.get("act")) / base - 1
    return record


def export_projection(session: Session, plan: Plan, layer: str, path: str | os.PathLike, *,
                      calib: torch.Tensor, metric: str = "wanda", act_tokens: int = 64,
                      act_pattern: str | None = None, quant=None,
                      upstream_w8a8: bool = False) -> object:
    """Write one projection of the (plan-pruned) model as a golden layer file; returns the
    :class:`flexcim.golden.layer_io.SparseLayer`.  The model is pruned up to that block first
    unless the projection already satisfies its pattern (e.g. after :func:`measure`).

    ``quant`` (:class:`flexcim.flow.quant.W8A8Config`, default its defaults) quantizes the
    layer as the W8A8 perplexity runs do, smoothing included (its scales from ``calib``: the
    layer's inputs and weight are then the smoothed ones, as inside a W8A8 run); with
    ``upstream_w8a8`` the activations are captured with every projection before it in W8A8
    too (the inputs it sees in a W8A8 run).
    """
    from flexcim.flow import export
    from flexcim.flow.quant import W8A8Config, arithmetic, smoothing

    quant = quant or W8A8Config()
    if layer not in plan.layers:
        raise FlexCimError(f"plan has no layer {layer!r}")
    pattern = NMPattern.parse(plan.layers[layer])
    index, module = export.find_layer(session.model, layer)
    if not export.satisfies(module.weight.detach().numpy(), pattern):
        apply_plan(session.model, plan, None if metric == "magnitude" else calib, metric=metric,
                   last_block=index)
    # Smoothed once for both the capture and the layer: the upstream W8A8 must not smooth again.
    upstream = dataclasses.replace(quant, smooth=None) if upstream_w8a8 else None
    smooth = "off" if quant.smooth is None else str(quant.smooth)
    with smoothing(session.model, calib, quant.smooth):
        with arithmetic(session.model, upstream):
            x = export.layer_inputs(session.model, module, calib, act_tokens,
                                    whole_windows=True)
        sparse = export.build_layer(
            layer, module.weight, pattern, x,
            act_pattern=NMPattern.parse(act_pattern) if act_pattern else None,
            extra={"model": session.lm.name, "metric": metric, "method": plan.method,
                   "arith": "w8a8" if upstream_w8a8 else "float", "smooth": smooth},
            quant=quant, seq_len=calib.shape[1], tokens=act_tokens,
        )
    export.export_layer(path, sparse)
    return sparse


def energy_plan(model: nn.Module, plan: Plan) -> dict:
    """``plan`` in the form :func:`flexcim.golden.energy.parse_plan` reads.

    One entry per decoder block and pattern (an ``auto`` plan may give a block's projections
    different patterns; the entry is then named ``block[kind,kind]``): the pattern (dense as
    ``1:1``), the ``[out, in]`` shape of each projection, and ``mask_24``: whether every
    projection's *current* weights satisfy 2:4 (call after :func:`apply_plan` so the fixed-2:4
    baseline sees the real masks).
    """
    layers = linear_layers(model)
    entries = []
    for block in plan.blocks:
        groups: dict[str, list[str]] = {}
        for n, p in plan.layers.items():
            if n.startswith(block["name"] + "."):
                pattern = NMPattern.parse(p)
                groups.setdefault("1:1" if pattern.is_dense else str(pattern), []).append(n)
        for pattern, names in groups.items():
            mask_24 = all(
                int((layers[n].weight.detach().reshape(-1, 4) != 0).sum(1).max()) <= 2
                for n in names
            )
            kinds = ",".join(n[len(block["name"]) + 1:].rsplit(".", 1)[-1] for n in names)
            entries.append({
                "name": block["name"] if len(groups) == 1 else f"{block['name']}[{kinds}]",
                "pattern": pattern,
                "linears": {n: [layers[n].out_features, layers[n].in_features] for n in names},
                "mask_24": mask_24,
            })
    head = {n: p for n, p in plan.layers.items() if not any(
        n.startswith(block["name"] + ".") for block in plan.blocks)}
    return {"layers": entries, "method": plan.method,
            "achieved_sparsity": plan.achieved_sparsity, **head}
