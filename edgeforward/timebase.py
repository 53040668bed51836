"""Time as a dependency: a monotonic clock for deadlines, the wall clock for stamps and budget keys.

Deadlines and sleeps run on the monotonic clock, so a wall-clock step (NTP on a Pi without an RTC)
neither postpones nor hurries them. The wall clock only names things: a point's timestamp, the UTC
day and month a budget belongs to, and how long until that day or month ends. Tests replace the
whole `Clock` (tests/fakeclock.py) and so decide what day it is and when anything is due.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import math
import time
from typing import Protocol

SECONDS_PER_DAY = 86_400.0


class Clock(Protocol):
    """The two clocks and the one way to wait on them."""

    def monotonic(self) -> float:
        """Seconds on a clock that never steps (deadlines)."""
        ...

    def wall(self) -> float:
        """Unix time in seconds (timestamps, UTC budget keys)."""
        ...

    async def sleep_until(self, deadline: float, wake: asyncio.Event | None = None) -> bool:
        """Sleep until the monotonic `deadline` (inf: forever) or until `wake` is set; True if woken.

        Always yields to the event loop, also when the deadline has passed.
        """
        ...


class SystemClock:
    """The real clocks: time.monotonic() (the event loop's clock) and time.time()."""

    def monotonic(self) -> float:
        """Seconds on the monotonic clock."""
        return time.monotonic()

    def wall(self) -> float:
        """Unix time in seconds."""
        return time.time()

    async def sleep_until(self, deadline: float, wake: asyncio.Event | None = None) -> bool:
        """Sleep until `deadline` on the monotonic clock, or until `wake` is set."""
        if wake is not None and wake.is_set():
            return True
        delay = deadline - self.monotonic()
        if delay <= 0:
            await asyncio.sleep(0)  # a wait that is already over still lets others run
            return False
        if wake is None:
            if math.isinf(delay):
                await asyncio.Event().wait()
            await asyncio.sleep(delay)
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), None if math.isinf(delay) else delay)
            return True
        return False


SYSTEM_CLOCK = SystemClock()


def utc_day(wall_s: float) -> str:
    """Return the UTC day of a Unix time as YYYY-MM-DD (the key of a daily budget)."""
    return time.strftime("%Y-%m-%d", time.gmtime(wall_s))


def utc_month(wall_s: float) -> str:
    """Return the UTC month of a Unix time as YYYY-MM (the key of a monthly budget)."""
    return time.strftime("%Y-%m", time.gmtime(wall_s))


def next_utc_day_s(wall_s: float) -> float:
    """Return the Unix time of the next UTC midnight."""
    return (math.floor(wall_s / SECONDS_PER_DAY) + 1) * SECONDS_PER_DAY


def next_utc_month_s(wall_s: float) -> float:
    """Return the Unix time of the first moment of the next UTC month."""
    now = time.gmtime(wall_s)
    year, month = (now.tm_year + 1, 1) if now.tm_mon == 12 else (now.tm_year, now.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def seconds_left_in_month(wall_s: float) -> float:
    """Return the seconds from `wall_s` to the end of its UTC month (never less than one)."""
    return max(1.0, next_utc_month_s(wall_s) - wall_s)


def mono_deadline(clock: Clock, wall_deadline_s: float) -> float:
    """Turn a wall-clock moment (the next UTC day, say) into a monotonic deadline as of now."""
    return clock.monotonic() + max(0.0, wall_deadline_s - clock.wall())
