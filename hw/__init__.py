"""The FlexCiM hardware generator (Amaranth HDL 0.5).

The configuration it generates from (:class:`~flexcim.spec.config.HwConfig`) and the payload
layouts of its streams are the spec's (:mod:`flexcim.spec`); importing this package loads
nothing, the Amaranth components live in their own modules.
"""
