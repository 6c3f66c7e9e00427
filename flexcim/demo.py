"""``flexcim demo`` (``make demo``): the main job, end to end, into one report.

The demo runs a fixed list of stages, each timed and announced on the terminal, each adding its
section, plots and figures to :class:`flexcim.report.Report` (``out/report.md``,
``out/report.json``, PNG files).  A stage that needs an optional tool which is missing (e.g.
synthesis) says so in the report instead of failing the run; any other failure stops the demo
with a one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from flexcim.errors import FlexCimError
from flexcim.report import Report

log = logging.getLogger("flexcim.demo")


class StageSkipped(Exception):
    """Raised by a stage whose optional tool is unavailable; the reason goes into the report."""


@dataclasses.dataclass
class Context:
    """What stages share: the arguments, the report and results of earlier stages."""

    args: argparse.Namespace
    report: Report
    results: dict = dataclasses.field(default_factory=dict)


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


def stage_golden(ctx: Context) -> None:
    rows = golden_check(ctx.args.seed)
    ctx.report.record("golden_check", rows)
    ctx.report.section(
        "Golden model",
        "The NumPy golden model (`flexcim.golden.sparse_matmul`, what the macro computes bit for "
        f"bit) against an independent int64 matmul, x[16,576] @ W.T[576,64], seed {ctx.args.seed}, "
        "for every pattern of the `default` macro:",
    )
    ctx.report.table(
        ["pattern", "sparsity", "ideal speed-up", "passes/token", "bit-exact"],
        [[r["pattern"], r["sparsity"], r["ideal_speedup"], r["passes_per_token"], r["match"]]
         for r in rows],
    )
    if not all(r["match"] for r in rows):
        raise FlexCimError("the golden model disagrees with the int64 reference")


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("golden model vs int64 reference", stage_golden),
]


def run(args: argparse.Namespace) -> Report:
    """Run every stage in order; returns the written report."""
    report = Report(args.out, "FlexCiM demonstration report")
    ctx = Context(args, report)
    timings = {}
    start = time.perf_counter()
    for i, (title, stage) in enumerate(STAGES, 1):
        log.info("[%d/%d] %s ...", i, len(STAGES), title)
        t0 = time.perf_counter()
        try:
            stage(ctx)
        except StageSkipped as exc:
            log.warning("[%d/%d] %s skipped: %s", i, len(STAGES), title, exc)
            report.section(title[:1].upper() + title[1:], f"*Skipped: {exc}*")
        timings[title] = round(time.perf_counter() - t0, 2)
        log.info("[%d/%d] %s done in %.1f s", i, len(STAGES), title, timings[title])
    timings["total"] = round(time.perf_counter() - start, 2)
    report.record("stage_seconds", timings)
    report.section(
        "Run time",
        "Wall time of each stage of this run (2-core machine unless stated otherwise):",
    )
    report.table(["stage", "seconds"], [[k, v] for k, v in timings.items()])
    md, js = report.write()
    log.info("wrote %s and %s (%.1f s in total)", md, js, timings["total"])
    return report


def _demo(args: argparse.Namespace) -> int:
    run(args)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the FlexCiM demonstration (make demo): FLOW, RTL check, performance, report",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="out", metavar="DIR",
                   help="where report.md, report.json and the plots go (default out/)")
    p.set_defaults(func=_demo)
