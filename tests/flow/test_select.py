import itertools
import json
import random
import statistics

import pytest
import torch
from flexcim.flow import select as sel
from flexcim.flow.model import decoder_blocks, tiny_llama

from flexcim.errors import FlexCimError


def test_mean_pairwise_distance_matches_brute_force():
    p = torch.tensor([7, 0, 3, 20, 4])
    pairs = [abs(a - b) for a, b in itertools.combinations(p.tolist(), 2)]
    assert sel.mean_pairwise_distance(p) == pytest.approx(sum(pairs) / len(pairs))
    assert sel.mean_pairwise_distance(torch.tensor([5])) == 0.0


def test_block_outliers_hand_case():
    a = torch.ones(2, 8)
    a[0, 2] = a[0, 3] = 100.0  # two adjacent outliers (flat positions 2, 3)
    b = torch.ones(1, 8)
    out = sel.block_outliers([a, b], hyper_m=5.0)  # mean = (22 + 198) / 24 = 9.17, threshold 45.8
    assert out.count == 2 and out.ratio == pytest.approx(2 / 24)
    assert out.locality == pytest.approx(1.0)  # 1 / distance 1
    assert sel.block_outliers([a, b], hyper_m=200.0).count == 0


def _brute(costs, sparsities, target):
    best = {}
    for choice in itertools.product(*[range(len(r)) for r in costs]):
        s = sum(sparsities[i][c] for i, c in enumerate(choice)) / len(costs)
        cost = sum(costs[i][c] for i, c in enumerate(choice))
        key = round(s, 9)
        best[key] = min(best.get(key, float("inf")), cost)
    nearest = min(best, key=lambda s: (abs(s - target), s))
    return nearest, best[nearest]


def test_dp_is_optimal_against_brute_force():
    rng = random.Random(0)
    options = [0.0, 0.25, 0.5, 0.75]
    for trial in range(30):
        layers = rng.randint(1, 5)
        costs = [[rng.random() for _ in options] for _ in range(layers)]
        sparsities = [options for _ in range(layers)]
        target = rng.choice([0.0, 0.3, 0.5, 0.6, 0.7, 0.75])
        sol = sel.solve(costs, sparsities, target, denominator=4)
        s, cost = _brute(costs, sparsities, target)
        assert sol.sparsity == pytest.approx(s), trial
        got = sum(costs[i][c] for i, c in enumerate(sol.choice))
        assert got == pytest.approx(cost), trial
        assert sol.exact == (abs(s - target) < 1e-9)


def test_unreachable_target_gives_nearest_and_says_so():
    sparsities = [[0.0, 0.5, 0.75]] * 3  # totals in quarters: 0.6 is not reachable
    sol = sel.solve([[0, 0, 0]] * 3, sparsities, 0.6, denominator=4)
    assert not sol.exact and sol.sparsity == pytest.approx(7 / 12)
    assert "0.6 is not reachable" in sol.message and "0.583333" in sol.message
    with pytest.raises(FlexCimError, match=r"target sparsity 0.8 is outside \[0, 0.75\]"):
        sel.solve([[0, 0, 0]] * 3, sparsities, 0.8, denominator=4)


def _scores(blocks, outliers):
    """All-ones scores; block i gets outliers (value 100) at the given flat q_proj positions."""
    scores = {}
    for block in blocks:
        for name, layer in block.linears.items():
            scores[name] = torch.ones_like(layer.weight)
        q = next(iter(block.linears))
        flat = scores[q].reshape(-1)
        flat[torch.tensor(outliers[block.index], dtype=torch.long)] = 100.0
    return scores


@pytest.fixture
def blocks():
    return decoder_blocks(tiny_llama(0))


@pytest.fixture
def scores(blocks):
    return _scores(blocks, {
        0: list(range(100, 140)),            # many, clustered
        1: list(range(0, 1000, 25)),         # many, scattered
        2: [0, 1023], 3: [0, 1023],          # few, far apart
    })


@pytest.mark.parametrize("direction, first, second", [("code", "2:4", "4:8"),
                                                      ("figure", "4:8", "2:4")])
def test_m_direction_for_clustered_outliers(blocks, scores, direction, first, second):
    config = sel.SelectConfig(method="flow", target=0.5, m_direction=direction,
                              keep_ends_dense=False, normalisation="minmax",
                              candidates=sel.parse_candidates("2:4,4:8"))
    plan = sel.select(blocks, scores, config)
    assert plan.blocks[0]["locality_norm"] == 1.0 and plan.blocks[1]["locality_norm"] < 0.1
    assert [b["pattern"] for b in plan.blocks[:2]] == [first, second]
    assert plan.achieved_sparsity == 0.5 and plan.exact


def test_flow_gives_outlier_blocks_more_weights(blocks, scores):
    plan = sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.5,
                                                       m_direction="code", keep_ends_dense=False,
                                                       normalisation="minmax"))
    dens = [1 - b["sparsity"] for b in plan.blocks]
    assert min(dens[:2]) > max(dens[2:])
    assert plan.achieved_sparsity == pytest.approx(0.5) and plan.exact
    assert set(plan.layers.values()) == {b["pattern"] for b in plan.blocks}


def test_owl_band_and_exact_target(blocks, scores):
    plan = sel.select(blocks, scores, sel.SelectConfig(method="owl", target=0.5, owl_lambda=0.1))
    n = [int(b["pattern"].split(":")[0]) for b in plan.blocks]
    assert all(b["pattern"].endswith(":8") for b in plan.blocks)
    assert min(n[:2]) > max(n[2:])
    assert plan.achieved_sparsity == pytest.approx(0.5)


def test_keep_ends_dense_compensates(blocks, scores):
    plan = sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.375,
                                                       m_direction="code", normalisation="minmax"))
    assert plan.settings["keep_ends_dense"] is True  # the default for flow
    assert plan.blocks[0]["pattern"] == plan.blocks[-1]["pattern"] == "1:1"
    assert plan.achieved_sparsity == pytest.approx(0.375)
    assert {b["pattern"] for b in plan.blocks[1:3]} == {"2:8"}


def test_default_ends_dense_falls_back_when_the_target_needs_the_ends(blocks, scores):
    # 4 blocks, paper candidates: with dense ends at most 2 x 0.75 / 4 = 0.375 is reachable
    plan = sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.5))
    assert plan.settings["keep_ends_dense"] is False and plan.exact
    assert plan.achieved_sparsity == pytest.approx(0.5)
    assert "outside [0, 0.375]" in plan.message and "pruned like the others" in plan.message
    kept = sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.25))
    assert kept.settings["keep_ends_dense"] is True and kept.message == ""
    assert kept.blocks[0]["pattern"] == kept.blocks[3]["pattern"] == "1:1"
    with pytest.raises(FlexCimError, match=r"outside \[0, 0.375\]"):  # asked for: no fallback
        sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.5,
                                                    keep_ends_dense=True))


def test_uniform_and_bad_inputs(blocks, scores):
    plan = sel.select(blocks, scores, sel.SelectConfig(method="uniform", pattern="2:4"))
    assert set(plan.layers.values()) == {"2:4"} and plan.achieved_sparsity == 0.5
    with pytest.raises(FlexCimError, match="outside"):
        sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.9))
    with pytest.raises(FlexCimError, match="target sparsity must be in"):
        sel.SelectConfig(method="flow", target=1.5)
    with pytest.raises(FlexCimError, match="needs a target"):
        sel.SelectConfig(method="owl")
    with pytest.raises(FlexCimError, match="has sparsity 0.5, not the target 0.25"):
        sel.select(blocks, scores, sel.SelectConfig(method="uniform", pattern="2:4", target=0.25))
    with pytest.raises(FlexCimError, match="method must be one of"):
        sel.SelectConfig(method="sparsest", target=0.5)


def test_pattern_m_must_divide_input_width():
    odd = decoder_blocks(tiny_llama(0, hidden=24, intermediate=40))
    scores = {n: torch.ones_like(x.weight) for b in odd for n, x in b.linears.items()}
    with pytest.raises(FlexCimError, match=r"M=16 does not divide the input width 24 of "
                                           r"model.layers.0.self_attn.q_proj"):
        sel.select(odd, scores, sel.SelectConfig(method="uniform", pattern="4:16"))


def test_hardware_aware_cost_records_cycles(blocks, scores):
    from flexcim.spec.config import DEFAULT

    config = sel.SelectConfig(method="flow", target=0.5, hw_config=DEFAULT, hw_weight=100.0,
                              keep_ends_dense=False,
                              candidates=sel.parse_candidates("1:1,2:4,4:8,1:4,2:8"))
    plan = sel.select(blocks, scores, config)
    assert plan.achieved_sparsity == pytest.approx(0.5)
    assert all(b["cycles"] > 0 for b in plan.blocks)
    assert plan.settings["hw_config"]["rows"] == DEFAULT.rows
    plain = sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.5,
                                                        candidates=config.candidates,
                                                        keep_ends_dense=False))
    cycles = sel.SelectConfig(method="flow", target=0.5, hw_config=DEFAULT, hw_weight=0.0,
                              keep_ends_dense=False,
                              candidates=config.candidates)
    plain_cycles = sum(b["cycles"] for b in sel.select(blocks, scores, cycles).blocks)
    assert sum(b["cycles"] for b in plan.blocks) <= plain_cycles
    assert [b["pattern"] for b in sel.select(blocks, scores, cycles).blocks] == [
        b["pattern"] for b in plain.blocks]


def test_plan_json_round_trip_and_errors(blocks, scores, tmp_path):
    plan = sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.25))
    plan.save(tmp_path / "plan.json")
    again = sel.Plan.load(tmp_path / "plan.json")
    assert again.layers == plan.layers and again.blocks == plan.blocks
    with pytest.raises(FlexCimError, match="does not exist"):
        sel.Plan.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FlexCimError, match="not valid JSON"):
        sel.Plan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(FlexCimError, match="is not a FlexCiM plan"):
        sel.Plan.load(tmp_path / "other.json")


def test_flow_ties_keep_outlier_richer_blocks_denser(blocks):
    # all four blocks have few outliers (n_max * O below 2 for all but the top one), so FLOW's
    # own cost is flat; the tie-break must keep the richer ones dense, not the first ones
    scores = _scores(blocks, {0: [5], 1: [5, 300, 600], 2: [5, 300], 3: list(range(0, 1000, 90))})
    plan = sel.select(blocks, scores, sel.SelectConfig(method="flow", target=0.25,
                                                       candidates=sel.parse_candidates("2:4,4:4"),
                                                       keep_ends_dense=False,
                                                       normalisation="minmax"))
    assert [b["pattern"] for b in plan.blocks] == ["2:4", "4:4", "2:4", "4:4"]


def test_normalisations_hand_cases():
    values = [0.0, 1.0, 2.0, 100.0]  # one extreme value, as block 0's ratio on SmolLM2
    assert sel.minmax(values) == pytest.approx([0, 0.01, 0.02, 1])
    assert sel.rank(values) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert sel.rank([3.0, 1.0, 3.0]) == pytest.approx([0.75, 0, 0.75])  # ties share mean rank
    assert sel.rank([2.0, 2.0]) == [0.0, 0.0] and sel.zscore([2.0, 2.0]) == [0.5, 0.5]
    # z-score of [-1, 1] (population std 1) is [-1, 1]; Phi(1) = 0.841345
    assert sel.zscore([-1.0, 1.0]) == pytest.approx([1 - 0.8413447, 0.8413447])
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    expected = [statistics.NormalDist().cdf((v - mean) / std) for v in values]
    assert sel.zscore(values) == pytest.approx(expected)
    assert sel.zscore(values)[0] == pytest.approx(0.27405, abs=1e-4)  # not squeezed to 0


def test_normalisation_changes_flow_and_is_recorded(blocks):
    # block 3 has far more outliers than the rest: min-max squeezes blocks 0-2 together near 0,
    # rank spreads them evenly
    scores = _scores(blocks, {0: [5], 1: [5, 300], 2: [5, 300, 600, 900],
                              3: list(range(0, 1000, 4))})
    plans = {}
    for norm in ("minmax", "zscore", "rank"):
        config = sel.SelectConfig(method="flow", target=0.5, normalisation=norm,
                                  keep_ends_dense=False, m_direction="figure",
                                  candidates=sel.parse_candidates("2:4,4:8,1:4,4:4"))
        plans[norm] = sel.select(blocks, scores, config)
        assert plans[norm].settings["normalisation"] == norm
        assert plans[norm].achieved_sparsity == pytest.approx(0.5)
    ratio = {k: [b["outlier_ratio_norm"] for b in p.blocks] for k, p in plans.items()}
    assert ratio["rank"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert max(ratio["minmax"][:3]) < 0.02
    assert [b["locality_norm"] for b in plans["rank"].blocks] == pytest.approx([0, 1, 1 / 3, 2 / 3])
    # block 3 (O = 1, n wanted 4): min-max locality 0.88 wants M = 7 -> 4:8 (cost 3.8 vs 12.2 for
    # 4:4); rank locality 2/3 wants M = 5.3 -> 4:4 (cost 5.3 vs 10.7), and the others compensate
    assert [b["pattern"] for b in plans["minmax"].blocks] == ["2:4", "4:8", "2:4", "4:8"]
    assert [b["pattern"] for b in plans["rank"].blocks] == ["1:4", "4:8", "1:4", "4:4"]
    with pytest.raises(FlexCimError, match="normalisation must be one of"):
        sel.SelectConfig(method="flow", target=0.5, normalisation="l2")
    # OWL keeps its min-max band whatever the option says
    owl = [sel.select(blocks, scores, sel.SelectConfig(method="owl", target=0.5,
                                                       normalisation=n)).layers
           for n in ("minmax", "rank")]
    assert owl[0] == owl[1]
