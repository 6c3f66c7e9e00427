import json

import pytest

from flexcim.errors import FlexCimError
from flexcim.report import Report, markdown_table


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
    from flexcim.golden import perf
    from flexcim.hw.config import preset

    from flexcim.demo import prefill_comparison

    shapes = {"q": [96, 576], "down": [576, 192]}
    plan = {"layers": [{"name": "b0", "pattern": "2:8", "linears": shapes},
                       {"name": "b1", "pattern": "2:4", "linears": shapes}]}
    result = prefill_comparison(plan, tokens=8)
    dense_act = result["1.0"]
    # Independent: the cycle model per linear, summed by hand.
    for name, patterns in (("default", ("2:8", "2:4")), ("dense", ("1:1", "1:1")),
                           ("fixed24", ("2:4", "2:4"))):
        cfg = preset(name)
        expected = sum(perf.layer_cycles(cfg, perf.schedule(cfg, p, 8, k, c))
                       for p in patterns for c, k in shapes.values())
        assert dense_act[name]["cycles"] == expected, name
    assert dense_act["default"]["latency_vs_ref"] > 1.2 > 1 > dense_act["dense"]["latency_vs_ref"]
    # Gating the zeros of activation pruning saves energy without changing cycles.
    assert result["0.5"]["default"]["energy_pj"] < dense_act["default"]["energy_pj"]
    assert result["0.5"]["default"]["cycles"] == dense_act["default"]["cycles"]


@pytest.mark.parametrize("only, message", [("gold", "unknown demo stage 'gold'"),
                                           ("perf", "needs stage 'flow'")])
def test_demo_rejects_bad_stage_lists(tmp_path, capsys, only, message):
    from flexcim.cli import main

    assert main(["demo", "--only", only, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_demo_area_stage_skips_without_synthesis(tmp_path, monkeypatch):
    from flexcim.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--only", "area", "--out", "rep"]) == 0
    assert "run `make synth`" in (tmp_path / "rep" / "report.md").read_text()
