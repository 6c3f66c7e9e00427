"""The demo's checks that are not covered elsewhere."""

import numpy as np
import pytest
from flexcim.golden.prune import nm_prune
from flexcim.sim import runner
from flexcim.sim.host import run_rtl
from flexcim.spec.config import preset
from flexcim.spec.nm import NMTensor

from flexcim.demo import weight_traffic


@pytest.mark.slow
def test_weight_traffic_is_the_rtls_beats_and_the_system_models_count():
    """tiny (8 cell rows, 4 columns, 8-bit values + 4-bit indices: 48-bit beats), 2:4, K = 64,
    C = 6: 32 kept weights per output = 4 words of 8 rows; two column tiles, the second half
    full, so 2 x 32 beats x 48 bits = 3,072 bits moved for 6 x 32 x 12 = 2,304 bits of kept
    values + indices, of 6 x 64 x 8 = 3,072 dense bits."""
    sim = "icarus" if runner.available("icarus") else "verilator"
    if not runner.available(sim):
        pytest.skip("no simulator")
    cfg = preset("tiny")
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (3, 64), dtype=np.int8)
    w = NMTensor.compress(nm_prune(rng.integers(-128, 128, (6, 64), dtype=np.int8), "2:4"), "2:4")
    run = run_rtl(x, w, cfg, sim=sim)
    traffic = weight_traffic(cfg, "2:4", run.stats["shape"], run.stats["activity"])
    assert run.stats["activity"]["weight_beats"] == 2 * 32
    assert traffic == {"rtl_bits": 3072, "model_bits": 3072, "plan_bits": 2304,
                       "dense_bits": 3072}


def test_full_selector_runs_auto_as_the_cli_for_both_macros(monkeypatch):
    from flexcim.flow import pipeline as fp
    from flexcim.flow.select import SelectConfig

    from flexcim.demo import LOSS_WINDOWS, REFINE_STEPS, _plans

    seen = []
    monkeypatch.setattr(fp, "make_plan", lambda model, windows, cfg, **kw: seen.append(cfg))
    cli = SelectConfig(method="auto", target=0.5)  # what `flexcim flow select` builds
    for full in (False, True):
        seen.clear()
        _plans(fp, None, None, None, 0.5, None, full_selector=full)
        autos = [c for c in seen if c.method == "auto"]
        assert [c.hw_config for c in autos] == [preset("default"), preset("fixed24")]
        for c in autos:  # both macros get the same selector settings
            expected = ((cli.refine_steps, cli.loss_windows) if full
                        else (REFINE_STEPS, LOSS_WINDOWS))
            assert (c.refine_steps, c.loss_windows) == expected
        assert {c.method for c in seen} == {"auto", "uniform", "owl", "flow"}
