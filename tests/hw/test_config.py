import json

import pytest
from flexcim.golden.nm import NMPattern
from flexcim.hw.config import DEFAULT, PRESETS, HwConfig, preset

from flexcim.errors import FlexCimError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = PRESETS[name]
    again = HwConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["patterns"] == [str(p) for p in cfg.patterns]


def test_default_geometry_fits_smollm2_hidden_width():
    assert DEFAULT.rows_total == 72 and DEFAULT.index_bits == 3 and DEFAULT.cycles_per_pass == 8
    for p in DEFAULT.patterns:
        assert 576 % DEFAULT.pass_width(p) == 0, p  # no partial passes on K = 576
    assert DEFAULT.pass_width("1:8") == 576 and DEFAULT.passes("1:1", 576) == 8
    assert DEFAULT.passes("2:4", 576) == 4 and DEFAULT.passes("1:4", 577) == 3


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
        ({"patterns": ("1:1", "3:4")}, "N must be a power of 2 in hardware, not 3"),
        ({"rows": 3, "sub_macros": 1}, "pattern 2:4: N=2 must divide the 3 cell rows"),
        ({"cols": "8"}, "HwConfig cols must be an integer, not '8'"),
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
