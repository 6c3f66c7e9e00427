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

    assert main(["demo", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "report.json"))
    assert all(row["match"] for row in data["golden_check"])
    assert "total" in data["stage_seconds"]
    assert "## Golden model" in open(tmp_path / "report.md").read()
