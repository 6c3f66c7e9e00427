"""The simulator build cache under parallel and killed runs (issue 13).

Each test runs ``flexcim matmul --engine rtl --preset tiny`` in subprocesses whose working
directory is a fresh folder, so ``build/sim`` starts cold.  Before the cache was published by
rename under a lock, two cold runs raced in the shared build folder (PCH errors, a
RuntimeError traceback) and a build killed mid-way left an empty object file that every later
run failed to link against.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flexcim.golden import sparse_matmul
from flexcim.golden.prune import nm_prune
from flexcim.sim import runner
from flexcim.spec.config import preset
from flexcim.spec.nm import NMTensor

from flexcim import fileio

pytestmark = pytest.mark.slow
TIMEOUT_S = 1800  # a cold tiny build is about a minute on an idle machine, far more when loaded


def _skip_unless_verilator():
    if not runner.available("verilator"):
        pytest.skip("verilator is not installed")


def _operands(folder: Path, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (6, 32), dtype=np.int8)
    w = nm_prune(rng.integers(-128, 128, (5, 32), dtype=np.int8), "2:4")
    np.save(folder / f"x{seed}.npy", x)
    np.save(folder / f"w{seed}.npy", w)
    # without --acc-bits the RTL engine builds the preset's accumulator (tiny: 20 bits)
    return sparse_matmul(x, NMTensor.compress(w, "2:4"), acc_bits=preset("tiny").acc_bits)


def _start(folder: Path, seed: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "flexcim", "matmul", "--x", f"x{seed}.npy", "--w",
            f"w{seed}.npy", "--pattern", "2:4", "--engine", "rtl", "--sim", "verilator",
            "--preset", "tiny", "--stats", f"s{seed}.json", "-o", f"y{seed}.npy"]
    return subprocess.Popen(argv, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _terminate(procs: list[subprocess.Popen]) -> None:
    """End runs still going after a failure (SIGTERM: the command stops its compilers)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def _build_dirs(folder: Path) -> list[Path]:
    return sorted((folder / "build" / "sim").glob("flexcim-verilator-*"))


@pytest.mark.parametrize("runs", [2, pytest.param(4, marks=pytest.mark.extended)])
def test_concurrent_cold_runs_all_succeed_exactly(tmp_path, runs):
    _skip_unless_verilator()
    expected = [_operands(tmp_path, seed) for seed in range(runs)]
    procs = [_start(tmp_path, seed) for seed in range(runs)]
    try:
        errors = [proc.communicate(timeout=TIMEOUT_S)[1] for proc in procs]
    finally:
        _terminate(procs)
    for seed, (proc, err) in enumerate(zip(procs, errors, strict=True)):
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        np.testing.assert_array_equal(np.load(tmp_path / f"y{seed}.npy"), expected[seed])
        stats = json.loads((tmp_path / f"s{seed}.json").read_text())
        assert stats["config"]["acc_bits"] == preset("tiny").acc_bits == 20  # was 32
    (build_dir,) = _build_dirs(tmp_path)
    assert len(list(build_dir.glob("obj-*"))) == 1  # built once, the others waited for it
    assert not [p for p in build_dir.iterdir() if fileio.TMP_MARK in p.name]
    assert not list((build_dir / "host").iterdir())  # per-run scratch folders removed


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as a crash or the OOM killer would (frozen
    first, so that no one starts a new compiler meanwhile)."""
    frozen: set[int] = set()
    while True:
        new = ({pid} | _descendants(pid)) - frozen
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= new
    for p in frozen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_and_wait_for_the_cxx_build(folder: Path) -> subprocess.Popen:
    proc = _start(folder, 0)
    deadline = time.monotonic() + TIMEOUT_S
    objects = []
    while not objects and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        objects = list((folder / "build" / "sim").glob(
            f"flexcim-verilator-*/.obj-*{fileio.TMP_MARK}*/*.o"))
    if not objects:
        _terminate([proc])
    assert objects, "the build finished before it could be stopped"
    return proc


def test_a_build_stopped_or_killed_midway_is_rebuilt_by_the_next_run(tmp_path):
    _skip_unless_verilator()
    expected = _operands(tmp_path, 0)
    # SIGTERM (or Ctrl-C) during the C++ build: exit 130, no compiler left running, no
    # temporary folder left (was: cc1plus kept running)
    proc = _start_and_wait_for_the_cxx_build(tmp_path)
    children = _descendants(proc.pid)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    time.sleep(0.5)
    assert not [p for p in children if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"]
    (build_dir,) = _build_dirs(tmp_path)
    assert not [p for p in build_dir.iterdir() if fileio.TMP_MARK in p.name]
    # SIGKILL of everything during the C++ build, as a crash would
    proc = _start_and_wait_for_the_cxx_build(tmp_path)
    _kill_tree(proc.pid)
    proc.wait()
    assert not list(build_dir.glob("obj-*"))  # nothing published: nothing to trust later
    assert [p for p in build_dir.iterdir() if fileio.TMP_MARK in p.name]  # the dead one's
    proc = _start(tmp_path, 0)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        _terminate([proc])
    assert proc.returncode == 0 and "Traceback" not in err, err
    np.testing.assert_array_equal(np.load(tmp_path / "y0.npy"), expected)
    assert not [p for p in build_dir.iterdir() if fileio.TMP_MARK in p.name]  # swept


def test_a_failed_build_is_one_line_naming_its_log(tmp_path, monkeypatch):
    _skip_unless_verilator()
    source = tmp_path / "broken.v"
    source.write_text("module broken(input clk); this is not verilog; endmodule\n")
    with pytest.raises(runner.BuildError) as info:
        runner.run("verilator", [source], "broken", "cocotb_time0", tmp_path / "b")
    message = str(info.value)
    log = tmp_path / "b" / "build.log"
    assert message == f"the verilator build of broken failed (exit status 1); see {log}"
    assert "syntax error" in log.read_text()
    assert info.value.exit_code == 1
    assert not list((tmp_path / "b").glob("obj-*"))
