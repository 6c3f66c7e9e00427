"""``flexcim flow ...`` on a tiny saved Llama and a user text (fast), plus its bad inputs."""

import json

import pytest
import torch
from flexcim.flow import act, prune, quant
from flexcim.flow import cli as flow_cli
from flexcim.flow import select as sel
from flexcim.flow.model import linear_layers, load_model, tiny_llama

from flexcim.cli import main


def test_cli_choices_match_the_library():
    assert flow_cli.METRICS == prune.METRICS
    assert flow_cli.METHODS == sel.METHODS and flow_cli.M_DIRECTIONS == sel.M_DIRECTIONS
    assert flow_cli.NORMALISATIONS == tuple(sel.NORMALISATIONS)
    assert flow_cli.ACT_DEFAULT == act.DEFAULT_PROJECTIONS == act.ActConfig().projections
    assert flow_cli.ARITHMETICS == quant.ARITHMETICS
    assert set(flow_cli.GRANULARITIES) == set(quant.GRANULARITIES)
    assert flow_cli.DEFAULT_SMOOTH == quant.DEFAULT_SMOOTH
    assert (flow_cli.GRANULARITIES[0] == quant.DEFAULT_GRANULARITY
            == quant.W8A8Config().act_granularity)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("flowcli")
    words = [f"w{i}" for i in range(90)]
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": 90}
    tok = Tokenizer(models.WordLevel(vocab, "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny_llama(0).save_pretrained(d / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(d / "model")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (6000,), generator=g).tolist()
    (d / "text.txt").write_text("\n".join(" ".join(words[i] for i in ids[j:j + 20])
                                          for j in range(0, 6000, 20)))
    return d


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def _common(d):
    return ["--model", str(d / "model"), "--text", str(d / "text.txt"), "--calib-windows", "4",
            "--seq-len", "32"]


@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_select_then_prune(workspace, capsys, metric):
    d = workspace
    code, err = _run(capsys, "flow", "select", *_common(d), "--method", "flow",
                     "--target-sparsity", "0.5", "--metric", metric, "--no-keep-ends-dense",
                     "-o", str(d / "plan.json"))
    assert code == 0, err
    plan = json.loads((d / "plan.json").read_text())
    assert plan["achieved_sparsity"] == 0.5 and len(plan["blocks"]) == 4
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(d / "plan.json"),
                     "--eval-windows", "2", "-o", str(d / f"pruned-{metric}"))
    assert code == 0, err
    pruned = load_model(d / f"pruned-{metric}").model
    layers = linear_layers(pruned)
    for name, pattern in plan["layers"].items():
        n, m = map(int, pattern.split(":"))
        counts = (layers[name].weight.reshape(-1, m) != 0).sum(1)
        assert int(counts.max()) <= n, name
    record = json.loads((d / f"pruned-{metric}" / "flexcim-prune.json").read_text())
    assert record["metric"] == metric and record["perplexity"] > 1
    assert record["order"] == {"magnitude": "one-shot", "wanda": "one-shot",
                               "sparsegpt": "sequential"}[metric]


def test_select_and_prune_with_the_lm_head(workspace, capsys, tmp_path):
    """``--lm-head``: the plan names ``lm_head``; the pruned directory reloads with the head
    untied, pruned to its pattern, and the embedding whole."""
    d = workspace
    code, err = _run(capsys, "flow", "select", *_common(d), "--target-sparsity", "0.5",
                     "--lm-head", "--refine-steps", "2", "--sens-cache", "off",
                     "-o", str(tmp_path / "plan.json"))
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert "lm_head" in plan["layers"] and plan["settings"]["lm_head"] is True
    plan["layers"]["lm_head"] = "4:16"  # whatever the allocation chose: a sparse head
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(tmp_path / "plan.json"),
                     "-o", str(tmp_path / "pruned"))
    assert code == 0, err
    pruned = load_model(tmp_path / "pruned").model
    head = pruned.lm_head.weight
    assert head is not pruned.get_input_embeddings().weight
    assert int((head.reshape(-1, 16) != 0).sum(1).max()) <= 4
    assert torch.equal(pruned.get_input_embeddings().weight,
                       load_model(d / "model").model.get_input_embeddings().weight)


def test_prune_refit_norms(workspace, capsys, tmp_path):
    """``flow prune --refit-norms``: the same pruned weights as without it, other norm gains,
    a lower KL to the dense model, recorded."""
    from flexcim.flow.refit import norm_parameters

    d = workspace
    code, err = _run(capsys, "flow", "select", *_common(d), "--method", "uniform", "--pattern",
                     "2:4", "-o", str(tmp_path / "plan.json"))
    assert code == 0, err
    outs = {}
    for extra in ([], ["--refit-norms"]):
        out = tmp_path / ("refit" if extra else "plain")
        code, err = _run(capsys, "flow", "prune", *_common(d), "--plan",
                         str(tmp_path / "plan.json"), *extra, "--eval-windows", "2",
                         "-o", str(out))
        assert code == 0, err
        outs[bool(extra)] = (load_model(out).model,
                             json.loads((out / "flexcim-prune.json").read_text()))
    (plain, plain_rec), (refit, refit_rec) = outs[False], outs[True]
    assert plain_rec["refit_norms"] is None
    rec = refit_rec["refit_norms"]
    assert rec["kl_after"] < rec["kl_before"] and rec["windows"] == 4
    for name, lin in linear_layers(refit).items():
        assert torch.equal(lin.weight, linear_layers(plain)[name].weight), name
    assert any(not torch.equal(p, norm_parameters(plain)[n])
               for n, p in norm_parameters(refit).items())


def test_calibration_windows_default_by_metric(workspace, capsys):
    """Without --calib-windows: 16 windows, 64 when SparseGPT prunes (select records it, prune
    records what it drew); an explicit count wins; the larger draw holds the smaller's windows."""
    from flexcim.flow import pipeline

    d = workspace
    common = ["--model", str(d / "model"), "--text", str(d / "text.txt"), "--seq-len", "32"]
    for metric, count in (("wanda", 16), ("sparsegpt", 64), ("magnitude", 16)):
        assert pipeline.default_calib_windows(metric) == count
        code, err = _run(capsys, "flow", "select", *common, "--method", "flow", "--metric",
                         metric, "--target-sparsity", "0.5", "--no-keep-ends-dense",
                         "-o", str(d / f"cw-{metric}.json"))
        assert code == 0, err
        settings = json.loads((d / f"cw-{metric}.json").read_text())["settings"]
        assert settings["calib_windows"] == count
    for extra, drawn in (([], 64), (["--calib-windows", "8"], 8)):
        code, err = _run(capsys, "flow", "prune", *common, *extra, "--plan",
                         str(d / "cw-sparsegpt.json"), "-o", str(d / f"cw-pruned-{drawn}"))
        assert code == 0, err
        record = json.loads((d / f"cw-pruned-{drawn}" / "flexcim-prune.json").read_text())
        assert record["metric"] == "sparsegpt" and record["calib_windows"] == drawn
    code, err = _run(capsys, "flow", "select", *common, "--calib-windows", "0",
                     "-o", str(d / "never.json"))
    assert code == 2 and "--calib-windows must be an integer >= 1, not 0" in err
    assert not (d / "never.json").exists()
    session = pipeline.load(d / "model", d / "text.txt")
    few = pipeline.calibration_windows(session, count=16, seq_len=32, seed=3)
    many = pipeline.calibration_windows(session, count=64, seq_len=32, seed=3)
    assert all(any(torch.equal(w, v) for v in many) for w in few)
    assert not torch.equal(many[:16], few)  # sorted in text order: a superset, not a prefix


def test_select_normalisation_option(workspace, capsys):
    d = workspace
    code, err = _run(capsys, "flow", "select", *_common(d), "--metric", "magnitude",
                     "--method", "flow", "--target-sparsity", "0.25", "--normalisation", "rank",
                     "-o", str(d / "rank.json"))
    assert code == 0, err
    plan = json.loads((d / "rank.json").read_text())
    assert plan["settings"]["normalisation"] == "rank"
    # ends dense by default: the two middle blocks carry the whole 0.25 (one 2:4, one dense)
    patterns = [b["pattern"] for b in plan["blocks"]]
    assert patterns[0] == patterns[3] == "1:1" and plan["achieved_sparsity"] == 0.25
    # ranks / (L - 1), ties sharing their mean rank: always averaging 1/2, largest 1 unless tied
    ranks = [b["outlier_ratio_norm"] for b in plan["blocks"]]
    assert sum(ranks) / len(ranks) == pytest.approx(0.5) and 0 <= min(ranks) < max(ranks) <= 1


def test_select_auto_is_the_default_and_prunes(workspace, capsys, monkeypatch, tmp_path):
    d = workspace
    monkeypatch.setenv("FLEXCIM_CACHE", str(tmp_path / "cache"))
    code, err = _run(capsys, "flow", "select", *_common(d), "--target-sparsity", "0.375",
                     "--sens-windows", "2", "--refine-steps", "3", "--loss-windows", "2",
                     "-o", str(d / "auto.json"))
    assert code == 0, err
    plan = json.loads((d / "auto.json").read_text())
    assert plan["method"] == "auto" and plan["achieved_sparsity"] == 0.375
    # the sensitivity went to the cache; another target reuses it, 'off' measures again
    assert len(list((tmp_path / "cache" / "sensitivity").iterdir())) == 1
    assert plan["settings"]["sensitivity"]["cached"] is False and "sens_cache" not in \
        plan["settings"]
    for cache, cached in ((None, True), ("off", False)):
        extra = ["--sens-cache", cache] if cache else []
        code, err = _run(capsys, "flow", "select", *_common(d), "--target-sparsity", "0.5",
                         "--sens-windows", "2", "--refine-steps", "0", *extra,
                         "-o", str(d / "again.json"))
        assert code == 0, err
        again = json.loads((d / "again.json").read_text())["settings"]["sensitivity"]
        assert again["cached"] is cached
        assert again["dense_loss"] == plan["settings"]["sensitivity"]["dense_loss"]
    levels = {"1:1", "12:16", "8:16", "6:16", "4:16", "2:16"}  # the default macro's
    assert set(plan["layers"].values()) <= levels
    assert plan["settings"]["sensitivity"]["evaluations"] == (4 + 7) * (len(levels) - 1)
    assert plan["settings"]["refine"]["steps"] == 3
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(d / "auto.json"),
                     "-o", str(d / "pruned-auto"))
    assert code == 0, err


@pytest.mark.parametrize("argv, message", [
    (["--target-sparsity", "0.9"], "outside [0, 0.875]"),
    (["--target-sparsity", "0.5", "--hw-config", "dense"], "at least one sparse pattern"),
    (["--target-sparsity", "0.5", "--sens-windows", "0"], "sensitivity windows must be"),
    (["--target-sparsity", "0.5", "--refine-steps", "-1"],
     "refine steps must be a non-negative integer, not -1"),
    (["--target-sparsity", "0.5", "--significance", "-1"],
     "significance must be a finite number >= 0, not -1.0"),
    (["--target-sparsity", "0.5", "--significance", "inf"],
     "significance must be a finite number >= 0, not inf"),
])
def test_select_auto_bad_input(workspace, capsys, argv, message):
    d = workspace
    code, err = _run(capsys, "flow", "select", *_common(d), *argv, "-o", str(d / "bad.json"))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (d / "bad.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--target-sparsity", "0.95"], "outside [0, 0.75]"),
    (["--target-sparsity", "0.5", "--keep-ends-dense"], "outside [0, 0.375]"),  # 2 of 4 blocks
    (["--target-sparsity", "1.5"], "target sparsity must be in [0, 1)"),
    (["--method", "uniform", "--pattern", "4:64"], "M must be a power of two from 1 to 32"),
    (["--method", "uniform", "--pattern", "2:x"], "N:M pattern must look like"),
    (["--candidates", "2:4,3:128"], "M must be a power of two"),
    (["--target-sparsity", "0.5", "--lm-head"], "an option of method 'auto', not of 'flow'"),
])
def test_select_bad_input(workspace, capsys, argv, message):
    d = workspace
    code, err = _run(capsys, "flow", "select", *_common(d), "--metric", "magnitude",
                     "--method", "flow", *argv, "-o", str(d / "bad.json"))
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_missing_and_corrupt_files(workspace, capsys, tmp_path):
    d = workspace
    base = ["--metric", "magnitude", "--target-sparsity", "0.5"]
    code, err = _run(capsys, "flow", "select", "--model", str(tmp_path / "no-model"), *base,
                     "-o", str(tmp_path / "p.json"))
    assert code == 2 and "does not exist" in err
    code, err = _run(capsys, "flow", "select", "--model", str(d / "model"), "--text",
                     str(tmp_path / "none.txt"), *base, "-o", str(tmp_path / "p.json"))
    assert code == 2 and "text file" in err and "does not exist" in err
    (tmp_path / "plan.json").write_text("{")
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(tmp_path / "plan.json"),
                     "-o", str(tmp_path / "out"))
    assert code == 2 and "not valid JSON" in err
    code, err = _run(capsys, "flow", "select", *_common(d), *base, "-o",
                     str(tmp_path / "no" / "dir" / "p.json"))
    assert code == 2 and "output directory" in err


def test_act_eval_reports_both_perplexities(workspace, capsys, tmp_path):
    d = workspace
    out = tmp_path / "act.json"
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--pattern", "2:4", "--score",
                     "weight", "--projections", "q,k,v,o,gate,up,down", "--skip-budget", "0.25",
                     "--eval-windows", "2", "-o", str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["pruned_projections"] == 21 and len(r["skipped"]) == 7
    assert r["perplexity_pruned_act"] != r["perplexity_dense_act"]
    assert r["relative_increase"] == pytest.approx(
        r["perplexity_pruned_act"] / r["perplexity_dense_act"] - 1)


def test_act_eval_scores_the_tokens_after_a_prefill(workspace, capsys, tmp_path):
    d, out = workspace, tmp_path / "act.json"
    runs = {}
    for prefill in (None, 16):
        extra = [] if prefill is None else ["--prefill-tokens", str(prefill)]
        code, err = _run(capsys, "flow", "act-eval", *_common(d), "--pattern", "2:4",
                         "--projections", "q,k,v,o,gate,up,down", "--eval-windows", "2", *extra,
                         "-o", str(out))
        assert code == 0, err
        runs[prefill] = json.loads(out.read_text())
        assert runs[prefill]["prefill_tokens"] == prefill
    # other tokens scored, and only the prompt pruned: both perplexities move
    assert runs[16]["perplexity_dense_act"] != runs[None]["perplexity_dense_act"]
    assert runs[16]["perplexity_pruned_act"] != runs[None]["perplexity_pruned_act"]
    assert runs[16]["perplexity_pruned_act"] != runs[16]["perplexity_dense_act"]
    for bad in ("0", "32"):
        code, err = _run(capsys, "flow", "act-eval", *_common(d), "--prefill-tokens", bad)
        assert code == 2 and (f"--prefill-tokens must be in 1..31 for windows of --seq-len 32, "
                              f"not {bad}") in err


def test_act_eval_default_and_auto_projections(workspace, capsys, tmp_path):
    d, out = workspace, tmp_path / "act.json"
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--eval-windows", "2", "-o",
                     str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["projections"] == ["q", "down"] and r["pruned_projections"] == 8  # 4 blocks
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--eval-windows", "2",
                     "--projections", "q,gate@1-2", "-o", str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["projections"] == ["q", "gate@1-2"] and r["pruned_projections"] == 6
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--pattern", "2:4",
                     "--projections", "auto", "--budget", "10", "--eval-windows", "2", "-o",
                     str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    sel = r["selection"]
    # a budget of +1000 % admits every kind: the greedy search ends with all seven, step by step
    assert r["projections"] == list(act.PROJECTIONS) and r["pruned_projections"] == 28
    assert [len(step) for step in sel["steps"]] == [7, 6, 5, 4, 3, 2, 1]
    assert sel["result"]["mac_share"] == pytest.approx(1.0)
    assert sel["arith"] == "float" and sel["margin"] == 0.5 and sel["groups"] == 3
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--pattern", "2:4",
                     "--projections", "auto", "--budget", "0")
    assert code == 2 and "--budget must be a positive fraction, not 0.0" in err


def test_act_eval_auto_chooses_in_float_under_w8a8(workspace, capsys, tmp_path, monkeypatch):
    """W8A8's rounding noise would steer the greedy search: it measures in float, then the
    chosen set is evaluated in W8A8."""
    seen = []
    choose = act.choose_projections

    def spy(model, evaluate, **kwargs):
        def measured():
            seen.append(any("forward" in vars(m) for m in linear_layers(model).values()))
            return evaluate()

        return choose(model, measured, **kwargs)

    monkeypatch.setattr(act, "choose_projections", spy)
    out = tmp_path / "act.json"
    code, err = _run(capsys, "flow", "act-eval", *_common(workspace), "--projections", "auto",
                     "--budget", "10", "--arith", "w8a8", "--eval-windows", "2", "-o", str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert seen and not any(seen)  # no projection ran the W8A8 forward while choosing
    assert r["arith"] == "w8a8" and r["selection"]["arith"] == "float"


def test_act_eval_and_prune_in_w8a8(workspace, capsys, tmp_path):
    d = workspace
    runs = {}
    for arith in ("float", "w8a8"):
        out = tmp_path / f"{arith}.json"
        code, err = _run(capsys, "flow", "act-eval", *_common(d), "--eval-windows", "2",
                         "--arith", arith, "-o", str(out))
        assert code == 0, err
        runs[arith] = json.loads(out.read_text())
    r = runs["w8a8"]
    assert runs["float"]["arith"] == "float" and "acc_bits" not in runs["float"]
    assert (r["arith"], r["act_granularity"], r["acc_bits"], r["hw_config"], r["smooth"]) == (
        "w8a8", "token", 32, "default", 0.5)
    for key in ("perplexity_dense_act", "perplexity_pruned_act"):
        # int8 changes the figure, a little (a random tiny model: within 5 %)
        assert r[key] != runs["float"][key]
        assert r[key] == pytest.approx(runs["float"][key], rel=0.05)
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--eval-windows", "2",
                     "--arith", "w8a8", "--act-granularity", "tensor", "-o", str(tmp_path / "t"))
    assert code == 0, err
    tensor = json.loads((tmp_path / "t").read_text())
    assert tensor["act_granularity"] == "tensor"
    assert tensor["perplexity_dense_act"] != r["perplexity_dense_act"]
    # smoothing is the default (alpha 0.5): --smooth 0.5 repeats it, off and 0.9 differ
    figures = {}
    for alpha in ("0.5", "off", "0.9"):
        code, err = _run(capsys, "flow", "act-eval", *_common(d), "--eval-windows", "2",
                         "--arith", "w8a8", "--smooth", alpha, "-o", str(tmp_path / "s"))
        assert code == 0, err
        smoothed = json.loads((tmp_path / "s").read_text())
        assert smoothed["smooth"] == {"0.5": 0.5, "off": None, "0.9": 0.9}[alpha]
        figures[alpha] = smoothed["perplexity_dense_act"]
    assert figures["0.5"] == r["perplexity_dense_act"]
    assert len({figures["0.5"], figures["off"], figures["0.9"]}) == 3
    code, err = _run(capsys, "flow", "select", *_common(d), "--method", "uniform", "--pattern",
                     "2:4", "-o", str(tmp_path / "plan.json"))
    assert code == 0, err
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(tmp_path / "plan.json"),
                     "--eval-windows", "2", "--arith", "w8a8", "-o", str(tmp_path / "pruned"))
    assert code == 0, err
    record = json.loads((tmp_path / "pruned" / "flexcim-prune.json").read_text())
    assert record["arith"] == "w8a8" and record["acc_bits"] == 32 and record["perplexity"] > 1


def test_w8a8_bad_input(workspace, capsys, tmp_path):
    d = workspace
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--act-granularity", "token")
    assert code == 2 and "--act-granularity needs --arith w8a8" in err
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--arith", "w8a8", "--hw-config",
                     "tiny", "-o", str(tmp_path / "r.json"))
    assert code == 2 and "acc_bits=20 is too small" in err and "K=64" in err
    assert not (tmp_path / "r.json").exists()
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--eval-text", "emma")
    assert code == 2 and "--eval-text must be one of ['held-out'] for this text, not 'emma'" in err
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--smooth", "0.5")
    assert code == 2 and "--smooth needs --arith w8a8" in err
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--arith", "w8a8", "--smooth", "2")
    assert code == 2 and "--smooth must be an alpha in [0, 1] or off, not '2'" in err
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--arith", "w8a8", "--smooth", "x")
    assert code == 2 and "--smooth must be an alpha in [0, 1] or off, not 'x'" in err
    with pytest.raises(SystemExit) as info:  # argparse's own check of the choices
        main(["flow", "act-eval", *_common(d), "--arith", "int4"])
    assert info.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_act_eval_bad_pattern(workspace, capsys):
    code, err = _run(capsys, "flow", "act-eval", *_common(workspace), "--pattern", "8:64")
    assert code == 2 and "M must be a power of two" in err
    code, err = _run(capsys, "flow", "act-eval", *_common(workspace), "--projections", "q,zz")
    assert code == 2 and "unknown projection kind 'zz'" in err


def test_export_round_trips_through_golden(workspace, capsys, tmp_path):
    import numpy as np
    from flexcim.golden.layer_io import load_layer
    from flexcim.golden.matmul import sparse_matmul

    d = workspace
    plan_path = tmp_path / "plan.json"
    assert _run(capsys, "flow", "select", *_common(d), "--method", "uniform", "--pattern",
                "2:8", "-o", str(plan_path))[0] == 0
    name = "model.layers.1.mlp.down_proj"
    out = tmp_path / "layer.safetensors"
    code, err = _run(capsys, "flow", "export", *_common(d), "--plan", str(plan_path), "--layer",
                     name, "--act-tokens", "20", "--act-pattern", "4:8", "--smooth", "off",
                     "-o", str(out))
    assert code == 0, err
    layer = load_layer(out)
    assert layer.extra["smooth"] == "off"
    assert layer.name == name and str(layer.weight.pattern) == "2:8"
    assert layer.weight.shape == (32, 64) and layer.act.shape == (20, 64)
    assert str(layer.act_pattern) == "4:8"
    assert ((layer.act.reshape(-1, 8) != 0).sum(1) <= 4).all()
    # per-token scales by default (as the W8A8 perplexity runs): every row reaches +-127
    assert layer.act_scale.shape == (20,) and layer.extra["act_granularity"] == "token"
    assert (np.abs(layer.act).max(axis=1) == 127).all()
    # the int8 layer reproduces the float layer on its own activations (quantization error only)
    w = layer.weight.decompress().astype(np.float64) * layer.weight_scale[:, None]
    x = layer.act.astype(np.float64) * layer.act_scale[:, None]
    y = sparse_matmul(layer.act, layer.weight).astype(np.float64) * layer.act_scale[:, None]
    y *= layer.weight_scale[None, :]
    assert np.allclose(y, x @ w.T, rtol=1e-6, atol=1e-6)
    # Wanda keeps weights unchanged: every kept entry dequantizes to the original within scale/2
    original = linear_layers(tiny_llama(0))[name].weight.detach().numpy().astype(np.float64)
    kept = w != 0
    assert (kept.reshape(-1, 8).sum(1) == 2).all()
    err = np.abs(w - original)[kept]
    assert np.all(err <= np.broadcast_to(layer.weight_scale[:, None] / 2 + 1e-7, w.shape)[kept])
    # by default the layer is quantized as the W8A8 runs do, smoothed (alpha 0.5): the same
    # mask (Wanda's score |W_ij| ||x_j|| does not change when x_j / s_j meets W_ij s_j), other
    # int8 values, inputs divided by the scales
    code, err = _run(capsys, "flow", "export", *_common(d), "--plan", str(plan_path), "--layer",
                     name, "--act-tokens", "20", "--act-pattern", "4:8", "-o", str(out))
    assert code == 0, err
    smoothed = load_layer(out)
    assert smoothed.extra["smooth"] == "0.5"
    assert np.array_equal(smoothed.weight.decompress() != 0, kept)
    assert not np.array_equal(smoothed.weight_scale, layer.weight_scale)
    code, err = _run(capsys, "flow", "export", *_common(d), "--plan", str(plan_path), "--layer",
                     name, "--smooth", "1.5", "-o", str(tmp_path / "bad.safetensors"))
    assert code == 2 and "--smooth must be an alpha in [0, 1] or off, not '1.5'" in err
    assert not (tmp_path / "bad.safetensors").exists()
    code, err = _run(capsys, "flow", "export", *_common(d), "--plan", str(plan_path), "--layer",
                     "model.layers.1.mlp.nope", "-o", str(out))
    assert code == 2 and "has no layer" in err


def _plan(tmp_path, **changes):
    """A valid plan file with some fields changed (None: removed)."""
    data = {"format": "flexcim-plan", "method": "uniform", "target_sparsity": 0.5,
            "achieved_sparsity": 0.5, "exact": True, "message": "",
            "blocks": [{"index": 0, "name": "model.layers.0", "pattern": "2:4"}],
            "layers": {"model.layers.0.mlp.up_proj": "2:4"}, "settings": {"metric": "wanda"}}
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"settings": [1, 2]}, "field 'settings' must be an object, not [1, 2]"),  # was AttributeError
    ({"settings": {"metric": "best"}}, "field 'settings.metric' must be one of"),
    ({"method": "magic"}, "field 'method' must be one of auto, uniform, owl, flow, not 'magic'"),
    ({"achieved_sparsity": "half"}, "field 'achieved_sparsity' must be a number from 0 to 1"),
    ({"target_sparsity": 1.5}, "field 'target_sparsity' must be a number from 0 to 1, not 1.5"),
    ({"exact": "yes"}, "field 'exact' must be true or false"),
    ({"blocks": {"a": 1}}, "field 'blocks' must be a list of objects"),
    ({"blocks": [{"index": -1, "name": "b", "pattern": "2:4"}]}, "'blocks[0].index' must be"),
    ({"blocks": [{"index": 0, "name": "b", "pattern": 7}]}, "'blocks[0].pattern' must be an N:M"),
    ({"layers": {"a": "3:6"}}, "field \"layers['a']\" must be an N:M pattern"),
    ({"layers": []}, "field 'layers' must be a non-empty object"),
    ({"layers": None}, "lacks field 'layers'"),
    ({"extra": 1}, "has unknown field 'extra'"),
])
def test_every_plan_field_is_checked(workspace, capsys, tmp_path, changes, message):
    path = _plan(tmp_path, **changes)
    code, err = _run(capsys, "flow", "prune", *_common(workspace), "--plan", str(path),
                     "-o", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and f"plan file {str(path)!r}" in err, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_plan_file_round_trips_through_the_checks(tmp_path):
    plan = sel.Plan.load(_plan(tmp_path))
    plan.save(tmp_path / "again.json")
    assert sel.Plan.load(tmp_path / "again.json") == plan


def test_prune_writes_its_folder_complete_or_not_at_all(workspace, capsys, tmp_path):
    d = workspace
    plan = tmp_path / "plan.json"
    assert _run(capsys, "flow", "select", *_common(d), "--method", "uniform", "--pattern",
                "2:4", "-o", str(plan))[0] == 0
    out = tmp_path / "pruned"
    # bad --eval-windows: refused before any work (was: exit 2 after the model was saved,
    # leaving a folder without flexcim-prune.json)
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(plan),
                     "--eval-windows", "-1", "-o", str(out))
    assert code == 2 and "--eval-windows must be an integer >= 0, not -1" in err
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(plan),
                     "--eval-windows", "100000", "-o", str(out))
    assert code == 2 and "windows" in err and err.count("\n") == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    # over the input model: refused, the model untouched (was: overwritten, exit 0)
    before = sorted(p.name for p in (d / "model").iterdir())
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(plan),
                     "-o", str(d / "model"))
    assert code == 2 and "would overwrite the input" in err
    assert sorted(p.name for p in (d / "model").iterdir()) == before
    # an unrelated non-empty folder is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(plan),
                     "-o", str(tmp_path / "mine"))
    assert code == 2 and "non-empty folder that is not a previous output" in err
    # a previous prune output is replaced as a whole
    assert _run(capsys, "flow", "prune", *_common(d), "--plan", str(plan), "-o", str(out))[0] == 0
    (out / "stale.txt").write_text("from an older run")
    assert _run(capsys, "flow", "prune", *_common(d), "--plan", str(plan), "-o", str(out))[0] == 0
    assert (out / "flexcim-prune.json").is_file() and not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("step, argv, message", [
    ("export", ["--act-tokens", "-5"], "--act-tokens must be an integer >= 1, not -5"),
    ("export", ["--act-tokens", "0"], "--act-tokens must be an integer >= 1, not 0"),
    ("export", ["-o", "{t}/layer.npy"], "must end in .safetensors"),
    ("select", ["--hyper-m", "nan"], "--hyper-m must be a finite number, not nan"),
    ("select", ["--hyper-m", "0"], "--hyper-m must be positive, not 0.0"),
    ("select", ["--calib-windows", "0"], "--calib-windows must be an integer >= 1, not 0"),
    ("select", ["-o", "{t}"], "is a directory; expected a file name"),
    ("select", ["-o", ""], "must be a file name, not ''"),
    ("act-eval", ["--eval-windows", "0"], "--eval-windows must be an integer >= 1, not 0"),
    ("act-eval", ["--skip-budget", "1"], "--skip-budget must be a fraction in [0, 1)"),
    ("act-eval", ["-o", "{t}/plan.json"], "would overwrite the input"),
    ("act-eval", ["--margin", "1"], "--margin must be a fraction in [0, 1), not 1.0"),
    ("act-eval", ["--block-groups", "0"], "--block-groups must be an integer >= 1, not 0"),
    ("act-eval", ["--projections", "gate@2-9"], "'gate@2-9': the model has 4 decoder blocks"),
    ("act-eval", ["--projections", "q,gate@9"], "projection entry 'gate@9': expected gate@"),
])
def test_flow_bad_arguments_are_one_line(workspace, capsys, tmp_path, step, argv, message):
    plan = _plan(tmp_path)
    extra = {"export": ["--plan", str(plan), "--layer", "model.layers.0.mlp.up_proj"],
             "select": ["--method", "uniform", "--pattern", "2:4"],
             "act-eval": ["--plan", str(plan)]}[step]
    argv = [a.format(t=tmp_path) for a in argv]
    if "-o" not in argv and step != "act-eval":
        argv += ["-o", str(tmp_path / ("o.safetensors" if step == "export" else "o.json"))]
    code, err = _run(capsys, "flow", step, *_common(workspace), *extra, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]



def test_w8a8_smoothing_default_on_a_model_that_is_not_llama_style(workspace, tiny_opt,
                                                                   tmp_path, capsys):
    # OPT has no input_layernorm / gate_proj: the default smoothing steps aside (W8A8 still
    # runs, recorded as unsmoothed); an explicit --smooth is refused in one line
    from transformers import AutoTokenizer

    d = tmp_path / "opt"
    tiny_opt.save_pretrained(d)
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(d)
    common = ["--model", str(d), "--text", str(workspace / "text.txt"), "--calib-windows", "4",
              "--seq-len", "32", "--projections", "q", "--eval-windows", "2"]
    out = tmp_path / "r.json"
    code, err = _run(capsys, "flow", "act-eval", *common, "--arith", "w8a8", "-o", str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["arith"] == "w8a8" and r["smooth"] is None
    code, err = _run(capsys, "flow", "act-eval", *common, "--arith", "w8a8", "--smooth", "0.5",
                     "-o", str(tmp_path / "s.json"))
    assert code == 2 and "--smooth 0.5 needs a Llama-style model" in err and "OPT" in err
    assert not (tmp_path / "s.json").exists()
