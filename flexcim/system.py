"""``flexcim system``: prefill and decode of a whole LLM on an accelerator of FlexCiM macros,
against dense and fixed-2:4 accelerators with the same cells and memory system
(:mod:`flexcim.golden.system`)."""

from __future__ import annotations

import argparse
import json
import os

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_write, check_output


def read_plan(path: str):
    """A plan file: a flow plan, a golden.energy plan, ``{"patterns": [...]}`` or a JSON list."""
    if not os.path.isfile(path):
        raise FlexCimError(f"plan file {path!r} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlexCimError(f"plan file {path!r} is not valid JSON: {exc}") from None


def write_json(path: str, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (:func:`flexcim.fileio.atomic_write`)."""
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def table_rows(result: dict, phase: str) -> list[list]:
    """One row per accelerator of :func:`flexcim.golden.system.compare` for ``phase``."""
    from flexcim.golden.system import CATEGORIES

    rows = []
    for name, r in result.items():
        step = r[phase]
        total = sum(step["energy_pj"].values())
        rows.append([name, step["seconds"] * 1e3, step["tokens_per_s"],
                     step["pj_per_token"] / 1e6, step.get("latency_vs_flexcim", 1.0),
                     step.get("energy_vs_flexcim", 1.0), step["bound"],
                     " / ".join(f"{100 * step['energy_pj'][c] / total:.0f}" for c in CATEGORIES)])
    return rows


def _system(args: argparse.Namespace) -> int:
    from flexcim.golden import system
    from flexcim.report import markdown_table
    from flexcim.spec.config import HwConfig, preset

    if args.json:
        check_output(args.json, "--json", inputs=[args.plan])
    shape = system.load_model_shape(args.model_config)
    plan = read_plan(args.plan) if args.plan else args.pattern
    cfg = HwConfig.load(args.config) if args.config else preset(args.preset)
    cfg = cfg.with_overrides(args.set or [])
    memory = system.MemorySystem(clock_hz=args.clock_mhz * 1e6, dram_gb_per_s=args.dram_gbps,
                                 weight_buffer_bytes=int(args.weight_buffer_kib * 1024))
    acc = system.Accelerator(cfg, macros=args.macros, memory=memory,
                             compact_indices=args.compact_indices)
    head = args.lm_head or str(system.plan_head(plan))
    result = system.compare(acc, shape, plan, tokens=args.tokens, kv_len=args.kv_len, head=head)
    headers = ["accelerator", "latency (ms)", "tokens/s", "energy/token (uJ)",
               "latency vs flexcim", "energy vs flexcim", "bound",
               "% " + " / ".join(system.CATEGORIES)]
    print(f"{shape.name}: {shape.layers} blocks, hidden {shape.hidden}, {args.macros} macros of "
          f"{args.config or args.preset}, {args.clock_mhz:g} MHz, DRAM {args.dram_gbps:g} GB/s, "
          f"weight buffer {args.weight_buffer_kib:g} KiB, weight port {cfg.weight_port_rows} "
          f"row(s)/cycle, weight overlap {'on' if cfg.weight_overlap else 'off'}, LM head "
          f"{head}")
    for name, r in result.items():
        if r["runs_as"] and name != "dense":  # the dense baseline runs every plan dense
            print(f"{name} runs " + ", ".join(f"{p} as {q}" for p, q in r["runs_as"].items())
                  + " (patterns its macro does not have)")
    for phase, title in (("prefill", f"prefill of {args.tokens} tokens"),
                         ("decode", f"decode of one token, KV cache {args.kv_len}")):
        print(f"\n{title} (vs flexcim > 1: FlexCiM better)")
        print(markdown_table(headers, table_rows(result, phase)))
    if args.json:
        write_json(args.json, {"model": shape.__dict__, "hw": cfg.to_dict(),
                               "macros": args.macros, "memory": memory.__dict__,
                               "weight_port_rows": cfg.weight_port_rows,
                               "weight_overlap": cfg.weight_overlap,
                               "compact_indices": args.compact_indices,
                               "plan": args.plan or args.pattern,
                               "lm_head": head,
                               "result": result})
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "system",
        help="prefill and decode of a whole LLM on P macros with a weight buffer and DRAM",
        description="Latency, tokens/s and energy per token of a prefill and of one decode step "
        "of a Llama-style LLM (shapes from its config.json) with an N:M plan, on an accelerator "
        "of P FlexCiM macros vs dense and fixed-2:4 accelerators with the same cells and "
        "memory system (flexcim.golden.system; docs/architecture.md section 8).",
    )
    p.add_argument("--model-config", required=True, metavar="NAME|config.json",
                   help="a shipped model (smollm2-135m, tinyllama-1.1b, llama-3.2-1b, "
                   "llama-2-7b) or a Hugging Face config.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", metavar="plan.json",
                     help="flow plan (flexcim flow select), golden.energy plan, "
                     "{\"patterns\": [...]} or a JSON list of per-block patterns; mapped onto "
                     "the model's blocks by relative depth")
    src.add_argument("--pattern", metavar="N:M", help="one pattern for every block")
    hw = p.add_mutually_exclusive_group()
    hw.add_argument("--preset", default="default", help="macro preset (default: default)")
    hw.add_argument("--config", metavar="HW.json", help="macro HwConfig JSON")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a HwConfig field (repeatable); e.g. weight_port_rows=9 "
                   "weight_overlap=1: a macro that loads a pass's weights while it computes")
    p.add_argument("--lm-head", metavar="N:M",
                   help="the LM head's pattern (default: the plan's, from flexcim flow select "
                   "--method auto --lm-head, else 1:1), run by every accelerator as it can "
                   "(fixed24: 2:4 only for N <= 2 and 4 | M, else dense)")
    p.add_argument("--macros", type=int, default=16, metavar="P", help="macros (default 16)")
    p.add_argument("--tokens", type=int, default=128, metavar="T",
                   help="prefill tokens (default 128)")
    p.add_argument("--kv-len", type=int, default=512, metavar="L",
                   help="KV cache length of the decode step (default 512)")
    p.add_argument("--clock-mhz", type=float, default=500.0, help="clock (default 500 MHz)")
    p.add_argument("--dram-gbps", type=float, default=25.6,
                   help="DRAM bandwidth in GB/s (default 25.6: one 64-bit LPDDR4-3200)")
    p.add_argument("--weight-buffer-kib", type=float, default=2048.0,
                   help="on-chip weight buffer (default 2048 KiB)")
    p.add_argument("--compact-indices", action="store_true",
                   help="DRAM and weight buffer store weights packed: 8 value bits per kept "
                   "weight and one ceil(log2 C(M,N))-bit code per group (none for dense "
                   "blocks), decoded into the macros' beats by the weight unpacker "
                   "(hw/unpack.py; each weight load's last packed word padded)")
    p.add_argument("--json", metavar="OUT.json", help="write every figure there")
    p.set_defaults(func=_system)
