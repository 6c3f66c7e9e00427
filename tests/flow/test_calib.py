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
