"""A bounded fuzz test of the command line (issue 13): arguments and small file contents drawn
by hypothesis, in-process.  Whatever the input, the command

* exits 0, 1 or 2 (argparse's usage errors included), never with an uncaught exception (what
  a user sees as a traceback);
* says what was wrong in one line (``flexcim: error: ...``) when it exits 1 or 2;
* leaves no partial output: the folder holds its previous files, byte for byte, plus the
  output only on success, and no temporary file.

The examples are derandomised (tests/conftest.py), so every run of ``make test`` tries the same
cases; ``HYPOTHESIS_PROFILE=dev`` tries many more.
"""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flexcim import fileio
from flexcim.cli import main

NPY_KINDS = ("good", "int32", "float", "3d", "empty_rows", "wide", "garbage", "empty_file",
             "truncated", "object", "missing", "directory")


def _write_npy(path: Path, kind: str, rng: np.random.Generator, shape: tuple[int, int]):
    t, k = shape
    if kind == "missing":
        return
    if kind == "directory":
        path.mkdir()
        return
    if kind in ("garbage", "empty_file"):
        path.write_bytes(rng.bytes(int(rng.integers(1, 64))) if kind == "garbage" else b"")
        return
    if kind == "object":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return
    array = {
        "good": lambda: rng.integers(-128, 128, (t, k), dtype=np.int8),
        "int32": lambda: rng.integers(-128, 128, (t, k)).astype(np.int32),
        "float": lambda: rng.standard_normal((t, k)),
        "3d": lambda: np.zeros((2, t, k), np.int8),
        "empty_rows": lambda: np.zeros((0, k), np.int8),
        "wide": lambda: np.zeros((t, k + 4), np.int8),
        "truncated": lambda: rng.integers(-128, 128, (t, k), dtype=np.int8),
    }[kind]()
    np.save(path, array)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.name: None if p.is_dir() else p.read_bytes() for p in folder.iterdir()}


def _call(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors exit 2 with their usage line
            code = exc.code
    return code, err.getvalue()


def _check(code: int, err: str, before: dict, folder: Path, outputs: list[str]) -> None:
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err, err
    after = _snapshot(folder)
    assert not [n for n in after if fileio.TMP_MARK in n], after.keys()
    if code == 0:
        for name, data in before.items():  # inputs untouched; outputs may be new
            assert name in outputs or after.get(name) == data, name
        assert set(after) <= set(before) | set(outputs)
    else:
        assert after == before, f"a failed run changed files: {set(after) ^ set(before)}"
        errors = [line for line in err.splitlines() if line.startswith("flexcim: error:")
                  or line.startswith("flexcim") and "error:" in line]
        assert len(errors) == 1, err


OUTPUTS = ("y.npy", "", "y", "out_dir", "x.npy", "ro.npy", "missing/y.npy", "y.json",
           "out_dir/", "w.npy/y.npy")
PATTERNS = ("2:4", "2:8", "1:1", "4:8", "0:4", "5:4", "2:6", "a:b", "", "2:4:8", "-1:4", "8:16")


@settings(max_examples=80, deadline=None)
@given(
    x_kind=st.sampled_from(NPY_KINDS), w_kind=st.sampled_from(NPY_KINDS),
    t=st.integers(1, 6), k=st.sampled_from([8, 16, 12]), c=st.integers(1, 5),
    pattern=st.sampled_from(PATTERNS), output=st.sampled_from(OUTPUTS),
    acc_bits=st.one_of(st.none(), st.sampled_from(["16", "20", "32", "64", "15", "65", "-3",
                                                   "x", "1e3"])),
    stats=st.booleans(), seed=st.integers(0, 2**16),
)
def test_fuzz_matmul(x_kind, w_kind, t, k, c, pattern, output, acc_bits, stats, seed):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_npy(d / "x.npy", x_kind, rng, (t, k))
        _write_npy(d / "w.npy", w_kind, rng, (c, k))
        (d / "out_dir").mkdir()
        (d / "ro.npy").write_bytes(b"read-only")
        os.chmod(d / "ro.npy", 0o444)
        if (d / "w.npy").is_file() and w_kind == "good":  # often make it satisfy the pattern
            from flexcim.golden.prune import nm_prune
            from flexcim.spec.nm import NMPattern

            try:
                np.save(d / "w.npy", nm_prune(np.load(d / "w.npy"), NMPattern.parse(pattern)))
            except ValueError:
                pass
        before = _snapshot(d)
        argv = ["matmul", "--x", str(d / "x.npy"), "--w", str(d / "w.npy"),
                "--pattern", pattern, "-o", str(d / output) if output else ""]
        if acc_bits is not None:
            argv += ["--acc-bits", acc_bits]
        if stats:
            argv += ["--stats", str(d / "s.json")]
        code, err = _call(argv)
        _check(code, err, before, d, [output])
        if code == 0:
            x, w = np.load(d / "x.npy"), np.load(d / "w.npy")
            bits = 32 if acc_bits is None else int(acc_bits)
            exact = x.astype(np.int64) @ w.T.astype(np.int64)
            half = 1 << (bits - 1)
            wrapped = (exact + half) % (1 << bits) - half
            np.testing.assert_array_equal(np.load(d / output), wrapped)


def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                        st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from(["", "2:4", "1:1", "3:6", "flow", "wanda", "x"]))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["index", "name", "pattern", "metric", "a"]), inner,
                        max_size=3)), max_leaves=6)


PLAN_FIELDS = ("method", "target_sparsity", "achieved_sparsity", "exact", "message", "blocks",
               "layers", "settings")


@settings(max_examples=60, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from([*PLAN_FIELDS, "format", "junk"]),
                            st.one_of(st.just("<drop>"), _json_values()), max_size=3),
    step=st.sampled_from(["prune", "export", "act-eval"]),
    raw=st.one_of(st.none(), st.binary(max_size=40)),
)
def test_fuzz_plan_files(changes, step, raw):
    """Plan files with any field of any JSON type: one line and exit 2, never an exception
    (was: AttributeError on a list-valued 'settings').  The model path does not exist, so a
    plan that passes its checks stops there, also with exit 2."""
    plan = {"format": "flexcim-plan", "method": "uniform", "target_sparsity": 0.5,
            "achieved_sparsity": 0.5, "exact": True, "message": "",
            "blocks": [{"index": 0, "name": "model.layers.0", "pattern": "2:4"}],
            "layers": {"model.layers.0.mlp.up_proj": "2:4"}, "settings": {}}
    for key, value in changes.items():
        if value == "<drop>":
            plan.pop(key, None)
        else:
            plan[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        path = d / "plan.json"
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(json.dumps(plan))
        before = _snapshot(d)
        out = {"prune": "pruned", "export": "l.safetensors", "act-eval": "r.json"}[step]
        argv = ["flow", step, "--model", str(d / "no-model"), "--plan", str(path),
                "-o", str(d / out)]
        if step == "export":
            argv += ["--layer", "model.layers.0.mlp.up_proj"]
        code, err = _call(argv)
        _check(code, err, before, d, [])
        assert code == 2


@settings(max_examples=60, deadline=None)
@given(
    meta=st.dictionaries(
        st.sampled_from(["format", "version", "pattern", "shape", "name", "extra", "act_scale",
                         "act_pattern"]),
        st.sampled_from(["", "flexcim-layer", "1", "2", "2:8", "8:16", "1:16", "6,16", "0,16",
                         "6,8", "x", "[1,2]", "{}", '{"a": 1}', "nan", "inf", "-1", "0.5",
                         "1e309"]), max_size=3),
    drop=st.sets(st.sampled_from(["weight.values", "weight.indices", "weight.scale",
                                  "act.values"]), max_size=2),
    scale=st.sampled_from([1.0, -1.0, 0.0, float("nan"), float("inf")]),
    act_rows=st.sampled_from([0, 1, 3]),
)
def test_fuzz_layer_files(meta, drop, scale, act_rows):
    """Layer files with any metadata string and missing or odd tensors: the reader raises one
    line naming the file, or returns a layer that passes every check."""
    from flexcim.golden.layer_io import load_layer
    from flexcim.golden.prune import act_topk, nm_prune
    from flexcim.spec.nm import compress
    from safetensors.numpy import save_file

    from flexcim.errors import FlexCimError

    rng = np.random.default_rng(0)
    w = compress(nm_prune(rng.integers(-127, 128, (6, 16), dtype=np.int8), "2:8"), "2:8")
    tensors = {"weight.values": w.values, "weight.indices": w.indices,
               "weight.scale": np.full(6, scale, np.float32),
               "act.values": act_topk(rng.integers(-127, 128, (act_rows, 16), dtype=np.int8),
                                      "8:16")}
    metadata = {"format": "flexcim-layer", "version": "1", "pattern": "2:8", "shape": "6,16",
                "name": "l", "extra": "{}", "act_scale": "0.05", "act_pattern": "8:16"}
    metadata.update(meta)
    for key in drop:
        tensors.pop(key)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "l.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        try:
            layer = load_layer(path)
        except FlexCimError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            return
    assert np.all(np.isfinite(layer.weight_scale)) and np.all(layer.weight_scale > 0)
    if layer.act is not None:
        assert np.isfinite(layer.act_scale) and layer.act_scale > 0 and len(layer.act) >= 1
