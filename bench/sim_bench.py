"""RTL simulation speed: Verilator vs Icarus on the same layer, the 576x576x128 goal, and the
parallel efficiency of the regression, all measured in one run.

1. The same tiny-preset layer (bit-exact against golden, full-rate test) through
   :func:`flexcim.sim.host.run_rtl` on Verilator and on Icarus: dense-equivalent MACs
   (``T*K*C``) per second of simulation wall time, and their ratio.
2. Goal (sim issue): a 576x576 projection (2:4) with 128 tokens checked bit-exact on Verilator
   in under 60 s wall on the ``default`` preset, the one-time build reported apart
   (``--skip-default`` leaves it out; the build is cached in ``build/sim``).
3. ``make regress`` on the tiny preset (both simulators) on ``-j`` workers: wall time vs the sum
   of the cases' wall times (speed-up, and efficiency = speed-up / jobs).

Writes out/bench/sim.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time

import numpy as np
from flexcim.golden import nm_prune
from flexcim.sim import regress, runner
from flexcim.sim.host import run_rtl
from flexcim.spec.config import preset
from flexcim.spec.nm import NMTensor

GOAL_S = 60.0


def layer(pattern: str, t: int, k: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(t, k), dtype=np.int8)
    w = nm_prune(rng.integers(-128, 128, size=(c, k), dtype=np.int8), pattern)
    return x, NMTensor.compress(w, pattern)


def timed_run(x, w, cfg, sim: str) -> dict:
    """Build (cached) first, then the measured run, so ``sim_s`` holds no build."""
    t0 = time.perf_counter()
    run_rtl(x[:1], w, cfg, sim=sim, seed=1)  # builds the simulator if it is not cached
    build_s = time.perf_counter() - t0
    stats = run_rtl(x, w, cfg, sim=sim, seed=1).stats
    return {"sim": sim, "build_and_warmup_s": build_s, "sim_s": stats["sim_s"],
            "wall_s": stats["wall_s"], "cycles": stats["cycles"],
            "dense_macs_per_s": stats["dense_macs_per_s"],
            "cycles_per_s": stats["cycles"] / stats["sim_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-default", action="store_true",
                        help="leave out the 576x576x128 run on the default preset")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report: dict = {}

    sims = [s for s in runner.SIMULATORS if runner.available(s)]
    x, w = layer("2:4", 64, 128, 12)
    print(f"1. same layer on each simulator: tiny preset, 2:4, x[64,128] @ W.T[128,12] "
          f"({64 * 128 * 12} dense MACs)")
    rows = [timed_run(x, w, preset("tiny"), sim) for sim in sims]
    for r in rows:
        print(f"   {r['sim']:10} {r['cycles']:7d} cycles {r['sim_s']:6.2f} s  "
              f"{r['dense_macs_per_s']:10.0f} MAC/s {r['cycles_per_s']:8.0f} cycles/s")
    report["same_layer"] = {"preset": "tiny", "pattern": "2:4", "shape": [64, 128, 12],
                            "rows": rows}
    if len(rows) == 2:
        ratio = rows[0]["dense_macs_per_s"] / rows[1]["dense_macs_per_s"]
        report["same_layer"]["verilator_over_icarus"] = ratio
        print(f"   Verilator / Icarus: {ratio:.2f}x")

    if not args.skip_default and "verilator" in sims:
        print("2. 576x576 projection, 2:4, 128 tokens, default preset, Verilator "
              "(first run builds the simulator: minutes)")
        x, w = layer("2:4", 128, 576, 576)
        r = timed_run(x, w, preset("default"), "verilator")
        r["within_goal"] = r["sim_s"] < GOAL_S
        print(f"   build + warm-up {r['build_and_warmup_s']:.1f} s; run {r['cycles']} cycles in "
              f"{r['sim_s']:.1f} s ({r['wall_s']:.1f} s with start-up), "
              f"{r['dense_macs_per_s']:.0f} MAC/s; goal < {GOAL_S:.0f} s: "
              f"{'ok' if r['within_goal'] else 'MISSED'}")
        report["default_576"] = r

    cases = regress.sweep(tuple(sims), {"tiny": regress.SWEEP_PRESETS["tiny"]})
    print(f"3. regression: {len(cases)} tiny cases on {args.jobs} jobs")
    records, wall = regress.regress(cases, jobs=args.jobs, seed=1)
    parts = sum(r.get("wall_s", 0) for r in records)
    passed = sum(r["passed"] for r in records)
    speedup = parts / wall
    print(f"   {passed}/{len(records)} passed; wall {wall:.1f} s, sum of cases {parts:.1f} s: "
          f"{speedup:.2f}x speed-up, efficiency {speedup / args.jobs:.0%}")
    report["regress"] = {"cases": len(records), "passed": passed, "jobs": args.jobs,
                         "wall_s": wall, "sum_of_cases_s": parts, "speedup": speedup,
                         "efficiency": speedup / args.jobs}

    out = pathlib.Path("out/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'sim.json'}")


if __name__ == "__main__":
    main()
