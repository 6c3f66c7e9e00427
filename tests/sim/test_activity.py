"""sim.activity: the measured layers and the table format (the RTL runs are make regress's)."""

from flexcim.sim import activity
from flexcim.spec.config import preset


def test_random_cases_fill_whole_tiles_and_prune_activations_when_asked():
    cases = activity.cases(real=False)
    assert len(cases) == 4
    for label, name, x, w in cases:
        assert w.out_features % preset(name).cols == 0  # no empty columns in the ratio
        assert x.shape == (16, 576) and str(w.pattern) == "2:4"
        groups = (x.reshape(16, -1, 16) != 0).sum(-1)
        assert (groups.max() <= 8) == ("act 8:16" in label)


def test_format_table_has_a_row_per_layer():
    row = {"layer": "L", "preset": "tiny", "b": 2, "act_density": 0.5, "slice_density": 0.25,
           "mac_cycles": 1234, "mac_estimate": 2468.0, "mac_ratio": 0.5}
    lines = activity.format_table([row, row]).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| L | tiny (2) | 0.500 | 0.250 | 1,234 | 2,468 | 0.500 |"
