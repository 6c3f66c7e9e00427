"""Reference N:M pruning in NumPy: keep the ``n`` largest magnitudes of every group of ``m``.

The format itself (:class:`~flexcim.spec.nm.NMPattern`, :class:`~flexcim.spec.nm.NMTensor` and
the selection rule :func:`~flexcim.spec.nm.topn_mask`) is the spec's; these are the golden
model's pruners, the NumPy twins of flow/'s (ties to the lowest index everywhere).
"""

from __future__ import annotations

import numpy as np
from flexcim.spec.nm import NMPattern, topn_mask

from flexcim.errors import FlexCimError


def _array(a, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise FlexCimError(f"{what} must be a NumPy array, not {type(a).__name__}")
    return a


def _scores_of(a: np.ndarray, what: str) -> np.ndarray:
    """``|a|`` as float64 (exact for every int8/int16/int32 value, so ties stay ties)."""
    if a.dtype.kind not in "iuf" or a.dtype.itemsize > 8:
        raise FlexCimError(f"{what} must hold real numbers, not dtype {a.dtype}")
    scores = np.abs(a.astype(np.float64))
    if not np.all(np.isfinite(scores)):
        raise FlexCimError(f"{what} contains NaN or infinite values")
    return scores


def nm_prune(dense: np.ndarray, pattern, scores: np.ndarray | None = None) -> np.ndarray:
    """Zero all but the ``n`` largest ``|score|`` of every group; returns a new array.

    Parameters
    ----------
    dense : ndarray ``[..., K]``
        Values to prune along the last axis (weights ``[C, K]`` or activations ``[T, K]``).
    pattern : NMPattern or str
        The pattern to enforce.
    scores : ndarray, optional
        Importance of each element, same shape as ``dense``; ``|dense|`` when omitted
        (magnitude pruning).  Wanda passes ``|W| * sqrt(E[x_j^2])``.
    """
    pattern = NMPattern.parse(pattern)
    dense = _array(dense, "dense")
    if scores is None:
        scores = dense
    scores = _array(scores, "scores")
    if scores.shape != dense.shape:
        raise FlexCimError(f"scores shape {scores.shape} does not match values shape {dense.shape}")
    mask = topn_mask(_scores_of(scores, "scores"), pattern)
    return np.where(mask, dense, np.zeros((), dtype=dense.dtype))


def act_topk(x: np.ndarray, pattern) -> np.ndarray:
    """N:M top-``|x|`` along the last axis of activations ``[..., K]`` (Amber Pruner's rule).

    The NumPy twin of flow/'s activation pruner: in every block of ``m`` input channels the
    ``n`` largest magnitudes survive, ties to the lowest channel.  ``int8`` input is safe
    (``|-128|`` is computed in float64, not in int8 where it would wrap).
    """
    return nm_prune(_array(x, "activations"), pattern)


__all__ = ["act_topk", "nm_prune"]
