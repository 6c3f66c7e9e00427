"""golden.system: a hand-computed toy accelerator, equality with golden.perf and the weight
beats, plan mapping, model configs, bad input and the speed of a 7B-class plan."""

import dataclasses
import json
import time

import numpy as np
import pytest
from flexcim.golden import energy, host, perf, system
from flexcim.golden.prune import nm_prune
from flexcim.spec import layouts
from flexcim.spec.config import PRESETS
from flexcim.spec.nm import NMPattern, NMTensor

from flexcim.errors import FlexCimError

TINY = PRESETS["tiny"]  # P=2, R=4 (8 rows), C=4, depth 4, b=2 (4 cycles/pass), 4 lanes, acc 20
TOY = system.ModelShape(name="toy", hidden=16, intermediate=32, heads=2, kv_heads=1, head_dim=8,
                        layers=1, vocab=8)
# 1 GHz, 6.4 GB/s = 51.2 bits/cycle; round energies so the sums below are exact by hand.
MEM = system.MemorySystem(clock_hz=1e9, dram_gb_per_s=6.4, dram_pj_per_bit=20.0,
                          weight_buffer_bytes=1024, weight_buffer_pj_per_bit=1.5,
                          act_sram_bytes=1024, act_sram_pj_per_bit=0.25, attn_macs_per_cycle=16,
                          attn_pj_per_mac=0.3, kv_bits=8, leakage_nw_per_bit=1.0)


def toy_acc(**changes) -> system.Accelerator:
    return system.Accelerator(TINY, **{"macros": 2, "memory": MEM, **changes})


def test_decode_step_hand_computed():
    """One decode token (KV cache of 4) of a one-block toy model, every projection 2:4, on two
    tiny macros; every figure below is worked out from the timing rules of golden.perf."""
    step = system.step_cost(toy_acc(), TOY, "2:4", tokens=1, kv_len=4)
    # 2:4 on tiny: pass width 8*4/2 = 16; K=16 -> 1 pass, 8 weight beats, 4 act beats, 4 compute
    # cycles: act loaded at cycle 4, weights at 8, compute 9..12 -> busy 13 (9 without weights).
    # K=32 (down): 2 passes, 16 beats, 8 act beats, 8 cycles: compute 17..24 -> busy 25 (17).
    # lm_head dense (1:1, pass width 8): K=16 -> 2 passes, 16 beats, busy 25 (13).
    # Column tiles of 4 dealt round-robin to 2 macros; macro cycles = busiest + 2 (result).
    # Weight beat = 4 x 8 value bits + 4 x 4 index bits = 48 bits; DRAM 51.2 bits/cycle.
    rows = {  # name: (tiles, busy per tile, beats per tile) -> macro cycles, DRAM cycles
        "q": (4, 13, 8), "k": (2, 13, 8), "v": (2, 13, 8), "o": (4, 13, 8),
        "gate": (8, 13, 8), "up": (8, 13, 8), "down": (4, 25, 16), "lm_head": (2, 25, 16)}
    expected_cycles, memory, compute = 0, 0, 0
    for tiles, busy, beats in rows.values():
        macro = -(-tiles // 2) * busy + 2
        dram = -(-tiles * beats * 48 * 10 // 512)  # ceil(bits / 51.2)
        expected_cycles += max(macro, dram)
        if dram > macro:
            memory += dram
        else:
            compute += macro  # k, v: 15 cycles, of which 4 wait for weights (< 9 computing)
    assert (memory, compute) == (270, 30)
    # Attention: 2 x heads 2 x head_dim 8 x (4 cached + 1 new) = 160 MACs / 16 = 10 cycles;
    # KV int8: 2 x 1 kv head x 8 x 8 = 128 bits a row, 5 read + 1 written = 768 bits = 15 cycles.
    assert step.cycles == expected_cycles + 15 == 315
    assert step.cycles_by_bound == {"compute": 30, "weight port": 0, "memory": 285,
                                    "attention": 0}
    assert step.bound == "memory"
    weight_bits = 48 * (4 * 8 + 2 * 8 + 2 * 8 + 4 * 8 + 8 * 8 + 8 * 8 + 4 * 16 + 2 * 16)
    assert weight_bits == 15360 and step.weight_bits == weight_bits and not step.resident
    assert step.dram_bits == weight_bits + 768 + 16 * 8  # + the token's int8 embedding row
    assert step.seconds == pytest.approx(315e-9)
    e = step.energy_pj
    # DRAM 20 + buffer write and read 2 x 1.5 + the macro's weight-word write 10/64 pJ per bit.
    assert e["weight traffic"] == pytest.approx(15360 * (20 + 3 + 10 / 64))
    # Activation beats 4 lanes x 8 bits: q 4 tiles x 4 beats, k, v 2 x 4, o 4 x 4, gate, up
    # 8 x 4, down 4 x 8, lm_head 2 x 4 -> 152 beats = 4864 bits; 34 result beats of 4 x 20
    # bits; queries + outputs 2 x 2 x 8 x 8 bits; all at 0.25 pJ; KV + embedding at 20 pJ.
    assert e["activation traffic"] == pytest.approx((4864 + 34 * 80 + 256) * 0.25
                                                    + (768 + 128) * 20)
    assert e["attention"] == pytest.approx(160 * 0.3)
    # Leakage: 2 macros x (32 cells x 4 words x 12 bits + 2 x 128 x 8) + 8 x (1024 + 1024).
    assert e["static"] == pytest.approx((2 * (1536 + 2048) + 16384) * 1e-9 * 315e-9 * 1e12)
    macro = sum(energy.layer_cost(TINY, p, 1, k, c).total_pj
                - energy.layer_cost(TINY, p, 1, k, c).energy_pj["weight_write"]
                for p, c, k in [("2:4", c, k) for c, k in TOY.linears().values()]
                + [("1:1", 8, 16)])
    assert e["compute"] == pytest.approx(macro)
    assert step.tokens_per_s == pytest.approx(1 / 315e-9)


def test_prefill_attention_is_causal_and_the_head_sees_one_token():
    step = system.step_cost(toy_acc(), TOY, "2:4", tokens=3, kv_len=0)
    # Pairs 1 + 2 + 3 = 6: 2 x 2 heads x 8 x 6 = 192 MACs (12 cycles); KV rows 3 read + 3
    # written x 128 bits = 768 bits = 15 DRAM cycles: memory-bound.
    assert step.energy_pj["attention"] == pytest.approx(192 * 0.3)
    assert step.dram_bits == 15360 + 768 + 3 * 16 * 8
    lm_head = system.projection_cost(toy_acc(), NMPattern(1, 1), 1, 8, 16)
    q = system.projection_cost(toy_acc(), NMPattern(2, 4), 3, 16, 16)
    assert lm_head.result_bits == 2 * 80 and q.result_bits == 4 * 3 * 80
    assert step.tokens_per_s == pytest.approx(3 / step.seconds)
    projections = sum(system.projection_cost(toy_acc(), NMPattern(2, 4), 3, c, k).cycles
                      for c, k in TOY.linears().values())
    assert step.cycles == projections + lm_head.cycles + 15


def test_a_pruned_lm_head_runs_as_each_macro_can():
    """``head``: the LM head's pattern.  On the toy of the hand-computed decode step a 2:4 head
    runs like the 2:4 q projection (same shape): 2 tiles of 8 beats, busy 13 -> macro 15 = DRAM
    ceil(2 x 8 x 480 / 512) = 15 cycles (compute-bound), instead of the dense head's 2 tiles of
    16 beats (DRAM 30 cycles, memory-bound)."""
    dense = system.step_cost(toy_acc(), TOY, "2:4", tokens=1, kv_len=4)
    assert system.step_cost(toy_acc(), TOY, "2:4", tokens=1, kv_len=4, head="1:1") == dense
    pruned = system.step_cost(toy_acc(), TOY, "2:4", tokens=1, kv_len=4, head="2:4")
    assert pruned.cycles == 315 - 30 + 15
    assert pruned.cycles_by_bound == {"compute": 45, "weight port": 0, "memory": 255,
                                      "attention": 0}
    assert pruned.weight_bits == 15360 - 2 * 8 * 48
    assert dict(((n, p), e) for n, p, _, e in pruned.blocks)[("lm_head", "2:4")] > 0
    # The baselines run it as they can (energy.pattern_on): fixed24 runs 2:8 as 2:4 and 12:16
    # dense, the dense macro everything dense; FlexCiM runs its own patterns.
    shape = system.load_model_shape("smollm2-135m")
    acc = system.Accelerator(PRESETS["default"], compact_indices=True)
    fixed, dense_acc = acc.baseline(system.BASELINES["fixed24"]), acc.baseline(
        system.BASELINES["dense"])

    def decode(a, head):
        return system.step_cost(a, shape, "2:4", 1, 64, head=head)

    assert decode(fixed, "12:16") == decode(fixed, "1:1")
    assert decode(fixed, "2:8") == decode(fixed, "2:4") != decode(fixed, "1:1")
    assert decode(dense_acc, "2:4") == decode(dense_acc, "1:1")
    head_bits = {h: decode(acc, h).weight_bits - decode(acc, "1:1").weight_bits
                 for h in ("12:16", "8:16")}
    # 49,152 x 576 weights: 12:16 keeps 3/4 of the 8-bit values and adds an 11-bit code per
    # group of 16; 8:16 half, 14-bit codes (the padding of each load's last word aside).
    for h, kept, code in (("12:16", 0.75, 11), ("8:16", 0.5, 14)):
        expect = 49152 * 576 * (kept * 8 + code / 16 - 8)
        assert head_bits[h] == pytest.approx(expect, rel=2e-3), h
    result = system.compare(acc, shape, "2:4", tokens=8, kv_len=64, head="12:16")
    assert result["fixed24"]["decode"]["energy_vs_flexcim"] > system.compare(
        acc, shape, "2:4", tokens=8, kv_len=64)["fixed24"]["decode"]["energy_vs_flexcim"]
    with pytest.raises(FlexCimError, match="lm_head: in_features=16 is not a multiple of M=32"):
        system.step_cost(toy_acc(), TOY, "2:4", tokens=1, head="1:32")


def test_resident_weights_skip_dram():
    # 15,360 weight bits = 1,920 bytes: they fit a 1,920-byte buffer and stay there.
    acc = toy_acc(memory=dataclasses.replace(MEM, weight_buffer_bytes=1920))
    step = system.step_cost(acc, TOY, "2:4", tokens=1, kv_len=4)
    assert step.resident and step.dram_bits == 768 + 128
    assert step.energy_pj["weight traffic"] == pytest.approx(15360 * (1.5 + 10 / 64))
    # No DRAM wait: macro cycles of the projections (rows of the decode test) + attention 15.
    assert step.cycles == 2 * 28 + 2 * 15 + 2 * 54 + 52 + 27 + 15


def test_the_weight_port_follows_the_hw_config():
    """The macros load weights as their HwConfig says (the RTL's weight_port_rows and
    weight_overlap, checked against the RTL in tests/hw/test_top.py and every cocotb run)."""
    c, k = 16, 32  # 4 column tiles of tiny; 2:4 at K=32: 2 passes, 8 activation beats
    cost = {}
    for rows, overlap in [(1, 0), (1, 1), (2, 1), (4, 1)]:
        cfg = TINY.replace(weight_port_rows=rows, weight_overlap=overlap)
        cost[rows, overlap] = system.projection_cost(
            system.Accelerator(cfg, macros=1, memory=MEM), NMPattern(2, 4), 1, c, k, True)
        cmds = perf.schedule(cfg, NMPattern(2, 4), 1, k, c)
        assert cost[rows, overlap].macro_cycles == perf.layer_cycles(cfg, cmds)
    # Per tile, activations in at 8 and compute 8 cycles: 1 row/cycle and no overlap, the 16
    # beats end at 16, compute 17..24 (busy 25); with overlap pass 1 waits for word 1 (16):
    # 9..12, 17..20 (busy 21); 2 rows: words at 4 and 8, 9..16 (busy 17), the activations
    # decide; 4 rows too.  The beats of a tile carry the same bits whatever the port width.
    assert [cost[key].macro_cycles for key in [(1, 0), (1, 1), (2, 1), (4, 1)]] == [
        4 * 25 + 2, 4 * 21 + 2, 4 * 17 + 2, 4 * 17 + 2]
    assert [cost[key].port_cycles for key in [(1, 0), (1, 1), (2, 1), (4, 1)]] == [
        4 * 8, 4 * 4, 0, 0]
    assert len({cost[key].weight_bits for key in cost}) == 1
    assert cost[2, 1].compute_cycles == 4 * 17  # the commands' busy without a weight load
    # A SmolLM2 q projection decoded (1 token) on one default macro: one row per cycle spends
    # 72 cycles per pass loading against 8 computing (weight port bound); 9 rows per beat and
    # the overlap load a pass's word in the 8 cycles a pass computes (compute bound).
    cfg = PRESETS["default"]
    old, new = (system.projection_cost(system.Accelerator(c, macros=1, memory=MEM),
                                       NMPattern(2, 4), 1, 576, 576, True)
                for c in (cfg, cfg.replace(weight_port_rows=9, weight_overlap=1)))
    assert old.bound == "weight port" and new.bound == "compute"
    # 36 tiles of 4 passes: (1 + 288 + 32) per tile; (1 + 8 + 32) with the 9-row port.
    assert (old.macro_cycles, new.macro_cycles) == (36 * 321 + 2, 36 * 41 + 2)


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_one_macro_equals_golden_perf(preset):
    cfg = PRESETS[preset]
    acc = system.Accelerator(cfg, macros=1)
    rng = np.random.default_rng(1)
    for pattern in cfg.patterns:
        m = pattern.m
        for _ in range(3):
            tokens = int(rng.integers(1, 40))
            k = m * int(rng.integers(1, 2 * cfg.max_k_for(pattern) // m + 2))
            c = int(rng.integers(1, 3 * cfg.cols + 1))
            cost = system.projection_cost(acc, pattern, tokens, c, k, True)
            cmds = perf.schedule(cfg, pattern, tokens, k, c)
            assert cost.macro_cycles == perf.layer_cycles(cfg, cmds), (pattern, tokens, k, c)
            ref = energy.layer_cost(cfg, pattern, tokens, k, c).energy_pj
            assert cost.macro_pj == pytest.approx(ref)


def test_more_macros_split_the_tiles():
    cfg = PRESETS["default"]
    one = system.projection_cost(system.Accelerator(cfg, macros=1), NMPattern(2, 8), 1, 576,
                                 576, True)
    four = system.projection_cost(system.Accelerator(cfg, macros=4), NMPattern(2, 8), 1, 576,
                                  576, True)
    # 36 column tiles, one K chunk: 9 per macro.
    assert (one.macro_cycles - 2) == 4 * (four.macro_cycles - 2)
    assert one.macro_pj == four.macro_pj and one.weight_bits == four.weight_bits


@pytest.mark.parametrize(("preset", "pattern", "c", "k"), [
    ("tiny", "2:8", 12, 96),      # no padding: 3 full column tiles, whole passes
    ("tiny", "1:4", 10, 200),     # partial column tile, K in 4 chunks, partial last pass
    ("default", "2:4", 40, 576),  # three column tiles, the last one partial
    ("dense", "1:1", 16, 144),
])
def test_weight_bits_are_the_macro_weight_beats(preset, pattern, c, k):
    cfg = PRESETS[preset]
    rng = np.random.default_rng(7)
    dense = nm_prune(rng.integers(-128, 128, size=(c, k), dtype=np.int8), pattern)
    w = NMTensor.compress(dense, pattern)
    x = rng.integers(-128, 128, size=(3, k), dtype=np.int8)
    streams = host.layer_streams(cfg, x, w)
    cost = system.projection_cost(system.Accelerator(cfg, macros=3), NMPattern.parse(pattern),
                                  3, c, k)
    beat = 8 * cfg.cols + cfg.index_bits * cfg.cols
    assert cost.weight_bits == len(streams.weight_beats) * beat
    compressed = w.values.size * 8 + w.indices.size * cfg.index_bits
    if (preset, pattern) == ("tiny", "2:8"):  # no padding: exactly values + metadata
        assert cost.weight_bits == compressed
    else:
        assert cost.weight_bits >= compressed


def test_dense_blocks_carry_the_index_bits_on_a_flexible_macro():
    # The weight beat has an index field whatever the pattern: a 1:1 block on `default`
    # (4-bit indices) moves 12 bits per weight, on `fixed24` 10, on `dense` 8.
    bits = {name: system.projection_cost(system.Accelerator(PRESETS[name]), NMPattern(1, 1), 1,
                                         576, 576).weight_bits for name in ("default", "fixed24",
                                                                            "dense")}
    assert bits == {"default": 576 * 576 * 12, "fixed24": 576 * 576 * 10, "dense": 576 * 576 * 8}


@pytest.mark.parametrize("preset, sets, pattern, c, k", [
    ("tiny", (), "2:4", 8, 64),          # 4 passes of 304 bits: the last 48-bit word padded
    ("tiny", (), "1:1", 8, 32),          # 32 beats of 32 bits: padded
    ("default", (), "2:4", 576, 576),    # passes of 57 words (72 rows + 36 groups of 3-bit codes)
    ("default", (), "4:16", 40, 576 + 96),  # partial tile and pass, 64.5 words a pass
    ("default", ("weight_port_rows=9", "weight_overlap=1"), "1:1", 20, 576),  # 64 x 1152 bits
])
def test_compact_indices_charge_the_packed_stream_of_every_load(preset, sets, pattern, c, k):
    """With compact storage the weight traffic is the packed stream (hw/unpack.py's input) of
    every weight load of the projection: the host's weight beats of each load command, packed
    by spec.layouts.pack_compact, counted in whole bus words (the beat width), the last word's
    padding included.  That is never less than N/M of the dense values plus one
    ceil(log2 C(M, N))-bit code per group of M weights, equal to it without any padding, less
    than log2 M bits per kept weight would take, and never more than the full beats."""
    cfg = PRESETS[preset].with_overrides(sets)
    p = NMPattern.parse(pattern)
    rng = np.random.default_rng(c + k)
    w = NMTensor.compress(nm_prune(rng.integers(-128, 128, size=(c, k), dtype=np.int8), p), p)
    streams = host.layer_streams(cfg, rng.integers(-128, 128, size=(1, k), dtype=np.int8), w)
    acc = system.Accelerator(cfg, macros=2, compact_indices=True)
    cost = system.projection_cost(acc, p, 1, c, k)
    log2m = {1: 0, 4: 2, 8: 3, 16: 4}[p.m]  # by hand
    code = {"1:1": 0, "2:4": 3, "4:16": 11}[pattern]  # ceil(log2 C(M, N)), by hand
    word = (8 + cfg.index_bits) * cfg.cols * cfg.weight_port_rows  # the beat width, by hand
    packed_bits, beats_seen = 0, []
    for cmd in streams.commands:
        if not cmd.load_weights:
            continue
        beats = layouts.pack_weights(cfg, host.weight_tile(w, cmd.c0, cmd.c, cmd.k0, cmd.k))
        words = layouts.pack_compact(cfg, p, beats)
        # The unpacked beats hold the same non-zero weights at the same indices in every
        # group (in the canonical row order).
        back = layouts.unpack_compact(cfg, p, words, len(beats))
        before, after = layouts.unpack_weights(cfg, beats), layouts.unpack_weights(cfg, back)
        for g in range(0, len(before[0]), p.n):
            for col in range(cfg.cols):
                kept = [sorted((int(v[r, col]), int(i[r, col])) for r in range(g, g + p.n)
                               if v[r, col]) for v, i in (before, after)]
                assert kept[0] == kept[1]
        packed_bits += len(words) * word
        beats_seen += beats
    assert beats_seen == streams.weight_beats
    assert cost.weight_bits == packed_bits
    bound = c * k * p.n // p.m * 8 + c * k // p.m * code  # values + a code per group
    assert bound == w.values.size * 8 + w.values.size // p.n * code
    rows = len(streams.weight_beats) * cfg.weight_port_rows
    unpadded = rows * cfg.cols * 8 + rows // p.n * cfg.cols * code
    assert cost.weight_bits >= unpadded >= bound
    indexed = rows * cfg.cols * (8 + log2m)  # the same rows with a log2 M index per weight
    assert unpadded <= indexed and (unpadded < indexed) == (p.n > 1)
    if (preset, pattern) == ("default", "2:4"):  # whole tiles, passes and words: the bound
        assert cost.weight_bits == bound
    elif preset == "tiny" or sets or pattern == "4:16":  # padded words: more than the bound
        assert cost.weight_bits > unpadded
    full = system.projection_cost(system.Accelerator(cfg, macros=2), p, 1, c, k)
    assert full.weight_bits == len(streams.weight_beats) * word >= cost.weight_bits
    assert full.macro_pj == cost.macro_pj  # the macro writes its beats either way
    # The unpacker takes exactly the packed words and emits the host's beats, and is charged
    # for both; without compact storage there is no unpacker.
    assert cost.packed_words == packed_bits // word
    assert cost.unpack_pj == pytest.approx(energy.unpack_pj(
        cfg, p, len(streams.weight_beats), packed_bits // word)) and cost.unpack_pj > 0
    assert full.packed_words == 0 and full.unpack_pj == 0
    with pytest.raises(FlexCimError, match="compact_indices must be True or False, not 1"):
        system.Accelerator(cfg, compact_indices=1)


def test_map_plan_replicates_by_relative_depth():
    shape = dataclasses.replace(TOY, layers=6)
    layers = system.map_plan(["2:4", "1:8", "4:8"], shape)
    assert [str(layer.pattern) for layer in layers] == ["2:4", "2:4", "1:8", "1:8", "4:8", "4:8"]
    assert layers[3].name == "model.layers.3"
    assert [n for n, _, _ in layers[0].linears][0] == "model.layers.0.self_attn.q_proj"
    longer = system.map_plan({"patterns": ["2:4", "1:8", "4:8", "1:1"]},
                             dataclasses.replace(TOY, layers=2))
    assert [str(layer.pattern) for layer in longer] == ["2:4", "4:8"]


def test_map_plan_reads_flow_and_energy_plans():
    flow_plan = {"format": "flexcim-plan", "blocks": [
        {"index": 0, "name": "model.layers.0", "pattern": "2:8"}],
        "layers": {"model.layers.0.self_attn.q_proj": "2:8",
                   "model.layers.0.mlp.down_proj": "4:8"}}
    layers = system.map_plan(flow_plan, TOY)
    assert {str(layer.pattern): len(layer.linears) for layer in layers} == {"2:8": 6, "4:8": 1}
    energy_plan = {"layers": [{"name": "model.layers.0", "pattern": "4:8", "mask_24": True,
                               "linears": {"model.layers.0.self_attn.q_proj": [16, 16]}}]}
    (layer,) = system.map_plan(energy_plan, TOY)
    assert layer.mask_24 and len(layer.linears) == 7
    assert energy.pattern_on(PRESETS["fixed24"], layer) == NMPattern(2, 4)
    with pytest.raises(FlexCimError, match="names projection 'model.layers.0.mlp.fc1'"):
        system.map_plan({"layers": [{"name": "model.layers.0", "pattern": "2:4",
                                     "linears": {"model.layers.0.mlp.fc1": [16, 16]}}]}, TOY)
    with pytest.raises(FlexCimError, match="in_features=16 is not a multiple of M=32"):
        system.map_plan("1:32", TOY)


def test_shipped_model_configs():
    assert system.known_models() == ["llama-2-7b", "llama-3.2-1b", "smollm2-135m",
                                     "tinyllama-1.1b"]
    smol = system.load_model_shape("smollm2-135m")
    assert (smol.hidden, smol.intermediate, smol.heads, smol.kv_heads, smol.head_dim,
            smol.layers, smol.vocab) == (576, 1536, 9, 3, 64, 30, 49152)
    # SmolLM2-135M has 134,515,008 parameters: the blocks' projections, the tied embedding
    # and 61 RMSNorm weight vectors of 576.
    assert smol.block_params * smol.layers + smol.vocab * smol.hidden == 134_515_008 - 61 * 576
    big = system.load_model_shape("llama-2-7b")
    assert big.block_params * big.layers == 6_476_005_376  # + 2 x 131 M embeddings = 6.74 B
    assert big.linears()["mlp.down_proj"] == (4096, 11008)


def test_bad_input_is_one_line(tmp_path):
    bert = tmp_path / "config.json"
    bert.write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                "hidden_size": 768, "intermediate_size": 3072,
                                "num_attention_heads": 12, "num_hidden_layers": 12,
                                "vocab_size": 30522}))
    with pytest.raises(FlexCimError, match="model_type 'bert' .* is not a Llama-style decoder"):
        system.load_model_shape(bert)
    with pytest.raises(FlexCimError, match="neither a file nor one of llama-2-7b"):
        system.load_model_shape("gpt-5")
    with pytest.raises(FlexCimError, match="dram_gb_per_s must be a positive number, not 0"):
        system.MemorySystem(dram_gb_per_s=0)
    with pytest.raises(FlexCimError, match="macros must be a positive integer, not 0"):
        system.Accelerator(TINY, macros=0)
    with pytest.raises(FlexCimError, match="kv_len must be a non-negative integer, not -1"):
        system.step_cost(toy_acc(), TOY, "2:4", tokens=1, kv_len=-1)


def test_seven_b_plan_under_one_second():
    shape = system.load_model_shape("llama-2-7b")
    plan = ["1:1", "2:4", "2:8", "4:8", "1:4", "1:8"] * 5  # 30 blocks onto 32
    system.projection_cost.cache_clear()
    # CPU time of this process: the evaluation's cost, not the other jobs of a busy machine.
    start = time.process_time()
    result = system.compare(system.Accelerator(PRESETS["default"]), shape, plan, tokens=128,
                            kv_len=2048)
    elapsed = time.process_time() - start
    assert elapsed < 1.0, f"7B plan took {elapsed:.2f} s of CPU time"
    decode = result["flexcim"]["decode"]
    assert decode["bound"] == "memory" and not decode["resident"]
    # The dense baseline moves every weight, 8 bits each, with K padded to whole passes of 72
    # rows per 576-channel chunk: K = 4096 -> 4104 rows, K = 11008 -> 11016.
    padded = 32 * (4 * 4096 * 4104 + 2 * 11008 * 4104 + 4096 * 11016) + 32000 * 4104
    assert result["dense"]["decode"]["weight_bits"] == 8 * padded
    assert result["dense"]["decode"]["energy_vs_flexcim"] > 1


def test_map_plan_reads_an_auto_plan_with_mixed_blocks():
    """An auto plan gives a block's projections different patterns: its flow form says
    "mixed", its energy form has one entry per pattern group of the block."""
    q, down = "model.layers.{}.self_attn.q_proj", "model.layers.{}.mlp.down_proj"
    shape = dataclasses.replace(TOY, layers=2)
    flow_plan = {"format": "flexcim-plan", "blocks": [
        {"index": i, "name": f"model.layers.{i}", "pattern": "mixed"} for i in range(2)],
        "layers": {n.format(i): p for i in range(2) for n, p in ((q, "4:8"), (down, "1:1"))}}
    with pytest.raises(FlexCimError, match="no pattern for the self_attn.k_proj"):
        system.map_plan(flow_plan, shape)  # a mixed block must name every projection
    kinds = [k for k in shape.linears()]
    flow_plan["layers"] = {f"model.layers.{i}.{k}": ("4:8" if k == "self_attn.q_proj" else "2:8")
                           for i in range(2) for k in kinds}
    layers = system.map_plan(flow_plan, shape)
    assert sorted((lay.name, str(lay.pattern), len(lay.linears)) for lay in layers) == [
        ("model.layers.0", "2:8", 6), ("model.layers.0", "4:8", 1),
        ("model.layers.1", "2:8", 6), ("model.layers.1", "4:8", 1)]
    # energy form: two entries for block 0 (merged into one block), one for block 1
    energy_plan = {"layers": [
        {"name": "model.layers.0[q_proj]", "pattern": "2:4", "mask_24": True,
         "linears": {q.format(0): [16, 16]}},
        {"name": "model.layers.0[down_proj]", "pattern": "1:1", "mask_24": False,
         "linears": {down.format(0): [16, 16]}},
        {"name": "model.layers.1", "pattern": "1:8", "mask_24": False,
         "linears": {q.format(1): [16, 16]}}]}
    layers = system.map_plan(energy_plan, shape)
    by = {(lay.name, str(lay.pattern)): lay for lay in layers}
    assert set(by) == {("model.layers.0", "2:4"), ("model.layers.0", "1:1"),
                       ("model.layers.1", "1:8")}
    assert [n for n, _, _ in by["model.layers.0", "1:1"].linears] == [down.format(0)]
    assert by["model.layers.0", "2:4"].mask_24 and not by["model.layers.0", "1:1"].mask_24


def test_the_unpacker_is_charged_by_hand_on_a_toy_step():
    """One decode token of the toy model, every projection 2:4, on two tiny {1:1, 2:4} macros
    with packed weights: the weight traffic is the packed bits at DRAM + buffer write + read,
    the macros' weight-word writes, and the unpackers at unpack_event_pj per beat and word."""
    cfg = TINY.replace(patterns=("1:1", "2:4"))
    acc = system.Accelerator(cfg, macros=2, memory=MEM, compact_indices=True)
    step = system.step_cost(acc, TOY, "2:4", tokens=1, kv_len=4)
    # Per column tile of 4 (one weight load each): K=16 2:4 one pass, 8 beats of 40 bits;
    # packed 8 x 32 value bits + 4 groups x 4 x 3 code bits = 304 bits = 8 words of 40.
    # K=32 (down): 2 passes, 16 beats, 608 bits = 16 words (15.2).  lm_head 1:1, K=16: pass
    # width 8, 2 passes, 16 beats of 32 value bits = 512 bits = 13 words (12.8).
    tiles = {"q": 4, "k": 2, "v": 2, "o": 4, "gate": 8, "up": 8}  # K = 16
    beats = 8 * sum(tiles.values()) + 16 * 4  # + down's 4 tiles
    words = 8 * sum(tiles.values()) + 16 * 4
    head_beats, head_words = 16 * 2, 13 * 2
    assert step.packed_words == words + head_words
    pj_24, pj_11 = (energy.unpack_event_pj(cfg, p) for p in ("2:4", "1:1"))
    assert pj_11 < pj_24  # a 1:1 load does not run the decoder
    unpack = pj_24 * (beats + words) + pj_11 * (head_beats + head_words)
    assert step.unpack_pj == pytest.approx(unpack)
    bits = 40 * step.packed_words
    assert step.weight_bits == bits and not step.resident
    write = (beats + head_beats) * 40 * 10 / 64  # the macros' weight words, 8 + 2 bits a cell
    assert step.energy_pj["weight traffic"] == pytest.approx(bits * (20 + 3) + write + unpack)
    plain = system.step_cost(dataclasses.replace(acc, compact_indices=False), TOY, "2:4",
                             tokens=1, kv_len=4)
    assert plain.unpack_pj == 0 and plain.packed_words == 0
    assert plain.energy_pj["compute"] == pytest.approx(step.energy_pj["compute"])


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_every_accelerator_of_a_comparison_pays_its_own_unpacker(phase):
    """compare(): FlexCiM and the dense and fixed-2:4 baselines each charge their own
    unpacker, recomputed here from every loading command of perf.schedule (not the column-tile
    shortcut of projection_cost), and the weight traffic grows by exactly that."""
    shape = system.ModelShape(name="toy", hidden=64, intermediate=96, heads=2, kv_heads=1,
                              head_dim=32, layers=2, vocab=40)
    acc = system.Accelerator(TINY, macros=3, memory=MEM, compact_indices=True)
    plan = ["4:8", "2:4"]
    packed = system.compare(acc, shape, plan, tokens=5, kv_len=7)
    plain = system.compare(dataclasses.replace(acc, compact_indices=False), shape, plan,
                           tokens=5, kv_len=7)
    layers = system.map_plan(plan, shape)
    tokens = 5 if phase == "prefill" else 1
    for name, a in (("flexcim", acc), *((n, acc.baseline(p)) for n, p in
                                         system.BASELINES.items())):
        cfg = a.cfg
        jobs = [(energy.pattern_on(cfg, layer), c, k, tokens) for layer in layers
                for _, c, k in layer.linears] + [(NMPattern(1, 1), shape.vocab, shape.hidden, 1)]
        expected = words = 0
        for p, c, k, t in jobs:
            for cmd in perf.schedule(cfg, p, t, k, c):
                if cmd.load_weights:
                    b = cfg.weight_beats(p, cmd.k)
                    w = layouts.compact_words(cfg, p, b)
                    words += w
                    expected += energy.unpack_pj(cfg, p, b, w)
        mine = packed[name][phase]
        assert mine["packed_words"] == words
        assert mine["unpack_pj"] == pytest.approx(expected) and expected > 0
        assert plain[name][phase]["unpack_pj"] == 0
        assert mine["energy_pj"]["compute"] == pytest.approx(
            plain[name][phase]["energy_pj"]["compute"])
    # the unpacker of a richer pattern set costs more per word
    assert (energy.unpack_event_pj(TINY, "2:4")
            > energy.unpack_event_pj(acc.baseline(system.BASELINES["fixed24"]).cfg, "2:4"))
