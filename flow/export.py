"""Export one sparsified projection for the hardware (golden/ and sim/ read it).

The projection's weight, pruned to its plan pattern, is quantized to int8 per output channel
(:func:`flexcim.golden.quant.quantize_weight`: zeros stay zeros, so the N:M mask survives),
compressed to an :class:`~flexcim.golden.nm.NMTensor` and written with a sample of the real
activations that reach it on calibration text (the pruned model's, per-tensor int8, optionally
N:M top-k'd with :func:`flexcim.golden.nm.act_topk` as Amber-style pruning would feed them) by
:func:`flexcim.golden.layer_io.save_layer`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from flexcim.flow.model import decoder_blocks
from flexcim.golden.layer_io import SparseLayer, save_layer
from flexcim.golden.nm import NMPattern, NMTensor, act_topk, satisfies
from torch import nn

from flexcim.errors import FlexCimError

__all__ = ["build_layer", "export_layer", "find_layer", "layer_inputs", "satisfies"]
from flexcim.golden.quant import act_scale, quantize_act, quantize_weight

log = logging.getLogger("flexcim.flow")


def find_layer(model: nn.Module, name: str) -> tuple[int, nn.Linear]:
    """Block index and module of projection ``name``; unknown names list a few valid ones."""
    blocks = decoder_blocks(model)
    for block in blocks:
        if name in block.linears:
            return block.index, block.linears[name]
    examples = ", ".join(list(blocks[0].linears)[:3])
    raise FlexCimError(f"no projection named {name!r} in the decoder blocks (e.g. {examples})")


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Linear, windows: torch.Tensor, tokens: int
                 ) -> np.ndarray:
    """The first ``tokens`` input rows ``[T, K]`` that ``layer`` sees on ``windows``."""
    rows: list[torch.Tensor] = []

    class _Enough(Exception):
        pass

    def hook(_module, args):
        rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        if sum(r.shape[0] for r in rows) >= tokens:
            raise _Enough

    handle = layer.register_forward_pre_hook(hook)
    try:
        for window in windows:
            try:
                model(input_ids=window[None], use_cache=False)
            except _Enough:
                break
    finally:
        handle.remove()
    if not rows:
        raise FlexCimError("no activations captured (empty calibration windows)")
    return torch.cat(rows)[:tokens].numpy()


def build_layer(name: str, weight: torch.Tensor, pattern: NMPattern, x: np.ndarray | None, *,
                act_pattern: NMPattern | None = None, extra: dict | None = None) -> SparseLayer:
    """Quantize and compress a pruned float weight (and activations) into a ``SparseLayer``."""
    hw_pattern = NMPattern(1, 1) if pattern.is_dense else pattern
    w = weight.detach().float().numpy()
    if not satisfies(w, pattern):
        raise FlexCimError(f"{name} does not satisfy its pattern {pattern}: prune it first")
    q, scale = quantize_weight(w)
    layer_act, scale_x = None, None
    if x is not None:
        scale_x = act_scale(x)
        layer_act = quantize_act(x, scale_x)
        if act_pattern is not None:
            layer_act = act_topk(layer_act, act_pattern)
    return SparseLayer(weight=NMTensor.compress(q, hw_pattern), weight_scale=scale, name=name,
                       act=layer_act, act_scale=scale_x, act_pattern=act_pattern,
                       extra=extra or {})


def export_layer(path: str | os.PathLike, layer: SparseLayer) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FlexCimError(f"output directory {directory!r} does not exist")
    save_layer(path, layer)
    c, k = layer.weight.shape
    log.info("wrote %s: %s [%d, %d] pattern %s%s", path, layer.name, c, k, layer.weight.pattern,
             "" if layer.act is None else f", {layer.act.shape[0]} activation rows")
