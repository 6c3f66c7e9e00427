"""The cocotb testbench of the packed top (:class:`flexcim.hw.packed.PackedFlexCiM`, ``flexcim
verilog --bus packed``): the macro behind the weight unpacker, fed packed weight words.

The layers, drivers, scoreboard and checks of :mod:`flexcim.sim.tb` (:class:`PackedTB` is its
:class:`~flexcim.sim.tb.TB` with another weight stream), so every run compares

* each result beat, in order, with the beat-level golden model
  (:class:`flexcim.golden.host.MacroModel` fed the host's *unpacked* weight beats: the
  unpacker's canonical row order changes no sum), and ``y`` with the closed-form
  :func:`flexcim.golden.sparse_matmul` (int64, independent of the packing);
* the macro's activity counters with the energy model (the weight beats the unpacker wrote
  are the ``weight_beats`` of :func:`flexcim.golden.energy.layer_events`);
* the ``packed_words`` counter with :func:`flexcim.spec.layouts.compact_words` summed over the
  layer's loading commands (what ``golden.system`` charges as weight traffic with
  ``compact_indices=True``), and with the words the driver saw accepted.

The host side packs each loading command's weight beats with
:func:`flexcim.spec.layouts.pack_compact_stream` (one command stream: the top forks the
unpacker's commands itself).  Cycles: ``full_rate`` asserts ``golden.perf.layer_cycles +
command_lead`` exactly (:func:`flexcim.hw.packed.command_lead`, 2 on ``tiny`` and ``tiny3``:
the command registers that let the unpacker start first); ``random_stalls`` (random idle
cycles on ``cmd``, ``packed`` and ``act``, random back-pressure on ``result``) asserts exact
results and no fewer cycles.

Environment: as :mod:`flexcim.sim.tb`.
"""

from __future__ import annotations

import cocotb
import numpy as np
from flexcim.golden import perf
from flexcim.hw.packed import command_lead
from flexcim.sim.tb import TB, run_full_rate, run_random_stalls, timeout_ns
from flexcim.spec.layouts import COUNTER_BITS, compact_words, pack_compact_stream
from flexcim.spec.nm import NMTensor


class PackedTB(TB):
    """:class:`~flexcim.sim.tb.TB` on the packed top: the weight beats go in as packed words
    on ``packed``, the cycle model gains the command lead, and the word counter is checked."""

    WEIGHT_PORT = "packed"

    def weight_stream(self, streams) -> list[int]:
        """The packed words of the host's weight beats, per loading command."""
        self._words_before = self.weights.count
        words = pack_compact_stream(self.cfg, streams.cmd_beats, streams.weight_beats)
        self._words_sent = len(words)
        return words

    def model_cycles(self, commands) -> int:
        """``golden.perf.layer_cycles + command_lead``: the macro's own cycles, after the
        command registers in front of it."""
        return perf.layer_cycles(self.cfg, commands) + command_lead(self.cfg)

    def counters(self) -> dict[str, int]:
        """The macro's activity counters and the top's ``packed_words``."""
        return {**super().counters(), "packed_words": self.dut.packed_words.value.to_unsigned()}

    def check_activity(self, before: dict[str, int], commands, x: np.ndarray, w: NMTensor
                       ) -> dict:
        """The macro's counters against the energy model, and ``packed_words`` against
        :func:`~flexcim.spec.layouts.compact_words` of every loading command."""
        activity = super().check_activity(before, commands, x, w)
        cfg = self.cfg
        expected = sum(compact_words(cfg, c.pattern, cfg.weight_beats(c.pattern, c.k))
                       for c in commands if c.load_weights)
        counted = activity["packed_words"]
        accepted = self.weights.count - self._words_before
        assert counted == expected == accepted == self._words_sent, (
            f"packed words: the packed_words counter says {counted}, compact_words of the "
            f"{sum(c.load_weights for c in commands)} loading commands {expected}, the driver "
            f"saw {accepted} accepted of {self._words_sent} sent")
        assert 0 <= counted < 1 << COUNTER_BITS
        return {**activity, "compact_words": expected}


@cocotb.test(timeout_time=timeout_ns(), timeout_unit="ns")
async def full_rate(dut):
    """No stalls: bit-exact, packed words counted, cycles = golden.perf's + the command lead."""
    await run_full_rate(dut, PackedTB, "packed, full rate")


@cocotb.test(timeout_time=timeout_ns(), timeout_unit="ns")
async def random_stalls(dut):
    """Random idle cycles on cmd, packed and act, random back-pressure on result: bit-exact,
    packed words counted, never faster than the model."""
    await run_random_stalls(dut, PackedTB)
