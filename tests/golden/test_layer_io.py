import numpy as np
import pytest
from flexcim.golden.layer_io import SparseLayer, load_layer, save_layer
from flexcim.golden.nm import NMPattern, compress, nm_prune

from flexcim.errors import FlexCimError


def make_layer(with_act=True):
    rng = np.random.default_rng(7)
    w = nm_prune(rng.integers(-127, 128, size=(6, 16), dtype=np.int8), "2:8")
    act = rng.integers(-127, 128, size=(3, 16), dtype=np.int8) if with_act else None
    return SparseLayer(
        weight=compress(w, "2:8"),
        weight_scale=rng.random(6).astype(np.float32),
        name="model.layers.0.self_attn.q_proj",
        act=act,
        act_scale=0.05 if with_act else None,
        act_pattern="8:16" if with_act else None,
        extra={"model": "SmolLM2-135M"},
    )


@pytest.mark.parametrize("with_act", [True, False])
def test_round_trip(tmp_path, with_act):
    layer = make_layer(with_act)
    save_layer(tmp_path / "l.safetensors", layer)
    back = load_layer(tmp_path / "l.safetensors")
    assert back.weight.equals(layer.weight)
    assert np.array_equal(back.weight_scale, layer.weight_scale)
    assert back.name == layer.name and back.extra == {"model": "SmolLM2-135M"}
    if with_act:
        assert np.array_equal(back.act, layer.act)
        assert back.act_scale == 0.05 and back.act_pattern == NMPattern(8, 16)
    else:
        assert back.act is None and back.act_scale is None


def test_truncated_and_foreign_files_give_one_line_errors(tmp_path):
    path = tmp_path / "l.safetensors"
    save_layer(path, make_layer())
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FlexCimError, match="is not a readable safetensors file") as info:
        load_layer(tmp_path / "cut.safetensors")
    assert "\n" not in str(info.value)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(FlexCimError, match="is not a readable safetensors file"):
        load_layer(tmp_path / "junk.safetensors")
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FlexCimError, match="is not a FlexCiM layer file"):
        load_layer(tmp_path / "other.safetensors")
    with pytest.raises(FlexCimError, match="does not exist"):
        load_layer(tmp_path / "missing.safetensors")


def test_layer_validation():
    layer = make_layer()
    with pytest.raises(FlexCimError, match=r"weight scale shape \(5,\) does not match"):
        SparseLayer(weight=layer.weight, weight_scale=np.ones(5))
    with pytest.raises(FlexCimError, match=r"activations must be int8 \[T, 16\]"):
        SparseLayer(weight=layer.weight, weight_scale=np.ones(6), act=np.zeros((2, 8), np.int8),
                    act_scale=1.0)
    with pytest.raises(FlexCimError, match="need a positive act_scale"):
        SparseLayer(weight=layer.weight, weight_scale=np.ones(6), act=np.zeros((2, 16), np.int8))
