"""The spec: what golden/, hw/ and sim/ agree on, defined once.

:mod:`flexcim.spec.nm` (the N:M format the hardware stores), :mod:`flexcim.spec.config` (the
hardware configuration, :class:`~flexcim.spec.config.HwConfig`, and its presets),
:mod:`flexcim.spec.layouts` (the payload layouts of the macro's streams) and
:mod:`flexcim.spec.timing` (the timing contract of those streams).  The bottom layer: it imports
nothing of the project but flexcim's base utilities (tests/test_layering.py).
"""
