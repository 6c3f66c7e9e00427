"""System model: an accelerator of P FlexCiM macros with a weight buffer and DRAM, running the
prefill and the decode steps of a whole decoder LLM (docs/architecture.md, section 8).

The accelerator (:class:`Accelerator`) has ``macros`` identical macros of one
:class:`~flexcim.spec.config.HwConfig`, an on-chip weight buffer (SRAM) fed by DRAM, an on-chip
activation SRAM, and an attention engine.  A *step* processes ``tokens`` new tokens against a
KV cache of ``kv_len`` earlier ones: the prefill of a prompt is one step with ``kv_len = 0``,
each decoded token one step with ``tokens = 1`` (:func:`step_cost`).

What runs where, and what is charged:

* **Projections** (q/k/v/o, gate/up/down of every block, and the LM head for the step's last
  token) run on the macros, one projection after another, each spread over all macros: the
  single-macro schedule of :func:`flexcim.golden.perf.schedule` (column tiles x K chunks x
  token blocks) is cut into *tiles* (one column tile and K chunk: one weight load, then its
  token blocks) dealt round-robin to the macros.  A macro's time is the sum of its commands'
  exact cycles (:func:`flexcim.golden.perf.command_timing`); with one macro the projection
  takes exactly :func:`flexcim.golden.perf.layer_cycles`, which the RTL matches.
  How a macro loads its weights is the :class:`~flexcim.spec.config.HwConfig`'s, as the RTL
  does it: ``weight_port_rows`` cell rows per cycle, and with ``weight_overlap`` a token's pass
  starts as soon as its weight word is in (the compute chases the loader inside a command;
  the next command's load still waits for the previous command's last compute cycle).  The
  cocotb and amaranth.sim regressions check these cycles against the RTL.
* **Weights** are stored compressed exactly as the macro's weight beats carry them
  (:func:`flexcim.spec.layouts.weight_layout`: ``cols`` values of 8 bits and ``cols`` indices of
  ``index_bits``, padding of partial tiles and passes included), or with
  ``Accelerator(compact_indices=True)`` packed: 8 value bits per kept weight and one
  ``ceil(log2 C(M, N))``-bit code per group of N rows and column (none for a dense block), the
  stream of :func:`flexcim.spec.layouts.pack_compact`, which :mod:`flexcim.hw.unpack` decodes
  into the macro's beats (each load's last bus word padded; its energy,
  :func:`flexcim.golden.energy.unpack_pj`, an upper bound, is weight traffic), and stream
  from DRAM through the weight buffer every step unless the whole model fits the buffer (then
  they are resident and only read from it).  DRAM streaming runs concurrently with the macros
  (the buffer prefetches), so a projection takes ``max(busiest macro, weight bits / DRAM
  bandwidth)``.
* **Activations**: every activation beat a macro receives is read from the activation SRAM,
  every result beat (``acc_bits`` per column) written to it, and K-chunk partial sums read back
  and added there.  The on-chip SRAM bandwidth is assumed sufficient (not a bound).
* **Attention** (scores and values, ``2 x heads x head_dim`` MACs per query-key pair, causal in
  the step) runs on a separate int8 attention engine (``attn_macs_per_cycle``): its operands
  change every token, so it is not a weight-stationary CiM workload.  The KV cache is int8 in
  DRAM: a step reads every cached row once (the step's queries stay on chip) and writes its
  new rows.  Softmax, norms, SiLU, rotary embeddings and requantization are not charged.
* **Static**: leakage of every storage bit (macro weight/index words and activation buffers,
  weight buffer, activation SRAM) for the step's duration.  Clock-tree energy is not modelled
  separately (idle macros assumed clock-gated).

Every figure names its **bound**: ``compute`` (the macros' own schedule), ``weight port``
(a macro waiting for its weight beats), ``memory`` (DRAM bandwidth) or ``attention`` (the
attention engine).

Energies (45 nm, 0.9 V unless stated; M. Horowitz, "Computing's energy problem (and what we
can do about it)", ISSCC 2014, Fig. 1.1.9, as :mod:`flexcim.golden.energy`):

* DRAM 1.3-2.6 nJ per 64-bit access: **20.3 pJ/bit** (the low end, 1.3 nJ / 64).
* SRAM, 64-bit access: 1 MB 100 pJ, 32 KB 20 pJ: the weight buffer **1.56 pJ/bit** (1 MB
  figure), the activation SRAM **0.31 pJ/bit** (32 KB figure, per bank); writes = reads
  (assumption, as in energy.py).
* Attention MAC: 8-bit multiply 0.2 pJ + 32-bit add 0.1 pJ = **0.3 pJ**.
* Macro actions: :data:`flexcim.golden.energy.ENERGY_45NM` (dense activations).

Assumptions that are not from a source (change them in :class:`MemorySystem`): clock 500 MHz;
DRAM bandwidth 25.6 GB/s (the peak of one 64-bit LPDDR4-3200 interface, 3200 MT/s x 8 B, a
JEDEC speed grade); weight buffer 2 MiB, activation SRAM 256 KiB; attention engine 256 int8
MACs per cycle; leakage **1 nW per storage bit** (the order of magnitude of published 45 nm 6T
cell simulations; logic leakage is not counted).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flexcim.golden import energy, perf
from flexcim.spec import layouts
from flexcim.spec.config import ACT_BITS, WEIGHT_BITS, HwConfig
from flexcim.spec.nm import NMPattern
from flexcim.spec.timing import result_latency

from flexcim.errors import FlexCimError

# ----------------------------------------------------------------------------- model shapes
MODELS_DIR = Path(__file__).parent / "models"
"""Shipped ``config.json`` shape fields of public LLMs (one JSON file per model)."""

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
"""The linears of a Llama-style decoder block, by module path inside the block (Hugging Face)."""

BLOCK_PATH = "model.layers"
"""Module path of the decoder blocks in a Hugging Face Llama-style model."""

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2")
"""``model_type`` values with Llama-style blocks (q/k/v/o attention, gated MLP)."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-style decoder LLM (no weights), from its ``config.json``.

    Parameters
    ----------
    name : str
    hidden, intermediate : int
        ``hidden_size`` and ``intermediate_size``.
    heads, kv_heads, head_dim : int
        Attention heads, key/value heads (grouped-query attention) and channels per head.
    layers : int
        Decoder blocks.
    vocab : int
        Vocabulary (rows of the LM head).
    """

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    def linears(self) -> dict[str, tuple[int, int]]:
        """``{projection: (out_features, in_features)}`` of one block (:data:`PROJECTIONS`)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        shapes = ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))
        return dict(zip(PROJECTIONS, shapes, strict=True))

    @property
    def block_params(self) -> int:
        return sum(c * k for c, k in self.linears().values())


def known_models() -> list[str]:
    """Names accepted by :func:`load_model_shape` besides a path."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def model_shape(config: Mapping, name: str) -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face ``config.json`` dict; one FlexCimError line
    when it is not a Llama-style decoder LLM or a shape field is missing."""
    if not isinstance(config, Mapping):
        raise FlexCimError(f"{name}: a model config must be a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if (config.get("is_encoder_decoder") or model_type not in DECODERS
            or (archs and not any(str(a).endswith("ForCausalLM") for a in archs))):
        raise FlexCimError(
            f"{name}: model_type {model_type!r} (architectures {list(archs)}) is not a "
            f"Llama-style decoder LLM; expected model_type one of {', '.join(DECODERS)} "
            "and a *ForCausalLM architecture")
    fields = {}
    for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                "num_hidden_layers", "vocab_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlexCimError(f"{name}: {key} must be a positive integer, not {value!r}")
        fields[key] = value
    heads = fields["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or fields["hidden_size"] // heads
    for key, value in (("num_key_value_heads", kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlexCimError(f"{name}: {key} must be a positive integer, not {value!r}")
    if heads % kv_heads:
        raise FlexCimError(f"{name}: num_key_value_heads={kv_heads} must divide "
                           f"num_attention_heads={heads}")
    return ModelShape(name=name, hidden=fields["hidden_size"],
                      intermediate=fields["intermediate_size"], heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, layers=fields["num_hidden_layers"],
                      vocab=fields["vocab_size"])


def load_model_shape(name_or_path: str | os.PathLike) -> ModelShape:
    """A shipped model by name (:func:`known_models`) or any ``config.json`` path."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = MODELS_DIR / f"{name_or_path}.json"
        if not shipped.is_file():
            raise FlexCimError(f"model config {os.fspath(name_or_path)!r} is neither a file nor "
                               f"one of {', '.join(known_models())}")
        path = shipped
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlexCimError(f"model config {os.fspath(path)!r} is not readable JSON: {exc}"
                           ) from None
    return model_shape(config, path.stem if path.parent == MODELS_DIR else os.fspath(path))


# ----------------------------------------------------------------------------- plans
def _projection_kind(name: str, where: str) -> str:
    for kind in PROJECTIONS:
        if name == kind or name.endswith("." + kind) or name == kind.split(".")[1]:
            return kind
    raise FlexCimError(f"{where} names projection {name!r}, which a Llama-style block does not "
                       f"have; expected one of {', '.join(PROJECTIONS)}")


HEAD_PATH = "lm_head"
"""The LM head's module path in a Llama-style model, as a flow plan names it (``flexcim flow
select --method auto --lm-head``)."""


def plan_head(plan) -> NMPattern:
    """The LM head's pattern in ``plan``: a flow plan's ``layers["lm_head"]`` (or a
    ``{"patterns": [...], "lm_head": "N:M"}`` object), else dense."""
    if isinstance(plan, Mapping):
        layers = plan.get("layers") if plan.get("format") == "flexcim-plan" else plan
        if isinstance(layers, Mapping) and HEAD_PATH in layers:
            return NMPattern.parse(layers[HEAD_PATH])
    return NMPattern(1, 1)


def _plan_blocks(plan) -> list[tuple[dict[str, NMPattern], dict[NMPattern, bool | None]]]:
    """The plan's blocks in order: ``({projection kind: pattern}, {pattern: mask_24})``; a kind
    missing from the dict runs with the block's ``"*"`` pattern."""
    if isinstance(plan, str | NMPattern | tuple):
        return [({"*": NMPattern.parse(plan)}, {})]
    if isinstance(plan, Sequence) and not isinstance(plan, str):
        plan = {"patterns": list(plan)}
    if not isinstance(plan, Mapping):
        raise FlexCimError(f"a plan must be a pattern, a list of patterns or a JSON object, "
                           f"not {type(plan).__name__}")
    if "patterns" in plan:  # per-block pattern list
        patterns = plan["patterns"]
        if not isinstance(patterns, list) or not patterns:
            raise FlexCimError("plan 'patterns' must be a non-empty list like ['2:4', '1:1']")
        return [({"*": NMPattern.parse(p)}, {}) for p in patterns]
    if plan.get("format") == "flexcim-plan":  # flow.select.Plan.to_dict()
        blocks, per_layer = plan.get("blocks"), plan.get("layers") or {}
        if not isinstance(blocks, list) or not blocks or not isinstance(per_layer, Mapping):
            raise FlexCimError("a flexcim-plan needs a non-empty 'blocks' list and a 'layers' map")
        out = []
        for i, block in enumerate(blocks):
            if not isinstance(block, Mapping) or "pattern" not in block:
                raise FlexCimError(f"plan block {i} must be an object with a 'pattern'")
            prefix = f"{block.get('name', '')}."
            # an auto plan's block may be "mixed": its projections' own patterns then decide
            mixed = block["pattern"] == "mixed"
            kinds = {} if mixed else {"*": NMPattern.parse(block["pattern"])}
            for name, pattern in per_layer.items():
                if str(name).startswith(prefix):
                    kinds[_projection_kind(str(name), f"plan block {i}")] = NMPattern.parse(pattern)
            out.append((kinds, {}))
        unclaimed = [n for n in per_layer if n != HEAD_PATH
                     and not any(str(n).startswith(f"{b.get('name', '')}.") for b in blocks)]
        if unclaimed:
            raise FlexCimError(f"plan layer {unclaimed[0]!r} belongs to no block of the plan")
        return out
    # golden.energy plan: one entry per block, or per pattern group of a block (an auto plan's
    # entries "model.layers.3[q_proj,o_proj]"): the groups of one block are merged, each
    # pattern keeping its own mask_24
    merged: dict[str, tuple[dict[str, NMPattern], dict[NMPattern, bool | None]]] = {}
    for layer in energy.parse_plan(plan):
        kinds, masks = merged.setdefault(layer.name.split("[", 1)[0], ({}, {}))
        kinds.setdefault("*", layer.pattern)
        masks[layer.pattern] = layer.mask_24
        for name, _, _ in layer.linears:
            kinds[_projection_kind(name, f"plan layer {layer.name!r}")] = layer.pattern
    return list(merged.values())


def map_plan(plan, shape: ModelShape) -> tuple[energy.PlanLayer, ...]:
    """The plan's patterns on every block of ``shape``, as :class:`energy.PlanLayer` entries.

    ``plan`` is a pattern (``"2:4"``: every block), a per-block list (``["2:4", "1:1", ...]`` or
    ``{"patterns": [...]}``), a flow plan (:meth:`flexcim.flow.select.Plan.to_dict`) or a
    :func:`flexcim.golden.energy.parse_plan` plan (``mask_24`` kept for the fixed-2:4 baseline).
    The plan gives patterns only; the shapes come from ``shape``.  A tuple of
    :class:`energy.PlanLayer` (a plan this function mapped already) is returned as it is.

    **Different block counts.**  A plan of ``B_p`` blocks maps onto a model of ``B_m`` blocks by
    relative depth: model block ``i`` takes plan block ``floor(i * B_p / B_m)``.  Equal counts
    map one to one; a 30-block SmolLM2 plan on 32-block Llama-2-7B repeats two of its blocks;
    a one-entry plan is uniform.  Projections within a block may differ in pattern (one entry
    per pattern group, in :data:`PROJECTIONS` order).
    """
    if isinstance(plan, tuple) and plan and isinstance(plan[0], energy.PlanLayer):
        return plan
    blocks = _plan_blocks(plan)
    linears = shape.linears()
    out = []
    for i in range(shape.layers):
        kinds, masks = blocks[i * len(blocks) // shape.layers]
        groups: dict[NMPattern, list] = {}
        for kind, (c, k) in linears.items():
            pattern = kinds.get(kind) or kinds.get("*")
            if pattern is None:
                raise FlexCimError(f"the plan gives no pattern for the {kind} projection of "
                                   f"block {i} of {shape.name}")
            if k % pattern.m:
                raise FlexCimError(f"{shape.name} {kind}: in_features={k} is not a multiple of "
                                   f"M={pattern.m} (pattern {pattern})")
            groups.setdefault(pattern, []).append((f"{BLOCK_PATH}.{i}.{kind}", c, k))
        for pattern, group in groups.items():
            out.append(energy.PlanLayer(f"{BLOCK_PATH}.{i}", pattern, tuple(group),
                                        masks.get(pattern)))
    return tuple(out)


# ----------------------------------------------------------------------------- accelerator
def _positive(owner: str, name: str, value, integer: bool = False) -> None:
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 \
            or (isinstance(value, float) and math.isinf(value)):
        raise FlexCimError(f"{owner} {name} must be a positive {'integer' if integer else 'number'}"
                           f", not {value!r}")


@dataclasses.dataclass(frozen=True)
class MemorySystem:
    """Clock, memories, attention engine and their energies (sources: the module docstring).

    Parameters
    ----------
    clock_hz : float
        Clock of macros, buffers and attention engine (assumption: 500 MHz).
    dram_gb_per_s : float
        DRAM bandwidth in GB/s (1e9 bytes/s); 25.6 = one 64-bit LPDDR4-3200 interface.
    dram_pj_per_bit : float
        DRAM access energy per bit (Horowitz: 1.3 nJ per 64-bit access).
    weight_buffer_bytes, weight_buffer_pj_per_bit : int, float
        On-chip weight buffer (SRAM) size and access energy per bit (Horowitz 1 MB: 100 pJ/64 b).
    act_sram_bytes, act_sram_pj_per_bit : int, float
        On-chip activation SRAM size and access energy per bit (Horowitz 32 KB: 20 pJ/64 b).
    attn_macs_per_cycle, attn_pj_per_mac : int, float
        Attention engine throughput and energy per int8 MAC (0.2 pJ multiply + 0.1 pJ add).
    kv_bits : int
        Bits per KV-cache element (int8).
    leakage_nw_per_bit : float
        Static power per storage bit (assumption, see the module docstring).
    """

    clock_hz: float = 500e6
    dram_gb_per_s: float = 25.6
    dram_pj_per_bit: float = 1300 / 64
    weight_buffer_bytes: int = 2 * 2**20
    weight_buffer_pj_per_bit: float = 100 / 64
    act_sram_bytes: int = 256 * 2**10
    act_sram_pj_per_bit: float = 20 / 64
    attn_macs_per_cycle: int = 256
    attn_pj_per_mac: float = 0.2 + 0.1
    kv_bits: int = 8
    leakage_nw_per_bit: float = 1.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            integer = field.name in ("weight_buffer_bytes", "act_sram_bytes",
                                     "attn_macs_per_cycle", "kv_bits")
            _positive("memory system", field.name, getattr(self, field.name), integer)

    @property
    def dram_bits_per_cycle(self) -> float:
        return self.dram_gb_per_s * 8e9 / self.clock_hz

    def dram_cycles(self, bits: int) -> int:
        """Cycles to move ``bits`` through DRAM at full bandwidth, rounded up."""
        return math.ceil(bits * self.clock_hz / (self.dram_gb_per_s * 8e9))


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """``macros`` macros of ``cfg`` sharing one :class:`MemorySystem`.

    Parameters
    ----------
    cfg : HwConfig
    macros : int
    memory : MemorySystem
    compact_indices : bool
        Store (DRAM, weight buffer) every weight load as the packed stream of
        :func:`flexcim.spec.layouts.pack_compact`: 8 value bits per kept weight and, per group
        of N cell rows and column, one ``ceil(log2 C(M, N))``-bit code of the kept positions
        (none for a dense block) instead of the beat's ``index_bits`` per weight; bus words of
        the beat width, the load's last word zero-padded, charged
        :func:`flexcim.spec.layouts.compact_bits` per load.  The unpacker between the buffer
        and a macro, :class:`flexcim.hw.unpack.WeightUnpacker`, decodes those words into the
        macro's weight beats, one beat per cycle (tests/hw/test_unpack.py, where it drives a
        macro: results and cycles as without it).  Every macro has one, and its energy is
        charged to the weight traffic: :func:`flexcim.golden.energy.unpack_pj` of the beats it
        emits and the words it takes (an upper bound; the dense and fixed-2:4 baselines of
        :func:`compare` have theirs, of their own configurations).  Default False: the memory
        system stores the beats as the macro receives them, and there is no unpacker.

    The macros' weight port (``cfg.weight_port_rows``) and its overlap with compute
    (``cfg.weight_overlap``) are fields of the :class:`~flexcim.spec.config.HwConfig`, as built.
    """

    cfg: HwConfig
    macros: int = 16
    memory: MemorySystem = MemorySystem()
    compact_indices: bool = False

    def __post_init__(self):
        if not isinstance(self.cfg, HwConfig):
            raise FlexCimError(f"cfg must be a HwConfig, not {type(self.cfg).__name__}")
        _positive("accelerator", "macros", self.macros, integer=True)
        if not isinstance(self.compact_indices, bool):
            raise FlexCimError(f"compact_indices must be True or False, not "
                               f"{self.compact_indices!r}")
        if not isinstance(self.memory, MemorySystem):
            raise FlexCimError(f"memory must be a MemorySystem, not {type(self.memory).__name__}")

    def baseline(self, patterns: Sequence[str]) -> Accelerator:
        """The same accelerator with macros that support only ``patterns`` (same cells)."""
        return dataclasses.replace(self, cfg=self.cfg.replace(patterns=tuple(patterns)))

    @property
    def storage_bits(self) -> int:
        """Bits that leak: every macro's weight/index words and activation buffer banks, the
        weight buffer and the activation SRAM."""
        cfg = self.cfg
        macro = cfg.cells * cfg.depth * (WEIGHT_BITS + cfg.index_bits) + 2 * cfg.max_k * ACT_BITS
        return (self.macros * macro
                + 8 * (self.memory.weight_buffer_bytes + self.memory.act_sram_bytes))

    @property
    def static_w(self) -> float:
        return self.storage_bits * self.memory.leakage_nw_per_bit * 1e-9


BASELINES = {"dense": ("1:1",), "fixed24": ("1:1", "2:4")}
"""Baseline macros with the same cells: a dense one and a fixed-2:4 one."""

BOUNDS = ("compute", "weight port", "memory", "attention")
CATEGORIES = ("compute", "weight traffic", "activation traffic", "attention", "static")
"""Where a step's energy goes (:class:`StepCost`)."""


@functools.lru_cache(maxsize=64)
def weight_beat_bits(cfg: HwConfig) -> int:
    """Bits of one weight beat: ``weight_port_rows * cols`` values and indices (spec.layouts)."""
    return layouts.weight_layout(cfg).size


@dataclasses.dataclass(frozen=True)
class ProjectionCost:
    """One projection of one step on the accelerator.

    Members
    -------
    cycles : int
        ``max(macro_cycles, dram_cycles)``.
    macro_cycles : int
        The busiest macro, first command to last result (``perf.layer_cycles`` for one macro).
    compute_cycles, port_cycles : int
        The busiest macro's cycles without weight loading, and the cycles weight loading adds
        (the part of the load that compute does not hide: all of it without
        ``weight_overlap``).
    dram_cycles : int
        Weight bits over the DRAM bandwidth, rounded up (0 when the weights are resident).
    weight_bits : int
        Bits of the weight beats (values + indices + padding).
    act_bits, result_bits, psum_bits : int
        Activation beats read from the activation SRAM, result beats written to it, partial
        sums read back and added there (K chunks after the first).
    macro_pj : dict
        :data:`flexcim.golden.energy.ACTIONS` energies of the macros.
    packed_words : int
        With ``compact_indices``: the bus words of the packed stream the macros' weight
        unpackers take (:func:`flexcim.spec.layouts.compact_words` per load), else 0.
    unpack_pj : float
        With ``compact_indices``: the unpackers' energy
        (:func:`flexcim.golden.energy.unpack_pj` of the weight beats and ``packed_words``),
        else 0 (no unpacker).
    """

    cycles: int
    macro_cycles: int
    compute_cycles: int
    port_cycles: int
    dram_cycles: int
    weight_bits: int
    act_bits: int
    result_bits: int
    psum_bits: int
    macro_pj: dict
    packed_words: int = 0
    unpack_pj: float = 0.0

    @property
    def bound(self) -> str:
        if self.dram_cycles > self.macro_cycles:
            return "memory"
        return "weight port" if self.port_cycles > self.compute_cycles else "compute"


@functools.lru_cache(maxsize=4096)
def projection_cost(acc: Accelerator, pattern: NMPattern, tokens: int, c: int, k: int,
                    resident: bool = False) -> ProjectionCost:
    """Cycles, traffic and macro energy of ``y = x @ W.T`` (``x [tokens, k]``, ``W [c, k]``)
    with ``pattern`` on ``acc`` (see the module docstring for the tiling)."""
    cfg = acc.cfg
    # Timing and activity do not depend on a tile's column count (a partial tile loads and
    # computes full rows of zeros), so one column tile's schedule, repeated, is the layer's.
    cmds = perf.schedule(cfg, pattern, tokens, k, min(c, cfg.cols))
    col_tiles = -(-c // cfg.cols)
    timing = {}  # (k, tokens, load) -> (busy, busy without the weight load)
    chunk = []  # per K chunk of a column tile: [compute cycles, RTL cycles]
    for cmd in cmds:
        key = (cmd.k, cmd.tokens, cmd.load_weights)
        if key not in timing:
            bare = dataclasses.replace(cmd, load_weights=False)
            timing[key] = (perf.command_timing(cfg, cmd).busy,
                           perf.command_timing(cfg, bare).busy)
        busy, bare = timing[key]
        if cmd.load_weights:
            chunk.append([0, 0])
        chunk[-1][0] += bare
        chunk[-1][1] += busy
    # Tile i (column tile i // chunks, K chunk i % chunks) runs on macro i % macros.
    table = np.array(chunk, dtype=np.int64)
    tile = np.arange(col_tiles * len(chunk))
    macro, kind = tile % acc.macros, tile % len(chunk)
    serial = np.bincount(macro, weights=table[kind, 1], minlength=acc.macros)
    bare = np.bincount(macro, weights=table[kind, 0], minlength=acc.macros)
    busiest = np.lexsort((bare, serial))[-1]
    time, compute = int(serial[busiest]), int(bare[busiest])
    port_cycles = time - compute
    macro_cycles = time + result_latency(cfg)

    groups = Counter((cmd.k, cmd.tokens, cmd.load_weights) for cmd in cmds)
    macro_pj = dict.fromkeys(energy.ACTIONS, 0.0)
    events = dict.fromkeys(energy.EVENTS, 0)
    for (kk, tt, load), count in groups.items():
        cmd = perf.Command(pattern, kk, tt, load)
        for name, pj in energy.command_activity(cfg, cmd).energy_pj().items():
            macro_pj[name] += col_tiles * count * pj
        for name, n in energy.command_events(cfg, cmd).items():
            events[name] += col_tiles * count * n
    weight_bits = events["weight_beats"] * weight_beat_bits(cfg)
    packed_words, unpack_pj = 0, 0.0
    if acc.compact_indices:  # each load's packed stream, its last word padded (see Accelerator)
        packed_words = sum(col_tiles * count * layouts.compact_words(
            cfg, pattern, cfg.weight_beats(pattern, kk)) for (kk, _, load), count in groups.items()
            if load)
        weight_bits = packed_words * layouts.compact_bus_bits(cfg)
        unpack_pj = energy.unpack_pj(cfg, pattern, events["weight_beats"], packed_words)
    chunks = len(chunk)
    result_bits = col_tiles * sum(cmd.tokens for cmd in cmds) * layouts.result_layout(cfg).size
    dram = 0 if resident else acc.memory.dram_cycles(weight_bits)
    return ProjectionCost(
        cycles=max(macro_cycles, dram), macro_cycles=macro_cycles, compute_cycles=compute,
        port_cycles=port_cycles, dram_cycles=dram, weight_bits=weight_bits,
        act_bits=events["act_beats"] * cfg.in_lanes * ACT_BITS, result_bits=result_bits,
        psum_bits=result_bits * (chunks - 1) // chunks, macro_pj=macro_pj,
        packed_words=packed_words, unpack_pj=unpack_pj)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One step (``tokens`` new tokens against a KV cache of ``kv_len``) of a whole model.

    Members
    -------
    cycles : int
        Projections and attention one after another (:attr:`cycles_by_bound` sums to it).
    seconds : float
    energy_pj : dict
        By :data:`CATEGORIES`.
    cycles_by_bound : dict
        Cycles of the projections and attention steps limited by each of :data:`BOUNDS`.
    weight_bits : int
        Weight bits moved into the macros (= from DRAM unless ``resident``).
    dram_bits : int
        Bits read from or written to DRAM: weights, KV cache, embeddings.
    resident : bool
        Whether all weights fit the weight buffer (no DRAM weight traffic).
    packed_words, unpack_pj : int, float
        The packed words the weight unpackers take and their energy (in ``weight traffic``),
        0 without ``compact_indices``.
    blocks : tuple
        ``(name, pattern run, cycles, pJ without static)`` per plan entry, then the LM head.
    """

    tokens: int
    kv_len: int
    cycles: int
    seconds: float
    energy_pj: dict
    cycles_by_bound: dict
    weight_bits: int
    dram_bits: int
    resident: bool
    blocks: tuple
    packed_words: int = 0
    unpack_pj: float = 0.0

    @property
    def total_pj(self) -> float:
        return sum(self.energy_pj.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def pj_per_token(self) -> float:
        return self.total_pj / self.tokens

    @property
    def bound(self) -> str:
        """The bound of most of the step's cycles."""
        return max(BOUNDS, key=lambda b: self.cycles_by_bound[b])

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "kv_len": self.kv_len, "cycles": self.cycles,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s,
                "pj_per_token": self.pj_per_token, "energy_pj": dict(self.energy_pj),
                "cycles_by_bound": dict(self.cycles_by_bound), "bound": self.bound,
                "weight_bits": self.weight_bits, "dram_bits": self.dram_bits,
                "resident": self.resident, "packed_words": self.packed_words,
                "unpack_pj": self.unpack_pj}


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FlexCimError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def head_layer(shape: ModelShape, head: NMPattern | str = "1:1") -> energy.PlanLayer:
    """The LM head (``vocab x hidden``) as a plan entry with pattern ``head`` (dense by default:
    no flow plan prunes it, docs/flow.md "pruning the LM head"); one FlexCimError line when the
    pattern's M does not divide the hidden size."""
    pattern = NMPattern.parse(head)
    if shape.hidden % pattern.m:
        raise FlexCimError(f"{shape.name} lm_head: in_features={shape.hidden} is not a multiple "
                           f"of M={pattern.m} (pattern {pattern})")
    return energy.PlanLayer("lm_head", pattern, (("lm_head", shape.vocab, shape.hidden),))


def step_cost(acc: Accelerator, shape: ModelShape, plan, tokens: int, kv_len: int = 0, *,
              head: NMPattern | str = "1:1") -> StepCost:
    """Latency and energy of one step of ``shape`` with ``plan`` (see :func:`map_plan`) on
    ``acc``: prefill = ``tokens`` prompt tokens with ``kv_len = 0``; decode = ``tokens = 1``.

    Each plan entry runs with :func:`flexcim.golden.energy.pattern_on` (a pattern the macro
    lacks runs as 2:4 on a fixed-2:4 macro when its masks allow, else dense); the LM head runs
    with ``head`` (dense by default; :func:`head_layer`) by the same rule, for the step's last
    token only (the logits that pick the next token).
    """
    if _count("tokens", tokens) < 1:
        raise FlexCimError(f"tokens must be a positive integer, not {tokens!r}")
    _count("kv_len", kv_len)
    layers = map_plan(plan, shape)
    mem, cfg = acc.memory, acc.cfg
    head_entry = head_layer(shape, head)
    jobs = [(layer.name, energy.pattern_on(cfg, layer), c, k, tokens)
            for layer in layers for _, c, k in layer.linears]
    jobs.append(("lm_head", energy.pattern_on(cfg, head_entry), shape.vocab, shape.hidden, 1))
    # Resident when every weight beat of one step fits the buffer at once.
    total_weight_bits = sum(projection_cost(acc, p, 1, c, k, True).weight_bits
                            for _, p, c, k, _ in jobs)
    resident = total_weight_bits <= 8 * mem.weight_buffer_bytes

    energy_pj = dict.fromkeys(CATEGORIES, 0.0)
    by_bound = dict.fromkeys(BOUNDS, 0)
    cycles = weight_bits = dram_bits = packed_words = 0
    unpack = 0.0
    rows: dict[tuple[str, str], list] = {}
    add = energy.ENERGY_45NM.add_per_bit
    for name, pattern, c, k, t in jobs:
        cost = projection_cost(acc, pattern, t, c, k, resident)
        pj = cost.macro_pj
        weight = pj["weight_write"] + cost.unpack_pj + cost.weight_bits * (
            mem.weight_buffer_pj_per_bit * (1 if resident else 2))  # read (+ write: streamed)
        if not resident:
            weight += cost.weight_bits * mem.dram_pj_per_bit
            dram_bits += cost.weight_bits
        parts = {
            "compute": sum(v for a, v in pj.items() if a != "weight_write"),
            "weight traffic": weight,
            "activation traffic": (cost.act_bits + cost.result_bits + cost.psum_bits)
            * mem.act_sram_pj_per_bit + cost.psum_bits * add,
        }
        for key, value in parts.items():
            energy_pj[key] += value
        cycles += cost.cycles
        by_bound[cost.bound] += cost.cycles
        weight_bits += cost.weight_bits
        packed_words += cost.packed_words
        unpack += cost.unpack_pj
        row = rows.setdefault((name, str(pattern)), [0, 0.0])
        row[0] += cost.cycles
        row[1] += sum(parts.values())

    # Attention: per block, QK^T and AV over the cache and the step's causal triangle.
    pairs = tokens * kv_len + tokens * (tokens + 1) // 2
    macs = 2 * shape.heads * shape.head_dim * pairs
    kv_row = 2 * shape.kv_heads * shape.head_dim * mem.kv_bits  # one token's K and V
    kv = kv_row * (kv_len + tokens) + kv_row * tokens  # read every row once, write new rows
    qo = 2 * tokens * shape.heads * shape.head_dim * ACT_BITS  # queries in, outputs out
    attn_compute = -(-macs // mem.attn_macs_per_cycle)
    attn_dram = mem.dram_cycles(kv)
    attn = max(attn_compute, attn_dram)
    cycles += shape.layers * attn
    by_bound["attention" if attn_compute >= attn_dram else "memory"] += shape.layers * attn
    energy_pj["attention"] += shape.layers * macs * mem.attn_pj_per_mac
    energy_pj["activation traffic"] += shape.layers * (
        kv * mem.dram_pj_per_bit + qo * mem.act_sram_pj_per_bit)
    dram_bits += shape.layers * kv
    embed = tokens * shape.hidden * ACT_BITS  # int8 embedding rows from DRAM
    energy_pj["activation traffic"] += embed * mem.dram_pj_per_bit
    dram_bits += embed

    seconds = cycles / mem.clock_hz
    energy_pj["static"] = acc.static_w * seconds * 1e12
    return StepCost(tokens=tokens, kv_len=kv_len, cycles=cycles, seconds=seconds,
                    energy_pj=energy_pj, cycles_by_bound=by_bound, weight_bits=weight_bits,
                    dram_bits=dram_bits, resident=resident,
                    blocks=tuple((n, p, cy, e) for (n, p), (cy, e) in rows.items()),
                    packed_words=packed_words, unpack_pj=unpack)


def runs_as(acc: Accelerator, shape: ModelShape, plan, head: NMPattern | str = "1:1"
            ) -> dict[str, str]:
    """The plan's patterns (the LM head's included) that ``acc``'s macros lack, each with the
    pattern it runs as instead (:func:`flexcim.golden.energy.pattern_on`): ``{"3:4": "1:1"}``.
    Empty when the macro runs the plan as written."""
    layers = map_plan(plan, shape)
    out = {}
    for layer in (*layers, head_layer(shape, head)):
        run = energy.pattern_on(acc.cfg, layer)
        if run != layer.pattern:
            out[str(layer.pattern)] = str(run)
    return out


def compare(acc: Accelerator, shape: ModelShape, plan, *, tokens: int, kv_len: int,
            head: NMPattern | str = "1:1") -> dict:
    """Prefill (``tokens`` tokens) and one decode step (KV cache ``kv_len``) of ``plan`` on
    ``acc`` and on the dense and fixed-2:4 baselines (:data:`BASELINES`), JSON-ready:
    ``{"flexcim"|"dense"|"fixed24": {"prefill": ..., "decode": ..., "runs_as": ...}}`` plus
    ratios baseline / FlexCiM (> 1: FlexCiM better); ``runs_as`` (:func:`runs_as`) names the
    plan's patterns that accelerator runs as another.  ``head``: the LM head's pattern, for every
    accelerator as it can run it (:func:`step_cost`)."""
    layers = map_plan(plan, shape)
    accs = {"flexcim": acc, **{n: acc.baseline(p) for n, p in BASELINES.items()}}
    out = {name: {"prefill": step_cost(a, shape, layers, tokens, 0, head=head).to_dict(),
                  "decode": step_cost(a, shape, layers, 1, kv_len, head=head).to_dict(),
                  "runs_as": runs_as(a, shape, layers, head)}
           for name, a in accs.items()}
    for name in BASELINES:
        for phase in ("prefill", "decode"):
            mine, ref = out["flexcim"][phase], out[name][phase]
            ref["latency_vs_flexcim"] = ref["seconds"] / mine["seconds"]
            ref["energy_vs_flexcim"] = ref["pj_per_token"] / mine["pj_per_token"]
    return out
