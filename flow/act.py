"""Amber-style N:M activation pruning in prefill (An et al., arXiv 2508.02128).

Training-free: before a selected projection runs, its input activations ``x [.., K]`` keep the
``n`` best-scored entries of every group of ``m`` consecutive input channels (the reduction
dimension, as the FlexCiM macro groups them), the rest are zeroed.  Only prefill is pruned: a
decode call stays dense, i.e. a model call with one token per sequence or one that continues a
non-empty KV cache (:func:`flexcim.flow.model.continues_cache`: a server's one-token steps, or
a window's later tokens scored teacher-forced in one call by
:func:`flexcim.flow.eval.continuation_nll`).

Scores:

* ``abs``: ``|x_j|`` (the NumPy twin is :func:`flexcim.golden.prune.act_topk`);
* ``weight``: ``|x_j| * ||W[:, j]||_2``, the channel's contribution scaled by how strongly the
  layer uses it (Amber Pruner's weight-aware score).

Sensitive layers are skipped: :func:`sensitivity` measures for every projection the relative
output error ``||W (x - topk(x))|| / ||W x||`` on calibration text in one forward pass, and
:func:`skip_most_sensitive` keeps the worst ``budget`` fraction dense.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator

import torch
from flexcim.flow.model import continues_cache, decoder_blocks, linear_layers
from flexcim.flow.prune import nm_mask
from flexcim.spec.nm import NMPattern
from torch import nn

from flexcim.errors import FlexCimError

log = logging.getLogger("flexcim.flow")

SCORES = ("abs", "weight")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_PROJECTIONS = ("q", "down")
"""Pruned by default: what :func:`choose_projections` picked at 8:16 on SmolLM2 with a 5 %
budget on the validation text (34.4 % of the linear MACs; docs/flow.md).  gate and up cost
+22 % and +34 % alone on that model, v and o are worse than q and k per MAC."""

PREFILL_PROJECTIONS = ("q", "gate", "down", "k@0-9", "k@20-29", "v@20-29", "o@0-9", "o@20-29",
                       "up@20-29")
"""Pruned when only the prompt is (Amber Pruner's deployment; ``--prefill-tokens``): what
``flexcim flow act-eval --projections auto --prefill-tokens 64`` chose at 8:16 on SmolLM2
(:func:`choose_projections` in float on the calibration text: a 5 % budget less a 50 % margin,
kinds then thirds of the blocks): 77.1 % of the linear MACs, +4.7 % W8A8 on the test text and
on *Persuasion* (docs/flow.md)."""

ALIASES = {"out_proj": "o", "fc1": "up", "fc2": "down"}
"""OPT-style projection names and their Llama-style kinds (``fc1``/``fc2``: the MLP's input and
output projections, as ``up``/``down`` without a gate)."""


def projection_kind(name: str) -> str:
    """``q``/``k``/``v``/``o``/``gate``/``up``/``down`` from a module path (or its last part);
    Llama/Qwen/Mistral names (``q_proj`` ... ``down_proj``) and OPT's (:data:`ALIASES`)."""
    last = name.rsplit(".", 1)[-1]
    match = re.fullmatch(r"(q|k|v|o|gate|up|down)_proj", last)
    return match[1] if match else ALIASES.get(last, last)


def topk_activations(x: torch.Tensor, pattern: NMPattern, column_norm: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """``x`` with all but the best ``n`` of every ``m`` entries on the last axis zeroed."""
    scores = x.abs() if column_norm is None else x.abs() * column_norm
    return x * nm_mask(scores, n_keep=pattern.n, m=pattern.m).to(x.dtype)


@dataclasses.dataclass(frozen=True)
class ActConfig:
    """Which projections get N:M activation pruning, and how.

    Members
    -------
    pattern : str
        ``n:m`` kept along the input channels (``8:16`` by default).
    score : ``abs`` | ``weight``
    projections : tuple of str
        What to prune: projection kinds (some of :data:`PROJECTIONS`; default
        :data:`DEFAULT_PROJECTIONS`), each for every decoder block, or ``kind@a-b`` for blocks
        ``a`` to ``b`` only (0-based, inclusive; e.g. ``gate@20-29``).
    skip : tuple of str
        Full module paths kept dense anyway (e.g. from :func:`skip_most_sensitive`).
    """

    pattern: str = "8:16"
    score: str = "abs"
    projections: tuple[str, ...] = DEFAULT_PROJECTIONS
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        NMPattern.parse(self.pattern)
        if self.score not in SCORES:
            raise FlexCimError(f"activation score must be one of {SCORES}, not {self.score!r}")
        for entry in self.projections:
            parse_entry(entry)

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The projections of ``model`` this config prunes (M must divide their input width)."""
        pattern = NMPattern.parse(self.pattern)
        blocks = decoder_blocks(model)
        ranges: dict[str, list[range]] = {}
        for entry in self.projections:
            kind, span = parse_entry(entry)
            if span is not None and span.stop > len(blocks):
                raise FlexCimError(f"projections {entry!r}: the model has {len(blocks)} decoder "
                                   f"blocks (0-{len(blocks) - 1})")
            ranges.setdefault(kind, []).append(range(len(blocks)) if span is None else span)
        chosen = {n: m for block in blocks for n, m in block.linears.items()
                  if any(block.index in r for r in ranges.get(projection_kind(n), ()))
                  and n not in self.skip}
        for name, layer in chosen.items():
            if layer.in_features % pattern.m:
                raise FlexCimError(f"activation pattern {pattern}: M={pattern.m} does not "
                                   f"divide the input width {layer.in_features} of {name}")
        return chosen


def parse_entry(entry: str) -> tuple[str, range | None]:
    """``(kind, blocks)`` of an :class:`ActConfig` projection entry: ``gate`` -> every block
    (None), ``gate@20-29`` -> ``range(20, 30)``."""
    kind, _, blocks = entry.partition("@")
    if kind not in PROJECTIONS:
        raise FlexCimError(f"unknown projection kind {kind!r} in {entry!r}; expected some of "
                           f"{', '.join(PROJECTIONS)}, each optionally @FIRST-LAST blocks")
    if not blocks:
        return kind, None
    match = re.fullmatch(r"(\d+)-(\d+)", blocks)
    if match is None or int(match[1]) > int(match[2]):
        raise FlexCimError(f"projection entry {entry!r}: expected {kind}@FIRST-LAST with "
                           "0 <= FIRST <= LAST block indices (e.g. gate@20-29)")
    return kind, range(int(match[1]), int(match[2]) + 1)


def ordered(entries, blocks: int | None = None) -> tuple[str, ...]:
    """Projection entries in a canonical order: whole kinds as in :data:`PROJECTIONS`, then
    block ranges by kind and first block; with ``blocks`` (the model's count), a kind whose
    ranges cover every block is written as the kind alone."""
    def key(entry):
        kind, span = parse_entry(entry)
        return (span is not None, PROJECTIONS.index(kind), span.start if span else 0)

    entries = tuple(entries)
    if blocks is not None:
        covered: dict[str, set[int]] = {}
        for entry in entries:
            kind, span = parse_entry(entry)
            covered.setdefault(kind, set()).update(range(blocks) if span is None else span)
        whole = {k for k, c in covered.items() if c >= set(range(blocks))}
        entries = (*whole, *(e for e in entries if parse_entry(e)[0] not in whole))
    return tuple(sorted(entries, key=key))


def block_groups(count: int, groups: int) -> list[range]:
    """``count`` decoder blocks split into ``groups`` contiguous ranges of near-equal size."""
    edges = [round(i * count / groups) for i in range(groups + 1)]
    return [range(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]


def _sequence_length(args, kwargs) -> int | None:
    """Tokens per sequence of a causal-LM call (``input_ids [B, L]`` or ``inputs_embeds``)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return int(ids.shape[-1])
    embeds = kwargs.get("inputs_embeds")
    return int(embeds.shape[-2]) if isinstance(embeds, torch.Tensor) else None


def _pre_hook(pattern: NMPattern, column_norm: torch.Tensor | None, call: dict):
    def hook(_module, args):
        x = args[0]
        # A decode call (one new token per sequence, or any call on a non-empty KV cache) stays
        # dense, as in Amber Pruner.  The model's call says which it is; a projection's input
        # alone cannot (OPT flattens its MLP input to [batch x tokens, features]: a batched
        # decode step looks like prefill).
        decode = call.get("decode")
        if decode is None:  # the projection called outside a model call: judge by its input
            decode = x.ndim >= 2 and x.shape[-2] == 1
        if decode:
            return None
        return (topk_activations(x, pattern, column_norm), *args[1:])

    return hook


@contextlib.contextmanager
def activation_pruning(model: nn.Module, config: ActConfig) -> Iterator[list[str]]:
    """Prune the prefill inputs of the configured projections inside a ``with`` block.

    Yields the pruned module paths.  Hooks are removed on exit, also after an exception, so the
    model is dense again; combine with a weight plan by applying the plan first.
    """
    pattern = NMPattern.parse(config.pattern)
    targets = config.targets(model)
    call: dict = {}

    def model_starts(_module, args, kwargs):
        length = _sequence_length(args, kwargs)
        call["decode"] = (True if continues_cache(kwargs) else
                          None if length is None else length == 1)

    def model_ends(_module, _args, _output):
        call.pop("decode", None)

    handles = []
    try:
        handles.append(model.register_forward_pre_hook(model_starts, with_kwargs=True))
        handles.append(model.register_forward_hook(model_ends))
        for layer in targets.values():
            norm = (layer.weight.detach().float().norm(dim=0) if config.score == "weight"
                    else None)
            handles.append(layer.register_forward_pre_hook(_pre_hook(pattern, norm, call)))
        yield list(targets)
    finally:
        for handle in handles:
            handle.remove()


def pruned_mac_share(model: nn.Module, config: ActConfig) -> float:
    """Share of the decoder projections' multiply-accumulates per prefill token whose inputs
    ``config`` prunes (``sum in * out`` over its targets / over every projection): the part of
    the linear compute that N:M activation sparsity can skip (Amber Pruner counts the same)."""
    layers = linear_layers(model)
    total = sum(m.in_features * m.out_features for m in layers.values())
    pruned = sum(m.in_features * m.out_features for m in config.targets(model).values())
    return pruned / total if total else 0.0


@torch.no_grad()
def sensitivity(model: nn.Module, windows: torch.Tensor, config: ActConfig, *,
                batch_size: int = 4) -> dict[str, float]:
    """Relative output error of each target projection under activation pruning.

    One dense forward pass over ``windows``; for every target layer the error
    ``||(x - topk(x)) W^T|| / ||x W^T||`` is accumulated over all tokens (the layer sees the
    dense model's inputs, so the figures are independent of each other).
    """
    pattern = NMPattern.parse(config.pattern)
    targets = ActConfig(config.pattern, config.score, config.projections).targets(model)
    sums = {name: [0.0, 0.0] for name in targets}
    handles = []

    def factory(name, layer):
        norm = layer.weight.detach().float().norm(dim=0) if config.score == "weight" else None

        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            dropped = x - topk_activations(x, pattern, norm)
            w = layer.weight.detach().float()
            sums[name][0] += float((dropped @ w.T).square().sum())
            sums[name][1] += float((x @ w.T).square().sum())

        return hook

    try:
        for name, layer in targets.items():
            handles.append(layer.register_forward_pre_hook(factory(name, layer)))
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (err / ref) ** 0.5 if ref > 0 else 0.0 for name, (err, ref) in sums.items()}


def choose_projections(model: nn.Module, evaluate: Callable[[], float], *,
                       pattern: str = "8:16", score: str = "abs", budget: float = 0.05,
                       margin: float = 0.0, groups: int = 3) -> dict:
    """Greedy forward selection of the projections to prune under a perplexity budget.

    Every step tries adding each remaining unit, measures ``evaluate()`` (a perplexity; pass
    one on text that is *not* your test set) with the candidate set pruned, and keeps the
    candidate with the largest :func:`pruned_mac_share` whose increase over the
    dense-activation perplexity stays below ``budget * (1 - margin)`` (``margin``: the share of
    the budget held back for the gap between the selection text and unseen text).  Units are
    first whole projection kinds; when no kind fits any more, a kind in one of ``groups``
    contiguous thirds (halves, ...) of the decoder blocks (``gate@20-29``), until none fits
    (``groups=1``: kinds only).

    Returns ``{"projections": tuple, "baseline": ppl, "steps": [[row, ...], ...], ...}``, each
    row ``{"projections", "ppl", "increase", "mac_share"}``: every set measured, step by step.
    """
    if not budget > 0:
        raise FlexCimError(f"perplexity budget must be a positive fraction, not {budget!r}")
    if not 0 <= margin < 1:
        raise FlexCimError(f"budget margin must be a fraction in [0, 1), not {margin!r}")
    if not (isinstance(groups, int) and groups >= 1):
        raise FlexCimError(f"block groups must be a positive integer, not {groups!r}")
    kinds = {projection_kind(n) for n in linear_layers(model)}
    present = [k for k in PROJECTIONS if k in kinds]
    if not present:
        raise FlexCimError(f"the model has none of the projection kinds {', '.join(PROJECTIONS)}")
    limit = budget * (1 - margin)
    baseline = evaluate()
    chosen: tuple[str, ...] = ()
    final = None
    steps: list[list[dict]] = []

    def grow(units: list[str]) -> None:
        nonlocal chosen, final
        while units:
            rows = []
            for unit in units:
                entries = ordered((*chosen, unit), blocks)
                config = ActConfig(pattern=pattern, score=score, projections=entries)
                with activation_pruning(model, config):
                    ppl = evaluate()
                rows.append({"projections": list(entries), "ppl": ppl,
                             "increase": ppl / baseline - 1,
                             "mac_share": pruned_mac_share(model, config)})
                log.info("activations %s on %-28s (%5.1f %% of the MACs): perplexity %.3f "
                         "(%+.1f %%)", pattern, ",".join(entries), 100 * rows[-1]["mac_share"],
                         ppl, 100 * rows[-1]["increase"])
            steps.append(rows)
            fits = [r for r in rows if r["increase"] < limit]
            if not fits:
                return
            best = max(fits, key=lambda r: (r["mac_share"], -r["increase"]))
            final, chosen = best, tuple(best["projections"])
            units = [u for u, r in zip(units, rows, strict=True) if r is not best]

    blocks = len(decoder_blocks(model))
    grow(present)
    if groups > 1:
        spans = block_groups(blocks, groups)
        grow([f"{k}@{r.start}-{r.stop - 1}" for k in present if k not in chosen
              for r in spans])
    return {"pattern": pattern, "score": score, "budget": budget, "margin": margin,
            "groups": groups, "baseline": baseline, "projections": chosen,
            "result": final, "steps": steps}


def skip_most_sensitive(scores: dict[str, float], budget: float) -> tuple[str, ...]:
    """The ``round(budget * len(scores))`` most sensitive layers (to keep dense)."""
    if not 0.0 <= budget <= 1.0:
        raise FlexCimError(f"skip budget must be a fraction in [0, 1], not {budget!r}")
    count = round(budget * len(scores))
    ranked = sorted(scores, key=lambda n: (-scores[n], n))
    return tuple(ranked[:count])
