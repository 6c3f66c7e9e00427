"""Energy of flexibility: FlexCiM (``default``) against the macros it must not lose to.

Two comparisons from issue 14, with the energy model (flexcim.golden.energy) on the shapes of
SmolLM2's 30 decoder blocks (q/k/v/o/gate/up/down projections, 128 prefill tokens):

* **pure 2:4 work**: every block 2:4, on ``default`` vs ``fixed24`` (the fixed-2:4 macro);
* **dense work**: every block 1:1, on ``default`` vs ``dense`` (the dense macro).

Each at several gated fractions of the cell array (``act_density``): 1.0 (every cell-cycle
multiplies a non-zero slice), 0.5 and 0.26 (the non-zero bit-slice fraction of real 8:16-pruned
SmolLM2 activations, docs/architecture.md section 7).  Ratios > 1 mean FlexCiM spends more.
Run: ``python bench/energy_bench.py [--json out/bench/energy.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from flexcim.golden import energy
from flexcim.spec.config import preset

TOKENS = 128
BLOCKS = 30
HIDDEN, MLP, KV = 576, 1536, 192  # SmolLM2-135M
LINEARS = {"q_proj": [HIDDEN, HIDDEN], "k_proj": [KV, HIDDEN], "v_proj": [KV, HIDDEN],
           "o_proj": [HIDDEN, HIDDEN], "gate_proj": [MLP, HIDDEN], "up_proj": [MLP, HIDDEN],
           "down_proj": [HIDDEN, MLP]}
DENSITIES = (1.0, 0.5, 0.26)
CASES = (("pure 2:4 work", "2:4", "fixed24"), ("dense work", "1:1", "dense"))


def uniform_plan(pattern: str) -> dict:
    return {"layers": [{"name": f"block{i}", "pattern": pattern, "linears": LINEARS}
                       for i in range(BLOCKS)]}


def ratios() -> list[dict]:
    """FlexCiM's prefill energy over the reference macro's, per case and gated fraction."""
    flex = preset("default")
    rows = []
    for label, pattern, ref_name in CASES:
        plan = uniform_plan(pattern)
        for density in DENSITIES:
            mine = energy.prefill_cost(flex, plan, TOKENS, act_density=density)
            ref = energy.prefill_cost(preset(ref_name), plan, TOKENS, act_density=density)
            rows.append({"case": label, "pattern": pattern, "reference": ref_name,
                         "act_density": density, "default_uj": mine.total_pj / 1e6,
                         "reference_uj": ref.total_pj / 1e6,
                         "ratio": mine.total_pj / ref.total_pj,
                         "default_by_action_uj": {k: v / 1e6 for k, v in mine.energy_pj.items()},
                         "reference_by_action_uj": {k: v / 1e6 for k, v in ref.energy_pj.items()}})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = ratios()
    print(f"SmolLM2 prefill, {BLOCKS} blocks x {len(LINEARS)} projections, {TOKENS} tokens")
    print(f"{'case':<15} {'vs':<8} {'density':>7} {'default uJ':>11} {'ref uJ':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['case']:<15} {r['reference']:<8} {r['act_density']:>7.2f} "
              f"{r['default_uj']:>11.2f} {r['reference_uj']:>9.2f} {r['ratio']:>7.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
