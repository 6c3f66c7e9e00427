"""RTL regressions of the FlexCiM top: one case, or the full sweep behind ``make regress``.

A *case* is (simulator, preset, layer shape and pattern); :func:`run_case` elaborates the top
for the preset (once per configuration: the Verilog and the simulator build are cached in a
build directory per configuration and simulator), runs :mod:`flexcim.sim.tb` and returns its
measurements.  ``python -m flexcim.sim.regress`` runs :data:`SWEEP` (or a selection) on a pool
of worker processes and prints a pass/fail table with measured and modelled cycles.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from flexcim.golden import perf
from flexcim.sim import runner
from flexcim.spec.config import PRESETS, HwConfig, from_args, module_name, preset, preset_name
from flexcim.spec.nm import NMPattern

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_write

log = logging.getLogger("flexcim.sim")

VERILOG_FILE = "flexcim_top.v"
"""The file name of a simulation build's Verilog (a fixed path: see :func:`top_verilog`)."""
TB_MODULE = "flexcim.sim.tb"
AXIS_TB_MODULE = "flexcim.sim.axis_tb"
"""The testbench of the AXI4-Stream wrapper (``bus="axis"``)."""
PACKED_TB_MODULE = "flexcim.sim.packed_tb"
"""The testbench of the macro behind the weight unpacker (``bus="packed"``)."""
TB_MODULES = {"native": TB_MODULE, "axis": AXIS_TB_MODULE, "packed": PACKED_TB_MODULE}


def hw_digest() -> str:
    """A digest of the generator's sources: a changed generator gets a fresh build directory
    (the cached Verilog is only reused while hw/ and the spec it reads are unchanged)."""
    import hashlib

    import flexcim.hw
    import flexcim.spec

    h = hashlib.sha1()
    for package in (flexcim.hw, flexcim.spec):
        folder = Path(package.__file__).parent
        for path in sorted(folder.glob("*.py")):
            h.update(f"{package.__name__}/{path.name}".encode() + path.read_bytes())
    return h.hexdigest()[:12]


def top_verilog(cfg: HwConfig, sim: str, *, waves: bool = False, bus: str = "native"
                ) -> tuple[Path, Path]:
    """Verilog of ``FlexCiM(cfg, counters=True)`` (with ``bus="axis"`` of its AXI4-Stream
    wrapper :class:`~flexcim.hw.axis.AxisFlexCiM`, with ``bus="packed"`` of the macro behind
    the weight unpacker :class:`~flexcim.hw.packed.PackedFlexCiM`) and the simulator build
    directory for it;
    returns ``(verilog, build_dir)``.  Every simulation build has the activity counters, which
    the testbench checks against the energy model.

    Two caches: the Verilog is kept per configuration and digest of the generator's sources
    (elaboration of ``default`` takes half a minute and is skipped while hw/ is unchanged; both
    simulators share it), and the simulator build per digest of the Verilog *text*, so an edit
    of hw/ that leaves a preset's netlist unchanged (a docstring, another block's fix) does not
    recompile its simulator (minutes for ``default`` on Verilator).
    """
    axis = {"bus": bus} if bus != "native" else {}  # native keys as before: caches stay warm
    key = json.dumps({"cfg": cfg.to_dict(), "hw": hw_digest(), "counters": True, **axis},
                     sort_keys=True)
    verilog_dir = runner.BUILD_ROOT.absolute() / f"verilog-{_sha1(key.encode())[:10]}"
    path = verilog_dir / VERILOG_FILE
    if not path.is_file():
        from flexcim.hw.export import top_class

        log.info("elaborating the %s top (cached in %s)", cfg_name(cfg), verilog_dir)
        runner.write_if_changed(verilog_dir / "hw_config.json", cfg.to_json())
        runner.amaranth_verilog(top_class(bus)(cfg, counters=True), toplevel(cfg, bus), path)
    text = path.read_text()
    build_dir = runner.build_dir_for("flexcim", sim, {"verilog": _sha1(text.encode()),
                                                      "waves": waves, **axis})
    runner.write_if_changed(build_dir / "hw_config.json", cfg.to_json())
    # The simulator compiles a copy at a fixed path in its build directory: Verilator skips
    # verilation (and make its C++) only when the source *paths* are the same as last time.
    return runner.write_if_changed(build_dir / VERILOG_FILE, text), build_dir


def save_layer_data(path: Path, x, w) -> Path:
    """Write a layer for the testbench (``FLEXCIM_DATA``): ``x`` int8 ``[T, K]`` and the
    NMTensor ``w`` in one ``.npz`` (:func:`load_layer_data` reads it)."""
    import numpy as np

    np.savez(path, x=x, values=w.values, indices=w.indices, pattern=str(w.pattern),
             shape=np.array(w.shape))
    return Path(path)


def load_layer_data(path: Path):
    """``(x, w)`` of a :func:`save_layer_data` file."""
    import numpy as np
    from flexcim.spec.nm import NMTensor

    with np.load(path, allow_pickle=False) as f:
        w = NMTensor(values=f["values"], indices=f["indices"], pattern=str(f["pattern"]),
                     shape=tuple(int(v) for v in f["shape"]))
        return f["x"], w


def _sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(data).hexdigest()


def cfg_name(cfg: HwConfig) -> str:
    """The preset's name if ``cfg`` is one, else ``"custom"`` (for log lines)."""
    return preset_name(cfg) or "custom"


def toplevel(cfg: HwConfig, bus: str = "native") -> str:
    """The simulated module's name: the macro with its counters, named per configuration as
    ``flexcim verilog --counters [--bus axis]`` names it
    (:func:`~flexcim.hw.export.default_name`)."""
    from flexcim.hw.export import default_name

    return default_name(cfg, counters=True, bus=bus)


@dataclasses.dataclass(frozen=True)
class Case:
    """One regression case: a random layer ``[tokens, k] x [c, k]`` with ``pattern``, or with
    ``data`` the layer of that :func:`save_layer_data` file (a real one: :func:`real_case`).
    ``preset`` names the configuration (a preset, or the module name of ``config``, the JSON of
    any other :class:`HwConfig`).  ``bus="axis"`` runs it through the AXI4-Stream wrapper and
    its cocotbext-axi testbench (:mod:`flexcim.sim.axis_tb`), ``bus="packed"`` through the
    macro behind the weight unpacker, fed packed weight words (:mod:`flexcim.sim.packed_tb`)."""

    sim: str
    preset: str
    pattern: str
    tokens: int
    k: int
    c: int
    act_pattern: str | None = None
    data: str | None = None
    config: str | None = None
    bus: str = "native"

    def hw(self) -> HwConfig:
        """The case's configuration."""
        return HwConfig.from_json(self.config) if self.config else preset(self.preset)

    @property
    def name(self) -> str:
        act = f"-act{self.act_pattern}" if self.act_pattern else ""
        real = "-real" if self.data else ""
        bus = "" if self.bus == "native" else f"-{self.bus}"
        return (f"{self.sim}-{self.preset}{bus}{real}-{self.pattern}{act}-"
                f"t{self.tokens}k{self.k}c{self.c}")

    def env(self) -> dict:
        d = {"pattern": self.pattern, "tokens": self.tokens, "k": self.k, "c": self.c}
        if self.act_pattern:
            d["act_pattern"] = self.act_pattern
        return d


def tb_timeout_ns(cfg: HwConfig, pattern, tokens: int, k: int, c: int) -> float:
    """A simulated-time limit for a layer: 25x the modelled cycles (stalls) plus slack."""
    cycles = perf.estimate(cfg, pattern, tokens, k, c).cycles
    return float((25 * cycles + 5000) * runner.CLOCK_PERIOD_NS)


def run_case(case: Case, *, seed: int | None = None, testcase: str | None = None,
             waves: bool | None = None, log_file: Path | None = None) -> dict:
    """Run ``case`` (both tests of :mod:`flexcim.sim.tb` unless ``testcase``); returns a
    JSON-ready record with pass/fail, measured and modelled cycles and wall times."""
    cfg = case.hw()
    waves = runner.waves_requested(waves)
    source, build_dir = top_verilog(cfg, case.sim, waves=waves, bus=case.bus)
    out = build_dir / f"{case.name}.json"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    record = {"case": case.name, **dataclasses.asdict(case)}
    record.pop("config")  # the name says which; the JSON would repeat it in every record
    tb_module = TB_MODULES[case.bus]
    try:
        result = runner.run(
            case.sim, [source], toplevel(cfg, case.bus), tb_module, build_dir, seed=seed,
            testcase=testcase,
            waves=waves, log_file=log_file,
            extra_env={
                "FLEXCIM_HW_CONFIG": cfg.to_json(),
                "FLEXCIM_CASE": json.dumps(case.env()),
                **({"FLEXCIM_DATA": case.data} if case.data else {}),
                "FLEXCIM_OUT": str(out),
                "FLEXCIM_TIMEOUT_NS": str(tb_timeout_ns(cfg, case.pattern, case.tokens,
                                                        case.k, case.c)),
            },
            check=False,
        )
    except runner.SimulationError as exc:
        record.update(passed=False, message=str(exc), wall_s=time.perf_counter() - t0)
        return record
    measured = json.loads(out.read_text()) if out.is_file() else {}
    failures = [f"{t.name}: {t.message}" for t in result.tests if not t.passed]
    record.update(
        passed=result.passed,
        message="; ".join(failures),
        seed=result.seed,
        build_s=result.build_s,
        test_s=result.test_s,
        wall_s=time.perf_counter() - t0,
        **measured,
    )
    return record


SWEEP_PRESETS = {
    # The tiny preset with every pattern family (M up to 16, bandwidth-bound dense, wraps).
    "tiny": ["1:1", "1:2", "2:4", "1:4", "4:8", "2:8", "1:8", "8:16"],
    # 12 cell rows: N = 3, 6 and 12 (not powers of two), pass widths 12..64.
    "tiny3": ["1:1", "3:4", "2:4", "6:8", "3:8", "12:16", "6:16", "3:16"],
    # The SmolLM2-sized default: every pattern the selectors choose between (M up to 16).
    "default": ["1:1", "2:4", "1:4", "4:8", "2:8", "1:8", "12:16", "8:16", "6:16", "4:16", "2:16"],
    # default without M = 16 (3-bit indices, 6 pattern codes).
    "flex8": ["1:1", "2:4", "1:4", "4:8", "2:8", "1:8"],
    # tiny with a 2-row weight port whose passes chase the loader (weight_overlap): named by
    # its module name.
    PRESETS["tiny"].replace(weight_port_rows=2, weight_overlap=1): ["1:1", "2:4", "1:8", "8:16"],
    # tiny with the adder trees' pipeline register (tree_pipeline): results a cycle later.
    PRESETS["tiny"].replace(tree_pipeline=1): ["1:1", "2:4", "1:8", "8:16"],
}

SWEEP_ACT = {"tiny": ("2:4", "8:16"), "tiny3": ("3:8", "8:16")}
"""Per preset, one (weight pattern, activation pattern) case with pruned activations."""

SWEEP_AXIS = {"tiny": SWEEP_PRESETS["tiny"]}
"""Presets run through the AXI4-Stream wrapper too (cocotbext-axi, every simulator), with these
patterns."""

SWEEP_PACKED = {"tiny": ["1:1", "2:4", "1:8", "4:8", "8:16"], "tiny3": ["3:4", "3:8", "12:16"]}
"""Presets run through the packed top too (every simulator), with these patterns: first beats
of one and of two words, groups of 2, 3, 4, 8 and 12 rows."""

SWEEP_SIMULATORS = {"default": ("verilator",), "flex8": ("verilator",)}
"""Presets not swept on every simulator.  Icarus runs the default preset (5 MB of Verilog, 3072
activation-buffer registers evaluated event by event) at a few cycles per second: its first
sweep case (1:1, 3 x 288 x 24, 772 cycles unstalled) had not finished its two tests after 7.5
minutes of simulation, where Verilator takes seconds."""


def sweep(sims=runner.SIMULATORS, presets=SWEEP_PRESETS) -> list[Case]:
    """The ``make regress`` sweep: presets x patterns x simulators (:data:`SWEEP_SIMULATORS`
    limits some presets; a key of ``presets`` may also be a :class:`HwConfig`: any other
    configuration, its cases named by its module name), with K spanning several passes and,
    where the preset's depth allows, several commands (K chunks and column tiles), plus 8:16
    activation pruning on one pattern per tiny preset (:data:`SWEEP_ACT`), and the same
    cases through the AXI4-Stream wrapper (:data:`SWEEP_AXIS`) and the packed top
    (:data:`SWEEP_PACKED`) for some patterns."""
    cases = []
    for name, patterns in presets.items():
        cfg = name if isinstance(name, HwConfig) else preset(name)
        name, config = (module_name(cfg), cfg.to_json()) if cfg is name else (name, None)
        preset_sims = [s for s in sims if s in SWEEP_SIMULATORS.get(name, sims)]
        for pattern in patterns:
            p = NMPattern.parse(pattern)
            k = min(2 * cfg.max_k_for(p), 4 * cfg.pass_width(p))
            k = max(p.m, k // p.m * p.m)
            tokens = 5 if name.startswith("tiny") else 3
            for sim in preset_sims:
                cases.append(Case(sim, name, pattern, tokens, k, cfg.cols + cfg.cols // 2,
                                  config=config))
        if name in SWEEP_ACT:
            pattern, act = SWEEP_ACT[name]
            for sim in preset_sims:
                cases.append(Case(sim, name, pattern, 4, 4 * cfg.pass_width(pattern), cfg.cols,
                                  act_pattern=act))
        cases += [dataclasses.replace(case, bus=bus) for bus, chosen in (
                      ("axis", SWEEP_AXIS), ("packed", SWEEP_PACKED)) for case in cases
                  if case.preset == name and case.bus == "native" and not case.act_pattern
                  and case.pattern in chosen.get(name, ())]
    return cases


def select(cases: list[Case], buses: list[str] | None, *, custom: bool = False) -> list[Case]:
    """The cases of ``--bus``: those of the sweep through one of ``buses`` (all for None); for
    a ``custom`` configuration (``--config``/``--set``), whose sweep is native only, its
    native cases through each of ``buses``.  Refuses (one line) a selection with no case."""
    if not buses:
        return cases
    if custom:
        chosen = [dataclasses.replace(c, bus=b) for b in buses for c in cases if c.bus == "native"]
    else:
        chosen = [c for c in cases if c.bus in buses]
    if not chosen:
        raise FlexCimError(f"the sweep has no case through --bus {' or '.join(buses)} for "
                           f"{', '.join(sorted({c.preset for c in cases}))}")
    return chosen


def real_case(sim: str = "verilator", preset_name: str = "default") -> Case:
    """The real SmolLM2 projection of :mod:`flexcim.sim.real`, whole, with its real 8:16-pruned
    activations (exported once and converted for the testbench, both cached under build/)."""
    from flexcim.golden.layer_io import load_layer
    from flexcim.sim.host import layer_operands
    from flexcim.sim.real import real_layer

    path = real_layer()
    data = path.with_suffix(".npz")
    layer = load_layer(path)
    x, w = layer_operands(layer)
    if not data.is_file():
        save_layer_data(data, x, w)
    return Case(sim, preset_name, str(w.pattern), x.shape[0], w.in_features, w.out_features,
                act_pattern=str(layer.act_pattern) if layer.act_pattern else None,
                data=str(data))


def _worker(case: Case, seed: int | None) -> dict:
    logging.basicConfig(level=logging.WARNING)
    log_dir = runner.BUILD_ROOT.absolute() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    return run_case(case, seed=seed, log_file=log_dir / f"{case.name}.log")


def format_table(records: list[dict]) -> str:
    """Pass/fail, measured and modelled cycles, and ``mac/est``: the RTL's active cell-cycles
    (equal to golden.energy.mac_cycles, asserted) over the energy model's global-density
    estimate."""
    width = max([44, *(len(r["case"]) for r in records)])
    head = (f"{'case':{width}} {'result':6} {'cycles':>8} {'model':>8} {'err %':>6} "
            f"{'stalled':>8} {'mac/est':>7} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for r in records:
        full, stalled = r.get("full_rate", {}), r.get("random_stalls", {})
        err = f"{100 * full['model_error']:+.2f}" if full else "-"
        ratio = full.get("activity", {}).get("mac_ratio")
        ratio = f"{ratio:.3f}" if ratio is not None else "-"
        lines.append(
            f"{r['case']:{width}} {'PASS' if r['passed'] else 'FAIL':6} "
            f"{full.get('cycles', '-'):>8} {full.get('model_cycles', '-'):>8} {err:>6} "
            f"{stalled.get('cycles', '-'):>8} {ratio:>7} {r.get('wall_s', 0):7.1f}"
        )
        if not r["passed"]:
            lines.append(f"    {r.get('message', '')[:300]}")
    return "\n".join(lines)


def regress(cases: list[Case], *, jobs: int, seed: int | None = None) -> tuple[list[dict], float]:
    """Run ``cases`` on ``jobs`` processes; returns the records (in case order) and wall time.

    Verilog and simulator builds are made first, one per configuration and simulator, so
    parallel cases never build the same directory at once.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    seed = runner.resolve_seed(seed)
    firsts = {}
    for case in cases:
        firsts.setdefault((case.preset, case.sim, case.bus), case)
    records = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        # Builds first (one case per configuration), then the rest on warm builds.
        for group in (list(firsts.values()), [c for c in cases if c not in firsts.values()]):
            futures = {pool.submit(_worker, case, seed): case for case in group}
            for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                               desc="regress", unit="case", file=sys.stderr):
                case = futures[future]
                records[case] = future.result()
    return [records[c] for c in cases], time.perf_counter() - t0


def run_layer_file(path: Path, sim: str, cfg: HwConfig, seed: int | None) -> int:
    """A real exported layer, whole, through the RTL, bit-exact against golden."""
    from flexcim.golden.layer_io import load_layer
    from flexcim.sim.host import layer_operands, run_rtl

    layer = load_layer(path)
    x, w = layer_operands(layer)
    stats = run_rtl(x, w, cfg, sim=sim, seed=seed).stats
    preset_name = cfg_name(cfg)
    act = stats["activity"]
    print(f"{layer.name or path}: {w.pattern} [{x.shape[0]}x{w.in_features}] @ "
          f"[{w.out_features}x{w.in_features}].T on {sim}/{preset_name}: bit-exact, "
          f"{stats['cycles']} cycles (model {stats['model_cycles']}), {stats['sim_s']:.1f} s; "
          f"activity counters equal the model, active cell-cycles {act['mac_cycles']} = "
          f"{act['mac_ratio']:.3f} x the global-density estimate "
          f"(act_density {act['act_density']:.3f}, gated_density {act['gated_density']:.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexcim.sim.regress",
                                     description="FlexCiM RTL regression sweep")
    parser.add_argument("--sim", action="append", choices=runner.SIMULATORS,
                        help="simulator(s) (default: both)")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="preset(s) (default: all of the sweep)")
    parser.add_argument("--config", metavar="FILE",
                        help="instead of the presets: this HwConfig JSON, every one of its "
                        "patterns")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a field of --config or of the one --preset (repeatable)")
    parser.add_argument("--bus", action="append", choices=sorted(TB_MODULES),
                        help="only the sweep's cases through this top (repeatable; default: "
                        "all: native, the AXI4-Stream wrapper, the packed top); with --config "
                        "or --set every pattern of that configuration through it")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, help="COCOTB_RANDOM_SEED of every case")
    parser.add_argument("--json", type=Path, help="write every record there")
    parser.add_argument("--no-real", action="store_true",
                        help="leave out the real SmolLM2 layer (whole, default preset, "
                        "Verilator; its first export loads the model: about a minute)")
    parser.add_argument("--layer", type=Path, metavar="FILE",
                        help="instead of the sweep: an exported layer (flexcim flow export) with "
                        "its real activations, whole, through the RTL on the first --sim and "
                        "--preset (default: verilator, default)")
    parser.add_argument("--emit", type=Path, metavar="DIR",
                        help="only write DIR/flexcim_top.v and DIR/hw_config.json for the "
                        "first --preset (cocotb's Makefile flow, `make sim`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    custom = None
    if args.config is not None or args.set:
        if args.preset is not None and (args.config is not None or len(args.preset) > 1):
            raise FlexCimError("--config and --set take one configuration: --config FILE or "
                               "one --preset, not both nor several")
        custom = from_args((args.preset or [None])[0], args.config, args.set)
    if args.emit:
        from flexcim.hw.top import FlexCiM

        cfg = custom or preset((args.preset or ["tiny"])[0])
        runner.amaranth_verilog(FlexCiM(cfg, counters=True), toplevel(cfg),
                                args.emit / VERILOG_FILE)
        runner.write_if_changed(args.emit / "hw_config.json", cfg.to_json())
        return 0
    if args.layer:
        return run_layer_file(args.layer, (args.sim or ["verilator"])[0],
                              custom or preset((args.preset or ["default"])[0]), args.seed)
    sims = tuple(s for s in runner.SIMULATORS if runner.available(s) and
                 (not args.sim or s in args.sim))
    if not sims:
        raise FlexCimError("no simulator available")
    presets = {k: v for k, v in SWEEP_PRESETS.items() if not args.preset or k in args.preset}
    if custom is not None:
        presets = {custom: [str(p) for p in custom.patterns]}
    elif not presets:
        raise FlexCimError(f"the sweep covers presets {', '.join(SWEEP_PRESETS)} only")
    cases = select(sweep(sims, presets), args.bus, custom=custom is not None)
    native = not args.bus or "native" in args.bus
    if native and not args.no_real and custom is None and "default" in presets and (
            "verilator" in sims):
        cases.append(real_case())
    records, wall = regress(cases, jobs=args.jobs, seed=args.seed)
    print(format_table(records))
    parts = sum(r.get("wall_s", 0) for r in records)
    passed = sum(r["passed"] for r in records)
    print(f"\n{passed}/{len(records)} passed; wall {wall:.1f} s for {parts:.1f} s of cases "
          f"({parts / wall:.2f}x parallel speed-up on {args.jobs} jobs)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps({"records": records, "wall_s": wall}, indent=2,
                                           default=str))
    return 0 if passed == len(records) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FlexCimError as exc:
        print(f"regress: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("regress: interrupted", file=sys.stderr)
        sys.exit(130)
