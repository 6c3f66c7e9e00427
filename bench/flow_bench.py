"""``make bench-flow``: FLOW vs OWL vs uniform on SmolLM2, activation pruning, timings.

Everything is measured in this run on the bundled SmolLM2-135M and Jane Austen text and written to
``out/bench/flow/flow_bench.json`` with two plots:

* perplexity (held-out Pride and Prejudice) vs mean weight sparsity for uniform, OWL and FLOW
  (both M directions) with Wanda, and FLOW with SparseGPT;
* per-block outlier ratio and locality with the N:M FLOW chose at 50 %.

To compare many plans on one calibration the sweep prunes one-shot from the dense model's
statistics (``apply_plan(stats=...)``); ``flexcim flow prune`` prunes block by block on the
already-pruned model's activations instead (timed here once, as select + prune).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import time

import torch

log = logging.getLogger("flexcim.bench")


# label -> (label, method, metric, SelectConfig options); "flow-code" = the release's M direction
CONFIGS = {
    "uniform": ("uniform wanda", "uniform", "wanda", {}),
    "owl": ("owl wanda", "owl", "wanda", {}),
    "flow-code": ("flow-code wanda", "flow", "wanda", {"m_direction": "code"}),
    "flow-figure": ("flow-figure wanda", "flow", "wanda", {"m_direction": "figure"}),
    "flow-sparsegpt": ("flow-code sparsegpt", "flow", "sparsegpt", {"m_direction": "code"}),
    "flow-code-ext": ("flow-code-extended wanda", "flow", "wanda",
                      {"m_direction": "code", "candidates": "extended"}),
    "flow-figure-ext": ("flow-figure-extended wanda", "flow", "wanda",
                        {"m_direction": "figure", "candidates": "extended"}),
    "flow-code-ends": ("flow-code-ends-dense wanda", "flow", "wanda",
                       {"m_direction": "code", "keep_ends_dense": True}),
}


def _restore(model, state):
    model.load_state_dict(state)


def _overhead(repeats: int = 30) -> dict:
    """Time of the 8:16 top-k pre-hook vs the dense linear it precedes (128 tokens)."""
    from flexcim.flow.act import topk_activations
    from flexcim.golden.nm import NMPattern

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench/flow")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sparsities", default="0.25,0.375,0.5,0.625")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"sweep configurations (default all: {', '.join(CONFIGS)})")
    parser.add_argument("--skip-act", action="store_true", help="skip activation pruning")
    parser.add_argument("--skip-timing", action="store_true",
                        help="skip the sequential select + prune timing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from flexcim.flow import act, calib, pipeline
    from flexcim.flow.select import SelectConfig, parse_candidates

    t0 = time.perf_counter()
    session = pipeline.load()
    model = session.model
    result = {"model": session.lm.name, "text": session.corpus.source,
              "calib_windows": args.calib_windows, "eval_windows": args.eval_windows,
              "seq_len": args.seq_len, "load_s": time.perf_counter() - t0,
              "load_average_at_start": os.getloadavg()[0]}
    cw = pipeline.calibration_windows(session, count=args.calib_windows, seq_len=args.seq_len)
    ev = lambda: pipeline.evaluate(session, count=args.eval_windows,  # noqa: E731
                                   seq_len=args.seq_len, progress=False)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    configs = [CONFIGS[name] for name in args.configs.split(",")]
    hessian = any(metric == "sparsegpt" for _, _, metric, _ in configs)
    stats = calib.calibrate(model, cw, hessian=hessian, keep_hessians=hessian)
    result["calibration_s"] = time.perf_counter() - t0
    result["dense_ppl"] = ev()
    log.info("dense perplexity %.3f", result["dense_ppl"])

    from flexcim.flow.model import decoder_blocks
    from flexcim.flow.select import all_outliers

    outliers = all_outliers(decoder_blocks(model), pipeline.layer_scores(model, stats, "wanda"),
                            SelectConfig(method="uniform", pattern="4:8").hyper_m)
    sweep = []
    plans = {}
    for s in (float(v) for v in args.sparsities.split(",")):
        for label, method, metric, extra in configs:
            try:
                if method == "uniform":
                    config = SelectConfig(method="uniform", pattern=f"{round((1 - s) * 8)}:8")
                else:
                    extra = dict(extra)
                    if "candidates" in extra:
                        extra["candidates"] = parse_candidates(extra["candidates"])
                    config = SelectConfig(method=method, target=s, **extra)
                plan = pipeline.make_plan(model, None, config, stats=stats, progress=False,
                                          outliers=outliers)
            except ValueError as exc:
                log.info("%s at %.3f: %s", label, s, exc)
                continue
            t1 = time.perf_counter()
            pipeline.apply_plan(model, plan, None, metric=metric, stats=stats)
            pipeline.check_plan(model, plan)
            prune_s = time.perf_counter() - t1
            ppl = ev()
            _restore(model, dense_state)
            row = {"label": label, "method": method, "metric": metric, "target": s,
                   "achieved": plan.achieved_sparsity, "ppl": ppl, "prune_s": prune_s,
                   "patterns": [b["pattern"] for b in plan.blocks], "message": plan.message}
            sweep.append(row)
            plans[(label, s)] = plan
            log.info("%-22s sparsity %.3f: perplexity %.3f", label, plan.achieved_sparsity, ppl)
    result["sweep"] = sweep
    (out / "flow_bench.json").write_text(json.dumps(result, indent=1) + "\n")  # partial

    # each FLOW variant vs the baselines at each sparsity: 1 - ppl_flow / ppl_baseline
    summary = []
    for s in sorted({r["target"] for r in sweep}):
        at = {r["label"]: r["ppl"] for r in sweep if r["target"] == s}
        for label, ppl in at.items():
            if not label.startswith("flow"):
                continue
            row = {"sparsity": s, "flow": label, "ppl": ppl}
            for base in ("uniform wanda", "owl wanda"):
                if base in at:
                    row[f"vs {base}"] = 1 - ppl / at[base]
            summary.append(row)
    result["flow_vs_baselines"] = summary

    if not args.skip_act:
        # Activation pruning alone and on top of the FLOW 50 % plan
        acts = []
        flow50 = plans.get(("flow-figure wanda", 0.5)) or plans.get(("flow-code wanda", 0.5))
        for weight_plan in (None, flow50):
            if weight_plan is not None:
                pipeline.apply_plan(model, weight_plan, None, metric="wanda", stats=stats)
            base = result["dense_ppl"] if weight_plan is None else ev()
            for pattern, score in (("8:16", "abs"), ("8:16", "weight"), ("4:8", "abs"),
                                   ("2:4", "abs")):
                with act.activation_pruning(model, act.ActConfig(pattern=pattern, score=score)):
                    ppl = ev()
                weights = ("dense" if weight_plan is None else
                           f"flow-{weight_plan.settings['m_direction']} 0.5 wanda")
                acts.append({"weights": weights,
                             "pattern": pattern, "score": score, "ppl_without": base, "ppl": ppl,
                             "increase": ppl / base - 1})
                log.info("activations %s (%s), weights %s: %.3f (%+.1f%%)", pattern, score,
                         acts[-1]["weights"], ppl, 100 * acts[-1]["increase"])
            _restore(model, dense_state)
        # per-projection-kind sensitivity at 8:16 and skipping the most sensitive 10 %
        sens = act.sensitivity(model, cw[:4], act.ActConfig(pattern="8:16"))
        kinds = {}
        for name, v in sens.items():
            kinds.setdefault(act.projection_kind(name), []).append(v)
        result["act_sensitivity_by_kind"] = {k: sum(v) / len(v) for k, v in kinds.items()}
        skip = act.skip_most_sensitive(sens, 0.1)
        with act.activation_pruning(model, act.ActConfig(pattern="8:16", skip=skip)):
            ppl = ev()
        acts.append({"weights": "dense", "pattern": "8:16", "score": "abs", "skip_budget": 0.1,
                     "skipped": list(skip), "ppl_without": result["dense_ppl"], "ppl": ppl,
                     "increase": ppl / result["dense_ppl"] - 1})
        result["activation"] = acts
        result["act_overhead"] = _overhead()
        (out / "flow_bench.json").write_text(json.dumps(result, indent=1) + "\n")  # partial

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
        result["ppl_flow50_sequential"] = ev()
        _restore(model, dense_state)
    result["load_average_at_end"] = os.getloadavg()[0]
    (out / "flow_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    _plots(result, plans.get(("flow-figure wanda", 0.5)) or plans.get(("flow-code wanda", 0.5)),
           out)
    _print(result)
    return 0


def _plots(result, plan, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label in sorted({r["label"] for r in result["sweep"]}):
        rows = sorted((r for r in result["sweep"] if r["label"] == label),
                      key=lambda r: r["achieved"])
        ax.plot([r["achieved"] for r in rows], [r["ppl"] for r in rows], marker="o", label=label)
    ax.axhline(result["dense_ppl"], color="gray", ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("mean weight sparsity of the decoder blocks")
    ax.set_ylabel("perplexity (held-out Pride and Prejudice)")
    ax.set_title("SmolLM2-135M: layer-wise N:M selection")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_sparsity.png", dpi=120)
    plt.close(fig)
    if plan is None:
        return
    blocks = plan.blocks
    x = [b["index"] for b in blocks]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.plot(x, [b["outlier_ratio_norm"] for b in blocks], marker="o", label="outlier ratio (norm)")
    ax.plot(x, [b["locality_norm"] for b in blocks], marker="s", label="outlier locality (norm)")
    for b in blocks:
        ax.annotate(b["pattern"], (b["index"], 1.04), ha="center", fontsize=7, rotation=90)
    ax.set_ylim(-0.05, 1.25)
    ax.set_xlabel("decoder block")
    ax.set_title("FLOW at 50 %: per-block statistics and chosen N:M", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "flow_blocks.png", dpi=120)
    plt.close(fig)


def _print(result) -> None:
    print(f"dense perplexity {result['dense_ppl']:.2f} ({result['eval_windows']} x "
          f"{result['seq_len']} tokens)")
    print(f"{'method':<24}{'sparsity':>9}{'perplexity':>12}")
    for r in result["sweep"]:
        print(f"{r['label']:<24}{r['achieved']:>9.3f}{r['ppl']:>12.2f}")
    for row in result["flow_vs_baselines"]:
        rel = ", ".join(f"{k} {v:+.1%}" for k, v in row.items() if k.startswith("vs"))
        print(f"sparsity {row['sparsity']:.3f} {row['flow']}: perplexity lower by {rel}")
    for a in result.get("activation", []):
        print(f"activations {a['pattern']} {a['score']:<6} weights {a['weights']:<16} "
              f"{a['ppl']:.2f} ({a['increase']:+.1%})")
    for k, v in result.get("act_overhead", {}).items():
        print(f"top-k 8:16 {k}: {v['topk_ms']:.3f} ms vs linear {v['linear_ms']:.3f} ms "
              f"({v['ratio']:.2f}x)")
    if "timing_select_s" in result:
        print(f"select {result['timing_select_s']:.1f} s + sequential prune "
              f"{result['timing_prune_sequential_s']:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
