"""The energy model's activity estimate against the RTL's counters, as a table.

``python -m flexcim.sim.activity`` runs a few layers through the RTL on Verilator (random int8
data with and without an 8:16 activation top-k, and the real SmolLM2 projection of
:mod:`flexcim.sim.real`) and prints, per layer, the RTL's active cell-cycles (cells whose weight
and selected activation slice are both non-zero; the testbench asserts they equal
:func:`flexcim.golden.energy.mac_cycles`) against the model's global-density estimate
``compute_cycles * cells * act_density``.  docs/architecture.md, section 7, holds its output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from flexcim.golden import energy
from flexcim.golden.prune import act_topk, nm_prune
from flexcim.spec.config import preset
from flexcim.spec.nm import NMTensor

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_write

REAL_EXTRA = ("model.layers.3.self_attn.o_proj", "model.layers.3.mlp.down_proj")
"""Further projections of the same block, whole on ``default``: the attention output and the
MLP's down projection (K = 1536, whose inputs are the gated SiLU products)."""


def random_operands(pattern: str, tokens: int, k: int, c: int, act_pattern: str | None,
                    seed: int) -> tuple[np.ndarray, NMTensor]:
    """Uniform int8 ``x`` (optionally top-k'd) and an N:M ``W`` of uniform int8 values."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(tokens, k), dtype=np.int8)
    if act_pattern:
        x = act_topk(x, act_pattern)
    w = nm_prune(rng.integers(-128, 128, size=(c, k), dtype=np.int8), pattern)
    return x, NMTensor.compress(w, pattern)


def cases(real: bool) -> list[tuple[str, str, np.ndarray, NMTensor]]:
    """``(name, preset, x, w)`` of every measured layer; tiles are whole (C a multiple of
    ``cols``), so no column of the array is empty."""
    out = []
    for name, rows in (("tiny", 64), ("default", 576)):
        for act in (None, "8:16"):
            x, w = random_operands("2:4", 16, 576, rows, act, seed=len(out))
            label = f"random int8, 2:4, [16x576] x [{rows}x576]" + (", act 8:16" if act else "")
            out.append((label, name, x, w))
    if real:
        from flexcim.golden.layer_io import load_layer
        from flexcim.sim.host import layer_operands
        from flexcim.sim.real import SETTINGS, real_layers

        first = SETTINGS["layer"]
        paths = real_layers([first, *REAL_EXTRA])
        runs = [(first, "tiny", 16, 64), (first, "default", None, None)]
        runs += [(name, "default", None, None) for name in REAL_EXTRA]
        for layer_name, name, tokens, rows in runs:
            layer = load_layer(paths[layer_name])
            x, w = layer_operands(layer, tokens=tokens, out_features=rows)
            label = (f"SmolLM2 {layer.name.removeprefix('model.')}, {w.pattern}, "
                     f"[{x.shape[0]}x{w.in_features}] x [{w.out_features}x{w.in_features}], "
                     f"act {layer.act_pattern}")
            out.append((label, name, x, w))
    return out


def measure(real: bool = True) -> list[dict]:
    from flexcim.sim.host import run_rtl

    rows = []
    for label, name, x, w in cases(real):
        cfg = preset(name)
        act = run_rtl(x, w, cfg, sim="verilator", seed=1).stats["activity"]
        rows.append({
            "layer": label, "preset": name, "b": cfg.act_bits_per_cycle,
            "act_density": act["act_density"],
            "slice_density": energy.slice_density(x, cfg.act_bits_per_cycle),
            "mac_cycles": act["mac_cycles"], "mac_estimate": act["mac_estimate"],
            "mac_ratio": act["mac_ratio"], "gated_density": act["gated_density"],
        })
        logging.getLogger("flexcim.sim").info("%s on %s: RTL/estimate %.3f", label, name,
                                               act["mac_ratio"])
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| layer | preset (b) | non-zero activations | non-zero slices | active cell-cycles "
        "(RTL = mac_cycles) | model estimate | RTL / estimate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['preset']} ({r['b']}) | {r['act_density']:.3f} | "
            f"{r['slice_density']:.3f} | {r['mac_cycles']:,} | {r['mac_estimate']:,.0f} | "
            f"{r['mac_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexcim.sim.activity",
                                     description="energy-model activity vs RTL counters")
    parser.add_argument("--no-real", action="store_true",
                        help="leave out the real SmolLM2 layer (its first export loads the model)")
    parser.add_argument("--json", type=Path, help="write the rows there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = measure(real=not args.no_real)
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FlexCimError as exc:
        print(f"activity: error: {exc}", file=sys.stderr)
        sys.exit(2)
