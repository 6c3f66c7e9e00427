"""golden.energy: hand-computed activity counts, gating by zero activations, plans."""

import json

import numpy as np
import pytest
from flexcim.golden import energy, perf
from flexcim.golden.prune import act_topk, nm_prune
from flexcim.spec.config import PRESETS
from flexcim.spec.nm import NMPattern, NMTensor

from flexcim.errors import FlexCimError

TINY = PRESETS["tiny"]  # P=2, R=4, C=4, b=2, in_lanes=4, acc 20, patterns up to M=16 (8 codes)


def test_command_activity_hand_computed():
    # 2:4, K=16: pass width 8*4/2 = 16 -> one pass of 8/2 = 4 cycles; 3 tokens -> 12 cycles.
    cmd = perf.Command(NMPattern(2, 4), k=16, tokens=3, load_weights=True, c=4)
    counts = energy.command_activity(TINY, cmd).counts
    assert counts == {
        "cell_mac": 12 * 32 * 2,  # cycles x cells x b
        "adder_tree": 12 * 2 * 4 * 3 * 12,  # cycles x P x cols x x (8+2+log2 4)
        "merge_accumulate": 12 * 4 * (1 * (12 + 1) + 20),  # (P-1)(w+1) + acc_bits
        "buffer_write": 3 * 4 * 4 * 8,  # tokens x beats x lanes x 8
        "buffer_read": 3 * 1 * 16 * 8,  # tokens x passes x pass width x 8
        # (routing + 1 + log2 M gates per cell) x b + passes x cells x 3 log2 M decoder gates
        "distribution": 12 * (ROUTE_24 + 32 * 3) * 2 + 3 * 32 * 6,
        "weight_write": 8 * 4 * (8 + 4),  # one pass of 8 rows x cols x (value + index)
    }
    pj = energy.Activity(counts).energy_pj()
    assert pj["cell_mac"] == pytest.approx(768 * 0.025)
    assert pj["buffer_read"] == pytest.approx(384 * 10 / 64)
    assert pj["distribution"] == pytest.approx(counts["distribution"] * 0.1 / 32)


# The distribution stages of tiny's 2:4 by a naive loop over the spec's routing rule: row r,
# lane i < M of pattern N:M takes window lane (r div N)*M + i; a lane past M is tied to 0.
ROUTE_24 = sum(
    (len({(r // p.n) * p.m + i if i < p.m else None for p in TINY.patterns}) - 1).bit_length()
    for r in range(8) for i in range(4))


def test_only_the_lanes_of_the_commands_m_switch():
    """Two patterns by hand: row r's lane 0 is window lane r (1:1) or (r div 2)*4 (2:4): two
    alternatives (one stage) except row 0; lanes 1..3 are 2:4's or tied low (one stage)."""
    cfg = TINY.replace(patterns=("1:1", "2:4"))
    assert energy.route_stages(cfg, NMPattern(2, 4)) == 7 + 8 * 3
    assert energy.route_stages(cfg, NMPattern(1, 1)) == 7
    dense_cmd = perf.Command(NMPattern(1, 1), k=8, tokens=1, load_weights=False, c=4)
    sparse_cmd = perf.Command(NMPattern(2, 4), k=16, tokens=3, load_weights=False, c=4)
    # 1:1 bypasses the cells' trees: only the distribution's 7 stages per cycle and bit.
    assert energy.command_events(cfg, dense_cmd)["select_muxes"] == 0
    assert energy.command_activity(cfg, dense_cmd).counts["distribution"] == 4 * 7 * 2
    # 2:4: 3 selection gates per cell switch (the enabled lane's AND, two levels up to the
    # tap), as on a fixed-2:4 macro; per pass (3 here, one per token) each cell's decoder
    # switches at most 3 gates per live index bit (2 bits), one bit wide.
    assert energy.command_events(cfg, sparse_cmd)["select_muxes"] == 12 * 32 * 3
    assert energy.command_activity(cfg, sparse_cmd).counts["distribution"] == (
        12 * (31 + 96) * 2 + 3 * 32 * 6)
    # On tiny (M up to 16) 2:4 switches the same cell gates: the unused M are free.
    assert energy.command_events(TINY, sparse_cmd)["select_muxes"] == 12 * 32 * 3


def test_the_cell_selection_switches_log2_m_gates_not_m():
    """1 + log2 M gates per cell and cycle (a one-hot AND-OR network), where a multiplexer
    tree switched M - 1: 8:16 on tiny switches 5, not 15; the decoder 3 log2 M per pass."""
    patterns = [NMPattern.parse(p) for p in ("1:1", "1:2", "2:4", "4:8", "8:16")]
    assert [energy.select_gates(TINY, p) for p in patterns] == [
        0, 2, 3, 4, 5]
    assert [energy.decode_gates(TINY, p) for p in patterns] == [
        0, 3, 6, 9, 12]
    cmd = perf.Command(NMPattern(8, 16), k=32, tokens=2, load_weights=False, c=4)
    events = energy.command_events(TINY, cmd)
    assert events["passes"] == 2 * TINY.passes("8:16", 32)
    assert events["select_muxes"] == events["compute_cycles"] * TINY.cells * 5
    assert events["select_muxes"] < events["compute_cycles"] * TINY.cells * (16 - 1)
    assert energy.command_activity(TINY, cmd).counts["distribution"] == (
        (events["route_bits"] + events["select_muxes"]) * 2 + events["passes"] * TINY.cells * 12)
    # A dense-only macro has no selection at all.
    assert energy.select_gates(PRESETS["dense"], NMPattern(1, 1)) == energy.decode_gates(
        PRESETS["dense"], NMPattern(1, 1)) == 0


def test_zero_activations_gate_only_the_cells_and_adder_trees():
    cmd = perf.Command(NMPattern(1, 1), k=32, tokens=2, load_weights=False, c=4)
    full = energy.command_activity(TINY, cmd, 1.0).counts
    half = energy.command_activity(TINY, cmd, 0.5).counts
    for name in energy.ACTIONS:
        ratio = 0.5 if name in ("cell_mac", "adder_tree") else 1.0
        assert half[name] == pytest.approx(full[name] * ratio), name
    assert full["weight_write"] == 0  # no load_weights
    with pytest.raises(FlexCimError, match="act_density must be from 0 to 1, not 1.5"):
        energy.command_activity(TINY, cmd, 1.5)


def test_dense_only_macro_has_no_distribution_or_index_cost():
    dense = PRESETS["dense"]
    cmd = perf.Command(NMPattern(1, 1), k=576, tokens=1, load_weights=True, c=16)
    counts = energy.command_activity(dense, cmd).counts
    assert counts["distribution"] == 0
    assert counts["weight_write"] == 8 * 72 * 16 * 8  # 8 passes x 72 rows x 16 cols x 8 bits


def test_buffer_reads_stop_at_the_end_of_the_bank():
    """A pass reads its pass width, except the lanes of a last pass past max_k, which are in
    no memory: on default, 1:4 (288 lanes) with K = 1536 = max_k runs 6 passes, the last one
    96 lanes wide; 1:8 (576) 3 passes, the last 384 wide.  Lanes past K inside the bank are
    read (the padding weights multiply them)."""
    cfg = PRESETS["default"]
    for pattern, k, lanes in (("1:4", 1536, 1536), ("1:8", 1536, 1536), ("1:4", 1500, 1536),
                              ("1:4", 1400, 1440), ("1:1", 500, 504), ("2:4", 1152, 1152)):
        assert energy.read_lanes(cfg, pattern, k) == lanes, (pattern, k)
        cmd = perf.Command(NMPattern.parse(pattern), k=k, tokens=3, load_weights=False, c=16)
        assert energy.command_events(cfg, cmd)["buffer_read_bits"] == 3 * lanes * 8
        assert energy.command_activity(cfg, cmd).counts["buffer_read"] == 3 * lanes * 8


def test_layer_cost_sums_commands_and_matches_perf_cycles():
    # K=64 > max_k_for(1:1) = min(128, 4*8) = 32: two K chunks; C=6 > cols=4: two tiles.
    cost = energy.layer_cost(TINY, "1:1", 5, 64, 6)
    cmds = perf.schedule(TINY, "1:1", 5, 64, 6)
    assert cost.cycles == perf.layer_cycles(TINY, cmds)
    by_hand = sum(energy.command_activity(TINY, c).counts["buffer_read"] for c in cmds)
    assert cost.energy_pj["buffer_read"] == pytest.approx(by_hand * 10 / 64)
    assert cost.total_pj == pytest.approx(sum(cost.energy_pj.values()))


def test_sparser_pattern_costs_less_compute_energy_on_the_same_macro():
    dense = energy.layer_cost(TINY, "1:1", 4, 64, 4)
    sparse = energy.layer_cost(TINY, "1:4", 4, 64, 4)
    assert sparse.energy_pj["cell_mac"] == pytest.approx(dense.energy_pj["cell_mac"] / 4)
    assert sparse.cycles < dense.cycles


PLAN = {
    "layers": [
        {"name": "b0", "pattern": "1:1", "linears": {"q": [16, 16]}},
        {"name": "b1", "pattern": "1:8", "linears": {"q": [16, 16], "up": [32, 16]}},
        {"name": "b2", "pattern": "4:8", "linears": [[16, 16]]},
        {"name": "b3", "pattern": "4:8", "linears": [[16, 16]], "mask_24": True},
    ]
}


def test_patterns_on_baselines():
    layers = energy.parse_plan(PLAN)
    fixed24, dense, flex = PRESETS["fixed24"], PRESETS["dense"], PRESETS["default"]
    assert [str(energy.pattern_on(fixed24, layer)) for layer in layers] == [
        "1:1", "2:4", "1:1", "2:4"]  # 1:8 always satisfies 2:4; 4:8 only when recorded
    assert {str(energy.pattern_on(dense, layer)) for layer in layers} == {"1:1"}
    assert [str(energy.pattern_on(flex, layer)) for layer in layers] == [
        "1:1", "1:8", "4:8", "4:8"]
    assert energy.runs_as_24(energy.PlanLayer("x", NMPattern(2, 8), ()))
    assert not energy.runs_as_24(energy.PlanLayer("x", NMPattern(8, 16), ()))


def test_prefill_cost_is_the_sum_of_its_linears_and_compare_ratios():
    cfg = PRESETS["default"]
    cost = energy.prefill_cost(cfg, PLAN, 8)
    expected = sum(
        perf.estimate(cfg, p, 8, k, c).cycles
        for p, shapes in (("1:1", [(16, 16)]), ("1:8", [(16, 16), (32, 16)]),
                          ("4:8", [(16, 16)]), ("4:8", [(16, 16)]))
        for c, k in shapes
    )
    assert cost.cycles == expected
    assert [row[0] for row in cost.layers] == ["b0", "b1", "b2", "b3"]
    table = energy.compare(PLAN, 8, {n: PRESETS[n] for n in ("default", "dense", "fixed24")})
    assert table["fixed24"]["latency_vs_ref"] == 1.0
    ref = energy.prefill_cost(PRESETS["fixed24"], PLAN, 8)
    assert table["default"]["energy_vs_ref"] == pytest.approx(ref.total_pj / cost.total_pj)
    json.dumps(table)  # JSON-ready
    # per-linear activation density: only the named linears are gated
    names = [n for layer in energy.parse_plan(PLAN) for n, _, _ in layer.linears]
    half = energy.prefill_cost(cfg, PLAN, 8, act_density=0.5)
    one = energy.prefill_cost(cfg, PLAN, 8, act_density={"up": 0.5})  # b1's up only
    assert energy.prefill_cost(cfg, PLAN, 8, act_density={}).total_pj == cost.total_pj
    assert energy.prefill_cost(cfg, PLAN, 8, act_density=dict.fromkeys(names, 0.5)).total_pj \
        == pytest.approx(half.total_pj)
    solo = (energy.layer_cost(cfg, "1:8", 8, 16, 32).total_pj
            - energy.layer_cost(cfg, "1:8", 8, 16, 32, act_density=0.5).total_pj)
    assert cost.total_pj - one.total_pj == pytest.approx(solo) and solo > 0
    assert one.cycles == cost.cycles


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ([], "a plan must be a JSON object with a list 'layers'"),
        ({"layers": []}, "the plan has no layers"),
        ({"layers": [{"name": "b0", "linears": {"q": [4, 4]}}]}, r"plan layer 0 \(b0\) has no"),
        ({"layers": [{"pattern": "2:4", "linears": {"q": [4, 0]}}]}, r"linear q: a linear shape"),
        ({"layers": [{"pattern": "2:8", "linears": {"q": [4, 12]}}]}, "not a multiple of M=8"),
        ({"layers": [{"pattern": "2:4", "linears": {}}]}, "has no linears"),
        ({"layers": [{"pattern": "2:4", "linears": [[4, 4]], "mask_24": "yes"}]}, "mask_24"),
    ],
)
def test_bad_plans_raise_one_line(plan, message):
    with pytest.raises(FlexCimError, match=message):
        energy.parse_plan(plan)


def test_load_plan_errors(tmp_path):
    with pytest.raises(FlexCimError, match="cannot read plan"):
        energy.load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(FlexCimError, match="is not valid JSON"):
        energy.load_plan(bad)
    good = tmp_path / "plan.json"
    good.write_text(json.dumps(PLAN))
    assert len(energy.load_plan(good)) == 4
    with pytest.raises(FlexCimError, match="tokens must be a positive integer"):
        energy.prefill_cost(PRESETS["tiny"], PLAN, 0)


# ------------------------------------------------------------- exact gating from the operands


def _mac_cycles_by_cell(cfg, x, w):
    """Naive reference of energy.mac_cycles: walk the schedule as the macro does (weight beat
    q -> row q mod R_tot, word q div R_tot; row r of pass p sees the M lanes from
    p*pass_width + (r div N)*M; slice s of the selected activation), cell by cell."""
    from flexcim.golden.host import weight_tile
    from flexcim.spec.layouts import weight_rows

    b = cfg.act_bits_per_cycle
    count = 0
    for cmd in perf.schedule(cfg, w.pattern, x.shape[0], w.in_features, w.out_features):
        values, indices = weight_rows(cfg, weight_tile(w, cmd.c0, cmd.c, cmd.k0, cmd.k))
        n, m, pw = cmd.pattern.n, cmd.pattern.m, cfg.pass_width(cmd.pattern)
        for t in range(cmd.tokens):
            acts = x[cmd.t0 + t, cmd.k0 : cmd.k0 + cmd.k].view(np.uint8).astype(int)
            for q in range(values.shape[0]):
                p, r = divmod(q, cfg.rows_total)
                for col in range(cfg.cols):
                    if values[q, col] == 0:
                        continue
                    a = acts[p * pw + (r // n) * m + indices[q, col]]
                    count += sum((a >> s) & ((1 << b) - 1) != 0 for s in range(0, 8, b))
    return count


def test_nonzero_slices_hand_computed():
    x = np.array([[0, 1, -1, 64, -128, 3]], dtype=np.int8)
    # bits: 0, 00000001, 11111111, 01000000, 10000000, 00000011
    assert energy.nonzero_slices(x, 1).tolist() == [[0, 1, 8, 1, 1, 2]]
    assert energy.nonzero_slices(x, 2).tolist() == [[0, 1, 4, 1, 1, 1]]
    assert energy.nonzero_slices(x, 4).tolist() == [[0, 1, 2, 1, 1, 1]]
    assert energy.nonzero_slices(x, 8).tolist() == [[0, 1, 1, 1, 1, 1]]
    with pytest.raises(FlexCimError, match="slice_bits must be 1, 2, 4 or 8, not 3"):
        energy.nonzero_slices(x, 3)
    assert energy.slice_density(x, 1) == pytest.approx((0 + 1 + 8 + 1 + 1 + 2) / 48)
    assert energy.slice_density(x, 8) == pytest.approx(5 / 6)


@pytest.mark.parametrize("b", [1, 2, 8])
@pytest.mark.parametrize("pattern, act", [("2:4", None), ("1:8", "8:16"), ("1:1", "2:4")])
def test_mac_cycles_equals_the_cell_by_cell_walk(b, pattern, act):
    """K over two chunks, C over two tiles (unused columns), T over two commands' worth of
    tokens: the closed form and the walk must agree exactly."""
    cfg = TINY.replace(act_bits_per_cycle=b, max_tokens=3)
    rng = np.random.default_rng(b)
    p = NMPattern.parse(pattern)
    k = (cfg.max_k_for(p) // 16 + 1) * 16  # whole groups of the 8:16 top-k too
    x = rng.integers(-128, 128, size=(5, k), dtype=np.int8)
    x[:, ::3] = 0
    x[1] = rng.integers(-2, 3, size=k)  # small values: upper slices zero (or all ones)
    if act:
        x = act_topk(x, act)
    w = nm_prune(rng.integers(-128, 128, size=(cfg.cols + 2, k), dtype=np.int8), p)
    w[0, : k // 2] = 0  # zero weights: no multiplication
    w = NMTensor.compress(w, p)
    assert energy.mac_cycles(cfg, x, w) == _mac_cycles_by_cell(cfg, x, w)


def test_gated_density_replaces_the_global_estimate_in_layer_cost():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(4, 64), dtype=np.int8)
    w = NMTensor.compress(nm_prune(rng.integers(-128, 128, size=(4, 64), dtype=np.int8), "2:4"),
                          "2:4")
    cmds = perf.schedule(TINY, "2:4", 4, 64, 4)
    cells_cycles = perf.ideal_cycles(TINY, cmds) * TINY.cells
    density = energy.gated_density(TINY, x, w)
    assert density == energy.mac_cycles(TINY, x, w) / cells_cycles
    # 2-bit slices of uniform int8 are zero a quarter of the time; weights ~1/256.
    assert 0.70 < density < 0.80
    exact = energy.layer_cost(TINY, "2:4", 4, 64, 4, operands=(x, w))
    estimate = energy.layer_cost(TINY, "2:4", 4, 64, 4, act_density=density)
    assert exact.energy_pj == estimate.energy_pj
    with pytest.raises(FlexCimError, match=r"do not match the layer \[4, 32\]"):
        energy.layer_cost(TINY, "2:4", 4, 32, 4, operands=(x, w))


def test_layer_events_count_what_the_model_multiplies():
    cmds = perf.schedule(TINY, "1:4", 300, 160, 6)  # 2 tiles x 2 chunks x 2 token blocks
    events = energy.layer_events(TINY, cmds)
    assert events == {
        "compute_cycles": perf.ideal_cycles(TINY, cmds),
        "passes": sum(c.tokens * TINY.passes("1:4", c.k) for c in cmds),
        "act_beats": sum(c.tokens * -(-c.k // TINY.in_lanes) for c in cmds),
        "weight_beats": sum(TINY.passes("1:4", c.k) * 8 for c in cmds if c.load_weights),
        "route_bits": perf.ideal_cycles(TINY, cmds) * energy.route_stages(TINY, NMPattern(1, 4)),
        "select_muxes": perf.ideal_cycles(TINY, cmds) * TINY.cells * 3,
        "quiet_faults": 0,
        # every pass reads its 32 lanes once per slice (4 passes of 32 fill the 128-lane bank)
        "buffer_read_bits": sum(c.tokens * TINY.passes("1:4", c.k) * 32 * 8 for c in cmds),
    }
    total = dict.fromkeys(energy.ACTIONS, 0.0)
    for cmd in cmds:
        for name, v in energy.command_activity(TINY, cmd).counts.items():
            total[name] += v
    assert total["buffer_write"] == events["act_beats"] * TINY.in_lanes * 8
    assert total["buffer_read"] == events["buffer_read_bits"]
    assert total["weight_write"] == events["weight_beats"] * TINY.cols * (8 + 4)
    assert total["distribution"] == (events["route_bits"] + events["select_muxes"]) * 2 + (
        events["passes"] * TINY.cells * 6)


def test_pattern_energies_price_the_pattern_set():
    configs = {name: PRESETS[name] for name in ("flex8", "default")}
    rows = energy.pattern_energies(configs, tokens=4, k=576, c=32)
    assert [(r["preset"], r["pattern"]) for r in rows] == [
        (name, str(p)) for name, cfg in configs.items() for p in cfg.patterns]
    by = {(r["preset"], r["pattern"]): r for r in rows}
    for (name, pattern), row in by.items():
        cost = energy.layer_cost(configs[name], pattern, 4, 576, 32)
        assert row["cycles"] == cost.cycles and row["energy_pj"] == pytest.approx(cost.total_pj)
    for pattern in ("1:1", "2:4", "1:8"):
        d, f = by["flex8", pattern], by["default", pattern]
        # Same geometry, same cycles; the M = 16 set pays a 16:1 lane selection instead of 8:1,
        # 4 mux levels instead of 3 (10 codes) and a 4-bit index per weight instead of 3.
        assert f["cycles"] == d["cycles"]
        for action in ("cell_mac", "adder_tree", "buffer_read", "buffer_write"):
            assert f["energy_by_action_pj"][action] == d["energy_by_action_pj"][action]
        fd, dd = f["energy_by_action_pj"], d["energy_by_action_pj"]
        assert fd["distribution"] >= dd["distribution"]  # deeper one-hot routing, 16:1 taps
        assert fd["weight_write"] / dd["weight_write"] == pytest.approx(12 / 11)
    # 12:16 (25 %) on default: 6 passes of 96 channels per token instead of 8 of 72.
    assert by["default", "12:16"]["cycles"] < by["default", "1:1"]["cycles"]
    table = energy.format_pattern_energies(rows, "flex8")
    assert "| 12:16 | 25.0 % |" in table and table.count("\n") == 1 + 11


def test_pattern_energies_cli(capsys, tmp_path):
    from flexcim.cli import main

    out = tmp_path / "rows.json"
    assert main(["energy", "--presets", "fixed24,flex8", "--tokens", "2", "--c", "16",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 1:8 | 87.5 % |" in text and "| flex8 / flex8 |" not in text
    assert len(json.loads(out.read_text())) == 2 + 6
    assert main(["energy", "--presets", "dense"]) == 2
    assert "--reference 'flex8' is not one of --presets ['dense']" in capsys.readouterr().err
    assert main(["energy", "--tokens", "0"]) == 2
    assert "tokens must be a positive integer, not 0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]  # no temporary left
    assert main(["energy", "--presets", "dense", "--reference", "",
                 "--json", str(tmp_path / "no" / "rows.json")]) == 2
    captured = capsys.readouterr()
    assert "output directory" in captured.err and captured.out == ""  # before any work


# ----------------------------------------------------------------------------- weight unpacker
TINY24 = TINY.replace(patterns=("1:1", "2:4"))


def test_unpack_bits_hand_computed():
    """tiny with {1:1, 2:4}: 4 columns, one row a beat (hw/unpack.py's structure, by hand)."""
    # Bus word = a beat: 4 x (8 + 2) = 40 bits; values 32; 2:4 codes 4 x 3 = 12; g = 4 bits.
    # 2:4 beats alternate 32 + 12 = 11 granules (a group starts) and 8; max_step 11, a word 10
    # granules: buffer (11 + 10 - 1) x 4 = 80 bits; step 0..11 (4 bits), fill 0..20 (5 bits).
    gearbox = 80 * (4 + 5 + 1)  # two shifters' stages and the OR, 80 bits each
    # need: 4 passes of (4 x 11 + 4 x 8) granules = 304 -> 9 bits; pattern 1 bit; groups of 2
    # span beats: left 1 bit, a 3-bit rank (C(4, 2) = 6 codes) per column.
    ff = 80 + 5 + 9 + 1 + 1 + 4 * 3
    # Table: 3 binomials of 3 bits (S = 6) selected by k in 0..2 (2 levels); per column the
    # rank in 3, 4 one-hot gates, index (2 bits) and entry (3 bits) ORs over 3 lanes; one
    # source of codes, so no code multiplexer.
    decoder = 3 * 3 * 2 + 4 * (3 + 4 + 3 * (2 + 3))
    compare = 4 * (3 * 3 + 3)  # 3 comparators of 3 bits and a 3-bit subtractor per column
    assert energy.unpack_bits(TINY24) == {"gearbox": gearbox, "decoder": decoder,
                                          "compare": compare, "ff": ff}
    assert (gearbox, decoder, compare, ff) == (800, 106, 48, 108)
    e = energy.ENERGY_45NM
    assert energy.unpack_event_pj(TINY24, "2:4") == pytest.approx(
        (800 + 106 + 108) * e.mux_per_bit + 48 * e.add_per_bit)
    # 1:1 reads no code: the decoder holds, the gearbox and registers still switch
    assert energy.unpack_event_pj(TINY24, "1:1") == pytest.approx(908 * e.mux_per_bit)
    # a dense-only macro's unpacker is a gearbox: no decoder at all
    dense = energy.unpack_bits(TINY.replace(patterns=("1:1",)))
    assert dense["decoder"] == dense["compare"] == 0 and dense["gearbox"] > 0


def test_unpack_pj_scales_with_the_beats_and_words_the_rtl_counts():
    one = energy.unpack_event_pj(TINY24, "2:4")
    assert energy.unpack_pj(TINY24, "2:4", 8, 8) == pytest.approx(16 * one)
    assert energy.unpack_pj(TINY24, "2:4", 16, 15) == pytest.approx(31 * one)
    assert energy.unpack_pj(TINY24, "2:4", 0, 0) == 0
    cheap = energy.ActionEnergies(mux_per_bit=0.001, add_per_bit=0.002)
    assert energy.unpack_pj(TINY24, "2:4", 1, 0, cheap) == pytest.approx(
        (800 + 106 + 108) * 0.001 + 48 * 0.002)
    with pytest.raises(FlexCimError, match="not supported|not one of|pattern"):
        energy.unpack_event_pj(TINY24, "4:8")


@pytest.mark.parametrize("preset, sets", [
    ("tiny", ()), ("tiny3", ()), ("dense", ()), ("fixed24", ()), ("flex8", ()), ("default", ()),
    ("tiny", ("weight_port_rows=2",)), ("default", ("weight_port_rows=3",)),
    ("default", ("weight_port_rows=9",)),
])
def test_unpack_registers_are_the_rtls(preset, sets):
    """The model's flip-flops are the generator's, register by register summed
    (hw/unpack.py's WeightUnpacker.register_bits, which make synth checks in the netlist)."""
    from flexcim.hw.area import unpacker_bits  # WeightUnpacker.register_bits(), summed

    cfg = PRESETS[preset].with_overrides(sets)
    assert energy.unpack_bits(cfg)["ff"] == unpacker_bits(cfg)


def test_unpack_bits_bound_the_synthesised_unpacker():
    """Against the gates and flip-flops Yosys maps each preset's unpacker to (make synth's
    record, docs/area.json): the structural count is never below the netlist's cells (so one
    switch of each is an upper bound), and not far above them (< 1.6x)."""
    from flexcim.hw import area

    if not area.RECORD.is_file():
        pytest.skip("no docs/area.json (an installed wheel)")
    recorded = json.loads(area.RECORD.read_text())["presets"]
    assert {"dense", "fixed24", "flex8", "default"} <= set(recorded)
    for name, row in recorded.items():
        gates = row["unpacker"]["gates"]
        assert row["unpacker"]["ff_bits"] == energy.unpack_bits(PRESETS[name])["ff"]
        count = sum(energy.unpack_bits(PRESETS[name]).values())
        assert gates <= count < 1.6 * gates, (name, gates, count)
