"""``flexcim verilog``: reproducible Verilog of a macro, a JSON sidecar and a FuseSoC core.

The Verilog is written with ``emit_src=False`` (no machine paths), so the same config gives
the same bytes on every machine.  The sidecar ``OUT.json`` holds the config (it round-trips
through :meth:`HwConfig.from_dict`) and the port map: every top-level port with its direction
and width (``clk`` and ``rst``: the synchronous, active-high ``sync`` domain).  ``OUT.core``
is a FuseSoC CAPI2 description so the IP drops into Edalize-based flows.  ``--counters`` adds
the activity counters (``FlexCiM(cfg, counters=True)``; the sidecar then lists each counter's
bit field of the ``counters`` port); they cost area, so the default is without.
"""

from __future__ import annotations

import json
import logging
import os

from flexcim.hw.config import HwConfig, preset

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_paths, check_output

log = logging.getLogger("flexcim")

VERILOG_SUFFIXES = (".v", ".sv")
SIDECARS = (".json", ".core")


def port_map(cfg: HwConfig, counters: bool = False) -> list[dict]:
    """Top-level ports of the generated module: name, direction, width."""
    from amaranth.hdl import Value
    from flexcim.hw.top import FlexCiM

    top = FlexCiM(cfg, counters=counters)
    ports = [{"name": "clk", "dir": "in", "width": 1}, {"name": "rst", "dir": "in", "width": 1}]
    for path, member, value in top.signature.flatten(top):
        ports.append({
            "name": "__".join(str(p) for p in path),
            "dir": "in" if member.flow.name == "In" else "out",
            "width": len(Value.cast(value)),
        })
    top._MustUse__silence = True  # only its signature was needed
    return ports


def to_verilog(cfg: HwConfig, top: str = "flexcim", counters: bool = False) -> str:
    from amaranth.back import verilog
    from flexcim.hw.top import FlexCiM

    return verilog.convert(FlexCiM(cfg, counters=counters), name=top, emit_src=False)


def counter_fields() -> list[dict]:
    """The bit fields of the ``counters`` port (low bits first) and what each counts."""
    from flexcim.hw.layouts import COUNTERS, counters_layout

    return [{"name": name, "offset": field.offset, "width": field.width,
             "counts": COUNTERS[name]} for name, field in counters_layout()]


def core_file(top: str, verilog_name: str, version: str) -> str:
    """A FuseSoC CAPI2 core with the Verilog as its only source."""
    return (
        "CAPI=2:\n"
        f"name: flexcim:ip:{top}:{version}\n"
        "description: FlexCiM flexible N:M sparse digital compute-in-memory macro "
        "(generated)\n"
        "filesets:\n"
        "  rtl:\n"
        "    files:\n"
        f"      - {verilog_name}\n"
        "    file_type: verilogSource\n"
        "targets:\n"
        "  default:\n"
        "    filesets: [rtl]\n"
        f"    toplevel: {top}\n"
        "  lint:\n"
        "    default_tool: verilator\n"
        "    filesets: [rtl]\n"
        "    tools:\n"
        "      verilator:\n"
        "        mode: lint-only\n"
        "        verilator_options: [-Wno-WIDTH]\n"
        f"    toplevel: {top}\n"
    )


def export(cfg: HwConfig, out: str | os.PathLike, top: str = "flexcim", *,
           counters: bool = False, inputs: tuple = ()) -> dict:
    """Write ``out`` (.v), its ``.json`` sidecar and ``.core``; returns the sidecar dict.
    With ``counters``, the macro has its activity counters and the sidecar their fields.
    ``inputs`` (e.g. the ``--config`` file) may not be overwritten by any of the three."""
    from flexcim import __version__

    if not top.isidentifier():
        raise FlexCimError(f"--top must be a Verilog identifier, not {top!r}")
    out = check_output(out, "Verilog output (-o)", suffixes=VERILOG_SUFFIXES,
                       sidecars=SIDECARS, inputs=inputs)
    verilog_text = to_verilog(cfg, top, counters)
    sidecar = {
        "top": top,
        "verilog": out.name,
        "flexcim_version": __version__,
        "config": cfg.to_dict(),
        "clock": {"name": "clk", "edge": "rising"},
        "reset": {"name": "rst", "kind": "synchronous, active high"},
        "ports": port_map(cfg, counters),
    }
    if counters:
        sidecar["counters"] = counter_fields()
    # The three files appear together or not at all; an existing set survives any failure.
    with atomic_paths([out, *(out.with_suffix(s) for s in SIDECARS)]) as (v, js, core):
        v.write_text(verilog_text)
        js.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        core.write_text(core_file(top, out.name, __version__))
    return sidecar


def _verilog(args) -> int:
    check_output(args.output, "Verilog output (-o)", suffixes=VERILOG_SUFFIXES, sidecars=SIDECARS,
                 inputs=(args.config,))
    if args.config:
        cfg = HwConfig.load(args.config)
    else:
        cfg = preset(args.preset)
    cfg = cfg.with_overrides(args.set or [])
    export(cfg, args.output, args.top, counters=args.counters, inputs=(args.config,))
    log.info("wrote %s (+ .json sidecar, .core): %d cells, patterns %s", args.output, cfg.cells,
             ", ".join(str(p) for p in cfg.patterns))
    if args.lint:
        from flexcim.hw import tools

        tools.lint(args.output, args.top)
        log.info("verilator --lint-only %s: clean (WIDTH waived)", args.output)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "verilog",
        help="generate the FlexCiM macro as Verilog (+ JSON sidecar and FuseSoC core)",
        description="Elaborate a FlexCiM macro and write reproducible Verilog, OUT.json (config "
        "and port map) and OUT.core (FuseSoC CAPI2).",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", metavar="NAME", help="a named config (tiny, default, ...)")
    which.add_argument("--config", metavar="FILE", help="a HwConfig JSON file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set rows=8")
    p.add_argument("-o", "--output", required=True, metavar="OUT.v", help="Verilog file")
    p.add_argument("--top", default="flexcim", help="module name (default flexcim)")
    p.add_argument("--lint", action="store_true", help="run verilator --lint-only on the result")
    p.add_argument("--counters", action="store_true",
                   help="add the activity counters (a read-only 'counters' port; costs area)")
    p.set_defaults(func=_verilog)
