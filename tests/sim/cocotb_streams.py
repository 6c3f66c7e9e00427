"""cocotb tests of sim.streams on the small stream components of test_streams.py.

Parameters arrive in the environment: ``STREAM_WIDTH`` (payload bits), ``STREAM_BEATS``.
The component rotates every payload right by one bit, so a monitor that read the wrong bits
or a driver that skipped, repeated or reordered a beat fails the scoreboard.
"""

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles
from flexcim.sim.streams import (
    ClockedLoop,
    Scoreboard,
    StreamDriver,
    StreamMonitor,
    no_pauses,
    random_pauses,
)

WIDTH = int(os.environ.get("STREAM_WIDTH", "8"))
BEATS = int(os.environ.get("STREAM_BEATS", "200"))


def rotate_right(value: int, width: int) -> int:
    return (value >> 1) | ((value & 1) << (width - 1))


async def _run(dut, in_pauses, out_pauses, rng):
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    driver = StreamDriver(dut, "i", pauses=in_pauses)
    board = Scoreboard("rotated beats")
    monitor = StreamMonitor(dut, "o", pauses=out_pauses, callback=board.got)
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0
    loop = ClockedLoop(dut.clk, [driver, monitor])
    loop.start()
    # Full-width random beats, extremes included (all ones, top bit only, zero).
    beats = [(1 << WIDTH) - 1, 1 << (WIDTH - 1), 0]
    beats += [rng.getrandbits(WIDTH) for _ in range(BEATS - len(beats))]
    board.expect(rotate_right(b, WIDTH) for b in beats)
    driver.send(beats)
    await loop.wait_until(lambda: monitor.count >= BEATS, max_cycles=20 * BEATS, what="all beats")
    await loop.cycles(10)  # nothing extra may come out
    loop.stop()
    board.check()
    assert monitor.received == [rotate_right(b, WIDTH) for b in beats]
    return loop, driver, monitor


@cocotb.test(timeout_time=2, timeout_unit="ms")
async def full_throughput(dut):
    """No pauses on either side: one beat per cycle after the pipeline fills."""
    rng = random.Random(cocotb.RANDOM_SEED)
    _, driver, monitor = await _run(dut, no_pauses(), no_pauses(), rng)
    # One beat per cycle: the last beat goes in BEATS-1 cycles after the first.
    assert driver.last_cycle - driver.first_cycle == BEATS - 1
    assert monitor.last_cycle - monitor.first_cycle == BEATS - 1


@cocotb.test(timeout_time=4, timeout_unit="ms")
async def random_idle_and_backpressure(dut):
    """Bursty idle cycles on the input and back-pressure on the output."""
    rng = random.Random(cocotb.RANDOM_SEED + 1)
    in_p = random_pauses(random.Random(rng.random()), 0.3, 4)
    out_p = random_pauses(random.Random(rng.random()), 0.3, 6)
    _, driver, monitor = await _run(dut, in_p, out_p, rng)
    # The pauses must actually have slowed the transfer down, or this test tests nothing.
    assert monitor.last_cycle - monitor.first_cycle > BEATS + BEATS // 10


@cocotb.test(timeout_time=1, timeout_unit="ms", expect_fail=True)
async def scoreboard_catches_a_wrong_expectation(dut):
    """The scoreboard must fail when one expected beat is off by one bit."""
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    driver = StreamDriver(dut, "i")
    board = Scoreboard("rotated beats")
    monitor = StreamMonitor(dut, "o", callback=board.got)
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0
    loop = ClockedLoop(dut.clk, [driver, monitor])
    loop.start()
    beats = list(range(1, 9))
    expected = [rotate_right(b, WIDTH) for b in beats]
    expected[5] ^= 1 << (WIDTH - 1)
    board.expect(expected)
    driver.send(beats)
    await loop.wait_until(lambda: monitor.count >= len(beats), max_cycles=100, what="beats")
    board.check()
