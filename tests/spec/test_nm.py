import numpy as np
import pytest
from flexcim.golden.prune import act_topk, nm_prune
from flexcim.spec.nm import NMPattern, NMTensor, compress, satisfies
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flexcim.errors import FlexCimError


# ----------------------------------------------------------------------------- NMPattern
def test_pattern_parse_print_and_properties():
    p = NMPattern.parse("2:4")
    assert (p.n, p.m) == (2, 4) and str(p) == "2:4"
    assert NMPattern.parse(" 1 : 8 ") == NMPattern(1, 8) == NMPattern.parse((1, 8))
    assert p.sparsity == 0.5 and NMPattern(1, 8).sparsity == 0.875 and NMPattern(1, 1).sparsity == 0
    assert NMPattern(1, 8).ideal_speedup == 8 and NMPattern(3, 4).density == 0.75
    assert NMPattern(4, 4).is_dense and not p.is_dense
    assert p.kept(12) == 6


@pytest.mark.parametrize(
    "text, message",
    [
        ("3:5", "M must be a power of two from 1 to 32, not 5"),
        ("2:64", "M must be a power of two from 1 to 32, not 64"),
        ("0:4", "N must be from 1 to M=4, not 0"),
        ("5:4", "N must be from 1 to M=4, not 5"),
        ("2-4", "must look like '2:4', not '2-4'"),
        ("", "must look like '2:4', not ''"),
    ],
)
def test_pattern_rejects_bad_values(text, message):
    with pytest.raises(FlexCimError, match=message):
        NMPattern.parse(text)


def test_pattern_rejects_non_integers():
    with pytest.raises(FlexCimError, match="must be an integer, not True"):
        NMPattern(True, 4)
    with pytest.raises(FlexCimError, match="must be an integer, not 2.0"):
        NMPattern(2.0, 4)


def test_kept_requires_whole_groups():
    with pytest.raises(FlexCimError, match="K=10 is not a positive multiple of M=4"):
        NMPattern(2, 4).kept(10)


# ----------------------------------------------------------------------------- selection
def test_prune_keeps_largest_magnitudes_per_group_not_per_row():
    w = np.array([[9, 8, 7, 6, 1, 2, 3, 4]], dtype=np.int8)
    # Per-row ranking would keep 9 and 8 only; per-group keeps the top 2 of each group of 4.
    assert nm_prune(w, "2:4").tolist() == [[9, 8, 0, 0, 0, 0, 3, 4]]


def test_prune_ties_go_to_the_lowest_index():
    assert nm_prune(np.array([1, 1, 1, 1]), "2:4").tolist() == [1, 1, 0, 0]
    assert nm_prune(np.array([0, 2, -2, 1]), "1:4").tolist() == [0, 2, 0, 0]
    assert nm_prune(np.array([0, -2, 2, 1]), "1:4").tolist() == [0, -2, 0, 0]


def test_prune_uses_scores_not_values_when_given():
    w = np.array([[5.0, -4.0, 3.0, 1.0]])
    scores = np.array([[0.1, 0.2, 0.3, 0.9]])  # Wanda-like: small weights, large activations
    assert nm_prune(w, "2:4", scores).tolist() == [[0.0, 0.0, 3.0, 1.0]]
    # The magnitude of the scores counts, not their sign.
    assert nm_prune(w, "1:4", -scores).tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_prune_keeps_n_not_prunes_n():
    w = np.arange(1, 9, dtype=np.int8).reshape(1, 8)
    assert np.count_nonzero(nm_prune(w, "1:8")) == 1
    assert np.count_nonzero(nm_prune(w, "6:8")) == 6


def test_act_topk_handles_int8_minimum():
    # |-128| overflows in int8 (it stays -128); the pruner must still see it as the largest.
    x = np.array([[-128, 127, 0, 1, 5, -6, 7, -8]], dtype=np.int8)
    out = act_topk(x, "1:4")
    assert out.dtype == np.int8
    assert out.tolist() == [[-128, 0, 0, 0, 0, 0, 0, -8]]


def test_act_topk_on_leading_dimensions():
    x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8) - 20
    out = act_topk(x, "2:8")
    assert out.shape == x.shape
    assert np.all(np.count_nonzero(out.reshape(2, 3, 1, 8), axis=-1) <= 2)


@given(
    x=hnp.arrays(np.int8, st.tuples(st.integers(1, 4), st.integers(1, 4).map(lambda g: 8 * g))),
    n=st.sampled_from([1, 2, 4, 8]),
)
def test_act_topk_keeps_the_n_largest_of_every_group(x, n):
    out = act_topk(x, NMPattern(n, 8))
    groups = x.astype(np.int64).reshape(x.shape[0], -1, 8)
    kept = out.astype(np.int64).reshape(groups.shape)
    for t in range(groups.shape[0]):
        for g in range(groups.shape[1]):
            mags = np.abs(groups[t, g])
            order = sorted(range(8), key=lambda i: (-mags[i], i))  # naive reference
            expect = np.zeros(8, dtype=np.int64)
            expect[order[:n]] = groups[t, g][order[:n]]
            assert kept[t, g].tolist() == expect.tolist()


def test_prune_rejects_bad_input():
    with pytest.raises(FlexCimError, match="last axis=6 is not a positive multiple of M=4"):
        nm_prune(np.ones((2, 6)), "2:4")
    with pytest.raises(FlexCimError, match="scores contains NaN"):
        nm_prune(np.ones((1, 4)), "2:4", np.array([[1, np.nan, 0, 0]]))
    with pytest.raises(FlexCimError, match=r"scores shape \(1, 8\) does not match values shape"):
        nm_prune(np.ones((1, 4)), "2:4", np.ones((1, 8)))
    with pytest.raises(FlexCimError, match="must be a NumPy array, not list"):
        nm_prune([1, 2, 3, 4], "2:4")


def test_satisfies():
    assert satisfies(np.array([[1, 0, 0, 2]]), "2:4")
    assert not satisfies(np.array([[1, 0, 3, 2]]), "2:4")
    assert not satisfies(np.array([[1, 0, 0]]), "2:4")


# ----------------------------------------------------------------------------- NMTensor
ALL_PATTERNS = [NMPattern(n, m) for m in (1, 2, 4, 8, 16, 32) for n in range(1, m + 1)]


@st.composite
def sparse_weights(draw, pattern=None):
    pattern = pattern or draw(st.sampled_from(ALL_PATTERNS))
    c = draw(st.integers(1, 5))
    g = draw(st.integers(1, 4))
    dense = draw(
        hnp.arrays(
            np.int8,
            (c, g * pattern.m),
            elements=st.one_of(st.integers(-128, 127), st.sampled_from([-128, 127, 0])),
        )
    )
    return nm_prune(dense, pattern), pattern


@given(sparse_weights())
def test_compress_round_trips_and_indices_increase(case):
    w, pattern = case
    t = compress(w, pattern)
    assert t.values.dtype == np.int8 and t.indices.dtype == np.uint8
    assert t.values.shape == t.indices.shape == (w.shape[0], w.shape[1] // pattern.m * pattern.n)
    assert np.array_equal(t.decompress(), w)
    grouped = t.indices.reshape(w.shape[0], -1, pattern.n).astype(int)
    assert np.all(np.diff(grouped, axis=-1) > 0)
    assert np.all(grouped < pattern.m)


def test_compress_layout_and_padding():
    w = np.array([[0, 5, 0, 0, 3, 0, 0, -4]], dtype=np.int8)
    t = compress(w, "2:4")
    # group 0 has one non-zero: padded with its lowest-index zero, indices stay increasing.
    assert t.values.tolist() == [[0, 5, 3, -4]]
    assert t.indices.tolist() == [[0, 1, 0, 3]]
    z = compress(np.zeros((2, 8), dtype=np.int8), "1:4")
    assert z.values.tolist() == [[0, 0], [0, 0]] and z.indices.tolist() == [[0, 0], [0, 0]]


def test_compress_names_the_first_offending_group():
    w = np.zeros((3, 8), dtype=np.int8)
    w[2, 4:7] = [1, 2, 3]
    w[1, 0:3] = [1, 2, 3]
    with pytest.raises(
        FlexCimError,
        match=r"weight row 1, group 0 \(in_features 0\.\.3\) has 3 non-zeros; "
        r"pattern 2:4 allows at most 2",
    ):
        compress(w, "2:4")


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 8), dtype=np.float32), "weight dtype must be int8, not float32"),
        (np.zeros((2, 8), dtype=np.int16), "weight dtype must be int8, not int16"),
        (np.zeros(8, dtype=np.int8), r"weight must be 2-D \[out_features, in_features\]"),
        (np.zeros((2, 6), dtype=np.int8), "in_features K=6 is not a positive multiple of M=4"),
    ],
)
def test_compress_rejects_bad_input(array, message):
    with pytest.raises(FlexCimError, match=message):
        compress(array, "2:4")


def test_nmtensor_validates_its_fields():
    ok = dict(
        values=np.zeros((1, 2), np.int8), indices=np.array([[0, 1]], np.uint8),
        pattern="2:4", shape=(1, 4),
    )
    NMTensor(**ok)
    with pytest.raises(FlexCimError, match="index 4 at \\(row 0, column 1\\) is not below M=4"):
        NMTensor(**{**ok, "indices": np.array([[0, 4]], np.uint8)})
    with pytest.raises(FlexCimError, match=r"row 0, group 0 are not strictly increasing: \[1, 1\]"):
        NMTensor(**{**ok, "indices": np.array([[1, 1]], np.uint8)})
    with pytest.raises(FlexCimError, match="values must be int8, not int16"):
        NMTensor(**{**ok, "values": np.zeros((1, 2), np.int16)})
    with pytest.raises(FlexCimError, match=r"indices shape \(1, 3\) does not match \(1, 2\)"):
        NMTensor(**{**ok, "indices": np.zeros((1, 3), np.uint8)})


def test_nmtensor_is_immutable():
    t = compress(np.eye(4, dtype=np.int8), "1:4")
    with pytest.raises(ValueError):
        t.values[0, 0] = 3
