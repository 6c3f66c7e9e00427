"""``make bench-flow``: FLOW vs OWL vs uniform on SmolLM2, activation pruning, timings.

Everything is measured in this run on the bundled SmolLM2-135M and Jane Austen text and written to
``out/bench/flow/flow_bench.json`` with three plots:

* perplexity (held-out Pride and Prejudice) vs mean weight sparsity for uniform, OWL and the FLOW
  variants (M direction, normalisation, candidate set) with Wanda, and FLOW with SparseGPT;
* per-block outlier ratio and locality with the N:M FLOW chose at 50 %;
* the 8:16 activation-pruning projection sets: share of linear MACs vs perplexity increase.

Every plan is scored on two disjoint texts: ``ppl_val`` (*Emma*, the validation split) and
``ppl`` (held-out *Pride and Prejudice*, the reported figure).  The FLOW variant used for
SparseGPT, activation pruning and the hardware-aware comparison is the one with the lowest
geometric-mean *validation* perplexity over the targets, so nothing is tuned on the reported
windows.  The hardware-aware stage compares plain and hardware-aware FLOW at 50 % (perplexity
and modelled prefill cycles/energy on the ``default``, ``dense`` and ``fixed24`` macros).

Budget (the defaults): 16 calibration windows, 16 test + 8 validation windows of 128 tokens,
four targets, the eight ``DEFAULT_CONFIGS`` with Wanda (32 plans), SparseGPT on 5 plans, 5
hardware plans, 13 activation runs, the greedy 8:16 projection-set study (about 20 sets, each
on validation and test), one sequential select + prune; the measured wall time is in the JSON
(``total_s``).  ``--only-act-sets`` runs the study alone (about 3 minutes); ``--configs``,
``--sparsities``, ``--skip-*`` and the window counts shrink the rest.  Progress is logged per plan.

To compare many plans on one calibration the sweep prunes one-shot from the dense model's
statistics (``apply_plan(stats=...)``); ``flexcim flow prune`` prunes block by block on the
already-pruned model's activations instead (timed here once, as select + prune).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import sys
import time

import torch

from flexcim.errors import FlexCimError
from flexcim.report import pyplot

log = logging.getLogger("flexcim.bench")


def _flow(direction="figure", normalisation="minmax", ends=False, candidates=None) -> dict:
    options = {"m_direction": direction, "normalisation": normalisation, "keep_ends_dense": ends}
    return options if candidates is None else {**options, "candidates": candidates}


# name -> (label, method, SelectConfig options), all pruned with Wanda; "code" = the release's
# M direction, "figure" = the paper's figure's; normalisation minmax unless named; first and
# last blocks pruned like the others unless "ends-dense" is named
CONFIGS = {
    "uniform": ("uniform", "uniform", {}),
    "owl": ("owl", "owl", {}),
    "flow-code": ("flow-code", "flow", _flow("code")),
    "flow-figure": ("flow-figure", "flow", _flow("figure")),
    "flow-figure-ext": ("flow-figure-extended", "flow", _flow("figure", candidates="extended")),
    "flow-code-ends": ("flow-code-ends-dense", "flow", _flow("code", ends=True)),
    "flow-figure-zscore": ("flow-figure-zscore", "flow", _flow("figure", "zscore")),
    "flow-figure-rank": ("flow-figure-rank", "flow", _flow("figure", "rank")),
    # not in the default run (time), measured by a second run (docs/flow.md)
    "flow-figure-ends": ("flow-figure-ends-dense", "flow", _flow("figure", ends=True)),
    "flow-code-ends-zscore": ("flow-code-ends-dense-zscore", "flow",
                              _flow("code", "zscore", ends=True)),
    "flow-code-ends-rank": ("flow-code-ends-dense-rank", "flow", _flow("code", "rank", ends=True)),
    # M fixed at 8, every N: FLOW's N term alone on OWL's choice set (not all run on FlexCiM,
    # whose N must be a power of two) -- separates the candidate set from the criterion
    "flow-n8": ("flow-n:8", "flow",
                _flow(candidates=",".join(f"{n}:8" for n in range(1, 9)))),
    "flow-code-zscore": ("flow-code-zscore", "flow", _flow("code", "zscore")),
    "flow-code-rank": ("flow-code-rank", "flow", _flow("code", "rank")),
    "flow-figure-zscore-ext": ("flow-figure-zscore-extended", "flow",
                               _flow("figure", "zscore", candidates="extended")),
    "flow-figure-rank-ext": ("flow-figure-rank-extended", "flow",
                             _flow("figure", "rank", candidates="extended")),
}
# the first eight: each configuration costs about a minute per target on a busy 2-core machine
DEFAULT_CONFIGS = tuple(CONFIGS)[:8]
HW_WEIGHTS = (1.0, 10.0)
"""Weights of the latency term in the hardware-aware comparison (FLOW's own costs are O(1-10))."""


ACT_BUDGET = 0.05
"""Perplexity increase allowed for the default activation-pruned projection set (the goal)."""


def _act_sets(model, ev, dense: float, pattern: str = "8:16") -> dict:
    """Which projection kinds to prune at ``pattern``: :func:`act.choose_projections` on the
    *validation* text (Emma), the largest share of linear MACs within :data:`ACT_BUDGET`; every
    set it measured is then also scored on the test windows (reported, never used to choose).
    Whole kinds only (``groups=1``), every token pruned: how :data:`act.DEFAULT_PROJECTIONS` was
    chosen (the deployed metric's per-block choice: ``flexcim flow act-eval --projections auto
    --prefill-tokens 64``, docs/flow.md)."""
    from flexcim.flow import act

    study = act.choose_projections(model, lambda: ev("emma"), pattern=pattern, budget=ACT_BUDGET,
                                   groups=1)
    for rows in study["steps"]:
        for row in rows:
            config = act.ActConfig(pattern=pattern, projections=tuple(row["projections"]))
            with act.activation_pruning(model, config):
                row["ppl_test"] = ev()
            row["increase_test"] = row["ppl_test"] / dense - 1
    return study


def _restore(model, state):
    model.load_state_dict(state)


def _overhead(repeats: int = 30) -> dict:
    """Time of the 8:16 top-k pre-hook vs the dense linear it precedes (128 tokens)."""
    from flexcim.flow.act import topk_activations
    from flexcim.spec.nm import NMPattern

    results = {}
    g = torch.Generator().manual_seed(0)
    for k, c in ((576, 1536), (1536, 576), (576, 576)):
        x = torch.randn(1, 128, k, generator=g)
        layer = torch.nn.Linear(k, c, bias=False)
        pattern = NMPattern(8, 16)
        with torch.no_grad():
            for _ in range(3):
                layer(x)
                topk_activations(x, pattern)
            t_lin, t_topk = [], []
            for _ in range(repeats):  # interleaved so machine load hits both alike
                t0 = time.perf_counter()
                layer(x)
                t1 = time.perf_counter()
                topk_activations(x, pattern)
                t2 = time.perf_counter()
                t_lin.append(t1 - t0)
                t_topk.append(t2 - t1)
        t_lin.sort()
        t_topk.sort()
        results[f"{k}->{c}"] = {"linear_ms": 1e3 * t_lin[repeats // 2],
                                "topk_ms": 1e3 * t_topk[repeats // 2],
                                "ratio": t_topk[repeats // 2] / t_lin[repeats // 2]}
    return results


def _config(method: str, extra: dict, target: float):
    from flexcim.flow.select import SelectConfig, parse_candidates

    if method == "uniform":
        return SelectConfig(method="uniform", pattern=f"{round((1 - target) * 8)}:8")
    extra = dict(extra)
    if "candidates" in extra:
        extra["candidates"] = parse_candidates(extra["candidates"])
    return SelectConfig(method=method, target=target, **extra)


class _WandaMasks:
    """One-shot Wanda pruning from the dense statistics with the masks cached per (projection,
    pattern): the sweep's plans share most of them, and the scores never change."""

    def __init__(self, model, stats):
        from flexcim.flow.model import linear_layers

        self.model, self.stats, self.layers = model, stats, linear_layers(model)
        self.masks = {}

    @torch.no_grad()
    def apply(self, plan) -> None:
        from flexcim.flow import prune
        from flexcim.spec.nm import NMPattern

        for name, text in plan.layers.items():
            pattern = NMPattern.parse(text)
            if pattern.is_dense:
                continue
            weight = self.layers[name].weight
            key = (name, pattern.n, pattern.m)
            if key not in self.masks:
                scores = prune.wanda_scores(weight, self.stats[name].act_sq_mean)
                self.masks[key] = prune.nm_mask(scores, n_keep=pattern.n, m=pattern.m)
            weight.mul_(self.masks[key])

    @torch.no_grad()
    def check_against_pipeline(self, config, outliers) -> None:
        """The cached path must give exactly :func:`pipeline.apply_plan`'s weights (leaves the
        model pruned: restore it)."""
        from flexcim.flow import pipeline

        plan = pipeline.make_plan(self.model, None, config, stats=self.stats, progress=False,
                                  outliers=outliers)
        dense = {n: x.weight.clone() for n, x in self.layers.items()}
        pipeline.apply_plan(self.model, plan, None, metric="wanda", stats=self.stats)
        reference = {n: x.weight.clone() for n, x in self.layers.items()}
        for n, x in self.layers.items():
            x.weight.copy_(dense[n])
        self.apply(plan)
        bad = [n for n, x in self.layers.items() if not torch.equal(x.weight, reference[n])]
        if bad:
            raise AssertionError(f"cached Wanda masks differ from apply_plan on {bad[0]}")
        log.info("cached Wanda masks match pipeline.apply_plan on %d projections",
                 len(self.layers))


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _prefill(model, plan, tokens: int) -> dict:
    """Modelled prefill of the (pruned) model on the dense, fixed-2:4 and FlexCiM macros."""
    from flexcim.flow import pipeline
    from flexcim.golden import energy
    from flexcim.spec.config import PRESETS

    macros = {name: PRESETS[name] for name in ("dense", "fixed24", "default")}
    costs = energy.compare(pipeline.energy_plan(model, plan), tokens, macros, reference="dense")
    return {name: {"cycles": c["cycles"], "energy_pj": c["energy_pj"],
                   "patterns_run": sorted({row[1] for row in c["layers"]})}
            for name, c in costs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench/flow")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16,
                        help="windows of the test text (held-out Pride and Prejudice)")
    parser.add_argument("--val-windows", type=int, default=8,
                        help="windows of the validation text (Emma; selects the FLOW variant)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sparsities", default="0.25,0.375,0.5,0.625")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"Wanda sweep configurations, some of {', '.join(CONFIGS)} "
                             f"(default {','.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--skip-sparsegpt", action="store_true",
                        help="skip SparseGPT (the selected FLOW variant at every target, "
                             "uniform at --sparsegpt-uniform)")
    parser.add_argument("--sparsegpt-uniform", default="0.5",
                        help="targets at which uniform is also pruned with SparseGPT")
    parser.add_argument("--skip-hw", action="store_true",
                        help="skip plain vs hardware-aware FLOW at 50 %%")
    parser.add_argument("--skip-act", action="store_true", help="skip activation pruning")
    parser.add_argument("--skip-timing", action="store_true",
                        help="skip the sequential select + prune timing")
    parser.add_argument("--only-act-sets", action="store_true",
                        help="only the dense perplexities and the 8:16 projection-set study")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in args.configs.split(",") if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; expected some of {', '.join(CONFIGS)}")
    targets = [float(v) for v in args.sparsities.split(",")]

    from flexcim.flow import act, calib, pipeline
    from flexcim.flow.eval import perplexity
    from flexcim.flow.model import decoder_blocks
    from flexcim.flow.select import SelectConfig, all_outliers
    from flexcim.flow.text import token_windows

    started = time.perf_counter()
    t0 = time.perf_counter()
    session = pipeline.load()
    model = session.model
    result = {"model": session.lm.name, "text": session.corpus.source,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python bench/flow_bench.py " + " ".join(argv or sys.argv[1:]),
              "calib_windows": args.calib_windows, "eval_windows": args.eval_windows,
              "val_windows": args.val_windows,
              "seq_len": args.seq_len, "test_text": "held-out", "validation_text": "emma",
              "load_s": time.perf_counter() - t0, "load_average_at_start": os.getloadavg()[0]}
    cw = pipeline.calibration_windows(session, count=args.calib_windows, seq_len=args.seq_len)

    # tokenised once (the same seeded windows pipeline.evaluate draws)
    eval_windows = {text: token_windows(session.lm.tokenizer, session.corpus.evaluation[text],
                                        seq_len=args.seq_len, count=count, seed=0)
                    for text, count in (("held-out", args.eval_windows),
                                        ("emma", args.val_windows))}

    def ev(text: str = "held-out") -> float:
        return perplexity(model, eval_windows[text], progress=False)

    def save() -> None:
        (out / "flow_bench.json").write_text(json.dumps(result, indent=1) + "\n")

    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    hessian = not args.skip_sparsegpt
    stats = calib.calibrate(model, cw, hessian=hessian, keep_hessians=hessian)
    result["calibration_s"] = time.perf_counter() - t0
    result["dense_ppl"], result["dense_ppl_val"] = ev(), ev("emma")
    log.info("dense perplexity %.3f (validation %.3f)", result["dense_ppl"],
             result["dense_ppl_val"])
    if args.only_act_sets:
        result["act_sets"] = _act_sets(model, ev, result["dense_ppl"])
        result["total_s"] = time.perf_counter() - started
        save()
        _plot_act_sets(result["act_sets"], out)
        _print(result)
        return 0
    outliers = all_outliers(decoder_blocks(model), pipeline.layer_scores(model, stats, "wanda"),
                            SelectConfig(method="uniform", pattern="4:8").hyper_m)
    plans = {}
    wanda = _WandaMasks(model, stats)

    def run(label, config, metric="wanda", inspect=None) -> dict | None:
        """Select, prune one-shot from the dense statistics, evaluate, restore the dense model."""
        try:
            plan = pipeline.make_plan(model, None, config, stats=stats, progress=False,
                                      outliers=outliers)
        except FlexCimError as exc:
            log.info("%s at %s: %s", label, config.target, exc)
            return None
        t1 = time.perf_counter()
        if metric == "wanda":
            wanda.apply(plan)
        else:
            pipeline.apply_plan(model, plan, None, metric=metric, stats=stats)
        pipeline.check_plan(model, plan)
        prune_s = time.perf_counter() - t1
        row = {"label": label, "method": config.method, "metric": metric,
               "target": plan.target_sparsity, "achieved": plan.achieved_sparsity,
               "ppl": ev(), "ppl_val": ev("emma"), "prune_s": prune_s,
               "patterns": [b["pattern"] for b in plan.blocks], "message": plan.message}
        if inspect is not None:
            row.update(inspect(plan))
        _restore(model, dense_state)
        plans[(label, metric, round(plan.target_sparsity, 6))] = plan
        log.info("[%5.0f s] %-28s %-9s sparsity %.3f: perplexity %.3f (validation %.3f)",
                 time.perf_counter() - started, label, metric, row["achieved"], row["ppl"],
                 row["ppl_val"])
        return row

    # 1. the Wanda sweep: every configuration at every target
    configs = [CONFIGS[name] for name in args.configs.split(",")]
    wanda.check_against_pipeline(_config(configs[0][1], configs[0][2], targets[0]), outliers)
    _restore(model, dense_state)
    sweep = []
    for i, s in enumerate(targets):
        log.info("== target %.3f (%d/%d): %d configurations", s, i + 1, len(targets),
                 len(configs))
        for label, method, extra in configs:
            row = run(label, _config(method, extra, s))
            if row is not None:
                sweep.append(row)
        result["sweep"] = sweep
        save()

    # 2. choose the FLOW variant on the validation text only (all targets, geometric mean)
    by_label = {}
    for r in sweep:
        by_label.setdefault(r["label"], []).append(r)
    complete = {lab: rows for lab, rows in by_label.items() if len(rows) == len(targets)}
    selection = {lab: {"geomean_ppl_val": _geomean(r["ppl_val"] for r in rows),
                       "geomean_ppl": _geomean(r["ppl"] for r in rows)}
                 for lab, rows in complete.items()}
    flow_labels = [lab for lab in selection if lab.startswith("flow")]
    chosen = min(flow_labels, key=lambda lab: selection[lab]["geomean_ppl_val"],
                 default=None)
    result["selection"] = {"by": "geometric-mean validation (emma) perplexity over the targets",
                           "chosen": chosen, "variants": selection}
    log.info("FLOW variant chosen on validation: %s", chosen)
    chosen_cfg = next(((m, e) for lab, m, e in CONFIGS.values() if lab == chosen), None)

    # 3. SparseGPT at every target: the chosen FLOW variant and uniform
    if not args.skip_sparsegpt:
        uniform_at = [float(v) for v in args.sparsegpt_uniform.split(",") if v.strip()]
        for s in targets:
            for label, (method, extra) in (("uniform", ("uniform", {})), (chosen, chosen_cfg)):
                if label is None or (label == "uniform" and s not in uniform_at):
                    continue
                row = run(label, _config(method, extra, s), metric="sparsegpt")
                if row is not None:
                    sweep.append(row)
            save()

    # each FLOW row vs the baselines (same metric, same target): 1 - ppl_flow / ppl_baseline
    summary = []
    for r in sweep:
        if r["method"] != "flow":
            continue
        row = {"sparsity": r["target"], "flow": r["label"], "metric": r["metric"],
               "ppl": r["ppl"]}
        for base in ("uniform", "owl"):
            ref = [b["ppl"] for b in sweep if b["label"] == base and b["metric"] == r["metric"]
                   and abs(b["target"] - r["target"]) < 1e-9]
            if ref:
                row[f"vs {base}"] = 1 - r["ppl"] / ref[0]
        summary.append(row)
    result["flow_vs_baselines"] = summary
    save()
    flow50 = plans.get((chosen, "wanda", 0.5))

    # 4. plain vs hardware-aware FLOW at 50 %: perplexity and modelled prefill cost
    if not args.skip_hw and chosen_cfg is not None and 0.5 in targets:
        from flexcim.spec.config import DEFAULT

        method, extra = chosen_cfg
        inspect = lambda plan: {"prefill": _prefill(model, plan, 128)}  # noqa: E731
        variants = [("uniform 4:8", _config("uniform", {}, 0.5)),
                    ("uniform 2:4", SelectConfig(method="uniform", pattern="2:4")),
                    (f"{chosen}", _config(method, extra, 0.5))]
        for w in HW_WEIGHTS:
            variants.append((f"{chosen} hw-aware w={w:g}", _config(
                method, {**extra, "hw_config": DEFAULT, "hw_weight": w}, 0.5)))
        hw_rows = []
        for label, config in variants:
            row = run(label + " [hw]", config, inspect=inspect)
            if row is not None:
                row["label"] = label
                hw_rows.append(row)
        result["hw_aware"] = {"tokens": 128, "target": 0.5, "rows": hw_rows}
        save()

    if not args.skip_act:
        # Activation pruning alone and on top of the chosen FLOW 50 % plan
        acts = []
        for weight_plan in (None, flow50):
            if weight_plan is not None:
                wanda.apply(weight_plan)
            base = result["dense_ppl"] if weight_plan is None else ev()
            every, default = act.PROJECTIONS, act.DEFAULT_PROJECTIONS
            for pattern, score, kinds in (("8:16", "abs", every), ("8:16", "weight", every),
                                          ("4:8", "abs", every), ("2:4", "abs", every),
                                          ("8:16", "abs", default), ("4:8", "abs", default)):
                config = act.ActConfig(pattern=pattern, score=score, projections=kinds)
                with act.activation_pruning(model, config):
                    ppl = ev()
                weights = "dense" if weight_plan is None else f"{chosen} 0.5 wanda"
                acts.append({"weights": weights, "projections": list(kinds),
                             "pattern": pattern, "score": score, "ppl_without": base, "ppl": ppl,
                             "increase": ppl / base - 1})
                log.info("activations %s (%s) on %s, weights %s: %.3f (%+.1f%%)", pattern,
                         score, ",".join(kinds), acts[-1]["weights"], ppl,
                         100 * acts[-1]["increase"])
            _restore(model, dense_state)
        # per-projection-kind sensitivity at 8:16 and skipping the most sensitive 10 %
        sens = act.sensitivity(model, cw[:4],
                               act.ActConfig(pattern="8:16", projections=act.PROJECTIONS))
        kinds = {}
        for name, v in sens.items():
            kinds.setdefault(act.projection_kind(name), []).append(v)
        result["act_sensitivity_by_kind"] = {k: sum(v) / len(v) for k, v in kinds.items()}
        skip = act.skip_most_sensitive(sens, 0.1)
        with act.activation_pruning(model, act.ActConfig(pattern="8:16", skip=skip,
                                                          projections=act.PROJECTIONS)):
            ppl = ev()
        acts.append({"weights": "dense", "projections": list(act.PROJECTIONS),
                     "pattern": "8:16", "score": "abs", "skip_budget": 0.1,
                     "skipped": list(skip), "ppl_without": result["dense_ppl"], "ppl": ppl,
                     "increase": ppl / result["dense_ppl"] - 1})
        result["activation"] = acts
        result["act_sets"] = _act_sets(model, ev, result["dense_ppl"])
        result["act_overhead"] = _overhead()
        save()

    if not args.skip_timing:
        # the CLI's path: calibrate + select, then block-by-block (sequential) Wanda pruning
        t1 = time.perf_counter()
        plan = pipeline.make_plan(model, cw, SelectConfig(method="flow", target=0.5),
                                  progress=False)
        t2 = time.perf_counter()
        pipeline.apply_plan(model, plan, cw, metric="wanda", progress=False)
        t3 = time.perf_counter()
        result["timing_select_s"] = t2 - t1
        result["timing_prune_sequential_s"] = t3 - t2
        result["timing_settings"] = {k: plan.settings[k] for k in ("m_direction", "normalisation")}
        result["ppl_flow50_sequential"] = ev()
        _restore(model, dense_state)
    result["load_average_at_end"] = os.getloadavg()[0]
    result["total_s"] = time.perf_counter() - started
    save()
    _plots(result, flow50, chosen, out)
    _print(result)
    return 0


def _plot_act_sets(sets: dict, out: pathlib.Path) -> None:
    """Every projection set the greedy search measured: share of linear MACs pruned vs
    perplexity increase (validation, which chose; test, reported), with the budget."""
    plt = pyplot()
    rows = [r for step in sets["steps"] for r in step]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, label, marker in (("increase", "validation (chooses)", "o"),
                               ("increase_test", "test (reported)", "x")):
        ax.scatter([100 * r["mac_share"] for r in rows], [100 * r[key] for r in rows],
                   marker=marker, label=label)
    for r in rows:
        ax.annotate(",".join(r["projections"]), (100 * r["mac_share"], 100 * r["increase"]),
                    fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(100 * sets["budget"], color="gray", ls="--", label="budget")
    ax.set_xlabel("linear MACs whose activations are pruned (%)")
    ax.set_ylabel("perplexity increase (%)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_title(f"{sets['pattern']} activation pruning: projection sets of the greedy search "
                 f"(chosen: {','.join(sets['projections']) or 'none'})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "act_sets.png", dpi=120)
    plt.close(fig)


def _plots(result, plan, chosen, out: pathlib.Path) -> None:
    plt = pyplot()
    if result.get("act_sets"):
        _plot_act_sets(result["act_sets"], out)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    main_lines = {("uniform", "wanda"), ("owl", "wanda"), (chosen, "wanda"),
                  ("uniform", "sparsegpt"), (chosen, "sparsegpt")}
    lines = sorted({(r["label"], r["metric"]) for r in result["sweep"]})
    for ax, keep, title in (
            (axes[0], lambda key: key in main_lines, f"baselines vs FLOW ({chosen})"),
            (axes[1], lambda key: key[1] == "wanda" and key[0].startswith("flow"),
             "FLOW variants, Wanda")):
        for label, metric in filter(keep, lines):
            rows = sorted((r for r in result["sweep"]
                           if r["label"] == label and r["metric"] == metric),
                          key=lambda r: r["achieved"])
            ax.plot([r["achieved"] for r in rows], [r["ppl"] for r in rows], marker="o",
                    ls="--" if metric == "sparsegpt" else "-", label=f"{label} {metric}")
        ax.axhline(result["dense_ppl"], color="gray", ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("mean weight sparsity of the decoder blocks")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("perplexity (held-out Pride and Prejudice)")
    fig.suptitle("SmolLM2-135M: layer-wise N:M selection", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_sparsity.png", dpi=120)
    plt.close(fig)
    if plan is None:
        return
    blocks = plan.blocks
    x = [b["index"] for b in blocks]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    norm = plan.settings.get("normalisation", "minmax")
    ax.plot(x, [b["outlier_ratio_norm"] for b in blocks], marker="o",
            label=f"outlier ratio ({norm})")
    ax.plot(x, [b["locality_norm"] for b in blocks], marker="s",
            label=f"outlier locality ({norm})")
    for b in blocks:
        ax.annotate(b["pattern"], (b["index"], 1.04), ha="center", fontsize=7, rotation=90)
    ax.set_ylim(-0.05, 1.25)
    ax.set_xlabel("decoder block")
    ax.set_title(f"FLOW ({chosen}) at 50 %: per-block statistics and chosen N:M", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "flow_blocks.png", dpi=120)
    plt.close(fig)


def _print(result) -> None:
    print(f"dense perplexity {result['dense_ppl']:.2f} ({result['eval_windows']} x "
          f"{result['seq_len']} tokens; validation {result['dense_ppl_val']:.2f}, "
          f"{result['val_windows']} windows)")
    print(f"{'method':<30}{'metric':<10}{'sparsity':>9}{'perplexity':>12}{'validation':>12}")
    for r in result.get("sweep", []):
        print(f"{r['label']:<30}{r['metric']:<10}{r['achieved']:>9.3f}{r['ppl']:>12.2f}"
              f"{r['ppl_val']:>12.2f}")
    sel = result.get("selection", {})
    variants = sel.get("variants", {})
    for label, v in sorted(variants.items(), key=lambda kv: kv[1]["geomean_ppl_val"]):
        print(f"geomean over targets {label:<30} validation {v['geomean_ppl_val']:>9.2f} "
              f"test {v['geomean_ppl']:>9.2f}{'  <- chosen' if label == sel['chosen'] else ''}")
    for row in result.get("flow_vs_baselines", []):
        rel = ", ".join(f"{k} {v:+.1%}" for k, v in row.items() if k.startswith("vs"))
        if not rel:
            continue
        print(f"sparsity {row['sparsity']:.3f} {row['flow']} {row['metric']}: "
              f"perplexity lower by {rel}")
    hw = result.get("hw_aware")
    if hw:
        print(f"prefill of {hw['tokens']} tokens at 50 %: cycles / energy (uJ) per macro; "
              f"ratios = dense / default and fixed24 / default (> 1: FlexCiM better)")
        for r in hw["rows"]:
            p = r["prefill"]
            d, f, x = p["dense"], p["fixed24"], p["default"]
            print(f"{r['label']:<34} ppl {r['ppl']:>8.2f}  default {x['cycles']:>10,} "
                  f"{x['energy_pj'] / 1e6:>8.2f} | fixed24 {f['cycles']:>10,} "
                  f"{f['energy_pj'] / 1e6:>8.2f} | dense {d['cycles']:>10,} "
                  f"{d['energy_pj'] / 1e6:>8.2f} | latency x{d['cycles'] / x['cycles']:.2f} / "
                  f"x{f['cycles'] / x['cycles']:.2f}, energy x{d['energy_pj'] / x['energy_pj']:.2f}"
                  f" / x{f['energy_pj'] / x['energy_pj']:.2f}")
    for a in result.get("activation", []):
        print(f"activations {a['pattern']} {a['score']:<6} on {','.join(a['projections']):<22}"
              f" weights {a['weights']:<24} "
              f"{a['ppl']:.2f} ({a['increase']:+.1%})")
    sets = result.get("act_sets")
    if sets:
        for step, rows in enumerate(sets["steps"], 1):
            for r in rows:
                print(f"activations {sets['pattern']} step {step} {','.join(r['projections']):<22}"
                      f" MACs {r['mac_share']:6.1%}  validation {r['ppl']:.2f} "
                      f"({r['increase']:+.1%})  test {r['ppl_test']:.2f} "
                      f"({r['increase_test']:+.1%})")
        print(f"largest MAC share within {sets['budget']:.0%} on validation: "
              f"{','.join(sets['projections']) or 'none'}")
    for k, v in result.get("act_overhead", {}).items():
        print(f"top-k 8:16 {k}: {v['topk_ms']:.3f} ms vs linear {v['linear_ms']:.3f} ms "
              f"({v['ratio']:.2f}x)")
    if "timing_select_s" in result:
        print(f"select {result['timing_select_s']:.1f} s + sequential prune "
              f"{result['timing_prune_sequential_s']:.1f} s")
    if "total_s" in result:
        print(f"total {result['total_s'] / 60:.1f} min")


if __name__ == "__main__":
    raise SystemExit(main())
