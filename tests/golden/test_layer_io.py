import numpy as np
import pytest
from flexcim.golden.layer_io import SparseLayer, load_layer, save_layer
from flexcim.golden.prune import act_topk, nm_prune
from flexcim.spec.nm import NMPattern, compress

from flexcim.errors import FlexCimError


def make_layer(with_act=True):
    rng = np.random.default_rng(7)
    w = nm_prune(rng.integers(-127, 128, size=(6, 16), dtype=np.int8), "2:8")
    act = rng.integers(-127, 128, size=(3, 16), dtype=np.int8) if with_act else None
    act = None if act is None else act_topk(act, "8:16")
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
    with pytest.raises(FlexCimError, match=r"weight scale float64 \(5,\) does not match"):
        SparseLayer(weight=layer.weight, weight_scale=np.ones(5))
    with pytest.raises(FlexCimError, match=r"activations must be int8 \[T >= 1, 16\]"):
        SparseLayer(weight=layer.weight, weight_scale=np.ones(6), act=np.zeros((2, 8), np.int8),
                    act_scale=1.0)
    with pytest.raises(FlexCimError, match="need a positive finite act_scale"):
        SparseLayer(weight=layer.weight, weight_scale=np.ones(6), act=np.zeros((2, 16), np.int8))


def _write_raw(path, layer, **meta_changes):
    """save_layer's file with metadata fields replaced (the writer refuses bad layers)."""
    from safetensors.numpy import save_file

    tensors = {"weight.values": layer.weight.values, "weight.indices": layer.weight.indices,
               "weight.scale": layer.weight_scale, "act.values": layer.act}
    metadata = {"format": "flexcim-layer", "version": "1", "pattern": "2:8", "shape": "6,16",
                "name": layer.name, "extra": "{}", "act_scale": "0.05", "act_pattern": "8:16"}
    for key, value in meta_changes.items():
        if key.startswith("tensor:"):
            tensors[key[7:]] = value
        else:
            metadata[key] = value
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("changes, message", [
    ({"extra": "[1,2]"}, "metadata field 'extra' must be a JSON object"),  # was AttributeError
    ({"act_scale": "inf"}, "need a positive finite act_scale, not inf"),
    ({"act_scale": "nan"}, "need a positive finite act_scale, not nan"),
    ({"act_scale": "-1"}, "need a positive finite act_scale, not -1.0"),
    ({"shape": "0,16"}, "metadata field 'shape' must be two integers >= 1"),
    ({"pattern": "3:6"}, "M must be a power of two"),
    ({"act_pattern": "1:16"}, "activations do not satisfy their act_pattern 1:16"),
    ({"tensor:weight.scale": -np.ones(6, np.float32)}, "weight scale must be positive and finite"),
    ({"tensor:weight.scale": np.full(6, np.nan, np.float32)}, "weight scale must be positive"),
    ({"tensor:weight.scale": np.ones(6, np.int32)}, "weight scale int32 (6,) does not match"),
    ({"tensor:act.values": np.zeros((0, 16), np.int8)}, "must be int8 [T >= 1, 16]"),
])
def test_every_layer_field_is_checked(tmp_path, changes, message):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, make_layer(), **changes)
    with pytest.raises(FlexCimError) as info:
        load_layer(path)
    text = str(info.value)
    assert text.startswith(repr(str(path))) and message in text and "\n" not in text, text


def test_raw_writer_makes_a_valid_file(tmp_path):
    _write_raw(tmp_path / "ok.safetensors", make_layer())
    assert load_layer(tmp_path / "ok.safetensors").act_pattern == NMPattern(8, 16)


def test_save_layer_is_atomic(tmp_path, monkeypatch):
    import safetensors.numpy

    path = tmp_path / "l.safetensors"
    save_layer(path, make_layer())
    good = path.read_bytes()

    def half(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", half)
    with pytest.raises(KeyboardInterrupt):
        save_layer(path, make_layer(with_act=False))
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_per_token_act_scales_round_trip_and_bad_shapes(tmp_path):
    import dataclasses

    layer = make_layer()
    scales = np.array([0.5, 0.25, 0.125], dtype=np.float32)
    per_token = dataclasses.replace(layer, act_scale=scales)
    save_layer(tmp_path / "t.safetensors", per_token)
    back = load_layer(tmp_path / "t.safetensors")
    assert back.act_scale.dtype == np.float32 and np.array_equal(back.act_scale, scales)
    assert np.array_equal(back.act, layer.act)
    with pytest.raises(FlexCimError, match=r"per-token act_scale float32 \(2,\) does not match 3"):
        dataclasses.replace(layer, act_scale=scales[:2])
    with pytest.raises(FlexCimError, match="act_scale must be positive and finite; row 1"):
        dataclasses.replace(layer, act_scale=np.array([1.0, 0.0, 1.0], dtype=np.float32))
