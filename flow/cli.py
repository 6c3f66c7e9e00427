"""``flexcim flow select|prune|act-eval|export``: FLOW on a real model from the command line."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import time

from flexcim.errors import FlexCimError
from flexcim.fileio import check_output

log = logging.getLogger("flexcim.flow")

# Choices repeated here so `flexcim --help` does not import torch (tests pin them to the source).
METRICS = ("magnitude", "wanda", "sparsegpt")
METHODS = ("auto", "uniform", "owl", "flow")
M_DIRECTIONS = ("figure", "code")
NORMALISATIONS = ("minmax", "zscore", "rank")
ACT_DEFAULT = ("q", "down")  # flexcim.flow.act.DEFAULT_PROJECTIONS
ARITHMETICS = ("float", "w8a8")  # flexcim.flow.quant.ARITHMETICS
GRANULARITIES = ("token", "tensor")  # flexcim.flow.quant.GRANULARITIES, the default first
DEFAULT_SMOOTH = 0.5  # flexcim.flow.quant.DEFAULT_SMOOTH
EVAL_TEXTS = ("held-out", "emma")  # flexcim.flow.text: the default corpus's evaluation texts
PRUNE_RECORD = "flexcim-prune.json"
"""What ``flow prune`` writes beside the weights; it marks a folder that a rerun may replace."""


def _session(args):
    import torch
    from flexcim.flow import pipeline

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, args.threads)))
    return pipeline.load(args.model, args.text)


def _calib_count(args, metric: str) -> int:
    """``--calib-windows``, else the default for pruning with ``metric``."""
    from flexcim.flow import pipeline

    if args.calib_windows is not None:
        return args.calib_windows
    return pipeline.default_calib_windows(metric)


def _calib(session, args, metric: str = "wanda"):
    from flexcim.flow import pipeline

    return pipeline.calibration_windows(session, count=_calib_count(args, metric),
                                        seq_len=args.seq_len, seed=args.seed)


def _hw_config(spec: str | None):
    if spec is None:
        return None
    from flexcim.spec.config import PRESETS, HwConfig

    if spec in PRESETS:
        return PRESETS[spec]
    if spec == "default":
        from flexcim.spec.config import DEFAULT

        return DEFAULT
    if not os.path.isfile(spec):
        raise FlexCimError(f"--hw-config must be a preset ({', '.join(['default', *PRESETS])}) "
                           f"or a JSON file, not {spec!r}")
    return HwConfig.load(spec)


def _smooth(args: argparse.Namespace) -> float | None:
    """The SmoothQuant alpha of ``--smooth ALPHA|off`` (default :data:`DEFAULT_SMOOTH`; None:
    off)."""
    if args.smooth is None:
        return DEFAULT_SMOOTH
    from flexcim.flow.quant import parse_smooth

    return parse_smooth(args.smooth)


def _quant(args: argparse.Namespace):
    """The W8A8 config of ``--arith w8a8`` (None for float), checked before the model loads."""
    alpha = _smooth(args)
    if args.arith == "float":
        if args.act_granularity is not None:
            raise FlexCimError("--act-granularity needs --arith w8a8")
        if args.smooth not in (None, "off"):
            raise FlexCimError("--smooth needs --arith w8a8")
        return None
    from flexcim.flow.quant import W8A8Config
    from flexcim.spec.config import DEFAULT

    hw = _hw_config(args.hw_config) or DEFAULT
    return W8A8Config(act_granularity=args.act_granularity or GRANULARITIES[0],
                      acc_bits=hw.acc_bits, smooth=alpha)


def _fit_quant(quant, args, session):
    """The W8A8 config for the loaded model: the default smoothing applies to Llama-style
    models only (others run W8A8 unsmoothed, said in the log); an explicit ``--smooth ALPHA``
    on another architecture is refused in one line."""
    if quant is None or quant.smooth is None:
        return quant
    from flexcim.flow.quant import smoothable

    if smoothable(session.model):
        return quant
    kind = type(session.model).__name__
    if args.smooth is not None:
        raise FlexCimError(f"--smooth {args.smooth} needs a Llama-style model (input_layernorm, "
                           f"q/k/v and gate/up/down projections), not {kind}; use --smooth off")
    log.info("%s is not Llama-style: W8A8 without SmoothQuant smoothing", kind)
    return dataclasses.replace(quant, smooth=None)


def _arith_record(session, args, quant) -> dict:
    """Check the evaluation text and the accumulator on the loaded model; the JSON fields."""
    if args.eval_text not in session.corpus.evaluation:
        raise FlexCimError(f"--eval-text must be one of {list(session.corpus.evaluation)} for "
                           f"this text, not {args.eval_text!r}")
    if quant is None:
        return {"arith": "float", "eval_text": args.eval_text}
    from flexcim.flow.model import linear_layers
    from flexcim.flow.quant import check_accumulator

    check_accumulator(linear_layers(session.model), quant.acc_bits)
    return {**quant.to_dict(), "hw_config": args.hw_config or "default",
            "eval_text": args.eval_text}


def _sens_cache(value: str | None) -> str | None:
    """The sensitivity cache folder of ``--sens-cache`` (None: off)."""
    if value == "off":
        return None
    if value is not None:
        return value
    from flexcim.flow.auto import sensitivity_cache

    return str(sensitivity_cache())


def _select(args: argparse.Namespace) -> int:
    from flexcim.flow import pipeline
    from flexcim.flow.select import SelectConfig, parse_candidates

    config = SelectConfig(
        method=args.method, target=args.target_sparsity, pattern=args.pattern,
        candidates=parse_candidates(args.candidates), hyper_m=args.hyper_m,
        m_direction=args.m_direction, normalisation=args.normalisation,
        keep_ends_dense=args.keep_ends_dense,
        hw_config=_hw_config(args.hw_config), hw_weight=args.hw_weight,
        granularity=args.granularity, sens_windows=args.sens_windows,
        refine_steps=args.refine_steps, loss_windows=args.loss_windows,
        significance=args.significance, lm_head=args.lm_head,
        sens_cache=_sens_cache(args.sens_cache),
    )
    check_output(args.output, "plan output (-o)", inputs=(args.model, args.text, args.hw_config))
    start = time.perf_counter()
    session = _session(args)
    # auto measures the loss on calibration text whatever the pruning metric
    needs_text = args.metric != "magnitude" or args.method == "auto"
    windows = _calib(session, args, args.metric) if needs_text else None
    plan = pipeline.make_plan(session.model, windows, config, metric=args.metric)
    plan.settings.update(model=session.lm.name, calib_windows=_calib_count(args, args.metric),
                         seq_len=args.seq_len, seed=args.seed,
                         seconds=round(time.perf_counter() - start, 1))
    plan.save(args.output)
    log.info("wrote %s: %s, achieved sparsity %.4f%s", args.output, args.method,
             plan.achieved_sparsity, f" ({plan.message})" if plan.message else "")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from flexcim.flow import pipeline
    from flexcim.flow.select import Plan

    _check_count(args.eval_windows, "--eval-windows", minimum=0)
    check_output(args.output, "model output (-o)", folder=True, marker=PRUNE_RECORD,
                 inputs=(args.model, args.text, args.plan))
    plan = Plan.load(args.plan)
    quant = _quant(args)
    metric = args.metric or plan.settings.get("metric", "wanda")
    start = time.perf_counter()
    session = _session(args)
    quant = _fit_quant(quant, args, session)
    arith = _arith_record(session, args, quant) if args.eval_windows else {}
    smoothing = args.eval_windows and quant is not None and quant.smooth is not None
    windows = (None if metric == "magnitude" and not smoothing and not args.refit_norms
               else _calib(session, args, metric))
    teacher = copy.deepcopy(session.model) if args.refit_norms else None  # the dense model
    pipeline.apply_plan(session.model, plan, windows, metric=metric)
    pipeline.check_plan(session.model, plan)
    refit = None
    if teacher is not None:
        from flexcim.flow.refit import refit_norms

        refit = refit_norms(session.model, teacher, windows)
        del teacher
        log.info("refit the norm gains (%d parameters): KL to the dense model %.4f -> %.4f "
                 "nats per token (%.0f s)", refit["parameters"], refit["kl_before"],
                 refit["kl_after"], refit["seconds"])
    seconds = time.perf_counter() - start
    record = {"plan": os.path.abspath(args.plan), "metric": metric, "prune_seconds": seconds,
              "calib_windows": None if windows is None else int(windows.shape[0]),
              "order": "sequential" if pipeline.SEQUENTIAL[metric] else "one-shot",
              "achieved_sparsity": plan.achieved_sparsity, "model": session.lm.name,
              "refit_norms": refit}
    if args.eval_windows:
        # before anything is written: a failure here leaves no model folder behind
        record.update(arith)
        record["perplexity"] = pipeline.evaluate(session, count=args.eval_windows,
                                                 seq_len=args.seq_len, text=args.eval_text,
                                                 quant=quant, calib=windows)
        log.info("perplexity (%s) on %d %s windows: %.3f", record["arith"], args.eval_windows,
                 args.eval_text, record["perplexity"])
    record["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    pipeline.save_model(session, args.output,
                        files={PRUNE_RECORD: json.dumps(record, indent=1) + "\n"})
    log.info("wrote %s: every pruned projection satisfies its pattern (%.1f s)", args.output,
             seconds)
    return 0


def _act_eval(args: argparse.Namespace) -> int:
    from flexcim.flow import act, pipeline
    from flexcim.flow.quant import arithmetic
    from flexcim.flow.select import Plan

    auto = args.projections.strip() == "auto"
    projections = act.PROJECTIONS if auto else tuple(
        p.strip() for p in args.projections.split(",") if p.strip())
    config = act.ActConfig(pattern=args.pattern, score=args.score, projections=projections)
    if not args.budget > 0:
        raise FlexCimError(f"--budget must be a positive fraction, not {args.budget!r}")
    if not 0 <= args.margin < 1:
        raise FlexCimError(f"--margin must be a fraction in [0, 1), not {args.margin!r}")
    _check_count(args.block_groups, "--block-groups", minimum=1)
    plan = Plan.load(args.plan) if args.plan else None
    _check_count(args.eval_windows, "--eval-windows", minimum=1)
    if args.prefill_tokens is not None and not 1 <= args.prefill_tokens < args.seq_len:
        raise FlexCimError(f"--prefill-tokens must be in 1..{args.seq_len - 1} for windows of "
                           f"--seq-len {args.seq_len}, not {args.prefill_tokens}")
    if not 0 <= args.skip_budget < 1:
        raise FlexCimError(f"--skip-budget must be a fraction in [0, 1), not {args.skip_budget!r}")
    quant = _quant(args)
    if args.output:
        check_output(args.output, "result output (-o)",
                     inputs=(args.model, args.text, args.plan))
    session = _session(args)
    quant = _fit_quant(quant, args, session)
    record = {"model": session.lm.name, "pattern": args.pattern, "score": args.score,
              "eval_windows": args.eval_windows, "seq_len": args.seq_len,
              "prefill_tokens": args.prefill_tokens,
              **_arith_record(session, args, quant)}
    calib = None
    metric = (args.metric or plan.settings.get("metric", "wanda")) if plan is not None else None
    if plan is not None or args.skip_budget > 0 or auto or (quant and quant.smooth is not None):
        calib = _calib(session, args, metric or "wanda")
    if plan is not None:
        pipeline.apply_plan(session.model, plan, None if metric == "magnitude" else calib,
                            metric=metric)
        record.update(plan=os.path.abspath(args.plan), metric=metric,
                      weight_sparsity=plan.achieved_sparsity)
    if auto:
        # chosen on the calibration text, disjoint from the evaluation windows reported below,
        # and in float whatever --arith: W8A8's rounding moves a perplexity by up to 1 % with
        # any change of the computation, noise a greedy search picks up (docs/flow.md)
        study = act.choose_projections(
            session.model, lambda: _perplexity(session.model, calib, args.prefill_tokens),
            pattern=args.pattern, score=args.score, budget=args.budget, margin=args.margin,
            groups=args.block_groups)
        projections = study["projections"]
        if not projections:
            limit = args.budget * (1 - args.margin)
            raise FlexCimError(f"no projection keeps the calibration perplexity within "
                               f"+{limit:.1%} at {args.pattern} (--budget {args.budget} less "
                               f"--margin {args.margin}); raise --budget")
        config = act.ActConfig(pattern=args.pattern, score=args.score, projections=projections)
        record["selection"] = {**study, "arith": "float"}
    # Everything below in the run's arithmetic, opened once and before any activation pruning:
    # W8A8's smoothing scales come from the model as the plan left it (pruned zeros stay zeros).
    with arithmetic(session.model, quant, calib):
        return _act_eval_in(args, session, record, calib, config, projections)


def _act_eval_in(args, session, record, calib, config, projections) -> int:
    from flexcim.flow import act, pipeline
    from flexcim.flow.eval import write_json

    record["projections"] = list(projections)
    act_config = config
    if args.skip_budget > 0:
        sens = act.sensitivity(session.model, calib[: min(8, len(calib))], config)
        skip = act.skip_most_sensitive(sens, args.skip_budget)
        act_config = act.ActConfig(pattern=args.pattern, score=args.score,
                                   projections=projections, skip=skip)
        record.update(skip_budget=args.skip_budget, skipped=list(skip))
    evaluate = lambda: pipeline.evaluate(session, count=args.eval_windows,  # noqa: E731
                                         seq_len=args.seq_len, text=args.eval_text,
                                         prefill=args.prefill_tokens)
    record["perplexity_dense_act"] = evaluate()
    with act.activation_pruning(session.model, act_config) as names:
        record["pruned_projections"] = len(names)
        record["perplexity_pruned_act"] = evaluate()
    record["relative_increase"] = (record["perplexity_pruned_act"]
                                   / record["perplexity_dense_act"] - 1)
    scored = ("" if args.prefill_tokens is None else
              f" of the tokens after a {args.prefill_tokens}-token prefill, decoded densely")
    print(f"perplexity ({record['arith']}){scored} without activation pruning "
          f"{record['perplexity_dense_act']:.3f}, with "
          f"{args.pattern} ({args.score}) on {record['pruned_projections']} projections "
          f"{record['perplexity_pruned_act']:.3f} ({record['relative_increase']:+.1%})")
    if args.output:
        write_json(args.output, record)
    return 0


def _perplexity(model, windows, prefill: int | None = None) -> float:
    from flexcim.flow.eval import perplexity

    return perplexity(model, windows, progress=False, prefill=prefill)


def _export(args: argparse.Namespace) -> int:
    from flexcim.flow import pipeline
    from flexcim.flow.select import Plan
    from flexcim.spec.nm import NMPattern

    plan = Plan.load(args.plan)
    metric = args.metric or plan.settings.get("metric", "wanda")
    if args.layer not in plan.layers:
        raise FlexCimError(f"plan {args.plan!r} has no layer {args.layer!r}")
    if args.act_pattern:
        NMPattern.parse(args.act_pattern)
    _check_count(args.act_tokens, "--act-tokens", minimum=1)
    from flexcim.flow.quant import W8A8Config

    quant = W8A8Config(act_granularity=args.act_granularity or GRANULARITIES[0],
                       smooth=_smooth(args))
    check_output(args.output, "layer output (-o)", suffixes=(".safetensors",),
                 inputs=(args.model, args.text, args.plan))
    session = _session(args)
    quant = _fit_quant(quant, args, session)
    pipeline.export_projection(
        session, plan, args.layer, args.output, calib=_calib(session, args, metric),
        metric=metric, act_tokens=args.act_tokens,
        act_pattern=args.act_pattern, quant=quant, upstream_w8a8=args.arith == "w8a8",
    )
    return 0


def _check_count(value: int, flag: str, *, minimum: int) -> None:
    if value < minimum:
        raise FlexCimError(f"{flag} must be an integer >= {minimum}, not {value!r}")


def _check_common(args: argparse.Namespace) -> None:
    """The options every step shares, checked before the model loads."""
    if args.calib_windows is not None:
        _check_count(args.calib_windows, "--calib-windows", minimum=1)
    _check_count(args.seq_len, "--seq-len", minimum=2)
    _check_count(args.threads, "--threads", minimum=1)
    for flag in ("hyper_m", "hw_weight", "target_sparsity", "budget", "skip_budget"):
        value = getattr(args, flag, None)
        if value is not None and not math.isfinite(value):
            raise FlexCimError(f"--{flag.replace('_', '-')} must be a finite number, "
                               f"not {value!r}")
    if getattr(args, "hyper_m", None) is not None and not args.hyper_m > 0:
        raise FlexCimError(f"--hyper-m must be positive, not {args.hyper_m!r}")


def _checked(handler):
    def run(args: argparse.Namespace) -> int:
        _check_common(args)
        return handler(args)

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH",
                   help="Hugging Face model directory or .gguf (default: bundled SmolLM2-135M)")
    p.add_argument("--text", metavar="FILE",
                   help="UTF-8 text: first half calibration, second half evaluation "
                        "(default: Jane Austen, Pride and Prejudice + Emma)")
    p.add_argument("--calib-windows", type=int, default=None, metavar="N",
                   help="calibration windows of --seq-len tokens (default 16, 2048 tokens; 64 "
                        "when SparseGPT prunes: its least-squares fit needs more positions "
                        "than a projection has inputs)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")


def _arith_options(p: argparse.ArgumentParser, *, evaluation: bool = True) -> None:
    p.add_argument("--arith", choices=ARITHMETICS, default="float",
                   help="float (default), or w8a8: every decoder projection as the macro "
                        "computes it (int8 weights per output channel, int8 activations, exact "
                        "integer sums wrapped to the macro's acc_bits; docs/flow.md)"
                   if evaluation else "the projections before the exported one in float "
                        "(default) or w8a8, as in a --arith w8a8 perplexity run")
    p.add_argument("--act-granularity", choices=GRANULARITIES,
                   help="w8a8 activation scales: one per token (default, chosen on validation "
                        "text) or per tensor (per sequence)")
    p.add_argument("--smooth", metavar="ALPHA|off",
                   help="w8a8: SmoothQuant scales max|x|^ALPHA / max|W|^(1-ALPHA) from the "
                        "calibration text folded into the model while it runs (float-"
                        f"equivalent; default {DEFAULT_SMOOTH}, chosen on validation text, "
                        "docs/flow.md; off: none)"
                   if evaluation else "SmoothQuant alpha of the exported layer's quantization "
                        f"and of the projections before it (default {DEFAULT_SMOOTH}; off: none)")
    if evaluation:
        p.add_argument("--hw-config", metavar="PRESET|JSON",
                       help="w8a8: the macro whose acc_bits the sums wrap to (default: the "
                            "default preset, 32 bits)")
        p.add_argument("--eval-text", choices=EVAL_TEXTS, default="held-out",
                       help="perplexity text: held-out (default, the test text) or emma (the "
                            "default corpus's validation text)")


def register(sub) -> None:
    flow = sub.add_parser("flow", help="FLOW/OWL/uniform N:M selection and pruning of an LLM",
                          description="Layer-wise N:M sparsity for a causal LM (flow/).")
    # torch and transformers: flexcim.cli checks the flow extra before any step runs.
    flow.set_defaults(extra="flow")
    fsub = flow.add_subparsers(dest="flow_command", required=True, metavar="STEP")

    p = fsub.add_parser("select", help="choose an N:M per decoder block -> plan.json")
    _common(p)
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="auto (default): a pattern per projection from sensitivity measured on "
                        "the calibration text, among --hw-config's patterns (docs/flow.md); "
                        "flow: the paper's criterion; owl, uniform: baselines")
    p.add_argument("--target-sparsity", type=float, metavar="S",
                   help="mean weight sparsity over the decoder blocks, e.g. 0.5")
    p.add_argument("--pattern", metavar="N:M",
                   help="uniform: the pattern everywhere; owl: its M is OWL's fixed M")
    p.add_argument("--metric", choices=METRICS, default="wanda",
                   help="scores for the outlier statistics and, later, pruning (default wanda; "
                        "sparsegpt selects on Wanda scores)")
    p.add_argument("--candidates", default="paper",
                   help="flow's N:M choices: paper (N in 2,4,8; M in 4,8), extended "
                        "(N in 1..16, M in 4,8,16) or a list like 2:4,4:8,2:8")
    p.add_argument("--hyper-m", type=float, default=5.0,
                   help="outlier threshold as a multiple of the block's mean score (default 5)")
    p.add_argument("--m-direction", choices=M_DIRECTIONS, default="code",
                   help="code (default, measured better with dense ends): clustered outliers "
                        "-> smaller M (the release's ILP); figure: -> larger M (the paper's "
                        "figure); see docs/flow.md")
    p.add_argument("--normalisation", choices=NORMALISATIONS, default="minmax",
                   help="flow: how outlier ratio and locality map to [0, 1] over the blocks: "
                        "minmax (the release's), zscore (normal CDF) or rank")
    p.add_argument("--keep-ends-dense", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the first and last blocks dense, the others compensate (default: "
                        "on for flow, measured better, see docs/flow.md; off for uniform, owl)")
    p.add_argument("--hw-config", metavar="PRESET|JSON",
                   help="the target FlexCiM macro: auto chooses among its patterns (default "
                        "the default preset); flow adds each block's relative latency on it to "
                        "the cost")
    p.add_argument("--hw-weight", type=float, default=1.0, help="weight of the latency term")
    p.add_argument("--granularity", choices=("best", "projection", "block"), default="best",
                   help="auto: a pattern per projection or per decoder block, or best (default): "
                        "the one of the two, or the uniform pattern, with the lowest loss on the "
                        "--loss-windows")
    p.add_argument("--sens-windows", type=int, default=4, metavar="N",
                   help="auto: calibration windows used to measure sensitivity (default 4)")
    p.add_argument("--refine-steps", type=int, default=None, metavar="N",
                   help="auto: steps of the local search on the calibration loss after the "
                        "exact allocation (default: 48 up to a target of 50 %%, 192 above; "
                        "0: none)")
    p.add_argument("--loss-windows", type=int, default=8, metavar="N",
                   help="auto: calibration windows (after the sensitivity's) on which candidate "
                        "plans are compared and the local search measures (default 8)")
    p.add_argument("--significance", type=float, default=2.0, metavar="Z",
                   help="auto: the best candidate plan replaces the uniform pattern only if "
                        "its mean per-window loss gain on the loss windows exceeds Z standard "
                        "errors of the paired differences (default 2; 0: any gain)")
    p.add_argument("--lm-head", action="store_true",
                   help="auto: allocate a pattern to the LM head too (untied from the "
                        "embedding; its parameters count in the target sparsity); default: "
                        "the head stays dense")
    p.add_argument("--sens-cache", metavar="DIR",
                   help="auto: keep the sensitivity measurement in DIR and reuse it for the same "
                        "model, calibration windows and patterns (default: the sensitivity "
                        "folder of the cache, ~/.cache/flexcim or $FLEXCIM_CACHE; 'off': "
                        "measure every time)")
    p.add_argument("-o", "--output", required=True, metavar="PLAN.json")
    p.set_defaults(func=_checked(_select))

    p = fsub.add_parser("prune", help="apply plan.json -> a sparsified model directory")
    _common(p)
    p.add_argument("--plan", required=True, metavar="PLAN.json")
    p.add_argument("--metric", choices=METRICS, help="default: the plan's metric")
    p.add_argument("--eval-windows", type=int, default=0, metavar="N",
                   help="also report perplexity on N held-out windows (default 0: skip)")
    p.add_argument("--refit-norms", action="store_true",
                   help="after pruning, fit the RMSNorm/LayerNorm gains (only them; every "
                        "linear weight stays as pruned) to the dense model's next-token "
                        "distribution on the calibration windows: 2 epochs, Adam, a few "
                        "minutes on SmolLM2 (docs/flow.md)")
    _arith_options(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=_checked(_prune))

    p = fsub.add_parser("act-eval", help="perplexity with and without N:M activation pruning")
    _common(p)
    p.add_argument("--pattern", default="8:16", metavar="N:M",
                   help="kept per group of input channels (default 8:16)")
    p.add_argument("--score", choices=("abs", "weight"), default="abs",
                   help="abs: |x|; weight: |x_j| * ||W[:, j]|| (default abs)")
    p.add_argument("--projections", default=",".join(ACT_DEFAULT), metavar="KINDS|auto",
                   help="projections to prune: some of q,k,v,o,gate,up,down, each for every "
                        "block or as KIND@FIRST-LAST for those blocks, e.g. q,down,gate@20-29 "
                        f"(default {','.join(ACT_DEFAULT)}: measured on SmolLM2, docs/flow.md), "
                        "or auto: the largest share of the linear MACs within --budget less "
                        "--margin on the calibration text, in float (whole kinds, then kinds "
                        "in --block-groups ranges of blocks)")
    p.add_argument("--budget", type=float, default=0.05, metavar="F",
                   help="with --projections auto: allowed perplexity increase (default 0.05)")
    p.add_argument("--margin", type=float, default=0.5, metavar="F",
                   help="with --projections auto: share of --budget held back for the gap "
                        "from the calibration text to unseen text (default 0.5: selection "
                        "within 2.5 %%; measured gap 1-3 %%, docs/flow.md)")
    p.add_argument("--block-groups", type=int, default=3, metavar="G",
                   help="with --projections auto: after whole kinds, try kinds in G contiguous "
                        "ranges of the decoder blocks (default 3; 1: kinds only)")
    p.add_argument("--skip-budget", type=float, default=0.0, metavar="F",
                   help="keep the fraction F of most sensitive projections dense (default 0)")
    p.add_argument("--plan", metavar="PLAN.json", help="also apply this weight plan first")
    p.add_argument("--metric", choices=METRICS, help="with --plan (default: the plan's)")
    p.add_argument("--eval-windows", type=int, default=16, metavar="N",
                   help="held-out windows (default 16)")
    p.add_argument("--prefill-tokens", type=int, metavar="P",
                   help="score only each window's tokens after a prompt of its first P, the "
                        "prompt as one (pruned) prefill call and the rest decoded densely on its "
                        "KV cache, as a served model runs them (one teacher-forced call: the "
                        "logits of one-token steps) (default: every token of the window in one "
                        "call, all pruned)")
    _arith_options(p)
    p.add_argument("-o", "--output", metavar="RESULT.json")
    p.set_defaults(func=_checked(_act_eval))

    p = fsub.add_parser("export", help="one sparsified projection -> golden layer file")
    _common(p)
    p.add_argument("--plan", required=True, metavar="PLAN.json")
    p.add_argument("--layer", required=True, metavar="NAME",
                   help="module path, e.g. model.layers.3.self_attn.q_proj")
    p.add_argument("--metric", choices=METRICS, help="default: the plan's")
    p.add_argument("--act-tokens", type=int, default=64, metavar="T",
                   help="real calibration activation rows to include (default 64)")
    p.add_argument("--act-pattern", metavar="N:M",
                   help="top-k the exported activations (e.g. 8:16)")
    _arith_options(p, evaluation=False)
    p.add_argument("-o", "--output", required=True, metavar="LAYER.safetensors")
    p.set_defaults(func=_checked(_export))
