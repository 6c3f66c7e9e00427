"""Stream drivers, monitors, pause generators and an in-order scoreboard for cocotb 2.x.

Amaranth flattens an ``amaranth.lib.stream`` interface into ``<name>__payload``,
``<name>__valid`` and ``<name>__ready`` ports.  The classes here move whole packed beats (Python
ints, packed once with NumPy by :mod:`flexcim.spec.layouts`) through those ports, one beat per
cycle at most, with no per-field awaits: that is what makes a 576x576x128 projection checkable
on Verilator in well under a minute.

Timing.  All agents of a clock are stepped by one :class:`ClockedLoop` coroutine, two triggers
per cycle for the whole testbench:

* at the falling edge every agent *drives* (driver: ``valid``/``payload``; monitor: ``ready``);
* at ``ReadOnly`` of that time step, with everything settled, every agent *samples*: a transfer
  happens at the next rising edge exactly when ``valid and ready`` now.

Sampling after the falling edge, never right after the rising edge, is what makes the same code
correct on Icarus (event-driven: values at a rising-edge callback are pre-edge) and Verilator
(cycle-based: they are post-edge); see cocotb's timing-model documentation.  The DUT must only
use the rising edge, as every Amaranth ``sync`` domain does.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import repeat

# ----------------------------------------------------------------------------- pauses


def no_pauses() -> Iterator[bool]:
    """A pause generator that never pauses (full throughput)."""
    return repeat(False)


def random_pauses(rng: random.Random, probability: float = 0.2, max_run: int = 4
                  ) -> Iterator[bool]:
    """Yield ``True`` for cycles to idle: bursts of 1..``max_run`` starting with ``probability``.

    Bursts, not independent coin flips, because a FIFO or a double buffer only shows its corner
    cases (empty, full, both banks busy) when the other side stalls for several cycles.
    """
    if not 0 <= probability < 1:
        raise ValueError(f"pause probability must be in [0, 1), not {probability!r}")
    if max_run < 1:
        raise ValueError(f"max_run must be at least 1, not {max_run!r}")
    while True:
        if rng.random() < probability:
            for _ in range(rng.randint(1, max_run)):
                yield True
        else:
            yield False


# ----------------------------------------------------------------------------- agents


def _port(dut, name: str, field: str):
    try:
        return getattr(dut, f"{name}__{field}")
    except AttributeError:
        raise AttributeError(f"{dut._name} has no stream port {name}__{field}") from None


def _value(handle) -> int:
    """The unsigned integer on a port (the fastest public path cocotb 2 offers)."""
    return handle.value.to_unsigned()


class _StreamAgent:
    """Ports, pause generator and transfer bookkeeping shared by drivers and monitors."""

    def __init__(self, dut, name: str, pauses: Iterator[bool] | None):
        self.name = name
        self._valid = _port(dut, name, "valid")
        self._ready = _port(dut, name, "ready")
        self._payload = _port(dut, name, "payload")
        self._pauses = pauses if pauses is not None else no_pauses()
        self.count = 0
        self.first_cycle: int | None = None
        self.last_cycle: int | None = None

    def mark(self) -> None:
        """Forget ``first_cycle``/``last_cycle`` (start measuring a new run)."""
        self.first_cycle = self.last_cycle = None

    def _transferred(self, cycle: int) -> None:
        self.count += 1
        if self.first_cycle is None:
            self.first_cycle = cycle
        self.last_cycle = cycle


class StreamDriver(_StreamAgent):
    """Push beats into an Amaranth ``In(stream.Signature(...))`` port.

    Parameters
    ----------
    dut : cocotb handle
        The top level (ports ``<name>__payload``, ``<name>__valid``, ``<name>__ready``).
    name : str
        The stream's name.
    pauses : iterator of bool, optional
        ``True`` = insert an idle cycle before the next beat (never once ``valid`` is up:
        a stream's ``valid`` must not wait for, or drop before, ``ready``).

    Members
    -------
    count : int
        Beats accepted so far.
    first_cycle, last_cycle : int or None
        :class:`ClockedLoop` cycles of the first and last accepted beat.
    """

    def __init__(self, dut, name: str, pauses: Iterator[bool] | None = None):
        super().__init__(dut, name, pauses)
        self._queue: deque[int] = deque()
        self._presenting = False
        self._payload_now: int | None = None
        self._valid.value = 0
        self._valid_up = False

    def send(self, beats: Iterable[int]) -> None:
        """Queue packed beats (ints) for transmission in order."""
        self._queue.extend(int(b) for b in beats)

    @property
    def pending(self) -> int:
        """Beats queued or on the port and not yet accepted."""
        return len(self._queue) + self._presenting

    def drive(self, cycle: int) -> None:
        if self._presenting:
            return  # valid stays up until the beat is taken
        if self._queue and not next(self._pauses):
            beat = self._queue.popleft()
            if beat != self._payload_now:  # a GPI write costs more than the comparison
                self._payload.value = beat
                self._payload_now = beat
            if not self._valid_up:
                self._valid.value = 1
                self._valid_up = True
            self._presenting = True
        elif self._valid_up:
            self._valid.value = 0
            self._valid_up = False

    def sample(self, cycle: int) -> None:
        if self._presenting and self._ready.value:
            self._presenting = False
            self._transferred(cycle)


class StreamMonitor(_StreamAgent):
    """Collect beats from an Amaranth ``Out(stream.Signature(...))`` port, with back-pressure.

    Parameters
    ----------
    dut, name
        As :class:`StreamDriver`.
    pauses : iterator of bool, optional
        ``True`` = hold ``ready`` low this cycle (back-pressure).
    callback : callable, optional
        Called with every received beat (an int), e.g. :meth:`Scoreboard.got`.

    Members
    -------
    received : list of int
        Every beat, in order (kept unless ``keep=False``).
    count : int
    first_cycle, last_cycle : int or None
    """

    def __init__(self, dut, name: str, pauses: Iterator[bool] | None = None,
                 callback: Callable[[int], None] | None = None, keep: bool = True):
        super().__init__(dut, name, pauses)
        self._callback = callback
        self._keep = keep
        self._ready_now = False
        self._ready.value = 0
        self.received: list[int] = []

    def drive(self, cycle: int) -> None:
        ready = not next(self._pauses)
        if ready != self._ready_now:
            self._ready.value = int(ready)
            self._ready_now = ready

    def sample(self, cycle: int) -> None:
        if self._ready_now and self._valid.value:
            beat = _value(self._payload)
            self._transferred(cycle)
            if self._keep:
                self.received.append(beat)
            if self._callback is not None:
                self._callback(beat)


class ClockedLoop:
    """Step every agent once per clock cycle: ``drive`` at the falling edge, ``sample`` at
    ``ReadOnly``.  Start it with :meth:`start` after reset; ``cycle`` counts from 0.

    The cycle number passed to agents is the one whose *next* rising edge performs the
    transfers they sample, so ``last_cycle - first_cycle`` of two agents is an exact distance
    in clock cycles.
    """

    def __init__(self, clk, agents: Iterable = ()):
        self._clk = clk
        self.agents = list(agents)
        self.cycle = 0
        self._task = None

    def add(self, agent):
        self.agents.append(agent)
        return agent

    async def _run(self) -> None:
        from cocotb.triggers import FallingEdge, ReadOnly

        falling, settled = FallingEdge(self._clk), ReadOnly()
        agents = self.agents
        while True:
            await falling
            cycle = self.cycle
            for agent in agents:
                agent.drive(cycle)
            await settled
            for agent in agents:
                agent.sample(cycle)
            self.cycle = cycle + 1
            watch = self._watch
            if watch is not None and (watch[0]() or self.cycle >= watch[1]):
                self._watch = None
                watch[2].set()

    _watch = None

    def start(self):
        import cocotb

        self._task = cocotb.start_soon(self._run())
        return self._task

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def wait_until(self, done: Callable[[], bool], *, max_cycles: int,
                         what: str = "condition") -> int:
        """Wait until ``done()`` (checked by the loop after every cycle's sampling); returns
        the cycle count then.

        Raises ``AssertionError`` naming ``what`` after ``max_cycles`` cycles, so a hung DUT
        fails with a message instead of only tripping the test's ``timeout_time``.
        """
        from cocotb.triggers import Event

        if not done():
            event = Event()
            self._watch = (done, self.cycle + max_cycles, event)
            await event.wait()
            if not done():
                raise AssertionError(f"{what} not reached within {max_cycles} cycles")
        return self.cycle

    async def cycles(self, n: int) -> None:
        """Let ``n`` cycles pass (agents keep running)."""
        end = self.cycle + n
        await self.wait_until(lambda: self.cycle >= end, max_cycles=n + 1, what=f"{n} cycles")


# ----------------------------------------------------------------------------- scoreboard


class Scoreboard:
    """In-order comparison of received items against expected ones.

    Parameters
    ----------
    name : str
        Used in messages.
    compare : callable, optional
        ``compare(expected, got) -> bool``; equality by default.
    describe : callable, optional
        ``describe(expected, got) -> str`` for a mismatch message (``repr`` of both by default).
    max_reports : int
        Mismatches kept for the final report (all are counted).
    """

    def __init__(self, name: str, compare: Callable | None = None,
                 describe: Callable | None = None, max_reports: int = 5):
        self.name = name
        self._compare = compare or (lambda a, b: a == b)
        self._describe = describe or (lambda e, g: f"expected {e!r}, got {g!r}")
        self._max_reports = max_reports
        self._expected: deque = deque()
        self.matched = 0
        self.mismatched = 0
        self.unexpected = 0
        self.reports: list[str] = []

    def expect(self, items: Iterable) -> None:
        self._expected.extend(items)

    @property
    def outstanding(self) -> int:
        return len(self._expected)

    @property
    def index(self) -> int:
        """Items received so far."""
        return self.matched + self.mismatched + self.unexpected

    def got(self, item) -> None:
        index = self.index
        if not self._expected:
            self.unexpected += 1
            self._report(f"item {index}: unexpected {item!r} (nothing more was expected)")
            return
        expected = self._expected.popleft()
        if self._compare(expected, item):
            self.matched += 1
        else:
            self.mismatched += 1
            self._report(f"item {index}: {self._describe(expected, item)}")

    def _report(self, text: str) -> None:
        if len(self.reports) < self._max_reports:
            self.reports.append(text)

    @property
    def clean(self) -> bool:
        return not (self.mismatched or self.unexpected or self._expected)

    def check(self) -> None:
        """Raise ``AssertionError`` unless every expected item arrived, in order, and matched."""
        if self.clean:
            return
        parts = [f"{self.name}: {self.matched} matched, {self.mismatched} mismatched, "
                 f"{self.unexpected} unexpected, {len(self._expected)} missing"]
        parts += self.reports
        raise AssertionError("\n  ".join(parts))
