import subprocess
import sys

import numpy as np
import pytest
from flexcim.golden.nm import nm_prune

from flexcim.cli import main


@pytest.fixture
def operands(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, size=(5, 32), dtype=np.int8)
    w = nm_prune(rng.integers(-128, 128, size=(7, 32), dtype=np.int8), "2:8")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    return tmp_path, x, w


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
         "weight (--w) must be int8 [out_features, in_features], not float32 (7, 32)"),
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
