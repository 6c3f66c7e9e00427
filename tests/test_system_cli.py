"""``flexcim system``: the table, the JSON output and one-line errors (exit 2)."""

import json

import pytest
from flexcim.golden import system
from flexcim.spec.config import PRESETS

from flexcim.cli import main


def test_system_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sys.json"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"patterns": ["2:8", "1:8"]}))
    assert main(["system", "--model-config", "smollm2-135m", "--plan", str(plan),
                 "--macros", "4", "--tokens", "16", "--kv-len", "64", "--lm-head", "12:16",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefill of 16 tokens" in text and "KV cache 64" in text and "LM head 12:16" in text
    # what a macro runs instead of the patterns it lacks is said (fixed24: 2:8 and 1:8 as 2:4,
    # whose masks they satisfy, the 12:16 head dense; FlexCiM has all three; the dense
    # macro's goes without saying)
    said = [line for line in text.splitlines() if " runs " in line]
    assert said == ["fixed24 runs 2:8 as 2:4, 1:8 as 2:4, 12:16 as 1:1 (patterns its macro "
                    "does not have)"]
    data = json.loads(out.read_text())
    assert data["lm_head"] == "12:16"
    result = data["result"]
    assert set(result) == {"flexcim", "dense", "fixed24"}
    assert result["flexcim"]["runs_as"] == {}
    assert result["dense"]["runs_as"] == {"2:8": "1:1", "1:8": "1:1", "12:16": "1:1"}
    decode = result["flexcim"]["decode"]
    assert decode["tokens"] == 1 and decode["kv_len"] == 64 and decode["bound"] == "memory"
    # 2:8 and 1:8 blocks run as 2:4 on fixed24 and dense on the dense macro: more weight bits.
    assert result["dense"]["decode"]["weight_bits"] > result["fixed24"]["decode"]["weight_bits"] \
        > decode["weight_bits"]
    assert result["fixed24"]["prefill"]["latency_vs_flexcim"] > 1
    # the temporary file was renamed into place: only the plan and the result are left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "sys.json"]


def test_system_json_output_is_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "missing" / "sys.json"
    assert main(["system", "--model-config", "smollm2-135m", "--pattern", "2:4",
                 "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"output directory {str(out.parent)!r} does not exist" in captured.err
    assert captured.out == ""  # refused before the model ran


@pytest.mark.parametrize(("args", "message"), [
    (["--dram-gbps", "0"], "dram_gb_per_s must be a positive number, not 0.0"),
    (["--macros", "0"], "macros must be a positive integer, not 0"),
    (["--kv-len", "-3"], "kv_len must be a non-negative integer, not -3"),
    (["--model-config", "bert"], "'bert' is neither a file nor one of"),
    (["--lm-head", "2-4"], "N:M pattern must look like '2:4', not '2-4'"),
    (["--lm-head", "1:64"], "N:M pattern M must be a power of two from 1 to 32, not 64"),
])
def test_system_bad_input_is_one_line(capsys, args, message):
    base = ["system", "--model-config", "smollm2-135m", "--pattern", "2:4"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_system_rejects_a_non_decoder_config_and_foreign_projections(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    assert main(["system", "--model-config", str(cfg), "--pattern", "2:4"]) == 2
    assert "is not a Llama-style decoder LLM" in capsys.readouterr().err
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": [{"name": "model.layers.0", "pattern": "2:4",
                                            "linears": {"model.layers.0.fc1": [576, 576]}}]}))
    assert main(["system", "--model-config", "smollm2-135m", "--plan", str(plan)]) == 2
    assert "names projection 'model.layers.0.fc1'" in capsys.readouterr().err


def test_system_weight_port_and_compact_indices_reach_the_model(tmp_path, capsys):
    """``--set weight_port_rows=9 --set weight_overlap=1`` builds the decode-ready macro (its
    fields in the JSON), ``--compact-indices`` charges the packed stream (values and group codes): a
    dense plan's decode moves 8 bits per weight on FlexCiM as on the dense accelerator, plus
    the padding of each load's last packed word (what the system model charges)."""
    runs = {}
    for name, extra in (("plain", []), ("compact", ["--compact-indices"])):
        out = tmp_path / f"{name}.json"
        assert main(["system", "--model-config", "smollm2-135m", "--pattern", "1:1",
                     "--set", "weight_port_rows=9", "--set", "weight_overlap=1", *extra,
                     "--tokens", "4", "--kv-len", "8", "--json", str(out)]) == 0
        runs[name] = json.loads(out.read_text())
    assert "weight port 9 row(s)/cycle, weight overlap on, LM head 1:1" in capsys.readouterr().out
    plain, compact = (runs[n]["result"] for n in ("plain", "compact"))
    assert runs["compact"]["hw"]["weight_port_rows"] == 9 and runs["compact"]["compact_indices"]
    dense_bits = compact["dense"]["decode"]["weight_bits"]
    flex_bits = compact["flexcim"]["decode"]["weight_bits"]
    cfg = PRESETS["default"].with_overrides(["weight_port_rows=9", "weight_overlap=1"])
    model = system.step_cost(system.Accelerator(cfg, compact_indices=True),
                             system.load_model_shape("smollm2-135m"), "1:1", tokens=1, kv_len=8)
    assert flex_bits == model.weight_bits
    # 8 bits per weight, as on the dense accelerator, plus the zero padding of each weight
    # load's last packed word (spec.layouts.compact_bits; the dense macro's beats need none).
    assert dense_bits < flex_bits < plain["flexcim"]["decode"]["weight_bits"]
    assert plain["flexcim"]["decode"]["weight_bits"] * 8 == dense_bits * 12  # 4-bit indices
