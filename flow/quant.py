"""W8A8: the decoder's projections computed as the FlexCiM macro computes them.

Inside :func:`w8a8` every decoder projection (the 210 of SmolLM2; the embedding and ``lm_head``
stay float) replaces its float product by the macro's arithmetic:

1. the weight, as it is when the context opens (pruned or not), quantized to int8 per output
   channel by :func:`flexcim.golden.quant.quantize_weight` (zeros stay zeros: N:M masks
   survive);
2. the input, after any activation pruning (:func:`flexcim.flow.act.activation_pruning`'s
   pre-hooks run first), quantized to int8 by :func:`quantize_input`: scales per token or per
   tensor (one per sequence: a batch of windows gives each window its own scale, so a
   perplexity does not depend on the batch size) from :func:`flexcim.golden.quant.act_scales`,
   round half to even, saturation to ``[-127, 127]`` (:func:`flexcim.golden.quant.quantize_act`);
3. the integer product ``sum_k x_k w_k`` computed exactly (float64 holds every partial sum of
   fewer than 2**38 int8 x int8 products; float32 would round above 2**24, i.e. from K ~ 1000)
   and wrapped to the macro's ``acc_bits`` (:func:`flexcim.golden.matmul.wrap`);
4. dequantized ``acc * scale_x[t] * scale_w[c]`` in float64, plus the float bias.

The quantization rules are golden's functions themselves, called on the tensors' memory, so
``flow export``, the demo's RTL layer and the perplexity runs quantize alike by construction;
tests/flow/test_w8a8.py checks the result against ``golden.sparse_matmul`` on a real SmolLM2
projection, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from flexcim.flow.model import continues_cache, linear_layers
from flexcim.golden import quant as gq
from flexcim.golden.matmul import check_acc_bits, wrap
from torch import nn

from flexcim.errors import FlexCimError

log = logging.getLogger("flexcim.flow")

ARITHMETICS = ("float", "w8a8")
GRANULARITIES = gq.ACT_GRANULARITIES
DEFAULT_GRANULARITY = "token"
"""Chosen on the validation text (docs/flow.md, W8A8): per token is closer to float than per
tensor on SmolLM2."""
DEFAULT_SMOOTH = 0.5
"""SmoothQuant alpha of the CLI's, the demo's and the benchmarks' W8A8, chosen on the
validation text with and without activation top-k (docs/flow.md, W8A8)."""


def parse_smooth(text: str) -> float | None:
    """The value of a ``--smooth ALPHA|off`` option: None for ``off``, else an alpha in [0, 1]
    (one line naming the value otherwise)."""
    if text == "off":
        return None
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not 0 <= alpha <= 1:
        raise FlexCimError(f"--smooth must be an alpha in [0, 1] or off, not {text!r}")
    return alpha


_EXACT_TERMS = 2**38  # as golden.matmul: float64 sums of int8 x int8 products stay exact
_F32_CHUNK = 1024
"""Terms per float32 product: a partial sum of at most 1024 int8 x int8 products is at most
1024 x 128 x 128 = 2**24 in magnitude, an integer that float32 holds exactly, in whatever
order the BLAS adds.  Longer reductions add the chunks' sums in float64.  Twice as fast as one
float64 product, and as exact."""


@dataclasses.dataclass(frozen=True)
class W8A8Config:
    """How :func:`w8a8` quantizes.

    Members
    -------
    act_granularity : ``token`` | ``tensor``
        One activation scale per token, or per tensor (per sequence; in a decode call, i.e.
        one on a non-empty KV cache, per token: served, each token is a step of its own).
    acc_bits : int
        The macro's accumulator width (``HwConfig.acc_bits``; 32 on the ``default`` preset).
    smooth : float or None
        SmoothQuant's alpha: :func:`w8a8` folds the scales of :func:`smooth`, measured on the
        calibration windows it is given, into the model for as long as it is open (None: no
        smoothing, the default of this class; the CLI, the demo and the benchmarks use
        :data:`DEFAULT_SMOOTH`).
    """

    act_granularity: str = DEFAULT_GRANULARITY
    acc_bits: int = 32
    smooth: float | None = None

    def __post_init__(self):
        if self.act_granularity not in GRANULARITIES:
            raise FlexCimError(f"activation granularity must be one of {GRANULARITIES}, not "
                               f"{self.act_granularity!r}")
        check_acc_bits(self.acc_bits)
        if self.smooth is not None and not (isinstance(self.smooth, (int, float))
                                            and 0.0 <= self.smooth <= 1.0):
            raise FlexCimError(f"smoothing alpha must be in [0, 1] (or None), not "
                               f"{self.smooth!r}")

    @classmethod
    def from_hw(cls, hw_config, act_granularity: str = DEFAULT_GRANULARITY,
                smooth: float | None = None) -> W8A8Config:
        """The config for a :class:`flexcim.spec.config.HwConfig` (its ``acc_bits``)."""
        return cls(act_granularity=act_granularity, acc_bits=hw_config.acc_bits, smooth=smooth)

    def to_dict(self) -> dict:
        return {"arith": "w8a8", "weights": "int8 per output channel",
                "act_granularity": self.act_granularity, "acc_bits": self.acc_bits,
                "smooth": self.smooth}


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[C, K]`` and float32 scales ``[C]`` of a float weight
    (:func:`flexcim.golden.quant.quantize_weight`)."""
    q, scale = gq.quantize_weight(weight.detach().float().cpu().numpy())
    return torch.from_numpy(q), torch.from_numpy(scale)


def quantize_input(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations (``x``'s shape) and float32 scales (``x``'s shape without the last
    axis) of a projection's input ``[..., L, K]``.

    ``token``: a scale per row; ``tensor``: one per sequence, i.e. per ``[L, K]`` slice (a 2-D
    ``x`` is one sequence).  Both by :func:`flexcim.golden.quant.act_scales` and
    :func:`flexcim.golden.quant.quantize_act`.
    """
    if x.ndim < 2:
        raise FlexCimError(f"projection input must be [..., tokens, features], not "
                           f"{tuple(x.shape)}")
    seqs = x.detach().float().cpu().reshape(-1, x.shape[-2], x.shape[-1]).numpy()
    if granularity == "token":  # rows are independent: one call for all of them
        rows = seqs.reshape(-1, seqs.shape[-1])
        scale = gq.act_scales(rows, "token")
        q = gq.quantize_act(rows, scale)
    else:
        scale = np.stack([gq.act_scales(s, granularity) for s in seqs]).reshape(-1)
        q = gq.quantize_act(seqs.reshape(-1, seqs.shape[-1]), scale)
    return (torch.from_numpy(q).reshape(x.shape), torch.from_numpy(scale).reshape(x.shape[:-1]))


def integer_matmul(qx: torch.Tensor, qw: torch.Tensor, acc_bits: int) -> torch.Tensor:
    """``qx @ qw.T`` of int8 tensors, exact, wrapped to ``acc_bits`` two's complement; int64."""
    if qx.dtype != torch.int8 or qw.dtype != torch.int8:
        raise FlexCimError(f"integer_matmul takes int8 operands, not {qx.dtype} and {qw.dtype}")
    if qw.shape[-1] >= _EXACT_TERMS:
        raise FlexCimError(f"in_features={qw.shape[-1]} is too large for exact accumulation")
    y = exact_sums(qx.to(torch.float32), qw.to(torch.float32).T)
    if qw.shape[-1] * 128 * 128 < 2 ** (check_acc_bits(acc_bits) - 1):
        return y  # no sum of K int8 products can reach the wrap: it is the identity
    return torch.from_numpy(wrap(y.numpy(), acc_bits).astype(np.int64))


def exact_sums(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """``x @ w_t`` as int64 for float32 tensors holding int8 values (``x`` ``[..., K]``,
    ``w_t`` ``[K, C]``), exact: float32 products over chunks of :data:`_F32_CHUNK` terms,
    summed in float64."""
    k = x.shape[-1]
    if k <= _F32_CHUNK:
        return (x @ w_t).to(torch.int64)
    total = None
    for lo in range(0, k, _F32_CHUNK):
        part = (x[..., lo:lo + _F32_CHUNK] @ w_t[lo:lo + _F32_CHUNK]).double()
        total = part if total is None else total + part
    return total.to(torch.int64)


def accumulator_overflows(layers: dict[str, nn.Linear], acc_bits: int) -> dict[str, int]:
    """The projections whose largest possible sum ``K * 127 * 127`` (our quantizers never
    produce -128) does not fit a signed ``acc_bits`` accumulator: name -> K."""
    limit = 2 ** (check_acc_bits(acc_bits) - 1) - 1
    return {name: layer.in_features for name, layer in layers.items()
            if layer.in_features * gq.QMAX * gq.QMAX > limit}


def check_accumulator(layers: dict[str, nn.Linear], acc_bits: int) -> None:
    """Raise (one line, per K) unless no projection can wrap the accumulator."""
    over = accumulator_overflows(layers, acc_bits)
    if over:
        by_k: dict[int, list[str]] = {}
        for name, k in over.items():
            by_k.setdefault(k, []).append(name)
        parts = [f"{len(names)} projection(s) with K={k} (e.g. {names[0]}) can reach "
                 f"{k * gq.QMAX * gq.QMAX:,}, needing {(k * gq.QMAX * gq.QMAX).bit_length() + 1} "
                 "bits" for k, names in sorted(by_k.items())]
        raise FlexCimError(f"acc_bits={acc_bits} is too small, the sums would wrap: "
                           + "; ".join(parts))


def w8a8_parts(x: torch.Tensor, qw: torch.Tensor, scale_w: torch.Tensor,
               bias: torch.Tensor | None, config: W8A8Config
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A projection's output ``[..., C]`` in ``x``'s dtype as the macro computes it (module
    docstring, steps 2-4), from its quantized weight (:func:`quantize_weight`), with the int8
    input, its scales and the wrapped integer sums that gave it."""
    qx, scale_x = quantize_input(x, config.act_granularity)
    acc = integer_matmul(qx, qw, config.acc_bits)
    y = acc.double() * scale_x.double()[..., None] * scale_w.double()
    if bias is not None:
        y = y + bias.detach().double()
    return y.to(x.dtype), qx, scale_x, acc


def w8a8_linear(x: torch.Tensor, qw: torch.Tensor, scale_w: torch.Tensor,
                bias: torch.Tensor | None, config: W8A8Config) -> torch.Tensor:
    """The output of :func:`w8a8_parts` alone."""
    return w8a8_parts(x, qw, scale_w, bias, config)[0]


@dataclasses.dataclass
class Capture:
    """What one projection computed inside :func:`w8a8`, call by call (one entry per call, each
    flattened to rows): the float inputs it received (after any activation pruning), their int8
    quantization and scales, the wrapped integer sums; the float weight it was quantized from
    (smoothed, when the config smooths)."""

    name: str
    float_weight: torch.Tensor | None = None
    inputs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    act: list[torch.Tensor] = dataclasses.field(default_factory=list)
    act_scale: list[torch.Tensor] = dataclasses.field(default_factory=list)
    acc: list[torch.Tensor] = dataclasses.field(default_factory=list)
    weight: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None


@contextlib.contextmanager
@torch.no_grad()
def w8a8(model: nn.Module, config: W8A8Config, *, capture: str | None = None,
         calib: torch.Tensor | None = None) -> Iterator[Capture | None]:
    """Run every decoder projection of ``model`` in W8A8 inside a ``with`` block.

    Weights are quantized when the block opens: apply a weight plan first.  With
    ``config.smooth`` the SmoothQuant scales are measured on ``calib`` (token windows; the model
    as it runs when the block opens: open it before any activation pruning) and folded in first
    (:func:`smoothing`), the model's tensors restored on exit.  Activation pruning composes in
    either order (its pre-hooks run before the replaced forward).  ``capture`` names a
    projection whose int8 operands and integer sums are recorded (yielded as a :class:`Capture`;
    None otherwise).  An ``acc_bits`` that some projection could overflow is rejected before
    anything runs.  The float forwards are restored on exit, also after an exception.
    """
    layers = linear_layers(model)
    if capture is not None and capture not in layers:
        raise FlexCimError(f"no projection named {capture!r} to capture")
    check_accumulator(layers, config.acc_bits)
    if config.smooth is not None and calib is None:
        raise FlexCimError(f"W8A8 with smoothing (alpha {config.smooth}) needs calibration "
                           "windows (calib=)")
    record = None if capture is None else Capture(capture)
    call: dict = {}

    def model_starts(_module, _args, kwargs):
        call["decode"] = continues_cache(kwargs)

    handles = [model.register_forward_pre_hook(model_starts, with_kwargs=True),
               model.register_forward_hook(lambda *_: call.clear())]
    try:
        with smoothing(model, calib, config.smooth):
            with _replaced(layers, config, record, capture, call):
                yield record
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _replaced(layers: dict[str, nn.Linear], config: W8A8Config, record: Capture | None,
              capture: str | None, call: dict) -> Iterator[None]:
    """Every projection's forward replaced by its W8A8 product (:func:`w8a8`'s body); in a
    decode call (``call["decode"]``) with a scale per token whatever the granularity."""
    per_token = dataclasses.replace(config, act_granularity="token")

    def factory(name: str, module: nn.Linear, qw: torch.Tensor, scale_w: torch.Tensor):
        def forward(x):
            y, qx, scale_x, acc = w8a8_parts(x, qw, scale_w, module.bias,
                                             per_token if call.get("decode") else config)
            if record is not None and name == capture:
                record.inputs.append(x.detach().reshape(-1, x.shape[-1]).clone())
                record.act.append(qx.reshape(-1, qx.shape[-1]))
                record.act_scale.append(scale_x.reshape(-1))
                record.acc.append(acc.reshape(-1, acc.shape[-1]))
            return y

        return forward

    # The float product is replaced, not computed and thrown away: the module's forward is
    # shadowed by an instance attribute (pre-hooks, e.g. activation pruning, and forward hooks
    # still run around it) and the attribute is deleted on exit.
    patched = []
    try:
        for name, layer in layers.items():
            if "forward" in vars(layer):
                raise FlexCimError(f"{name} already has its forward replaced (nested w8a8?)")
            qw, scale_w = quantize_weight(layer.weight)
            if record is not None and name == capture:
                record.weight, record.weight_scale = qw, scale_w
                record.float_weight = layer.weight.detach().clone()
            layer.forward = factory(name, layer, qw, scale_w)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


@contextlib.contextmanager
def arithmetic(model: nn.Module, config: W8A8Config | None,
               calib: torch.Tensor | None = None) -> Iterator[None]:
    """:func:`w8a8` when ``config`` is given (``calib``: its smoothing windows), float
    (nothing) when it is None."""
    if config is None:
        yield None
        return
    with w8a8(model, config, calib=calib) as record:
        yield record


@torch.no_grad()
def channel_absmax(model: nn.Module, windows: torch.Tensor, names: list[str], *,
                   batch_size: int = 4) -> dict[str, torch.Tensor]:
    """``max_t |x_tj|`` per input channel of each projection in ``names`` over ``windows``."""
    layers = linear_layers(model)
    amax = {n: torch.zeros(layers[n].in_features) for n in names}

    def factory(name):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            amax[name] = torch.maximum(amax[name], x.abs().amax(0))

        return hook

    handles = []
    try:
        for name in names:
            handles.append(layers[name].register_forward_pre_hook(factory(name)))
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return amax


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
                     ) -> torch.Tensor:
    """SmoothQuant's per-channel scales ``s_j = max|x_j|^alpha / max|W_:j|^(1-alpha)`` (Xiao
    et al., ICML 2023, eq. 4) over the weights sharing that input; 1 where either max is 0."""
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = x_absmax.float().pow(alpha) / w_absmax.pow(1 - alpha)
    return torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))


@contextlib.contextmanager
@torch.no_grad()
def smoothing(model: nn.Module, windows: torch.Tensor | None, alpha: float | None
              ) -> Iterator[dict[str, float] | None]:
    """:func:`smooth` for the duration of a ``with`` block (yields its summary): every tensor it
    changes is restored bit for bit on exit, also after an exception.  ``alpha`` None: nothing
    changes (yields None)."""
    if alpha is None:
        yield None
        return
    touched: dict[int, torch.Tensor] = {}
    for _name, norm_weight, up, readers, _kind in _smoothing_groups(model):
        for t in (norm_weight, None if up is None else up.weight, *(r.weight for r in readers)):
            if t is not None:
                touched[id(t)] = t
    saved = [(t, t.detach().clone()) for t in touched.values()]
    try:
        yield smooth(model, windows, alpha)
    finally:
        for t, copy in saved:
            t.copy_(copy)


def smoothable(model: nn.Module) -> bool:
    """Whether :func:`smooth` knows ``model``'s blocks (Llama-style: ``input_layernorm``,
    ``post_attention_layernorm``, q/k/v and gate/up/down projections)."""
    try:
        _smoothing_groups(model)
    except FlexCimError:
        return False
    return True


def _smoothing_groups(model: nn.Module) -> list[tuple]:
    """(input projection name, norm weight or None, ``up_proj`` or None, readers, kind) per
    smoothed input of a Llama-style model."""
    from flexcim.flow.model import decoder_blocks

    groups = []
    for block in decoder_blocks(model):
        mod = block.module
        try:
            attn, mlp = mod.self_attn, mod.mlp
            groups.append((f"{block.name}.self_attn.q_proj", mod.input_layernorm.weight, None,
                           [attn.q_proj, attn.k_proj, attn.v_proj], "qkv"))
            groups.append((f"{block.name}.mlp.gate_proj", mod.post_attention_layernorm.weight,
                           None, [mlp.gate_proj, mlp.up_proj], "gate/up"))
            groups.append((f"{block.name}.mlp.down_proj", None, mlp.up_proj, [mlp.down_proj],
                           "down"))
        except AttributeError:
            raise FlexCimError(f"smoothing needs a Llama-style block (input_layernorm, "
                               f"self_attn.q/k/v_proj, mlp.gate/up/down_proj): {block.name} "
                               f"is {type(mod).__name__}") from None
    return groups


@torch.no_grad()
def smooth(model: nn.Module, windows: torch.Tensor, alpha: float) -> dict[str, float]:
    """Fold SmoothQuant scales into a Llama-style model, in place: the inputs of q/k/v (after
    ``input_layernorm``), gate/up (after ``post_attention_layernorm``) and down (after
    ``up_proj``'s rows) are divided by ``s``, the weights reading them multiplied by ``s``.  The
    float model computes the same function (up to rounding); its int8 activations lose less to
    outlier channels.  Returns the mean ``log10 s`` per kind (a summary)."""
    if not 0.0 <= alpha <= 1.0:
        raise FlexCimError(f"smoothing alpha must be in [0, 1], not {alpha!r}")
    groups = _smoothing_groups(model)
    amax = channel_absmax(model, windows, [g[0] for g in groups])
    summary: dict[str, list[float]] = {}
    for name, norm_weight, up, readers, kind in groups:
        s = smoothing_scales(amax[name], [r.weight for r in readers], alpha)
        if norm_weight is not None:
            norm_weight.div_(s.to(norm_weight.dtype))
        else:
            up.weight.div_(s.to(up.weight.dtype)[:, None])
        for r in readers:
            r.weight.mul_(s.to(r.weight.dtype)[None, :])
        summary.setdefault(kind, []).append(float(s.log10().mean()))
    return {k: sum(v) / len(v) for k, v in summary.items()}
