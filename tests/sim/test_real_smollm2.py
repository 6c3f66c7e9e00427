"""A real SmolLM2 projection through the RTL, bit for bit (the ``model`` tier of make test).

flow/ exports the layer once (:func:`flexcim.sim.real.real_layer`: FLOW plan on the bundled
SmolLM2, Wanda pruning, int8 weight, real calibration activations of that projection quantized
and pruned 8:16); a slice of it (64 output rows x all 576 inputs x 16 tokens) runs on the
``tiny`` preset on Verilator and on Icarus.  The RTL must equal golden and a naive int64
product, and its activity counters the energy model (asserted inside the testbench).  The whole
layer runs on the ``default`` preset in ``make regress``.
"""

import numpy as np
import pytest
from flexcim.golden import energy, sparse_matmul
from flexcim.golden.layer_io import load_layer
from flexcim.sim import runner
from flexcim.sim.host import layer_operands, run_rtl
from flexcim.spec.config import preset
from flexcim.spec.nm import satisfies

pytestmark = [pytest.mark.slow, pytest.mark.model]
pytest.importorskip("torch")

TINY = preset("tiny")


@pytest.fixture(scope="module")
def layer():
    from flexcim.sim.real import SETTINGS, real_layer

    layer = load_layer(real_layer())
    assert layer.name == SETTINGS["layer"]
    return layer


def _int64_reference(x, w, acc_bits):
    y = x.astype(np.int64) @ w.decompress().astype(np.int64).T
    half = 1 << (acc_bits - 1)
    return (y + half) % (2 * half) - half


def test_the_exported_layer_is_real_sparse_and_act_pruned(layer):
    """Not a stand-in: the FLOW pattern holds, the weights are int8 with the extremes used,
    and every group of 16 activations keeps at most 8 non-zeros of real (varied) values."""
    dense = layer.weight.decompress()
    assert dense.shape == (576, 576)
    assert not layer.weight.pattern.is_dense
    assert satisfies(dense, layer.weight.pattern)
    assert np.abs(dense).max() == 127  # symmetric per-channel int8 quantization
    assert str(layer.act_pattern) == "8:16" and layer.act.shape == (128, 576)
    groups = (layer.act.reshape(layer.act.shape[0], -1, 16) != 0).sum(-1)
    assert groups.max() <= 8 and groups.mean() > 4
    assert len(np.unique(layer.act)) > 50


@pytest.mark.parametrize("sim, rows, tokens", [
    ("verilator", 64, 16),
    # Icarus is ~10x slower per cycle: a quarter of the rows and tokens keeps it near 20 s.
    ("icarus", 16, 4),
])
def test_a_real_slice_is_bit_exact_on_rtl(layer, sim, rows, tokens):
    if not runner.available(sim):
        pytest.skip(f"{sim} is not installed")
    x, w = layer_operands(layer, tokens=tokens, out_features=rows)
    assert x.shape == (tokens, 576) and w.shape == (rows, 576)
    run = run_rtl(x, w, TINY, sim=sim, seed=1)
    np.testing.assert_array_equal(run.y, _int64_reference(x, w, TINY.acc_bits))
    np.testing.assert_array_equal(run.y, sparse_matmul(x, w, TINY.acc_bits))
    assert np.count_nonzero(run.y) > rows * tokens // 2
    stats = run.stats
    assert abs(stats["model_error"]) <= 0.02
    activity = stats["activity"]  # equal to the model's counts (asserted by the testbench)
    assert activity["mac_cycles"] == energy.mac_cycles(TINY, x, w)
    # Real activations are small: their upper bit-slices are mostly zero (or all ones), so the
    # gated cells are well below the global non-zero estimate (docs/architecture.md, 7).
    assert activity["mac_ratio"] < 0.9


def test_make_regress_runs_the_whole_layer_from_a_cached_file(layer):
    from flexcim.sim.regress import load_layer_data, real_case

    case = real_case()
    assert (case.sim, case.preset, case.pattern) == ("verilator", "default",
                                                      str(layer.weight.pattern))
    assert (case.tokens, case.k, case.c, case.act_pattern) == (128, 576, 576, "8:16")
    assert "-real-" in case.name
    x, w = load_layer_data(case.data)
    np.testing.assert_array_equal(x, layer.act)
    assert w.equals(layer.weight)
