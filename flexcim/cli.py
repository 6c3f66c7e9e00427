"""The ``flexcim`` command line (also ``python -m flexcim``).

Sub-commands are registered by the modules in :data:`COMMAND_MODULES`; each exposes
``register(subparsers)`` and keeps heavy imports (torch, Amaranth, cocotb) inside its handlers so
that ``flexcim --help`` stays fast.  Handlers raise :class:`~flexcim.errors.FlexCimError` for bad
input, which :func:`main` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading

import numpy as np

from flexcim import __version__, extras
from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_path, atomic_paths, check_output

log = logging.getLogger("flexcim")

COMMAND_MODULES = (
    "flexcim.cli",
    "flexcim.golden.energy",
    "flexcim.demo",
    "flexcim.system",
    "flexcim.hw.synth",
    "flexcim.hw.export",
    "flexcim.sim.formal",
    "flexcim.flow.cli",
)


def load_npy(path: str, what: str) -> np.ndarray:
    """Load a ``.npy`` file without pickles; any problem is a one-line FlexCimError."""
    if not os.path.isfile(path):
        raise FlexCimError(f"{what} file {path!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FlexCimError(f"{what} file {path!r} is not a readable .npy array: {exc}") from None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (the previous file survives any failure)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _matmul(args: argparse.Namespace) -> int:
    from flexcim.golden import sparse_matmul
    from flexcim.golden.matmul import check_activations
    from flexcim.spec.nm import NMPattern, NMTensor

    inputs = (args.x, args.w, args.config)
    output = check_output(args.output, "output (-o)", suffixes=(".npy",), inputs=inputs)
    stats = None
    if args.stats is not None:
        if args.engine != "rtl":
            raise FlexCimError("--stats needs --engine rtl (the golden engine measures nothing)")
        stats = check_output(args.stats, "--stats", inputs=inputs)
        if stats.absolute() == output.absolute():
            raise FlexCimError(f"--stats and -o name the same file {args.stats!r}")
    if args.engine != "rtl" and (args.config is not None or args.set):
        raise FlexCimError("--config and --set choose the macro of --engine rtl; the golden "
                           "engine takes --acc-bits only")
    pattern = NMPattern.parse(args.pattern)
    x = load_npy(args.x, "activation (--x)")
    w = load_npy(args.w, "weight (--w)")
    if w.dtype != np.int8 or w.ndim != 2 or 0 in w.shape:
        raise FlexCimError(
            f"weight (--w) must be int8 [out_features, in_features], both at least 1, not "
            f"{w.dtype} {w.shape}"
        )
    check_activations(x, w.shape[1])
    weight = NMTensor.compress(w, pattern)
    record = None
    if args.engine == "golden":
        y = sparse_matmul(x, weight, acc_bits=32 if args.acc_bits is None else args.acc_bits)
    else:
        from flexcim.sim.host import rtl_matmul  # added by sim/: same contract, on the RTL

        run = rtl_matmul(x, weight, args)
        y, record = run.y, run.stats
    # Y and its stats appear together, or neither does (a failure keeps the previous files).
    with atomic_paths([output, *([stats] if stats else [])]) as tmps:
        with open(tmps[0], "wb") as f:
            np.save(f, y, allow_pickle=False)
        if stats:
            tmps[1].write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info(
        "wrote %s: %s %s = x[%d,%d] @ W.T[%d,%d], pattern %s (ideal speed-up %.2fx over dense)",
        args.output, y.dtype, list(y.shape), *x.shape, w.shape[1], w.shape[0], pattern,
        pattern.ideal_speedup,
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "matmul",
        help="y = x @ W.T for int8 x [T,K] and an N:M-sparse int8 W [C,K]",
        description="Multiply int8 activations X [T,K] by an int8 weight W [C,K] that satisfies "
        "the N:M pattern, as the FlexCiM macro does (results wrap at --acc-bits). Writes Y [T,C].",
    )
    p.add_argument("--x", required=True, metavar="X.npy", help="int8 activations [T, K]")
    p.add_argument("--w", required=True, metavar="W.npy", help="int8 dense weight [C, K]")
    p.add_argument("--pattern", required=True, metavar="N:M",
                   help="N kept per group of M, e.g. 2:4")
    p.add_argument("--engine", choices=("golden", "rtl"), default="golden",
                   help="golden: the NumPy bit-exact model (default); rtl: the generated "
                   "Verilog in a cocotb simulation, checked against golden")
    p.add_argument("--sim", choices=("verilator", "icarus"), default="verilator",
                   help="simulator of --engine rtl (default verilator)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", help="hardware preset of --engine rtl (default: default; "
                       "also tiny, tiny3, flex8, dense, fixed24)")
    which.add_argument("--config", metavar="FILE",
                       help="--engine rtl: a HwConfig JSON file instead of a preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="--engine rtl: override a config field (repeatable), e.g. --set cols=8")
    p.add_argument("--stats", metavar="STATS.json",
                   help="--engine rtl: write measured cycles, the model's prediction and "
                   "utilization there")
    p.add_argument("--acc-bits", type=int, metavar="BITS",
                   help="accumulator width (default: 32 on golden, the preset's on rtl)")
    p.add_argument("-o", "--output", required=True, metavar="Y.npy", help="where to write Y")
    p.set_defaults(func=_matmul)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexcim",
        description="FlexCiM: flexible N:M sparsity for LLM inference, from FLOW to the RTL.",
    )
    parser.add_argument("--version", action="version", version=f"flexcim {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 done, 1 the work failed, 2 bad usage
    or input, 130 interrupted (Ctrl-C or SIGTERM), 141 the output's reader left (SIGPIPE)."""
    previous = None
    command = "flexcim"
    try:  # from the first step: a Ctrl-C while the handler is being installed is caught too
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminate)
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format="%(message)s",
            stream=sys.stderr,
            force=True,  # the CLI owns logging; also when main() runs in-process (tests)
        )
        command = " ".join(filter(None, ["flexcim", args.command,
                                         getattr(args, "flow_command", None)]))
        if getattr(args, "extra", None) == "flow":  # flow, demo: checked before any work
            extras.require_flow(f"'{command}'")
        return int(args.func(args) or 0)
    except FlexCimError as exc:
        print(f"flexcim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("flexcim: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # a module of the flow extra that a command reached
        module = extras.missing_flow_module(exc)
        if module is None:
            raise
        error = extras.flow_error(f"'{command}'", module)
        print(f"flexcim: error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print("flexcim: error: out of memory (the result or an operand is too large for this "
              "machine)", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of the output left (`flexcim system ... | head`): stop quietly, as Unix
        # tools do; the rest of the output goes nowhere instead of failing at exit again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # outputs are checked up front; this is the machine, not the input
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"flexcim: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    # SIGTERM ends the command like Ctrl-C: child processes stop, temporary outputs are removed.
    raise KeyboardInterrupt
