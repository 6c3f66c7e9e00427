"""bench/auto_bench.py's equal-accuracy comparison over runs merged with --iso-from."""

import importlib.util
import json
import pathlib

import pytest

from flexcim.errors import FlexCimError

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "auto_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("auto_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan(pattern, mask_24=False):  # one entry: the same pattern on every block of the model
    return {"layers": [{"name": "model.layers.0", "pattern": pattern, "mask_24": mask_24,
                        "linears": {"model.layers.0.self_attn.q_proj": [576, 576]}}]}


def row(method, macro, target, ppl, pattern, mask_24=False):
    return {"method": method, "variant": "best", "macro": macro, "target": target,
            "metric": "sparsegpt", "achieved": target, "patterns": [pattern], "ppl_test": ppl,
            "energy_plan": plan(pattern, mask_24)}


def run(tests, seed=0):
    return {"model": "m", "text": "t", "seed": seed, "calib_windows": 64, "eval_windows": 16,
            "prune": "sequential", "dense": {"test": 40.0}, "test": tests}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_merged_runs_pair_plans_across_runs(bench, tmp_path):
    high = run([row("auto", "default", 0.625, 80.0, "6:16"),
                row("uniform", "default", 0.625, 90.0, "6:16")])
    low = run([row("auto", "fixed24", 0.5, 70.0, "2:4", mask_24=True),
               row("auto", "default", 0.5, 55.0, "8:16")])
    paths = [write(tmp_path, "high.json", high), write(tmp_path, "low.json", low)]
    assert bench.main(["--iso-from", ",".join(paths), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "auto_bench.json").read_text())
    assert merged["merged_from"] == paths and len(merged["test"]) == 4
    assert (tmp_path / "merged" / "equal_accuracy.png").stat().st_size > 0
    iso = merged["iso_accuracy"]["sparsegpt"]
    rows = {r["plan"]: r for r in iso["macro"]}
    # FlexCiM's 62.5 % plan (80) is served by fixed24's own 2:4 plan of the other run (70):
    # it runs 2:4 at twice dense speed there, FlexCiM 6:16 at 16/6 of it.
    mine = rows["auto (62.5%)"]
    assert mine["reference_fastest"] == "auto on fixed24 (50.0%)"
    assert mine["latency_ratio"] == pytest.approx(16 / 6 / 2, rel=0.1)
    # The 50 % plan (55) is more accurate than anything fixed24 runs sparse: dense serves it.
    assert rows["auto (50.0%)"]["reference_fastest"] == "dense"
    # The uniform plan is as fast as auto's and less accurate: off FlexCiM's front.
    assert "uniform (62.5%)" not in rows
    system = {r["plan"]: r for r in iso["system"]}
    assert system["auto (62.5%)"]["reference_frugal"] == "auto on fixed24 (50.0%)"
    assert system["auto (62.5%)"]["decode_energy_ratio"] > 1
    assert {p["name"] for p in iso["points"]} == {"dense", "auto (62.5%)", "uniform (62.5%)",
                                                  "auto on fixed24 (50.0%)", "auto (50.0%)"}


def test_merge_refuses_runs_that_do_not_fit(bench, tmp_path):
    one = write(tmp_path, "one.json", run([row("auto", "default", 0.5, 55.0, "8:16")]))
    other_seed = write(tmp_path, "seed1.json", run([row("auto", "default", 0.625, 80, "6:16")],
                                                   seed=1))
    with pytest.raises(FlexCimError, match="seed1.json: measured with"):
        bench.main(["--iso-from", f"{one},{other_seed}", "--out", str(tmp_path / "o")])
    with pytest.raises(FlexCimError, match=r"auto \(50.0%\) with sparsegpt is in more than one"):
        bench.main(["--iso-from", f"{one},{one}", "--out", str(tmp_path / "o")])
    old = run([row("auto", "default", 0.5, 55.0, "8:16")])
    del old["test"][0]["energy_plan"]
    with pytest.raises(FlexCimError, match="no test row has its energy plan"):
        bench.main(["--iso-from", write(tmp_path, "old.json", old), "--out",
                    str(tmp_path / "o")])
    with pytest.raises(FlexCimError, match="missing.json: not a readable"):
        bench.main(["--iso-from", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written
