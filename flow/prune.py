"""N:M weight pruning as pure tensor functions (no modules, no hooks).

Weights are ``[out_features, in_features]`` = ``[C, K]``; groups of ``m`` run along ``K`` inside
each output row and ``n_keep`` of every group survive.  Selection matches
:func:`flexcim.spec.nm.topn_mask` exactly: a stable sort, ties to the lowest index.

Metrics (scores; larger = more important):

* ``magnitude``: ``|W|``;
* ``wanda`` (Sun et al., 2023): ``|W_ij| * sqrt(E[x_j^2])``, compared inside each row's group;
* ``sparsegpt`` (Frantar & Alistarh, 2023): the OBS saliency ``w^2 / [H^-1]_jj`` chosen group by
  group while the not-yet-pruned weights are updated to compensate (:func:`sparsegpt_nm`).
"""

from __future__ import annotations

import torch

from flexcim.errors import FlexCimError

METRICS = ("magnitude", "wanda", "sparsegpt")


def _check_group(k: int, n_keep: int, m: int, what: str = "in_features") -> None:
    if not 1 <= n_keep <= m:
        raise FlexCimError(f"N:M pattern N must be from 1 to M={m}, not {n_keep!r}")
    if k % m:
        raise FlexCimError(f"{what}={k} is not a multiple of M={m} (pattern {n_keep}:{m})")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| * sqrt(E[x_j^2])`` for ``weight [C, K]`` and ``act_sq_mean [K]``.

    ``act_sq_mean`` is the per-input-channel mean of the *squared* activation (so its square root
    is the channel's RMS norm), as collected by :mod:`flexcim.flow.calib`.
    """
    if act_sq_mean.shape != (weight.shape[1],):
        raise FlexCimError(
            f"activation statistics of shape {tuple(act_sq_mean.shape)} do not match "
            f"in_features={weight.shape[1]}"
        )
    return weight.detach().float().abs() * act_sq_mean.float().clamp_min(0).sqrt()[None, :]


def nm_rank(scores: torch.Tensor, *, m: int) -> torch.Tensor:
    """Each score's place in its group of ``m`` (last axis), 0 for the largest: a stable
    descending sort, ties to the lowest index.  ``nm_rank(s, m=m) < n`` is
    ``nm_mask(s, n_keep=n, m=m)``, so one rank serves every N of one M (uint8 for M <= 256)."""
    k = scores.shape[-1]
    _check_group(k, 1, m, "last axis")
    grouped = scores.reshape(-1, m)
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
    dtype = torch.uint8 if m <= 256 else torch.int64
    rank = torch.empty(grouped.shape, dtype=dtype)
    rank.scatter_(1, order, torch.arange(m, dtype=dtype).expand_as(order))
    return rank.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, *, n_keep: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n_keep`` largest scores of every group of ``m`` (last axis).

    Ties go to the lowest index, so the result equals ``spec.nm.topn_mask``.
    """
    _check_group(scores.shape[-1], n_keep, m, "last axis")
    return nm_rank(scores, m=m) < n_keep


def prune_nm(weight: torch.Tensor, scores: torch.Tensor, *, n_keep: int, m: int) -> torch.Tensor:
    """``weight`` with all but the ``n_keep`` best-scored entries of every group zeroed."""
    if scores.shape != weight.shape:
        raise FlexCimError(f"scores shape {tuple(scores.shape)} != weight {tuple(weight.shape)}")
    return weight * nm_mask(scores, n_keep=n_keep, m=m).to(weight.dtype)


@torch.no_grad()
def sparsegpt_nm(weight: torch.Tensor, hessian: torch.Tensor, *, n_keep: int, m: int,
                 blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT N:M pruning with the OBS weight update; returns the new weight ``[C, K]``.

    Columns are processed left to right.  At the first column of each group the mask of that
    group is fixed from the OBS saliency ``w^2 / d^2`` (``d`` the diagonal of the upper Cholesky
    factor of ``H^-1``), then each column is quantized to its mask and the error is spread over
    the remaining columns through the Cholesky rows, lazily in blocks of ``blocksize`` (the
    result does not depend on it).

    Parameters
    ----------
    weight : ``[C, K]``
    hessian : ``[K, K]``
        ``X^T X / T`` of the layer's inputs (any positive scale: damping is relative).
    percdamp : float
        Added to the diagonal as a fraction of its mean, for a stable Cholesky.
    """
    c, k = weight.shape
    _check_group(k, n_keep, m)
    if hessian.shape != (k, k):
        raise FlexCimError(f"Hessian of shape {tuple(hessian.shape)} does not match K={k}")
    blocksize = max(m, blocksize // m * m)  # a group never straddles two lazy blocks
    w = weight.detach().clone().float()
    h = hessian.detach().clone().float()
    dead = torch.diag(h) == 0  # channels never active: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(k)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise FlexCimError("SparseGPT: the damped Hessian is not positive definite") from None
    threads = torch.get_num_threads()
    # The column loop is thousands of tiny ops: thread hand-offs cost more than they save
    # (measured 5.6x faster on one thread for a 1536 x 576 layer on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        _sparsegpt_columns(w, hinv, n_keep, m, blocksize)
    finally:
        torch.set_num_threads(threads)
    return w.to(weight.dtype)


def prune_weight(weight: torch.Tensor, metric: str, *, n_keep: int, m: int,
                 act_sq_mean: torch.Tensor | None = None,
                 hessian: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` pruned to ``n_keep:m`` by ``metric`` (one of :data:`METRICS`): Wanda needs the
    input's ``act_sq_mean``, SparseGPT its ``hessian`` (``X^T X``); magnitude neither."""
    if metric == "sparsegpt":
        if hessian is None:
            raise FlexCimError("metric 'sparsegpt' needs the input's X^T X (calibration)")
        return sparsegpt_nm(weight, hessian, n_keep=n_keep, m=m)
    if metric == "wanda":
        if act_sq_mean is None:
            raise FlexCimError("metric 'wanda' needs the input's mean square (calibration)")
        scores = wanda_scores(weight, act_sq_mean)
    elif metric == "magnitude":
        scores = magnitude_scores(weight)
    else:
        raise FlexCimError(f"metric must be one of {METRICS}, not {metric!r}")
    return prune_nm(weight, scores, n_keep=n_keep, m=m)


def _sparsegpt_columns(w: torch.Tensor, hinv: torch.Tensor, n_keep: int, m: int,
                       blocksize: int) -> None:
    """SparseGPT's lazy-batched column sweep, in place on ``w``."""
    k = w.shape[1]
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(h1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                saliency = w1[:, i : i + m] ** 2 / d1[i : i + m][None, :] ** 2
                mask1[:, i : i + m] = nm_mask(saliency, n_keep=n_keep, m=m)
            col = w1[:, i]
            q = torch.where(mask1[:, i], col, torch.zeros_like(col))
            err = (col - q) / d1[i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
