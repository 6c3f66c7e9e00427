import numpy as np
import pytest
from flexcim.golden.matmul import result_dtype, sparse_matmul, wrap
from flexcim.golden.prune import nm_prune
from flexcim.spec.nm import NMPattern, compress
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flexcim.errors import FlexCimError

ALL_PATTERNS = [NMPattern(n, m) for m in (1, 2, 4, 8, 16, 32) for n in range(1, m + 1)]
INT8 = st.one_of(st.integers(-128, 127), st.sampled_from([-128, 127, 0, 1, -1]))


def reference(x, w_dense):
    """The independent reference: dense int64 matmul."""
    return x.astype(np.int64) @ w_dense.T.astype(np.int64)


def naive(x, t, acc_bits):
    """A naive loop over the compressed data with Python integers and an explicit wrap."""
    n, m = t.pattern.n, t.pattern.m
    out = np.zeros((x.shape[0], t.out_features), dtype=object)
    for row in range(x.shape[0]):
        for c in range(t.out_features):
            acc = 0
            for q in range(t.values.shape[1]):
                k = (q // n) * m + int(t.indices[c, q])
                acc += int(x[row, k]) * int(t.values[c, q])
            acc %= 2**acc_bits
            out[row, c] = acc - 2**acc_bits if acc >= 2 ** (acc_bits - 1) else acc
    return out


@st.composite
def cases(draw):
    pattern = draw(st.sampled_from(ALL_PATTERNS))
    t = draw(st.integers(1, 4))
    c = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 5))
    k = groups * pattern.m
    x = draw(hnp.arrays(np.int8, (t, k), elements=INT8))
    dense = draw(hnp.arrays(np.int8, (c, k), elements=INT8))
    zero_groups = draw(st.lists(st.integers(0, groups - 1), max_size=groups))
    for g in zero_groups:  # whole all-zero groups
        dense[:, g * pattern.m : (g + 1) * pattern.m] = 0
    return x, nm_prune(dense, pattern), pattern


@settings(max_examples=1500)
@given(cases())
def test_matches_int64_reference(case):
    x, w, pattern = case
    y = sparse_matmul(x, compress(w, pattern))
    assert y.dtype == np.int32
    assert np.array_equal(y, reference(x, w))


@settings(max_examples=300)
@given(cases(), st.sampled_from([16, 17, 20, 24, 31, 32, 33, 48, 64]))
def test_matches_naive_loop_with_wraparound(case, acc_bits):
    x, w, pattern = case
    t = compress(w, pattern)
    y = sparse_matmul(x, t, acc_bits=acc_bits)
    assert y.dtype == result_dtype(acc_bits)
    assert np.array_equal(y.astype(object), naive(x, t, acc_bits))


def test_thousands_of_random_cases_including_extremes():
    rng = np.random.default_rng(1234)
    for i in range(2000):
        pattern = ALL_PATTERNS[rng.integers(len(ALL_PATTERNS))]
        k = pattern.m * int(rng.integers(1, 9))
        t, c = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        if i % 10 == 0:  # saturated operands: -128/127 everywhere
            x = rng.choice(np.array([-128, 127], np.int8), size=(t, k))
            dense = rng.choice(np.array([-128, 127], np.int8), size=(c, k))
        else:
            x = rng.integers(-128, 128, size=(t, k), dtype=np.int8)
            dense = rng.integers(-128, 128, size=(c, k), dtype=np.int8)
        w = nm_prune(dense, pattern)
        assert np.array_equal(sparse_matmul(x, compress(w, pattern)), reference(x, w)), (i, pattern)


def test_extreme_values_wrap_like_a_twos_complement_accumulator():
    k = 64
    x = np.full((2, k), -128, dtype=np.int8)
    w = np.full((3, k), -128, dtype=np.int8)
    t = compress(w, "1:1")
    exact = 128 * 128 * k  # 2**20: one past the 21-bit maximum
    assert sparse_matmul(x, t, acc_bits=32)[0, 0] == exact
    assert sparse_matmul(x, t, acc_bits=21)[0, 0] == exact - 2**21
    assert sparse_matmul(x, t, acc_bits=22)[0, 0] == exact
    assert sparse_matmul(x, t, acc_bits=20)[0, 0] == 0
    x[1] = 127
    assert sparse_matmul(x, t, acc_bits=16)[1, 0] == ((-127 * 128 * k + 2**15) % 2**16) - 2**15


def test_long_reduction_is_exact():
    # K = 2**16 products of -128 * -128 sum to 2**30: exact in int32, checked against int64.
    k = 2**16
    x = np.full((1, k), -128, dtype=np.int8)
    w = compress(np.full((1, k), -128, dtype=np.int8), "1:1")
    assert sparse_matmul(x, w)[0, 0] == 2**30
    assert sparse_matmul(x, w, acc_bits=31)[0, 0] == -(2**30)


def test_wrap_edges():
    y = np.array([2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 0, -1], dtype=np.int64)
    assert wrap(y, 32).tolist() == [2**31 - 1, -(2**31), -(2**31), 2**31 - 1, 0, -1]
    assert wrap(y, 64).dtype == np.int64 and wrap(y, 64).tolist() == y.tolist()
    assert wrap(np.array([2**15]), 16).tolist() == [-(2**15)]


def test_shape_and_dtype_errors():
    w = compress(np.zeros((2, 8), np.int8), "2:4")
    with pytest.raises(FlexCimError, match="activations dtype must be int8, not int16"):
        sparse_matmul(np.zeros((1, 8), np.int16), w)
    with pytest.raises(FlexCimError, match="activations have 4 input channels but the weight has"):
        sparse_matmul(np.zeros((1, 4), np.int8), w)
    with pytest.raises(FlexCimError, match=r"must be 2-D \[tokens, in_features\], not \(8,\)"):
        sparse_matmul(np.zeros(8, np.int8), w)
    with pytest.raises(FlexCimError, match="acc_bits must be from 16 to 64, not 8"):
        sparse_matmul(np.zeros((1, 8), np.int8), w, acc_bits=8)
    with pytest.raises(FlexCimError, match="weight must be an NMTensor, not ndarray"):
        sparse_matmul(np.zeros((1, 8), np.int8), np.zeros((2, 8), np.int8))
