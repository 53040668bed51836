"""Budget leases (store/lease.py): a request is counted in the file before it is sent, without a commit each."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from edgeforward.store import Buffer, lease

from .conftest import open_buffer

NOW_S = 1_796_000_000.0  # a wall time for budget keys (any: leases do not depend on the date)


def rows(path: Path, query: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.execute(query).fetchall())


def budget_row(path: Path) -> tuple[object, ...]:
    return rows(
        path,
        "SELECT points_day, messages_month, points_day_reserved, messages_month_reserved FROM budget",
    )[0]


async def test_a_lease_counts_requests_without_a_commit_each_and_a_clean_stop_makes_it_exact(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    async with open_buffer(path) as buf:
        await buf.device_id("pump")
        first = await buf.spend("pump", NOW_S, messages=1, points=10)
        assert (first.points_day, first.messages_month) == (10, 1)
        assert budget_row(path) == (10, 1, 10 + lease.LEASE_POINTS, 1 + lease.LEASE_MESSAGES)
        commits = buf.commits
        for _ in range(5):
            spent = await buf.spend("pump", NOW_S, messages=1, points=10)
        assert (spent.points_day, spent.messages_month) == (60, 6)
        assert buf.commits == commits  # covered by the lease: the exact count rides a later commit
        assert (await buf.budget("pump", NOW_S)).points_day == 60
        refunded = await buf.spend("pump", NOW_S, messages=0, points=-10)
        assert refunded.points_day == 50
    assert budget_row(path) == (50, 6, 50, 6)


async def test_after_a_crash_the_reservation_counts_as_spent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "buffer.db"
    monkeypatch.setattr(Buffer, "_close_books", _no_release)  # the process dies before its clean stop
    async with open_buffer(path) as buf:
        await buf.device_id("pump")
        for _ in range(3):
            await buf.spend("pump", NOW_S, messages=1, points=100)
    monkeypatch.undo()
    async with open_buffer(path) as again:
        after = await again.budget("pump", NOW_S)
    # Never less than what was sent (300 points, 3 messages): the unused part of one lease is lost, no more.
    assert after.points_day == 100 + lease.LEASE_POINTS and after.messages_month == 1 + lease.LEASE_MESSAGES


async def test_a_spend_past_the_lease_reserves_again_and_a_new_day_starts_from_zero(tmp_path: Path) -> None:
    async with open_buffer(tmp_path / "buffer.db") as buf:
        await buf.device_id("pump")
        await buf.spend("pump", NOW_S, messages=1, points=10)
        commits = buf.commits
        await buf.spend("pump", NOW_S, messages=1, points=lease.LEASE_POINTS + 1)
        assert buf.commits == commits + 1  # past the reservation: committed before the request
        tomorrow = await buf.spend("pump", NOW_S + 86_400, messages=1, points=5)
        assert tomorrow.points_day == 5


async def _no_release(self: Buffer) -> None:
    return None
