import dataclasses
import itertools

import pytest
from flexcim.golden import perf
from flexcim.spec.config import DEFAULT, preset
from flexcim.spec.nm import NMPattern
from flexcim.spec.timing import RESULT_LATENCY

from flexcim.errors import FlexCimError


def tick_model(cfg, cmd):
    """Cycle-by-cycle walk of the rules in golden/perf.py's docstring, written independently:
    returns (busy, last_result).  Weight beats of ``weight_port_rows`` rows arrive one per
    cycle from cycle 1; a slice cycle of pass ``p`` may run when all beats arrived in earlier
    cycles or, with ``weight_overlap``, the beats of words ``0..p``."""
    passes = cfg.passes(cmd.pattern, cmd.k)
    per_word = cfg.rows_total // cfg.weight_port_rows
    wb = passes * per_word if cmd.load_weights else 0
    load_beats = -(-cmd.k // cfg.in_lanes)
    full = [False, False]  # registered bank flags
    wbank = rbank = 0
    loaded_tokens = beats = done_tokens = 0
    running, pass_, slice_ = False, 0, 0
    weights_in = 0  # weight beats accepted in earlier cycles
    cycle = 0
    last_end = None
    while done_tokens < cmd.tokens:
        cycle += 1
        set_full = clear_full = None
        words_in = weights_in // per_word  # words complete before this cycle
        all_in = weights_in == wb
        if weights_in < wb:
            weights_in += 1

        def word_ok(p, all_in=all_in, words_in=words_in):
            return all_in or (cfg.weight_overlap and words_in > p)

        # loader: one beat per cycle into a free bank
        if loaded_tokens < cmd.tokens and not full[wbank]:
            beats += 1
            if beats == load_beats:
                set_full, beats = wbank, 0
                loaded_tokens += 1
                wbank ^= 1
        # compute: a token starts when the bank flag (registered) says full and its first
        # word is in; a slice cycle runs only while the word of its pass is in
        if not running and full[rbank] and word_ok(0):
            running, pass_, slice_ = True, 0, 0
        if running and word_ok(pass_):
            slice_ += 1
            if slice_ == cfg.cycles_per_pass:
                slice_, pass_ = 0, pass_ + 1
                if pass_ == passes:
                    running = False
                    clear_full = rbank
                    rbank ^= 1
                    done_tokens += 1
                    last_end = cycle
        if set_full is not None:
            full[set_full] = True
        if clear_full is not None:
            full[clear_full] = False
    # The result: the registered column sums (and, with tree_pipeline, the adder trees'
    # register before them), then the result FIFO.
    return last_end + 1, last_end + RESULT_LATENCY + (1 if cfg.tree_pipeline else 0)


@pytest.mark.parametrize(
    "name, act_bits, pattern, k, tokens, load, port",
    [
        (name, b, p, k, t, load, (1, 0))
        for name, b, (p, k), t, load in itertools.product(
            ["tiny"], [1, 2, 8], [("1:1", 32), ("1:8", 64), ("8:16", 20 * 16 // 10)],
            [1, 2, 5], [True, False],
        )
    ] + [
        # N not a power of two: pass widths 32, 16 and 32 on 12 rows (K over 2-4 passes)
        ("tiny3", b, p, k, t, True, (1, 0))
        for b, (p, k), t in itertools.product(
            [1, 8], [("3:8", 80), ("12:16", 64), ("6:16", 64)], [1, 3],
        )
    ] + [
        # Weight port of 1, 2 or 4 rows (8, 4, 2 beats per word), with and without overlap.
        ("tiny", b, p, k, t, True, port)
        for b, (p, k), t, port in itertools.product(
            [1, 2, 8], [("1:1", 32), ("2:4", 64)], [1, 3], [(1, 1), (2, 0), (2, 1), (4, 1)],
        )
    ],
)
def test_command_timing_matches_a_cycle_by_cycle_walk(name, act_bits, pattern, k, tokens, load,
                                                      port):
    cfg = preset(name).replace(act_bits_per_cycle=act_bits, weight_port_rows=port[0],
                               weight_overlap=port[1])
    k = k // NMPattern.parse(pattern).m * NMPattern.parse(pattern).m
    cmd = perf.Command(NMPattern.parse(pattern), k, tokens, load)
    timing = perf.command_timing(cfg, cmd)
    assert (timing.busy, timing.last_result) == tick_model(cfg, cmd)


@pytest.mark.parametrize("name, act_bits, port", [
    ("tiny", 2, (1, 0)), ("tiny", 8, (1, 0)), ("tiny", 2, (2, 1)), ("tiny", 1, (1, 1)),
    ("tiny3", 2, (1, 0)), ("default", 1, (1, 0)), ("default", 1, (9, 1)),
])
def test_the_tree_pipeline_adds_one_result_cycle_and_nothing_else(name, act_bits, port):
    """With ``tree_pipeline`` every command keeps its busy cycles (the compute is pipelined
    across passes, tokens and commands) and its results come one cycle later: a layer takes one
    cycle more, for every pattern, K (one pass, several, several commands) and token count."""
    off = preset(name).replace(act_bits_per_cycle=act_bits, weight_port_rows=port[0],
                               weight_overlap=port[1])
    on = off.replace(tree_pipeline=1)
    for p in on.patterns:
        for k in (p.m, on.pass_width(p) + p.m, on.max_k_for(p) + p.m):
            for tokens in (1, 3):
                cmds = perf.schedule(on, p, tokens, k, on.cols + 1)
                assert perf.layer_cycles(on, cmds) == perf.layer_cycles(off, cmds) + 1
                for cmd in cmds[:2]:
                    t_on, t_off = perf.command_timing(on, cmd), perf.command_timing(off, cmd)
                    assert t_on.busy == t_off.busy
                    assert t_on.last_result == t_off.last_result + 1
                    if name != "default":  # the walk is slow for default's long loads
                        assert (t_on.busy, t_on.last_result) == tick_model(on, cmd)


def test_hand_computed_timings():
    tiny = preset("tiny")  # 8 rows, 4 lanes, 2-bit slices: 4 cycles per pass
    # 1:1, K=32: 4 passes -> Wb = 32 weight beats, L = 8 beats, X = 16 cycles.
    t = perf.command_timing(tiny, perf.Command(NMPattern(1, 1), 32, 1, True))
    assert (t.weight_beats, t.act_beats_per_token, t.compute_per_token) == (32, 8, 16)
    assert t.busy == 32 + 16 + 1 and not t.bandwidth_bound  # compute starts at cycle 33
    # Bit-parallel 1:8, K=64: one pass of 1 cycle but 16 beats per token: input-bound, the
    # period is 16 cycles per token.
    fast = tiny.replace(act_bits_per_cycle=8)
    one = perf.command_timing(fast, perf.Command(NMPattern(1, 8), 64, 1, False))
    three = perf.command_timing(fast, perf.Command(NMPattern(1, 8), 64, 3, False))
    assert one.bandwidth_bound and one.busy == 16 + 1 + 1
    assert three.busy - one.busy == 2 * 16


def test_hand_computed_timings_of_the_weight_port_and_overlap():
    """tiny with 16 input lanes: 2:4 at K=32 is 2 passes of 4 cycles, a token's 2 activation
    beats are in at cycle 2, so only the weights hold the compute back."""
    cfg = preset("tiny").replace(in_lanes=16)
    cmd = perf.Command(NMPattern(2, 4), 32, 1, True)
    busy = {}
    for rows, overlap in [(1, 0), (1, 1), (2, 0), (2, 1), (4, 1)]:
        c = cfg.replace(weight_port_rows=rows, weight_overlap=overlap)
        busy[rows, overlap] = perf.command_timing(c, cmd).busy
    assert busy == {
        (1, 0): 25,  # 16 beats in 1..16; passes 17..20, 21..24
        (1, 1): 21,  # words in at 8 and 16: pass 0 9..12, pass 1 waits, 17..20
        (2, 0): 17,  # 8 beats in 1..8; 9..16
        (2, 1): 13,  # words at 4 and 8: 5..8, 9..12
        (4, 1): 11,  # words at 2 and 4: the activations (in at 2) decide, 3..10
    }
    assert perf.command_timing(cfg, dataclasses.replace(cmd, load_weights=False)).busy == 11
    t = perf.command_timing(cfg.replace(weight_port_rows=2), cmd)
    assert t.weight_beats == 8 == cfg.replace(weight_port_rows=2).weight_beats("2:4", 32)


def test_default_is_compute_bound_on_smollm2_shapes():
    for pattern in DEFAULT.patterns:
        for k in (576, 1536):
            assert not perf.bandwidth_bound(DEFAULT, pattern, k), (pattern, k)


def test_default_speedups_on_a_q_proj_are_near_ideal():
    dense = preset("dense")
    for pattern in DEFAULT.patterns:
        s = perf.speedup(DEFAULT, pattern, 128, 576, 576, dense)
        assert 0.9 * pattern.ideal_speedup <= s <= pattern.ideal_speedup * 1.0001, (pattern, s)


def test_schedule_covers_every_output_input_and_token_once():
    cfg = preset("tiny").replace(max_tokens=3)
    cmds = perf.schedule(cfg, "2:4", tokens=7, k=100, c=10)
    covered = set()
    for cmd in cmds:
        assert cmd.k % 4 == 0 and cmd.k <= cfg.max_k_for("2:4") and cmd.c <= cfg.cols
        assert cmd.load_weights == (cmd.t0 == 0)
        for cell in itertools.product(
            range(cmd.t0, cmd.t0 + cmd.tokens), range(cmd.c0, cmd.c0 + cmd.c),
            range(cmd.k0, cmd.k0 + cmd.k),
        ):
            assert cell not in covered
            covered.add(cell)
    assert len(covered) == 7 * 10 * 100
    assert len(cmds) == 3 * 2 * 3  # column tiles x K chunks (64 + 36) x token blocks
    est = perf.estimate(cfg, "2:4", 7, 100, 10)
    assert est.cycles == perf.layer_cycles(cfg, cmds) > est.ideal


def test_schedule_rejects_bad_layers():
    with pytest.raises(FlexCimError, match="not a multiple of M=4"):
        perf.schedule(preset("tiny"), "2:4", 1, 6, 4)
    with pytest.raises(FlexCimError, match="pattern 3:8 is not supported"):
        perf.schedule(preset("tiny"), "3:8", 1, 8, 4)
    with pytest.raises(FlexCimError, match="tokens must be a positive integer, not 0"):
        perf.schedule(preset("tiny"), "2:4", 0, 8, 4)
