"""Symmetric int8 quantization of weights and activations.

Both sides use the symmetric range ``[-127, 127]``: ``-128`` never occurs in anything this module
produces, so negating a value or taking ``|x|`` can never overflow int8.  The hardware and the
golden model nevertheless accept ``-128`` (the full int8 range is tested), because users may
feed their own quantized data.

Rounding is round-half-to-even (``numpy.rint``), the IEEE default that ``torch.round`` also uses.
"""

from __future__ import annotations

import numpy as np

from flexcim.errors import FlexCimError

QMAX = 127

ACT_GRANULARITIES = ("tensor", "token")
"""Activation scales offered: one per tensor (``max|x|`` over all its rows) or one per token
(row)."""


def _real_array(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iuf":
        raise FlexCimError(f"{what} must hold real numbers, not dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise FlexCimError(f"{what} contains NaN or infinite values")
    return a


def quantize_weight(w) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``[C, K]`` weights per output channel.

    Returns
    -------
    q : ndarray, int8 ``[C, K]``
        ``rint(w / scale[:, None])`` in ``[-127, 127]``; zeros stay zeros, so N:M masks survive.
    scale : ndarray, float32 ``[C]``
        ``max|w_c| / 127``; an all-zero row gets scale 1 (no division by zero, dequantizes to 0).
    """
    w = _real_array(w, "weight")
    if w.ndim != 2:
        raise FlexCimError(f"weight must be 2-D [out_features, in_features], not {w.shape}")
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0])
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.astype(np.float64)[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale


def act_scale(x) -> float:
    """Per-tensor activation scale ``max|x| / 127`` (1.0 for an all-zero tensor)."""
    x = _real_array(x, "activations")
    amax = float(np.abs(x).max()) if x.size else 0.0
    return float(np.float32(amax / QMAX)) if amax > 0 else 1.0


def act_scales(x, granularity: str) -> np.ndarray:
    """Scales of 2-D activations ``[T, K]``, one per row, float32 ``[T]``.

    ``tensor``: every row gets :func:`act_scale` of the whole array; ``token``: row ``t`` gets
    ``max|x_t| / 127`` (1.0 for an all-zero row), computed exactly as :func:`act_scale` would
    for that row alone.
    """
    if granularity not in ACT_GRANULARITIES:
        raise FlexCimError(f"activation granularity must be one of {ACT_GRANULARITIES}, "
                           f"not {granularity!r}")
    x = _real_array(x, "activations")
    if x.ndim != 2:
        raise FlexCimError(f"activations must be 2-D [tokens, in_features], not {x.shape}")
    if granularity == "tensor":
        return np.full(x.shape[0], act_scale(x), dtype=np.float32)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0])
    return np.where(amax > 0, (amax / QMAX).astype(np.float32), 1.0).astype(np.float32)


def quantize_act(x, scale) -> np.ndarray:
    """Quantize activations: ``rint(x / scale)`` saturated to ``[-127, 127]`` as int8.

    ``scale`` is one per-tensor value, or one value per row of a 2-D ``x`` (:func:`act_scales`).
    """
    x = _real_array(x, "activations")
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim == 1:
        if x.ndim != 2 or scale.shape[0] != x.shape[0]:
            raise FlexCimError(f"per-row activation scale of length {scale.shape[0]} does not "
                               f"match activations of shape {x.shape}")
        scale = scale[:, None]
    elif scale.ndim != 0:
        raise FlexCimError(f"activation scale must be a scalar or 1-D, not shape {scale.shape}")
    if not np.all(np.isfinite(scale) & (scale > 0)):
        flat = scale.ravel()
        bad = float(flat[~(np.isfinite(flat) & (flat > 0))][0])
        raise FlexCimError(f"activation scale must be a positive finite number, not {bad!r}")
    return np.clip(np.rint(x / scale), -QMAX, QMAX).astype(np.int8)


def dequantize(q, scale) -> np.ndarray:
    """``q * scale`` as float32; ``scale`` is a scalar or one value per row of ``q``."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu":
        raise FlexCimError(f"quantized values must be integers, not dtype {q.dtype}")
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim == 1:
        if q.ndim < 1 or scale.shape[0] != q.shape[0]:
            raise FlexCimError(
                f"per-row scale of length {scale.shape[0]} does not match {q.shape[0]} rows"
            )
        scale = scale.reshape(-1, *([1] * (q.ndim - 1)))
    elif scale.ndim != 0:
        raise FlexCimError(f"scale must be a scalar or 1-D, not shape {scale.shape}")
    return (q.astype(np.float64) * scale).astype(np.float32)
