"""Filing (store/filing.py): readings out of the pin index until they wait, and reads that take both parts.

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
from edgeforward.store import Buffer, filing, queries

from .conftest import Ticks, open_buffer

BASE_TS = 1_764_000_000_000


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


async def test_pins_and_the_oldest_point_are_read_in_one_statement_over_both_parts(buf: Buffer, ticks: Ticks) -> None:
    # Filed: pins 1 and 7 of pump (pin 7 the oldest), a pin of another device; unfiled: pins 1, 3 and 200.
    await buf.submit([Point("pump", 7, BASE_TS - 5000, 1.0), Point("pump", 1, BASE_TS, 2.0)])
    await buf.submit([Point("tank", 9, BASE_TS - 9000, 3.0)])
    ticks.now += filing.FILE_AFTER_S + 1
    await buf.submit([Point("pump", 3, BASE_TS + 1000, 4.0), Point("pump", 200, BASE_TS - 1000, 5.0)])
    await buf.submit([Point("pump", 1, BASE_TS - 2000, 6.0)])
    assert rows(buf.path, "SELECT pin, filed FROM points ORDER BY id") == [
        (7, 1),
        (1, 1),
        (9, 1),
        (3, 0),
        (200, 0),
        (1, 0),
    ]
    brute = rows(buf.path, "SELECT DISTINCT pin FROM points WHERE device_id = 1 ORDER BY pin")
    assert await buf.pins_queued("pump") == [int(str(pin)) for (pin,) in brute] == [1, 3, 7, 200]
    assert await buf.pins_queued("tank") == [9]
    assert (await reads(buf))[6:] == (BASE_TS - 5000, BASE_TS - 5000)
    oldest_filed = await buf.oldest("pump", 7, 1)
    await buf.deliver("pump", [p.id for p in oldest_filed], "history")  # the oldest is now an unfiled one
    assert await buf.pins_queued("pump") == [1, 3, 200]
    assert (await reads(buf))[6:] == (BASE_TS - 2000, BASE_TS - 2000)
    assert await buf.oldest_ts("nobody") is None
