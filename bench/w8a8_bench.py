"""W8A8 vs float perplexity of one weight plan, with and without activation pruning.

The plan is applied once (Wanda, block by block on ``--calib-windows`` calibration windows, as
``flexcim flow prune``), then the same model is measured four times on the same windows: float
and W8A8 (:mod:`flexcim.flow.quant`), each with dense activations and with ``--act-pattern``
top-k on the default projections (``flow/act.py``).  W8A8 folds SmoothQuant scales with
``--smooth ALPHA`` (default :data:`flexcim.flow.quant.DEFAULT_SMOOTH`; ``off``: none) into the
model while it runs (float-equivalent), measured on the calibration windows without the
activation top-k.  Writes every figure with the date and command to ``--out`` (JSON,
atomically).

    python bench/w8a8_bench.py --plan plan.json --eval-windows 16 --out out/bench/w8a8.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from flexcim.flow import act
from flexcim.flow import pipeline as fp
from flexcim.flow.eval import write_json
from flexcim.flow.quant import (
    DEFAULT_GRANULARITY,
    DEFAULT_SMOOTH,
    GRANULARITIES,
    W8A8Config,
    arithmetic,
    parse_smooth,
)
from flexcim.flow.select import Plan

from flexcim.errors import FlexCimError

log = logging.getLogger("flexcim.bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", metavar="PLAN.json", help="weight plan (default: dense weights)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-text", default="held-out", help="held-out (test) or emma (validation)")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--act-pattern", default="8:16")
    p.add_argument("--act-granularity", choices=GRANULARITIES, default=DEFAULT_GRANULARITY)
    p.add_argument("--smooth", default=str(DEFAULT_SMOOTH), metavar="ALPHA|off")
    p.add_argument("--ariths", default="float,w8a8", help="which to measure (default both)")
    p.add_argument("--no-act", action="store_true", help="dense activations only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, metavar="RESULT.json")
    args = p.parse_args(argv)
    try:
        alpha = parse_smooth(args.smooth)
    except FlexCimError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    session = fp.load()
    calib = fp.calibration_windows(session, count=args.calib_windows)
    record = {"command": " ".join(["python", *sys.argv]), "eval_windows": args.eval_windows,
              "eval_text": args.eval_text, "act_pattern": args.act_pattern,
              "act_projections": list(act.DEFAULT_PROJECTIONS), "plan": args.plan}
    if args.plan:
        plan = Plan.load(args.plan)
        fp.apply_plan(session.model, plan, calib, metric=plan.settings.get("metric", "wanda"))
        fp.check_plan(session.model, plan)
        record["weight_sparsity"] = plan.achieved_sparsity
    quant = W8A8Config(act_granularity=args.act_granularity, smooth=alpha)
    record["w8a8_config"] = quant.to_dict()
    for arith, q in (("float", None), ("w8a8", quant)):
        if arith not in args.ariths.split(","):
            continue
        # the arithmetic opened before the activation top-k: the smoothing scales come from the
        # model without it (as flow act-eval and the demo)
        with arithmetic(session.model, q, calib):
            seconds = time.perf_counter()
            record[arith] = fp.evaluate(session, count=args.eval_windows, text=args.eval_text,
                                        progress=False)
            record[f"{arith}_seconds"] = round(time.perf_counter() - seconds, 1)
            log.info("%s: %.3f", arith, record[arith])
            if args.no_act:
                continue
            with act.activation_pruning(session.model, act.ActConfig(pattern=args.act_pattern)):
                record[f"{arith}+act"] = fp.evaluate(session, count=args.eval_windows,
                                                     text=args.eval_text, progress=False)
            log.info("%s with %s activations: %.3f", arith, args.act_pattern,
                     record[f"{arith}+act"])
    for key in ("", "+act"):
        if f"float{key}" in record and f"w8a8{key}" in record:
            record[f"w8a8{key}_vs_float{key}"] = record[f"w8a8{key}"] / record[f"float{key}"] - 1
    record["seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
