import copy

import numpy as np
import pytest
import torch
from flexcim.flow import calib, pipeline, prune
from flexcim.flow.model import decoder_blocks, linear_layers
from flexcim.flow.select import SelectConfig
from flexcim.golden.prune import nm_prune

from flexcim.errors import FlexCimError


def test_apply_wanda_plan_equals_direct_pruning_from_dense_norms(tiny, tiny_windows):
    """Wanda prunes one-shot: every projection, in every block, from the dense model's norms."""
    dense = {n: lin.weight.detach().clone() for n, lin in linear_layers(tiny).items()}
    stats = calib.calibrate(tiny, tiny_windows, progress=False)
    plan = pipeline.make_plan(tiny, None, SelectConfig(method="flow", target=0.5,
                                                       keep_ends_dense=False),
                              stats=stats, progress=False)
    pipeline.apply_plan(tiny, plan, tiny_windows, progress=False)
    pipeline.check_plan(tiny, plan)
    layers = linear_layers(tiny)
    assert len({p["pattern"] for p in plan.blocks}) > 1
    for name in layers:
        n, m = map(int, plan.layers[name].split(":"))
        expected = prune.prune_nm(dense[name], prune.wanda_scores(dense[name],
                                                                  stats[name].act_sq_mean),
                                  n_keep=n, m=m)
        assert torch.equal(layers[name].weight, expected), name


def test_apply_magnitude_equals_golden(tiny):
    dense = {n: lin.weight.detach().clone() for n, lin in linear_layers(tiny).items()}
    plan = pipeline.make_plan(tiny, None, SelectConfig(method="uniform", pattern="2:8"),
                              metric="magnitude", progress=False)
    pipeline.apply_plan(tiny, plan, None, metric="magnitude", progress=False)
    for name, layer in linear_layers(tiny).items():
        ref = nm_prune(dense[name].numpy().astype(np.float64), "2:8")
        assert np.array_equal(layer.weight.detach().numpy(), ref.astype(np.float32))


def test_check_plan_catches_a_violation(tiny):
    plan = pipeline.make_plan(tiny, None, SelectConfig(method="uniform", pattern="2:4"),
                              metric="magnitude", progress=False)
    with pytest.raises(FlexCimError, match="violates its pattern 2:4"):
        pipeline.check_plan(tiny, plan)  # not applied yet: dense weights


def test_plan_for_another_model_is_rejected(tiny):
    plan = pipeline.make_plan(tiny, None, SelectConfig(method="uniform", pattern="2:4"),
                              metric="magnitude", progress=False)
    plan.layers["model.layers.9.mlp.up_proj"] = "2:4"
    with pytest.raises(FlexCimError, match="model.layers.9.mlp.up_proj"):
        pipeline.apply_plan(tiny, plan, None, metric="magnitude")


@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_one_shot_from_dense_statistics(tiny, tiny_windows, metric):
    stats = calib.calibrate(tiny, tiny_windows, hessian=metric == "sparsegpt",
                            keep_hessians=True, progress=False)
    plan = pipeline.make_plan(tiny, None, SelectConfig(method="uniform", pattern="2:4"),
                              stats=stats, progress=False)
    name = "model.layers.3.mlp.down_proj"
    w = linear_layers(tiny)[name].weight.detach().clone()
    pipeline.apply_plan(tiny, plan, None, metric=metric, stats=stats)
    pipeline.check_plan(tiny, plan)
    got = linear_layers(tiny)[name].weight
    if metric == "wanda":
        expected = prune.prune_nm(w, prune.wanda_scores(w, stats[name].act_sq_mean), n_keep=2, m=4)
    else:
        expected = prune.sparsegpt_nm(w, stats[name].hessian, n_keep=2, m=4)
    assert torch.equal(got, expected)


def test_demo_api_measure_and_export(tiny, tokenizer, tmp_path):
    from flexcim.flow.model import LoadedModel
    from flexcim.flow.text import Corpus
    from flexcim.golden.layer_io import load_layer

    g = torch.Generator().manual_seed(0)
    text = "".join(chr(32 + int(i)) for i in torch.randint(0, 90, (4000,), generator=g))
    session = pipeline.Session(LoadedModel(tiny, tokenizer, "tiny"),
                               Corpus(text[:2000], {"held-out": text[2000:]}, "random"))
    cw = pipeline.calibration_windows(session, count=4, seq_len=32)
    plan = pipeline.make_plan(tiny, cw, SelectConfig(method="flow", target=0.5,
                                                     keep_ends_dense=False), progress=False)
    r = pipeline.measure(session, plan, calib=cw, eval_windows=2, seq_len=32, progress=False,
                         act_pattern="2:4")
    assert r["dense"] != r["weights"] != r["weights+act"]
    assert r["act_increase"] == pytest.approx(r["weights+act"] / r["weights"] - 1)
    layer = pipeline.export_projection(session, plan, "model.layers.2.self_attn.o_proj",
                                       tmp_path / "o.safetensors", calib=cw, act_tokens=8)
    again = load_layer(tmp_path / "o.safetensors")
    assert again.weight.equals(layer.weight) and again.act.shape == (8, 32)
    assert str(again.weight.pattern) == plan.layers["model.layers.2.self_attn.o_proj"].replace(
        "4:4", "1:1").replace("8:8", "1:1")
    # W8A8: measure records it and changes the figures; export with the projections before the
    # layer in W8A8 holds exactly the int8 operands that layer uses inside the W8A8 model
    from flexcim.flow.quant import W8A8Config, w8a8

    q = pipeline.measure(session, None, eval_windows=2, seq_len=32, progress=False,
                         act_pattern=None, quant=W8A8Config())
    assert q["arith"] == "w8a8" and q["act_granularity"] == "token" and q["acc_bits"] == 32
    assert q["dense"] != r["weights"] and q["dense"] == pytest.approx(r["weights"], rel=0.05)
    name = "model.layers.2.mlp.down_proj"
    layer = pipeline.export_projection(session, plan, name, tmp_path / "d.safetensors",
                                       calib=cw, act_tokens=40, upstream_w8a8=True)
    with torch.no_grad(), w8a8(tiny, W8A8Config(), capture=name) as cap:
        tiny(input_ids=cw[:2])
    assert np.array_equal(layer.act, torch.cat(cap.act)[:40].numpy())
    assert np.array_equal(layer.act_scale, torch.cat(cap.act_scale)[:40].numpy())
    assert np.array_equal(layer.weight.decompress(), cap.weight.numpy())
    float_layer = pipeline.export_projection(session, plan, name, tmp_path / "f.safetensors",
                                             calib=cw, act_tokens=40)
    assert not np.array_equal(float_layer.act, layer.act)  # the upstream arithmetic matters
    # with smoothing: the exported layer is the smoothed projection of a smoothed W8A8 run
    smoothed = W8A8Config(smooth=0.5)
    s_layer = pipeline.export_projection(session, plan, name, tmp_path / "s.safetensors",
                                         calib=cw, act_tokens=40, upstream_w8a8=True,
                                         quant=smoothed)
    with torch.no_grad(), w8a8(tiny, smoothed, calib=cw, capture=name) as s_cap:
        tiny(input_ids=cw[:2])
    assert np.array_equal(s_layer.act, torch.cat(s_cap.act)[:40].numpy())
    assert np.array_equal(s_layer.act_scale, torch.cat(s_cap.act_scale)[:40].numpy())
    assert np.array_equal(s_layer.weight.decompress(), s_cap.weight.numpy())
    assert np.array_equal(s_layer.weight_scale, s_cap.weight_scale.numpy())
    assert not np.array_equal(s_layer.weight_scale, layer.weight_scale)
    assert s_layer.extra["smooth"] == "0.5" and layer.extra["smooth"] == "off"


def test_energy_plan_is_read_by_golden_energy(tiny):
    from flexcim.golden.energy import parse_plan

    plan = pipeline.make_plan(tiny, None, SelectConfig(method="uniform", pattern="2:8"),
                              metric="magnitude", progress=False)
    before = pipeline.energy_plan(tiny, plan)
    assert not any(e["mask_24"] for e in before["layers"])  # dense weights are not 2:4
    pipeline.apply_plan(tiny, plan, None, metric="magnitude")
    after = pipeline.energy_plan(tiny, plan)
    parsed = parse_plan(after)
    assert len(parsed) == 4 and all(str(p.pattern) == "2:8" and p.mask_24 for p in parsed)
    assert dict((n, (c, k)) for n, c, k in parsed[0].linears)[
        "model.layers.0.mlp.down_proj"] == (32, 64)


def test_apply_sparsegpt_plan_is_sequential_inside_blocks(tiny, tiny_windows):
    """Reference: the whole model run forward (no block capture) before each group of
    projections that share an input, Hessians from that run, SparseGPT on each of them."""
    ref = copy.deepcopy(tiny).requires_grad_(False)
    plan = pipeline.make_plan(tiny, None, SelectConfig(method="uniform", pattern="2:4"),
                              metric="magnitude", progress=False)
    pipeline.apply_plan(tiny, plan, tiny_windows, metric="sparsegpt", progress=False)
    pipeline.check_plan(tiny, plan)
    kinds = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
             ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    layers = linear_layers(ref)
    for block in decoder_blocks(ref):
        for group in kinds:
            names = [f"{block.name}.{k}" for k in group]
            with calib.collecting({n: layers[n] for n in names}, hessian=True) as stats, \
                    torch.no_grad():
                ref(input_ids=tiny_windows)
            for n in names:
                layers[n].weight.copy_(prune.sparsegpt_nm(layers[n].weight, stats[n].hessian,
                                                          n_keep=2, m=4))
    got = linear_layers(tiny)
    for name, layer in layers.items():
        assert torch.allclose(got[name].weight, layer.weight, atol=1e-5), name
