"""cocotb test for tests/sim/test_runner.py: a combinational output of a never-changing register.

``out`` is a table lookup on ``code``; ``code`` keeps its initial value 0 unless ``load`` is
high, and ``load`` stays low here.  The output must still be the table's first entry, not X.
"""

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, ReadOnly


@cocotb.test(timeout_time=10, timeout_unit="us")
async def lookup_of_initial_register_is_defined(dut):
    dut.load.value = 0
    dut.new_code.value = 0
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)
    await ReadOnly()
    assert dut.out.value.is_resolvable, f"out is {dut.out.value} (never evaluated)"
    assert dut.out.value.to_unsigned() == 8, f"out is {dut.out.value.to_unsigned()}, not 8"
