"""The MCU clock: maps a port's ms= (the MCU's millis() since its boot) to wall-clock epoch ms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MS_PER_DAY: Final = 86_400_000
MCU_COUNTER_SPAN: Final = 2**32  # Arduino millis() is an unsigned 32-bit counter
MCU_WRAP_WINDOW_MS: Final = MS_PER_DAY  # a wrap is only believed when both sides are this close to it
MCU_MAX_AHEAD_MS: Final = 1_000
MCU_DRIFT_PPM: Final = 1_000  # how fast the anchor may age: absorbs an MCU clock up to 0.1 % slow
# A backwards ms= is a reboot only if the MCU could have booted after the newest line: its ms= is then at most the
# time since that line (plus that line's own delay). This much more (and MCU_DRIFT_PPM of the uptime) absorbs the
# jitter of the fastest lines' delay.
MCU_REBOOT_SLACK_MS: Final = 100
# A saved clock (from an earlier run of the daemon) is taken up again only this soon after its newest line.
MCU_RESUME_MAX_MS: Final = 600_000


@dataclass(frozen=True, slots=True)
class McuClockState:
    """What an McuClock knows, to be taken up again after a daemon restart (all in the clock's domain, ms)."""

    anchor: int  # the MCU's boot on the wall clock
    anchor_at: int  # when the anchor was taken
    epoch: int  # 32-bit wraps seen since boot
    newest: int  # the largest ms= of this boot (wraps counted)
    newest_at: int  # when it arrived
    newest_delay: int  # how late it arrived, measured against the anchor


class McuClock:
    """Maps a port's MCU millis() (ms=) to wall-clock epoch ms.

    The anchor is the MCU's boot time on the wall clock: the least `received_ms - mcu_ms`
    seen, because the line that arrived with the least delay tells it best (fresh lines
    have a small delay, lines the MCU replays from its buffer a large one). A line is
    mapped to anchor + mcu_ms, so it is never placed after its own arrival: a line that
    would be is the new anchor. The anchor ages by MCU_DRIFT_PPM of elapsed time, so that a
    slow MCU crystal is followed (a fast one is followed anyway, since it lowers the minimum).

    A backwards step of ms= (below the newest ms= of this boot) is, in this order:
    - a 32-bit wrap, when the newest value was within MCU_WRAP_WINDOW_MS of 2**32, the new one
      within it of 0, and the wrapped time is not after the arrival;
    - a replay (a reading the MCU resends after newer ones), when ms= is larger than the time
      elapsed since the newest ms= arrived plus that line's delay: an MCU that rebooted since
      cannot have counted that far. It is mapped with the current anchor, so it keeps its time;
    - otherwise a reboot, and the clock anchors afresh.

    Limits:
    - Lines replayed before any fresh line since the anchor was taken (gateway start without a
      saved clock, reboot, reset()) are placed too late, by up to the first line's delay.
    - Between fresh lines the anchor ages, so replayed lines may be placed up to
      MCU_DRIFT_PPM of the gap late (1 s per 1000 s without a fresh line).
    - A reboot is only noticed when ms= goes backwards: an MCU that reboots while the gateway is
      away and, before the gateway is back, runs longer than it had before is mapped with the old
      boot's anchor. A saved clock is therefore taken up only within MCU_RESUME_MAX_MS.
    - A step of the gateway's own clock (e.g. the first NTP sync of a board without RTC)
      is not noticed; call reset() when the wall clock jumps.
    - Counters wider than 32 bits work, but never wrap.
    """

    __slots__ = (
        "_anchor",
        "_anchor_at",
        "_epoch",
        "_newest",
        "_newest_at",
        "_newest_delay",
        "anchorings",
        "last_counted",
        "last_was_newest",
    )

    def __init__(self) -> None:
        self._anchor: int | None = None  # boot time on the wall clock, in ms
        self._anchor_at = 0  # received_ms when the anchor was taken
        self._epoch = 0  # wraps seen since boot
        self._newest = 0  # the largest counted ms= of this boot
        self._newest_at = 0
        self._newest_delay = 0
        self.anchorings = 0  # how often the clock anchored afresh (first line, reboot, after reset())
        self.last_counted = 0  # the last line's ms= with its wraps counted
        self.last_was_newest = False  # whether the last line carried the largest ms= of its boot so far

    def reset(self) -> None:
        """Forget the anchor (the next line anchors afresh)."""
        self._anchor = None

    def state(self) -> McuClockState | None:
        """Return what the clock knows (None before its first line)."""
        if self._anchor is None:
            return None
        return McuClockState(
            self._anchor, self._anchor_at, self._epoch, self._newest, self._newest_at, self._newest_delay
        )

    def resume(self, state: McuClockState, now_ms: int) -> bool:
        """Take up a saved state unless it is older than MCU_RESUME_MAX_MS; return whether it was taken up."""
        if not 0 <= now_ms - state.newest_at <= MCU_RESUME_MAX_MS:
            return False
        self._anchor = state.anchor
        self._anchor_at = state.anchor_at
        self._epoch = state.epoch
        self._newest = state.newest
        self._newest_at = state.newest_at
        self._newest_delay = state.newest_delay
        return True

    def wall_of(self, counted: int) -> int:
        """Map a counted ms= of the current boot with the anchor as it is now (for lines held back a moment)."""
        if self._anchor is None:
            raise ValueError("the clock has no anchor")
        return self._anchor + counted

    def to_wall(self, mcu_ms: int, received_ms: int) -> int:
        """Return the wall-clock epoch ms of a line stamped `mcu_ms` that arrived at `received_ms`."""
        anchor = self._anchor
        if anchor is None:
            return self._anchor_on(mcu_ms, received_ms)
        elapsed = max(0, received_ms - self._anchor_at)
        aged = anchor + elapsed * MCU_DRIFT_PPM // 1_000_000
        epoch = self._epoch
        newest = self._newest
        counted = mcu_ms + epoch * MCU_COUNTER_SPAN
        newest_raw = newest - epoch * MCU_COUNTER_SPAN
        if epoch and mcu_ms >= MCU_COUNTER_SPAN - MCU_WRAP_WINDOW_MS and newest_raw < MCU_WRAP_WINDOW_MS:
            counted -= MCU_COUNTER_SPAN  # a replay from before the last wrap
        if counted < newest:
            wrapped = (
                newest_raw >= MCU_COUNTER_SPAN - MCU_WRAP_WINDOW_MS
                and mcu_ms < MCU_WRAP_WINDOW_MS
                and aged + (epoch + 1) * MCU_COUNTER_SPAN + mcu_ms <= received_ms + MCU_MAX_AHEAD_MS
            )
            if wrapped:
                self._epoch = epoch = epoch + 1
                counted = mcu_ms + epoch * MCU_COUNTER_SPAN
            elif not self._replayed(mcu_ms, received_ms):
                return self._anchor_on(mcu_ms, received_ms)
        if received_ms - counted <= aged:
            self._anchor = anchor = aged = received_ms - counted
            self._anchor_at = received_ms
        self.last_counted = counted
        self.last_was_newest = counted > self._newest
        if counted >= self._newest:
            self._newest = counted
            self._newest_at = received_ms
            # Against the anchor before aging: for a slow crystal that overstates the delay, which only makes a
            # reboot more readily believed (never a reboot taken for a replay).
            self._newest_delay = received_ms - (anchor + counted)
        return aged + counted

    def _replayed(self, mcu_ms: int, received_ms: int) -> bool:
        """Whether a backwards ms= is too large for an MCU that booted after the newest line arrived."""
        since = max(0, received_ms - self._newest_at)
        # The anchor's aging may have absorbed up to MCU_DRIFT_PPM of the boot's uptime of delay, too.
        slack = MCU_REBOOT_SLACK_MS + (since + self._newest) * MCU_DRIFT_PPM // 1_000_000
        return mcu_ms > since + self._newest_delay + slack

    def _anchor_on(self, mcu_ms: int, received_ms: int) -> int:
        self.anchorings += 1
        self.last_counted = mcu_ms
        self.last_was_newest = True
        self._anchor = received_ms - mcu_ms
        self._anchor_at = received_ms
        self._epoch = 0
        self._newest = mcu_ms
        self._newest_at = received_ms
        self._newest_delay = 0
        return received_ms
