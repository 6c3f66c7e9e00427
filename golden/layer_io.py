"""Safetensors files holding one sparsified, int8-quantized linear layer.

flow/ writes them (``flexcim flow export``), golden/ and sim/ read them, so a real model's layer
reaches the RTL unchanged.  Layout of a file:

==================  ===========================  ============================================
tensor              dtype, shape                 meaning
==================  ===========================  ============================================
``weight.values``   int8 ``[C, K*n/m]``          :class:`NMTensor` values
``weight.indices``  uint8 ``[C, K*n/m]``         :class:`NMTensor` positions in the group
``weight.scale``    float32 ``[C]``              per-output-channel weight scale
``act.values``      int8 ``[T, K]`` (optional)   sample activations (quantized, maybe top-k'd)
``act.scale``       float32 ``[T]`` (optional)   per-token activation scales
==================  ===========================  ============================================

Metadata (all strings): ``format`` = ``flexcim-layer``, ``version``, ``pattern`` (``n:m``),
``shape`` (``C,K``), ``name``, and when activations are present ``act_scale`` (the per-tensor
scale, or ``per-token`` when the tensor ``act.scale`` holds one per row) and optionally
``act_pattern``; free-form ``extra`` is a JSON object of strings (model, plan, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from flexcim.spec.nm import NMPattern, NMTensor, satisfies

from flexcim.errors import FlexCimError
from flexcim.fileio import atomic_path

FORMAT = "flexcim-layer"
VERSION = "1"


@dataclasses.dataclass(frozen=True, eq=False)
class SparseLayer:
    """One sparsified linear layer, ready for the hardware.

    Parameters
    ----------
    weight : NMTensor
        int8 N:M-compressed weight ``[C, K]``.
    weight_scale : ndarray, float32 ``[C]``
        Dequantization scale per output channel.
    name : str
        Where the layer comes from (e.g. ``model.layers.3.self_attn.q_proj``).
    act : ndarray, int8 ``[T, K]``, optional
        Real activations of that layer, quantized with ``act_scale``.
    act_scale : float or ndarray float32 ``[T]``, optional
        Per-tensor activation scale, or one per token (row of ``act``); required with ``act``.
    act_pattern : NMPattern, optional
        The N:M top-k applied to ``act`` (Amber-style activation pruning), if any.
    extra : dict of str to str
        Free-form provenance (model, plan file, metric, ...).
    """

    weight: NMTensor
    weight_scale: np.ndarray
    name: str = ""
    act: np.ndarray | None = None
    act_scale: float | np.ndarray | None = None
    act_pattern: NMPattern | None = None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.weight, NMTensor):
            kind = type(self.weight).__name__
            raise FlexCimError(f"layer weight must be an NMTensor, not {kind}")
        scale = np.asarray(self.weight_scale)
        if scale.dtype.kind != "f" or scale.shape != (self.weight.out_features,):
            raise FlexCimError(
                f"weight scale {scale.dtype} {scale.shape} does not match "
                f"out_features={self.weight.out_features} (float [C])"
            )
        scale = scale.astype(np.float32)
        bad = np.flatnonzero(~(np.isfinite(scale) & (scale > 0)))
        if bad.size:
            raise FlexCimError(f"weight scale must be positive and finite; row {bad[0]} is "
                               f"{scale[bad[0]]!r}")
        object.__setattr__(self, "weight_scale", scale)
        if not isinstance(self.name, str):
            raise FlexCimError(f"layer name must be a string, not {self.name!r}")
        if self.act is not None:
            act = np.asarray(self.act)
            if (act.dtype != np.int8 or act.ndim != 2 or act.shape[0] < 1
                    or act.shape[1] != self.weight.in_features):
                raise FlexCimError(
                    f"layer activations must be int8 [T >= 1, {self.weight.in_features}], "
                    f"not {act.dtype} {act.shape}"
                )
            if np.ndim(self.act_scale) == 1:
                act_scale = np.asarray(self.act_scale)
                if act_scale.dtype.kind != "f" or act_scale.shape != (act.shape[0],):
                    raise FlexCimError(f"per-token act_scale {act_scale.dtype} "
                                       f"{act_scale.shape} does not match {act.shape[0]} "
                                       "activation rows (float [T])")
                act_scale = act_scale.astype(np.float32)
                bad = np.flatnonzero(~(np.isfinite(act_scale) & (act_scale > 0)))
                if bad.size:
                    raise FlexCimError(f"act_scale must be positive and finite; row {bad[0]} "
                                       f"is {act_scale[bad[0]]!r}")
            else:
                try:
                    act_scale = float(self.act_scale)
                except (TypeError, ValueError):
                    act_scale = float("nan")
                if not (np.isfinite(act_scale) and act_scale > 0):
                    raise FlexCimError(f"layer activations need a positive finite act_scale, "
                                       f"not {self.act_scale!r}")
            object.__setattr__(self, "act_scale", act_scale)
        elif self.act_scale is not None:
            raise FlexCimError("act_scale given without activations")
        if self.act_pattern is not None:
            pattern = NMPattern.parse(self.act_pattern)
            object.__setattr__(self, "act_pattern", pattern)
            if self.act is None:
                raise FlexCimError("act_pattern given without activations")
            if not satisfies(self.act, pattern):
                raise FlexCimError(f"layer activations do not satisfy their act_pattern "
                                   f"{pattern} (more than {pattern.n} non-zeros in a group)")
        if not isinstance(self.extra, dict):
            raise FlexCimError(f"layer extra metadata must be an object of strings, "
                               f"not {type(self.extra).__name__}")
        object.__setattr__(self, "extra", {str(k): str(v) for k, v in self.extra.items()})


def save_layer(path: str | os.PathLike, layer: SparseLayer) -> None:
    """Write ``layer`` to a safetensors file (atomically: a failure keeps the previous file)."""
    from safetensors.numpy import save_file

    tensors = {
        "weight.values": np.ascontiguousarray(layer.weight.values),
        "weight.indices": np.ascontiguousarray(layer.weight.indices),
        "weight.scale": np.ascontiguousarray(layer.weight_scale),
    }
    c, k = layer.weight.shape
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "pattern": str(layer.weight.pattern),
        "shape": f"{c},{k}",
        "name": layer.name,
        "extra": json.dumps(layer.extra, sort_keys=True),
    }
    if layer.act is not None:
        tensors["act.values"] = np.ascontiguousarray(layer.act)
        if np.ndim(layer.act_scale) == 1:
            tensors["act.scale"] = np.ascontiguousarray(layer.act_scale)
            metadata["act_scale"] = "per-token"
        else:
            metadata["act_scale"] = repr(float(layer.act_scale))
        if layer.act_pattern is not None:
            metadata["act_pattern"] = str(layer.act_pattern)
    with atomic_path(path) as tmp:
        save_file(tensors, os.fspath(tmp), metadata=metadata)


def load_layer(path: str | os.PathLike) -> SparseLayer:
    """Read a file written by :func:`save_layer`; any defect raises a one-line FlexCimError."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FlexCimError(f"layer file {path!r} does not exist")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt/truncated files
        raise FlexCimError(f"{path!r} is not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        found = metadata.get("format")
        raise FlexCimError(f"{path!r} is not a FlexCiM layer file (format={found!r})")
    if metadata.get("version") != VERSION:
        raise FlexCimError(
            f"{path!r} has layer format version {metadata.get('version')!r}; expected {VERSION}"
        )
    missing = {"weight.values", "weight.indices", "weight.scale"} - tensors.keys()
    if missing:
        raise FlexCimError(f"{path!r} lacks tensor(s) {', '.join(sorted(missing))}")
    try:
        c, k = (int(v) for v in metadata["shape"].split(","))
        extra = json.loads(metadata.get("extra", "{}"))
        act_scale = None
        if "act.values" in tensors:
            act_scale = (tensors["act.scale"] if metadata["act_scale"] == "per-token"
                         else float(metadata["act_scale"]))
    except (KeyError, ValueError) as exc:
        raise FlexCimError(f"{path!r} has malformed metadata: {exc}") from None
    if c < 1 or k < 1:
        raise FlexCimError(f"{path!r}: metadata field 'shape' must be two integers >= 1, "
                           f"not {metadata['shape']!r}")
    if not isinstance(extra, dict):
        raise FlexCimError(f"{path!r}: metadata field 'extra' must be a JSON object, "
                           f"not {metadata.get('extra')!r}")
    # Every check below names this file: NMTensor and SparseLayer validate the values.
    try:
        weight = NMTensor(
            values=tensors["weight.values"],
            indices=tensors["weight.indices"],
            pattern=NMPattern.parse(metadata.get("pattern", "")),
            shape=(c, k),
        )
        return SparseLayer(
            weight=weight,
            weight_scale=tensors["weight.scale"],
            name=metadata.get("name", ""),
            act=tensors.get("act.values"),
            act_scale=act_scale,
            act_pattern=metadata.get("act_pattern"),
            extra=extra,
        )
    except FlexCimError as exc:
        raise FlexCimError(f"{path!r}: {exc}") from None
