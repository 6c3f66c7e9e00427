"""Golden-model speed: sparse_matmul vs the equivalent dense int64 np.matmul, side by side.

Goal (foundation issue): a 576x576 weight with 128 tokens runs within 3x of the dense int64
matmul.  Prints one row per pattern with both medians and their ratio, and writes
out/bench/golden.json.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import numpy as np
from flexcim.golden import nm_prune, sparse_matmul
from flexcim.spec.config import DEFAULT
from flexcim.spec.nm import NMTensor

T, K, C, REPEATS = 128, 576, 576, 7


def median_seconds(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(T, K), dtype=np.int8)
    dense = rng.integers(-128, 128, size=(C, K), dtype=np.int8)
    rows = []
    print(f"golden sparse_matmul vs dense int64 np.matmul, x[{T},{K}] @ W.T[{K},{C}], "
          f"median of {REPEATS}")
    print(f"{'pattern':>8} {'golden ms':>10} {'int64 matmul ms':>16} {'ratio':>7}  goal <= 3x")
    for pattern in DEFAULT.patterns:
        w = nm_prune(dense, pattern)
        t = NMTensor.compress(w, pattern)
        x64, w64 = x.astype(np.int64), w.T.astype(np.int64)
        golden = median_seconds(lambda t=t: sparse_matmul(x, t))
        reference = median_seconds(lambda x64=x64, w64=w64: x64 @ w64)
        assert np.array_equal(sparse_matmul(x, t), x64 @ w64)
        ratio = golden / reference
        rows.append({"pattern": str(pattern), "golden_s": golden, "int64_matmul_s": reference,
                     "ratio": ratio, "within_goal": ratio <= 3.0})
        print(f"{str(pattern):>8} {golden * 1e3:>10.2f} {reference * 1e3:>16.2f} {ratio:>6.2f}x"
              f"  {'ok' if ratio <= 3.0 else 'MISSED'}")
    out = pathlib.Path("out/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "golden.json").write_text(json.dumps({"shape": [T, K, C], "rows": rows}, indent=2))
    print(f"wrote {out / 'golden.json'}")


if __name__ == "__main__":
    main()
