"""Calibration statistics of the linear layers, gathered block by block with forward hooks.

The model runs once up to its first decoder block (the block inputs are captured and the rest of
the forward pass is cut short); then each block in turn runs on the captured hidden states with
hooks on its ``nn.Linear`` sublayers, a callback sees the block's statistics (and may prune the
block), and the block's outputs (recomputed when it was pruned, so later blocks calibrate on
what they will really see) become the next block's inputs.  With ``sequential=True`` the same
happens inside a block: its projections are taken in groups that read the same input (q, k, v;
o; gate, up; down for a Llama block), and each group's statistics are gathered after the groups
before it were pruned (SparseGPT's "true sequential" order).  Memory stays bounded by one block's
statistics plus the calibration hidden states.  Hooks are always removed, also on errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator

import torch
from flexcim.flow.model import Block, decoder_blocks, run_until
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
    """A forward pre-hook accumulating ``stats`` from the layer's input (float32 running sums).
    A pre-hook, so it also sees the input of a head whose forward
    :func:`flexcim.flow.eval.nll_terms` cuts short (it computes the loss from the head's
    input and weight)."""

    def hook(_module, inputs):
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
            handles.append(layer.register_forward_pre_hook(_stats_hook(stats[name])))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect(model: nn.Module, windows: torch.Tensor, layers: dict[str, nn.Linear], *,
            hessian: bool = False, batch_size: int = 4) -> dict[str, LayerStats]:
    """Input statistics of ``layers`` over forward passes of ``model`` on ``windows`` as it is
    now (for layers outside the decoder blocks, e.g. the LM head).  A pass stops once every
    layer has seen its input: the LM head's logits are never computed."""
    with collecting(layers, hessian=hessian) as stats:
        for start in range(0, windows.shape[0], batch_size):
            run_until(model, windows[start : start + batch_size], layers.values())
    return stats


@torch.no_grad()
def _block_inputs(model: nn.Module, first: nn.Module, windows: torch.Tensor, batch_size: int):
    """Hidden states and keyword arguments entering ``first`` for each calibration batch."""
    captured = []
    for start in range(0, windows.shape[0], batch_size):
        (args, kwargs), = run_until(model, windows[start : start + batch_size], [first])
        captured.append((args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs))
    return captured


def input_groups(block: Block, captured: list) -> list[list[str]]:
    """The block's projections grouped by the tensor they read, in the order they run.

    One run of the block on the first captured batch records each projection's input tensor;
    projections reading the very same tensor (``q``, ``k`` and ``v`` the normed hidden state,
    ``gate`` and ``up`` the MLP's) form one group.  Projections the block never calls come last,
    one group each."""
    seen: dict[str, torch.Tensor] = {}  # in call order
    handles = []

    def hook(name):
        def pre(_module, inputs):
            seen.setdefault(name, inputs[0])  # the tensor itself: an address may be reused
        return pre

    try:
        for name, layer in block.linears.items():
            handles.append(layer.register_forward_pre_hook(hook(name)))
        _run_block(block.module, captured[:1])
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in seen.items():
        for source, names in groups:
            if source is tensor:
                names.append(name)
                break
        else:
            groups.append((tensor, [name]))
    return [names for _, names in groups] + [[n] for n in block.linears if n not in seen]


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
              last_block: int | None = None, keep_hessians: bool = False,
              sequential: bool = False) -> dict[str, LayerStats]:
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
    sequential : bool
        Call ``on_block`` once per group of projections that read the same input
        (:func:`input_groups`), with that group's statistics gathered after the earlier groups'
        callbacks: a projection is calibrated on the outputs of the already-pruned projections
        before it in the block.  The block runs once per group and once more for its outputs.
    """
    blocks = decoder_blocks(model)
    if last_block is not None:
        blocks = blocks[: last_block + 1]
    captured = _block_inputs(model, blocks[0].module, windows, batch_size)
    result = {}
    for block in tqdm(blocks, desc="calibration", disable=not progress, leave=False,
                      unit="block"):
        groups = (input_groups(block, captured) if sequential and on_block is not None
                  else [list(block.linears)])
        outs = None
        for group in groups:
            with collecting({n: block.linears[n] for n in group}, hessian=hessian) as stats:
                outs = _run_block(block.module, captured)
            if on_block is not None and on_block(block, stats):
                outs = None  # the group changed: its outputs (and later groups' inputs) too
            for name, s in stats.items():
                if not keep_hessians:
                    s.xtx = None
                result[name] = s
        if outs is None:
            outs = _run_block(block.module, captured)
        captured = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outs, captured,
                                                                           strict=True)]
    return result
