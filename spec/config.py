"""The one hardware configuration, shared by hw/ (generator), golden/ (performance and energy
models) and sim/ (testbenches and host driver).

A :class:`HwConfig` is frozen, validated on construction and round-trips through JSON, so the
exact configuration that elaborated a netlist reaches the simulator (one environment variable)
and the golden model.  Pure Python: importing it does not import Amaranth.

Geometry (docs/architecture.md): ``sub_macros`` x ``rows`` cell rows by ``cols`` columns; every
cell stores ``depth`` (weight, index) words.  One *pass* multiplies one word of every cell with
one window of activations: pattern N:M covers ``rows_total * M / N`` input channels per pass (an
integer: N must divide ``rows_total``, so N need not be a power of two), so
a layer of ``K`` input channels takes ``ceil(K / pass_width)`` passes per token, each lasting
``8 / act_bits_per_cycle`` cycles (bit-serial activations).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping

from flexcim.spec.nm import NMPattern

from flexcim.errors import FlexCimError

ACT_BITS = 8
WEIGHT_BITS = 8


def _pow2(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _patterns(value) -> tuple[NMPattern, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, Iterable):
        raise FlexCimError(f"patterns must be a list like ['1:1', '2:4'], not {value!r}")
    patterns = tuple(sorted({NMPattern.parse(p) for p in value}, key=lambda p: (p.m, p.n)))
    return patterns


def route(pattern: NMPattern, row: int, lane: int) -> int | None:
    """Window lane that the distribution unit routes to lane ``lane`` of cell row ``row``
    under ``pattern``: ``(row div N) * M + lane``, or ``None`` (tied to 0) when ``lane >= M``
    (docs/architecture.md, section 2)."""
    return (row // pattern.n) * pattern.m + lane if lane < pattern.m else None


_LATER_FIELDS = {"weight_port_rows": 1, "weight_overlap": 0, "tree_pipeline": 0}
"""Fields added after configurations were published, with the value that means "as before"."""


@dataclasses.dataclass(frozen=True)
class HwConfig:
    """A FlexCiM macro configuration.

    Parameters
    ----------
    sub_macros : int
        Number ``P`` of sub-macros, a power of 2; each has its own column adder trees, and the
        merging unit sums their partial sums.
    rows : int
        Cell rows per sub-macro ``R``.
    cols : int
        Columns ``C`` (output channels computed at once).
    depth : int
        Weight words per cell: passes whose weights stay resident, i.e. the longest reduction
        one command can run is ``depth * pass_width(pattern)`` input channels.
    patterns : tuple of NMPattern
        Patterns the distribution unit supports; must include 1:1 (dense); M a power of two,
        N any divisor of ``sub_macros * rows`` (3:8 on 72 rows passes 72 / 3 groups of 8 = 192
        input channels).  Stored sorted by (M, N); the position in this tuple is the pattern
        code of the command stream.
    act_bits_per_cycle : int
        Activation bits fed per cycle, 1, 2, 4 or 8 (1 = bit-serial, 8 = bit-parallel).
    in_lanes : int
        int8 activations per beat of the activation input stream.
    acc_bits : int
        Width of the two's-complement accumulators (results wrap at this width), 16..64.
    max_k : int
        Activation buffer capacity per token (input channels), a multiple of ``in_lanes``.
    max_tokens : int
        Largest token count of one command (sets the command's ``tokens`` field width).
    weight_port_rows : int
        Cell rows one beat of the weight stream writes (``W``, a divisor of ``rows``, so a beat
        stays inside one sub-macro): a command loads ``passes * rows_total / W`` beats, one per
        cycle.  1 (the default) is the original one-row port; ``rows_total / cycles_per_pass``
        rows (9 on ``default``) load a pass's weight word in the cycles a pass computes.
    weight_overlap : int
        0 or 1.  1: a token's pass starts as soon as the weight word of that pass is written
        (the compute chases the weight loader, pass by pass; a pass whose word is not complete
        waits); 0 (the default): no token starts before all weight beats of the command are in.
        Either way the macro stores one weight word per pass (no second bank: it costs no
        storage, docs/architecture.md section 4).
    tree_pipeline : int
        0 or 1.  1: a pipeline register inside every sub-macro's column adder trees
        (:func:`flexcim.hw.array.pipeline_stage`) cuts the longest combinational path
        (activation window, routing, lane selection and multiply, adder tree; 51 gates in
        ``default``, 41 with the register: docs/architecture.md section 6), for one more cycle
        of result latency per layer (:func:`flexcim.spec.timing.result_latency`; the compute is
        pipelined across passes, tokens and commands, so no other cycle changes).  0 (the
        default, every preset): no such register.  Needs ``rows >= 2``: a one-row sub-macro has
        no adder tree to cut.
    """

    sub_macros: int = 4
    rows: int = 18
    cols: int = 16
    depth: int = 8
    patterns: tuple[NMPattern, ...] = ("1:1", "2:4", "1:4", "4:8", "2:8", "1:8", "12:16", "8:16",
                                       "6:16", "4:16", "2:16")
    act_bits_per_cycle: int = 1
    in_lanes: int = 96
    acc_bits: int = 32
    max_k: int = 1536
    max_tokens: int = 65535
    weight_port_rows: int = 1
    weight_overlap: int = 0
    tree_pipeline: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name == "patterns":
                continue
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise FlexCimError(f"HwConfig {field.name} must be an integer, not {value!r}")
        object.__setattr__(self, "patterns", _patterns(self.patterns))
        if not (_pow2(self.sub_macros) and self.sub_macros <= 64):
            raise FlexCimError(
                f"Sub-macro count must be a power of 2 from 1 to 64, not {self.sub_macros!r}"
            )
        for name, limit in (("rows", 256), ("cols", 256), ("depth", 256)):
            value = getattr(self, name)
            if not 1 <= value <= limit:
                raise FlexCimError(f"HwConfig {name} must be from 1 to {limit}, not {value!r}")
        if self.act_bits_per_cycle not in (1, 2, 4, 8):
            raise FlexCimError(
                f"act_bits_per_cycle must be 1, 2, 4 or 8, not {self.act_bits_per_cycle!r}"
            )
        if not 16 <= self.acc_bits <= 64:
            raise FlexCimError(f"acc_bits must be from 16 to 64, not {self.acc_bits!r}")
        if not 1 <= self.in_lanes <= 1024:
            raise FlexCimError(f"in_lanes must be from 1 to 1024, not {self.in_lanes!r}")
        if self.max_k < 1 or self.max_k % self.in_lanes:
            raise FlexCimError(
                f"max_k must be a positive multiple of in_lanes={self.in_lanes}, not {self.max_k!r}"
            )
        if not 1 <= self.max_tokens < 2**32:
            raise FlexCimError(f"max_tokens must be from 1 to 2**32-1, not {self.max_tokens!r}")
        if self.weight_port_rows < 1 or self.rows % self.weight_port_rows:
            raise FlexCimError(
                f"weight_port_rows must be a positive divisor of rows={self.rows} (a weight beat "
                f"stays inside one sub-macro), not {self.weight_port_rows!r}"
            )
        if self.weight_overlap not in (0, 1):
            raise FlexCimError(f"weight_overlap must be 0 or 1, not {self.weight_overlap!r}")
        if self.tree_pipeline not in (0, 1):
            raise FlexCimError(f"tree_pipeline must be 0 or 1, not {self.tree_pipeline!r}")
        if self.tree_pipeline and self.rows < 2:
            raise FlexCimError(
                f"tree_pipeline=1 needs rows >= 2 (a sub-macro of one row has no adder tree to "
                f"cut), not rows={self.rows!r}"
            )
        if NMPattern(1, 1) not in self.patterns:
            raise FlexCimError(
                f"patterns must include 1:1 so every layer can run dense, not "
                f"{[str(p) for p in self.patterns]}"
            )
        for p in self.patterns:
            if p.is_dense and p.m != 1:
                raise FlexCimError(f"pattern {p} is dense: list it as 1:1")
            if self.rows_total % p.n:
                raise FlexCimError(
                    f"pattern {p}: N={p.n} must divide the {self.rows_total} cell rows "
                    f"(sub_macros * rows) so groups never straddle a pass"
                )

    # ----------------------------------------------------------------- derived geometry
    @property
    def rows_total(self) -> int:
        """Cell rows across all sub-macros, ``sub_macros * rows``."""
        return self.sub_macros * self.rows

    @property
    def cells(self) -> int:
        """Compute cells (one multiplier each), ``rows_total * cols``."""
        return self.rows_total * self.cols

    @property
    def m_max(self) -> int:
        return max(p.m for p in self.patterns)

    @property
    def ratio_max(self) -> float:
        """Largest ``M / N`` of the supported patterns (ideal speed-up over dense); not an
        integer when N is not a power of two (3:8: 8/3)."""
        return max(p.ideal_speedup for p in self.patterns)

    @property
    def window_lanes(self) -> int:
        """Activation lanes of the compute window: the widest pass, ``max(rows_total * M / N)``
        (``rows_total * ratio_max``; never ``rows_total * max(M // N)``, which is short for 3:8).
        """
        return max(self.pass_width(p) for p in self.patterns)

    @property
    def index_bits(self) -> int:
        """Bits of the in-group index stored with every weight (0 for a dense-only macro)."""
        return (self.m_max - 1).bit_length()

    @property
    def cycles_per_pass(self) -> int:
        return ACT_BITS // self.act_bits_per_cycle

    @property
    def pattern_bits(self) -> int:
        """Width of the command's pattern code (0 when only 1:1 is supported)."""
        return (len(self.patterns) - 1).bit_length()

    @property
    def k_bits(self) -> int:
        return self.max_k.bit_length()

    @property
    def token_bits(self) -> int:
        return self.max_tokens.bit_length()

    def supports(self, pattern) -> bool:
        return NMPattern.parse(pattern) in self.patterns

    def pattern_code(self, pattern) -> int:
        """The command-stream code of ``pattern``; raises if the macro does not support it."""
        pattern = NMPattern.parse(pattern)
        if pattern not in self.patterns:
            raise FlexCimError(
                f"pattern {pattern} is not supported by this macro; supported: "
                f"{', '.join(str(p) for p in self.patterns)}"
            )
        return self.patterns.index(pattern)

    def pass_width(self, pattern) -> int:
        """Input channels covered by one pass: ``rows_total * M / N``, exact because N divides
        ``rows_total`` (``rows_total / N`` groups of M channels)."""
        pattern = NMPattern.parse(pattern)
        if self.rows_total % pattern.n:
            raise FlexCimError(
                f"pattern {pattern}: N={pattern.n} does not divide the {self.rows_total} cell rows"
            )
        return self.rows_total // pattern.n * pattern.m

    def passes(self, pattern, k: int) -> int:
        """Passes per token for a reduction of ``k`` input channels."""
        return math.ceil(k / self.pass_width(pattern))

    def weight_beats(self, pattern, k: int) -> int:
        """Weight beats of a command that loads weights: ``passes * rows_total /
        weight_port_rows`` (the last pass padded with zero rows)."""
        return self.passes(pattern, k) * self.rows_total // self.weight_port_rows

    @property
    def beats_per_word(self) -> int:
        """Weight beats that write one weight word (one pass) of every cell row."""
        return self.rows_total // self.weight_port_rows

    def route_alternatives(self, row: int, lane: int) -> int:
        """Distinct values (window lanes, and 0 if some pattern ties the lane low) that the
        patterns route to lane ``lane`` of row ``row``: the inputs of its one-hot multiplexer,
        whose selected path is ``ceil(log2(alternatives))`` two-input stages deep."""
        return len({route(p, row, lane) for p in self.patterns})

    def max_k_for(self, pattern) -> int:
        """Longest reduction one command can run with ``pattern`` (buffer and weight depth)."""
        return min(self.max_k, self.depth * self.pass_width(pattern))

    def check_command(self, pattern, k: int, tokens: int) -> None:
        """Raise a one-line error unless one command can run ``tokens`` x ``k`` with ``pattern``."""
        pattern = NMPattern.parse(pattern)
        self.pattern_code(pattern)
        if not 1 <= k <= self.max_k_for(pattern):
            raise FlexCimError(
                f"K={k} input channels do not fit one command with pattern {pattern}: expected "
                f"1..{self.max_k_for(pattern)} (max_k={self.max_k}, depth={self.depth} passes of "
                f"{self.pass_width(pattern)})"
            )
        if not 1 <= tokens <= self.max_tokens:
            raise FlexCimError(f"token count must be from 1 to {self.max_tokens}, not {tokens}")

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        """The fields as JSON types; the weight-port fields and ``tree_pipeline`` only when they
        differ from the original macro's (1 row, no overlap, no pipeline register), so every
        configuration written before they existed keeps its JSON, its digest
        (:func:`config_digest`) and its module name."""
        d = dataclasses.asdict(self)
        d["patterns"] = [str(p) for p in self.patterns]
        for name in _LATER_FIELDS:
            if d[name] == _LATER_FIELDS[name]:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> HwConfig:
        if not isinstance(d, Mapping):
            raise FlexCimError(f"a hardware config must be a JSON object, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FlexCimError(
                f"unknown hardware config key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(names))}"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> HwConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FlexCimError(f"hardware config is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HwConfig:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise FlexCimError(
                f"cannot read hardware config {os.fspath(path)!r}: {exc.strerror}"
            ) from None
        return cls.from_json(text)

    def replace(self, **changes) -> HwConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, assignments: Iterable[str]) -> HwConfig:
        """Apply ``key=value`` strings (``rows=8``, ``patterns=1:1,2:4``) as the CLI's ``--set``."""
        changes = {}
        names = {f.name for f in dataclasses.fields(self)}
        for item in assignments:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise FlexCimError(
                    f"--set expects key=value with key one of {', '.join(sorted(names))}, "
                    f"not {item!r}"
                )
            if key == "patterns":
                changes[key] = value
            else:
                try:
                    changes[key] = int(value, 0)
                except ValueError:
                    raise FlexCimError(f"--set {key} expects an integer, not {value!r}") from None
        return self.replace(**changes)


DEFAULT = HwConfig()
"""FlexCiM sized for SmolLM2 (hidden 576 = 8 x 72): 72 cell rows make every supported pattern's
pass width divide 576, so q/k/v/o/gate/up projections run at exactly M/N of dense.  96 input
lanes load a token of K = 576 (1536) in 6 (16) beats, no more than the 8 (24) compute cycles of
1:8, so every pattern stays compute-bound on SmolLM2's projections (64 lanes made 1:8 on K = 576
input-bound: 9 beats for 8 cycles).  Patterns with M = 16 (12:16, 6:16 need N = 12, 6, which
divide the 72 rows) give a projection 25 and 62.5 % sparsity and prune more accurately than M = 8
at equal sparsity: the ``auto`` selector needs them (docs/flow.md); they cost a 4-bit index per
weight (docs/architecture.md: ``flex8`` is this macro without them)."""

# Small enough for amaranth.sim and cocotb in seconds; every M up to 16, 4-bit indices,
# 2-bit-serial activations, and a 20-bit accumulator so extreme data exercises the wrap.
_TINY = HwConfig(
    sub_macros=2,
    rows=4,
    cols=4,
    depth=4,
    patterns=("1:1", "1:2", "2:4", "1:4", "4:8", "2:8", "1:8", "8:16"),
    act_bits_per_cycle=2,
    in_lanes=4,
    acc_bits=20,
    max_k=128,
    max_tokens=255,
)

PRESETS: dict[str, HwConfig] = {
    "tiny": _TINY,
    "default": DEFAULT,
    # Baselines built by the same generator with the same cells: a dense DCiM macro (no index
    # storage, no distribution network) and a fixed-2:4 sparse macro.
    "dense": DEFAULT.replace(patterns=("1:1",)),
    "fixed24": DEFAULT.replace(patterns=("1:1", "2:4")),
    # The default macro without M = 16 (3-bit indices): per-unit sparsity 0, 50, 75 and 87.5 %
    # only.  Kept to price the M = 16 patterns (docs/architecture.md) and to compare selectors
    # (docs/flow.md: at equal sparsity a larger M prunes more accurately, issue 11).
    "flex8": DEFAULT.replace(patterns=("1:1", "2:4", "1:4", "4:8", "2:8", "1:8")),
    # tiny with 12 cell rows, so N = 3, 6 and 12 divide them: patterns with N not a power of
    # two, pass widths 12, 16, 24, 32 and 64 (not all multiples of each other).
    "tiny3": _TINY.replace(
        rows=6, patterns=("1:1", "3:4", "2:4", "6:8", "3:8", "12:16", "6:16", "3:16")
    ),
}


def preset(name: str) -> HwConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise FlexCimError(
            f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}"
        ) from None


def from_args(preset_name: str | None = None, config: str | os.PathLike | None = None,
              sets: Iterable[str] = ()) -> HwConfig:
    """The configuration a command line names: ``--preset NAME`` or ``--config FILE`` (a
    HwConfig JSON), then the ``--set key=value`` overrides (:meth:`HwConfig.with_overrides`)."""
    if preset_name is not None and config is not None:
        raise FlexCimError("give --preset or --config, not both")
    cfg = HwConfig.load(config) if config is not None else preset(preset_name or "default")
    return cfg.with_overrides(sets or [])


def preset_name(cfg: HwConfig) -> str | None:
    """The name of the preset equal to ``cfg`` (however it was reached: ``--preset``, a JSON
    file, ``--set``), or ``None``."""
    return next((name for name, p in PRESETS.items() if p == cfg), None)


def config_digest(cfg: HwConfig) -> str:
    """Eight hex digits of the SHA-1 of the config's canonical JSON: two configurations that
    differ in any field get different digests (a collision needs 2**32 configs)."""
    import hashlib

    return hashlib.sha1(cfg.to_json().encode()).hexdigest()[:8]


def module_name(cfg: HwConfig, *, counters: bool = False) -> str:
    """The default Verilog module name of the macro for ``cfg``: ``flexcim_<preset>`` for a
    preset, ``flexcim_<digest>`` (:func:`config_digest`) for any other configuration, with
    ``_counters`` when the activity counters are in (another port list).  Amaranth prefixes
    every submodule with the top's name (``\\flexcim_tiny.sub0.row0``), so distinct
    configurations elaborate into one simulation or synthesis run without a clash."""
    name = f"flexcim_{preset_name(cfg) or config_digest(cfg)}"
    return name + "_counters" if counters else name
