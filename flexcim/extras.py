"""Optional extras: what ``pip install .`` leaves out, and the one-line error naming it.

``pip install .`` is enough for the golden model and the hardware (``flexcim matmul``,
``verilog``, ``synth``, ``formal``, ``energy``, ``system``, the RTL regressions); FLOW on a real
model (``flexcim flow``, ``flexcim demo``, the real SmolLM2 layer of ``make regress``) needs
PyTorch and Hugging Face, the ``flow`` extra (``pip install 'flexcim[flow]'``; ``make setup``
installs it).  Nothing here imports them: the check only looks them up.
"""

from __future__ import annotations

import importlib.util

from flexcim.errors import FlexCimError

# Top-level modules of the `flow` extra in pyproject.toml (matplotlib: the demo's plots).
FLOW_MODULES = ("torch", "transformers", "accelerate", "gguf", "matplotlib")
FLOW_INSTALL = "pip install 'flexcim[flow]'"


def _missing(modules) -> str | None:
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:  # a finder that refuses the name (or a broken parent package)
            return name
    return None


def flow_error(what: str, module: str, hint: str = "") -> FlexCimError:
    """The one-line error of ``what`` run without the flow extra (``module`` is absent)."""
    return FlexCimError(f"{what} needs the flow extra (no module {module!r}): {FLOW_INSTALL}"
                        f"{hint}")


def require_flow(what: str, hint: str = "") -> None:
    """Raise the one-line :class:`FlexCimError` if a module of the flow extra is not installed.

    ``what`` names the command (e.g. ``'flexcim flow select'``); ``hint`` is appended to the
    message (e.g. how to do without).
    """
    module = _missing(FLOW_MODULES)
    if module is not None:
        raise flow_error(what, module, hint)


def missing_flow_module(exc: ModuleNotFoundError) -> str | None:
    """The flow extra's module that ``exc`` reports missing, or None if it is another one."""
    top = (exc.name or "").split(".")[0]
    return top if top in FLOW_MODULES else None


__all__ = ["FLOW_INSTALL", "FLOW_MODULES", "flow_error", "missing_flow_module", "require_flow"]
