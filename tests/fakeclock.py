"""A clock the test owns: virtual monotonic and wall time, and sleepers that wake only when the test says so.

Real I/O (loopback HTTP, SQLite) still takes real time; only waits are virtual. `run_until` drives the
system through its schedule: whenever every task waiting on the clock is asleep, it jumps to the
earliest deadline. "Nothing happened for N seconds" is proven by `advance(N)`, never by a real sleep.
"""

from __future__ import annotations

import asyncio
import calendar
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

POLL_S = 0.005
REAL_TIMEOUT_S = 30.0  # a generous bound on real time, for the I/O between virtual steps


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Unix time of a UTC calendar moment."""
    return float(calendar.timegm((year, month, day, hour, minute, second)))


# The calendar moments the date-sensitive tests run at (issue: any day of any month must pass).
CALENDAR = {
    "first-of-month": utc(2027, 3, 1, 0, 0, 5),
    "mid-month": utc(2027, 3, 15, 12, 0, 0),
    "last-second-of-month": utc(2027, 4, 30, 23, 59, 59),
    "february-28": utc(2027, 2, 28, 23, 59, 59),
    "new-year-eve": utc(2026, 12, 31, 23, 59, 59),
}


class FakeClock:
    """Implements edgeforward.timebase.Clock on virtual time."""

    def __init__(self, wall: float | None = None, mono: float = 1000.0) -> None:
        self._wall = time.time() if wall is None else wall
        self._mono = mono
        self._sleepers: list[tuple[float, int, asyncio.Future[None], asyncio.Task[Any] | None]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._mono

    def wall(self) -> float:
        return self._wall

    def wall_ms(self) -> int:
        return int(self._wall * 1000)

    async def sleep_until(self, deadline: float, wake: asyncio.Event | None = None) -> bool:
        if wake is not None and wake.is_set():
            return True
        if deadline <= self._mono:
            await asyncio.sleep(0)
            return False
        loop = asyncio.get_running_loop()
        timer: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._order), timer, asyncio.current_task()))
        waits: set[asyncio.Future[Any]] = {timer}
        woken: asyncio.Future[Any] | None = None
        if wake is not None:
            woken = asyncio.ensure_future(wake.wait())
            waits.add(woken)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not timer.done():
                timer.cancel()
            if woken is not None and not woken.done():
                woken.cancel()
        return woken is not None and woken.done() and not woken.cancelled()

    # driving it ---------------------------------------------------------------------------------

    @property
    def sleeping(self) -> int:
        """How many waits on this clock are pending."""
        self._prune()
        return len(self._sleepers)

    def next_deadline(self) -> float:
        """The earliest pending deadline (inf: none)."""
        self._prune()
        return self._sleepers[0][0] if self._sleepers else math.inf

    def _prune(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)

    def _release(self) -> list[asyncio.Task[Any]]:
        woken = []
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, timer, task = heapq.heappop(self._sleepers)
            if not timer.done():
                timer.set_result(None)
                if task is not None:
                    woken.append(task)
        return woken

    async def advance(self, seconds: float) -> None:
        """Let `seconds` of virtual time pass at once: whatever falls due wakes, in order, and is let finish."""
        target = self._mono + seconds
        while True:
            self._prune()
            if not self._sleepers or self._sleepers[0][0] > target:
                break
            self._set(self._sleepers[0][0])
            await self._let_run(self._release())
        self._set(target)
        await self._let_run(self._release())

    async def _let_run(self, woken: list[asyncio.Task[Any]]) -> None:
        """Wait in real time until every woken task sleeps on the clock again or has ended."""
        deadline = time.monotonic() + REAL_TIMEOUT_S
        await asyncio.sleep(0)
        while True:
            self._prune()
            asleep = {entry[3] for entry in self._sleepers}
            if all(task.done() or task in asleep for task in woken):
                break
            assert time.monotonic() < deadline, "a woken task neither went back to sleep nor ended"
            await asyncio.sleep(POLL_S)
        for _ in range(3):
            await asyncio.sleep(0)

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock alone (an NTP correction): the monotonic clock does not move."""
        self._wall += seconds

    def _set(self, mono: float) -> None:
        self._wall += mono - self._mono
        self._mono = mono

    async def settle(self, sleepers: int = 1) -> None:
        """Wait in real time until at least `sleepers` tasks wait on the clock (they have done their work)."""
        deadline = time.monotonic() + REAL_TIMEOUT_S
        await asyncio.sleep(0)
        while self.sleeping < sleepers:
            assert time.monotonic() < deadline, "nothing went back to sleep on the fake clock"
            await asyncio.sleep(POLL_S)
        # Sleepers registered, but let callbacks scheduled with them run too.
        for _ in range(3):
            await asyncio.sleep(0)

    async def run_until(
        self,
        condition: Callable[[], Awaitable[bool] | bool],
        *,
        within_s: float,
        sleepers: int = 1,
    ) -> float:
        """Jump from deadline to deadline until `condition` holds; return the virtual seconds it took."""
        start = self._mono
        real_deadline = time.monotonic() + REAL_TIMEOUT_S
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return self._mono - start
            assert time.monotonic() < real_deadline, "condition not met in real time"
            if self.sleeping < sleepers:
                await asyncio.sleep(POLL_S)  # someone is working (I/O): let it
                continue
            await asyncio.sleep(POLL_S)
            if self.sleeping < sleepers:
                continue
            jump = min(self.next_deadline(), start + within_s) - self._mono
            assert self._mono - start < within_s, f"condition not met within {within_s} virtual seconds"
            await self.advance(max(0.0, jump))
