"""hw/synth.py on small Amaranth designs whose gate and flip-flop counts are known by hand.

The first Yosys run on a fresh machine compiles the WebAssembly (1-2 minutes, once; `make setup`
does it); after that the whole file takes about 15 s.
"""

import json

import pytest
from amaranth import Cat, Module, Signal
from amaranth.back import verilog
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out
from flexcim.hw import synth

from flexcim.cli import main
from flexcim.errors import FlexCimError


class Xor8(wiring.Component):
    """Combinational a ^ b: exactly 8 two-input XOR (or XNOR) gates, no flip-flop."""

    a: In(8)
    b: In(8)
    y: Out(8)

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.y.eq(self.a ^ self.b)
        return m


class Reg(wiring.Component):
    """A 12-bit register toggled by ``d`` when ``en``: 12 flip-flops, a register-to-register
    path (so nextpnr reports an Fmax)."""

    d: In(12)
    en: In(1)
    q: Out(12)

    def elaborate(self, platform):
        m = Module()
        with m.If(self.en):
            m.d.sync += self.q.eq(self.q ^ self.d)
        return m


class Top(wiring.Component):
    """Two XOR leaves, one register leaf and a 16 x 4-bit memory in the top itself."""

    a: In(8)
    b: In(8)
    addr: In(4)
    we: In(1)
    y: Out(8)
    q: Out(12)
    r: Out(4)

    def elaborate(self, platform):
        m = Module()
        m.submodules.xor_0 = x0 = Xor8()
        m.submodules.xor_1 = x1 = Xor8()
        m.submodules.reg = reg = Reg()
        m.submodules.mem = mem = memory.Memory(shape=4, depth=16, init=[])
        wp, rp = mem.write_port(), mem.read_port(domain="comb")
        inner = Signal(8)
        m.d.comb += [
            x0.a.eq(self.a), x0.b.eq(self.b),
            x1.a.eq(x0.y), x1.b.eq(self.a.rotate_left(3)),
            inner.eq(x1.y), self.y.eq(inner),
            reg.d.eq(Cat(self.a, self.b[:4])), reg.en.eq(self.we), self.q.eq(reg.q),
            wp.addr.eq(self.addr), wp.en.eq(self.we), wp.data.eq(self.a[:4]),
            rp.addr.eq(self.addr), self.r.eq(rp.data),
        ]
        return m


@pytest.fixture(scope="module")
def design(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    path = d / "top.v"
    path.write_text(verilog.convert(Top(), name="top", emit_src=False))
    return path


@pytest.fixture(scope="module")
def generic(design, tmp_path_factory):
    return synth.synthesize(verilog=design, top="top",
                            workdir=tmp_path_factory.mktemp("generic"))


def test_generic_counts_gates_per_module_and_converts_to_nand2(generic):
    mods = generic["modules"]
    assert set(mods) == {"top", "top.xor_0", "top.xor_1", "top.reg"}
    for leaf in ("top.xor_0", "top.xor_1"):
        gates = mods[leaf]["gates"]
        # 8 XOR or XNOR gates (ABC may push an inversion into either), nothing else.
        assert sum(gates.values()) == 8 and set(gates) <= {"$_XOR_", "$_XNOR_"}, gates
        assert mods[leaf]["nand2"] == pytest.approx(8 * 1.596 / 0.798)
        assert mods[leaf]["ff_bits"] == 0
    # The synchronous reset (over the enable) is legalised to gates, the enable to gates or a
    # DFFE: either way 12 DFF_X1 of storage.
    reg = mods["top.reg"]
    assert reg["ff_bits"] == 12 and reg["ff_nand2"] == pytest.approx(12 * 4.522 / 0.798)
    assert reg["gates"].get("$_DFF_P_", 0) + reg["gates"].get("$_DFFE_PP_", 0) == 12
    assert mods["top"]["children"] == {"top.xor_0": 1, "top.xor_1": 1, "top.reg": 1}
    # The memory: 64 bits in the RTL, mapped to 64 enable flip-flops in the top module.
    assert mods["top"]["memory_bits"] == 64
    assert mods["top"]["ff_bits"] == 64 and mods["top"]["gates"]["$_DFFE_PP_"] == 64
    assert mods["top"]["ff_nand2"] == pytest.approx(64 * 4.522 / 0.798)
    assert mods["top"]["logic_nand2"] > 0  # the multiply-add and the memory's read mux


def test_generic_tree_and_kinds_sum_the_modules(generic):
    mods, total = generic["modules"], generic["total"]
    weights = {k: v["nand2"] for k, v in generic["weights"]["cells"].items()}
    # Recompute the whole area from the raw gate counts, independently of the report's sums.
    flat = sum(n * weights[g] for m in mods.values() for g, n in m["gates"].items())
    assert total["nand2"] == pytest.approx(flat)
    assert total["ff_bits"] == 12 + 64 and total["memory_bits"] == 64
    assert generic["kinds"]["xor"]["instances"] == 2
    assert generic["kinds"]["xor"]["nand2"] == pytest.approx(2 * mods["top.xor_0"]["nand2"])
    assert sum(k["nand2"] for k in generic["kinds"].values()) == pytest.approx(total["nand2"])
    assert generic["tree"]["top.reg"]["nand2"] == mods["top.reg"]["nand2"]
    assert "NanGate" in generic["weights"]["source"]
    assert synth.sram_bit_nand2() == pytest.approx(0.346 / 0.798)


def test_generic_reports_the_longest_path_across_modules(generic):
    depth = generic["logic_depth"]
    # a -> xor_0 -> xor_1 -> y crosses two leaves: at least one gate in each, after flattening
    assert depth["gates"] >= 2
    assert sum(count for _, count in depth["stages"]) == depth["gates"]
    assert {kind for kind, _ in depth["stages"]} <= {"xor", "reg", "(top)"}


LTP = r"""
9. Executing LTP pass (find longest path).

Longest topological path in flexcim_dense (length=5):
    0: \buffer.bank1_28 [7]
    1: $flatten\buffer.$abc$1$new_n1 (via $flatten\buffer.$abc$1$blif$1$2)
    2: \buffer.$65 (via $flatten\buffer.$abc$1$blif$1$3)
    3: $flatten\sub1.\row10.$abc$2$new_n6 (via $flatten\sub1.\row10.$abc$2$blif$2$0)
    4: \sub1.tree0.sum (via $flatten\sub1.\tree0.$abc$3$blif$3$835)
    5: $flatten\sub1.$abc$4$MuxGate$7 (via $flatten\sub1.$abc$4$blif$4$228)
   ff: \sub1.psums [0] (via $flatten\sub1.$auto$ff.cc:337:slice$8)

"""


def test_logic_depth_splits_the_path_by_module_kind():
    depth = synth.logic_depth(LTP, "flexcim_dense")
    assert depth == {"gates": 5, "start": "buffer.bank1_28", "end": "sub1.psums",
                     "stages": [["buffer", 2], ["sub.row", 1], ["sub.tree", 1], ["sub", 1]]}
    with pytest.raises(FlexCimError, match="ltp"):
        synth.logic_depth("no path here", "top")


def test_ice40_reports_luts_ffs_and_fmax(design, tmp_path):
    report = synth.synthesize(verilog=design, top="top", target="ice40", workdir=tmp_path)
    assert report["ffs"] == 12 + 64 or report["brams"] >= 1  # the memory may land in a BRAM
    assert report["luts"] >= 8  # at least the 8 output XORs (a ^ b ^ rot(a) folds into 8 LUTs)
    assert 10 < report["fmax_mhz"] < 1000
    assert report["utilization"]["ICESTORM_LC"]["used"] >= report["luts"]


def test_cli_writes_report_and_table(design, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["synth", "--verilog", str(design), "--top", "top", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["target"] == "generic" and report["top"] == "top"
    table = capsys.readouterr().out
    assert "xor" in table and "total" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--verilog", "{d}/top.v", "--top", "nope"], "top module 'nope' is not defined"),
        (["--verilog", "{d}/missing.v", "--top", "top"], "does not exist"),
        (["--verilog", "{d}/top.v"], "--verilog needs --top"),
        (["--verilog", "{d}/top.v", "--top", "top", "--set", "rows=2"], "--set applies to"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "tiny", "--top", "top"], "--top goes with --verilog"),
        (["--verilog", "{d}/top.v", "--top", "top", "-o", "{d}/no/dir/r.json"],
         "output directory"),
    ],
)
def test_cli_bad_input_is_one_line(design, capsys, argv, message):
    argv = [a.format(d=design.parent) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(design.parent / "r.json")]
    assert main(["synth", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_tool_is_named(monkeypatch, design, tmp_path):
    monkeypatch.setattr(synth.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FlexCimError, match="yosys is not installed: expected the PyPI package"):
        synth.synthesize(verilog=design, top="top", workdir=tmp_path)


def test_unknown_cell_type_is_refused():
    stat = {"modules": {"\\t": {"num_cells_by_type": {"$_DLATCH_P_": 1}}}}
    with pytest.raises(FlexCimError, match=r"cell type '\$_DLATCH_P_' that has no area weight"):
        synth.area_report(stat, {"modules": {}}, "t")


def test_yosys_error_becomes_one_line(tmp_path):
    bad = tmp_path / "bad.v"
    bad.write_text("module top(input a, output y); assign y = a &; endmodule\n")
    with pytest.raises(FlexCimError, match=r"yosys failed .*ERROR") as info:
        synth.synthesize(verilog=bad, top="top", workdir=tmp_path / "w")
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 1  # a tool that fails: the work failed, not bad usage


def test_tiny_preset_maps_onto_the_parts_of_the_macro(tmp_path):
    """The FlexCiM top itself (tiny, with a 32-channel buffer to stay fast): every module lands
    in a named part of the macro and the cell rows hold exactly the weight and index bits.

    Synthesised twice: every module instance, and identical modules once (the default).  Yosys
    and ABC do not give identical modules identical gates within one run (here one of the 8
    cell rows of the full run maps a few gates differently from the other 7), so the check is:
    every deduplicated module has exactly the gates of some copy of it in the full run, the
    flip-flops and memory bits are equal, and the totals agree to 0.5% (0.1% while the
    register-built activation buffer, identical in both runs, was most of the area; since the
    buffer is in memories the cell rows dominate, and ABC maps the one deduplicated row 0.45%
    larger than the average of the 8 copies of the full run, 2026-12-05)."""
    pytest.importorskip("flexcim.hw.top", reason="the FlexCiM top has not landed yet")
    from flexcim.hw import area
    from flexcim.spec.config import preset

    cfg = preset("tiny").replace(max_k=32)
    report = synth.synthesize(config=cfg, workdir=tmp_path / "full", dedup=False)
    dedup = synth.synthesize(config=cfg, workdir=tmp_path / "dedup")
    assert report["modules_deduplicated"] == 0
    assert dedup["modules_deduplicated"] >= 2 * cfg.rows_total - 2  # rows and trees collapse
    assert set(dedup["kinds"]) == set(report["kinds"])
    for kind, v in dedup["kinds"].items():
        assert v["instances"] == report["kinds"][kind]["instances"], kind
        assert v["ff_bits"] == report["kinds"][kind]["ff_bits"], kind
        assert v["memory_bits"] == report["kinds"][kind]["memory_bits"], kind
    for name, v in dedup["modules"].items():
        copies = [m["gates"] for n, m in report["modules"].items()
                  if synth._kind(n, report["top"]) == synth._kind(name, dedup["top"])]
        # ABC may map one copy a few gates differently (seen on a cell row with the tapped
        # selection): the same cell counts or within 2 % of some copy's gate count
        gates = sum(v["gates"].values())
        assert v["gates"] in copies or any(
            abs(gates - sum(c.values())) <= 0.02 * gates for c in copies), name
    assert dedup["total"]["nand2"] == pytest.approx(report["total"]["nand2"], rel=5e-3)
    bits = area.storage_bits(cfg)
    assert area.row_memory_bits(report) == bits["weight_bits"] + bits["index_bits"]
    parts = area.part_areas(report)
    assert parts["other"] == 0, sorted(report["kinds"])
    for label in ("cell rows: weight+index storage (FFs)", "adder trees", "distribution unit",
                  "merging unit", "activation buffer", "controller"):
        assert parts[label] > 0, label
    assert report["config"] == cfg.to_dict()


def test_ice40_placement_overflow_names_a_config_that_fits(monkeypatch, tmp_path):
    """synth_ice40's counts can be under 7680 while packing needs more logic cells: nextpnr's
    "no BELs remaining" becomes the one-line capacity error with a config measured to fit."""
    verilog_file = tmp_path / "d.v"
    verilog_file.write_text("module top(input a, output y); assign y = a; endmodule\n")

    def fake_tool(tool, args, cwd):
        if tool == "yosys":
            stat = {"design": {"num_cells_by_type": {"SB_LUT4": 7000, "SB_DFFE": 3000}}}
            (cwd / "ice40_stat.json").write_text(json.dumps(stat))
        else:
            raise FlexCimError("nextpnr-ice40 failed (exit 125) in x: ERROR: Unable to place "
                               "cell 'c', no BELs remaining to implement cell type 'ICESTORM_LC'")

    monkeypatch.setattr(synth, "run_tool", fake_tool)
    with pytest.raises(FlexCimError, match=r"7000 LUT4 and 3000 flip-flops .* HX8K") as info:
        synth.synthesize(target="ice40", verilog=verilog_file, top="top", workdir=tmp_path)
    assert synth.ICE40_FITS in str(info.value) and "max_k=32" not in str(info.value)


def _dedup_design(dummy_a: int, dummy_b: int, leaf_b: str) -> str:
    leaf = ("module \\t.mid{i}.leaf{j} (a, y);\n  input [3:0] a;\n  output [3:0] y;\n"
            "  assign y = {expr};\nendmodule\n")
    mid = ("module \\t.mid{i} (clk, a, y);\n  reg \\$auto$verilog_backend.cc:2355:dump_module${d}"
           "  = 0;\n  input clk;\n  input [3:0] a;\n  output reg [3:0] y;\n  wire [3:0] p;\n"
           "  wire [3:0] q;\n  \\t.mid{i}.leaf0  leaf0 (.a(a), .y(p));\n"
           "  \\t.mid{i}.leaf1  leaf1 (.a(p), .y(q));\n  always @(posedge clk) y <= q;\n"
           "endmodule\n")
    top = ("module t(clk, a, y0, y1);\n  input clk;\n  input [3:0] a;\n  output [3:0] y0;\n"
           "  output [3:0] y1;\n  \\t.mid0  mid0 (.clk(clk), .a(a), .y(y0));\n"
           "  \\t.mid1  mid1 (.clk(clk), .a(a), .y(y1));\nendmodule\n")
    return (leaf.format(i=0, j=0, expr="a ^ 4'd5") + leaf.format(i=0, j=1, expr="a + 4'd3")
            + leaf.format(i=1, j=0, expr="a ^ 4'd5") + leaf.format(i=1, j=1, expr=leaf_b)
            + mid.format(i=0, d=dummy_a) + mid.format(i=1, d=dummy_b) + top)


def test_dedup_ignores_the_verilog_backends_dummy_register_names():
    # Amaranth's Verilog (through Yosys) gives every module with a process a dummy register
    # numbered across the design: identical sub-macros differ only there and must collapse.
    text, counts = synth.dedup_modules(_dedup_design(6, 7, "a + 4'd3"), "t")
    assert counts == {"t.mid0.leaf0": 2, "t.mid0.leaf1": 2, "t.mid0": 2, "t": 1}
    assert synth.verilog_modules(text) == ["t.mid0.leaf0", "t.mid0.leaf1", "t.mid0", "t"]
    # a real difference in a leaf keeps that leaf and both parents apart
    text, counts = synth.dedup_modules(_dedup_design(6, 7, "a - 4'd3"), "t")
    assert counts == {"t.mid0.leaf0": 2, "t.mid0.leaf1": 1, "t.mid1.leaf1": 1, "t.mid0": 1,
                      "t.mid1": 1, "t": 1}


def test_dedup_keeps_the_area_of_the_full_netlist(tmp_path):
    design = tmp_path / "d.v"
    design.write_text(_dedup_design(6, 7, "a + 4'd3"))
    full = synth.synthesize(verilog=design, top="t", workdir=tmp_path / "full", dedup=False)
    dedup = synth.synthesize(verilog=design, top="t", workdir=tmp_path / "dedup")
    assert dedup["modules_deduplicated"] == 3
    assert dedup["total"]["nand2"] == pytest.approx(full["total"]["nand2"])
    assert dedup["total"]["ff_bits"] == full["total"]["ff_bits"] == 8
