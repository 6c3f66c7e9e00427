"""The macro's activity counters (FlexCiM(cfg, counters=True)) in amaranth.sim, tiny preset:
exact against the energy model's event counts and golden.energy.mac_cycles."""

import numpy as np
import pytest
from flexcim.golden import energy, host, perf
from flexcim.golden.matmul import sparse_matmul
from flexcim.golden.prune import act_topk, nm_prune
from flexcim.hw.export import port_map
from flexcim.hw.pysim import PySim
from flexcim.hw.top import FlexCiM
from flexcim.spec import layouts
from flexcim.spec.config import preset
from flexcim.spec.nm import NMTensor

TINY = preset("tiny")


def layers(cfg, rng):
    """Every pattern once (K over two chunks, C over two tiles: unused columns and padding
    rows see stale or real activations with zero weights), real zero activations from an
    8:16 top-k and small values (zero upper slices), and a zero-weight block."""
    out = []
    for i, p in enumerate(cfg.patterns):
        k = (cfg.max_k_for(p) // p.m + 1) * p.m if i % 2 else 2 * p.m
        x = rng.integers(-128, 128, size=(3, k), dtype=np.int8)
        x[1] = rng.integers(-3, 4, size=k)
        if i % 3 == 0 and k % 16 == 0:
            x = act_topk(x, "8:16")
        w = nm_prune(rng.integers(-128, 128, size=(cfg.cols + 1, k), dtype=np.int8), p)
        w[1, : k // 2] = 0
        out.append((x, NMTensor.compress(w, p)))
    return out


def run(cfg, data, **kw):
    engine = PySim(cfg, counters=True, **kw)
    runs = host.run_layers(cfg, data, engine.execute)
    for (x, w), r in zip(data, runs, strict=True):
        np.testing.assert_array_equal(r.y, sparse_matmul(x, w, cfg.acc_bits))
    events = energy.layer_events(cfg, [cmd for r in runs for cmd in r.commands])
    macs = sum(energy.mac_cycles(cfg, x, w) for x, w in data)
    return engine.counters, {**events, "mac_cycles": macs}


# b = 2 in make test-all only (time); 1 and 8 are the extremes
@pytest.mark.parametrize("b", [1, pytest.param(2, marks=pytest.mark.extended), 8])
def test_counters_equal_the_model_and_the_operand_reference(b):
    cfg = TINY.replace(act_bits_per_cycle=b)
    counters, expected = run(cfg, layers(cfg, np.random.default_rng(b)))
    assert set(counters) == set(layouts.COUNTERS)
    assert counters == expected
    assert 0 < counters["mac_cycles"] < counters["compute_cycles"] * cfg.cells


@pytest.mark.parametrize("name, cfg", [
    # A dense-only macro (no indices: every cell reads lane 0) and every one-entry index (one
    # word per cell: a register instead of a memory, bit-parallel slices).
    ("dense", TINY.replace(patterns=("1:1",))),
    ("one-entry", TINY.replace(sub_macros=1, rows=8, depth=1, in_lanes=8, max_k=8,
                               act_bits_per_cycle=8, patterns=("1:1", "2:4", "1:4", "1:8"))),
    # The adder trees' pipeline register moves results, not events: the counts are unchanged
    # (the energy model charges no register, neither this one nor the partial-sum registers).
    ("tree-pipeline", TINY.replace(tree_pipeline=1)),
])
def test_counters_on_other_geometries(name, cfg):
    counters, expected = run(cfg, layers(cfg, np.random.default_rng(len(name))))
    assert counters == expected


def test_stalls_change_no_count():
    """Input gaps and result back-pressure cost cycles, but the counters count events (data
    moved, slices computed), not time."""
    data = layers(TINY, np.random.default_rng(5))[:4]
    counters, expected = run(TINY, data, in_gap=0.3, out_stall=0.5, seed=4)
    assert counters == expected


def test_quiet_faults_catch_a_selection_that_switches(monkeypatch):
    """Without the index bits forced on write, a chain link above the tap passes the tapped
    value: the results stay exact but ``quiet_faults`` counts those cell-cycles and
    ``select_muxes`` counts the uncut links, so the counters prove the gating the energy
    model credits."""
    import flexcim.hw.top

    monkeypatch.setattr(flexcim.hw.top, "forced_index_bits", lambda m, bits: 0)
    data = layers(TINY, np.random.default_rng(6))[:3]  # 1:1, 1:2, 2:4
    counters, expected = run(TINY, data)
    assert expected["quiet_faults"] == 0
    assert counters["quiet_faults"] > 0
    # 1:2 and 2:4 leave 3 and 2 links above their taps uncut in every cell and cycle.
    cycles = [perf.ideal_cycles(TINY, perf.schedule(TINY, w.pattern, x.shape[0],
                                                    w.in_features, w.out_features))
              for x, w in data]
    assert counters["select_muxes"] == expected["select_muxes"] + TINY.cells * (
        3 * cycles[1] + 2 * cycles[2])
    same = set(expected) - {"quiet_faults", "select_muxes"}
    assert {k: counters[k] for k in same} == {k: expected[k] for k in same}


def _always_fetching():
    """The controller with ``fetch`` tied high: the buffer reads the pass's memories in every
    cycle, stalls and idle cycles included (the results stay exact)."""
    from flexcim.hw.controller import Controller
    from flexcim.sim.rewire import wrapping

    return wrapping(Controller, "fetch tied high", outputs={("fetch",): 1})


def test_the_buffer_reads_only_the_lanes_of_the_pass_once_per_cycle(monkeypatch):
    """A dense (1:1) layer reads its 8-lane passes: 16 of the buffer's 128 port bits per
    compute cycle on tiny (2 of 16 memories), and none in a cycle that computes nothing; the
    counter equals the model.  Read enables tied high would read all 128 bits in every cycle,
    and a fetch tied high re-reads the pass's memories in the stalled cycles: both counted."""
    from flexcim.hw.buffer import ActivationBuffer

    rng = np.random.default_rng(12)
    x = rng.integers(-128, 128, size=(3, 20), dtype=np.int8)
    w = NMTensor.compress(rng.integers(-128, 128, size=(4, 20), dtype=np.int8), "1:1")
    counters, expected = run(TINY, [(x, w)], in_gap=0.3, out_stall=0.3, seed=2)
    assert counters == expected
    buf = ActivationBuffer(lanes=TINY.max_k, in_lanes=TINY.in_lanes,
                           window_lanes=TINY.window_lanes,
                           shifts=sorted({TINY.pass_width(p) for p in TINY.patterns}),
                           slice_bits=TINY.act_bits_per_cycle)
    buf._MustUse__silence = True
    assert (buf.memories, buf.word_bits) == (16, 8)  # G = 4 lanes x 2 bits
    passes = 3 * TINY.passes("1:1", 20)  # 3 tokens x 3 passes of 8 lanes
    assert counters["buffer_read_bits"] == passes * 8 * 8 == counters["compute_cycles"] * 16
    engine = PySim(TINY, counters=True, in_gap=0.3, out_stall=0.3, seed=2)
    host.run_layers(TINY, [(x, w)], engine.execute)
    assert engine.cycles > counters["compute_cycles"]  # the stalls cost cycles, not reads
    assert counters["buffer_read_bits"] * 8 < buf.memories * buf.word_bits * engine.cycles

    import flexcim.hw.top

    monkeypatch.setattr(flexcim.hw.top, "Controller", _always_fetching())
    counters, _ = run(TINY, [(x, w)], in_gap=0.3, out_stall=0.3, seed=2)
    assert counters["buffer_read_bits"] > expected["buffer_read_bits"]
    assert {k: v for k, v in counters.items() if k != "buffer_read_bits"} == {
        k: v for k, v in expected.items() if k != "buffer_read_bits"}


def test_the_counter_sees_one_wrong_weight():
    """A single weight zeroed behind the reference's back changes mac_cycles: the comparison
    is sharp enough to catch a miscounted cell."""
    rng = np.random.default_rng(11)
    x = rng.integers(1, 128, size=(2, 16), dtype=np.int8)  # no zero activations
    dense = nm_prune(rng.integers(1, 128, size=(4, 16), dtype=np.int8), "2:4")
    w = NMTensor.compress(dense, "2:4")
    counters, expected = run(TINY, [(x, w)])
    assert counters == expected
    dense[2, np.flatnonzero(dense[2])[0]] = 0
    assert energy.mac_cycles(TINY, x, NMTensor.compress(dense, "2:4")) < counters["mac_cycles"]


def test_counters_are_off_by_default_so_the_verilog_has_no_extra_port():
    ports = {p["name"]: p["width"] for p in port_map(TINY)}
    assert "counters" not in ports
    top = FlexCiM(TINY, counters=True)
    widths = {"__".join(map(str, path)): len(v.as_value()) if hasattr(v, "as_value") else len(v)
              for path, _, v in top.signature.flatten(top)}
    assert widths["counters"] == len(layouts.COUNTERS) * layouts.COUNTER_BITS
    top._MustUse__silence = True
    with pytest.raises(TypeError, match="counters must be True or False, not 'yes'"):
        FlexCiM(TINY, counters="yes")


def test_unpack_counters_reads_the_fields_in_bit_order():
    value = sum(i + 1 << (i * layouts.COUNTER_BITS) for i in range(len(layouts.COUNTERS)))
    assert list(layouts.unpack_counters(value).values()) == list(
        range(1, len(layouts.COUNTERS) + 1))
