"""The FlexCiM hardware generator (Amaranth HDL 0.5).

Importing this package loads only the configuration; the Amaranth components live in their own
modules so that golden/ and flow/ can use :class:`HwConfig` without importing Amaranth.
"""

from flexcim.hw.config import PRESETS, HwConfig, preset

__all__ = ["PRESETS", "HwConfig", "preset"]
