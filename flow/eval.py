"""Perplexity over fixed-length, non-overlapping token windows."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time

import torch
from flexcim.flow.model import next_call_cache, run_until
from torch import nn
from tqdm import tqdm

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_write, check_output

log = logging.getLogger("flexcim.flow")


PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "phi",
                              "phi3", "gpt_neox"})
"""Model types whose logits are exactly ``lm_head(hidden)`` (no soft-capping or scaling after
the head): :func:`nll_terms` computes their loss without materialising the logits."""
VOCAB_CHUNK = 2048  # rows of the head per step: measured fastest of 2048-16384 on SmolLM2


def _plain_head(model: nn.Module) -> nn.Linear | None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if type(head) is nn.Linear else None


@torch.no_grad()
def nll_terms(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of every prediction of ``batch [B, L]``: float32
    ``[B * (L - 1)]``, window by window (``view(B, L - 1)`` gives each window's row).

    For a model whose logits are a plain linear head (:data:`PLAIN_HEAD_TYPES`) the head's
    input is captured and the log-sum-exp accumulated over chunks of the vocabulary, so the
    ``[B, L, V]`` logits are never written (SmolLM2, 4 x 128 tokens: 220 vs 364 ms for the head
    and the loss); otherwise the model's own logits and ``cross_entropy``.  Both agree to float
    rounding (tests/flow/test_eval.py).
    """
    head = _plain_head(model)
    targets = batch[:, 1:].reshape(-1)
    if head is None:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                           reduction="none")
    (args, _), = run_until(model, batch, [head])  # the head's input; no logits written
    hidden = args[0][:, :-1].reshape(-1, args[0].shape[-1])
    weight, bias = head.weight, head.bias
    picked = (hidden.float() * weight[targets].float()).sum(-1)
    if bias is not None:
        picked = picked + bias[targets].float()
    lse = torch.full((hidden.shape[0],), -math.inf)
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        stop_row = start + VOCAB_CHUNK
        logits = nn.functional.linear(hidden, weight[start:stop_row],
                                      None if bias is None else bias[start:stop_row])
        lse = torch.logaddexp(lse, torch.logsumexp(logits.float(), dim=1))
    return lse - picked


@torch.no_grad()
def continuation_nll(model: nn.Module, batch: torch.Tensor, prefill: int) -> torch.Tensor:
    """Negative log-likelihood of tokens ``prefill .. L-1`` of ``batch [B, L]`` as a served
    model computes them after a prompt of the first ``prefill`` tokens: float32
    ``[B, L - prefill]``.

    One prefill call over the prompt (its last position predicts token ``prefill``, the first
    generated token), then one decode call of the later tokens on its KV cache, teacher-forced:
    attention is causal, so it gives the logits of one-token decode steps (tests/flow/
    test_eval.py checks it against such a loop) at the cost of one call.  A call on a non-empty
    cache is a decode call (:func:`flexcim.flow.model.continues_cache`), which
    :mod:`flexcim.flow.act` keeps dense (as Amber Pruner does) and :mod:`flexcim.flow.quant`
    scales per token: under activation pruning only the prompt is pruned, and the score is what
    that costs the tokens generated after it.
    """
    length = batch.shape[1]
    if not 1 <= prefill < length:
        raise FlexCimError(f"prefill tokens must be in 1..{length - 1} for windows of {length} "
                           f"tokens, not {prefill}")
    last = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters
            else {})
    out = model(input_ids=batch[:, :prefill], use_cache=True, **last)
    logits = out.logits[:, -1:].float()
    if prefill < length - 1:
        rest = model(input_ids=batch[:, prefill:-1], use_cache=True, **next_call_cache(model, out))
        logits = torch.cat([logits, rest.logits.float()], 1)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch[:, prefill:].reshape(-1),
                                       reduction="none").view(batch.shape[0], -1)


def nll_sum(model: nn.Module, batch: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ``batch [B, L]`` (``B * (L - 1)`` tokens;
    :func:`nll_terms`)."""
    return float(nll_terms(model, batch).sum())


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity",
               prefill: int | None = None) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every window.

    Each window ``[L]`` contributes its ``L - 1`` predictions (no context crosses windows), so
    the figure does not depend on ``batch_size``.  With ``prefill`` it contributes only the
    ``L - prefill`` predictions after a prompt of its first ``prefill`` tokens, computed as
    a served model computes them (:func:`continuation_nll`: a prefill call, then the decode of
    the later tokens on its KV cache).

    Parameters
    ----------
    model : causal LM returning ``.logits [B, L, V]``
    windows : int64 ``[W, L]`` token ids (see :func:`flexcim.flow.text.token_windows`)
    """
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        shape = tuple(windows.shape)
        raise FlexCimError(f"windows must be int64 [count, length >= 2], not {shape}")
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress,
                      leave=False, unit="batch"):
        batch = windows[start : start + batch_size]
        if prefill is None:
            total += nll_sum(model, batch)
            count += batch[:, 1:].numel()
        else:
            total += float(continuation_nll(model, batch, prefill).sum())
            count += batch[:, prefill:].numel()
    return math.exp(total / count)


def write_json(path: str | os.PathLike, record: dict) -> None:
    """Write ``record`` (plus a timestamp) as indented JSON, atomically; the directory must
    exist."""
    check_output(path, "JSON output")
    atomic_write(path, json.dumps({**record, "written": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                  indent=1) + "\n")
