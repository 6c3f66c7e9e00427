"""W8A8 (flow/quant.py): hand-computed cases, an independent float64 reference, the tiny model,
and one real SmolLM2 projection bit for bit against golden."""

import numpy as np
import pytest
import torch
from flexcim.flow import act
from flexcim.flow.model import linear_layers
from flexcim.flow.quant import (
    W8A8Config,
    integer_matmul,
    quantize_input,
    quantize_weight,
    w8a8,
    w8a8_linear,
)
from flexcim.golden.matmul import sparse_matmul
from flexcim.spec.nm import NMPattern, NMTensor

from flexcim.errors import FlexCimError


def test_token_and_tensor_scales_and_half_to_even_rounding_by_hand():
    # Two tokens of one sequence, binary-exact.  Per token: row 0 max 127/16 -> scale 1/16,
    # row 1 max 127/2 -> scale 1/2.  Per tensor: scale 1/2 for both rows.
    x = torch.tensor([[127 / 16, 2.5 / 16, -1.5 / 16, 0.5 / 16], [63.5, 1.25, -1.75, 0.25]])
    q, s = quantize_input(x, "token")
    assert s.tolist() == [1 / 16, 1 / 2]
    # 2.5 -> 2, -1.5 -> -2, 0.5 -> 0, -3.5 -> -4 (half to even; half away from zero would give
    # 3, -2, 1, -4; truncation 2, -1, 0, -3)
    assert q.tolist() == [[127, 2, -2, 0], [127, 2, -4, 0]]
    q, s = quantize_input(x, "tensor")
    assert s.tolist() == [1 / 2, 1 / 2]
    assert q.tolist() == [[16, 0, 0, 0], [127, 2, -4, 0]]  # 15.875 -> 16
    assert q.dtype == torch.int8 and s.dtype == torch.float32


def test_tensor_scale_is_per_sequence_not_per_batch():
    x = torch.zeros(2, 3, 4)
    x[0, 0, 0], x[1, 2, 1] = 2.54, 25.4
    x[0, 1, 2], x[1, 0, 3] = 1.0, 1.0
    q, s = quantize_input(x, "tensor")
    assert s.shape == (2, 3)
    assert s[0].tolist() == pytest.approx([0.02] * 3) and s[1].tolist() == pytest.approx([0.2] * 3)
    assert q[0, 1, 2] == 50 and q[1, 0, 3] == 5  # 1.0 / 0.02, 1.0 / 0.2
    # a sequence alone gets the same result as inside the batch: no batch-size dependence
    q1, s1 = quantize_input(x[1], "tensor")
    assert torch.equal(q1, q[1]) and torch.equal(s1, s[1])


def test_weight_scales_are_per_output_channel_and_keep_zeros():
    w = torch.tensor([[0.0, 0.5, 0.0, -1.0], [2.0, 0.0, -0.03, 0.0]])
    q, s = quantize_weight(w)
    assert s.tolist() == pytest.approx([1 / 127, 2 / 127], rel=1e-6)
    # 63.5 -> 64 (even); -0.03 * 127 / 2 = -1.905 -> -2; per tensor it would be -1.905 too but
    # row 0 would be [0, 32, 0, -64]
    assert q.tolist() == [[0, 64, 0, -127], [127, 0, -2, 0]]


def test_integer_matmul_is_exact_beyond_float32_and_wraps_like_the_accumulator():
    k = 1536
    qx = torch.full((1, k), 127, dtype=torch.int8)
    qw = torch.full((2, k), 127, dtype=torch.int8)
    qw[1, 0] = 126  # an odd sum above 2**24: not a float32 number
    exact = qx.numpy().astype(np.int64) @ qw.numpy().astype(np.int64).T
    assert int(exact[0, 1]) > 2**24 and int(exact[0, 1]) % 2 == 1
    f32 = (qx.float() @ qw.float().T).to(torch.int64).numpy()
    assert not np.array_equal(f32, exact)  # float32 would round: this test can tell
    assert np.array_equal(integer_matmul(qx, qw, 32).numpy(), exact)
    # 16-bit accumulator: 4 x 127 x 127 = 64516 wraps to 64516 - 65536 = -1020
    small = integer_matmul(torch.full((1, 4), 127, dtype=torch.int8),
                           torch.full((1, 4), 127, dtype=torch.int8), 16)
    assert small.tolist() == [[-1020]]
    with pytest.raises(FlexCimError, match="int8 operands"):
        integer_matmul(qx.float(), qw, 32)


@pytest.mark.parametrize("k", [1024, 1025, 2048 + 5])
def test_exact_sums_over_chunk_boundaries_with_the_extreme_operands(k):
    # float32 chunks of 1024 terms: at the boundary and past it, with -128 and 127 (the largest
    # products) placed so every chunk's sum is extreme, against an int64 reference
    g = torch.Generator().manual_seed(k)
    qx = torch.randint(-128, 128, (3, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-128, 128, (4, k), generator=g, dtype=torch.int8)
    qx[0], qw[0] = -128, -128  # + 2**14 per term: 2**24 in a full chunk
    qx[1, 1::2] = 127
    qw[1, ::3] = -128
    qx[2], qw[2] = 127, 127
    qw[2, 0] = 126  # odd sums: past 2**24 one float32 product over all k terms would round
    reference = qx.numpy().astype(np.int64) @ qw.numpy().astype(np.int64).T
    assert int(reference[0, 0]) == k * 2**14
    assert int(reference[2, 2]) == k * 127 * 127 - 127
    assert np.array_equal(integer_matmul(qx, qw, 48).numpy(), reference)


def test_w8a8_linear_matches_an_independent_float64_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=g) * 3
    x[0, 1, 7] = 40.0  # an outlier: per token and per tensor differ
    w = torch.randn(12, 32, generator=g)
    bias = torch.randn(12, generator=g)

    def reference(granularity):
        xd, wd = x.double(), w.double()
        sw = (wd.abs().amax(1) / 127).float().double()
        qw = torch.clamp(torch.round(wd / sw[:, None]), -127, 127)
        if granularity == "token":
            sx = (xd.abs().amax(-1, keepdim=True) / 127).float().double()
        else:
            sx = (xd.abs().amax((-2, -1), keepdim=True) / 127).float().double()
        qx = torch.clamp(torch.round(xd / sx), -127, 127)
        return ((qx @ qw.T) * sx * sw + bias.double()).float()

    qw, sw = quantize_weight(w)
    outs = {}
    for granularity in ("token", "tensor"):
        outs[granularity] = w8a8_linear(x, qw, sw, bias, W8A8Config(granularity))
        assert torch.equal(outs[granularity], reference(granularity))
    assert not torch.equal(outs["token"], outs["tensor"])
    # per token is closer to float on the outlier's sequence
    y = x @ w.T + bias
    err = {k: float((v[0] - y[0]).norm()) for k, v in outs.items()}
    assert err["token"] < err["tensor"]


def test_config_and_accumulator_bad_input(tiny, tiny_windows):
    with pytest.raises(FlexCimError, match="activation granularity must be one of .* not 'row'"):
        W8A8Config("row")
    with pytest.raises(FlexCimError, match="acc_bits must be from 16 to 64, not 8"):
        W8A8Config(acc_bits=8)
    # tiny llama: K = 32 (attention, gate, up) sums reach 516,128 (20 bits signed), K = 64
    # (down) 1,032,256 (21 bits)
    with pytest.raises(FlexCimError) as info:
        with w8a8(tiny, W8A8Config(acc_bits=20)):
            pass
    message = str(info.value)
    assert "acc_bits=20 is too small" in message and "K=32" not in message
    assert ("4 projection(s) with K=64 (e.g. model.layers.0.mlp.down_proj) can reach 1,032,256, "
            "needing 21 bits") in message
    assert "\n" not in message
    with w8a8(tiny, W8A8Config(acc_bits=21)):
        pass
    with pytest.raises(FlexCimError, match="no projection named 'nope'"):
        with w8a8(tiny, W8A8Config(), capture="nope"):
            pass


def test_w8a8_context_on_the_tiny_model(tiny, tiny_windows):
    with torch.no_grad():
        dense = tiny(input_ids=tiny_windows).logits
        name = "model.layers.1.mlp.down_proj"
        config = act.ActConfig(pattern="4:8", projections=("down",))
        with act.activation_pruning(tiny, config), w8a8(tiny, W8A8Config(), capture=name) as cap:
            quant = tiny(input_ids=tiny_windows).logits
        after = tiny(input_ids=tiny_windows).logits
    assert torch.equal(after, dense)  # the float forwards are back
    assert not any("forward" in vars(m) for m in linear_layers(tiny).values())
    assert not torch.equal(quant, dense)
    assert float((quant - dense).abs().max()) < 0.1 * float(dense.abs().max())
    # the captured operands: top-k'd inputs (4 of every 8 non-zero at most), the model's int8
    # weight, and integer sums equal to an int64 matmul of them
    qx = torch.cat(cap.act).numpy()
    assert qx.shape == (tiny_windows.numel(), 64)
    assert ((qx.reshape(-1, 8) != 0).sum(1) <= 4).all()
    qw, sw = quantize_weight(linear_layers(tiny)[name].weight)
    assert torch.equal(cap.weight, qw) and torch.equal(cap.weight_scale, sw)
    acc = torch.cat(cap.acc).numpy()
    assert np.array_equal(acc, qx.astype(np.int64) @ qw.numpy().astype(np.int64).T)
    # one W8A8 context at a time; the refused one leaves the model float
    with torch.no_grad(), w8a8(tiny, W8A8Config()):
        with pytest.raises(FlexCimError, match="already has its forward replaced"):
            with w8a8(tiny, W8A8Config()):
                pass
        assert not torch.equal(tiny(input_ids=tiny_windows).logits, dense)
    assert not any("forward" in vars(m) for m in linear_layers(tiny).values())


@pytest.mark.slow
def test_real_smollm2_projection_is_bit_exact_with_golden():
    """down_proj of block 3 (K = 1536: sums beyond float32's 2**24), weights pruned 8:16 by
    magnitude, real activations of Austen text pruned 8:16 (top-|x|), the model in W8A8: the
    integer sums the torch path used equal golden.sparse_matmul on the compressed weight and a
    naive int64 matmul, and flow export's layer holds the same int8 weight."""
    from flexcim.flow import prune
    from flexcim.flow.export import build_layer
    from flexcim.flow.model import load_model
    from flexcim.flow.text import load_corpus, token_windows

    lm = load_model()
    model = lm.model
    name = "model.layers.3.mlp.down_proj"
    layer = linear_layers(model)[name]
    pattern = NMPattern(8, 16)
    original = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight.copy_(prune.prune_nm(layer.weight, prune.magnitude_scores(layer.weight),
                                              n_keep=8, m=16))
        windows = token_windows(lm.tokenizer, load_corpus().calibration, seq_len=64, count=2,
                                seed=0)
        config = act.ActConfig(pattern="8:16", projections=("down",))
        with torch.no_grad(), act.activation_pruning(model, config), \
                w8a8(model, W8A8Config(), capture=name) as cap:
            model(input_ids=windows)
        weight = layer.weight.detach()
        exported = build_layer(name, weight, pattern, None)
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)
    qx = torch.cat(cap.act).numpy()
    acc = torch.cat(cap.acc).numpy()
    assert qx.shape == (128, 1536) and ((qx.reshape(-1, 16) != 0).sum(1) <= 8).all()
    qw = cap.weight.numpy()
    compressed = NMTensor.compress(qw, pattern)
    golden = sparse_matmul(qx, compressed, 32)
    naive = qx.astype(np.int64) @ qw.astype(np.int64).T
    assert np.abs(naive).max() > 2**16  # sums of many products, not a degenerate case
    assert np.array_equal(acc, golden.astype(np.int64))
    assert np.array_equal(acc, naive)
    assert np.array_equal(exported.weight.decompress(), qw)
    assert np.array_equal(exported.weight_scale, cap.weight_scale.numpy())


def test_smoothing_scales_by_hand():
    from flexcim.flow.quant import smoothing_scales

    x = torch.tensor([16.0, 1.0, 0.0, 4.0])
    w1 = torch.tensor([[1.0, 4.0, 2.0, 0.0], [-0.25, 1.0, 1.0, 0.0]])
    w2 = torch.tensor([[0.5, -9.0, 1.0, 0.0]])
    # alpha 0.5: sqrt(16) / sqrt(1) = 4, sqrt(1) / sqrt(9) = 1/3 (max over both weights), zero
    # input or zero weight column -> 1
    s = smoothing_scales(x, [w1, w2], 0.5)
    assert s.tolist() == pytest.approx([4.0, 1 / 3, 1.0, 1.0])
    # alpha 1: s = max|x| (weights ignored, but where their column is 0)
    assert smoothing_scales(x, [w1, w2], 1.0).tolist() == pytest.approx([16.0, 1.0, 1.0, 1.0])


def test_smoothing_keeps_the_float_model_and_helps_int8_with_an_outlier_channel(tiny,
                                                                              tiny_windows):
    from flexcim.flow.quant import smooth

    with torch.no_grad():
        # an outlier input channel of every MLP (as LLMs have), via the norm's gain
        for block in tiny.model.layers:
            block.post_attention_layernorm.weight[3] = 40.0
        dense = tiny(input_ids=tiny_windows).logits
        with w8a8(tiny, W8A8Config()):
            plain = tiny(input_ids=tiny_windows).logits
        summary = smooth(tiny, tiny_windows, 0.5)
        assert set(summary) == {"qkv", "gate/up", "down"}
        smoothed = tiny(input_ids=tiny_windows).logits
        with w8a8(tiny, W8A8Config()):
            both = tiny(input_ids=tiny_windows).logits
    assert torch.allclose(smoothed, dense, atol=1e-5, rtol=1e-4)  # the same float function
    assert float((both - dense).norm()) < 0.5 * float((plain - dense).norm())
    with pytest.raises(FlexCimError, match=r"smoothing alpha must be in \[0, 1\], not 1.5"):
        smooth(tiny, tiny_windows, 1.5)


def test_the_demos_rtl_operands_are_the_projections_operands_inside_the_w8a8_run(tiny,
                                                                                  tiny_windows):
    # What the demo drives the RTL with (flexcim.demo.captured_operands), on the tiny model: a
    # projection pruned to 2:4 with 4:8 activations, captured inside a W8A8 run.  golden's
    # sparse_matmul of those operands must give the sums the run computed, and flow export's
    # build_layer must quantize the same float inputs and weight to the same int8 operands.
    from flexcim.flow.export import build_layer

    from flexcim.demo import captured_operands

    name = "model.layers.1.mlp.down_proj"
    layer = linear_layers(tiny)[name]
    with torch.no_grad():
        w = layer.weight.reshape(-1, 4)
        drop = w.abs().argsort(dim=1)[:, :2]  # the two smallest of every group of 4
        layer.weight.copy_(w.scatter(1, drop, 0.0).reshape(layer.weight.shape))
        config = act.ActConfig(pattern="4:8", projections=("down",))
        with act.activation_pruning(tiny, config), w8a8(tiny, W8A8Config(), capture=name) as cap:
            tiny(input_ids=tiny_windows)
    ops = captured_operands(cap, "2:4", 5)
    assert ops["act"].shape == (5, layer.in_features)
    assert ops["sums"].shape == (5, layer.out_features)
    assert str(ops["weight"].pattern) == "2:4"
    assert np.array_equal(ops["weight"].decompress(), cap.weight.numpy())
    assert np.array_equal(sparse_matmul(ops["act"], ops["weight"], 32), ops["sums"])
    assert np.array_equal(ops["sums"], torch.cat(cap.acc)[:5].numpy())
    assert ((ops["x"].reshape(-1, 8) != 0).sum(1) <= 4).all()  # inputs after the top-k
    exported = build_layer(name, layer.weight, NMPattern.parse("2:4"), ops["x"],
                           act_pattern=NMPattern.parse("4:8"))
    assert exported.weight.equals(ops["weight"])
    assert np.array_equal(exported.act, ops["act"])
    assert np.array_equal(exported.act_scale, ops["act_scale"])
    assert np.array_equal(exported.weight_scale, ops["weight_scale"])


def test_w8a8_with_smoothing_is_smooth_then_w8a8_and_leaves_the_model_as_it_was(tiny,
                                                                                tiny_windows):
    from flexcim.flow.quant import smooth

    name = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        for block in tiny.model.layers:  # an outlier channel, so that smoothing matters
            block.post_attention_layernorm.weight[3] = 40.0
        before = {k: v.detach().clone() for k, v in tiny.state_dict().items()}
        with w8a8(tiny, W8A8Config(), capture=name) as plain_cap:
            plain = tiny(input_ids=tiny_windows).logits
        with w8a8(tiny, W8A8Config(smooth=0.5), calib=tiny_windows, capture=name) as cap:
            inside = tiny(input_ids=tiny_windows).logits
        after = tiny.state_dict()
        # every tensor restored bit for bit: smoothing lasts as long as the context
        assert all(torch.equal(before[k], after[k]) for k in before)
        # the reference: fold the scales by hand (flow.quant.smooth), then plain W8A8
        smooth(tiny, tiny_windows, 0.5)
        smoothed_weight = linear_layers(tiny)[name].weight.detach().clone()
        with w8a8(tiny, W8A8Config()):
            reference = tiny(input_ids=tiny_windows).logits
        for k, v in before.items():  # undo by hand, for the last check below
            tiny.state_dict()[k].copy_(v)
    assert torch.equal(inside, reference)
    assert not torch.equal(inside, plain)
    # the capture holds the smoothed float weight its int8 operand was quantized from
    assert torch.equal(cap.float_weight, smoothed_weight)
    assert not torch.equal(cap.float_weight, plain_cap.float_weight)
    assert torch.equal(quantize_weight(cap.float_weight)[0], cap.weight)
    with pytest.raises(FlexCimError, match=r"smoothing \(alpha 0.5\) needs calibration windows"):
        with w8a8(tiny, W8A8Config(smooth=0.5)):
            pass
    with pytest.raises(FlexCimError, match=r"smoothing alpha must be in \[0, 1\] \(or None\), "
                                           r"not 1.5"):
        W8A8Config(smooth=1.5)
    # an exception inside the block restores the tensors too
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with w8a8(tiny, W8A8Config(smooth=0.5), calib=tiny_windows):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
