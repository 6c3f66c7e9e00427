import copy

import pytest
import torch
from flexcim.flow import calib
from flexcim.flow.model import decoder_blocks, linear_layers
from torch import nn


def test_act_sq_mean_and_hessian_hand_case():
    layer = nn.Linear(2, 1)
    with calib.collecting({"l": layer}, hessian=True) as stats:
        layer(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    # mean of x_j^2 over tokens: not the norm, not the sum, not the mean of |x|
    assert stats["l"].act_sq_mean.tolist() == [5.0, 2.0]
    assert stats["l"].hessian.tolist() == [[5.0, 1.0], [1.0, 2.0]]
    assert not layer._forward_hooks


def test_block_by_block_equals_full_forward(tiny, tiny_windows):
    got = calib.calibrate(tiny, tiny_windows, batch_size=4, progress=False)
    with calib.collecting(linear_layers(tiny)) as ref, torch.no_grad():
        tiny(input_ids=tiny_windows)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].tokens == ref[name].tokens == 96
        assert torch.allclose(got[name].act_sq_mean, ref[name].act_sq_mean, rtol=1e-5)


def test_hooks_removed_after_exceptions(tiny, tiny_windows):
    def boom(block, stats):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        calib.calibrate(tiny, tiny_windows, on_block=boom, progress=False)
    with pytest.raises(RuntimeError, match="inside"), calib.collecting(linear_layers(tiny)):
        raise RuntimeError("inside")
    for block in decoder_blocks(tiny):
        assert not block.module._forward_pre_hooks
        assert all(not layer._forward_hooks for layer in block.linears.values())


def test_pruning_callback_feeds_pruned_outputs_forward(tiny, tiny_windows):
    """After zeroing block 0, block 1 sees inputs that differ from the dense run."""
    dense = calib.calibrate(tiny, tiny_windows, progress=False)

    def zero_first(block, stats):
        if block.index == 0:
            for layer in block.linears.values():
                layer.weight.zero_()
            return True
        return False

    pruned = calib.calibrate(tiny, tiny_windows, on_block=zero_first, progress=False)
    q0 = "model.layers.0.self_attn.q_proj"
    q1 = "model.layers.1.self_attn.q_proj"
    assert torch.allclose(pruned[q0].act_sq_mean, dense[q0].act_sq_mean)
    assert not torch.allclose(pruned[q1].act_sq_mean, dense[q1].act_sq_mean)


def test_input_groups_of_a_llama_block(tiny, tiny_windows):
    block = decoder_blocks(tiny)[1]
    captured = calib._block_inputs(tiny, decoder_blocks(tiny)[0].module, tiny_windows, 4)
    p = "model.layers.1."
    assert calib.input_groups(block, captured) == [
        [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
        [p + "self_attn.o_proj"], [p + "mlp.gate_proj", p + "mlp.up_proj"], [p + "mlp.down_proj"]]
    assert not any(layer._forward_pre_hooks for layer in block.linears.values())


def test_sequential_calibrates_each_group_on_the_pruned_groups_before_it(tiny, tiny_windows):
    """v_proj zeroed: o_proj reads only zeros (attention averages zero values); up_proj
    zeroed: down_proj reads act(gate) * 0.  Block-level calibration does not see either."""
    untouched = copy.deepcopy(tiny)
    seen = []

    def zero_v_and_up(block, stats):
        seen.append([n.rsplit(".", 1)[1] for n in stats])
        for name in stats:
            if name.endswith(("v_proj", "up_proj")):
                block.linears[name].weight.zero_()
        return True

    got = calib.calibrate(tiny, tiny_windows, on_block=zero_v_and_up, sequential=True,
                          progress=False)
    blocks = len(decoder_blocks(tiny))
    assert seen == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                    ["down_proj"]] * blocks
    for i in range(blocks):
        for kind in ("self_attn.o_proj", "mlp.down_proj"):
            stats = got[f"model.layers.{i}.{kind}"]
            assert stats.tokens == 96 and torch.count_nonzero(stats.act_sq_mean) == 0
    seen.clear()
    whole = calib.calibrate(untouched, tiny_windows, on_block=zero_v_and_up, progress=False)
    assert len(seen) == blocks  # one call per block, with every projection's statistics
    for kind in ("self_attn.o_proj", "mlp.down_proj"):
        assert torch.count_nonzero(whole[f"model.layers.0.{kind}"].act_sq_mean) > 0


def test_collect_head_statistics_equal_the_final_hidden_states(tiny_windows):
    """``collect`` on the LM head = sums over the final norm's output (computed here by the
    base model alone), and the head itself never runs (no logits are computed)."""
    from flexcim.flow.model import tiny_llama, untie_lm_head

    model = tiny_llama(0)
    untie_lm_head(model)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        stats = calib.collect(model, tiny_windows, {"lm_head": model.lm_head}, hessian=True,
                              batch_size=3)["lm_head"]
    finally:
        handle.remove()
    assert calls == []
    with torch.no_grad():
        h = model.model(input_ids=tiny_windows, use_cache=False).last_hidden_state
    x = h.reshape(-1, h.shape[-1]).double()
    assert stats.tokens == x.shape[0] == tiny_windows.numel()
    torch.testing.assert_close(stats.sq_sum.double(), (x * x).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.xtx.double(), x.T @ x, rtol=1e-5, atol=1e-4)
    assert not model.lm_head._forward_pre_hooks  # every hook removed
    # The model still computes logits afterwards.
    assert model(input_ids=tiny_windows[:1]).logits.shape[-1] == model.config.vocab_size
