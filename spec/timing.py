"""The timing contract of the macro's streams, shared by the cycle model and the generator.

The cycle formulas themselves are the golden model's (:mod:`flexcim.golden.perf`); the RTL
implements this constant and publishes it in its sidecar (``latency.result_latency``).
"""

RESULT_LATENCY = 2
"""Cycles from a token's last compute cycle to its result handshake: the sub-macros' registered
column sums, then the merging unit writes the result FIFO, which presents it the next cycle."""

__all__ = ["RESULT_LATENCY"]
