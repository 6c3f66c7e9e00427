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


MACROS = ("default", "dense", "fixed24")  # FlexCiM and the two baselines, same cell count
PREFILL_TOKENS = 128


def prefill_comparison(plan: dict, tokens: int = PREFILL_TOKENS) -> dict:
    """Whole-model prefill cycles/energy of ``plan`` on FlexCiM vs dense and fixed-2:4 macros.

    ``plan`` is in :func:`flexcim.golden.energy.parse_plan` form.  Returns, per activation
    density (1.0 = dense activations, 0.5 = 8:16 activation pruning, whose zeros gate the cells),
    :func:`flexcim.golden.energy.compare` of the three macros against ``fixed24``.
    """
    from flexcim.golden import energy
    from flexcim.hw.config import preset

    configs = {name: preset(name) for name in MACROS}
    return {
        str(density): energy.compare(plan, tokens, configs, act_density=density)
        for density in (1.0, 0.5)
    }


def stage_performance(ctx: Context) -> None:
    """Latency and energy of the FLOW plan's prefill on FlexCiM vs the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = ctx.results["energy_plan"]
    result = prefill_comparison(plan)
    ctx.report.record("prefill", result)
    dense_act = result["1.0"]
    rows = []
    for name in MACROS:
        r = dense_act[name]
        rows.append([name, r["cycles"], r["energy_pj"] / 1e6, r["latency_vs_ref"],
                     r["energy_vs_ref"], result["0.5"][name]["energy_pj"] / 1e6])
    ctx.report.section(
        "Prefill latency and energy",
        f"Every linear projection of the plan ({len(plan['layers'])} blocks), {PREFILL_TOKENS} "
        "prefill tokens, run one after another on one macro: FlexCiM (`default` preset) vs a "
        "dense macro and a fixed-2:4 macro with the same cells (`dense`, `fixed24`). `fixed24` "
        "runs a block as 2:4 only if its masks are 2:4-compatible, else dense. Cycles from "
        "`flexcim.golden.perf` (checked against the RTL), energy from `flexcim.golden.energy` "
        "(Horowitz ISSCC 2014 45 nm action energies; see its docstring). Ratios are "
        "fixed24 / macro (> 1: better than fixed24). The last column gates the zeros of 8:16 "
        "activation pruning.",
    )
    ctx.report.table(
        ["macro", "cycles", "energy (uJ)", "latency vs fixed24", "energy vs fixed24",
         "energy with 8:16 act. (uJ)"],
        rows,
    )
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, label in ((axes[0], "cycles", "prefill cycles (millions)"),
                           (axes[1], "energy_pj", "prefill energy (uJ)")):
        scale = 1e6
        ax.bar(MACROS, [dense_act[m][key] / scale for m in MACROS],
               color=["tab:green", "tab:gray", "tab:blue"])
        ax.set_ylabel(label)
        for i, m in enumerate(MACROS):
            ax.annotate(f"{dense_act['fixed24'][key] / dense_act[m][key]:.2f}x",
                        (i, dense_act[m][key] / scale), ha="center", va="bottom")
    fig.suptitle("FLOW plan prefill: FlexCiM vs baselines (ratio = fixed24 / macro)")
    ctx.report.plot("prefill_latency_energy", fig,
                    "Prefill latency and energy of the FLOW plan on each macro")


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
