"""The LM head as one more prunable projection (``auto`` with ``lm_head``): untying, its
measured cost, the allocation counting its parameters, pruning it after the blocks, and the
plan's head reaching the system model."""

import json

import pytest
import torch
from flexcim.flow import auto, calib, pipeline, prune
from flexcim.flow.eval import nll_terms
from flexcim.flow.model import lm_head, prunable_layers, tiny_llama, untie_lm_head
from flexcim.flow.select import Plan, SelectConfig
from flexcim.golden import system
from flexcim.spec.config import PRESETS
from flexcim.spec.nm import NMPattern

from flexcim.cli import main
from flexcim.errors import FlexCimError

LEVELS = (NMPattern(1, 1), NMPattern(4, 8), NMPattern(2, 8))


def _mean_loss(model, windows) -> float:
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows, use_cache=False).loss)


def test_untie_gives_the_head_its_own_weight_and_keeps_the_function(tiny, tiny_windows):
    embedding = tiny.get_input_embeddings().weight
    assert tiny.lm_head.weight is embedding  # tiny_llama ties them, as SmolLM2 does
    before = _mean_loss(tiny, tiny_windows)
    path, head = untie_lm_head(tiny)
    assert path == "lm_head" and head.weight is not embedding
    assert not tiny.config.tie_word_embeddings
    assert _mean_loss(tiny, tiny_windows) == before
    head.weight.data.zero_()  # pruning the head no longer touches the embedding lookup
    assert torch.count_nonzero(tiny.get_input_embeddings().weight) == embedding.numel()
    assert set(prunable_layers(tiny, head=True)) - set(prunable_layers(tiny)) == {"lm_head"}
    with pytest.raises(FlexCimError, match="has no torch.nn.Linear LM head"):
        lm_head(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_heads_cost_is_the_loss_with_the_head_alone_pruned(tiny, tiny_windows):
    """An independent reference: the head's Wanda mask from its input's mean squares (a hook on
    the head), and Hugging Face's own loss."""
    sens = auto.measure_sensitivity(tiny, tiny_windows, LEVELS, progress=False, head=True)
    assert list(sens.head_cost) == ["lm_head"] and sens.head_cost["lm_head"][0] == 0.0
    assert sens.evaluations == (4 + 1) * 2 + 7 * 2
    head = tiny.lm_head
    squares = []
    handle = head.register_forward_pre_hook(
        lambda _m, args: squares.append(args[0].reshape(-1, args[0].shape[-1]) ** 2))
    dense = _mean_loss(tiny, tiny_windows)
    handle.remove()
    act_sq_mean = torch.cat(squares).mean(0)
    saved = head.weight.detach().clone()
    for level in (1, 2):
        p = LEVELS[level]
        head.weight.data.copy_(prune.prune_nm(saved, prune.wanda_scores(saved, act_sq_mean),
                                              n_keep=p.n, m=p.m))
        by_hand = _mean_loss(tiny, tiny_windows) - dense
        head.weight.data.copy_(saved)
        assert sens.head_cost["lm_head"][level] == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    # the block costs are the measurement without the head, to the last digit
    plain = auto.measure_sensitivity(tiny_llama(0), tiny_windows, LEVELS, progress=False)
    assert plain.block_cost == sens.block_cost and plain.head_cost == {}


def test_allocate_counts_the_heads_parameters(tiny):
    """A free head (cost 0) is pruned first: at a target the head alone can meet it is the
    only sparse item, and the sparsity counts the head's parameters."""
    blocks = auto.decoder_blocks(tiny)
    sens = auto.Sensitivity(levels=["1:1", "4:8", "2:8"],
                            block_cost=[[0.0, 1.0, 3.0] for _ in blocks], kind_cost={},
                            dense_loss=1.0, seconds=0.0, evaluations=0,
                            head_cost={"lm_head": [0.0, 0.0, 0.0]})
    untie_lm_head(tiny)
    head = {"lm_head": tiny.lm_head.weight.numel()}
    params = {n: m.weight.numel() for b in blocks for n, m in b.linears.items()}
    total = sum(params.values()) + head["lm_head"]
    target = 0.75 * head["lm_head"] / total  # the head at 2:8 and nothing else
    patterns, achieved, message = auto.allocate(blocks, sens, target, head=head)
    assert achieved == pytest.approx(target) and message == ""
    assert patterns["lm_head"] == NMPattern(2, 8)
    assert all(p.is_dense for n, p in patterns.items() if n != "lm_head")
    without, _, _ = auto.allocate(blocks, sens, 0.25)
    assert "lm_head" not in without
    with pytest.raises(FlexCimError, match="no measured cost for 'lm_head'"):
        auto.allocate(blocks, auto.Sensitivity(**{**sens.to_dict(), "head_cost": {}}), 0.25,
                      head=head)


def test_auto_with_the_head_plans_prunes_and_reports_it(tiny, tiny_windows, tmp_path):
    config = SelectConfig(method="auto", target=0.5, hw_config=None, refine_steps=4,
                          lm_head=True)
    plan = pipeline.make_plan(tiny, tiny_windows, config, progress=False)
    assert "lm_head" in plan.layers and "lm_head" in plan.settings["sensitivity"]["head_cost"]
    layers = prunable_layers(tiny, head=True)
    params = {n: layers[n].weight.numel() for n in plan.layers}
    sparsity = sum(params[n] * NMPattern.parse(p).sparsity for n, p in plan.layers.items())
    assert sparsity / sum(params.values()) == pytest.approx(plan.achieved_sparsity)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path).layers["lm_head"] == plan.layers["lm_head"]
    # Force a sparse head to check pruning whatever the allocation chose.
    plan.layers["lm_head"] = "2:8"
    for metric in ("wanda", "sparsegpt", "magnitude"):
        model = tiny_llama(0)
        embedding = model.get_input_embeddings().weight.detach().clone()
        pipeline.apply_plan(model, plan, tiny_windows, metric=metric, progress=False)
        pipeline.check_plan(model, plan)
        counts = (model.lm_head.weight.reshape(-1, 8) != 0).sum(1)
        assert int(counts.max()) == 2, metric
        assert torch.equal(model.get_input_embeddings().weight, embedding), metric
    # Wanda one-shot: the head's mask is the one of the *dense* model's head input.
    model, ref = tiny_llama(0), tiny_llama(0)
    untie_lm_head(ref)
    stats = calib.collect(ref, tiny_windows, {"lm_head": ref.lm_head})
    expected = prune.prune_nm(ref.lm_head.weight.detach(), prune.wanda_scores(
        ref.lm_head.weight.detach(), stats["lm_head"].act_sq_mean), n_keep=2, m=8)
    pipeline.apply_plan(model, plan, tiny_windows, metric="wanda", progress=False)
    assert torch.equal(model.lm_head.weight, expected)
    # One-shot from given statistics needs the head's.
    block_stats = calib.calibrate(tiny_llama(0), tiny_windows, progress=False)
    with pytest.raises(FlexCimError, match="statistics given have none for it"):
        pipeline.apply_plan(tiny_llama(0), plan, None, stats=block_stats)
    # The loss the probe measures is the pruned model's (nll_terms reads the head's weight).
    probe_model = tiny_llama(0)
    probe = auto.LossProbe(probe_model, tiny_windows, head=True)
    with auto.pruned(probe.linears, {"lm_head": NMPattern(2, 8)}, probe):
        pruned_loss = probe.loss(probe.start_of["lm_head"])
        assert pruned_loss == pytest.approx(
            float(nll_terms(probe_model, tiny_windows).mean()), rel=1e-5)
    assert abs(pruned_loss - probe.dense) > 1e-4  # a random tiny model: either way
    assert probe.loss(probe.start_of["lm_head"]) == pytest.approx(probe.dense, rel=1e-6)


def test_lm_head_is_an_auto_option():
    with pytest.raises(FlexCimError, match="option of method 'auto', not of 'owl'"):
        SelectConfig(method="owl", target=0.5, lm_head=True)
    with pytest.raises(FlexCimError, match="lm_head must be True or False, not 1"):
        SelectConfig(method="auto", target=0.5, lm_head=1)


def test_the_system_model_reads_the_plans_head(tmp_path, capsys):
    blocks = [{"index": i, "name": f"model.layers.{i}", "pattern": "2:4"} for i in range(30)]
    flow_plan = {"format": "flexcim-plan", "blocks": blocks,
                 "layers": {"lm_head": "12:16", "model.layers.0.self_attn.q_proj": "2:4"}}
    assert system.plan_head(flow_plan) == NMPattern(12, 16)
    assert system.plan_head({"patterns": ["2:4"]}) == NMPattern(1, 1)
    assert system.plan_head("2:4") == NMPattern(1, 1)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(flow_plan))
    out = tmp_path / "out.json"
    assert main(["system", "--model-config", "smollm2-135m", "--plan", str(path),
                 "--tokens", "4", "--kv-len", "8", "--json", str(out)]) == 0
    assert "LM head 12:16" in capsys.readouterr().out
    data = json.loads(out.read_text())
    shape = system.load_model_shape("smollm2-135m")
    acc = system.Accelerator(PRESETS["default"])
    assert data["lm_head"] == "12:16"
    assert data["result"]["flexcim"]["decode"]["weight_bits"] == system.step_cost(
        acc, shape, flow_plan, 1, 8, head="12:16").weight_bits
    assert data["result"]["flexcim"]["decode"]["weight_bits"] < system.step_cost(
        acc, shape, flow_plan, 1, 8).weight_bits


def test_the_demo_adds_auto_with_the_head_for_both_macros(tiny, tiny_windows):
    from flexcim import demo

    layers = prunable_layers(tiny, head=True)
    stats = calib.calibrate(tiny, tiny_windows, progress=False)
    stats.update(calib.collect(tiny, tiny_windows, {"lm_head": layers["lm_head"]}))
    sens = auto.measure_sensitivity(tiny, tiny_windows, tuple(
        NMPattern.parse(p) for p in demo.SENS_PATTERNS), progress=False, head=True)
    plans = {name: plan for name, _, plan in demo._plans(pipeline, tiny, stats, sens, 0.5,
                                                          tiny_windows, lm_head=True)}
    assert "lm_head" not in plans["auto"].layers
    original = {n: m.weight.detach().clone() for n, m in layers.items()}
    for name, allowed in (("auto + LM head", {"1:1", "12:16", "8:16", "6:16", "4:16", "2:16"}),
                          ("auto on {1:1, 2:4} + LM head", {"1:1", "2:4"})):
        assert "lm_head" in plans[name].layers and set(plans[name].layers.values()) <= allowed
        pipeline.apply_plan(tiny, plans[name], None, stats=stats)
        energy = pipeline.energy_plan(tiny, plans[name])
        assert system.plan_head(energy) == NMPattern.parse(plans[name].layers["lm_head"])
        assert demo.pick_rtl_layer(plans[name], PRESETS["default"])[0] != "lm_head"
        for n, m in layers.items():
            m.weight.data.copy_(original[n])
