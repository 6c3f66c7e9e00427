"""Cycle model of the FlexCiM macro: what a layer costs, command by command.

A layer ``y = x @ W.T`` (``x`` ``[T, K]``, ``W`` ``[C, K]``) runs as a *schedule* of commands
(:func:`schedule`): output channels in column tiles of ``cols``, the reduction in chunks of at
most ``max_k_for(pattern)`` (whole groups of M), tokens in blocks of at most ``max_tokens``.
Only the first token block of a (column tile, K chunk) loads weights.

Timing of one command (docs/architecture.md, section 4), cycle 0 being the command handshake,
with no input gaps and no output back-pressure:

* weights: ``Wb = passes * rows_total / weight_port_rows`` beats in cycles ``1 .. Wb`` (0
  without ``load_weights``); the word of pass ``t`` is complete at cycle
  ``D_t = (t + 1) * rows_total / weight_port_rows``;
* activations: token ``i`` needs ``L = ceil(k / in_lanes)`` beats into one of two buffer banks;
  loading starts from cycle 1 (overlapping the weight load) once the bank that token ``i-2``
  used is released;
* compute: token ``i`` takes ``X = passes * cycles_per_pass`` cycles and starts the cycle after
  its bank is full, the previous token is done and the weights are loaded (with
  ``weight_overlap``: the word of its first pass; each later pass ``t`` then starts after
  ``D_t`` too, so a pass may wait for its word);
* the controller accepts the next command the cycle after the last compute cycle, and a token's
  result leaves the result stream :func:`~flexcim.spec.timing.result_latency` cycles after its
  last compute cycle (2, or 3 with the adder trees' pipeline register ``tree_pipeline``: the
  partial sums arrive a cycle later, but nothing waits for them, so no other cycle changes).

Per token the steady-state period is therefore ``max(X, L)``: a pattern is *input-bandwidth-
bound* when ``L > X`` (:func:`bandwidth_bound`).  The RTL matches these formulas exactly
(tests/hw/test_top.py measures it).
"""

from __future__ import annotations

import dataclasses

from flexcim.spec.config import HwConfig
from flexcim.spec.nm import NMPattern
from flexcim.spec.timing import result_latency

from flexcim.errors import FlexCimError


@dataclasses.dataclass(frozen=True)
class Command:
    """One macro command and the part of the layer it computes.

    Parameters
    ----------
    pattern : NMPattern
    k : int
        Input channels of the reduction chunk (a multiple of M).
    tokens : int
        Tokens of the block.
    load_weights : bool
        Whether the command loads its weights (first token block of a tile/chunk).
    c0, k0, t0 : int
        First output channel, input channel and token of the block in the layer.
    c : int
        Output channels of the column tile (at most ``cols``).
    """

    pattern: NMPattern
    k: int
    tokens: int
    load_weights: bool
    c0: int = 0
    k0: int = 0
    t0: int = 0
    c: int = 0


@dataclasses.dataclass(frozen=True)
class CommandTiming:
    """Cycles of one command with ideal streams (cycle 0 = command handshake).

    Members
    -------
    busy : int
        Cycles until the macro accepts the next command.
    last_result : int
        Cycle of the last result handshake.
    weight_beats, act_beats_per_token, compute_per_token : int
        ``Wb``, ``L`` and ``X`` of the module docstring.
    """

    busy: int
    last_result: int
    weight_beats: int
    act_beats_per_token: int
    compute_per_token: int

    @property
    def bandwidth_bound(self) -> bool:
        return self.act_beats_per_token > self.compute_per_token


def act_beats(cfg: HwConfig, k: int) -> int:
    """Activation beats per token, ``ceil(k / in_lanes)``."""
    return -(-k // cfg.in_lanes)


def compute_cycles(cfg: HwConfig, pattern, k: int) -> int:
    """Compute cycles per token, ``passes * cycles_per_pass``."""
    return cfg.passes(pattern, k) * cfg.cycles_per_pass


def bandwidth_bound(cfg: HwConfig, pattern, k: int) -> bool:
    """True when loading a token's activations takes longer than computing it."""
    return act_beats(cfg, k) > compute_cycles(cfg, pattern, k)


def command_timing(cfg: HwConfig, cmd: Command) -> CommandTiming:
    """Exact cycles of one command (see the module docstring for the rules).

    The weight port writes ``weight_port_rows`` cell rows per beat, so the ``Wb =
    cfg.weight_beats(pattern, k)`` beats arrive in cycles ``1 .. Wb`` and the word of pass
    ``t`` is complete at cycle ``D_t = (t + 1) * rows_total / weight_port_rows``.  Without
    ``weight_overlap`` a token starts after ``D_{passes-1} = Wb``; with it, pass ``t`` of any
    token starts at the earliest the cycle after ``D_t`` (a pass whose word is still loading
    waits), so a token starts the cycle after ``D_0`` at the earliest.
    """
    cfg.check_command(cmd.pattern, cmd.k, cmd.tokens)
    passes = cfg.passes(cmd.pattern, cmd.k)
    wb = cfg.weight_beats(cmd.pattern, cmd.k) if cmd.load_weights else 0
    load, comp = act_beats(cfg, cmd.k), compute_cycles(cfg, cmd.pattern, cmd.k)
    cpp = cfg.cycles_per_pass
    # Cycle after which pass t may be computed (its weight word is in).
    if not wb:
        ready = [0] * passes
    elif cfg.weight_overlap:
        ready = [(t + 1) * cfg.beats_per_word for t in range(passes)]
    else:
        ready = [wb] * passes
    loaded = 0  # A_{i-1}: cycle the previous token's last beat was accepted
    ends = [0, 0]  # E_{i-2}, E_{i-1}: last compute cycles of the two previous tokens
    for _ in range(cmd.tokens):
        start = max(loaded + 1, ends[0] + 1)  # a free bank: token i-2 released it
        loaded = start + load - 1
        begin = max(loaded + 1, ends[1] + 1, ready[0] + 1)
        for t in range(1, passes):  # a pass waits for its word (only with weight_overlap)
            begin = max(begin + cpp, ready[t] + 1)
        ends = [ends[1], begin + cpp - 1]
    return CommandTiming(
        busy=ends[1] + 1,
        last_result=ends[1] + result_latency(cfg),
        weight_beats=wb,
        act_beats_per_token=load,
        compute_per_token=comp,
    )


def k_chunk(cfg: HwConfig, pattern) -> int:
    """Longest reduction chunk of one command: ``max_k_for(pattern)`` in whole groups."""
    pattern = NMPattern.parse(pattern)
    chunk = cfg.max_k_for(pattern) // pattern.m * pattern.m
    if chunk < pattern.m:
        raise FlexCimError(f"pattern {pattern}: the macro cannot hold one group of M={pattern.m}")
    return chunk


def schedule(cfg: HwConfig, pattern, tokens: int, k: int, c: int) -> list[Command]:
    """Commands that run a ``[tokens, k] x [c, k]`` layer with ``pattern`` on the macro.

    Order: column tiles, then K chunks, then token blocks (the weights of a tile/chunk stay
    resident for all its token blocks).
    """
    pattern = NMPattern.parse(pattern)
    cfg.pattern_code(pattern)
    for name, value in (("tokens", tokens), ("in_features K", k), ("out_features C", c)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlexCimError(f"layer {name} must be a positive integer, not {value!r}")
    if k % pattern.m:
        raise FlexCimError(f"in_features K={k} is not a multiple of M={pattern.m} ({pattern})")
    chunk = k_chunk(cfg, pattern)
    cmds = []
    for c0 in range(0, c, cfg.cols):
        for k0 in range(0, k, chunk):
            for t0 in range(0, tokens, cfg.max_tokens):
                cmds.append(
                    Command(
                        pattern=pattern,
                        k=min(chunk, k - k0),
                        tokens=min(cfg.max_tokens, tokens - t0),
                        load_weights=t0 == 0,
                        c0=c0,
                        k0=k0,
                        t0=t0,
                        c=min(cfg.cols, c - c0),
                    )
                )
    return cmds


def layer_cycles(cfg: HwConfig, cmds: list[Command]) -> int:
    """Cycles from the first command handshake to the last result handshake, inclusive, when
    commands are issued back to back and no stream stalls: ``sum(busy) + result_latency``
    (:func:`~flexcim.spec.timing.result_latency`: the pipeline register of ``tree_pipeline``
    costs one cycle per layer, not per pass, token or command)."""
    if not cmds:
        raise FlexCimError("a layer needs at least one command")
    return sum(command_timing(cfg, cmd).busy for cmd in cmds) + result_latency(cfg)


def ideal_cycles(cfg: HwConfig, cmds: list[Command]) -> int:
    """Compute cycles alone (no weight loads, no input stalls, no pipeline fill)."""
    return sum(cmd.tokens * compute_cycles(cfg, cmd.pattern, cmd.k) for cmd in cmds)


@dataclasses.dataclass(frozen=True)
class LayerEstimate:
    """Model of one layer on one macro.

    Members
    -------
    cycles : int
        :func:`layer_cycles` of the schedule.
    ideal : int
        :func:`ideal_cycles`: compute only.
    commands : int
        Commands in the schedule.
    bandwidth_bound : bool
        Whether some command is limited by the activation input stream.
    """

    cycles: int
    ideal: int
    commands: int
    bandwidth_bound: bool


def estimate(cfg: HwConfig, pattern, tokens: int, k: int, c: int) -> LayerEstimate:
    """Cycles of a ``[tokens, k] x [c, k]`` layer with ``pattern`` (see :func:`schedule`)."""
    cmds = schedule(cfg, pattern, tokens, k, c)
    return LayerEstimate(
        cycles=layer_cycles(cfg, cmds),
        ideal=ideal_cycles(cfg, cmds),
        commands=len(cmds),
        bandwidth_bound=any(bandwidth_bound(cfg, cmd.pattern, cmd.k) for cmd in cmds),
    )


def speedup(cfg: HwConfig, pattern, tokens: int, k: int, c: int, dense: HwConfig) -> float:
    """Cycles of the layer dense on ``dense`` over cycles with ``pattern`` on ``cfg``."""
    base = estimate(dense, "1:1", tokens, k, c).cycles
    return base / estimate(cfg, pattern, tokens, k, c).cycles


__all__ = [
    "Command",
    "CommandTiming",
    "LayerEstimate",
    "act_beats",
    "bandwidth_bound",
    "command_timing",
    "compute_cycles",
    "estimate",
    "ideal_cycles",
    "k_chunk",
    "layer_cycles",
    "schedule",
    "speedup",
]
