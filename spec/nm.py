"""The N:M sparse format shared by flow/, golden/, hw/ and sim/.

Conventions (used everywhere in FlexCiM):

* a weight matrix is ``[out_features, in_features]`` = ``[C, K]`` as in ``torch.nn.Linear``, and
  a layer computes ``y = x @ W.T`` for activations ``x`` of shape ``[T, K]``;
* groups of ``M`` consecutive elements run along ``in_features`` (the reduction dimension) inside
  each output row; ``N`` is the number of elements *kept* per group;
* the compressed form keeps, per row, ``K * N / M`` values in group order and, for each, its
  position ``0 .. M-1`` inside its group.  Within a group the positions strictly increase.  The
  compressed column ``q = g * N + j`` holds slot ``j`` of group ``g``; hw/ loads compressed column
  ``q`` into cell row ``q mod rows`` of weight word ``q div rows`` (docs/architecture.md).

Selection is deterministic everywhere: among equal scores the lowest index is kept.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from flexcim.errors import FlexCimError

MAX_M = 32
"""Largest supported group size: indices then fit in 5 bits."""


@dataclasses.dataclass(frozen=True, order=True)
class NMPattern:
    """An N:M sparsity pattern: at most ``n`` non-zeros in every group of ``m``.

    Parameters
    ----------
    n : int
        Elements kept per group, ``1 <= n <= m``.
    m : int
        Group size along the reduction dimension, a power of two from 1 to 32.
    """

    n: int
    m: int

    def __post_init__(self):
        for name in ("n", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise FlexCimError(f"N:M pattern {name.upper()} must be an integer, not {value!r}")
            object.__setattr__(self, name, int(value))
        if not (1 <= self.m <= MAX_M and self.m & (self.m - 1) == 0):
            raise FlexCimError(
                f"N:M pattern M must be a power of two from 1 to {MAX_M}, not {self.m!r}"
            )
        if not 1 <= self.n <= self.m:
            raise FlexCimError(f"N:M pattern N must be from 1 to M={self.m}, not {self.n!r}")

    @classmethod
    def parse(cls, value: NMPattern | str | tuple[int, int]) -> NMPattern:
        """Build a pattern from ``"n:m"``, an ``(n, m)`` pair or a pattern (returned as is)."""
        if isinstance(value, NMPattern):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if match:
                return cls(int(match[1]), int(match[2]))
        raise FlexCimError(f"N:M pattern must look like '2:4', not {value!r}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned, ``1 - n/m``."""
        return 1.0 - self.n / self.m

    @property
    def density(self) -> float:
        """Fraction of weights kept, ``n/m``."""
        return self.n / self.m

    @property
    def ideal_speedup(self) -> float:
        """Speed-up over dense when only kept weights cost time, ``m/n``."""
        return self.m / self.n

    @property
    def is_dense(self) -> bool:
        return self.n == self.m

    def kept(self, k: int) -> int:
        """Number of kept elements in a row of ``k`` (``k`` must be a multiple of ``m``)."""
        check_groups(k, self)
        return k // self.m * self.n


def check_groups(k: int, pattern: NMPattern, what: str = "in_features K") -> None:
    """Raise unless a row of ``k`` elements splits into whole groups of ``pattern.m``."""
    if k < 1 or k % pattern.m:
        raise FlexCimError(
            f"{what}={k} is not a positive multiple of M={pattern.m} (pattern {pattern})"
        )


def _as_array(a, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise FlexCimError(f"{what} must be a NumPy array, not {type(a).__name__}")
    return a


def topn_mask(scores: np.ndarray, pattern: NMPattern) -> np.ndarray:
    """Boolean mask keeping the ``n`` largest scores in every group of ``m`` on the last axis.

    Ties go to the lowest index (a stable sort of the negated scores), so the result is the same
    on every machine and equals the torch implementation in flow/.
    """
    pattern = NMPattern.parse(pattern)
    k = scores.shape[-1] if scores.ndim else 0
    check_groups(k, pattern, "last axis")
    grouped = scores.reshape(*scores.shape[:-1], k // pattern.m, pattern.m)
    order = np.argsort(-grouped, axis=-1, kind="stable")[..., : pattern.n]
    mask = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask.reshape(scores.shape)


def satisfies(dense: np.ndarray, pattern) -> bool:
    """True when every group of ``dense`` along its last axis has at most ``n`` non-zeros."""
    pattern = NMPattern.parse(pattern)
    k = dense.shape[-1]
    if k % pattern.m:
        return False
    counts = np.count_nonzero(dense.reshape(*dense.shape[:-1], -1, pattern.m), axis=-1)
    return bool(np.all(counts <= pattern.n))


@dataclasses.dataclass(frozen=True, eq=False)
class NMTensor:
    """An N:M-sparse int8 weight matrix in compressed form.

    Parameters
    ----------
    values : ndarray, int8 ``[C, K*n/m]``
        Kept values, group by group; groups with fewer than ``n`` non-zeros are padded with 0.
    indices : ndarray, uint8 ``[C, K*n/m]``
        Position of each kept value inside its group of ``m``, strictly increasing per group.
    pattern : NMPattern
    shape : (int, int)
        The dense shape ``(C, K)``.
    """

    values: np.ndarray
    indices: np.ndarray
    pattern: NMPattern
    shape: tuple[int, int]

    def __post_init__(self):
        pattern = NMPattern.parse(self.pattern)
        object.__setattr__(self, "pattern", pattern)
        if len(self.shape) != 2:
            raise FlexCimError(f"NMTensor shape must be (C, K), not {self.shape!r}")
        c, k = (int(d) for d in self.shape)
        object.__setattr__(self, "shape", (c, k))
        check_groups(k, pattern)
        expected = (c, pattern.kept(k))
        for name, dtype in (("values", np.int8), ("indices", np.uint8)):
            array = _as_array(getattr(self, name), name)
            if array.dtype != dtype:
                raise FlexCimError(f"NMTensor {name} must be {np.dtype(dtype)}, not {array.dtype}")
            if array.shape != expected:
                raise FlexCimError(
                    f"NMTensor {name} shape {array.shape} does not match {expected} "
                    f"for dense shape {self.shape} and pattern {pattern}"
                )
            array = np.array(array, copy=True)
            array.flags.writeable = False
            object.__setattr__(self, name, array)
        if self.indices.size and int(self.indices.max()) >= pattern.m:
            row, col = np.argwhere(self.indices >= pattern.m)[0]
            raise FlexCimError(
                f"NMTensor index {self.indices[row, col]} at (row {row}, column {col}) "
                f"is not below M={pattern.m}"
            )
        if pattern.n > 1 and self.indices.size:
            grouped = self.indices.reshape(c, -1, pattern.n).astype(np.int16)
            bad = np.argwhere(np.diff(grouped, axis=-1) <= 0)
            if bad.size:
                row, group, _ = bad[0]
                raise FlexCimError(
                    f"NMTensor indices of row {row}, group {group} are not strictly increasing: "
                    f"{grouped[row, group].tolist()}"
                )

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def groups(self) -> int:
        """Groups per row, ``K / m``."""
        return self.shape[1] // self.pattern.m

    @classmethod
    def compress(cls, dense: np.ndarray, pattern) -> NMTensor:
        """Compress an int8 ``[C, K]`` matrix that satisfies ``pattern``.

        Raises
        ------
        FlexCimError
            When ``dense`` is not 2-D int8, when ``K`` is not a multiple of ``m``, or when a
            group holds more than ``n`` non-zeros (the first such (row, group) is named).
        """
        pattern = NMPattern.parse(pattern)
        dense = _as_array(dense, "weight")
        if dense.dtype != np.int8:
            raise FlexCimError(f"weight dtype must be int8, not {dense.dtype}")
        if dense.ndim != 2:
            raise FlexCimError(f"weight must be 2-D [out_features, in_features], not {dense.shape}")
        c, k = dense.shape
        check_groups(k, pattern)
        grouped = dense.reshape(c, k // pattern.m, pattern.m)
        counts = np.count_nonzero(grouped, axis=-1)
        if np.any(counts > pattern.n):
            row, group = np.argwhere(counts > pattern.n)[0]
            lo = group * pattern.m
            raise FlexCimError(
                f"weight row {row}, group {group} (in_features {lo}..{lo + pattern.m - 1}) has "
                f"{counts[row, group]} non-zeros; pattern {pattern} allows at most {pattern.n}"
            )
        # Every non-zero is kept; short groups are padded with their lowest-index zeros.
        mask = topn_mask((dense != 0).astype(np.float64), pattern)
        kept = pattern.kept(k)
        values = dense[mask].reshape(c, kept)
        indices = (np.nonzero(mask)[1] % pattern.m).astype(np.uint8).reshape(c, kept)
        return cls(values=values, indices=indices, pattern=pattern, shape=(c, k))

    def decompress(self) -> np.ndarray:
        """The dense int8 ``[C, K]`` matrix."""
        c, k = self.shape
        n, m = self.pattern.n, self.pattern.m
        group_base = (np.arange(self.values.shape[1]) // n) * m
        columns = group_base[None, :] + self.indices.astype(np.int64)
        dense = np.zeros((c, k), dtype=np.int8)
        np.put_along_axis(dense, columns, self.values, axis=1)
        return dense

    def equals(self, other: NMTensor) -> bool:
        return (
            self.pattern == other.pattern
            and self.shape == other.shape
            and np.array_equal(self.values, other.values)
            and np.array_equal(self.indices, other.indices)
        )


compress = NMTensor.compress
