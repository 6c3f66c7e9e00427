"""flexcim verilog --bus axis: the AXI4-Stream wrapper's Verilog, sidecar and core, and the
one-line refusals (an unknown bus, a stream too wide for AXI4-Stream)."""

import json

import pytest
from flexcim.hw.axis import MAX_TDATA_BITS, AxisFlexCiM
from flexcim.hw.export import default_name
from flexcim.spec.config import preset

from flexcim.cli import main
from flexcim.errors import FlexCimError


@pytest.fixture(scope="module")
def axis_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("axis") / "tiny_axis.v"
    assert main(["-q", "verilog", "--preset", "tiny", "--bus", "axis", "-o", str(out),
                 "--lint"]) == 0
    return out


def test_axis_ports_are_byte_padded_and_named_for_axi(axis_export):
    cfg = preset("tiny")
    text = axis_export.read_text()
    sidecar = json.loads(axis_export.with_suffix(".json").read_text())
    assert sidecar["top"] == "flexcim_tiny_axis" and "module flexcim_tiny_axis(" in text
    assert sidecar["bus"] == "axis"
    assert sidecar["clock"]["name"] == "aclk" and sidecar["reset"]["name"] == "aresetn"
    assert "active low" in sidecar["reset"]["kind"]
    streams = sidecar["axis"]["streams"]
    assert {s["interface"] for s in streams.values()} == {
        "s_axis_cmd", "s_axis_weights", "s_axis_act", "m_axis_result"}
    for name, s in streams.items():
        payload = sidecar["interface"]["streams"][name]["width"]
        assert s["payload_width"] == payload
        assert s["tdata_width"] == 8 * s["tdata_bytes"] and 0 <= s["tdata_width"] - payload < 8
        assert s["tlast"]
    assert streams["result"]["tdata_width"] == 8 * -(-cfg.cols * cfg.acc_bits // 8)
    assert streams["cmd"]["tdata_bytes"] == 3  # a 20-bit command in 3 bytes
    ports = {p["name"]: p for p in sidecar["ports"]}
    assert {"aclk", "aresetn", "error"} <= set(ports) and "clk" not in ports
    for s in streams.values():
        for role, port in s["ports"].items():
            assert port in ports, port
            master_out = role in ("tdata", "tvalid", "tlast")
            assert ports[port]["dir"] == ("out" if master_out == (s["role"] == "master")
                                          else "in"), port
    for name, port in ports.items():  # every port of the map is a port of the module
        width = f"[{port['width'] - 1}:0] " if port["width"] > 1 else ""
        decl = "input" if port["dir"] == "in" else "output"
        assert f"{decl} {width}{name};" in text or f"{decl} reg {width}{name};" in text, name
    core = axis_export.with_suffix(".core").read_text()
    assert "toplevel: flexcim_tiny_axis\n" in core and "m_axis_result (master, tdata 80" in core


def test_module_names_differ_per_bus_and_counters():
    cfg = preset("tiny")
    names = {default_name(cfg, counters, bus) for counters in (False, True)
             for bus in ("native", "axis")}
    assert names == {"flexcim_tiny", "flexcim_tiny_counters", "flexcim_tiny_axis",
                     "flexcim_tiny_counters_axis"}


def _one_line_and_nothing_written(capsys, tmp_path, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err == f"flexcim: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_unknown_bus_is_one_line_and_writes_nothing(tmp_path, capsys):
    _one_line_and_nothing_written(
        capsys, tmp_path, ["verilog", "--preset", "tiny", "--bus", "apb", "-o",
                           str(tmp_path / "m.v")],
        "--bus must be one of native, axis, packed, not 'apb'")


def test_stream_too_wide_for_axis_is_one_line_and_writes_nothing(tmp_path, capsys):
    # 1024 int8 lanes: an 8192-bit activation beat, past AXI4-Stream's 4096-bit tdata.
    _one_line_and_nothing_written(
        capsys, tmp_path, ["verilog", "--preset", "tiny", "--set", "in_lanes=1024", "--set",
                           "max_k=1024", "--bus", "axis", "-o", str(tmp_path / "m.v")],
        f"--bus axis cannot wrap this configuration: its act stream is 8192 bits (1024 bytes "
        f"of tdata); AXI4-Stream tdata is expected to be at most {MAX_TDATA_BITS} bits (512 "
        f"bytes)")


def test_wrapper_parameters_are_checked():
    with pytest.raises(TypeError, match="cfg must be a HwConfig, not dict"):
        AxisFlexCiM({})
    with pytest.raises(TypeError, match="counters must be True or False, not 1"):
        AxisFlexCiM(preset("tiny"), counters=1)
    with pytest.raises(FlexCimError, match="its result stream is 5120 bits"):
        AxisFlexCiM(preset("tiny").replace(cols=256))
