import numpy as np
import pytest
import torch
from flexcim.flow import act
from flexcim.flow.model import linear_layers, next_call_cache, tiny_llama
from flexcim.golden.prune import act_topk
from flexcim.spec.nm import NMPattern

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


def groups(x):
    """Non-zeros per group of 4 along the last axis."""
    return (x.reshape(-1, 4) != 0).sum(1)


def _prefill_then_decode(model, layer, config, ids):
    """The pruned model's module names, and what ``layer`` multiplies in a prefill of ``ids``
    and in the next decode step (one token per sequence, with the KV cache)."""
    seen = []
    with torch.no_grad(), act.activation_pruning(model, config) as names:
        # registered after the pruning hook, so it sees what the layer multiplies
        probe = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], use_cache=True, **next_call_cache(model, out))
        probe.remove()
    prefill, decode = seen
    return names, prefill, decode


def test_hooks_prune_prefill_only_and_come_off():
    model = tiny_llama(0)
    q = model.model.layers[0].self_attn.q_proj
    config = act.ActConfig(pattern="2:4", projections=("q",))
    names, prefill, decode = _prefill_then_decode(model, q, config, torch.randint(0, 96, (1, 8)))
    assert len(names) == 4 and all(n.endswith("q_proj") for n in names)
    assert prefill.shape[-2] == 8 and int(groups(prefill).max()) == 2
    assert decode.shape[-2] == 1 and int(groups(decode).max()) > 2  # decode stays dense
    assert all(not layer._forward_pre_hooks for layer in linear_layers(model).values())


def test_a_call_on_a_filled_cache_is_decode_and_stays_dense():
    """Several tokens continuing a non-empty KV cache (a window's later tokens, teacher-forced)
    are decode, not prefill; the same tokens on an empty cache are pruned."""
    model = tiny_llama(0)
    q = model.model.layers[1].self_attn.q_proj
    ids = torch.randint(0, 96, (2, 8))
    seen = []
    with torch.no_grad(), act.activation_pruning(model, act.ActConfig("1:4", projections=("q",))):
        probe = q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        out = model(input_ids=ids[:, :5], use_cache=True)
        model(input_ids=ids[:, 5:], use_cache=True, **next_call_cache(model, out))
        model(input_ids=ids[:, 5:], use_cache=True)
        probe.remove()
    prompt, continued, fresh = seen
    assert int(groups(prompt).max()) == 1 and int(groups(fresh).max()) == 1
    assert continued.shape[-2] == 3 and int(groups(continued).max()) == 4


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
    config = act.ActConfig(pattern="2:4", score="weight", projections=act.PROJECTIONS)
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


def test_pruned_mac_share_counts_in_times_out_per_target():
    model = tiny_llama(0)  # hidden 32, intermediate 64, 4 heads of 8, 2 KV heads: k/v are 32->16
    per_block = {"q": 32 * 32, "k": 32 * 16, "v": 32 * 16, "o": 32 * 32,
                 "gate": 32 * 64, "up": 32 * 64, "down": 64 * 32}
    total = sum(per_block.values())
    every = act.ActConfig(projections=act.PROJECTIONS)
    assert act.pruned_mac_share(model, every) == pytest.approx(1.0)
    default = act.ActConfig()  # q and down
    assert act.pruned_mac_share(model, default) == pytest.approx((32 * 32 + 64 * 32) / total)
    config = act.ActConfig(projections=("k", "down"))
    assert act.pruned_mac_share(model, config) == pytest.approx((32 * 16 + 64 * 32) / total)
    # skipping one block's down_proj removes a quarter of that kind (4 blocks)
    skip = act.ActConfig(projections=("down",), skip=("model.layers.0.mlp.down_proj",))
    assert act.pruned_mac_share(model, skip) == pytest.approx(0.75 * 64 * 32 / total)


def test_choose_projections_greedy_largest_mac_share_within_budget():
    model = tiny_llama(0)
    layers = linear_layers(model)
    cost = {"q": 0.01, "k": 0.01, "v": 0.03, "o": 0.02, "gate": 0.2, "up": 0.3, "down": 0.02}
    calls = []

    def evaluate():  # perplexity 10 * (1 + cost of every kind whose inputs are pruned now)
        hooked = {act.projection_kind(n) for n, m in layers.items() if m._forward_pre_hooks}
        calls.append(hooked)
        return 10.0 * (1 + sum(cost[k] for k in hooked))

    study = act.choose_projections(model, evaluate, budget=0.05, groups=1)  # kinds only
    # step 1: down has the largest MAC share of the kinds within 5 %; step 2: q and o tie on
    # MACs with down, q costs less; step 3: k; step 4: nothing fits (v +7 %, o +6 %)
    assert study["projections"] == ("q", "k", "down")
    assert study["result"]["increase"] == pytest.approx(0.04)
    assert [len(s) for s in study["steps"]] == [7, 6, 5, 4]
    assert calls[0] == set() and study["baseline"] == 10.0  # the dense-activation baseline
    assert len(calls) == 1 + 7 + 6 + 5 + 4
    assert all(not m._forward_pre_hooks for m in layers.values())
    with pytest.raises(FlexCimError, match="budget must be a positive fraction, not 0"):
        act.choose_projections(model, evaluate, budget=0)


def test_choose_projections_then_adds_kinds_in_block_ranges():
    """After the kinds, one kind in half of the blocks: the cheap half of gate fits, nothing
    after it; a margin holds back part of the budget."""
    model = tiny_llama(0)  # 4 blocks: halves 0-1 and 2-3
    layers = linear_layers(model)
    cost = {"q": 0.01, "k": 0.01, "v": 0.03, "o": 0.02, "up": 0.4, "down": 0.02}
    gate = [0.05, 0.05, 0.002, 0.002]  # per block

    def evaluate():
        total = 0.0
        for name, m in layers.items():
            if m._forward_pre_hooks:
                kind, block = act.projection_kind(name), int(name.split(".")[2])
                total += gate[block] if kind == "gate" else cost[kind] / 4
        return 10.0 * (1 + total)

    study = act.choose_projections(model, evaluate, budget=0.05, groups=2)
    assert study["projections"] == ("q", "k", "down", "gate@2-3")
    assert study["result"]["increase"] == pytest.approx(0.044)
    # v, o, gate and up, each in two halves; then the seven left, none of which fits
    assert [len(s) for s in study["steps"]] == [7, 6, 5, 4, 8, 7]
    config = act.ActConfig(projections=study["projections"])
    gates = [n for n in config.targets(model) if act.projection_kind(n) == "gate"]
    assert gates == ["model.layers.2.mlp.gate_proj", "model.layers.3.mlp.gate_proj"]
    assert study["result"]["mac_share"] == pytest.approx(act.pruned_mac_share(model, config))
    # a margin of 0.5: the selection threshold is 2.5 %: down (2 %), no second kind fits
    # (q or k: 3 %), then the cheap half of gate (2.4 %)
    held = act.choose_projections(model, evaluate, budget=0.05, margin=0.5, groups=2)
    assert held["projections"] == ("down", "gate@2-3")
    assert held["result"]["increase"] == pytest.approx(0.024)
    for bad, match in (({"margin": 1.0}, "budget margin must be a fraction in \\[0, 1\\), "
                                         "not 1.0"),
                       ({"groups": 0}, "block groups must be a positive integer, not 0")):
        with pytest.raises(FlexCimError, match=match):
            act.choose_projections(model, evaluate, **bad)


def test_block_range_entries():
    model = tiny_llama(0)
    config = act.ActConfig(projections=("q", "down@1-2"))
    assert sorted(config.targets(model)) == sorted([
        "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj",
        *[f"model.layers.{i}.self_attn.q_proj" for i in range(4)]])
    assert act.ordered(("gate@2-3", "down", "gate@0-1", "q")) == ("q", "down", "gate@0-1",
                                                                   "gate@2-3")
    assert act.ordered(("up@2-3", "q", "up@0-1", "k@1-1", "k@0-0"), 4) == ("q", "up", "k@0-0",
                                                                           "k@1-1")
    assert act.ordered(("up@0-2", "up@2-3"), 4) == ("up",)
    assert act.block_groups(30, 3) == [range(0, 10), range(10, 20), range(20, 30)]
    assert act.block_groups(4, 3) == [range(0, 1), range(1, 3), range(3, 4)]
    for entry, match in (("gate@3-1", "expected gate@FIRST-LAST"),
                         ("gate@x", "expected gate@FIRST-LAST"),
                         ("mlp@0-1", "unknown projection kind 'mlp' in 'mlp@0-1'")):
        with pytest.raises(FlexCimError, match=match):
            act.ActConfig(projections=(entry,))
    with pytest.raises(FlexCimError, match="'q@2-4': the model has 4 decoder blocks \\(0-3\\)"):
        act.ActConfig(projections=("q@2-4",)).targets(model)


def test_opt_names_and_batched_decode_stays_dense(tiny_opt):
    """OPT's out_proj/fc1/fc2 are o/up/down; its MLP flattens [B, L, H] to [B*L, H], so a
    batched decode step must be told apart by the model call, not by the projection's input."""
    model = tiny_opt
    kinds = {act.projection_kind(n) for n in linear_layers(model)}
    assert kinds == {"q", "k", "v", "o", "up", "down"}
    fc2 = model.model.decoder.layers[0].fc2
    config = act.ActConfig(pattern="2:4", projections=("down",))
    names, prefill, decode = _prefill_then_decode(model, fc2, config, torch.randint(0, 96, (2, 8)))
    assert names == [f"model.decoder.layers.{i}.fc2" for i in range(2)]
    assert prefill.shape == (16, 64) and int(groups(prefill).max()) == 2
    assert decode.shape == (2, 64) and int(groups(decode).max()) > 2  # two sequences, dense
    # outside a model call a projection judges by its own input: [.., 1, K] is a decode step
    seen = []
    with torch.no_grad(), act.activation_pruning(model, config):
        x = torch.randn(3, 64)
        probe = fc2.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        fc2(x)
        fc2(x[None, :1])
        probe.remove()
    assert int(groups(seen[-2]).max()) == 2 and int(groups(seen[-1]).max()) > 2
    assert all(not m._forward_pre_hooks for m in linear_layers(model).values())
    assert not model._forward_pre_hooks and not model._forward_hooks
