"""``flexcim flow ...`` on a tiny saved Llama and a user text (fast), plus its bad inputs."""

import json

import pytest
import torch
from flexcim.flow import act, prune
from flexcim.flow import cli as flow_cli
from flexcim.flow import select as sel
from flexcim.flow.model import linear_layers, load_model, tiny_llama

from flexcim.cli import main


def test_cli_choices_match_the_library():
    assert flow_cli.METRICS == prune.METRICS
    assert flow_cli.METHODS == sel.METHODS and flow_cli.M_DIRECTIONS == sel.M_DIRECTIONS
    assert flow_cli.NORMALISATIONS == tuple(sel.NORMALISATIONS)
    assert flow_cli.ACT_DEFAULT == act.DEFAULT_PROJECTIONS == act.ActConfig().projections


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


def test_select_auto_is_the_default_and_prunes(workspace, capsys):
    d = workspace
    code, err = _run(capsys, "flow", "select", *_common(d), "--target-sparsity", "0.375",
                     "--sens-windows", "2", "-o", str(d / "auto.json"))
    assert code == 0, err
    plan = json.loads((d / "auto.json").read_text())
    assert plan["method"] == "auto" and plan["achieved_sparsity"] == 0.375
    assert set(plan["layers"].values()) <= {"1:1", "4:8", "2:8", "1:8"}  # the default macro
    assert plan["settings"]["sensitivity"]["evaluations"] == 4 * 3 + 7 * 3
    code, err = _run(capsys, "flow", "prune", *_common(d), "--plan", str(d / "auto.json"),
                     "-o", str(d / "pruned-auto"))
    assert code == 0, err


@pytest.mark.parametrize("argv, message", [
    (["--target-sparsity", "0.9"], "outside [0, 0.875]"),
    (["--target-sparsity", "0.5", "--hw-config", "dense"], "at least one sparse pattern"),
    (["--target-sparsity", "0.5", "--sens-windows", "0"], "sensitivity windows must be"),
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


def test_act_eval_default_and_auto_projections(workspace, capsys, tmp_path):
    d, out = workspace, tmp_path / "act.json"
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--eval-windows", "2", "-o",
                     str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["projections"] == ["q", "down"] and r["pruned_projections"] == 8  # 4 blocks
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
    code, err = _run(capsys, "flow", "act-eval", *_common(d), "--pattern", "2:4",
                     "--projections", "auto", "--budget", "0")
    assert code == 2 and "--budget must be a positive fraction, not 0.0" in err


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
                     name, "--act-tokens", "20", "--act-pattern", "4:8", "-o", str(out))
    assert code == 0, err
    layer = load_layer(out)
    assert layer.name == name and str(layer.weight.pattern) == "2:8"
    assert layer.weight.shape == (32, 64) and layer.act.shape == (20, 64)
    assert str(layer.act_pattern) == "4:8"
    assert ((layer.act.reshape(-1, 8) != 0).sum(1) <= 4).all()
    # the int8 layer reproduces the float layer on its own activations (quantization error only)
    w = layer.weight.decompress().astype(np.float64) * layer.weight_scale[:, None]
    x = layer.act.astype(np.float64) * layer.act_scale
    y = sparse_matmul(layer.act, layer.weight).astype(np.float64) * layer.act_scale
    y *= layer.weight_scale[None, :]
    assert np.allclose(y, x @ w.T, rtol=1e-6, atol=1e-6)
    # Wanda keeps weights unchanged: every kept entry dequantizes to the original within scale/2
    original = linear_layers(tiny_llama(0))[name].weight.detach().numpy().astype(np.float64)
    kept = w != 0
    assert (kept.reshape(-1, 8).sum(1) == 2).all()
    err = np.abs(w - original)[kept]
    assert np.all(err <= np.broadcast_to(layer.weight_scale[:, None] / 2 + 1e-7, w.shape)[kept])
    code, err = _run(capsys, "flow", "export", *_common(d), "--plan", str(plan_path), "--layer",
                     "model.layers.1.mlp.nope", "-o", str(out))
    assert code == 2 and "has no layer" in err
