"""Filing (store/filing.py), budget leases (store/lease.py) and deliveries that ride later commits, on real files.

The buffer's writer runs on a clock the test owns (`Buffer(clock=...)`), so "FILE_AFTER_S later" is a number,
not a wait.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeforward.points import Point
from edgeforward.store import Buffer, filing, lease, queries

from .conftest import open_buffer

BASE_TS = 1_764_000_000_000
NOW_S = 1_796_000_000.0  # a wall time for budget keys (any: leases do not depend on the date)


class Ticks:
    """The buffer's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


@pytest.fixture
async def buf(tmp_path: Path, ticks: Ticks) -> AsyncIterator[Buffer]:
    async with open_buffer(tmp_path / "buffer.db", clock=ticks) as buffer:
        yield buffer


def rows(path: Path, query: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.execute(query).fetchall())


def line(number: int) -> list[Point]:
    """One reading of 4 pins."""
    return [Point("pump", pin, BASE_TS + number * 1000, number + pin / 10) for pin in range(1, 5)]


async def reads(buffer: Buffer) -> tuple[object, ...]:
    """Everything the forwarder and `status` read of the queue."""
    with contextlib.closing(sqlite3.connect(buffer.path)) as db:
        device_id = db.execute("SELECT id FROM devices WHERE name = 'pump'").fetchone()[0]
        status_oldest = queries.oldest_ts(db, device_id)
    return (
        await buffer.pins_queued("pump"),
        [(p.id, p.ts_ms) for p in await buffer.oldest("pump", 2, 7)],
        [(p.id, p.ts_ms) for p in await buffer.oldest("pump", 2, 100, after=(BASE_TS + 3000, 0))],
        await buffer.newest("pump", 3),
        await buffer.count_queued("pump", 1),
        await buffer.count_queued("pump", 1, before_ts=BASE_TS + 5000),
        await buffer.oldest_ts("pump"),
        status_oldest,
    )


async def test_readings_skip_the_index_until_they_wait_long_enough_and_reads_are_the_same(
    buf: Buffer, ticks: Ticks
) -> None:
    for number in range(10):
        await buf.submit(line(number))
    assert rows(buf.path, "SELECT filed, COUNT(*) FROM points GROUP BY filed") == [(0, 40)]
    unfiled = await reads(buf)
    assert unfiled[0] == [1, 2, 3, 4] and unfiled[4] == 10 and unfiled[5] == 5 and unfiled[6] == BASE_TS

    ticks.now += filing.FILE_AFTER_S + 1
    await buf.submit(line(10))  # the commit that files what waited long enough
    assert rows(buf.path, "SELECT filed, COUNT(*) FROM points GROUP BY filed") == [(0, 4), (1, 40)]
    assert rows(buf.path, "SELECT value FROM meta WHERE key = 'filed_below'") == [("41",)]
    newest = await buf.newest("pump", 3)
    assert newest is not None and newest.ts_ms == BASE_TS + 10_000
    for pin in range(1, 5):
        fresh = await buf.oldest("pump", pin, 100)
        await buf.deliver("pump", [p.id for p in fresh if p.ts_ms == BASE_TS + 10_000], "live")
    assert await reads(buf) == unfiled  # the same answers, now from the index


async def test_a_table_emptied_numbers_new_rows_from_one_again_and_they_stay_visible(buf: Buffer, ticks: Ticks) -> None:
    for number in range(5):
        await buf.submit(line(number))
    ticks.now += filing.FILE_AFTER_S + 1
    await buf.submit(line(5))
    for pin in range(1, 5):
        await buf.deliver("pump", [p.id for p in await buf.oldest("pump", pin, 100)], "history")
    assert rows(buf.path, "SELECT COUNT(*) FROM points") == [(0,)]
    await buf.submit(line(6))  # SQLite hands out rowid 1 again, below the mark
    assert rows(buf.path, "SELECT MIN(id), MAX(id), MAX(filed) FROM points") == [(1, 4, 0)]
    assert await buf.pins_queued("pump") == [1, 2, 3, 4]
    assert [p.ts_ms for p in await buf.oldest("pump", 1, 10)] == [BASE_TS + 6000]


async def test_a_long_unfiled_range_is_filed_without_waiting(
    buf: Buffer, ticks: Ticks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filing, "FILE_TAIL_MAX_IDS", 20)
    for number in range(6):
        await buf.submit(line(number))  # 24 row ids: more than the cap
    filed = rows(buf.path, "SELECT COUNT(*) FROM points WHERE filed = 1")[0][0]
    assert isinstance(filed, int) and filed >= 10
    assert await buf.count_queued("pump", 1) == 6


async def test_filing_mark_of_a_foreign_value_means_nothing_is_known_filed() -> None:
    assert filing.mark_of(None) == 0 and filing.mark_of("x") == 0 and filing.mark_of("-3") == 0
    assert filing.mark_of("42") == 42


# deliveries that ride later commits --------------------------------------------------------------------------


async def test_a_later_delivery_commits_before_any_read_and_before_the_next_budget(buf: Buffer) -> None:
    await buf.submit(line(0))
    batch = await buf.oldest("pump", 1, 10)
    commits = buf.commits
    future = buf.deliver_later("pump", [p.id for p in batch], "history")
    assert not future.done()  # returned at once: it rides a later commit
    assert await buf.oldest("pump", 1, 10) == []  # the read committed it first
    assert await future == 1 and buf.commits == commits + 1
    assert (await buf.ledger("pump"))["delivered_history"] == 1

    batch = await buf.oldest("pump", 2, 10)
    buf.deliver_later("pump", [p.id for p in batch], "history")
    await buf.spend("pump", NOW_S, messages=1, points=1)  # the next request: its budget commits the delivery
    assert rows(buf.path, "SELECT COUNT(*) FROM points WHERE pin = 2") == [(0,)]


async def test_a_later_delivery_of_an_unknown_device_is_nothing(buf: Buffer) -> None:
    assert await buf.deliver_later("nobody", [1, 2], "live") == 0


# budget leases ---------------------------------------------------------------------------------------------


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
    monkeypatch.setattr(Buffer, "_release_leases", _no_release)  # the process dies before its clean stop
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
