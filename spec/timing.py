"""The timing contract of the macro's streams, shared by the cycle model and the generator.

The cycle formulas themselves are the golden model's (:mod:`flexcim.golden.perf`); the RTL
implements :func:`result_latency` and publishes it in its sidecar (``latency.result_latency``).
"""

from __future__ import annotations

RESULT_LATENCY = 2
"""Cycles from a token's last compute cycle to its result handshake without the adder trees'
pipeline register (``tree_pipeline = 0``): the sub-macros' registered column sums, then the
merging unit writes the result FIFO, which presents it the next cycle."""


def result_latency(cfg) -> int:
    """Cycles from a token's last compute cycle to its result handshake for ``cfg`` (a
    :class:`~flexcim.spec.config.HwConfig`): :data:`RESULT_LATENCY`, plus one with
    ``tree_pipeline`` (the register inside the adder trees delays every partial sum by one
    cycle; nothing else waits for it, so this is the only cycle it adds)."""
    return RESULT_LATENCY + cfg.tree_pipeline


__all__ = ["RESULT_LATENCY", "result_latency"]
