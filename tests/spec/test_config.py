import json

import pytest
from flexcim.spec.config import DEFAULT, PRESETS, HwConfig, preset
from flexcim.spec.nm import NMPattern

from flexcim.errors import FlexCimError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = PRESETS[name]
    again = HwConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["patterns"] == [str(p) for p in cfg.patterns]


def test_default_geometry_fits_smollm2_hidden_width():
    assert DEFAULT.rows_total == 72 and DEFAULT.index_bits == 4 and DEFAULT.cycles_per_pass == 8
    for p in DEFAULT.patterns:
        assert 576 % DEFAULT.pass_width(p) == 0, p  # no partial passes on K = 576
    assert DEFAULT.pass_width("1:8") == 576 and DEFAULT.passes("1:1", 576) == 8
    assert DEFAULT.passes("2:4", 576) == 4 and DEFAULT.passes("1:4", 577) == 3


def test_n_need_not_be_a_power_of_two_and_pass_widths_are_exact():
    cfg = DEFAULT.replace(patterns=("1:1", "3:4", "6:8", "3:8", "12:16", "9:16"))
    # rows_total * M / N, written out: 72 rows are 24 groups of 3 (3:4, 3:8) etc.
    widths = {"1:1": 72, "3:4": 96, "6:8": 96, "3:8": 192, "12:16": 96, "9:16": 128}
    assert {str(p): cfg.pass_width(p) for p in cfg.patterns} == widths
    # The window spans the widest pass: 192, where rows * max(M // N) would give 72 * 2 = 144.
    assert cfg.window_lanes == 192 and cfg.ratio_max == pytest.approx(8 / 3)
    assert cfg.passes("3:8", 576) == 3 and cfg.passes("9:16", 576) == 5  # 4.5 passes round up
    assert cfg.max_k_for("3:8") == min(cfg.max_k, 8 * 192) and cfg.index_bits == 4
    with pytest.raises(FlexCimError, match="pattern 5:8: N=5 does not divide the 72 cell rows"):
        cfg.pass_width("5:8")


def test_default_has_m16_and_flex8_is_default_without_it():
    flex = DEFAULT
    assert sorted(round(p.sparsity, 4) for p in flex.patterns if p.m == 16) == [
        0.25, 0.5, 0.625, 0.75, 0.875]
    assert flex.index_bits == 4 and flex.pattern_bits == 4
    flex8 = preset("flex8")
    assert flex8.replace(patterns=DEFAULT.patterns) == DEFAULT
    assert {p for p in DEFAULT.patterns if p.m <= 8} == set(flex8.patterns)
    assert flex8.index_bits == 3 and flex8.pattern_bits == 3
    assert flex.window_lanes == flex8.window_lanes == 576 and flex.ratio_max == 8
    for p in flex.patterns:
        assert 576 % flex.pass_width(p) == 0, p  # no partial passes on SmolLM2's K = 576


def test_tiny3_has_patterns_with_n_not_a_power_of_two():
    cfg = preset("tiny3")
    assert cfg.rows_total == 12
    assert {p.n for p in cfg.patterns} >= {3, 6, 12}
    assert cfg.window_lanes == 64 and cfg.pass_width("3:8") == 32 and cfg.pass_width("3:4") == 16


def test_baselines_share_the_cells_of_default():
    dense, fixed = preset("dense"), preset("fixed24")
    assert dense.cells == fixed.cells == DEFAULT.cells
    assert dense.patterns == (NMPattern(1, 1),) and dense.index_bits == 0
    assert dense.pattern_bits == 0
    assert fixed.patterns == (NMPattern(1, 1), NMPattern(2, 4)) and fixed.index_bits == 2


def test_patterns_are_canonically_ordered_and_coded():
    cfg = HwConfig(patterns=["2:4", "1:1", "1:8", "2:4"])
    assert [str(p) for p in cfg.patterns] == ["1:1", "2:4", "1:8"]
    assert cfg.pattern_code("1:8") == 2 and cfg.pattern_bits == 2
    with pytest.raises(FlexCimError, match="pattern 4:8 is not supported by this macro"):
        cfg.pattern_code("4:8")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sub_macros": 3}, "Sub-macro count must be a power of 2 from 1 to 64, not 3"),
        ({"rows": 0}, "rows must be from 1 to 256, not 0"),
        ({"act_bits_per_cycle": 3}, "act_bits_per_cycle must be 1, 2, 4 or 8, not 3"),
        ({"acc_bits": 12}, "acc_bits must be from 16 to 64, not 12"),
        ({"max_k": 100}, "max_k must be a positive multiple of in_lanes=96, not 100"),
        ({"patterns": ("2:4",)}, "patterns must include 1:1"),
        ({"patterns": ("1:1", "4:4")}, "pattern 4:4 is dense: list it as 1:1"),
        ({"patterns": ("1:1", "5:8")}, "pattern 5:8: N=5 must divide the 72 cell rows"),
        ({"patterns": ("1:1", "3:6")}, "N:M pattern M must be a power of two from 1 to 32, not 6"),
        ({"rows": 3, "sub_macros": 1}, "pattern 2:4: N=2 must divide the 3 cell rows"),
        ({"cols": "8"}, "HwConfig cols must be an integer, not '8'"),
        ({"weight_port_rows": 4}, "weight_port_rows must be a positive divisor of rows=18 "
                                  "\\(a weight beat stays inside one sub-macro\\), not 4"),
        ({"weight_port_rows": 0}, "weight_port_rows must be a positive divisor of rows=18"),
        ({"weight_overlap": 2}, "weight_overlap must be 0 or 1, not 2"),
        ({"weight_overlap": True}, "HwConfig weight_overlap must be an integer, not True"),
        ({"tree_pipeline": 2}, "tree_pipeline must be 0 or 1, not 2"),
        ({"tree_pipeline": -1}, "tree_pipeline must be 0 or 1, not -1"),
        ({"tree_pipeline": 1, "rows": 1, "patterns": ("1:1", "2:4")},
         "tree_pipeline=1 needs rows >= 2 \\(a sub-macro of one row has no adder tree to "
         "cut\\), not rows=1"),
    ],
)
def test_invalid_configs_raise_one_line_errors(changes, message):
    with pytest.raises(FlexCimError, match=message):
        DEFAULT.replace(**changes)


def test_overrides_and_unknown_keys():
    cfg = DEFAULT.with_overrides(["rows=8", "patterns=1:1,2:4", "acc_bits=0x18"])
    assert cfg.rows == 8 and cfg.acc_bits == 24 and len(cfg.patterns) == 2
    with pytest.raises(FlexCimError, match="--set expects key=value with key one of"):
        DEFAULT.with_overrides(["rowz=8"])
    with pytest.raises(FlexCimError, match="--set rows expects an integer, not 'x'"):
        DEFAULT.with_overrides(["rows=x"])
    with pytest.raises(FlexCimError, match="unknown hardware config key\\(s\\) colour"):
        HwConfig.from_dict({"colour": 1})
    with pytest.raises(FlexCimError, match="unknown preset 'huge'"):
        preset("huge")


def test_command_limits():
    DEFAULT.check_command("1:8", 1536, 128)
    with pytest.raises(FlexCimError, match="K=1537 input channels do not fit one command"):
        DEFAULT.check_command("1:8", 1537, 1)
    with pytest.raises(FlexCimError, match="expected 1..576"):  # 1:1: depth 8 x 72 rows
        DEFAULT.check_command("1:1", 600, 1)


def test_weight_port_fields_round_trip_and_old_configs_keep_their_json():
    """The fields at their original values (1 row, no overlap) are left out of the JSON, so
    every configuration written before they existed keeps its JSON, digest and module name."""
    from flexcim.spec.config import config_digest

    old = DEFAULT.to_dict()
    assert "weight_port_rows" not in old and "weight_overlap" not in old
    assert HwConfig.from_dict(old) == DEFAULT
    wide = DEFAULT.replace(weight_port_rows=9, weight_overlap=1)
    assert wide.to_dict()["weight_port_rows"] == 9 and wide.to_dict()["weight_overlap"] == 1
    assert HwConfig.from_json(wide.to_json()) == wide
    assert DEFAULT.with_overrides(["weight_port_rows=9", "weight_overlap=1"]) == wide
    assert len({config_digest(c) for c in (DEFAULT, wide, wide.replace(weight_overlap=0))}) == 3
    # 72 rows, 9 per beat: 8 beats per pass's word; 2:4 at K=576 is 4 passes.
    assert (wide.beats_per_word, wide.weight_beats("2:4", 576)) == (8, 32)
    assert DEFAULT.weight_beats("2:4", 576) == 4 * 72


# The fields of a HwConfig before tree_pipeline, weight_port_rows and weight_overlap existed.
_ORIGINAL_FIELDS = {"sub_macros", "rows", "cols", "depth", "patterns", "act_bits_per_cycle",
                    "in_lanes", "acc_bits", "max_k", "max_tokens"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tree_pipeline_off_keeps_every_presets_json_and_digest(name):
    """Off (0, the presets' value) the field is left out of the JSON: the JSON, hence the
    digest, is the one written from the original fields alone (computed here by hand)."""
    import hashlib

    from flexcim.spec.config import config_digest, module_name

    cfg = PRESETS[name]
    assert cfg.tree_pipeline == 0
    d = json.loads(cfg.to_json())
    assert set(d) == _ORIGINAL_FIELDS
    by_hand = json.dumps({f: d[f] for f in _ORIGINAL_FIELDS}, indent=2, sort_keys=True)
    assert cfg.to_json() == by_hand
    assert config_digest(cfg) == hashlib.sha1(by_hand.encode()).hexdigest()[:8]
    assert module_name(cfg) == f"flexcim_{name}"
    on = cfg.replace(tree_pipeline=1)
    assert json.loads(on.to_json()) == {**d, "tree_pipeline": 1}
    assert HwConfig.from_json(on.to_json()) == on
    assert cfg.with_overrides(["tree_pipeline=1"]) == on
    assert config_digest(on) != config_digest(cfg)
    assert module_name(on) == f"flexcim_{config_digest(on)}"


def test_tree_pipeline_adds_one_cycle_of_result_latency():
    from flexcim.spec.timing import RESULT_LATENCY, result_latency

    assert result_latency(DEFAULT) == RESULT_LATENCY == 2
    assert result_latency(DEFAULT.replace(tree_pipeline=1)) == 3
