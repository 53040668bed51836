"""Budget leases: a request's budget is recorded before it is sent, without a commit of its own per request.

The buffer commits a reservation a little above what a device has spent (`points_day_reserved`,
`messages_month_reserved` in `budget`), at once and before the request that needed it. The requests it covers
are counted in memory, and the exact counts (`points_day`, `messages_month`) ride later commits. After a crash
the daemon takes the reservation as spent: a crash costs at most the unused part of one lease, and a request is
never sent that the file does not already count. A clean stop writes the exact counts into the reservation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# What one reservation adds above the spend that needed it: a crash wastes at most this much of the plan.
LEASE_MESSAGES: Final = 30
LEASE_POINTS: Final = 1000


@dataclass(frozen=True, slots=True)
class Budget:
    """What a device has spent in the current UTC day and month."""

    day: str
    points_day: int
    month: str
    messages_month: int


@dataclass
class Lease:
    """One device's exact spend (in memory) and the reservation the file holds for it."""

    spent: Budget
    reserved: Budget

    def add(self, day: str, month: str, *, messages: int, points: int) -> Budget:
        """The spend after one more request (a new UTC day or month starts from zero)."""
        points_day = self.spent.points_day if self.spent.day == day else 0
        messages_month = self.spent.messages_month if self.spent.month == month else 0
        return Budget(day, max(0, points_day + points), month, messages_month + messages)

    def covers(self, spent: Budget) -> bool:
        """Whether the reservation in the file already counts `spent`."""
        reserved = self.reserved
        return (
            reserved.day == spent.day
            and reserved.month == spent.month
            and spent.points_day <= reserved.points_day
            and spent.messages_month <= reserved.messages_month
        )

    @staticmethod
    def reservation(spent: Budget) -> Budget:
        """The reservation to commit before a request that `spent` counts."""
        return Budget(spent.day, spent.points_day + LEASE_POINTS, spent.month, spent.messages_month + LEASE_MESSAGES)
