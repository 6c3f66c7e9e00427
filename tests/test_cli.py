import subprocess
import sys

import numpy as np
import pytest
from flexcim.golden.prune import nm_prune

from flexcim.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_matmul_golden_writes_int32_result(operands, capsys):
    d, x, w = operands
    code, err = run(capsys, "matmul", "--x", str(d / "x.npy"), "--w", str(d / "w.npy"),
                    "--pattern", "2:8", "-o", str(d / "y.npy"))
    assert code == 0, err
    y = np.load(d / "y.npy")
    assert y.dtype == np.int32 and y.shape == (5, 7)
    assert np.array_equal(y, x.astype(np.int64) @ w.T.astype(np.int64))
    assert "ideal speed-up 4.00x" in err


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d, x, w: (d / "x.npy").unlink(),
         "activation (--x) file '{d}/x.npy' does not exist"),
        (lambda d, x, w: np.save(d / "x.npy", x.astype(np.int32)),
         "activations dtype must be int8, not int32"),
        (lambda d, x, w: np.save(d / "w.npy", w.astype(np.float32)),
         "weight (--w) must be int8 [out_features, in_features], both at least 1, not "
         "float32 (7, 32)"),
        (lambda d, x, w: np.save(d / "x.npy", x[:, :16]),
         "activations have 16 input channels but the weight has in_features=32"),
        (lambda d, x, w: np.save(d / "w.npy", nm_prune(w, "3:8")), None),  # still satisfies 2:8
        (lambda d, x, w: np.save(d / "w.npy", np.ones((7, 32), np.int8)),
         "weight row 0, group 0 (in_features 0..7) has 8 non-zeros; pattern 2:8 allows at most 2"),
        (lambda d, x, w: (d / "x.npy").write_bytes(b"garbage"),
         "activation (--x) file '{d}/x.npy' is not a readable .npy array"),
    ],
)
def test_matmul_bad_input_is_one_line(operands, capsys, mutate, message):
    d, x, w = operands
    mutate(d, x, w)
    code, err = run(capsys, "matmul", "--x", str(d / "x.npy"), "--w", str(d / "w.npy"),
                    "--pattern", "2:8", "-o", str(d / "y.npy"))
    if message is None:
        assert code == 0
        return
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("flexcim: error: ")
    assert message.format(d=d) in err


def test_bad_pattern_and_output_dir(operands, capsys):
    d, _, _ = operands
    code, err = run(capsys, "matmul", "--x", str(d / "x.npy"), "--w", str(d / "w.npy"),
                    "--pattern", "2:6", "-o", str(d / "y.npy"))
    assert code == 2 and "M must be a power of two from 1 to 32, not 6" in err
    code, err = run(capsys, "matmul", "--x", str(d / "x.npy"), "--w", str(d / "w.npy"),
                    "--pattern", "2:8", "-o", str(d / "no" / "y.npy"))
    assert code == 2 and "output directory" in err and "does not exist" in err


def test_module_entry_point_and_help():
    out = subprocess.run([sys.executable, "-m", "flexcim", "matmul", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--pattern N:M" in out and "--engine" in out


def test_a_reader_that_leaves_ends_the_command_quietly():
    """``flexcim system ... | head``: the pipe closes before the tables are written; the command
    stops with 141 (SIGPIPE's status) and says nothing (it said "error: Broken pipe", exit 1)."""
    proc = subprocess.Popen([sys.executable, "-m", "flexcim", "system", "--model-config",
                             "llama-2-7b", "--pattern", "2:8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the interpreter has started and printed anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


def _matmul(d, *extra, out="y.npy"):
    return ["matmul", "--x", str(d / "x.npy"), "--w", str(d / "w.npy"), "--pattern", "2:8",
            *extra, "-o", out if out == "" else str(d / out) if "/" not in out else out]


@pytest.mark.parametrize("out, message", [
    ("", "output (-o) must be a file name, not ''"),
    ("sub", "output (-o) '{d}/sub' must end in .npy"),          # was: wrote sub.npy, exit 0
    ("sub.npy", "output (-o) '{d}/sub.npy' is a directory"),   # was: a traceback
    ("x.npy", "would overwrite the input '{d}/x.npy'"),        # was: the input replaced
    ("ro.npy", "output (-o) '{d}/ro.npy' is read-only"),       # was: a traceback
])
def test_matmul_bad_output_paths_are_one_line_and_write_nothing(operands, capsys, out, message):
    d, x, _ = operands
    (d / "sub.npy").mkdir()
    (d / "sub").mkdir()
    (d / "ro.npy").write_bytes(b"keep")
    (d / "ro.npy").chmod(0o444)
    before = sorted(p.name for p in d.iterdir())
    code, err = run(capsys, *_matmul(d, out=out))
    assert code == 2 and err.count("\n") == 1 and message.format(d=d) in err, err
    assert sorted(p.name for p in d.iterdir()) == before
    assert np.array_equal(np.load(d / "x.npy"), x) and (d / "ro.npy").read_bytes() == b"keep"


def test_matmul_stats_only_with_the_rtl_engine_and_not_onto_y(operands, capsys):
    d, _, _ = operands
    code, err = run(capsys, *_matmul(d, "--stats", str(d / "s.json")))
    assert code == 2 and "--stats needs --engine rtl" in err
    code, err = run(capsys, *_matmul(d, "--engine", "rtl", "--stats", str(d / "y.npy")))
    assert code == 2 and "--stats and -o name the same file" in err


def test_matmul_empty_weight_is_bad_input_on_both_engines(operands, capsys):
    d, _, _ = operands
    np.save(d / "w.npy", np.zeros((0, 32), np.int8))
    for engine in ("golden", "rtl"):
        code, err = run(capsys, *_matmul(d, "--engine", engine))
        assert code == 2 and "both at least 1, not int8 (0, 32)" in err
    assert not (d / "y.npy").exists()


def test_interrupted_or_failed_write_keeps_the_previous_result(operands, capsys, monkeypatch):
    """Ctrl-C (or a full disk) while Y is written: the previous Y stays whole, no temporary
    file remains (was: a 0-byte y.npy)."""
    d, x, w = operands
    assert run(capsys, *_matmul(d))[0] == 0
    good = (d / "y.npy").read_bytes()
    real_save = np.save

    def save_then(exc):
        def fake(f, array, **kwargs):
            real_save(f, array[: len(array) // 2], **kwargs)  # half written
            raise exc
        return fake

    monkeypatch.setattr(np, "save", save_then(KeyboardInterrupt()))
    code, err = run(capsys, *_matmul(d))
    assert code == 130 and "interrupted" in err
    monkeypatch.setattr(np, "save", save_then(OSError(28, "No space left on device")))
    code, err = run(capsys, *_matmul(d))
    assert code == 1 and err.count("\n") == 1
    assert f"cannot write '{d}/y.npy': No space left on device" in err
    assert (d / "y.npy").read_bytes() == good
    assert sorted(p.name for p in d.iterdir()) == ["w.npy", "x.npy", "y.npy"]


def test_sigint_at_any_moment_leaves_old_or_new_result(tmp_path):
    """A real SIGINT to a real process at several moments of a 16 MiB write: y.npy is always
    either the previous file or the complete new result, and no temporary file is left."""
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(2048, 64), dtype=np.int8)
    w = nm_prune(rng.integers(-128, 128, size=(2048, 64), dtype=np.int8), "2:8")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    expected = (x.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
    old = np.zeros((1, 1), np.int32)
    args = ["matmul", "--x", str(tmp_path / "x.npy"), "--w", str(tmp_path / "w.npy"),
            "--pattern", "2:8", "-o", str(tmp_path / "y.npy")]
    # The signal comes once main() is running: "ready" is printed from inside it (by its
    # parser's construction), because an interrupt of the interpreter's own start-up, or of the
    # few instructions before main() is entered, is Python's business, not the command's (CI
    # once caught a signal there at delay 0).
    # SIGINT as from a terminal, even when the test runs in a background job (where it is
    # ignored, and the child would inherit that)
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import flexcim.cli as cli\nbuild = cli.build_parser\n"
            "def ready():\n    print('ready', flush=True)\n    return build()\n"
            "cli.build_parser = ready\n"
            f"sys.exit(cli.main({args!r}))\n")
    import signal
    import time

    codes = set()
    for delay in (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8):
        np.save(tmp_path / "y.npy", old)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        codes.add(proc.returncode)
        assert "Traceback" not in err
        y = np.load(tmp_path / "y.npy")
        if proc.returncode == 0:
            assert np.array_equal(y, expected)
        else:
            # 130: the command caught it; -SIGINT: it arrived after main() had restored the
            # default handler on its way out (seen once in CI), the result already complete
            assert proc.returncode in (130, -signal.SIGINT) and (
                np.array_equal(y, old) or np.array_equal(y, expected))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npy", "x.npy", "y.npy"]
    assert 130 in codes  # at least one run was interrupted


def test_out_of_memory_is_one_line_exit_1(operands, capsys, monkeypatch):
    """A result too large for the machine (65536 x 65536 took 6.5x its size): one line."""
    from flexcim import golden

    def too_big(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(golden, "sparse_matmul", too_big)
    d, _, _ = operands
    code, err = run(capsys, *_matmul(d))
    assert code == 1 and err.count("\n") == 1 and "out of memory" in err
    assert not (d / "y.npy").exists()


@pytest.mark.parametrize("sets, message", [
    (["tree_pipeline=2"], "tree_pipeline must be 0 or 1, not 2"),
    (["tree_pipeline=1", "sub_macros=8", "rows=1", "patterns=1:1,2:4,4:8"],
     "tree_pipeline=1 needs rows >= 2 (a sub-macro of one row has no adder tree to cut), "
     "not rows=1"),
])
@pytest.mark.parametrize("command", ["verilog", "synth"])
def test_a_config_that_cannot_use_the_tree_pipeline_is_one_line_exit_2(tmp_path, capsys, sets,
                                                                      message, command):
    argv = [command, "--preset", "tiny", *[a for s in sets for a in ("--set", s)],
            "-o", str(tmp_path / ("out.v" if command == "verilog" else "out.json"))]
    code, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("flexcim: error: ")
    assert message in err
    assert not list(tmp_path.iterdir())
