"""The bit-exact golden model: quantization, reference pruning, layer files and the macro's
arithmetic, on the N:M format of :mod:`flexcim.spec.nm`.

The performance and energy models live in :mod:`flexcim.golden.perf` and
:mod:`flexcim.golden.energy` and are imported on demand.
"""

from flexcim.golden.layer_io import SparseLayer, load_layer, save_layer
from flexcim.golden.matmul import sparse_matmul, wrap
from flexcim.golden.prune import act_topk, nm_prune
from flexcim.golden.quant import act_scale, act_scales, dequantize, quantize_act, quantize_weight

__all__ = [
    "SparseLayer",
    "act_scale",
    "act_scales",
    "act_topk",
    "dequantize",
    "load_layer",
    "nm_prune",
    "quantize_act",
    "quantize_weight",
    "save_layer",
    "sparse_matmul",
    "wrap",
]
