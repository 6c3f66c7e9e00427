"""Calibration statistics of the linear layers, gathered block by block with forward hooks.

The model runs once up to its first decoder block (the block inputs are captured and the rest of
the forward pass is cut short); then each block in turn runs on the captured hidden states with
hooks on its ``nn.Linear`` sublayers, a callback sees the block's statistics (and may prune the
block), and the block's outputs (recomputed when it was pruned, so later blocks calibrate on
what they will really see) become the next block's inputs.  Memory stays bounded by one block's
statistics plus the calibration hidden states.  Hooks are always removed, also on errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator

import torch
from flexcim.flow.model import Block, decoder_blocks
from torch import nn
from tqdm import tqdm

log = logging.getLogger("flexcim.flow")


@dataclasses.dataclass
class LayerStats:
    """Running input statistics of one linear layer.

    Members
    -------
    sq_sum : float32 ``[K]``
        Sum over tokens of ``x_j^2``.
    tokens : int
    xtx : float32 ``[K, K]`` or None
        Sum over tokens of ``x x^T`` (only when Hessians are requested).
    """

    sq_sum: torch.Tensor
    tokens: int = 0
    xtx: torch.Tensor | None = None

    @property
    def act_sq_mean(self) -> torch.Tensor:
        """Per-channel mean of ``x_j^2`` (Wanda's ``||X_j||^2`` up to the token count)."""
        return self.sq_sum / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """``X^T X / T`` (SparseGPT's ``H`` up to a constant factor)."""
        if self.xtx is None:
            raise ValueError("Hessian not collected (hessian=False)")
        return self.xtx / max(self.tokens, 1)


def _stats_hook(stats: LayerStats) -> Callable:
    """A forward hook accumulating ``stats`` from the layer's input (float32 running sums)."""

    def hook(_module, inputs, _output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        stats.sq_sum += (x * x).sum(dim=0)
        stats.tokens += x.shape[0]
        if stats.xtx is not None:
            stats.xtx += x.T @ x

    return hook


@contextlib.contextmanager
def collecting(layers: dict[str, nn.Linear], *, hessian: bool = False
               ) -> Iterator[dict[str, LayerStats]]:
    """Attach statistic hooks to ``layers`` for the duration of a ``with`` block."""
    stats = {}
    handles = []
    try:
        for name, layer in layers.items():
            k = layer.in_features
            stats[name] = LayerStats(
                sq_sum=torch.zeros(k), xtx=torch.zeros(k, k) if hessian else None
            )
            handles.append(layer.register_forward_hook(_stats_hook(stats[name])))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@torch.no_grad()
def _block_inputs(model: nn.Module, first: nn.Module, windows: torch.Tensor, batch_size: int):
    """Hidden states and keyword arguments entering ``first`` for each calibration batch."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, captured: list) -> list[torch.Tensor]:
    outs = []
    for hidden, args, kwargs in captured:
        out = block(hidden, *args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor, *,
              on_block: Callable[[Block, dict[str, LayerStats]], bool] | None = None,
              hessian: bool = False, batch_size: int = 4, progress: bool = True,
              last_block: int | None = None, keep_hessians: bool = False
              ) -> dict[str, LayerStats]:
    """Gather input statistics of every projection, block by block.

    Parameters
    ----------
    model : causal LM
    windows : int64 ``[W, L]`` calibration token windows
    on_block : callable, optional
        ``on_block(block, stats) -> changed``; called after each block's statistics are complete.
        Return True when it modified the block (pruned it): its outputs are then recomputed.
    hessian : bool
        Also accumulate ``X^T X`` (for SparseGPT).  Hessians are dropped after each block's
        callback to bound memory; the returned statistics keep only ``act_sq_mean``.
    last_block : int, optional
        Stop after this block (later blocks are neither measured nor changed).
    keep_hessians : bool
        Keep every layer's ``X^T X`` in the result (one-shot SparseGPT; ~0.5 GB for SmolLM2).
    """
    blocks = decoder_blocks(model)
    if last_block is not None:
        blocks = blocks[: last_block + 1]
    captured = _block_inputs(model, blocks[0].module, windows, batch_size)
    result = {}
    for block in tqdm(blocks, desc="calibration", disable=not progress, leave=False,
                      unit="block"):
        with collecting(block.linears, hessian=hessian) as stats:
            outs = _run_block(block.module, captured)
        if on_block is not None and on_block(block, stats):
            outs = _run_block(block.module, captured)
        for name, s in stats.items():
            if not keep_hessians:
                s.xtx = None
            result[name] = s
        captured = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outs, captured,
                                                                           strict=True)]
    return result
