import numpy as np
import pytest
from flexcim.golden.quant import act_scale, dequantize, quantize_act, quantize_weight

from flexcim.errors import FlexCimError


def test_weight_scale_is_per_output_channel():
    w = np.array([[0.5, -1.0, 0.25, 0.0], [10.0, 2.0, -3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_allclose(scale, [1.0 / 127, 10.0 / 127, 1.0], rtol=1e-7)
    assert q[0].tolist() == [64, -127, 32, 0]  # 63.5 rounds to even 64, 31.75 to 32
    assert q[1].tolist() == [127, 25, -38, 13]
    assert q[2].tolist() == [0, 0, 0, 0]  # all-zero row: no division by zero


def test_rounding_is_half_to_even_and_saturates_without_minus_128():
    x = np.array([2.5, 3.5, -2.5, -0.5, 0.5, 200.0, -200.0, -127.5])
    assert quantize_act(x, 1.0).tolist() == [2, 4, -2, 0, 0, 127, -127, -127]
    assert quantize_act(x, 1.0).min() > -128


def test_pruned_zeros_stay_zero():
    w = np.array([[0.0, 0.3, 0.0, -0.7]])
    q, _ = quantize_weight(w)
    assert (q == 0).tolist() == [[True, False, True, False]]


def test_dequantize_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 64))
    q, scale = quantize_weight(w)
    assert np.all(np.abs(dequantize(q, scale) - w) <= scale[:, None] / 2 + 1e-6)
    x = rng.normal(size=(8, 64)) * 3
    s = act_scale(x)
    assert np.all(np.abs(dequantize(quantize_act(x, s), s) - x) <= s / 2 + 1e-6)
    assert np.abs(quantize_act(x, s)).max() == 127


def test_bad_input():
    with pytest.raises(FlexCimError, match="activation scale must be a positive finite number"):
        quantize_act(np.ones(3), 0.0)
    with pytest.raises(FlexCimError, match="weight contains NaN"):
        quantize_weight(np.array([[1.0, np.nan]]))
    with pytest.raises(FlexCimError, match=r"weight must be 2-D"):
        quantize_weight(np.ones(3))
    with pytest.raises(FlexCimError, match="per-row scale of length 2 does not match 3 rows"):
        dequantize(np.zeros((3, 2), np.int8), np.ones(2))
    assert act_scale(np.zeros(4)) == 1.0


def test_per_token_scales_differ_from_per_tensor_by_hand():
    from flexcim.golden.quant import act_scales

    x = np.array([[0.5, -1.0, 0.25], [10.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(act_scales(x, "token"), [1 / 127, 10 / 127, 1.0], rtol=1e-7)
    np.testing.assert_allclose(act_scales(x, "tensor"), [10 / 127] * 3, rtol=1e-7)
    # each row's scale is act_scale of that row alone, to the bit
    assert act_scales(x, "token")[1] == np.float32(act_scale(x[1:2]))
    # row 0 per token: 63.5 -> 64 (half to even), -127, 31.75 -> 32; per tensor: 6.35 -> 6,
    # -12.7 -> -13, 3.175 -> 3
    assert quantize_act(x, act_scales(x, "token")).tolist() == [
        [64, -127, 32], [127, 25, -38], [0, 0, 0]]
    assert quantize_act(x, act_scales(x, "tensor"))[0].tolist() == [6, -13, 3]
    with pytest.raises(FlexCimError, match="activation granularity must be one of"):
        act_scales(x, "channel")
    with pytest.raises(FlexCimError, match="per-row activation scale of length 2 does not match"):
        quantize_act(x, np.ones(2))
    with pytest.raises(FlexCimError, match="activation scale must be a positive finite number, "
                                           "not 0.0"):
        quantize_act(x, np.array([1.0, 0.0, 1.0]))
