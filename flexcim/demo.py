"""``flexcim demo``: the main job.

Today it runs the golden model on every pattern the default FlexCiM macro supports and checks it
against an independent int64 matmul; it grows into the whole pipeline (FLOW on SmolLM2, the RTL
on Verilator, the report) as those parts land.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from flexcim.errors import FlexCimError

log = logging.getLogger("flexcim.demo")


def golden_check(seed: int, tokens: int = 16, k: int = 576, c: int = 64) -> list[dict]:
    """Prune random int8 weights to every default pattern and compare golden with int64."""
    from flexcim.golden import NMTensor, nm_prune, sparse_matmul
    from flexcim.hw.config import DEFAULT

    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(tokens, k), dtype=np.int8)
    dense = rng.integers(-128, 128, size=(c, k), dtype=np.int8)
    rows = []
    for pattern in DEFAULT.patterns:
        w = nm_prune(dense, pattern)
        y = sparse_matmul(x, NMTensor.compress(w, pattern), acc_bits=DEFAULT.acc_bits)
        reference = x.astype(np.int64) @ w.T.astype(np.int64)
        rows.append(
            {
                "pattern": str(pattern),
                "sparsity": pattern.sparsity,
                "ideal_speedup": pattern.ideal_speedup,
                "passes_per_token": DEFAULT.passes(pattern, k),
                "match": bool(np.array_equal(y, reference)),
            }
        )
    return rows


def _demo(args: argparse.Namespace) -> int:
    rows = golden_check(args.seed)
    print(f"Golden model vs int64 matmul: x[16,576] @ W.T[576,64], seed {args.seed}")
    print(f"{'pattern':>8} {'sparsity':>9} {'ideal speed-up':>15} {'passes/token':>13}  result")
    for r in rows:
        verdict = "bit-exact" if r["match"] else "MISMATCH"
        print(
            f"{r['pattern']:>8} {r['sparsity']:>9.1%} {r['ideal_speedup']:>14.2f}x "
            f"{r['passes_per_token']:>13}  {verdict}"
        )
    if not all(r["match"] for r in rows):
        raise FlexCimError("the golden model disagrees with the int64 reference")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the FlexCiM demonstration (make demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_demo)
