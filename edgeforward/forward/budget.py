"""The one budget guard: may this device send now, on which path, and if not, why and until when.

Every rule about a device's plan (points per UTC day, messages per UTC month and the live path's
share of them, the paced intervals that spread what is left to the month's end) is answered here,
from the device's resolved limits and what the buffer recorded as spent. Nothing else recomputes it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from ..config import ForwardConfig, Limits
from ..store import Budget
from ..timebase import next_utc_day_s, next_utc_month_s, seconds_left_in_month, utc_day, utc_month
from .planner import history_interval_s, history_messages_left, live_interval_s
from .state import WaitReason


class Path(enum.StrEnum):
    """The two ways points travel to the cloud."""

    LIVE = "live"  # multi-pin GET (and the location GET), stamped by the cloud on arrival
    HISTORY = "history"  # per-pin timestamped POST


@dataclass(frozen=True, slots=True)
class Verdict:
    """The guard's answer: allowed, or why not and until which wall-clock moment."""

    allowed: bool
    reason: WaitReason | None = None
    until_wall: float | None = None

    @classmethod
    def ok(cls) -> Verdict:
        """Allowed."""
        return cls(True)


ALLOWED = Verdict.ok()


class BudgetGuard:
    """Answers for one device's plan, from what the buffer says it spent."""

    def __init__(self, limits: Limits, forward: ForwardConfig, spent: Budget | None = None) -> None:
        self.limits = limits
        self._forward = forward
        self._spent = spent

    @property
    def live_enabled(self) -> bool:
        """Whether the configuration has a live path at all."""
        return self._forward.live_interval_s > 0

    def record(self, spent: Budget) -> None:
        """Take what the buffer now says this device spent (after a spend or a refund)."""
        self._spent = spent

    def spent(self, wall_s: float) -> Budget:
        """What is spent in the UTC day and month of `wall_s` (zero when the recorded ones are past)."""
        day, month = utc_day(wall_s), utc_month(wall_s)
        spent = self._spent
        if spent is None:
            return Budget(day, 0, month, 0)
        return Budget(
            day,
            spent.points_day if spent.day == day else 0,
            month,
            spent.messages_month if spent.month == month else 0,
        )

    def messages_left(self, wall_s: float) -> int | None:
        """Messages left this month for both paths (None: unlimited)."""
        limit = self.limits.messages_per_month
        if not limit:
            return None
        return max(0, limit - self.spent(wall_s).messages_month)

    def path_messages_left(self, path: Path, wall_s: float) -> int | None:
        """Messages this path may spend now: history keeps the live path's share of what is left."""
        left = self.messages_left(wall_s)
        if path is Path.LIVE:
            return left
        return history_messages_left(left, self._forward.live_share, self.live_enabled)

    def points_room(self, wall_s: float) -> int | None:
        """Timestamped points left today (None: unlimited)."""
        limit = self.limits.points_per_day
        if not limit:
            return None
        return max(0, limit - self.spent(wall_s).points_day)

    def check(self, path: Path, wall_s: float, points: int = 0) -> Verdict:
        """May one request on `path` carrying `points` timestamped points go now?"""
        left = self.path_messages_left(path, wall_s)
        if left is not None and left < 1:
            return Verdict(False, WaitReason.MESSAGES_BUDGET, next_utc_month_s(wall_s))
        if path is Path.HISTORY:
            room = self.points_room(wall_s)
            if room is not None and room < max(1, points):
                return Verdict(False, WaitReason.POINTS_BUDGET, next_utc_day_s(wall_s))
        return ALLOWED

    def live_interval_s(self, wall_s: float) -> float:
        """The live interval in effect: never faster than configured, slower when messages run short."""
        paced = live_interval_s(
            self._forward.live_interval_s,
            self.messages_left(wall_s),
            seconds_left_in_month(wall_s),
            self._forward.live_share,
        )
        # Never wait past the month's end: the new month brings new messages.
        return min(paced, seconds_left_in_month(wall_s)) if self.live_enabled else math.inf

    def history_interval_s(self, wall_s: float, requests_per_round: int) -> float:
        """The pause between history rounds in effect: slower when the month's messages run short."""
        return min(
            history_interval_s(
                self._forward.history_interval_s,
                self.path_messages_left(Path.HISTORY, wall_s),
                seconds_left_in_month(wall_s),
                requests_per_round,
            ),
            seconds_left_in_month(wall_s),
        )
