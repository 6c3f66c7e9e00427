import json

import pytest

from flexcim.errors import FlexCimError
from flexcim.report import Report, markdown_table, pyplot


def test_markdown_table_formats_and_checks_width():
    text = markdown_table(["a", "b"], [[1234567, 0.5], [True, "x"]])
    lines = text.splitlines()
    assert lines[0] == "| a | b |"
    assert lines[2] == "| 1,234,567 | 0.5 |"
    assert lines[3] == "| yes | x |"
    with pytest.raises(FlexCimError, match="2 headers"):
        markdown_table(["a", "b"], [[1]])


def test_report_writes_markdown_json_and_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    report = Report(str(tmp_path / "out"), "T")
    report.record("numbers", {"a": np.int64(3), "b": np.arange(3)})
    report.section("S", "para")
    report.table(["x"], [[1.0]])
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    report.plot("line", fig, "a line")
    md, js = report.write()
    text = open(md).read()
    assert "# T" in text and "## S" in text and "![a line](line.png)" in text
    assert json.load(open(js)) == {"numbers": {"a": 3, "b": [0, 1, 2]}}
    assert (tmp_path / "out" / "line.png").stat().st_size > 1000


def test_demo_writes_report(tmp_path, capsys):
    from flexcim.cli import main

    assert main(["demo", "--only", "golden", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "report.json"))
    assert all(row["match"] for row in data["golden_check"])
    assert "total" in data["stage_seconds"]
    assert "## Golden model" in open(tmp_path / "report.md").read()


def test_prefill_comparison_orders_the_macros():
    from flexcim.golden import energy, perf
    from flexcim.spec.config import preset

    from flexcim.demo import prefill_comparison

    shapes = {"q": [96, 576], "down": [576, 192]}
    plan = {"layers": [{"name": "b0", "pattern": "2:8", "linears": shapes},
                       {"name": "b1", "pattern": "2:4", "linears": shapes}]}
    result = prefill_comparison(plan, tokens=8, act_layers=("q",))
    dense_act, pruned = result["dense_act"], result["pruned_act"]
    # Independent: the cycle model per linear, summed by hand.
    for name, patterns in (("default", ("2:8", "2:4")), ("dense", ("1:1", "1:1")),
                           ("fixed24", ("2:4", "2:4"))):
        cfg = preset(name)
        expected = sum(perf.layer_cycles(cfg, perf.schedule(cfg, p, 8, k, c))
                       for p in patterns for c, k in shapes.values())
        assert dense_act[name]["cycles"] == expected, name
    assert dense_act["default"]["latency_vs_ref"] > 1.2 > 1 > dense_act["dense"]["latency_vs_ref"]
    # Gating the zeros of activation pruning saves energy without changing cycles.
    assert pruned["default"]["energy_pj"] < dense_act["default"]["energy_pj"]
    assert pruned["default"]["cycles"] == dense_act["default"]["cycles"]
    # only q's activations are pruned: the saving is q's alone, computed per linear by hand
    for name, patterns in (("default", ("2:8", "2:4")), ("dense", ("1:1", "1:1"))):
        cfg = preset(name)
        c, k = shapes["q"]
        saving = sum(energy.layer_cost(cfg, p, 8, k, c).total_pj
                     - energy.layer_cost(cfg, p, 8, k, c, act_density=0.5).total_pj
                     for p in patterns)
        assert dense_act[name]["energy_pj"] - pruned[name]["energy_pj"] == pytest.approx(saving)
    everything = prefill_comparison(plan, tokens=8, act_layers=("q", "down"))["pruned_act"]
    assert everything["default"]["energy_pj"] < pruned["default"]["energy_pj"]


@pytest.mark.parametrize("only, message", [("gold", "unknown demo stage 'gold'"),
                                           ("perf", "needs stage 'flow'")])
def test_demo_rejects_bad_stage_lists(tmp_path, capsys, only, message):
    from flexcim.cli import main

    assert main(["demo", "--only", only, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_demo_area_stage_skips_without_synthesis(tmp_path, monkeypatch):
    from flexcim.hw import area

    from flexcim.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(area, "RECORD", tmp_path / "no-record.json")
    assert main(["demo", "--only", "area", "--out", "rep"]) == 0
    assert "run `make synth`" in (tmp_path / "rep" / "report.md").read_text()


def test_demo_area_stage_shows_the_synthesis_of_the_current_sources(tmp_path, monkeypatch):
    from flexcim.hw import area

    def result(sources, total):  # only what tells the files apart
        return {"presets": {"dense": {"total": total}}, "sources": sources}

    monkeypatch.chdir(tmp_path)
    record = tmp_path / "record.json"
    monkeypatch.setattr(area, "RECORD", record)
    (tmp_path / "out" / "synth").mkdir(parents=True)
    local = tmp_path / "out" / "synth" / "area.json"
    record.write_text(json.dumps(result(area.sources_digest(), 100.0)))
    local.write_text(json.dumps(result("0" * 64, 200.0)))  # an older machine run: stale

    from flexcim.demo import area_table

    path, chosen, current = area_table([str(local), record])
    assert (path, current, chosen["presets"]["dense"]["total"]) == (str(record), True, 100.0)
    local.write_text(json.dumps(result(area.sources_digest(), 300.0)))  # a current local run wins
    path, chosen, current = area_table([str(local), record])
    assert (path, current, chosen["presets"]["dense"]["total"]) == (str(local), True, 300.0)
    record.write_text(json.dumps(result("1" * 64, 100.0)))
    local.unlink()
    path, chosen, current = area_table([str(local), record])
    assert (path, current) == (str(record), False)  # only a stale one: shown, marked stale
    assert area_table([str(local)]) is None


def test_the_recorded_area_table_is_the_synthesis_of_the_current_sources(tmp_path,
                                                                         monkeypatch):
    """docs/area.json, which a cold demo shows, must be `make synth`'s result for the RTL,
    the pricing and the tools of this checkout."""
    from flexcim.hw import area

    from flexcim.cli import main

    recorded = json.loads(area.RECORD.read_text())
    assert recorded["sources"] == area.sources_digest(), (
        "hw/, spec/ or a tool version changed since docs/area.json was measured: run "
        "`make synth && cp out/synth/area.json docs/area.json` and commit it")
    assert {"dense", "fixed24", "flex8", "default"} <= set(recorded["presets"])
    assert set(recorded["tools"]) == set(area.TOOLS)
    for name, row in recorded["presets"].items():
        assert row["total"] > row["sram_adjusted"] > 0, name
    # a demo without a synthesis of its own (no out/synth here) shows it, as current
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--only", "area", "--out", "rep"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "the project's recorded run" in text and "are the current ones" in text
    assert "stale" not in text
    assert f"{recorded['presets']['default']['total'] / 1e3:.1f}k" in text


def test_iso_accuracy_compares_each_macro_with_its_best_plan():
    from flexcim.demo import iso_accuracy

    def point(name, ppl, flex, fixed, e_flex, e_fixed):
        return {"name": name, "ppl": ppl,
                "prefill": {"default": {"cycles": flex, "energy_pj": e_flex},
                            "fixed24": {"cycles": fixed, "energy_pj": e_fixed}}}

    points = [point("dense", 40, 100, 100, 10, 10),
              point("u48", 110, 50, 100, 7, 10),       # fixed24 must run 4:8 dense
              point("u24", 168, 50, 50, 7, 6),         # both run 2:4 sparse; FlexCiM: u48 wins
              point("u28", 400, 25, 50, 5, 6),         # fixed24 runs 2:8 as 2:4
              point("mixed", 75, 75, 75, 8, 8),
              point("slow", 120, 90, 60, 9, 7)]        # dominated on FlexCiM by u48
    rows = iso_accuracy(points)
    assert [r["plan"] for r in rows] == ["u28", "u48", "mixed", "dense"]  # by FlexCiM cycles
    u28, u48, mixed, dense = rows
    # at perplexity <= 400 fixed24's fastest are u24 and u28 (50): the more accurate one
    assert u28["reference_fastest"] == "u24" and u28["latency_ratio"] == 50 / 25
    assert u28["reference_frugal"] == "u24" and u28["energy_ratio"] == 6 / 5
    # at <= 110 fixed24's fastest is "mixed" (75 cycles), not u48 (which it runs dense)
    assert u48["reference_fastest"] == "mixed" and u48["latency_ratio"] == 75 / 50
    assert u48["reference_frugal"] == "mixed" and u48["energy_ratio"] == 8 / 7
    assert mixed["latency_ratio"] == 1.0 and dense["latency_ratio"] == 1.0


def test_system_stage_reports_prefill_and_decode(tmp_path, monkeypatch):
    import argparse
    import time

    from flexcim import demo
    from flexcim.demo import Context, stage_system, system_iso_accuracy

    def plan(pattern):  # one entry: the same pattern on every block of any model
        return {"layers": [{"name": "model.layers.0", "pattern": pattern,
                            "linears": {"model.layers.0.self_attn.q_proj": [576, 576]}}]}

    plans = {"dense": plan("1:1"), "u24": plan("2:4"), "u28": plan("2:8"), "u48": plan("4:8"),
             "slow": plan("1:1")}
    points = [{"name": n, "ppl": ppl} for n, ppl in
              (("dense", 40.0), ("u24", 168.0), ("u28", 400.0), ("u48", 110.0), ("slow", 500.0))]
    # FlexCiM runs 2:8 fastest, then 2:4/4:8 (equal speed, 4:8 more accurate), then dense.
    rows = system_iso_accuracy(points, plans, "smollm2-135m", macros=4, tokens=16, kv_len=64)
    assert [r["plan"] for r in rows] == ["u28", "u48", "dense"]
    u28, u48, dense = rows
    assert u28["reference_fastest"] == "u24" and u28["reference_frugal"] == "u24"
    # fixed24 runs 4:8 dense: at perplexity <= 110 its best is the dense plan itself.
    assert u48["reference_fastest"] == "dense" and u48["prefill_ratio"] > 1.5
    assert u28["decode_energy_ratio"] > 1
    # The same dense plan: stored packed (demo.COMPACT_WEIGHTS), both move 8 bits per weight
    # (only padding and leakage differ); stored as the macros' beats, FlexCiM's carry 4-bit
    # indices (fixed24's 2), so its DRAM-bound projections take longer and cost more.
    assert demo.COMPACT_WEIGHTS
    assert abs(dense["prefill_ratio"] - 1) < 0.01 and abs(dense["decode_energy_ratio"] - 1) < 0.01
    # A plan that prunes the LM head (demo --lm-head): the same blocks, a lighter decode
    headed = {**plans, "u28h": {**plans["u28"], "lm_head": "12:16"}}
    rows_h = {r["plan"]: r for r in system_iso_accuracy(
        points + [{"name": "u28h", "ppl": 400.0}], headed, "smollm2-135m", macros=4,
        tokens=16, kv_len=64)}
    assert rows_h["u28h"]["decode_uj"] < u28["decode_uj"] and "u28" not in rows_h
    monkeypatch.setattr(demo, "COMPACT_WEIGHTS", False)
    beats = system_iso_accuracy(points, plans, "smollm2-135m", macros=4, tokens=16, kv_len=64)
    monkeypatch.undo()
    plain = {r["plan"]: r for r in beats}["dense"]
    assert 0.95 < plain["prefill_ratio"] < 0.99 and plain["decode_energy_ratio"] < 0.9
    report = Report(str(tmp_path), "T")
    ctx = Context(argparse.Namespace(), report, {"energy_plan": plans["u28"], "points": points,
                                                 "energy_plans": plans})
    pyplot()  # imported by earlier stages in a demo run: time the stage alone
    start = time.process_time()  # CPU time: the stage's cost, not a busy machine's other jobs
    stage_system(ctx)
    assert time.process_time() - start < 10
    data = report.data["system"]
    assert set(data["models"]) == {"smollm2-135m", "llama-2-7b"}
    big = data["models"]["llama-2-7b"]
    assert big["flexcim"]["decode"]["bound"] == "memory"
    assert big["fixed24"]["decode"]["energy_vs_flexcim"] > 1
    md, _ = report.write()
    text = open(md).read()
    assert "## Prefill and decode on an accelerator" in text and "system_energy.png" in text


def _rendered_tables(text: str) -> list[list[list[str]]]:
    """Every table markdown-it (GFM tables) renders from ``text``: rows of cell texts."""
    from markdown_it import MarkdownIt

    tables, row, cell = [], None, None
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        if token.type == "table_open":
            tables.append([])
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close":
            tables[-1].append(row)
        elif token.type in ("th_open", "td_open"):
            cell = ""
        elif token.type == "inline" and cell is not None:
            cell = token.content
        elif token.type in ("th_close", "td_close"):
            row.append(cell)
            cell = None
    return tables


def test_markdown_table_cells_survive_rendering():
    # a pipe, a line break and markup in cells must not move any cell to another column
    headers = ["plan", "a|b", "value"]
    rows = [["uniform 2:4 | 4:8", "x\ny", 1.5], ["`a|b`", None, float("nan")],
            ["**bold**", True, 7]]
    (table,) = _rendered_tables(markdown_table(headers, rows))
    assert table[0] == ["plan", "a|b", "value"]
    assert table[1] == ["uniform 2:4 | 4:8", "x y", "1.5"]
    assert table[2] == ["`a|b`", "n/a", "n/a"]
    assert table[3] == ["**bold**", "yes", "7"]


def test_label_overlaps_finds_colliding_texts_and_passes_a_clean_figure():
    from flexcim.report import label_overlaps

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    assert label_overlaps(fig) == []
    ax.annotate("first label", (0.5, 0.5))
    ax.annotate("second label", (0.5, 0.5))
    assert ("first label", "second label") in label_overlaps(fig)
    ax.annotate("off the edge", (1.0, 1.0), ha="left")  # crosses the panel's frame
    assert ("off the edge", "the frame of its panel") in label_overlaps(fig)
    plt.close(fig)
    # a y label running into the neighbouring panel
    fig, axes = plt.subplots(1, 2, figsize=(3, 2))
    axes[1].set_ylabel("a long y label of the second panel")
    axes[1].plot([0, 1], [0, 100000])
    assert any("plotting area" in b for _, b in label_overlaps(fig))
    plt.close(fig)


def test_demo_figures_and_tables_render_cleanly(tmp_path):
    """The demo's plots of measured plans have no colliding labels and every table of its report
    renders with all its columns, on plans clustered as the real ones are."""
    import argparse

    from flexcim.demo import (
        Context,
        _iso_accuracy,
        _plot_sweep,
        dense_energy_plan,
        prefill_costs,
        stage_performance,
        stage_system,
    )

    shapes = {"self_attn.q_proj": [576, 576], "self_attn.k_proj": [192, 576],
              "self_attn.v_proj": [192, 576], "self_attn.o_proj": [576, 576],
              "mlp.gate_proj": [1536, 576], "mlp.up_proj": [1536, 576],
              "mlp.down_proj": [576, 1536]}

    def energy_plan(pattern_of):  # 30 blocks, a pattern per block index
        return {"layers": [{"name": f"model.layers.{b}", "pattern": pattern_of(b),
                            "linears": {f"model.layers.{b}.{k}": s for k, s in shapes.items()},
                            "mask_24": pattern_of(b) == "2:4"} for b in range(30)]}

    level = {0.375: "10:16", 0.5: "8:16", 0.625: "6:16", 0.75: "4:16"}
    ppl = {"auto": (55, 81, 212, 485), "uniform N:16": (54, 89, 280, 4105),
           "OWL": (64, 117, 545, 18500), "FLOW": (115, 167, 271, 6540),
           "auto on {1:1, 2:4}": (77, 168, None, None)}
    points, plans = [], {}
    for method, values in ppl.items():
        for (target, pattern), value in zip(level.items(), values, strict=True):
            if value is None:
                continue
            fixed = method == "auto on {1:1, 2:4}"
            ends = method != "uniform N:16"  # every selector but uniform keeps the ends dense
            plan = energy_plan(lambda b, p=pattern, t=target, f=fixed, e=ends:
                               ("2:4" if b % 4 < 4 * t / 0.5 else "1:1") if f else
                               ("1:1" if e and b in (0, 29) else
                                p if p != "10:16" else "8:16"))
            name = f"{method} ({target:.0%})"
            plans[name] = plan
            points.append({"name": name, "method": method, "target": target,
                           "sparsity": target, "ppl": float(value),
                           "ppl_w8a8": float(value) * 1.05 if method.startswith("auto") else None,
                           "prefill": prefill_costs(plan)})
    plans["dense"] = dense_energy_plan(plans["auto (50%)"])
    points.insert(0, {"name": "dense", "method": "dense", "sparsity": 0.0, "ppl": 40.6,
                      "ppl_w8a8": 42.6, "prefill": prefill_costs(plans["dense"])})
    report = Report(str(tmp_path), "T")
    ctx = Context(argparse.Namespace(full_selector=False), report,
                  {"energy_plan": plans["auto (50%)"], "act_layers": ["q_proj", "down_proj"],
                   "points": points, "energy_plans": plans})
    stage_performance(ctx)  # its bar charts and the equal-accuracy plot of every method
    stage_system(ctx)
    _plot_sweep(ctx, (40.6, 42.7), points[1:])
    assert report.data.get("plot_label_overlaps") is None
    md, _ = report.write()
    text = open(md).read()
    tables = _rendered_tables(text)
    blocks = [b for b in text.split("\n\n") if b.lstrip().startswith("|")]
    assert len(tables) == len(blocks) >= 4  # every pipe block renders as a table
    for table in tables:
        assert all(len(row) == len(table[0]) and all(c.strip() for c in row) for row in table)
    assert "--full-selector" in text  # the default demo says how to run the search
    _iso_accuracy(ctx, points)  # the same again: a crowded figure would be recorded
    assert report.data.get("plot_label_overlaps") is None
