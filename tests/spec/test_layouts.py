import numpy as np
import pytest
from flexcim.golden.prune import nm_prune
from flexcim.spec import layouts
from flexcim.spec.config import PRESETS, preset
from flexcim.spec.nm import NMTensor

from flexcim.errors import FlexCimError


@pytest.mark.parametrize("name", ["tiny", "tiny3", "default", "dense", "flex8"])
def test_packers_match_amaranth_layouts(name):
    """The NumPy packers and Amaranth's own Layout.const agree bit for bit."""
    cfg = preset(name)
    rng = np.random.default_rng(1)
    for _ in range(5):
        code = int(rng.integers(len(cfg.patterns)))
        pattern = cfg.patterns[code]
        k = int(rng.integers(1, cfg.max_k_for(pattern) + 1))
        tokens = int(rng.integers(1, cfg.max_tokens + 1))
        fields = {"k": k, "tokens": tokens, "load_weights": int(rng.integers(2))}
        if cfg.pattern_bits:
            fields["pattern"] = code
        expect = layouts.cmd_layout(cfg).const(fields).as_bits()
        got = layouts.pack_cmd(cfg, pattern, k, tokens, fields["load_weights"])
        assert got == expect
        assert layouts.unpack_cmd(cfg, got) == {"pattern": code, **fields}

        x = rng.integers(-128, 128, size=(1, cfg.in_lanes), dtype=np.int8)
        assert layouts.pack_act(cfg, x) == [layouts.act_layout(cfg).const(x[0].tolist()).as_bits()]

        y = rng.integers(-(2 ** (cfg.acc_bits - 1)), 2 ** (cfg.acc_bits - 1), size=(1, cfg.cols))
        beat = layouts.result_layout(cfg).const(y[0].tolist()).as_bits()
        assert layouts.pack_result(cfg, y) == [beat]
        np.testing.assert_array_equal(layouts.unpack_result(cfg, [beat]), y)


@pytest.mark.parametrize("name", ["tiny", "tiny3", "default", "dense", "flex8"])
def test_weight_beats_match_amaranth_and_round_trip(name):
    cfg = preset(name)
    rng = np.random.default_rng(2)
    pattern = cfg.patterns[-1]
    k = pattern.m * 3
    dense = nm_prune(rng.integers(-128, 128, size=(cfg.cols - 1, k), dtype=np.int8), pattern)
    tile = NMTensor.compress(dense, pattern)
    beats = layouts.pack_weights(cfg, tile)
    assert len(beats) == cfg.passes(pattern, k) * cfg.rows_total
    values, indices = layouts.unpack_weights(cfg, beats)
    kept = tile.values.shape[1]
    np.testing.assert_array_equal(values[:kept, : cfg.cols - 1], tile.values.T)
    np.testing.assert_array_equal(indices[:kept, : cfg.cols - 1], tile.indices.T)
    assert not values[kept:].any() and not values[:, -1].any()  # padding rows and column
    for q in (0, kept - 1):
        fields = {"values": values[q].tolist()}
        if cfg.index_bits:
            fields["indices"] = indices[q].tolist()
        assert beats[q] == layouts.weight_layout(cfg).const(fields).as_bits()


def test_acc_bits_64_results_round_trip():
    cfg = PRESETS["tiny"].replace(acc_bits=64)
    y = np.array([[-(2**63), 2**63 - 1, -1, 0]], dtype=np.int64)
    np.testing.assert_array_equal(layouts.unpack_result(cfg, layouts.pack_result(cfg, y)), y)


def test_act_beats_pad_the_last_beat_of_each_token():
    cfg = preset("tiny")  # 4 lanes
    x = np.array([[1, 2, 3, 4, 5], [-1, -2, -3, -4, -5]], dtype=np.int8)
    lanes = layouts.unpack_act(cfg, layouts.pack_act(cfg, x))
    np.testing.assert_array_equal(
        lanes, [[1, 2, 3, 4], [5, 0, 0, 0], [-1, -2, -3, -4], [-5, 0, 0, 0]]
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("3:8", 16, 1), "pattern 3:8 is not supported"),
        (("1:1", 0, 1), "K=0 input channels do not fit one command"),
        (("1:1", 33, 1), r"expected 1..32"),  # tiny: depth 4 x 8 rows
        (("1:8", 64, 0), "token count must be from 1 to 255, not 0"),
    ],
)
def test_pack_cmd_refuses_what_the_macro_cannot_run(args, message):
    with pytest.raises(FlexCimError, match=message):
        layouts.pack_cmd(preset("tiny"), *args, load_weights=True)


def test_weight_tile_wider_than_the_macro_is_refused():
    cfg = preset("tiny")
    tile = NMTensor.compress(np.ones((cfg.cols + 1, 4), dtype=np.int8), "1:1")
    with pytest.raises(FlexCimError, match="5 output channels; the macro has cols=4"):
        layouts.pack_weights(cfg, tile)


@pytest.mark.parametrize("rows", [2, 4])
def test_weight_beats_of_a_wider_port_carry_consecutive_rows(rows):
    """With ``weight_port_rows = W`` beat ``b`` holds the row words ``b*W .. b*W+W-1`` of the
    one-row port, element ``j*cols + c`` for row ``j``: checked against Amaranth's layout and
    against the one-row beats."""
    one = preset("tiny")
    cfg = one.replace(weight_port_rows=rows)
    rng = np.random.default_rng(rows)
    pattern = cfg.patterns[-1]
    k = pattern.m * 3
    dense = nm_prune(rng.integers(-128, 128, size=(cfg.cols - 1, k), dtype=np.int8), pattern)
    tile = NMTensor.compress(dense, pattern)
    narrow = layouts.pack_weights(one, tile)
    beats = layouts.pack_weights(cfg, tile)
    assert len(beats) * rows == len(narrow) == cfg.passes(pattern, k) * cfg.rows_total
    assert len(beats) == cfg.weight_beats(pattern, k)
    v1, i1 = layouts.unpack_weights(one, narrow)
    for b, beat in enumerate(beats):
        rows_v, rows_i = v1[b * rows:(b + 1) * rows], i1[b * rows:(b + 1) * rows]
        fields = {"values": rows_v.reshape(-1).tolist(), "indices": rows_i.reshape(-1).tolist()}
        assert beat == layouts.weight_layout(cfg).const(fields).as_bits()
    values, indices = layouts.unpack_weights(cfg, beats)
    np.testing.assert_array_equal(values, v1)
    np.testing.assert_array_equal(indices, i1)
