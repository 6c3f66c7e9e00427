"""flexcim.fileio and flexcim.process: outputs appear complete or not at all, output paths are
checked up front, locks serialise builders, child process groups end with the command."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from flexcim import fileio, process
from flexcim.errors import FlexCimError


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if fileio.TMP_MARK in p.name)


def test_atomic_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "y.json"
    fileio.atomic_write(out, "old")
    with pytest.raises(RuntimeError), fileio.atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")
    assert out.read_text() == "old" and leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), fileio.atomic_path(out) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert out.read_text() == "old" and leftovers(tmp_path) == []
    fileio.atomic_write(out, "new")
    assert out.read_text() == "new" and leftovers(tmp_path) == []


def test_atomic_paths_publish_all_or_none(tmp_path):
    names = [tmp_path / n for n in ("a.v", "a.json", "a.core")]
    with fileio.atomic_paths(names) as tmps:
        assert [t.parent for t in tmps] == [tmp_path] * 3
        assert [t.suffix for t in tmps] == [".v", ".json", ".core"]  # numpy keeps the name
        for t in tmps:
            t.write_text("1")
    with pytest.raises(RuntimeError), fileio.atomic_paths(names) as tmps:
        tmps[0].write_text("2")
        tmps[1].write_text("2")
        raise RuntimeError
    assert [n.read_text() for n in names] == ["1", "1", "1"] and leftovers(tmp_path) == []


def test_a_write_error_is_one_line_exit_1_and_keeps_the_old_file(tmp_path):
    """A file-size limit (EFBIG) or a full disk: WriteError naming the output."""
    out = tmp_path / "big.bin"
    fileio.atomic_write(out, b"old")
    code = (
        "import resource, sys\n"
        "from flexcim import fileio\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "try:\n"
        f"    fileio.atomic_write({str(out)!r}, b'x' * 5000)\n"
        "except fileio.WriteError as exc:\n"
        "    print(exc.exit_code, exc); sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"1 cannot write {str(out)!r}: File too large")
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_atomic_dir_replace_and_cache_forms(tmp_path):
    out = tmp_path / "model"
    with fileio.atomic_dir(out) as tmp:
        (tmp / "w").write_text("1")
    with pytest.raises(RuntimeError), fileio.atomic_dir(out) as tmp:
        (tmp / "w").write_text("2")
        raise RuntimeError
    assert (out / "w").read_text() == "1" and leftovers(tmp_path) == []
    with fileio.atomic_dir(out) as tmp:
        (tmp / "v").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["v"]  # replaced as a whole
    with fileio.atomic_dir(out, replace=False) as tmp:  # a cache entry: the first one wins
        (tmp / "late").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["v"] and leftovers(tmp_path) == []


def test_leftovers_of_a_dead_writer_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".y{fileio.TMP_MARK}{dead}-abcd.npy"
    stale.write_text("partial")
    alive = tmp_path / f".y{fileio.TMP_MARK}{os.getppid()}-abcd.npy"  # a live writer's
    alive.write_text("in progress")
    fileio.atomic_write(tmp_path / "y.npy", "done")
    assert not stale.exists() and alive.exists()


def test_check_output_rejects_each_bad_path_in_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "in.json").write_text("{}")
    ro = tmp_path / "ro.npy"
    ro.write_text("keep")
    ro.chmod(0o444)
    cases = [
        ("", {}, "must be a file name, not ''"),
        ("   ", {}, "must be a file name"),
        (str(tmp_path / "d"), {}, "is a directory; expected a file name"),
        (str(tmp_path / "d") + "/", {}, "names a folder"),
        (str(tmp_path / "no" / "y.npy"), {}, "does not exist"),
        (str(tmp_path / "in.json" / "y.npy"), {}, "is not a directory"),
        (str(ro), {}, "is read-only"),
        (str(tmp_path / "y"), {"suffixes": (".npy",)}, "must end in .npy"),
        (str(tmp_path / "x.json"), {"sidecars": (".json", ".core")}, "the suffix of its sidecar"),
        (str(tmp_path / "in.json"), {"inputs": [tmp_path / "in.json"]},
         "would overwrite the input"),
        (str(tmp_path / "in.v"), {"sidecars": (".json",), "inputs": [tmp_path / "in.json"]},
         "would overwrite the input"),
        (str(tmp_path / "d"), {"folder": True, "inputs": [tmp_path / "d"]}, "overwrite the input"),
    ]
    for path, kwargs, message in cases:
        with pytest.raises(FlexCimError, match=message) as info:
            fileio.check_output(path, "output (-o)", **kwargs)
        assert "\n" not in str(info.value)
    (tmp_path / "d" / "f").write_text("user data")
    with pytest.raises(FlexCimError, match="non-empty folder that is not a previous output"):
        fileio.check_output(tmp_path / "d", "model output", folder=True, marker="m.json")
    (tmp_path / "d" / "m.json").write_text("{}")
    assert fileio.check_output(tmp_path / "d", "model output", folder=True, marker="m.json")
    assert fileio.check_output(tmp_path / "y.npy", "o", suffixes=(".npy",)) == tmp_path / "y.npy"
    assert leftovers(tmp_path) == []


def test_check_output_probes_the_folder(tmp_path, monkeypatch):
    """Permission bits do not stop root, a read-only mount does: a real create is the test."""
    real_open = os.open

    def read_only_mount(path, *args, **kwargs):
        if "probe" in str(path):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "open", read_only_mount)
    with pytest.raises(FlexCimError, match="is not writable: Read-only file system"):
        fileio.check_output(tmp_path / "y.npy", "output (-o)")


def test_file_lock_serialises_two_processes(tmp_path):
    lock = tmp_path / "x.lock"
    code = (
        "import sys, time\nfrom flexcim import fileio\n"
        f"with fileio.file_lock({str(lock)!r}):\n"
        "    print('held', flush=True); time.sleep(1.0)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with fileio.file_lock(lock):
        waited = time.monotonic() - t0
    holder.wait()
    assert waited > 0.5


def test_a_killed_holder_releases_the_lock(tmp_path):
    lock = tmp_path / "x.lock"
    code = (f"from flexcim import fileio\nimport time\nwith fileio.file_lock({str(lock)!r}):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    t0 = time.monotonic()
    with fileio.file_lock(lock):
        assert time.monotonic() - t0 < 5


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_interrupt_ends_the_whole_child_group(tmp_path):
    """Ctrl-C while a child runs: the child *and its own children* are gone (subprocess.run
    alone left compilers running)."""
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $! > {pids}; wait"
    code = (
        "import signal, sys\nfrom flexcim import process\n"
        # as from a terminal, even when the test runs in a background job (SIGINT ignored)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"try:\n    process.run(['sh', '-c', {script!r}])\n"
        "except KeyboardInterrupt:\n    sys.exit(130)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if pids.is_file() and pids.read_text().strip():
            break
        time.sleep(0.05)
    grandchild = int(pids.read_text())
    assert _alive(grandchild)
    proc.send_signal(signal.SIGINT)  # to the Python process alone, as in the issue
    assert proc.wait(10) == 130
    for _ in range(100):
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_run_returns_output_and_status():
    done = process.run(["sh", "-c", "echo out; echo err >&2; exit 3"], capture_output=True,
                       text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
