"""Mutants for verification: a real hw/ component behind a rewiring of its ports.

The formal mutation checks (:mod:`flexcim.sim.formal`) and the tests that prove a check can fail
(tests/hw) build their faulty designs the same way: the real component inside a wrapper of the
same class and signature, every port forwarded except the ones a fault redefines.  One wrapper
here, so a port added to a component is forwarded everywhere at once.
"""

from __future__ import annotations

from collections.abc import Callable

from amaranth.hdl import Module
from amaranth.lib import wiring


def forward(m: Module, outer: wiring.Component, inner: wiring.Component, *,
            inputs: dict | None = None, outputs: dict | None = None) -> None:
    """Connect every port of ``outer`` to the same port of ``inner`` (inputs in, outputs out),
    except the paths in ``inputs`` (drive ``inner``'s input with the given value instead of
    ``outer``'s) and in ``outputs`` (drive ``outer``'s output with the given value instead of
    ``inner``'s).  A path is the tuple of names (and array indices) of ``signature.flatten``,
    e.g. ``("fetch",)``; a value is a constant, an Amaranth value, or a function
    ``(outer, inner) -> value``."""
    inputs, outputs = inputs or {}, outputs or {}
    ports = list(outer.signature.flatten(outer))
    unknown = (set(inputs) | set(outputs)) - {path for path, _, _ in ports}
    if unknown:
        raise ValueError(f"no port {sorted(unknown)[0]!r} on {type(inner).__name__}")

    def given(value):
        return value(outer, inner) if callable(value) else value

    for path, member, value in ports:
        target = inner
        for part in path:
            target = target[part] if isinstance(part, int) else getattr(target, part)
        if member.flow == wiring.In:
            m.d.comb += target.eq(given(inputs[path]) if path in inputs else value)
        else:
            m.d.comb += value.eq(given(outputs[path]) if path in outputs else target)


def wrapping(base: type, doc: str, rewire: Callable[[Module, wiring.Component,
                                                      wiring.Component], None] | None = None,
             *, inputs: dict | None = None, outputs: dict | None = None) -> type:
    """A subclass of the component class ``base`` whose instances elaborate a real ``base``
    (built with the same arguments) with its ports connected by ``rewire(m, outer, real)``, by
    default :func:`forward` with ``inputs`` and ``outputs`` redefined.  A drop-in replacement:
    same constructor, same signature."""
    if rewire is None:
        def rewire(m, outer, real):
            forward(m, outer, real, inputs=inputs, outputs=outputs)

    class Mutant(base):
        __doc__ = doc

        def __init__(self, *args, **kwargs):
            self._real_args = (args, kwargs)
            super().__init__(*args, **kwargs)

        def elaborate(self, platform):
            m = Module()
            args, kwargs = self._real_args
            m.submodules.real = real = base(*args, **kwargs)
            rewire(m, self, real)
            return m

    Mutant.__name__ = Mutant.__qualname__ = f"{base.__name__}Mutant"
    return Mutant
