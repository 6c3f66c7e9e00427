"""``make bench-flow`` (first part): the ``auto`` selector vs uniform N:M, OWL and FLOW.

Everything is measured in this run on the bundled SmolLM2-135M and written to
``out/bench/auto/auto_bench.json`` with a plot (``auto_vs_baselines.png``):

1. **Sensitivity** (:func:`flexcim.flow.auto.measure_sensitivity`) on the first
   ``--sens-windows`` calibration windows, once, for the levels of the ``default`` macro and of
   the fixed-2:4 macro (2:4, 12:16, 8:16, 6:16, 4:16, 2:16; ``--extra-macros flex8`` adds the
   M = 8 levels of the macro without M = 16); every plan below reuses it.
2. **Validation** (*Emma*): ``auto`` with and without its local search (granularity ``best``:
   the ``projection`` and ``block`` allocations were compared on 2026-12-01, docs/flow.md) and
   every baseline variant at
   every target, Wanda, pruned as ``flexcim flow prune`` prunes (``--prune sequential``:
   ``pipeline.SEQUENTIAL``, SparseGPT calibrated on the model pruned before each group of
   projections, Wanda one-shot; ``--prune one-shot``: every metric from the dense model's
   statistics, faster); the variant of each method with the
   lowest validation perplexity is chosen (per target for uniform: its best pattern, any N with
   M = 8 or 16; for OWL: first and last blocks dense or not).
3. **Test** (held-out *Pride and Prejudice*): the chosen variants, with Wanda and SparseGPT,
   on the same windows.  ``auto`` is also run on the patterns of the fixed-2:4 macro
   ({1:1, 2:4}).

4. **Equal accuracy** (``iso_accuracy`` in the JSON, per metric): every test plan (both
   macros' ``auto`` plans, the baselines) and the dense model are points of the demo's
   comparison (:func:`flexcim.demo.iso_accuracy` on one macro, prefill of 128 tokens;
   :func:`flexcim.demo.system_iso_accuracy` on the demo's accelerator, prefill and decode per
   token): for every plan on FlexCiM's front, the fixed-2:4 macro's best plan at equal or lower
   test perplexity; plotted in ``equal_accuracy.png``.  ``--iso-from A.json,B.json`` computes
   it over the test rows of runs made side by side (e.g. one per group of targets) without
   measuring anything.

``--text FILE`` runs the same comparison on another text (first half calibration, second half
test; the variants chosen on Austen's validation text are reused, ``--variants-from`` a
previous JSON); ``--seed`` draws other windows.
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
from flexcim.flow.select import SelectConfig

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_path, atomic_write
from flexcim.report import pyplot

log = logging.getLogger("flexcim.bench")

TARGETS = (0.25, 0.375, 0.5, 0.625, 0.75)
MACROS = ("default", "fixed24")
"""Macros whose ``auto`` plans are tested (``--extra-macros flex8`` adds the M <= 8 set)."""


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def uniform_patterns(target: float) -> list[str]:
    """Uniform N:M at exactly ``target`` with M = 8 or 16 (any N)."""
    out = []
    for m in (8, 16):
        n = (1 - target) * m
        if abs(n - round(n)) < 1e-9 and round(n) >= 1:
            out.append(f"{round(n)}:{m}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench/auto")
    parser.add_argument("--text", metavar="FILE", help="another text (default: Austen)")
    parser.add_argument("--variants-from", metavar="JSON",
                        help="with --text: reuse the variants chosen in this earlier run")
    parser.add_argument("--seed", type=int, default=0, help="window seed (default 0)")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--sens-windows", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--val-windows", type=int, default=8)
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--skip-sparsegpt", action="store_true")
    parser.add_argument("--only-sparsegpt", action="store_true",
                        help="test rows with SparseGPT only (e.g. beside a --skip-sparsegpt run)")
    parser.add_argument("--methods", default="auto,uniform,owl,flow", metavar="M,M",
                        help="methods tested (default all four)")
    parser.add_argument("--val-metric", choices=("wanda", "sparsegpt"), default="wanda",
                        help="the metric of the validation stage (default wanda)")
    parser.add_argument("--only-validation", action="store_true",
                        help="stop after the validation stage (no test window is read)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--sensitivity-from", metavar="JSON",
                        help="reuse the sensitivity of an earlier run (same model, text, seed "
                             "and windows)")
    parser.add_argument("--refine-steps", type=int, default=SelectConfig.refine_steps,
                        help="auto's local search steps (default: auto's, 48 up to 50 %%, "
                             "192 above)")
    parser.add_argument("--loss-windows", type=int, default=SelectConfig.loss_windows,
                        metavar="N", help="auto's loss windows (default: auto's, 8)")
    parser.add_argument("--significance", type=float, default=SelectConfig.significance,
                        metavar="Z", help="auto's significance (default: auto's, 2)")
    parser.add_argument("--extra-macros", default="", metavar="P,P",
                        help="presets whose auto plans are also tested, e.g. flex8 (their "
                             "levels are added to the sensitivity measurement)")
    parser.add_argument("--prune", choices=("sequential", "one-shot"), default="sequential",
                        help="how every plan is pruned for its perplexity: sequential (the "
                             "default: as flexcim flow prune does, pipeline.SEQUENTIAL: "
                             "SparseGPT on the model pruned before each projection, Wanda "
                             "one-shot) or one-shot from the dense model's statistics for "
                             "every metric (faster; the figures before 2026-12-04 night)")
    parser.add_argument("--w8a8", action="store_true",
                        help="also measure every test plan in W8A8, the macro's arithmetic "
                             "(flow.quant, scales per token, smoothed with "
                             "flow.quant.DEFAULT_SMOOTH; rows gain ppl_test_w8a8)")
    parser.add_argument("--iso-from", metavar="JSON,JSON",
                        help="measure nothing: merge the test rows of these earlier runs (same "
                             "model, text, seed and windows) and compute their equal-accuracy "
                             "comparison into --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.iso_from:
        return merge([p for p in args.iso_from.split(",") if p.strip()], pathlib.Path(args.out))
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"auto", "uniform", "owl", "flow"})
    if unknown or not methods:
        raise FlexCimError(f"--methods {args.methods!r}: expected some of auto, uniform, owl, "
                           "flow")
    if args.skip_sparsegpt and args.only_sparsegpt:
        raise FlexCimError("--skip-sparsegpt and --only-sparsegpt exclude each other")
    if args.only_validation and (args.variants_from or args.text):
        raise FlexCimError("--only-validation needs the validation text: not with "
                           "--variants-from or --text")
    if args.val_metric == "sparsegpt" and args.skip_sparsegpt:
        raise FlexCimError("--val-metric sparsegpt needs SparseGPT: not with --skip-sparsegpt")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from flexcim.flow import auto, calib, pipeline
    from flexcim.flow.eval import perplexity
    from flexcim.flow.model import linear_layers
    from flexcim.flow.quant import DEFAULT_SMOOTH, W8A8Config, w8a8
    from flexcim.flow.text import token_windows
    from flexcim.spec.config import PRESETS

    started = time.perf_counter()
    session = pipeline.load(None, args.text)
    model = session.model
    result = {"model": session.lm.name, "text": session.corpus.source, "seed": args.seed,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python bench/auto_bench.py " + " ".join(argv or sys.argv[1:]),
              "calib_windows": args.calib_windows, "prune": args.prune,
              "sens_windows": args.sens_windows,
              "eval_windows": args.eval_windows, "val_windows": args.val_windows,
              "load_average_at_start": os.getloadavg()[0]}
    cw = pipeline.calibration_windows(session, count=args.calib_windows, seed=args.seed)
    texts = {} if args.only_validation else {"test": ("held-out", args.eval_windows)}
    if "emma" in session.corpus.evaluation and not args.variants_from:
        texts["val"] = ("emma", args.val_windows)
    windows = {key: token_windows(session.lm.tokenizer, session.corpus.evaluation[name],
                                  seq_len=128, count=count, seed=args.seed)
               for key, (name, count) in texts.items()}
    layers = linear_layers(model)
    dense_weights = {n: m.weight.detach().clone() for n, m in layers.items()}

    def save() -> None:
        atomic_write(out / "auto_bench.json", json.dumps(result, indent=1) + "\n")

    def restore() -> None:
        for n, m in layers.items():
            m.weight.data.copy_(dense_weights[n])

    one_shot_sparsegpt = args.prune == "one-shot" and not args.skip_sparsegpt
    stats = calib.calibrate(model, cw, hessian=one_shot_sparsegpt,
                            keep_hessians=one_shot_sparsegpt)
    result["dense"] = {key: perplexity(model, w, progress=False) for key, w in windows.items()}
    log.info("dense perplexity %s", result["dense"])
    macros = [*MACROS, *(p for p in args.extra_macros.split(",") if p.strip())]
    unknown = [p for p in macros if p not in PRESETS]
    if unknown:
        raise FlexCimError(f"--extra-macros: unknown preset {unknown[0]!r}; expected some of "
                           f"{', '.join(PRESETS)}")
    widths = sorted({m.in_features for m in layers.values()})
    measured = sorted({p for name in macros for p in auto.levels_of(PRESETS[name].patterns,
                                                                      widths)},
                      key=lambda p: (p.sparsity, p.m))
    if args.sensitivity_from:  # an earlier run's measurement, if it is the same one
        earlier = json.loads(pathlib.Path(args.sensitivity_from).read_text())
        same = {k: earlier.get(k) for k in ("model", "text", "seed", "calib_windows",
                                             "sens_windows")}
        if same != {k: result[k] for k in same}:
            raise FlexCimError(f"--sensitivity-from {args.sensitivity_from}: measured with "
                               f"{same}, not with this run's settings")
        sens = auto.Sensitivity(**earlier["sensitivity"]).restrict(measured)
        result["sensitivity_from"] = args.sensitivity_from
    else:
        sens = auto.measure_sensitivity(model, cw[: args.sens_windows], tuple(measured))
    result["sensitivity"] = sens.to_dict()
    save()

    made: dict = {}  # (method, variant, target, macro) -> plan: validation's serve the test

    def plan_for(method: str, variant: str, target: float, macro: str = "default",
                 metric: str = "wanda"):
        # auto's choice between its candidates prunes them as the plan will be pruned
        key = (method, variant, target, macro, metric if method == "auto" else "wanda")
        if key not in made:
            made[key] = make(*key)
        return made[key]

    def make(method: str, variant: str, target: float, macro: str, metric: str):
        if method == "auto":  # variant: granularity, "-norefine" without the local search
            granularity, _, norefine = variant.partition("-")
            return pipeline.make_plan(model, cw, SelectConfig(
                method="auto", target=target, hw_config=PRESETS[macro],
                granularity=granularity, refine_steps=0 if norefine else args.refine_steps,
                significance=args.significance, loss_windows=args.loss_windows),
                sensitivity=sens, progress=False, metric=metric)
        if method == "uniform":
            return pipeline.make_plan(model, None, SelectConfig(method="uniform",
                                                                pattern=variant), stats=stats,
                                      progress=False)
        if method == "owl":
            return pipeline.make_plan(model, None, SelectConfig(
                method="owl", target=target, keep_ends_dense=variant == "ends-dense"),
                stats=stats, progress=False)
        return pipeline.make_plan(model, None, SelectConfig(method="flow", target=target),
                                  stats=stats, progress=False)

    def measure(plan, metric: str, keys, macro: str = "default") -> dict:
        if args.prune == "sequential" and pipeline.SEQUENTIAL[metric]:
            pipeline.apply_plan(model, plan, cw, metric=metric, progress=False)
        else:
            pipeline.apply_plan(model, plan, None, metric=metric, stats=stats, progress=False)
        pipeline.check_plan(model, plan)
        row = {key: perplexity(model, windows[key], progress=False) for key in keys}
        if "test" in keys:  # its costs on every macro, for the equal-accuracy comparison
            row["energy_plan"] = pipeline.energy_plan(model, plan)
        if args.w8a8 and "test" in keys:
            # the accumulator of the macro the plan is for (baselines: the default macro's)
            with w8a8(model, W8A8Config(acc_bits=PRESETS[macro].acc_bits,
                                        smooth=DEFAULT_SMOOTH), calib=cw):
                row["test_w8a8"] = perplexity(model, windows["test"], progress=False)
        restore()
        return row

    variants = {"auto": ["best", "best-norefine"], "owl": ["ends-pruned", "ends-dense"],
                "flow": ["code-ends-dense"]}
    rows = []
    # 2. validation: every variant of every method at every target (Wanda)
    chosen: dict = {}
    if "val" in windows:
        for t in targets:
            candidates = {**variants, "uniform": uniform_patterns(t)}
            for method, names in candidates.items():
                if method not in methods:
                    continue
                for v in names:
                    try:
                        plan = plan_for(method, v, t, metric=args.val_metric)
                    except FlexCimError as exc:
                        log.info("%s %s at %g: %s", method, v, t, exc)
                        continue
                    row = {"method": method, "variant": v, "target": t,
                           "metric": args.val_metric, "macro": "default",
                           "achieved": plan.achieved_sparsity,
                           "patterns": sorted(set(plan.layers.values())),
                           "ppl_val": measure(plan, args.val_metric, ["val"])["val"]}
                    if method == "auto":
                        row.update(_auto_record(plan))
                    rows.append(row)
                    log.info("[%5.0f s] val %-8s %-16s %.3f: %.3f", time.perf_counter() - started,
                             method, v, t, row["ppl_val"])
            result["validation"] = rows
            save()
        if args.only_validation:
            result["total_s"] = time.perf_counter() - started
            save()
            return 0
        for method, names in variants.items():
            if method not in methods:
                continue
            chosen[method] = min(names, key=lambda v, m=method: _geomean(
                r["ppl_val"] for r in rows if r["method"] == m and r["variant"] == v))
        if "uniform" in methods:
            chosen["uniform"] = {str(t): min(
                (r for r in rows if r["method"] == "uniform" and r["target"] == t),
                key=lambda r: r["ppl_val"])["variant"] for t in targets}
    else:
        previous = json.loads(pathlib.Path(args.variants_from).read_text())["chosen"] \
            if args.variants_from else None
        if previous is None:
            raise FlexCimError("--text without validation windows needs --variants-from")
        chosen = previous
    result["chosen"] = chosen
    log.info("chosen on validation: %s", chosen)

    # 3. test: the chosen variants, Wanda and SparseGPT; auto also on fixed24's patterns
    tests = []
    metrics = [m for m in ("wanda", "sparsegpt") if not (
        (m == "sparsegpt" and args.skip_sparsegpt) or (m == "wanda" and args.only_sparsegpt))]
    for t in targets:
        plans = [*(("auto", chosen.get("auto"), name) for name in macros),
                 ("uniform", chosen.get("uniform", {}).get(str(t)), "default"),
                 ("owl", chosen.get("owl"), "default"), ("flow", chosen.get("flow"), "default")]
        for method, v, macro in plans:
            if method not in methods:
                continue
            for metric in metrics:
                try:
                    plan = plan_for(method, v, t, macro, metric)
                except FlexCimError as exc:
                    log.info("%s %s on %s at %g: %s", method, v, macro, t, exc)
                    break
                measured = measure(plan, metric, ["test"], macro)
                energy_plan = measured.pop("energy_plan")
                row = {"method": method, "variant": v, "macro": macro, "target": t,
                       "metric": metric, "achieved": plan.achieved_sparsity,
                       "patterns": sorted(set(plan.layers.values())),
                       **{f"ppl_{k}": p for k, p in measured.items()},
                       "energy_plan": energy_plan}
                if method == "auto":
                    row.update(_auto_record(plan))
                tests.append(row)
                log.info("[%5.0f s] test %-8s %-16s %-8s %-9s %.3f: %.3f",
                         time.perf_counter() - started, method, v, macro, metric, t,
                         row["ppl_test"])
        result["test"] = tests
        save()
    result["summary"] = summary(tests)
    result["iso_accuracy"] = iso_accuracy(tests, result["dense"]["test"])
    _log_iso(result["iso_accuracy"])
    result["total_s"] = time.perf_counter() - started
    result["load_average_at_end"] = os.getloadavg()[0]
    save()
    _plot(result, out)
    _plot_iso(result["iso_accuracy"], out)
    for r in result["summary"]:
        log.info("%s", r)
    return 0


def _auto_record(plan) -> dict:
    """What ``auto`` decided on its calibration windows: the candidate kept, the uniform gate
    and the local search's held-out check (``settings``)."""
    refine = plan.settings.get("refine") or {}
    return {"chosen": plan.settings["chosen"], "gate": plan.settings.get("uniform_gate", {}),
            "search": {k: refine[k] for k in ("kept", "loss_before", "loss_after", "guard")
                       if k in refine}}


def summary(tests: list[dict]) -> list[dict]:
    """auto (default macro) vs each baseline at each target and metric: ``1 - auto / base``."""
    rows = []
    for a in tests:
        if a["method"] != "auto" or a["macro"] != "default":
            continue
        row = {"target": a["target"], "metric": a["metric"], "auto": a["ppl_test"]}
        if "ppl_test_w8a8" in a:
            row["auto w8a8"] = a["ppl_test_w8a8"]
        for b in tests:
            if (b["target"], b["metric"]) == (a["target"], a["metric"]) and b is not a:
                name = b["method"] if b["macro"] == "default" else f"{b['method']}-{b['macro']}"
                row[name] = b["ppl_test"]
                row[f"vs {name}"] = 1 - a["ppl_test"] / b["ppl_test"]
                if "ppl_test_w8a8" in a and "ppl_test_w8a8" in b:
                    row[f"{name} w8a8"] = b["ppl_test_w8a8"]
                    row[f"vs {name} w8a8"] = 1 - a["ppl_test_w8a8"] / b["ppl_test_w8a8"]
        rows.append(row)
    return rows


def point_name(row: dict) -> str:
    """A test row's name among the equal-accuracy points: method, macro, sparsity."""
    macro = "" if row["macro"] == "default" else f" on {row['macro']}"
    return f"{row['method']}{macro} ({row['achieved']:.1%})"


def iso_accuracy(tests: list[dict], dense_ppl: float) -> dict:
    """Per metric, the demo's equal-accuracy comparison on this run's test plans: every plan
    measured with that metric (``auto`` on both macros, the baselines) and the dense model are
    points; for every plan on FlexCiM's front, the fixed-2:4 macro's best plan at equal or lower
    test perplexity (:func:`flexcim.demo.iso_accuracy`: prefill of 128 tokens on one macro;
    :func:`flexcim.demo.system_iso_accuracy`: the demo's accelerator, prefill and decode per
    token).  Ratios are fixed24 / FlexCiM (> 1: FlexCiM better)."""
    from flexcim import demo

    tests = [r for r in tests if "energy_plan" in r]
    if not tests:
        return {}
    dense_plan = demo.dense_energy_plan(tests[0]["energy_plan"])
    out = {}
    for metric in sorted({r["metric"] for r in tests}):
        plans = {"dense": dense_plan}
        points = [{"name": "dense", "ppl": dense_ppl, "prefill": demo.prefill_costs(dense_plan)}]
        for r in tests:
            if r["metric"] == metric:
                plans[point_name(r)] = r["energy_plan"]
                points.append({"name": point_name(r), "ppl": r["ppl_test"],
                               "prefill": demo.prefill_costs(r["energy_plan"])})
        out[metric] = {"points": points,
                       "macro": demo.iso_accuracy(points),
                       "system": demo.system_iso_accuracy(points, plans, demo.SYSTEM_MODELS[0])}
    return out


def _log_iso(iso: dict) -> None:
    for metric, table in iso.items():
        log.info("equal accuracy, %s (fixed24 / FlexCiM): plan, ppl | fixed24's fastest, "
                 "prefill ratio | fixed24's most frugal decode, decode energy ratio", metric)
        for r in table["system"]:
            log.info("  %-28s %8.2f | %-28s %5.2fx | %-28s %5.2fx", r["plan"], r["ppl"],
                     r["reference_fastest"], r["prefill_ratio"], r["reference_frugal"],
                     r["decode_energy_ratio"])


def merge(paths: list[str], out: pathlib.Path) -> int:
    """``--iso-from``: the test rows of earlier runs of the same model, text, seed and windows
    (e.g. two targets' halves run side by side), with the equal-accuracy comparison of them all,
    written to ``out/auto_bench.json``."""
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(pathlib.Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise FlexCimError(f"--iso-from {path}: not a readable auto_bench JSON ({exc})") \
                from None
    keys = ("model", "text", "seed", "calib_windows", "eval_windows", "prune")
    settings = [{k: run.get(k) for k in keys} for run in runs]
    joined = ",".join(paths)
    for path, run, setting in zip(paths, runs, settings, strict=True):
        if "test" not in run or "dense" not in run:
            raise FlexCimError(f"--iso-from {path}: no test rows (expected an auto_bench JSON "
                               "with a test stage)")
        if setting != settings[0]:
            raise FlexCimError(f"--iso-from {path}: measured with {setting}, not with "
                               f"{paths[0]}'s {settings[0]}")
    tests = [r for run in runs for r in run["test"]]
    if not any("energy_plan" in r for r in tests):
        raise FlexCimError(f"--iso-from {joined}: no test row has its energy plan "
                           "(expected runs of this script from 2026-12-05 on)")
    seen: set = set()
    for r in tests:
        key = (r["metric"], point_name(r))
        if key in seen:
            raise FlexCimError(f"--iso-from {joined}: {key[1]} with {key[0]} is in more than "
                               "one run (expected each plan once)")
        seen.add(key)
    result = {**settings[0], "dense": runs[0]["dense"],
              "merged_from": list(paths), "command": "python bench/auto_bench.py "
              + " ".join(sys.argv[1:]), "test": tests, "summary": summary(tests),
              "iso_accuracy": iso_accuracy(tests, runs[0]["dense"]["test"])}
    _log_iso(result["iso_accuracy"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "auto_bench.json", json.dumps(result, indent=1) + "\n")
    _plot(result, out)
    _plot_iso(result["iso_accuracy"], out)
    return 0


def _plot_iso(iso: dict, out: pathlib.Path) -> None:
    """``equal_accuracy.png``: per metric and macro, every point's perplexity vs its prefill
    cycles there, and that macro's front (lower left is better)."""
    if not iso:
        return
    from flexcim.demo import pareto_front

    plt = pyplot()
    macros = ("default", "fixed24")
    fig, axes = plt.subplots(len(iso), len(macros), figsize=(11, 4 * len(iso)), squeeze=False,
                             sharey="row")
    for row, (metric, table) in zip(axes, iso.items(), strict=True):
        points = table["points"]
        for ax, macro in zip(row, macros, strict=True):
            for p in points:
                ax.plot(p["prefill"][macro]["cycles"] / 1e6, p["ppl"], "o", ms=4,
                        color="C1" if "fixed24" in p["name"] else "C0")
            front = pareto_front(points, macro)
            ax.step([p["prefill"][macro]["cycles"] / 1e6 for p in front],
                    [p["ppl"] for p in front], where="post", color="black", alpha=0.35, lw=3)
            ax.set_yscale("log")
            ax.set_title(f"{metric}: every plan on `{macro}` (orange: fixed-2:4's own plans; "
                         "grey: the front)", fontsize=9)
            ax.set_xlabel("prefill cycles, 128 tokens (millions)")
        row[0].set_ylabel("test perplexity")
    fig.tight_layout()
    with atomic_path(out / "equal_accuracy.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def _plot(result: dict, out: pathlib.Path) -> None:
    plt = pyplot()
    metrics = sorted({r["metric"] for r in result["test"]})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        series: dict = {}
        for r in result["test"]:
            if r["metric"] == metric:
                label = r["method"] if r["macro"] == "default" else f"{r['method']} on {r['macro']}"
                series.setdefault(label, []).append((r["achieved"], r["ppl_test"]))
        for label, pts in series.items():
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("mean weight sparsity")
        ax.set_ylabel("test perplexity")
        ax.set_title(f"{metric}, {result['text']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "auto_vs_baselines.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FlexCimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
