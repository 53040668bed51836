"""The SQLite buffer: group commit, ledger, cap, budgets, state, on real files."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeforward.buffer import Buffer, Committed
from edgeforward.points import Point

BASE_TS = 1_764_000_000_000


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    buf = Buffer(tmp_path / "buffer.db", max_points=1000)
    await buf.open()
    writer = asyncio.create_task(buf.run_writer())
    yield buf
    buf.stop_writer()
    await writer
    await buf.close()


def points(device: str, pin: int, count: int, start: int = 0) -> list[Point]:
    return [Point(device, pin, BASE_TS + i, float(i)) for i in range(start, start + count)]


def ledger_adds_up(counts: dict[str, int]) -> bool:
    out = sum(counts[k] for k in counts if k != "received")
    return counts["received"] == out


async def test_submit_commits_and_counts(buffer: Buffer) -> None:
    seen: list[Committed] = []
    buffer.add_listener(seen.extend)
    await asyncio.gather(buffer.submit(points("pump", 1, 3)), buffer.submit(points("pump", 2, 2)))
    counts = await buffer.ledger("pump")
    assert counts["received"] == 5 and counts["queued"] == 5
    assert ledger_adds_up(counts)
    assert {c.device for c in seen} == {"pump"}
    assert set().union(*(c.pins for c in seen)) == {1, 2}
    assert await buffer.pins_queued("pump") == [1, 2]


async def test_group_commit_batches_many_submits(buffer: Buffer) -> None:
    futures = [buffer.submit(points("pump", 1, 1, start=i)) for i in range(200)]
    await asyncio.gather(*futures)
    assert buffer.commits < 20
    assert (await buffer.ledger("pump"))["received"] == 200


async def test_oldest_first_and_deliver(buffer: Buffer) -> None:
    await buffer.submit([Point("pump", 1, BASE_TS + 5, 5.0), Point("pump", 1, BASE_TS + 1, 1.0)])
    batch = await buffer.oldest("pump", 1, 10)
    assert [p.ts_ms for p in batch] == [BASE_TS + 1, BASE_TS + 5]
    assert [p.value_json for p in batch] == ["1.0", "5.0"]
    newest = await buffer.newest("pump", 1)
    assert newest is not None and newest.ts_ms == BASE_TS + 5
    assert await buffer.deliver("pump", [batch[0].id], "history") == 1
    counts = await buffer.ledger("pump")
    assert counts["delivered_history"] == 1 and counts["queued"] == 1
    assert ledger_adds_up(counts)
    assert await buffer.oldest_ts("pump") == BASE_TS + 5


async def test_deliver_twice_counts_once(buffer: Buffer) -> None:
    await buffer.submit(points("pump", 1, 2))
    ids = [p.id for p in await buffer.oldest("pump", 1, 10)]
    assert await buffer.deliver("pump", ids, "live") == 2
    assert await buffer.deliver("pump", ids, "live") == 0
    counts = await buffer.ledger("pump")
    assert counts["delivered_live"] == 2 and counts["queued"] == 0 and ledger_adds_up(counts)


async def test_max_id_horizon(buffer: Buffer) -> None:
    await buffer.submit(points("pump", 1, 2))
    horizon = await buffer.max_id()
    await buffer.submit(points("pump", 1, 2, start=10))
    assert len(await buffer.oldest("pump", 1, 10, max_id=horizon)) == 2
    assert len(await buffer.oldest("pump", 1, 10)) == 4


async def test_expire_and_reject(buffer: Buffer) -> None:
    await buffer.submit(points("pump", 1, 10))
    assert await buffer.expire("pump", BASE_TS + 4, pin=1) == 4
    batch = await buffer.oldest("pump", 1, 2)
    assert await buffer.reject("pump", batch, "Value doesn't match the Datastream data type") == 2
    counts = await buffer.ledger("pump")
    assert counts == {**counts, "expired": 4, "rejected": 2, "queued": 4, "received": 10}
    assert ledger_adds_up(counts)


async def test_cap_drop_oldest(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.db", max_points=10, full_policy="drop_oldest")
    await buf.open()
    writer = asyncio.create_task(buf.run_writer())
    await buf.submit(points("pump", 1, 8))
    await buf.submit(points("pump", 1, 5, start=100))
    counts = await buf.ledger("pump")
    assert counts["queued"] == 10 and counts["dropped"] == 3 and ledger_adds_up(counts)
    oldest = await buf.oldest("pump", 1, 1)
    assert oldest[0].ts_ms == BASE_TS + 3
    buf.stop_writer()
    await writer
    await buf.close()


async def test_cap_drop_newest(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.db", max_points=10, full_policy="drop_newest")
    await buf.open()
    writer = asyncio.create_task(buf.run_writer())
    await buf.submit(points("pump", 1, 8))
    await buf.submit(points("pump", 1, 5, start=100))
    counts = await buf.ledger("pump")
    assert counts["queued"] == 10 and counts["dropped"] == 3 and ledger_adds_up(counts)
    newest = await buf.newest("pump", 1)
    assert newest is not None and newest.ts_ms == BASE_TS + 101
    buf.stop_writer()
    await writer
    await buf.close()


async def test_budget_spend_and_rollover(buffer: Buffer) -> None:
    day1 = 1_764_000_000.0
    spent = await buffer.spend("pump", day1, points=100)
    spent = await buffer.spend("pump", day1 + 10, points=50)
    assert spent.points_day == 150 and spent.messages_month == 2
    next_day = await buffer.budget("pump", day1 + 86_400)
    assert next_day.points_day == 0 and next_day.messages_month == 2


async def test_state_server_and_ports_persist(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    buf = Buffer(path)
    await buf.open()
    writer = asyncio.create_task(buf.run_writer())
    await buf.set_device_state("pump", "parked", "Invalid token.")
    await buf.remember_server("secret-token", "https://fra1.blynk.cloud")
    await buf.save_ports([("/dev/ttyACM0", "open", 5, 1, 0, 2, "{}")])
    buf.stop_writer()
    await writer
    await buf.close()
    again = Buffer(path)
    await again.open()
    assert await again.remembered_server("secret-token") == "https://fra1.blynk.cloud"
    assert await again.remembered_server("other") is None
    await again.close()
    raw = path.read_bytes()
    assert b"secret-token" not in raw
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT state, reason FROM device_state").fetchone() == ("parked", "Invalid token.")
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_pending_points_committed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    buf = Buffer(path, commit_interval_ms=1000)
    await buf.open()
    writer = asyncio.create_task(buf.run_writer())
    future = buf.submit(points("pump", 1, 3))
    buf.stop_writer()
    await writer
    await buf.close()
    assert future.done() and future.exception() is None
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM points").fetchone()[0] == 3


async def test_values_keep_their_types(buffer: Buffer) -> None:
    await buffer.submit(
        [
            Point("pump", 1, BASE_TS, 17),
            Point("pump", 2, BASE_TS, 17.0),
            Point("pump", 3, BASE_TS, "door open"),
            Point("pump", 4, BASE_TS, True),
            Point("pump", 5, BASE_TS, (24.1, 56.9)),
        ]
    )
    stored = {pin: (await buffer.oldest("pump", pin, 1))[0].value_json for pin in range(1, 6)}
    assert stored == {1: "17", 2: "17.0", 3: '"door open"', 4: "true", 5: "[24.1,56.9]"}
