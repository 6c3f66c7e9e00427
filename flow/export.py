"""Export one sparsified projection for the hardware (golden/ and sim/ read it).

The projection's weight, pruned to its plan pattern, and a sample of the real activations that
reach it on calibration text (the pruned model's; optionally N:M top-k'd as Amber-style pruning
feeds them, then quantized) are quantized exactly as the W8A8 perplexity runs quantize them
(:mod:`flexcim.flow.quant`: int8 weights per output channel, zeros stay zeros so the N:M mask
survives; int8 activations per token or per tensor), the weight compressed to an
:class:`~flexcim.spec.nm.NMTensor`, and written by :func:`flexcim.golden.layer_io.save_layer`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from flexcim.flow.act import topk_activations
from flexcim.flow.model import decoder_blocks, run_until
from flexcim.flow.quant import W8A8Config, quantize_input, quantize_weight
from flexcim.golden.layer_io import SparseLayer, save_layer
from flexcim.spec.nm import NMPattern, NMTensor, satisfies
from torch import nn

from flexcim.errors import FlexCimError

__all__ = ["build_layer", "export_layer", "find_layer", "layer_inputs", "satisfies"]

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
def layer_inputs(model: nn.Module, layer: nn.Linear, windows: torch.Tensor, tokens: int, *,
                 whole_windows: bool = False) -> np.ndarray:
    """The first ``tokens`` input rows ``[T, K]`` that ``layer`` sees on ``windows`` (with
    ``whole_windows``: the rows of every window those come from, a multiple of its length)."""
    rows: list[torch.Tensor] = []
    for window in windows:
        if sum(r.shape[0] for r in rows) >= tokens:
            break
        seen, = run_until(model, window[None], [layer])  # the pass stops at the layer
        if seen is None:  # the model never calls it
            break
        x = seen[0][0]
        rows.append(x.detach().reshape(-1, x.shape[-1]).float())
    if not rows:
        raise FlexCimError("no activations captured (empty calibration windows)")
    x = torch.cat(rows)
    return (x if whole_windows else x[:tokens]).numpy()


def build_layer(name: str, weight: torch.Tensor, pattern: NMPattern, x: np.ndarray | None, *,
                act_pattern: NMPattern | None = None, extra: dict | None = None,
                quant: W8A8Config | None = None, seq_len: int | None = None,
                tokens: int | None = None) -> SparseLayer:
    """Quantize and compress a pruned float weight (and activations ``x [rows, K]``) into a
    ``SparseLayer``, as :func:`flexcim.flow.quant.w8a8` computes that projection.

    The activations are top-k'd (``act_pattern``, by ``|x|``) in float, then quantized by
    :func:`flexcim.flow.quant.quantize_input` with ``quant``'s granularity (default
    :class:`~flexcim.flow.quant.W8A8Config`'s); per tensor means per sequence of ``seq_len``
    rows (all rows when None).  The first ``tokens`` rows are kept (all when None).
    """
    quant = quant or W8A8Config()
    hw_pattern = NMPattern(1, 1) if pattern.is_dense else pattern
    w = weight.detach().float()
    if not satisfies(w.numpy(), pattern):
        raise FlexCimError(f"{name} does not satisfy its pattern {pattern}: prune it first")
    q, scale = quantize_weight(w)
    layer_act, scale_x = None, None
    if x is not None:
        xt = torch.as_tensor(x, dtype=torch.float32)
        if act_pattern is not None:
            xt = topk_activations(xt, act_pattern)
        if seq_len is not None:
            if xt.shape[0] % seq_len:
                raise FlexCimError(f"{xt.shape[0]} activation rows are not whole sequences of "
                                   f"{seq_len}")
            xt = xt.reshape(-1, seq_len, xt.shape[-1])
        qx, sx = quantize_input(xt, quant.act_granularity)
        layer_act = qx.reshape(-1, qx.shape[-1])[:tokens].numpy()
        sx = sx.reshape(-1)[:tokens].numpy()
        # one scale for the sample when it has one (per tensor within one sequence)
        scale_x = (float(sx[0]) if quant.act_granularity == "tensor" and np.all(sx == sx[0])
                   else sx)
    return SparseLayer(weight=NMTensor.compress(q.numpy(), hw_pattern),
                       weight_scale=scale.numpy(), name=name, act=layer_act, act_scale=scale_x,
                       act_pattern=act_pattern,
                       extra={**(extra or {}), "act_granularity": quant.act_granularity})


def export_layer(path: str | os.PathLike, layer: SparseLayer) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FlexCimError(f"output directory {directory!r} does not exist")
    save_layer(path, layer)
    c, k = layer.weight.shape
    log.info("wrote %s: %s [%d, %d] pattern %s%s", path, layer.name, c, k, layer.weight.pattern,
             "" if layer.act is None else f", {layer.act.shape[0]} activation rows")
