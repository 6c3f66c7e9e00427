"""An exported layer (flow/ -> golden.layer_io file -> sim/) through the RTL, bit for bit.

The layer is produced by flow/'s own path: a FLOW plan on a (small, random) Llama, Wanda
pruning, real forward-pass activations of that projection, int8 quantization, an 8:16 top-k of
the activations, the safetensors file; then sim.host reads the file back and runs it on the tiny
preset.  (The real SmolLM2 projection runs whole through ``python -m flexcim.sim.regress
--layer FILE``: README, RTL co-simulation.)
"""

import numpy as np
import pytest
from flexcim.golden.layer_io import load_layer
from flexcim.sim import runner
from flexcim.sim.host import layer_operands, run_rtl
from flexcim.spec.config import preset
from flexcim.spec.nm import NMPattern

from flexcim.errors import FlexCimError

torch = pytest.importorskip("torch")
pytest.importorskip("flexcim.hw.top", reason="the FlexCiM top (hw/top.py) is not here yet")

NAME = "model.layers.1.mlp.down_proj"  # [32, 64]: K=64 spans several passes on tiny


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from flexcim.flow import export, pipeline
    from flexcim.flow.model import tiny_llama
    from flexcim.flow.select import SelectConfig

    model = tiny_llama(0)
    windows = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(0))
    plan = pipeline.make_plan(model, windows, SelectConfig(method="flow", target=0.5),
                              progress=False)
    pipeline.apply_plan(model, plan, windows, progress=False)
    _, module = export.find_layer(model, NAME)
    x = export.layer_inputs(model, module, windows, 12)
    layer = export.build_layer(NAME, module.weight, NMPattern.parse(plan.layers[NAME]), x,
                               act_pattern=NMPattern.parse("8:16"))
    path = tmp_path_factory.mktemp("layer") / "down.safetensors"
    export.export_layer(path, layer)
    return path


def _reference(x, w, acc_bits):
    """Naive int64 product wrapped to the accumulator width (independent of golden)."""
    y = x.astype(np.int64) @ w.decompress().astype(np.int64).T
    half = 1 << (acc_bits - 1)
    return (y + half) % (2 * half) - half


@pytest.mark.slow
def test_exported_layer_is_bit_exact_on_rtl(exported):
    if not runner.available("verilator"):
        pytest.skip("verilator is not installed")
    layer = load_layer(exported)
    assert layer.act is not None and str(layer.act_pattern) == "8:16"
    # The activations really are top-k'd and the weight really is sparse (not a dense stand-in).
    groups = (layer.act.reshape(layer.act.shape[0], -1, 16) != 0).sum(-1)
    assert groups.max() <= 8 and np.count_nonzero(layer.act) > 0
    cfg = preset("tiny")
    x, w = layer_operands(layer, out_features=6)  # C=6: one and a half column tiles
    assert x.shape == (12, 64) and w.shape == (6, 64)
    np.testing.assert_array_equal(w.decompress(), layer.weight.decompress()[:6])
    run = run_rtl(x, w, cfg, sim="verilator", seed=3)
    np.testing.assert_array_equal(run.y, _reference(x, w, cfg.acc_bits))
    assert np.count_nonzero(run.y) > 0
    assert abs(run.stats["model_error"]) <= 0.02


def test_layer_operands_rejects_bad_slices(exported):
    layer = load_layer(exported)
    m = layer.weight.pattern.m
    with pytest.raises(FlexCimError, match="tokens must be from 1 to 12"):
        layer_operands(layer, tokens=13)
    if m > 1:
        with pytest.raises(FlexCimError, match=f"multiple of M={m}"):
            layer_operands(layer, in_features=m + 1)
    with pytest.raises(FlexCimError, match="out_features must be from 1 to 32"):
        layer_operands(layer, out_features=0)
