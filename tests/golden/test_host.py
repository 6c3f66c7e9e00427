import numpy as np
import pytest
from flexcim.golden import host, perf
from flexcim.golden.matmul import sparse_matmul
from flexcim.golden.prune import nm_prune
from flexcim.spec import layouts
from flexcim.spec.config import preset
from flexcim.spec.nm import NMTensor

from flexcim.errors import FlexCimError


def random_layer(rng, pattern, t, k, c, extreme=False):
    if extreme:
        x = rng.choice(np.array([-128, 127], dtype=np.int8), size=(t, k))
        w = rng.choice(np.array([-128, 127], dtype=np.int8), size=(c, k))
    else:
        x = rng.integers(-128, 128, size=(t, k), dtype=np.int8)
        w = rng.integers(-128, 128, size=(c, k), dtype=np.int8)
    return x, NMTensor.compress(nm_prune(w, pattern), pattern)


@pytest.mark.parametrize("name, pattern", [(name, str(p)) for name in ("tiny", "tiny3")
                                           for p in preset(name).patterns])
def test_model_and_host_match_sparse_matmul_on_every_tiny_pattern(name, pattern):
    cfg = preset(name).replace(max_tokens=3)
    rng = np.random.default_rng(abs(hash(pattern)) % 2**32)
    m = int(pattern.split(":")[1])
    # K spans several chunks (max_k_for of 1:1 is 32), C several column tiles, T several blocks.
    for t, k, c, extreme in [(7, 10 * m if m > 1 else 70, 9, False), (1, m, 1, False),
                             (4, 6 * m, 5, True)]:
        x, w = random_layer(rng, pattern, t, k, c, extreme)
        run = host.run_layer(cfg, x, w, host.MacroModel(cfg).execute)
        np.testing.assert_array_equal(run.y, sparse_matmul(x, w, cfg.acc_bits))
        assert len(run.commands) == len(perf.schedule(cfg, pattern, t, k, c))


def test_extreme_values_wrap_at_acc_bits():
    cfg = preset("tiny")  # 20-bit accumulators: 128 * 128 * 64 = 2**20 wraps
    x = np.full((2, 64), -128, dtype=np.int8)
    w = NMTensor.compress(np.full((4, 64), -128, dtype=np.int8), "1:1")
    y = host.run_layer(cfg, x, w, host.MacroModel(cfg).execute).y
    assert (y == 0).all() and (sparse_matmul(x, w, 32) == 2**20).all()


def test_all_zero_groups_give_zero():
    cfg = preset("tiny")
    x = np.full((3, 16), 127, dtype=np.int8)
    w = NMTensor.compress(np.zeros((4, 16), dtype=np.int8), "2:8")
    assert not host.run_layer(cfg, x, w, host.MacroModel(cfg).execute).y.any()


def test_a_lost_result_beat_is_reported():
    cfg = preset("tiny")
    x, w = random_layer(np.random.default_rng(0), "2:4", 3, 8, 4)

    def lossy(cmds, weights, acts):
        return host.MacroModel(cfg).execute(cmds, weights, acts)[:-1]

    with pytest.raises(FlexCimError, match="returned 2 result beats; the schedule expects 3"):
        host.run_layer(cfg, x, w, lossy)


def test_a_wrong_engine_is_caught():
    """Swapping the weight beats of two cell rows of different groups changes the answer
    (rows 0 and 1 hold the two slots of one 2:4 group and see the same lanes: rows 0 and 2)."""
    cfg = preset("tiny")
    x, w = random_layer(np.random.default_rng(3), "2:4", 2, 16, 4)

    def swapped(cmds, weights, acts):
        weights = list(weights)
        weights[0], weights[2] = weights[2], weights[0]
        return host.MacroModel(cfg).execute(cmds, weights, acts)

    y = host.run_layer(cfg, x, w, swapped).y
    assert not np.array_equal(y, sparse_matmul(x, w, cfg.acc_bits))


def test_model_drops_commands_the_hardware_rejects():
    cfg = preset("tiny")
    model = host.MacroModel(cfg)
    k_field = layouts.cmd_layout(cfg)["k"].offset
    tokens_field = layouts.cmd_layout(cfg)["tokens"].offset
    bad_k = layouts.pack_cmd(cfg, "1:1", 8, 1, True) & ~(0xFF << k_field)  # k = 0
    no_tokens = layouts.pack_cmd(cfg, "1:1", 8, 1, True) & ~(0xFF << tokens_field)
    assert model.execute([bad_k, no_tokens], [], []) == []
    assert model.rejected == 2
