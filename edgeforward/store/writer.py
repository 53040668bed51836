"""The group-commit writer's vocabulary: typed write ops, what a commit carries, and how a failed one is retried."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiosqlite

from ..points import Point

GROUP_COMMIT_MAX_ITEMS: Final = 20_000
# A commit that failed for a reason other than a full disk (SQLITE_BUSY past the busy timeout, an I/O error)
# is tried again this often before its readings are given up and counted `ingest_failed`.
COMMIT_ATTEMPTS: Final = 3
RETRY_INITIAL_S: Final = 0.1
RETRY_MAX_S: Final = 5.0
# How often an idle writer looks whether another process (import, deadletter retry) changed the file.
EXTERNAL_CHECK_S: Final = 1.0
COMMIT_ERRORS_LOGGED_PER_MINUTE: Final = 5
# How long each kind of write may wait for a commit that would happen anyway (every commit carries everything
# pending, so a write that waits rides along instead of paying an fdatasync of its own; an SD card wears by the
# commit, not by the byte). Readings wait the ingest window (`commit_interval_ms`), budgets not at all.
# Point lifecycle: the forwarder waits for it, so it never waits out a long ingest window (history would stall).
LIFECYCLE_WAIT_MAX_S: Final = 0.05
# A delivery nobody waits for (Buffer.deliver_later): it rides the next reading's commit at 1 line/s; a read of
# queued points or the next request's budget commits it at once, so it never holds anything up.
DELIVERY_WAIT_S: Final = 2.0
# Facts (device state, port snapshot, status fields): only the latest value matters and nobody waits for them;
# at 1 line/s they ride the next reading's commit.
FACT_WAIT_S: Final = 2.0

WriteFn = Callable[[aiosqlite.Connection], Awaitable[Any]]


class OpKind(enum.Enum):
    """What a write is, which decides when it commits and what a failure to commit does to it."""

    # Committed with the next group commit; a failure is raised to the caller (a StoreError).
    CHANGE = "change"
    # Point lifecycle after the cloud answered (deliver, expire, reject, thin, settle): retried until it
    # commits, the caller waiting; what it deletes frees space, so a full disk must not lose it.
    LIFECYCLE = "lifecycle"
    # A delivery the forwarder does not wait for: like LIFECYCLE, retried until it commits, but it waits for a
    # commit that would happen anyway, up to DELIVERY_WAIT_S.
    DELIVERY = "delivery"
    # A budget counted before a request: committed at once with everything queued before it (so a delivery
    # never trails the next request); a failure is raised and the request is not sent.
    BUDGET = "budget"
    # A fact that only its latest value matters for (device state, port snapshot, meta, server): the caller
    # never waits for it (it returns once queued); it rides a later commit within FACT_WAIT_S, and one that
    # failed is kept, by key, and written with a later commit.
    FACT = "fact"


# The kinds a failed commit keeps and writes again until they commit (they free space: a full disk must not lose them).
RETRIED: Final = frozenset({OpKind.LIFECYCLE, OpKind.DELIVERY})


def wait_s(kind: OpKind, commit_interval_s: float) -> float:
    """How long a write of this kind may wait for the next commit."""
    if kind is OpKind.BUDGET:
        return 0.0
    if kind is OpKind.LIFECYCLE:
        return min(commit_interval_s, LIFECYCLE_WAIT_MAX_S)
    if kind is OpKind.DELIVERY:
        return max(commit_interval_s, DELIVERY_WAIT_S)
    if kind is OpKind.FACT:
        return max(commit_interval_s, FACT_WAIT_S)
    return commit_interval_s


@dataclass(eq=False)
class Op:
    """One write of the group commit."""

    fn: WriteFn
    future: asyncio.Future[Any]
    kind: OpKind = OpKind.CHANGE
    key: Hashable = None


ResendKey = tuple[str, int, int | None, int | None]
"""A reading's identity in the resend window: (port, seq, ms or None, ts or None)."""


@dataclass
class Pending:
    """What the next transaction carries, in the order it was asked for."""

    # Each submit: its boot id (None: a wall-clock point), its points, the future its caller waits on, and the
    # reading's key in the resend window (None: not one an MCU may resend).
    submits: list[tuple[str | None, Sequence[Point], asyncio.Future[None], ResendKey | None]] = field(
        default_factory=list
    )
    ops: list[Op] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.submits or self.ops)

    @property
    def points(self) -> list[Point]:
        """The sendable points, in order."""
        return [point for boot_id, points, _, _ in self.submits if boot_id is None for point in points]

    @property
    def held(self) -> list[tuple[str, Point]]:
        """The points held for a trusted clock, with their boot id."""
        return [(boot_id, point) for boot_id, points, _, _ in self.submits if boot_id is not None for point in points]

    @property
    def readings(self) -> list[Point]:
        """Every point this commit would add, sendable and held."""
        return [point for _, points, _, _ in self.submits for point in points]

    @property
    def waiters(self) -> list[asyncio.Future[None]]:
        """The futures of the submits."""
        return [future for _, _, future, _ in self.submits]

    @property
    def resend(self) -> list[ResendKey]:
        """The resend-window keys of the readings this commit adds."""
        return [key for _, _, _, key in self.submits if key is not None]

    def split(self, max_readings: int) -> Pending:
        """Keep at most about `max_readings` readings (whole submits, the ops with them); return the rest."""
        count = 0
        for index, (_, points, _, _) in enumerate(self.submits):
            count += len(points)
            if count >= max_readings and index + 1 < len(self.submits):
                rest = Pending(self.submits[index + 1 :], [])
                del self.submits[index + 1 :]
                return rest
        return Pending()


class Retry:
    """Ops whose commit failed and must be written later, with a capped backoff between attempts."""

    def __init__(self) -> None:
        self.lifecycle: list[Op] = []
        self.facts: dict[Hashable, Op] = {}
        self._delay_s = RETRY_INITIAL_S
        self.due_s = 0.0

    def __bool__(self) -> bool:
        return bool(self.lifecycle or self.facts)

    def keep(self, ops: list[Op], now_s: float) -> None:
        """Keep the lifecycle ops and facts of a failed commit; schedule the next attempt."""
        for op in ops:
            if op.kind in RETRIED:
                self.lifecycle.append(op)
            elif op.kind is OpKind.FACT:
                self.facts[op.key if op.key is not None else id(op)] = op
        self.due_s = now_s + self._delay_s
        self._delay_s = min(RETRY_MAX_S, self._delay_s * 2)

    def take(self, pending_facts: set[Hashable]) -> list[Op]:
        """Return the kept ops to try again (facts a newer write replaces are dropped)."""
        ops = [op for key, op in self.facts.items() if key not in pending_facts] + self.lifecycle
        self.facts, self.lifecycle = {}, []
        return ops

    def succeeded(self) -> None:
        """A commit went through: the next failure starts the backoff afresh."""
        self._delay_s = RETRY_INITIAL_S
