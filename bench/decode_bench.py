"""Decode on one macro: how the weight port (``weight_port_rows``, ``weight_overlap``) bounds a
decoded token, and what each option stores.

A decoded token runs every projection of a block with ``tokens = 1``: each column tile loads
its weights once and computes one token, so the macro's own weight port decides the time
unless it loads a pass's weight word in the cycles a pass computes.  For SmolLM2-135M's seven
projections (shapes from ``golden/models``) on ``default`` and patterns 1:1, 2:4 and 2:8, the
cycles of one block on one macro (``golden.perf``: exact, checked against the RTL) and the
utilisation (compute cycles / cycles), for each weight-port option; then the weight-word
storage per macro of each option against a double-buffered macro (two words per pass: the
same cycles as ``weight_overlap`` would need a second bank of every cell's words), priced as
flip-flops and as 6T SRAM bit cells (hw/synth.py's NAND2-equivalents).

Run: ``python bench/decode_bench.py [--json out/bench/decode.json]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from flexcim.golden import perf, system
from flexcim.hw import area, synth
from flexcim.spec.config import preset

from flexcim.fileio import atomic_write

PATTERNS = ("1:1", "2:4", "2:8")
OPTIONS = [(1, 0), (1, 1), (9, 0), (9, 1), (18, 1)]
"""(weight_port_rows, weight_overlap): the original port, overlap alone, a 9-row port (72 rows /
8 cycles per pass: one word in one pass's cycles) without and with overlap, an 18-row port."""


def block_cycles(cfg, shape, pattern: str) -> tuple[int, int]:
    """Cycles and compute cycles of one decoded token through one block's projections."""
    cycles = ideal = 0
    for c, k in shape.linears().values():
        est = perf.estimate(cfg, pattern, 1, k, c)
        cycles, ideal = cycles + est.cycles, ideal + est.ideal
    return cycles, ideal


def run() -> dict:
    base = preset("default")
    shape = system.load_model_shape("smollm2-135m")
    rows = []
    for port, overlap in OPTIONS:
        cfg = base.replace(weight_port_rows=port, weight_overlap=overlap)
        row = {"weight_port_rows": port, "weight_overlap": overlap,
               "beat_bits": cfg.weight_port_rows * cfg.cols * (8 + cfg.index_bits)}
        for pattern in PATTERNS:
            cycles, ideal = block_cycles(cfg, shape, pattern)
            row[pattern] = {"cycles": cycles, "ideal": ideal, "utilisation": ideal / cycles}
        rows.append(row)
    bits = sum(area.storage_bits(base).values())
    ff, sram = synth.nand2_eq("$_DFFE_PP_"), synth.sram_bit_nand2()
    storage = {"weight_word_bits": bits, "nand2_per_bit_ff": ff, "nand2_per_bit_sram": sram,
               "double_buffer_extra_bits": bits, "double_buffer_extra_nand2_ff": bits * ff,
               "double_buffer_extra_nand2_sram": bits * sram}
    return {"model": shape.name, "preset": "default", "rows": rows, "storage": storage}


def report(result: dict) -> str:
    lines = [f"{result['model']}: one decoded token through one block (7 projections) on one "
             f"`default` macro; cycles (utilisation)", "",
             "| weight_port_rows | weight_overlap | beat bits | "
             + " | ".join(PATTERNS) + " |", "|---|---|---|" + "---|" * len(PATTERNS)]
    for r in result["rows"]:
        cells = [f"{r[p]['cycles']:,} ({100 * r[p]['utilisation']:.0f} %)" for p in PATTERNS]
        lines.append(f"| {r['weight_port_rows']} | {r['weight_overlap']} | {r['beat_bits']:,} | "
                     + " | ".join(cells) + " |")
    s = result["storage"]
    lines += ["", f"weight+index words per macro: {s['weight_word_bits']:,} bits; every option "
              f"above stores them once (no extra bit); a double-buffered macro stores them twice:"
              f" +{s['double_buffer_extra_bits']:,} bits = "
              f"+{s['double_buffer_extra_nand2_ff']:,.0f} NAND2-eq as flip-flops "
              f"({s['nand2_per_bit_ff']:.2f}/bit), "
              f"+{s['double_buffer_extra_nand2_sram']:,.0f} as 6T SRAM "
              f"({s['nand2_per_bit_sram']:.3f}/bit)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    result = run()
    print(report(result))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
