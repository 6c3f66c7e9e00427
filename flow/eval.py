"""Perplexity over fixed-length, non-overlapping token windows."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_write, check_output

log = logging.getLogger("flexcim.flow")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> float:
    """``exp`` of the mean next-token negative log-likelihood over every window.

    Each window ``[L]`` contributes its ``L - 1`` predictions (no context crosses windows), so
    the figure does not depend on ``batch_size``.

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
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def write_json(path: str | os.PathLike, record: dict) -> None:
    """Write ``record`` (plus a timestamp) as indented JSON, atomically; the directory must
    exist."""
    check_output(path, "JSON output")
    atomic_write(path, json.dumps({**record, "written": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                  indent=1) + "\n")
