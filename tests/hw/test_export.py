import json

import pytest
from flexcim.hw import tools
from flexcim.hw.export import export
from flexcim.spec.config import PRESETS, HwConfig, preset

from flexcim.cli import main
from flexcim.errors import WorkError


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("verilog") / "tiny.v"
    assert main(["-q", "verilog", "--preset", "tiny", "-o", str(out), "--lint"]) == 0
    return out


def test_verilog_sidecar_and_core_are_written(tiny_export):
    text = tiny_export.read_text()
    assert "module flexcim_tiny(" in text
    assert "/work" not in text and "src =" not in text  # emit_src=False: no machine paths
    sidecar = json.loads(tiny_export.with_suffix(".json").read_text())
    assert HwConfig.from_dict(sidecar["config"]) == preset("tiny")
    ports = {p["name"]: p for p in sidecar["ports"]}
    cfg = preset("tiny")
    assert ports["act__payload"] == {"name": "act__payload", "dir": "in", "width": 8 * 4}
    assert ports["result__payload"]["width"] == cfg.cols * cfg.acc_bits
    assert ports["result__ready"]["dir"] == "in" and ports["cmd__ready"]["dir"] == "out"
    for name, port in ports.items():  # every port of the map is a port of the module
        decl = "input" if port["dir"] == "in" else "output"
        width = f"[{port['width'] - 1}:0] " if port["width"] > 1 else ""
        assert f"{decl} {'wire ' if decl == 'input' else ''}{width}{name};" in text or (
            f"{decl} {width}{name};" in text or f"{decl} reg {width}{name};" in text
        ), name
    core = tiny_export.with_suffix(".core").read_text()
    assert core.startswith("CAPI=2:") and "tiny.v" in core and "toplevel: flexcim_tiny\n" in core


def test_verilog_is_reproducible(tiny_export, tmp_path):
    again = tmp_path / "tiny.v"
    assert main(["-q", "verilog", "--preset", "tiny", "-o", str(again)]) == 0
    assert again.read_text() == tiny_export.read_text()


def test_config_file_overrides_and_top_name(tmp_path, capsys):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(preset("tiny").to_json())
    out = tmp_path / "m.v"
    argv = ["-q", "verilog", "--config", str(cfg_path), "--set", "patterns=1:1,2:4",
            "--top", "macro", "-o", str(out)]
    assert main(argv) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["config"]["patterns"] == ["1:1", "2:4"] and "module macro(" in out.read_text()
    assert main(["verilog", "--preset", "huge", "-o", str(out)]) == 2
    assert main(["verilog", "--preset", "tiny", "-o", str(tmp_path / "no" / "x.v")]) == 2
    assert main(["verilog", "--preset", "tiny", "--top", "9x", "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-3:] == [
        f"flexcim: error: unknown preset 'huge'; expected one of {', '.join(PRESETS)}",
        f"flexcim: error: output directory {str(tmp_path / 'no')!r} does not exist",
        "flexcim: error: --name must be a Verilog identifier (letters, digits and _, not "
        "starting with a digit, at most 100 characters, not a reserved word), not '9x'",
    ]


# A single pattern (the dense preset's set: no pattern code, no indices) and every one-entry
# index at once (sub_macros=1, depth=1, one beat per token, bit-parallel slices) with a pattern
# count that is not a power of 2 (incomplete case statements): each once produced Verilog that
# Verilator rejected (ASCRANGE on a zero-width [-1:0] wire, CASEINCOMPLETE).  The dense and
# default presets themselves take about a minute each to convert: `make verilog` lints them.
LINT_CASES = {
    "dense-patterns": preset("tiny").replace(patterns=("1:1",)),
    "one-entry-indices": preset("tiny").replace(
        sub_macros=1, rows=8, depth=1, in_lanes=8, max_k=8, act_bits_per_cycle=8,
        patterns=("1:1", "2:4", "1:4", "4:8", "2:8", "1:8"),
    ),
}


@pytest.mark.parametrize("name", LINT_CASES)
def test_single_pattern_and_one_entry_indices_lint_clean(name, tmp_path):
    out = tmp_path / f"{name}.v"
    sidecar = export(LINT_CASES[name], out)
    tools.lint(out, sidecar["top"])  # raises on any warning but WIDTH
    assert "[-1:0]" not in out.read_text()


def test_counters_on_request_with_their_fields_in_the_sidecar(tiny_export, tmp_path):
    """--counters adds the 'counters' port (lint-clean) and documents its bit fields; without
    it the module has no such port."""
    from flexcim.spec.layouts import COUNTER_BITS, COUNTERS

    assert "counters" not in tiny_export.read_text()
    out = tmp_path / "counted.v"
    assert main(["-q", "verilog", "--preset", "tiny", "--counters", "-o", str(out),
                 "--lint"]) == 0
    width = len(COUNTERS) * COUNTER_BITS
    assert f"output [{width - 1}:0] counters;" in out.read_text()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert {p["name"]: p["width"] for p in sidecar["ports"]}["counters"] == width
    fields = sidecar["counters"]
    assert [f["name"] for f in fields] == list(COUNTERS)
    assert [f["offset"] for f in fields] == [i * COUNTER_BITS for i in range(len(COUNTERS))]
    counts = {f["name"]: f["counts"] for f in fields}
    assert "selected activation slice" in counts["mac_cycles"]
    assert "should be quiet" in counts["quiet_faults"]


@pytest.mark.parametrize("name, message", [
    ("x.json", "must end in .v or .sv"),   # was: exit 0, the sidecar in x.json, no Verilog
    ("x.core", "must end in .v or .sv"),
    ("", "must be a file name, not ''"),
    ("d.v", "is a directory; expected a file name"),
    ("ro.v", "is read-only"),
    ("cfg.v", "would overwrite the input"),  # its sidecar cfg.json is the --config file
])
def test_verilog_bad_outputs_are_one_line_and_write_nothing(tmp_path, capsys, name, message):
    (tmp_path / "d.v").mkdir()
    (tmp_path / "ro.v").write_text("keep")
    (tmp_path / "ro.v").chmod(0o444)
    (tmp_path / "cfg.json").write_text(preset("tiny").to_json())
    before = {p.name: p.is_dir() or p.read_text() for p in tmp_path.iterdir()}
    out = str(tmp_path / name) if name else ""
    code = main(["verilog", "--config", str(tmp_path / "cfg.json"), "-o", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert {p.name: p.is_dir() or p.read_text() for p in tmp_path.iterdir()} == before


def test_interrupted_verilog_leaves_the_previous_three_files(tiny_export, tmp_path,
                                                             monkeypatch):
    """.v, .json and .core appear as a unit: an interrupt while writing the last one leaves
    the previous set, not a new .v beside an old (or no) sidecar."""
    from flexcim.hw import export as export_mod

    out = tmp_path / "m.v"
    for suffix in (".v", ".json", ".core"):
        out.with_suffix(suffix).write_text(tiny_export.with_suffix(suffix).read_text())
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # the write phase only: a stand-in netlist, then Ctrl-C while the .core is written
    monkeypatch.setattr(export_mod, "to_verilog", lambda *a, **k: "module flexcim; endmodule\n")
    monkeypatch.setattr(export_mod, "port_map", lambda *a, **k: [])
    monkeypatch.setattr(export_mod, "core_file", interrupted)
    assert main(["verilog", "--preset", "tiny", "--set", "cols=8", "-o", str(out)]) == 130
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_a_lint_failure_is_a_failure_of_the_work(tmp_path):
    """Verilator rejecting a netlist is a tool failure (exit status 1), not bad input (2)."""
    bad = tmp_path / "bad.v"
    bad.write_text("module bad(input a, output y);\n  assign y = b;\nendmodule\n")
    with pytest.raises(WorkError, match="verilator --lint-only failed on .*bad.v: %Error") as info:
        tools.lint(bad, "bad")
    assert info.value.exit_code == 1 and "\n" not in str(info.value)

