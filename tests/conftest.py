import os
import shutil
import subprocess

import numpy as np
import pytest
from flexcim.golden.prune import nm_prune
from hypothesis import HealthCheck, settings

from flexcim.errors import FlexCimError

# Deterministic in CI (the same examples every run); widen locally with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def operands(tmp_path):
    """``(folder, x, w)``: int8 x [5,32] and a 2:8 weight [7,32], saved as x.npy and w.npy."""
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, size=(5, 32), dtype=np.int8)
    w = nm_prune(rng.integers(-128, 128, size=(7, 32), dtype=np.int8), "2:8")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    return tmp_path, x, w


@pytest.fixture
def sv_check():
    """:func:`run_sv_check`."""
    return run_sv_check


def run_sv_check(package, check) -> list[str]:
    """Lint the SystemVerilog ``package`` file and the module ``chk`` of file ``check`` with
    Verilator (-Wall, unused names allowed: an integrator uses a few of the constants) and run
    ``chk`` on Icarus; returns the lines Icarus printed ([] without Icarus), skips the test if
    neither simulator is installed."""
    from flexcim.hw import tools

    ran, lines = False, []
    try:
        verilator = tools.verilator_bin()
    except FlexCimError:
        verilator = None
    if verilator is not None:
        proc = subprocess.run([str(verilator), "--lint-only", "-Wall", "-Wno-UNUSEDSIGNAL",
                               "-Wno-UNUSEDPARAM", "--top-module", "chk", str(package),
                               str(check)],
                              capture_output=True, text=True, env=tools.verilator_env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ran = True
    if shutil.which("iverilog") is not None:
        exe = check.parent / "chk.vvp"
        proc = subprocess.run(["iverilog", "-g2012", "-o", str(exe), str(package), str(check)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        lines = subprocess.run(["vvp", "-n", str(exe)], capture_output=True,
                               text=True).stdout.strip().splitlines()
        ran = True
    if not ran:
        pytest.skip("neither Verilator nor Icarus is installed")
    return lines
