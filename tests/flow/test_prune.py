import numpy as np
import pytest
import torch
from flexcim.flow import prune
from flexcim.spec.nm import topn_mask

from flexcim.errors import FlexCimError


def test_nm_mask_hand_case_keeps_n_and_breaks_ties_low():
    scores = torch.tensor([[3.0, 1, 2, 5, 0, 0, 7, 7], [1, 1, 1, 1, 9, 8, 9, 0]])
    mask = prune.nm_mask(scores, n_keep=2, m=4)
    assert mask.tolist() == [
        [True, False, False, True, False, False, True, True],
        [True, True, False, False, True, False, True, False],
    ]
    # N is the number KEPT: 1:4 keeps one per group, 3:4 prunes one.
    assert prune.nm_mask(scores, n_keep=1, m=4).sum().item() == 4
    assert prune.nm_mask(scores, n_keep=3, m=4).sum().item() == 12


def test_nm_mask_equals_golden_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(16, 64)).astype(np.float64)
    for n, m in ((1, 4), (2, 4), (4, 8), (3, 16)):
        mine = prune.nm_mask(torch.from_numpy(scores), n_keep=n, m=m).numpy()
        assert np.array_equal(mine, topn_mask(scores, f"{n}:{m}"))


def test_nm_rank_is_the_place_in_a_stable_descending_order():
    scores = torch.tensor([[3.0, 1, 2, 5, 0, 0, 7, 7]])
    assert prune.nm_rank(scores, m=4).tolist() == [[1, 3, 2, 0, 2, 3, 0, 1]]
    # a naive rank: how many of the group beat the score, ties to the lower index
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, size=(6, 32)).astype(np.float32)
    for m in (2, 4, 8, 16):
        rank = prune.nm_rank(torch.from_numpy(s), m=m).numpy()
        g = s.reshape(-1, m)
        naive = np.array([[sum(g[r, j] > g[r, i] or (g[r, j] == g[r, i] and j < i)
                               for j in range(m)) for i in range(m)] for r in range(len(g))])
        assert np.array_equal(rank.reshape(-1, m), naive)
        for n in range(1, m + 1):
            assert np.array_equal(rank < n, topn_mask(s.astype(np.float64), f"{n}:{m}"))


def test_wanda_uses_root_mean_square_not_mean_square():
    weight = torch.tensor([[4.0, 1.0, 1.0, 1.0]])
    act_sq_mean = torch.tensor([1.0, 9.0, 0.0, 0.0])
    scores = prune.wanda_scores(weight, act_sq_mean)
    assert scores.tolist() == [[4.0, 3.0, 0.0, 0.0]]
    # with x^2 instead of sqrt(x^2) channel 1 (score 9) would win
    assert prune.prune_nm(weight, scores, n_keep=1, m=4).tolist() == [[4.0, 0, 0, 0]]


def test_wanda_ranks_within_each_row():
    # Row 1 is 100x larger: a per-layer ranking would prune row 0 entirely.
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [100.0, 200.0, 300.0, 400.0]])
    pruned = prune.prune_nm(weight, prune.wanda_scores(weight, torch.ones(4)), n_keep=2, m=4)
    assert pruned.tolist() == [[0, 0, 3.0, 4.0], [0, 0, 300.0, 400.0]]


def _sparsegpt_reference(w, h, n, m, percdamp=0.01):
    """Direct OBS in float64: explicit inverse of the Hessian of the not-yet-quantized columns."""
    w = w.double().clone()
    h = h.double().clone()
    k = w.shape[1]
    h += percdamp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i in range(k):
        if i % m == 0:
            # saliency of column j uses [H_F^-1]_jj with F = columns j.. (still free at j)
            sal = torch.stack([w[:, j] ** 2 / torch.linalg.inv(h[j:, j:])[0, 0]
                               for j in range(i, i + m)], dim=1)
            top = torch.sort(sal, dim=1, descending=True, stable=True).indices[:, :n]
            mask[:, i:i + m] = torch.zeros(w.shape[0], m, dtype=torch.bool).scatter(1, top, True)
        hinv = torch.linalg.inv(h[i:, i:])
        q = torch.where(mask[:, i], w[:, i], torch.zeros_like(w[:, i]))
        w[:, i:] -= ((w[:, i] - q) / hinv[0, 0])[:, None] * hinv[0][None, :]
        w[:, i] = q
    return w


@pytest.mark.parametrize("n, m, blocksize", [(2, 4, 128), (2, 4, 8), (1, 8, 8), (4, 8, 16)])
def test_sparsegpt_matches_direct_obs_reference(n, m, blocksize):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated inputs
    w = torch.randn(6, 24, generator=g)
    h = x.T @ x / 200
    got = prune.sparsegpt_nm(w, h, n_keep=n, m=m, blocksize=blocksize)
    ref = _sparsegpt_reference(w, h, n, m)
    assert torch.equal(got != 0, ref != 0)
    assert torch.allclose(got.double(), ref, atol=2e-4, rtol=1e-3)
    assert ((got.reshape(-1, m) != 0).sum(1) == n).all()


def test_sparsegpt_with_white_inputs_is_magnitude_pruning():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 16, generator=g)
    got = prune.sparsegpt_nm(w, torch.eye(16), n_keep=2, m=4)
    assert torch.equal(got, prune.prune_nm(w, w.abs(), n_keep=2, m=4))


def test_sparsegpt_compensates_better_than_masking():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 32, generator=g) @ torch.randn(32, 32, generator=g)
    w = torch.randn(8, 32, generator=g)
    h = x.T @ x / 400
    act_sq = (x**2).mean(0)
    wanda = prune.prune_nm(w, prune.wanda_scores(w, act_sq), n_keep=2, m=4)
    sgpt = prune.sparsegpt_nm(w, h, n_keep=2, m=4)
    err = lambda v: float(((x @ (w - v).T) ** 2).mean())  # noqa: E731
    assert err(sgpt) < 0.8 * err(wanda)


def test_bad_patterns():
    w = torch.zeros(2, 12)
    with pytest.raises(FlexCimError, match="in_features=12 is not a multiple of M=8"):
        prune.sparsegpt_nm(w, torch.eye(12), n_keep=2, m=8)
    with pytest.raises(FlexCimError, match="last axis=12 is not a multiple of M=8"):
        prune.nm_mask(w, n_keep=2, m=8)
    with pytest.raises(FlexCimError, match="N must be from 1 to M=4"):
        prune.nm_mask(w, n_keep=5, m=4)
    with pytest.raises(FlexCimError, match="do not match in_features=12"):
        prune.wanda_scores(w, torch.ones(8))


def test_prune_weight_dispatches_each_metric_and_names_missing_statistics():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 16, generator=g)
    x = torch.randn(64, 16, generator=g) * torch.linspace(0.1, 3.0, 16)
    act_sq_mean, hessian = (x * x).mean(0), x.T @ x
    # the reference: keep the 2 of every 4 inputs with the largest score, by a naive loop
    for metric, score in (("magnitude", w.abs()), ("wanda", w.abs() * act_sq_mean.sqrt())):
        want = torch.zeros_like(w)
        for r in range(4):
            for g0 in range(0, 16, 4):
                keep = sorted(range(g0, g0 + 4), key=lambda j: (-float(score[r, j]), j))[:2]
                want[r, keep] = w[r, keep]
        got = prune.prune_weight(w, metric, n_keep=2, m=4, act_sq_mean=act_sq_mean)
        assert torch.equal(got, want), metric
    sgpt = prune.prune_weight(w, "sparsegpt", n_keep=2, m=4, hessian=hessian)
    assert torch.equal(sgpt, prune.sparsegpt_nm(w, hessian, n_keep=2, m=4))
    assert not torch.equal(sgpt, prune.prune_weight(w, "magnitude", n_keep=2, m=4))  # updated
    with pytest.raises(FlexCimError, match="'wanda' needs"):
        prune.prune_weight(w, "wanda", n_keep=2, m=4)
    with pytest.raises(FlexCimError, match="'sparsegpt' needs"):
        prune.prune_weight(w, "sparsegpt", n_keep=2, m=4)
    with pytest.raises(FlexCimError, match="metric must be one of"):
        prune.prune_weight(w, "obs", n_keep=2, m=4)
