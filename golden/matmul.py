"""The bit-exact reference of what a FlexCiM macro computes.

Why one closed form is bit-exact for every configuration: inside the macro every stage before
the accumulator (cell products, sub-macro adder trees, the merging adder, the bit-serial shift)
is sized so that it cannot overflow; the only finite-width stage is the ``acc_bits``
two's-complement accumulator.  Two's-complement addition is addition modulo ``2**acc_bits``,
which is associative and commutative, so the order in which the hardware adds partial sums
(sub-macro by sub-macro, pass by pass, bit slice by bit slice) cannot change the result:

    y = wrap(x @ W.T, acc_bits)

where ``wrap`` maps an integer to its ``acc_bits``-bit two's-complement value.  The same argument
makes K- and C-tiling on the host exact (sim/ adds partial results with the same wrap).
"""

from __future__ import annotations

import numpy as np
from flexcim.spec.nm import NMTensor

from flexcim.errors import FlexCimError

# float64 represents every integer below 2**53 exactly; an int8 x int8 product is at most 2**14
# in magnitude, so sums of fewer than 2**38 products are exact whatever order BLAS adds them in.
_EXACT_TERMS = 2**38


def check_acc_bits(acc_bits) -> int:
    if isinstance(acc_bits, bool) or not isinstance(acc_bits, int | np.integer):
        raise FlexCimError(f"acc_bits must be an integer, not {acc_bits!r}")
    if not 16 <= acc_bits <= 64:
        raise FlexCimError(f"acc_bits must be from 16 to 64, not {acc_bits}")
    return int(acc_bits)


def result_dtype(acc_bits: int) -> np.dtype:
    """int32 when the accumulator fits in 32 bits, else int64."""
    return np.dtype(np.int32 if check_acc_bits(acc_bits) <= 32 else np.int64)


def wrap(y: np.ndarray, acc_bits: int) -> np.ndarray:
    """Two's-complement wrap of int64 values to ``acc_bits`` bits, as :func:`result_dtype`."""
    acc_bits = check_acc_bits(acc_bits)
    y = np.asarray(y, dtype=np.int64)
    if acc_bits < 64:
        half = np.int64(1) << np.int64(acc_bits - 1)
        # (y + half) mod 2**acc_bits - half, with the mask doing the modulo on two's complement.
        y = ((y + half) & ((half << np.int64(1)) - np.int64(1))) - half
    return y.astype(result_dtype(acc_bits))


def check_activations(x, in_features: int) -> np.ndarray:
    """Raise unless ``x`` is an int8 ``[T, in_features]`` array with ``T >= 1``."""
    if not isinstance(x, np.ndarray):
        raise FlexCimError(f"activations must be a NumPy array, not {type(x).__name__}")
    if x.dtype != np.int8:
        raise FlexCimError(f"activations dtype must be int8, not {x.dtype}")
    if x.ndim != 2 or x.shape[0] < 1:
        raise FlexCimError(f"activations must be 2-D [tokens, in_features], not {x.shape}")
    if x.shape[1] != in_features:
        raise FlexCimError(
            f"activations have {x.shape[1]} input channels but the weight has "
            f"in_features={in_features}"
        )
    return x


def sparse_matmul(x: np.ndarray, w: NMTensor, acc_bits: int = 32) -> np.ndarray:
    """``y = x @ W.T`` computed from the compressed weight, wrapped to ``acc_bits``.

    Parameters
    ----------
    x : ndarray, int8 ``[T, K]``
        Activations (any int8 value, -128 included).
    w : NMTensor
        The N:M-sparse weight ``[C, K]``.
    acc_bits : int
        Accumulator width of the hardware, 16..64.

    Returns
    -------
    ndarray ``[T, C]``, int32 when ``acc_bits <= 32`` else int64.

    The product is split by position inside the group: for every offset ``i`` in ``0..m-1``
    the kept values whose index is ``i`` form a ``[C, K/m]`` matrix multiplied by the
    activations ``x[:, i::m]``.  That touches only the compressed data and costs the same as
    one dense matmul, which runs in float64 BLAS because every partial sum is an integer below
    2**53 (checked).
    """
    if not isinstance(w, NMTensor):
        raise FlexCimError(f"weight must be an NMTensor, not {type(w).__name__}")
    acc_bits = check_acc_bits(acc_bits)
    x = check_activations(x, w.in_features)
    if w.in_features >= _EXACT_TERMS:
        raise FlexCimError(f"in_features={w.in_features} is too large for exact accumulation")
    n, m = w.pattern.n, w.pattern.m
    c, groups = w.out_features, w.groups
    values = w.values.reshape(c, groups, n).astype(np.float64)
    indices = w.indices.reshape(c, groups, n)
    x_by_offset = x.reshape(x.shape[0], groups, m).astype(np.float64)
    y = np.zeros((x.shape[0], c), dtype=np.float64)
    for offset in range(m):
        w_offset = np.where(indices == offset, values, 0.0).sum(axis=-1)  # [C, K/m]
        y += x_by_offset[:, :, offset] @ w_offset.T
    return wrap(np.rint(y).astype(np.int64), acc_bits)
