"""Re-fit a pruned model's normalisation gains to the dense model (``flow prune --refit-norms``).

Pruning leaves every kept weight where the metric put it; the RMSNorm (or LayerNorm) gains in
front of the pruned projections are the model's only other parameters on the path, a few
thousand numbers per model (35,136 for SmolLM2-135M).  :func:`refit_norms` fits them, and only
them, to the *dense* model's next-token distribution on the calibration windows (the mean KL
divergence per token, Adam): a recovery step, not fine-tuning on the text, so it cannot adapt the
model to the calibration text beyond what the dense model predicts (the cross-entropy on the
text would: it lowers the dense model's own perplexity by a fifth on SmolLM2, docs/flow.md).
The masks and every weight of every linear layer stay bit for bit as pruned, so the hardware
runs the same plan.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm import tqdm

from flexcim.errors import FlexCimError

EPOCHS = 2
LR = 1e-3
BATCH = 4
"""Defaults, set before any measurement (not tuned): two passes over the 64 calibration windows
of SparseGPT in batches of 4, Adam at 1e-3 (a gain of 1 moves by at most ~0.03 per pass)."""


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of the model's normalisation layers (RMSNorm or LayerNorm), by name."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            for name, param in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}"] = param
    return out


def _kl(model: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of ``ids`` of KL(teacher || model); the teacher without gradient."""
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
    log_q = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _mean_kl(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch: int) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i:i + batch]
            total += float(_kl(model, teacher, ids)) * ids.shape[0]
    return total / windows.shape[0]


def refit_norms(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, *,
                epochs: int = EPOCHS, lr: float = LR, batch: int = BATCH,
                progress: bool = True) -> dict:
    """Fit ``model``'s normalisation gains to ``teacher`` (the dense model) on ``windows``
    (``[count, seq_len]`` token ids); every other parameter is left untouched.  Returns what
    it did: the number of parameters, the settings, the mean KL per token on ``windows`` before
    and after, and the seconds."""
    params = norm_parameters(model)
    if not params:
        raise FlexCimError("--refit-norms: the model has no RMSNorm or LayerNorm layer to refit")
    if epochs < 1 or lr <= 0 or batch < 1:
        raise FlexCimError(f"refit: epochs, lr and batch must be positive, not {epochs}, {lr}, "
                           f"{batch}")
    start = time.perf_counter()
    was_training, flags = model.training, {p: p.requires_grad for p in model.parameters()}
    model.eval()
    teacher.eval()
    before = _mean_kl(model, teacher, windows, batch)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params.values(), lr=lr)
    order = torch.Generator().manual_seed(0)
    steps = epochs * math.ceil(windows.shape[0] / batch)
    bar = tqdm(total=steps, desc="refit norms", disable=not progress, leave=False, unit="step")
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                perm = torch.randperm(windows.shape[0], generator=order)
                for i in range(0, windows.shape[0], batch):
                    loss = _kl(model, teacher, windows[perm[i:i + batch]])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    bar.update()
    finally:
        bar.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    after = _mean_kl(model, teacher, windows, batch)
    return {"parameters": int(sum(p.numel() for p in params.values())), "epochs": epochs,
            "lr": lr, "batch": batch, "windows": int(windows.shape[0]), "kl_before": before,
            "kl_after": after, "seconds": round(time.perf_counter() - start, 1)}
