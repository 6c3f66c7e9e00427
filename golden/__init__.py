"""The bit-exact golden model: N:M format, quantization, layer files and the macro's arithmetic.

The performance and energy models live in :mod:`flexcim.golden.perf` and are imported on
demand (they depend on :mod:`flexcim.hw.config`, which depends on this package).
"""

from flexcim.golden.layer_io import SparseLayer, load_layer, save_layer
from flexcim.golden.matmul import sparse_matmul, wrap
from flexcim.golden.nm import NMPattern, NMTensor, act_topk, compress, nm_prune, satisfies
from flexcim.golden.quant import act_scale, act_scales, dequantize, quantize_act, quantize_weight

__all__ = [
    "NMPattern",
    "NMTensor",
    "SparseLayer",
    "act_scale",
    "act_scales",
    "act_topk",
    "compress",
    "dequantize",
    "load_layer",
    "nm_prune",
    "quantize_act",
    "quantize_weight",
    "satisfies",
    "save_layer",
    "sparse_matmul",
    "wrap",
]
