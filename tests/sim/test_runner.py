"""sim.runner's simulator flags, pinned on the bug they fix.

Icarus under cocotb's default ``-g2012`` never ran an ``always @*`` block whose inputs kept their
initial values (Yosys's backend relies on Verilog-2005 declaration-initialiser events): the
FlexCiM controller's pass width stayed X for the dense pattern (code 0) and dense layers hung.
"""

import os

import pytest
from amaranth import Array, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from flexcim.sim import runner


class Lookup(wiring.Component):
    """``out = TABLE[code]``, ``code`` a register loaded only when ``load`` is high."""

    TABLE = (8, 16, 32, 16)

    load: In(1)
    new_code: In(2)
    out: Out(7)

    def elaborate(self, platform):
        m = Module()
        code = Signal(2)
        with m.If(self.load):
            m.d.sync += code.eq(self.new_code)
        m.d.comb += self.out.eq(Array(self.TABLE)[code])
        return m


@pytest.mark.slow
@pytest.mark.parametrize("sim", runner.SIMULATORS)
def test_combinational_logic_of_initial_values_is_evaluated(sim):
    if not runner.available(sim):
        pytest.skip(f"{sim} is not installed")
    build_dir = runner.build_dir_for("time0", sim, {"v": 1})
    source = runner.amaranth_verilog(Lookup(), "lookup", build_dir / "lookup.v")
    result = runner.run(sim, [source], "lookup", "cocotb_time0", build_dir)
    assert result.passed


def test_icarus_compiles_verilog_2005():
    # cocotb puts -g2012 first; ours must come later to win.
    assert runner.build_args("icarus")[-1] == "-g2005"
    assert "-g2005" not in runner.build_args("verilator")
    with pytest.raises(runner.FlexCimError, match="simulator must be one of"):
        runner.build_args("xcelium")


def test_verilator_builds_use_ccache_when_it_is_there_unless_told_otherwise(monkeypatch, tmp_path):
    """OBJCACHE=ccache reaches Verilator's makefiles when ccache is on PATH; a user's OBJCACHE,
    even empty, is kept; without ccache nothing is set."""
    fake = tmp_path / "ccache"
    fake.write_text("#!/bin/sh\nexec \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("OBJCACHE", raising=False)
    runner.prepare_environment()
    assert os.environ["OBJCACHE"] == "ccache"
    monkeypatch.setenv("OBJCACHE", "")
    runner.prepare_environment()
    assert os.environ["OBJCACHE"] == ""
    monkeypatch.delenv("OBJCACHE")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(runner, "verilator_bin_dir", lambda: None)
    runner.prepare_environment()
    assert "OBJCACHE" not in os.environ
