"""FlexCiM: flexible N:M sparsity for LLM inference, from the FLOW algorithm down to the RTL.

Sub-packages: :mod:`flexcim.spec` (N:M format, hardware config, payload layouts),
:mod:`flexcim.golden` (bit-exact reference, performance model), :mod:`flexcim.hw` (Amaranth
generator), :mod:`flexcim.sim` (cocotb co-simulation, formal proofs) and :mod:`flexcim.flow`
(FLOW and pruning on real LLMs).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flexcim")
except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
    __version__ = "0+unknown"
