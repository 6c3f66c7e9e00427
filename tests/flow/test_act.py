import numpy as np
import pytest
import torch
from flexcim.flow import act
from flexcim.flow.model import linear_layers, tiny_llama
from flexcim.golden.nm import NMPattern, act_topk

from flexcim.errors import FlexCimError


def test_topk_abs_hand_case_and_golden_twin():
    x = torch.tensor([[0.5, -3.0, 2.0, 1.0, -1.0, 1.0, 1.0, 0.0]])
    got = act.topk_activations(x, NMPattern(2, 4))
    assert got.tolist() == [[0.0, -3.0, 2.0, 0.0, -1.0, 1.0, 0.0, 0.0]]  # ties: lowest index
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(-5, 6, (8, 64), generator=g).float()
    assert np.array_equal(act.topk_activations(xs, NMPattern(8, 16)).numpy(),
                          act_topk(xs.numpy(), "8:16"))


def test_weight_aware_score_uses_column_norms():
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    norm = torch.tensor([1.0, 2.0, 1.0, 1.0])  # |x| * ||W_j||: 3 vs 4 -> channel 1 wins
    assert act.topk_activations(x, NMPattern(1, 4), norm).tolist() == [[0.0, 2.0, 0, 0]]
    assert act.topk_activations(x, NMPattern(1, 4)).tolist() == [[3.0, 0.0, 0, 0]]


def test_hooks_prune_prefill_only_and_come_off():
    model = tiny_llama(0)
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    config = act.ActConfig(pattern="2:4", projections=("q",))
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad(), act.activation_pruning(model, config) as names:
        assert len(names) == 4 and all(n.endswith("q_proj") for n in names)
        # registered after the pruning hook, so it sees what q_proj multiplies
        probe = q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
        probe.remove()
    prefill, decode = seen
    groups = lambda x: (x.reshape(-1, 4) != 0).sum(1)  # noqa: E731
    assert prefill.shape[-2] == 8 and int(groups(prefill).max()) == 2
    assert decode.shape[-2] == 1 and int(groups(decode).max()) > 2  # decode stays dense
    assert all(not layer._forward_pre_hooks for layer in linear_layers(model).values())


def test_pruning_changes_prefill_logits_and_restores_dense():
    model = tiny_llama(0)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with act.activation_pruning(model, act.ActConfig(pattern="2:4")):
            pruned = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(dense, pruned) and torch.equal(dense, again)


def test_hooks_removed_after_exception():
    model = tiny_llama(0)
    with pytest.raises(RuntimeError), act.activation_pruning(model, act.ActConfig()):
        raise RuntimeError
    assert all(not layer._forward_pre_hooks for layer in linear_layers(model).values())


def test_sensitivity_matches_direct_computation_and_skip_budget():
    model = tiny_llama(0)
    windows = torch.randint(0, 96, (2, 16))
    config = act.ActConfig(pattern="2:4", score="weight")
    sens = act.sensitivity(model, windows, config)
    assert len(sens) == 28
    name = "model.layers.2.mlp.down_proj"
    layer = linear_layers(model)[name]
    captured = []
    h = layer.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    with torch.no_grad():
        model(input_ids=windows)
    h.remove()
    x = captured[0].detach().reshape(-1, layer.in_features)
    w = layer.weight.detach()
    norm = w.norm(dim=0)
    y = x @ w.T
    direct = (((x - act.topk_activations(x, NMPattern(2, 4), norm)) @ w.T).norm()
              / y.norm())
    assert sens[name] == pytest.approx(float(direct), rel=1e-4)
    skip = act.skip_most_sensitive(sens, 0.25)
    assert len(skip) == 7 and min(sens[n] for n in skip) >= max(
        v for n, v in sens.items() if n not in skip)
    assert act.skip_most_sensitive(sens, 0.0) == ()
    with pytest.raises(FlexCimError, match="skip budget"):
        act.skip_most_sensitive(sens, 1.5)


def test_act_bad_inputs():
    with pytest.raises(FlexCimError, match="activation score must be one of"):
        act.ActConfig(score="max")
    with pytest.raises(FlexCimError, match="unknown projection kind 'lm'"):
        act.ActConfig(projections=("q", "lm"))
    odd = tiny_llama(0, hidden=24, intermediate=40)
    with pytest.raises(FlexCimError, match="M=16 does not divide the input width 24"):
        act.ActConfig(pattern="8:16").targets(odd)
