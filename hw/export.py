"""``flexcim verilog``: reproducible Verilog of a macro and what an integrator reads beside it.

The Verilog is written with ``emit_src=False`` (no machine paths), so the same config gives
the same bytes on every machine.  Its top module is named per configuration
(:func:`~flexcim.spec.config.module_name`: ``flexcim_<preset>`` or ``flexcim_<digest>``, or
``--name``), and Amaranth prefixes every submodule with it, so two configurations drop into
one simulation or synthesis run.  Beside ``OUT.v``:

* ``OUT.json``, the sidecar: the module name and FuseSoC VLNV, the config (it round-trips
  through :meth:`HwConfig.from_dict`), every top-level port with its direction and width
  (``clk`` and ``rst``: the synchronous, active-high ``sync`` domain) and the ``interface``
  section of :func:`flexcim.hw.interface.describe` (payload fields with bit offsets and widths,
  pattern codes, beat order, latencies, limits);
* ``NAME.h`` and ``NAME_pkg.sv`` (``NAME`` the module name): the same constants as a C header
  and a SystemVerilog package ``NAME_pkg`` (for ``--bus packed`` also the ``packed`` section's
  numbers);
* ``OUT.core``: a FuseSoC CAPI2 core using Edalize's flow API (targets ``default``, ``lint``:
  Verilator, ``sim``: Icarus).

``--bus axis`` writes the AXI4-Stream wrapper :class:`~flexcim.hw.axis.AxisFlexCiM` instead
(module ``<name>_axis``, ports ``aclk``, ``aresetn``, ``s_axis_<stream>_*``,
``m_axis_result_*``); its sidecar lists those ports, an ``axis`` section (tdata widths in bits
and bytes, what ``tlast`` means per stream) and the wrapper's clock and reset.  ``--bus
packed`` writes :class:`~flexcim.hw.packed.PackedFlexCiM`, the macro behind the weight
unpacker (module ``<name>_packed``; a ``packed`` stream of compact weight words instead of
``weights``); its sidecar has a ``packed`` section (word width, code bits per pattern, the
command lead), and its header and package the same numbers
(:func:`flexcim.hw.interface.packed_stream`).  The default ``--bus native`` output is byte for
byte what it was before the option existed.

``--counters`` adds the activity counters (``FlexCiM(cfg, counters=True)``; the sidecar then
lists each counter's bit field of the ``counters`` port); they cost area, so the default is
without.  All five files appear together or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from flexcim.spec.config import HwConfig, from_args, module_name

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_paths, check_output

log = logging.getLogger("flexcim")

VERILOG_SUFFIXES = (".v", ".sv")
BUSES = ("native", "axis", "packed")
"""``--bus``: the macro's own ``amaranth.lib.stream`` ports, the AXI4-Stream wrapper, or the
macro behind the weight unpacker (packed weight words in)."""
SIDECARS = (".json", ".core")

# IEEE 1364-2005 and 1800-2017 reserved words: a module (or package) may not be named one.
KEYWORDS = frozenset("""
accept_on alias always always_comb always_ff always_latch and assert assign assume automatic
before begin bind bins binsof bit break buf bufif0 bufif1 byte case casex casez cell chandle
checker class clocking cmos config const constraint context continue cover covergroup coverpoint
cross deassign default defparam design disable dist do edge else end endcase endchecker endclass
endclocking endconfig endfunction endgenerate endgroup endinterface endmodule endpackage
endprimitive endprogram endproperty endspecify endsequence endtable endtask enum event
eventually expect export extends extern final first_match for force foreach forever fork
forkjoin function generate genvar global highz0 highz1 if iff ifnone ignore_bins illegal_bins
implements implies import incdir include initial inout input inside instance int integer
interconnect interface intersect join join_any join_none large let liblist library local
localparam logic longint macromodule matches medium modport module nand negedge nettype new
nexttime nmos nor noshowcancelled not notif0 notif1 null or output package packed parameter
pmos posedge primitive priority program property protected pull0 pull1 pulldown pullup
pulsestyle_ondetect pulsestyle_onevent pure rand randc randcase randsequence rcmos real realtime
ref reg reject_on release repeat restrict return rnmos rpmos rtran rtranif0 rtranif1 s_always
s_eventually s_nexttime s_until s_until_with scalared sequence shortint shortreal showcancelled
signed small soft solve specify specparam static string strong strong0 strong1 struct super
supply0 supply1 sync_accept_on sync_reject_on table tagged task this throughout time
timeprecision timeunit tran tranif0 tranif1 tri tri0 tri1 triand trior trireg type typedef union
unique unique0 unsigned until until_with untyped use uwire var vectored virtual void wait
wait_order wand weak weak0 weak1 while wildcard wire with within wor xnor xor
""".split())
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


def check_name(name: str) -> str:
    """``name`` if it is a legal module name: a simple Verilog identifier (letters, digits and
    ``_``, not starting with a digit; no ``$``, which C identifiers lack: the header's macros
    carry it), at most 100 characters, not a reserved word.  Raises a one-line FlexCimError."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name) or name in KEYWORDS:
        raise FlexCimError(
            f"--name must be a Verilog identifier (letters, digits and _, not starting with a "
            f"digit, at most 100 characters, not a reserved word), not {name!r}"
        )
    return name


def output_files(out: Path, name: str) -> list[Path]:
    """The five files of one export, Verilog first: ``OUT.v``, ``OUT.json``, ``OUT.core``, and
    the C header ``NAME.h`` and SystemVerilog package ``NAME_pkg.sv`` named after the module
    (and the package in it), as lint rules on packages expect."""
    return [out, *(out.with_suffix(s) for s in SIDECARS), out.with_name(f"{name}.h"),
            out.with_name(f"{name}_pkg.sv")]


def vlnv(name: str, version: str) -> str:
    """The FuseSoC VLNV of a generated macro: one core per module name."""
    return f"flexcim:ip:{name}:{version}"


def check_bus(bus: str) -> str:
    """``bus`` if it is one of :data:`BUSES`; else a one-line FlexCimError."""
    if bus not in BUSES:
        raise FlexCimError(f"--bus must be one of {', '.join(BUSES)}, not {bus!r}")
    return bus


def top_class(bus: str):
    from flexcim.hw.axis import AxisFlexCiM
    from flexcim.hw.packed import PackedFlexCiM
    from flexcim.hw.top import FlexCiM

    return {"native": FlexCiM, "axis": AxisFlexCiM, "packed": PackedFlexCiM}[check_bus(bus)]


def default_name(cfg: HwConfig, counters: bool = False, bus: str = "native") -> str:
    """:func:`~flexcim.spec.config.module_name`, with ``_axis`` for the AXI4-Stream wrapper
    and ``_packed`` for the macro behind the weight unpacker (other port lists: they must not
    share the native top's name)."""
    name = module_name(cfg, counters=counters)
    return name if check_bus(bus) == "native" else f"{name}_{bus}"


def port_map(cfg: HwConfig, counters: bool = False, bus: str = "native") -> list[dict]:
    """Top-level ports of the generated module: name, direction, width."""
    from amaranth.hdl import Value

    top = top_class(bus)(cfg, counters=counters)
    ports = ([{"name": "clk", "dir": "in", "width": 1}, {"name": "rst", "dir": "in", "width": 1}]
             if bus != "axis" else [])
    for path, member, value in top.signature.flatten(top):
        ports.append({
            "name": "__".join(str(p) for p in path),
            "dir": "in" if member.flow.name == "In" else "out",
            "width": len(Value.cast(value)),
        })
    top._MustUse__silence = True  # only its signature was needed
    return ports


def to_verilog(cfg: HwConfig, top: str, counters: bool = False, bus: str = "native") -> str:
    from amaranth.back import verilog

    return verilog.convert(top_class(bus)(cfg, counters=counters), name=top, emit_src=False)


def counter_fields() -> list[dict]:
    """The bit fields of the ``counters`` port (low bits first) and what each counts."""
    from flexcim.spec.layouts import COUNTERS, counters_layout

    return [{"name": name, "offset": field.offset, "width": field.width,
             "counts": COUNTERS[name]} for name, field in counters_layout()]


def core_file(top: str, verilog_name: str, version: str, axis: dict | None = None) -> str:
    """A FuseSoC CAPI2 core with the Verilog as its only source, in Edalize's flow API:
    ``default`` and ``lint`` lint it with Verilator, ``sim`` compiles and runs it with Icarus
    (no stimulus: an integrator's core depends on this one and brings its testbench).  With
    ``axis`` (the sidecar's ``axis`` section) the description names the AXI4-Stream
    interfaces and their tdata widths."""
    described = ""
    if axis is not None:
        described = "; AXI4-Stream wrapper, aclk, aresetn, " + ", ".join(
            f"{s['interface']} ({s['role']}, tdata {s['tdata_width']} bits)"
            for s in axis["streams"].values())
    common = ("    filesets: [rtl]\n"
              f"    toplevel: {top}\n")
    lint = ("    flow: lint\n"
            "    flow_options:\n"
            "      tool: verilator\n"
            "      verilator_options: [-Wno-WIDTH]\n")
    return (
        "CAPI=2:\n"
        f"name: {vlnv(top, version)}\n"
        "description: FlexCiM flexible N:M sparse digital compute-in-memory macro "
        f"(generated{described})\n"
        "filesets:\n"
        "  rtl:\n"
        "    files:\n"
        f"      - {verilog_name}\n"
        "    file_type: verilogSource\n"
        "targets:\n"
        f"  default:\n{common}{lint}"
        f"  lint:\n{common}{lint}"
        f"  sim:\n{common}"
        "    flow: sim\n"
        "    flow_options:\n"
        "      tool: icarus\n"
        "      iverilog_options: [-g2005]\n"
    )


def export(cfg: HwConfig, out: str | os.PathLike, name: str | None = None, *,
           counters: bool = False, inputs: tuple = (), bus: str = "native") -> dict:
    """Write ``out`` (.v) and its four companions (:func:`output_files`); returns the sidecar.

    ``name`` is the module name (default :func:`default_name`).  With
    ``counters``, the macro has its activity counters and the sidecar their fields.
    ``bus="axis"`` writes the AXI4-Stream wrapper (:mod:`flexcim.hw.axis`) and describes its
    ports; ``bus="packed"`` the macro behind the weight unpacker (:mod:`flexcim.hw.packed`).
    ``inputs`` (e.g. the ``--config`` file) may not be overwritten by any of the files."""
    from flexcim.hw import interface

    from flexcim import __version__

    axis = _axis_section(cfg, counters, bus)  # refuses a stream too wide, before any work
    packed = _packed_section(cfg, counters, bus)
    name = check_name(default_name(cfg, counters, bus) if name is None else name)
    out = check_output(out, "Verilog output (-o)", suffixes=VERILOG_SUFFIXES,
                       sidecars=SIDECARS, inputs=inputs)
    files = output_files(out, name)
    if len(set(files)) < len(files):
        raise FlexCimError(f"Verilog output (-o) {str(out)!r} is the name of module {name}'s "
                           f"SystemVerilog package; choose another output name or --name")
    check_output(files[3], "C header", inputs=inputs)
    check_output(files[4], "SystemVerilog package", inputs=inputs)
    header = interface.c_header(cfg, name, __version__, counters, packed=packed is not None)
    package = interface.sv_package(cfg, name, __version__, counters, packed=packed is not None)
    verilog_text = to_verilog(cfg, name, counters, bus)
    sidecar = {
        "top": name,
        "vlnv": vlnv(name, __version__),
        "verilog": out.name,
        "c_header": files[3].name,
        "sv_package": files[4].name,
        "flexcim_version": __version__,
        "config": cfg.to_dict(),
        "clock": {"name": "clk", "edge": "rising"},
        "reset": {"name": "rst", "kind": "synchronous, active high"},
        "ports": port_map(cfg, counters, bus),
        "interface": interface.describe(cfg, counters),
    }
    if axis is not None:
        sidecar.update(axis)
    if packed is not None:
        sidecar.update(packed)
    if counters:
        sidecar["counters"] = counter_fields()
    # The files appear together or not at all; an existing set survives any failure.
    with atomic_paths(files) as (v, js, core, h, pkg):
        v.write_text(verilog_text)
        js.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        core.write_text(core_file(name, out.name, __version__, axis and axis["axis"]))
        h.write_text(header)
        pkg.write_text(package)
    return sidecar


def _axis_section(cfg: HwConfig, counters: bool, bus: str) -> dict | None:
    """The sidecar entries of the AXI4-Stream wrapper (None for the native bus): its clock,
    reset, and per stream the AXI4-Stream ports, tdata width in bits and bytes and ``tlast``."""
    if check_bus(bus) != "axis":
        return None
    from flexcim.hw.axis import axis_ports

    return {
        "bus": "axis",
        "clock": {"name": "aclk", "edge": "rising"},
        "reset": {"name": "aresetn", "kind": "synchronous, active low (may be asserted "
                  "asynchronously: every tvalid and tready the module drives is low while it "
                  "is low; release it synchronously to aclk)"},
        "axis": {"padding": "tdata = the payload of interface.streams in its low bits, "
                 "zero-padded to whole bytes; padding ignored on input, 0 on output; no "
                 "tkeep/tstrb (every byte is valid), no tid/tdest/tuser",
                 "streams": axis_ports(cfg, counters)},
    }


def _packed_section(cfg: HwConfig, counters: bool, bus: str) -> dict | None:
    """The sidecar entries of the packed top (None for the other buses): the ``packed``
    stream's ports and word width, each pattern's code bits, the command lead, what replaces
    the macro's ``weights`` stream and, with ``counters``, the ``packed_words`` port."""
    if check_bus(bus) != "packed":
        return None
    from flexcim.hw.interface import packed_stream
    from flexcim.spec.layouts import COUNTER_BITS

    section = {
        # the numbers the C header and SV package carry; refuses a configuration the packed
        # top cannot build
        **packed_stream(cfg),
        "format": "per command that loads weights and that the macro runs, in command order: "
                  "flexcim.spec.layouts.pack_compact of its weight beats (the beats, values "
                  "then the codes of the groups that start in them, concatenated LSB-first, "
                  "cut into word_bits words, the last zero-padded; compact_words words)",
        "replaces": "weights: the interface section's weights stream is internal (the "
                    "unpacker drives it); cmd, act and result are the top's ports",
        "cycles": "golden.perf.layer_cycles + command_lead from the first cmd handshake to "
                  "the last result handshake with no stalls and a word offered every cycle",
    }
    if counters:
        section["packed_words"] = {"port": "packed_words", "width": COUNTER_BITS,
                                   "counts": "packed words taken since reset (wrapping)"}
    return {"bus": "packed", "packed": section}


def _verilog(args) -> int:
    check_bus(args.bus)
    check_output(args.output, "Verilog output (-o)", suffixes=VERILOG_SUFFIXES, sidecars=SIDECARS,
                 inputs=(args.config,))
    if args.name is not None:
        check_name(args.name)
    cfg = from_args(args.preset, args.config, args.set)
    sidecar = export(cfg, args.output, args.name, counters=args.counters, inputs=(args.config,),
                     bus=args.bus)
    log.info("wrote %s (module %s) + sidecar .json, .core, %s, %s: %d cells, patterns %s",
             args.output, sidecar["top"], sidecar["c_header"], sidecar["sv_package"], cfg.cells,
             ", ".join(str(p) for p in cfg.patterns))
    if args.lint:
        from flexcim.hw import tools

        tools.lint(args.output, sidecar["top"])
        log.info("verilator --lint-only %s: clean (WIDTH waived)", args.output)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "verilog",
        help="generate the FlexCiM macro as Verilog (+ sidecar, C header, SV package, core)",
        description="Elaborate a FlexCiM macro and write reproducible Verilog, OUT.json (config, "
        "port map, payload fields, pattern codes, beat order, latencies, limits), OUT.core "
        "(FuseSoC CAPI2), and NAME.h (C header) and NAME_pkg.sv (SystemVerilog package) named "
        "after the module.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", metavar="NAME", help="a named config (tiny, default, ...)")
    which.add_argument("--config", metavar="FILE", help="a HwConfig JSON file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set rows=8")
    p.add_argument("-o", "--output", required=True, metavar="OUT.v", help="Verilog file")
    p.add_argument("--name", "--top", dest="name", metavar="NAME",
                   help="module name (default: flexcim_<preset>, or flexcim_<config digest> "
                   "for any other config; _counters appended with --counters, then _axis or "
                   "_packed with --bus axis or packed)")
    p.add_argument("--lint", action="store_true", help="run verilator --lint-only on the result")
    p.add_argument("--counters", action="store_true",
                   help="add the activity counters (a read-only 'counters' port; costs area)")
    # A plain string, checked in _verilog: a bad value is one line, not argparse's usage text.
    p.add_argument("--bus", default="native", metavar="BUS",
                   help="native (default): the macro's stream ports; axis: an AXI4-Stream "
                   "wrapper (aclk, aresetn, s_axis_*/m_axis_* with byte-padded tdata and tlast; "
                   "module NAME_axis); packed: the macro behind the weight unpacker (a packed "
                   "stream of compact weight words instead of weights; module NAME_packed)")
    p.set_defaults(func=_verilog)
