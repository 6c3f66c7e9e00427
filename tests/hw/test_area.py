"""hw/area.py (make synth) on hand-made synthesis reports: part mapping, overheads, SRAM pricing."""

import pytest
from flexcim.hw import area, synth
from flexcim.spec.config import HwConfig

from flexcim.errors import FlexCimError


def kind(nand2, ff_nand2=0.0, memory_bits=0, ff_bits=0):
    return {"nand2": nand2, "ff_nand2": ff_nand2, "logic_nand2": nand2 - ff_nand2,
            "memory_bits": memory_bits, "ff_bits": ff_bits, "instances": 1}


def report(kinds):
    total = {key: sum(k[key] for k in kinds.values())
             for key in ("nand2", "ff_nand2", "logic_nand2", "memory_bits", "ff_bits")}
    return {"kinds": kinds, "total": total}


CFG = HwConfig(sub_macros=1, rows=2, cols=2, depth=2, patterns=("1:1", "1:2"),
               in_lanes=4, max_k=8)
DENSE = CFG.replace(patterns=("1:1",))


def test_parts_take_the_most_specific_prefix_and_split_cell_rows():
    r = report({
        "sub.row": kind(100, ff_nand2=60, memory_bits=8),
        "sub.tree": kind(7),
        "sub": kind(3),
        "distribution": kind(5),
        "buffer.bank": kind(11),
        "mystery": kind(2),
    })
    parts = area.part_areas(r)
    assert parts["cell rows: weight+index storage (FFs)"] == 60
    assert parts["cell rows: select + multiply + read mux"] == 40
    assert parts["adder trees"] == 7 and parts["sub-macro glue"] == 3
    assert parts["activation buffer"] == 11 and parts["other"] == 2
    assert sum(parts.values()) == pytest.approx(r["total"]["nand2"])


def test_storage_bits_count_weights_and_indices():
    assert area.storage_bits(CFG) == {"weight_bits": 2 * 2 * 2 * 8, "index_bits": 2 * 2 * 2 * 1}
    assert area.storage_bits(DENSE)["index_bits"] == 0


def test_compare_overheads_and_sram_adjustment():
    per_bit = synth.nand2_eq("$_DFFE_PP_")
    sram = synth.sram_bit_nand2()
    # The buffer: its memory bits (as the generator builds them) plus 200 of logic and registers.
    bd, bf = area.buffer_bits(DENSE), area.buffer_bits(CFG)
    assert bd == bf == 2 * CFG.max_k * 8 * 4  # 16 memories of 2-lane 1-bit slices, 4x padded
    dense = report({"sub.row": kind(64 * per_bit + 50, 64 * 4.522 / 0.798, memory_bits=64),
                    "buffer": kind(200 + bd * per_bit, memory_bits=bd)})
    flex = report({"sub.row": kind(72 * per_bit + 80, 72 * 4.522 / 0.798, memory_bits=72),
                   "distribution": kind(30), "buffer": kind(200 + bf * per_bit, memory_bits=bf)})
    result = area.compare({"dense": dense, "flex": flex}, {"dense": DENSE, "flex": CFG})
    assert result["same_cells"]
    f, d = result["presets"]["flex"], result["presets"]["dense"]
    assert f["overhead_pct"] == pytest.approx(100 * (flex["total"]["nand2"] /
                                                     dense["total"]["nand2"] - 1))
    # SRAM pricing: each of the 72 (64) memory bits costs 0.434 instead of DFF + hold mux.
    assert f["sram_adjusted"] == pytest.approx((72 + bf) * sram + 80 + 30 + 200)
    assert d["sram_adjusted"] == pytest.approx((64 + bd) * sram + 50 + 200)
    assert f["core"] == pytest.approx(72 * per_bit + 80 + 30)  # the buffer is not core
    assert f["core_sram_adjusted"] == pytest.approx(72 * sram + 110)
    # Issue 14's scope adds the activation buffer, its memory bits priced as bit cells too.
    assert f["buffer_memory_bits"] == bf
    assert f["core_buffer_sram_adjusted"] == pytest.approx((72 + bf) * sram + 310)
    assert f["core_buffer_overhead_sram_pct"] == pytest.approx(
        100 * (((72 + bf) * sram + 310) / ((64 + bd) * sram + 250) - 1))
    assert "| compute core + activation buffer, SRAM-adjusted |" in area.markdown(
        result, ["dense", "flex"])
    assert f["part_delta_pct"]["distribution unit"] == pytest.approx(
        100 * 30 / dense["total"]["nand2"])
    assert f["index_storage_nand2_ff"] == pytest.approx(8 * per_bit)
    assert "| distribution unit |" in area.markdown(result, ["dense", "flex"])


def test_compare_refuses_a_buffer_of_other_memory_bits():
    rows = {"sub.row": kind(10, memory_bits=64), "buffer": kind(10, memory_bits=8)}
    with pytest.raises(FlexCimError, match="activation buffer holds 8 memory bits, expected"):
        area.compare({"dense": report(rows)}, {"dense": DENSE})


def test_compare_refuses_a_mapping_that_misses_the_cell_storage():
    wrong = report({"sub.row": kind(10, memory_bits=60)})
    with pytest.raises(FlexCimError, match="cell rows hold 60 memory bits, expected 64") as info:
        area.compare({"dense": wrong}, {"dense": DENSE})
    assert info.value.exit_code == 1  # a measurement that contradicts the model: the work failed


def test_compare_says_when_geometries_differ():
    other = DENSE.replace(cols=4)
    buffer = kind(10, memory_bits=area.buffer_bits(DENSE))
    r = report({"sub.row": kind(10, memory_bits=64), "buffer": buffer})
    r2 = report({"sub.row": kind(10, memory_bits=128), "buffer": buffer})
    assert not area.compare({"dense": r, "wide": r2}, {"dense": DENSE, "wide": other})[
        "same_cells"]


def test_area_rejects_zero_jobs_before_any_work(tmp_path, capsys):
    assert area.main(["--jobs", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--jobs must be at least 1, not 0" in capsys.readouterr().err
    assert not (tmp_path / "o" / "area.json").exists()


def test_sources_digest_changes_with_any_source_file(tmp_path):
    hw, spec = tmp_path / "hw", tmp_path / "spec"
    hw.mkdir()
    spec.mkdir()
    (hw / "a.py").write_text("x = 1\n")
    (spec / "b.py").write_text("y = 2\n")
    (hw / "notes.txt").write_text("not code")
    first = area.sources_digest((hw, spec))
    assert first == area.sources_digest((hw, spec))  # deterministic
    (hw / "notes.txt").write_text("other")  # not a .py file: not part of the RTL's sources
    assert area.sources_digest((hw, spec)) == first
    (spec / "b.py").write_text("y = 3\n")
    assert area.sources_digest((hw, spec)) != first
    (spec / "b.py").write_text("y = 2\n")
    (hw / "c.py").write_text("")  # a new, empty module counts too
    assert area.sources_digest((hw, spec)) != first
    # the checkout's own: 64 hex digits, and tool versions recorded apart
    assert len(area.sources_digest()) == 64
    assert set(area.tool_versions()) == set(area.TOOLS)


def unpacker_report(cfg, gates, extra_ff=0):
    """A synthesis report of ``cfg``'s weight unpacker as synth.area_report makes it: one
    module instantiated once, ``gates`` cells of each kind plus its flip-flops."""
    ff = area.unpacker_bits(cfg) + extra_ff
    cells = {"$_NAND_": gates["nand"], "$_MUX_": gates["mux"], "$_DFF_P_": ff}
    own = synth._local_area(cells, 0, set())
    return {"top": "u", "modules": {"u": own}, "total": own,
            "logic_depth": {"gates": 7, "start": "a", "end": "b", "stages": [["(top)", 7]]}}


def test_compare_reports_each_presets_unpacker_and_its_share_of_the_macro():
    per_bit = synth.nand2_eq("$_DFFE_PP_")
    bd, bf = area.buffer_bits(DENSE), area.buffer_bits(CFG)
    dense = report({"sub.row": kind(64 * per_bit + 50, memory_bits=64),
                    "buffer": kind(200 + bd * per_bit, memory_bits=bd)})
    flex = report({"sub.row": kind(72 * per_bit + 80, memory_bits=72),
                   "buffer": kind(200 + bf * per_bit, memory_bits=bf)})
    unpackers = {"dense": unpacker_report(DENSE, {"nand": 10, "mux": 2}),
                 "flex": unpacker_report(CFG, {"nand": 40, "mux": 6})}
    result = area.compare({"dense": dense, "flex": flex}, {"dense": DENSE, "flex": CFG},
                          unpackers=unpackers)
    u = result["presets"]["flex"]["unpacker"]
    ff = area.unpacker_bits(CFG)
    # by hand: 40 NAND2 (1.0 each) + 6 MUX2 (1862/798) + ff DFFs (4522/798 each)
    assert u["nand2"] == pytest.approx(40 + 6 * 1.862 / 0.798 + ff * 4.522 / 0.798)
    assert u["logic_nand2"] == pytest.approx(40 + 6 * 1.862 / 0.798)
    assert u["ff_bits"] == ff and u["gates"] == 40 + 6 + ff
    assert u["logic_depth"]["gates"] == 7
    macro = result["presets"]["flex"]
    assert u["of_macro_pct"] == pytest.approx(100 * u["nand2"] / flex["total"]["nand2"])
    assert u["of_macro_sram_pct"] == pytest.approx(100 * u["nand2"] / macro["sram_adjusted"])
    assert macro["total"] == flex["total"]["nand2"]  # not added to the macro's totals
    text = area.markdown(result, ["dense", "flex"])
    assert "| preset | unpacker NAND2-eq |" in text
    line = next(x for x in text.splitlines() if x.startswith("| flex | ") and "k |" in x
                and f"| {ff} |" in x)
    assert f"| {40 + 6 + ff} | 7 | {u['of_macro_pct']:.2f}% |" in line
    # a result without unpackers (recorded before them) still renders, without the table
    assert "unpacker" not in area.markdown(area.compare({"dense": dense}, {"dense": DENSE}),
                                           ["dense"])


def test_compare_refuses_an_unpacker_of_other_flip_flops():
    rows = {"sub.row": kind(10, memory_bits=64),
            "buffer": kind(10, memory_bits=area.buffer_bits(DENSE))}
    with pytest.raises(FlexCimError, match="weight unpacker has .* flip-flops, expected"):
        area.compare({"dense": report(rows)}, {"dense": DENSE},
                     unpackers={"dense": unpacker_report(DENSE, {"nand": 1, "mux": 0}, 3)})


def test_main_reuses_the_unpacker_reports_and_writes_their_table(tmp_path, caplog):
    """make synth's plumbing without Yosys: a preset's macro and unpacker reports of the
    current sources in --out are reused (--reuse), and area.json / area.md get the unpacker."""
    import json
    import logging

    from flexcim.spec.config import preset

    caplog.set_level(logging.INFO, logger="flexcim.area")
    tiny = preset("tiny")
    bits = area.storage_bits(tiny)
    rows = bits["weight_bits"] + bits["index_bits"]
    macro = report({"sub.row": kind(rows * 8.0 + 100, memory_bits=rows),
                    "buffer": kind(500.0, memory_bits=area.buffer_bits(tiny))})
    made_of = {"sources": area.sources_digest(), "tools": area.tool_versions()}
    out = tmp_path / "synth"
    out.mkdir()
    (out / "tiny.json").write_text(json.dumps({**macro, **made_of}))
    unpacker = unpacker_report(tiny, {"nand": 30, "mux": 3})
    (out / f"tiny{area.UNPACK}.json").write_text(json.dumps({**unpacker, **made_of}))
    assert area.main(["--presets", "tiny", "--reuse", "--jobs", "1", "--out", str(out)]) == 0
    result = json.loads((out / "area.json").read_text())
    u = result["presets"]["tiny"]["unpacker"]
    assert u["ff_bits"] == unpacker["total"]["ff_bits"] and u["gates"] == 33 + u["ff_bits"]
    assert u["nand2"] == pytest.approx(unpacker["total"]["nand2"])
    assert "| tiny | " in (out / "area.md").read_text().split("Weight unpacker")[1]
    assert f"tiny{area.UNPACK}: reusing" in caplog.text


@pytest.mark.parametrize("sets", [
    (),  # 4 s of Yosys on an idle machine
    pytest.param(("weight_port_rows=2",), marks=pytest.mark.extended),  # groups span beats
])
def test_the_synthesised_tiny_unpacker_fits_the_generator_and_the_energy_model(tmp_path, sets):
    """The unpacker of tiny (8 patterns up to 8:16, not a make synth preset) through the real
    flow: its flip-flops are register_bits', and golden.energy's structural count bounds the
    netlist's gates and flip-flops from above, by less than 1.6x."""
    from flexcim.golden import energy
    from flexcim.spec.config import preset

    cfg = preset("tiny").with_overrides(sets)
    rep = area._synthesise_unpacker("tiny", cfg, tmp_path / "u")
    dense_macro = {"total": 1e6, "sram_adjusted": 5e5}
    row = area.unpacker_row("tiny", cfg, rep, dense_macro)
    assert row["ff_bits"] == energy.unpack_bits(cfg)["ff"]
    assert row["logic_depth"]["gates"] > 10
    count = sum(energy.unpack_bits(cfg).values())
    assert row["gates"] <= count < 1.6 * row["gates"], (row["gates"], count)
