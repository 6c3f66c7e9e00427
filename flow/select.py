"""Layer-wise N:M selection: ``uniform``, ``owl`` and ``flow``, solved exactly.

A "layer" here is a whole decoder block: all its projections share one N:M (as in the FLOW
authors' release).  Per block we measure, on the Wanda (or magnitude) scores:

* the **outlier ratio** (OWL's measure): the share of scores above ``hyper_m`` times the block's
  mean score;
* the **outlier locality**: ``1 / mean pairwise distance`` of the outliers' positions in each
  projection's row-major flattened score matrix, averaged over the block's projections weighted
  by their outlier counts.  (The release looks at the first 10,000 outliers of the concatenated
  block only, so one projection dominates; we use every outlier of every projection, exactly,
  via the sorted-prefix identity for the sum of pairwise distances.)

Both are normalised over the blocks to ``O_l, D_l`` in [0, 1] (min-max as in the release, or
the normal CDF of the z-score, or the rank: ``normalisation``).  FLOW's cost of giving
block ``l`` the pattern ``n:m`` is ``|n - n_max O_l| + w_m |m - m_max (1 - D_l)|`` (direction
``code``, the release's ILP: clustered outliers get a *smaller* M) or with ``m_max D_l``
(direction ``figure``, the paper's figure: clustered outliers get a *larger* M); ``n_max, m_max``
are the largest candidate N and M (8 and 8 for the paper's set, which gives the release's
``|n - 8 O| + 4 |m - 8 (1 - D)|``).  OWL's cost is ``|n - M d_l|`` for OWL's per-layer density
``d_l = 1 - S + 2 lambda (O_l - mean O)``.  Optionally the layer's latency on a FlexCiM
configuration (:mod:`flexcim.golden.perf`, relative to dense) is added with weight ``hw_weight``.

All three minimise their cost under ``mean sparsity == target`` with an exact dynamic program
over the (integer) pruned fractions; when the target is not reachable with the candidates the
nearest reachable average is chosen and :attr:`Plan.message` says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import torch
from flexcim.spec.nm import NMPattern

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_write, check_output

log = logging.getLogger("flexcim.flow")

METHODS = ("auto", "uniform", "owl", "flow")
M_DIRECTIONS = ("figure", "code")
PAPER_CANDIDATES = tuple(NMPattern(n, m) for m in (4, 8) for n in (2, 4, 8) if n <= m)
EXTENDED_CANDIDATES = tuple(NMPattern(n, m) for m in (4, 8, 16) for n in (1, 2, 4, 8, 16)
                            if n <= m)
PLAN_FORMAT = "flexcim-plan"
TIE_BREAK = 1e-6
"""Weight of the secondary cost ``sparsity * outlier ratio / max ratio`` that breaks FLOW's ties."""


def parse_candidates(text: str) -> tuple[NMPattern, ...]:
    """``paper``, ``extended`` or a comma list like ``2:4,4:8,2:8``."""
    if text == "paper":
        return PAPER_CANDIDATES
    if text == "extended":
        return EXTENDED_CANDIDATES
    patterns = tuple(NMPattern.parse(p) for p in text.split(",") if p.strip())
    if not patterns:
        raise FlexCimError(f"candidate set must be 'paper', 'extended' or '2:4,4:8,...', "
                           f"not {text!r}")
    return tuple(sorted(set(patterns), key=lambda p: (p.m, p.n)))


# ---------------------------------------------------------------------------------------------
# Outlier statistics


def mean_pairwise_distance(positions: torch.Tensor) -> float:
    """Mean of ``|p_i - p_j|`` over all pairs ``i < j`` (0 for fewer than two positions)."""
    n = positions.numel()
    if n < 2:
        return 0.0
    p = positions.double().sort().values
    weights = 2 * torch.arange(n, dtype=torch.float64) - (n - 1)
    return float((p * weights).sum()) / (n * (n - 1) / 2)


@dataclasses.dataclass(frozen=True)
class Outliers:
    """Outlier ratio and locality of one decoder block's scores."""

    ratio: float
    locality: float
    count: int


def block_outliers(scores: list[torch.Tensor], hyper_m: float = 5.0) -> Outliers:
    """Outlier ratio and locality of a block from its projections' score matrices."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    threshold = hyper_m * float(flat.mean())
    count = 0
    weighted_locality = 0.0
    for s in scores:
        positions = torch.nonzero(s.reshape(-1).float() > threshold).reshape(-1)
        distance = mean_pairwise_distance(positions)
        if distance > 0:
            weighted_locality += positions.numel() / distance
        count += positions.numel()
    return Outliers(ratio=count / flat.numel(), locality=weighted_locality / max(count, 1),
                    count=count)


def minmax(values: list[float]) -> list[float]:
    """Min-max normalise to [0, 1] (all zeros when the values are all equal)."""
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def zscore(values: list[float]) -> list[float]:
    """Standard normal CDF of the z-score, in (0, 1) (all 0.5 when the values are all equal).

    Unlike min-max, one extreme block moves the others' values only through the mean and the
    standard deviation, so the bulk of the blocks stays spread around 0.5.
    """
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    if std == 0:
        return [0.5] * n
    return [0.5 * (1 + math.erf((v - mean) / (std * math.sqrt(2)))) for v in values]


def rank(values: list[float]) -> list[float]:
    """Rank / (count - 1) in [0, 1], ties sharing their mean rank (all 0 for equal values)."""
    n = len(values)
    if n < 2 or max(values) == min(values):
        return [0.0] * n
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 / (n - 1)
        i = j + 1
    return ranks


NORMALISATIONS = {"minmax": minmax, "zscore": zscore, "rank": rank}


# ---------------------------------------------------------------------------------------------
# The exact solver


@dataclasses.dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # candidate index per layer
    sparsity: float
    exact: bool
    message: str


def solve(costs: list[list[float]], sparsities: list[list[float]], target: float, *,
          denominator: int) -> Solution:
    """Choose one option per layer minimising total cost under ``mean sparsity == target``.

    ``sparsities[l][c] * denominator`` must be an integer (pruned units), which makes the
    constraint exact: a DP over (layer, total units) finds the optimum over every reachable total
    and picks the total nearest ``target`` (ties to the lower sparsity).  Options with an
    infinite cost are excluded.

    Raises
    ------
    FlexCimError
        When ``target`` lies outside ``[0, max reachable]``.
    """
    layers = len(costs)
    units = [[round(s * denominator) for s in row] for row in sparsities]
    for row, urow in zip(sparsities, units, strict=True):
        for s, u in zip(row, urow, strict=True):
            if abs(s * denominator - u) > 1e-9:
                raise ValueError(f"sparsity {s} is not a multiple of 1/{denominator}")
    # best[t] = (cost, choices) for the layers so far with total units t
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for layer in range(layers):
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for total, (cost, choice) in best.items():
            for c, (option_cost, u) in enumerate(zip(costs[layer], units[layer], strict=True)):
                if math.isinf(option_cost):
                    continue
                key, value = total + u, cost + option_cost
                if key not in nxt or value < nxt[key][0] - 1e-12:
                    nxt[key] = (value, (*choice, c))
        best = nxt
        if not best:
            raise FlexCimError(f"layer {layer} has no admissible N:M candidate")
    scale = layers * denominator
    reachable = sorted(best)
    max_sparsity = reachable[-1] / scale
    if not (0.0 <= target <= max_sparsity + 1e-9):
        raise FlexCimError(
            f"target sparsity {target:g} is outside [0, {max_sparsity:.4g}], the range reachable "
            f"with these candidates on {layers} blocks"
        )
    wanted = target * scale
    total = min(reachable, key=lambda t: (abs(t - wanted), t))
    exact = abs(total - wanted) < 1e-6
    achieved = total / scale
    message = "" if exact else (
        f"target sparsity {target:g} is not reachable exactly with these candidates on {layers} "
        f"blocks; using the nearest reachable average {achieved:.6g}"
    )
    return Solution(choice=best[total][1], sparsity=achieved, exact=exact, message=message)


# ---------------------------------------------------------------------------------------------
# Plans


@dataclasses.dataclass
class Plan:
    """A per-block N:M assignment and how it was chosen (JSON round-trip).

    Members
    -------
    blocks : list of dict
        Per block: ``index``, ``name``, ``pattern`` (``n:m``), ``sparsity`` and the statistics
        behind the choice (``outlier_ratio``, ``locality``, normalised values, ``cycles``).
    layers : dict of str to str
        Pattern per projection (module path), what :func:`flexcim.flow.pipeline.apply_plan` uses.
    """

    method: str
    target_sparsity: float
    achieved_sparsity: float
    exact: bool
    message: str
    blocks: list[dict]
    layers: dict[str, str]
    settings: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **dataclasses.asdict(self)}

    def save(self, path: str | os.PathLike) -> None:
        check_output(path, "plan output")
        atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        if not os.path.isfile(path):
            raise FlexCimError(f"plan file {str(path)!r} does not exist")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FlexCimError(f"plan file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.pop("format", None) != PLAN_FORMAT:
            raise FlexCimError(f"{str(path)!r} is not a FlexCiM plan (format {PLAN_FORMAT!r})")
        from flexcim.flow.prune import METRICS

        def bad(field: str, expected: str, value) -> FlexCimError:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return FlexCimError(f"plan file {str(path)!r}: field {field!r} must be {expected}, "
                                f"not {shown}")

        def fraction(field: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 <= value <= 1:
                raise bad(field, "a number from 0 to 1", value)
            return float(value)

        def pattern(field: str, value) -> str:
            try:
                return str(NMPattern.parse(value if isinstance(value, str) else None))
            except FlexCimError:
                raise bad(field, "an N:M pattern like '2:4'", value) from None

        fields = {f.name for f in dataclasses.fields(cls)}
        required = fields - {"settings"}
        if unknown := sorted(data.keys() - fields):
            raise FlexCimError(f"plan file {str(path)!r} has unknown field {unknown[0]!r}")
        if missing := sorted(required - data.keys()):
            raise FlexCimError(f"plan file {str(path)!r} lacks field {missing[0]!r}")
        if data["method"] not in METHODS:
            raise bad("method", f"one of {', '.join(METHODS)}", data["method"])
        fraction("target_sparsity", data["target_sparsity"])
        fraction("achieved_sparsity", data["achieved_sparsity"])
        if not isinstance(data["exact"], bool):
            raise bad("exact", "true or false", data["exact"])
        if not isinstance(data["message"], str):
            raise bad("message", "a string", data["message"])
        if not isinstance(data["blocks"], list):
            raise bad("blocks", "a list of objects", data["blocks"])
        for i, block in enumerate(data["blocks"]):
            where = f"blocks[{i}]"
            if not isinstance(block, dict):
                raise bad(where, "an object", block)
            if isinstance(block.get("index"), bool) or not isinstance(block.get("index"), int) \
                    or block["index"] < 0:
                raise bad(f"{where}.index", "an integer >= 0", block.get("index"))
            if not isinstance(block.get("name"), str):
                raise bad(f"{where}.name", "a string", block.get("name"))
            if block.get("pattern") != "mixed":  # an auto block whose projections differ
                pattern(f"{where}.pattern", block.get("pattern"))
            if "patterns" in block:  # auto: the pattern of every projection kind
                if not isinstance(block["patterns"], dict):
                    raise bad(f"{where}.patterns", "an object of kind: pattern",
                              block["patterns"])
                for kind, value in block["patterns"].items():
                    pattern(f"{where}.patterns[{kind!r}]", value)
            elif block.get("pattern") == "mixed":
                raise bad(f"{where}.pattern", "an N:M pattern like '2:4' (or 'mixed' with "
                          "'patterns')", "mixed")
        if not isinstance(data["layers"], dict) or not data["layers"]:
            raise bad("layers", "a non-empty object of projection: pattern", data["layers"])
        for name, value in data["layers"].items():
            pattern(f"layers[{name!r}]", value)
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise bad("settings", "an object", settings)
        if "metric" in settings and settings["metric"] not in METRICS:
            raise bad("settings.metric", f"one of {', '.join(METRICS)}", settings["metric"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Settings of :func:`select` (all have the paper's/release's defaults).

    Members
    -------
    method : ``auto`` | ``uniform`` | ``owl`` | ``flow``
        ``auto`` (the default): a pattern per projection from measured sensitivity
        (:mod:`flexcim.flow.auto`) among the target macro's patterns (``hw_config``, default
        the ``default`` preset); ``flow`` the paper's criterion; ``owl``, ``uniform`` baselines.
    target : float or None
        Mean sparsity over the decoder blocks; ``uniform`` may give ``pattern`` instead.
    pattern : str or None
        ``uniform``: the pattern everywhere; ``owl``: its M is the fixed M (default 8).
    candidates : tuple of NMPattern
        ``flow``'s choice set.
    hyper_m : float
        Outlier threshold as a multiple of the block's mean score (OWL's M, default 5).
    owl_lambda : float
        OWL's half-width of the per-layer density band (default 0.08).
    m_direction : ``figure`` | ``code``
        Which way locality pushes M (see the module docstring).  ``code`` is the default: with
        the first and last blocks dense it had the lowest validation perplexity on SmolLM2
        (without dense ends ``figure`` was better, because ``code`` pruned block 0 to 2:8;
        docs/flow.md).
    m_weight : float
        Weight of FLOW's M term (the release's 4).
    normalisation : ``minmax`` | ``zscore`` | ``rank``
        How FLOW maps the blocks' outlier ratio and locality to [0, 1]: min-max (the release),
        the normal CDF of the z-score, or the rank.  OWL always uses min-max (its band).
    keep_ends_dense : bool or None
        Force the first and last blocks dense (the release does); the others compensate so the
        mean over *all* blocks still meets the target.  ``None`` (default): on for ``flow``
        (measured far better on SmolLM2, docs/flow.md) unless that makes the target
        unreachable (a model with few blocks; the plan's message says so), off for ``uniform``
        and ``owl`` (their published forms).
    hw_config : HwConfig or None
        Add each block's relative latency on this macro to the cost (``hw_weight`` x
        cycles/dense cycles); candidates the macro does not support are excluded.
    hw_tokens : int
        Tokens per layer call in the latency model (a prefill chunk).
    granularity : ``best`` | ``projection`` | ``block``
        ``auto``: one pattern per projection or per decoder block, or (``best``, the default)
        whichever of the two allocations, and of the uniform pattern when the macro has one at
        the target, gives the lowest loss on the ``loss_windows`` calibration windows.
    sens_windows : int
        ``auto``: calibration windows used to measure sensitivity (the first ones).
    refine_steps : int or None
        ``auto``: steps of the local search on the calibration loss after the exact allocation
        (:func:`flexcim.flow.auto.refine`; 0: none; None, the default: 48 up to a target of
        50 %, 192 above, :func:`flexcim.flow.auto.default_refine_steps`).
    loss_windows : int
        ``auto``: calibration windows on which the candidate plans are compared and the local
        search measures (those after the sensitivity's; 4 overfitted on validation, 8 did
        not, docs/flow.md).
    refine_seed : int
        ``auto``: seed of the local search's draws.
    significance : float
        ``auto``: how clearly the best candidate plan must beat the uniform pattern on the loss
        windows to replace it: the mean of the paired per-window loss differences must exceed
        ``significance`` standard errors (the default 2; 0: any gain, as before 2026-12-04).
    lm_head : bool
        ``auto``: the LM head is one more projection it allocates (untied from the embedding,
        its measured cost, its parameters counted in the target sparsity); off by default: the
        head stays dense and the target counts the decoder blocks' projections only.
    sens_cache : str or None
        ``auto``: a folder where the sensitivity measurement is kept and reused (see
        :func:`flexcim.flow.auto.measure_sensitivity`; the CLI's default is under
        ``~/.cache/flexcim``); None: measured every time.
    """

    method: str = "auto"
    target: float | None = None
    pattern: str | None = None
    candidates: tuple[NMPattern, ...] = PAPER_CANDIDATES
    hyper_m: float = 5.0
    owl_lambda: float = 0.08
    m_direction: str = "code"  # with dense ends, measured better on SmolLM2 (docs/flow.md)
    m_weight: float = 4.0
    normalisation: str = "minmax"
    keep_ends_dense: bool | None = None  # None: True for flow (measured better), else False
    hw_config: object | None = None
    hw_weight: float = 1.0
    hw_tokens: int = 128
    granularity: str = "best"
    sens_windows: int = 4
    refine_steps: int | None = None
    loss_windows: int = 8
    refine_seed: int = 0
    significance: float = 2.0
    lm_head: bool = False
    sens_cache: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise FlexCimError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.m_direction not in M_DIRECTIONS:
            raise FlexCimError(
                f"M direction must be one of {M_DIRECTIONS}, not {self.m_direction!r}"
            )
        if self.normalisation not in NORMALISATIONS:
            raise FlexCimError(f"normalisation must be one of {tuple(NORMALISATIONS)}, "
                               f"not {self.normalisation!r}")
        if self.target is not None and not 0.0 <= self.target < 1.0:
            raise FlexCimError(f"target sparsity must be in [0, 1), not {self.target!r}")
        if self.target is None and not (self.method == "uniform" and self.pattern):
            raise FlexCimError(f"method {self.method!r} needs a target sparsity")
        if self.hyper_m <= 0:
            raise FlexCimError(f"hyper_m must be positive, not {self.hyper_m!r}")
        if self.granularity not in ("best", "projection", "block"):
            raise FlexCimError(f"granularity must be 'best', 'projection' or 'block', "
                               f"not {self.granularity!r}")
        if (isinstance(self.significance, bool)
                or not isinstance(self.significance, (int, float))
                or not 0.0 <= self.significance < math.inf):
            raise FlexCimError(f"significance must be a finite number >= 0, "
                               f"not {self.significance!r}")
        if not isinstance(self.lm_head, bool):
            raise FlexCimError(f"lm_head must be True or False, not {self.lm_head!r}")
        if self.lm_head and self.method != "auto":
            raise FlexCimError(f"pruning the LM head is an option of method 'auto', not of "
                               f"{self.method!r}")
        for name, label, low in (("sens_windows", "sensitivity windows", 1),
                                 ("refine_steps", "refine steps", 0),
                                 ("loss_windows", "loss windows", 1)):
            value = getattr(self, name)
            if name == "refine_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "a positive" if low else "a non-negative"
                raise FlexCimError(f"{label} must be {kind} integer, not {value!r}")


def _check_widths(blocks, pattern: NMPattern) -> None:
    for block in blocks:
        for name, layer in block.linears.items():
            if layer.in_features % pattern.m:
                raise FlexCimError(
                    f"pattern {pattern}: M={pattern.m} does not divide the input width "
                    f"{layer.in_features} of {name}"
                )


def _block_cycles(block, pattern: NMPattern, cfg, tokens: int) -> float:
    from flexcim.golden import perf

    hw_pattern = NMPattern(1, 1) if pattern.is_dense else pattern
    if not cfg.supports(hw_pattern):
        return math.inf
    return float(sum(perf.estimate(cfg, hw_pattern, tokens, layer.in_features,
                                   layer.out_features).cycles
                     for layer in block.linears.values()))


def all_outliers(blocks, scores: dict[str, torch.Tensor], hyper_m: float) -> list[Outliers]:
    """:func:`block_outliers` of every block (reusable across targets and methods)."""
    return [block_outliers([scores[n] for n in b.linears], hyper_m) for b in blocks]


def select(blocks, scores: dict[str, torch.Tensor] | None, config: SelectConfig, *,
           outliers: list[Outliers] | None = None) -> Plan:
    """Choose an N:M per decoder block.

    Parameters
    ----------
    blocks : list of :class:`flexcim.flow.model.Block`
    scores : dict of str to Tensor
        Pruning scores (Wanda or magnitude) of every projection, by module path; may be None
        when ``outliers`` is given.
    config : SelectConfig
    outliers : list of Outliers, optional
        Precomputed :func:`all_outliers` for ``config.hyper_m`` (saves recomputing them).
    """
    if outliers is None:
        outliers = all_outliers(blocks, scores, config.hyper_m)
    normalise = NORMALISATIONS[config.normalisation if config.method == "flow" else "minmax"]
    ratio_n = normalise([o.ratio for o in outliers])
    local_n = normalise([o.locality for o in outliers])
    n_blocks = len(blocks)

    if config.method == "uniform":
        if config.pattern:
            pattern = NMPattern.parse(config.pattern)
            if config.target is not None and abs(pattern.sparsity - config.target) > 1e-9:
                raise FlexCimError(
                    f"uniform pattern {pattern} has sparsity {pattern.sparsity:g}, "
                    f"not the target {config.target:g}; give one or the other"
                )
        else:
            m = NMPattern.parse(config.pattern or "4:8").m
            n = (1 - config.target) * m
            if abs(n - round(n)) > 1e-9 or round(n) < 1:
                raise FlexCimError(
                    f"uniform: target {config.target:g} is not 1 - N/{m} for a whole N; "
                    f"give --pattern"
                )
            pattern = NMPattern(round(n), m)
        candidates = [pattern]
        costs = [[0.0] for _ in blocks]
        target = pattern.sparsity
    elif config.method == "owl":
        m = NMPattern.parse(config.pattern).m if config.pattern else 8
        candidates = [NMPattern(n, m) for n in range(1, m + 1)]
        mean_o = sum(ratio_n) / n_blocks
        density = [1 - config.target + 2 * config.owl_lambda * (o - mean_o) for o in ratio_n]
        costs = [[abs(p.n - m * d) for p in candidates] for d in density]
        target = config.target
    else:
        candidates = list(config.candidates)
        n_max = max(p.n for p in candidates)
        m_max = max(p.m for p in candidates)
        costs = []
        top = max(o.ratio for o in outliers) or 1.0
        for o, d, raw in zip(ratio_n, local_n, (o.ratio / top for o in outliers), strict=True):
            want_m = m_max * ((1 - d) if config.m_direction == "code" else d)
            # FLOW's cost is flat in n for every block with n_max*O below the smallest N, so
            # without a tie-break the solver's enumeration order decides which of those blocks
            # stay dense.  A tiny term (far below any real cost difference) breaks such ties
            # toward keeping the more outlier-rich blocks denser, FLOW's and OWL's principle.
            costs.append([abs(p.n - n_max * o) + config.m_weight * abs(p.m - want_m)
                          + TIE_BREAK * p.sparsity * raw
                          for p in candidates])
        target = config.target
    for p in candidates:
        _check_widths(blocks, p)

    cycles = None
    if config.hw_config is not None:
        cycles = [[_block_cycles(b, p, config.hw_config, config.hw_tokens) for p in candidates]
                  for b in blocks]
        dense = [_block_cycles(b, NMPattern(1, 1), config.hw_config, config.hw_tokens)
                 for b in blocks]
        costs = [[c + config.hw_weight * cy / dn for c, cy in zip(row, cyr, strict=True)]
                 for row, cyr, dn in zip(costs, cycles, dense, strict=True)]
    sparsities = [[p.sparsity for p in candidates] for _ in blocks]
    denominator = math.lcm(*(p.m for p in candidates))
    auto_ends = config.keep_ends_dense is None and config.method == "flow"
    ends_dense = auto_ends or bool(config.keep_ends_dense)
    solution = None
    if ends_dense:
        end_costs, end_sparsities = list(costs), list(sparsities)
        for end in {0, n_blocks - 1}:
            end_costs[end] = [0.0]
            end_sparsities[end] = [0.0]
        try:
            solution = solve(end_costs, end_sparsities, target, denominator=denominator)
        except FlexCimError as exc:
            if not auto_ends:
                raise
            # the default only: with few blocks dense ends can make the target unreachable
            ends_dense = False
            fallback = f"{exc}; the first and last blocks are pruned like the others"
    if solution is None:
        solution = solve(costs, sparsities, target, denominator=denominator)
        if auto_ends and not ends_dense:
            message = f"{fallback}. {solution.message}" if solution.message else fallback
            solution = dataclasses.replace(solution, message=message)
    if solution.message:
        log.warning("%s", solution.message)

    records, layers = [], {}
    for i, (block, c) in enumerate(zip(blocks, solution.choice, strict=True)):
        dense_end = ends_dense and i in (0, n_blocks - 1)
        pattern = NMPattern(1, 1) if dense_end else candidates[c]
        record = {
            "index": block.index, "name": block.name, "pattern": str(pattern),
            "sparsity": pattern.sparsity, "outlier_ratio": outliers[i].ratio,
            "locality": outliers[i].locality, "outlier_ratio_norm": ratio_n[i],
            "locality_norm": local_n[i], "outliers": outliers[i].count,
        }
        if cycles is not None and not dense_end:
            record["cycles"] = cycles[i][c]
        records.append(record)
        layers.update({name: str(pattern) for name in block.linears})
    weights = {name: layer.weight.numel() for b in blocks for name, layer in b.linears.items()}
    achieved = sum(weights[n] * NMPattern.parse(p).sparsity for n, p in layers.items()) / sum(
        weights.values())
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    settings["candidates"] = [str(p) for p in candidates]
    settings["keep_ends_dense"] = ends_dense
    if config.hw_config is not None:
        settings["hw_config"] = config.hw_config.to_dict()
    return Plan(method=config.method, target_sparsity=float(target),
                achieved_sparsity=achieved, exact=solution.exact, message=solution.message,
                blocks=records, layers=layers, settings=settings)
