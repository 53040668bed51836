"""The SQLite buffer: group commit, ledger, cap, budgets, state, on real files."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeforward.points import Point
from edgeforward.store import META_INGEST_FAILED, SCHEMA_VERSION, Buffer, Committed, IngestFailedError, schema
from edgeforward.store.schema import SCHEMA as _SCHEMA

from .conftest import open_buffer

BASE_TS = 1_764_000_000_000


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    async with open_buffer(tmp_path / "buffer.db", max_points=1000) as buf:
        yield buf


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
    async with open_buffer(tmp_path / "b.db", max_points=10, full_policy="drop_oldest") as buf:
        await buf.submit(points("pump", 1, 8))
        await buf.submit(points("pump", 1, 5, start=100))
        counts = await buf.ledger("pump")
        assert counts["queued"] == 10 and counts["dropped"] == 3 and ledger_adds_up(counts)
        oldest = await buf.oldest("pump", 1, 1)
        assert oldest[0].ts_ms == BASE_TS + 3


async def test_cap_drop_newest(tmp_path: Path) -> None:
    async with open_buffer(tmp_path / "b.db", max_points=10, full_policy="drop_newest") as buf:
        await buf.submit(points("pump", 1, 8))
        await buf.submit(points("pump", 1, 5, start=100))
        counts = await buf.ledger("pump")
        assert counts["queued"] == 10 and counts["dropped"] == 3 and ledger_adds_up(counts)
        newest = await buf.newest("pump", 1)
        assert newest is not None and newest.ts_ms == BASE_TS + 101


async def test_budget_spend_and_rollover(buffer: Buffer) -> None:
    day1 = 1_764_000_000.0
    spent = await buffer.spend("pump", day1, points=100)
    spent = await buffer.spend("pump", day1 + 10, points=50)
    assert spent.points_day == 150 and spent.messages_month == 2
    next_day = await buffer.budget("pump", day1 + 86_400)
    assert next_day.points_day == 0 and next_day.messages_month == 2


async def test_state_server_and_ports_persist(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with open_buffer(path) as buf:
        await buf.set_device_state("pump", "parked", "Invalid token.")
        await buf.remember_server("secret-token", "https://fra1.blynk.cloud")
        await buf.save_ports([("/dev/ttyACM0", "open", 5, 1, 0, 2, "{}")])
    again = Buffer(path)
    await again.open()
    assert await again.remembered_server("secret-token") == "https://fra1.blynk.cloud"
    assert await again.remembered_server("other") is None
    await again.close()
    raw = path.read_bytes()
    assert b"secret-token" not in raw
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT state, reason FROM device_state").fetchone() == ("parked", "Invalid token.")
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_pending_points_committed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with open_buffer(path, commit_interval_ms=1000) as buf:
        future = buf.submit(points("pump", 1, 3))
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


async def file_pages(buf: Buffer) -> int:
    with sqlite3.connect(buf.path) as db:
        return int(db.execute("PRAGMA page_count").fetchone()[0])


def page_size(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA page_size").fetchone()[0])


async def test_disk_full_never_crashes_and_ingest_resumes(buffer: Buffer) -> None:
    await buffer.submit(points("pump", 1, 200))
    await buffer.set_page_limit(await file_pages(buffer))
    big = [Point("pump", 1, BASE_TS + i, "x" * 200) for i in range(2000)]
    with pytest.raises(IngestFailedError):
        await buffer.submit(big)
    counts = await buffer.ledger("pump")
    assert counts["received"] == 200 and ledger_adds_up(counts)
    assert buffer.ingest_failed == {"pump": 2000}
    # Forwarding goes on while the disk is full, and frees space.
    delivered = await buffer.deliver("pump", [p.id for p in await buffer.oldest("pump", 1, 100)], "history")
    assert delivered == 100
    await buffer.set_page_limit(1_000_000)
    await buffer.submit(points("pump", 1, 10, start=500))
    counts = await buffer.ledger("pump")
    assert counts["received"] == 210 and counts["queued"] == 110 and ledger_adds_up(counts)
    with sqlite3.connect(buffer.path) as db:
        stored = db.execute("SELECT value FROM meta WHERE key = ?", (META_INGEST_FAILED,)).fetchone()[0]
    assert json.loads(stored) == {"pump": 2000}


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_byte_cap_really_caps(tmp_path: Path, policy: str) -> None:
    cap = 256 * 1024
    async with open_buffer(tmp_path / "b.db", max_bytes=cap, full_policy=policy) as buf:
        for batch in range(30):
            await buf.submit([Point("pump", 1, BASE_TS + batch * 1000 + i, float(i)) for i in range(1000)])
        counts = await buf.ledger("pump")
        assert counts["received"] == 30_000 and counts["dropped"] > 0 and counts["queued"] > 0
        assert ledger_adds_up(counts)
        assert await file_pages(buf) * page_size(buf.path) <= cap
        oldest = (await buf.oldest("pump", 1, 1))[0].ts_ms
        newest = await buf.newest("pump", 1)
        assert newest is not None
        if policy == "drop_oldest":
            assert newest.ts_ms == BASE_TS + 29 * 1000 + 999 and oldest > BASE_TS
        else:
            assert oldest == BASE_TS and newest.ts_ms < BASE_TS + 29 * 1000
    assert (tmp_path / "b.db").stat().st_size <= cap


async def test_file_shrinks_after_a_backlog_drains(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with open_buffer(path) as buf:
        for batch in range(10):
            await buf.submit([Point("pump", 1, BASE_TS + batch * 10_000 + i, float(i)) for i in range(10_000)])
        full = await file_pages(buf)
        while batch_ := await buf.oldest("pump", 1, 5000):
            await buf.deliver("pump", [p.id for p in batch_], "history")
        await buf.submit(points("pump", 1, 1))
    assert path.stat().st_size < full * page_size(path) // 4
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


async def test_version_1_file_is_migrated_to_incremental_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA + "; PRAGMA user_version = 1;")
        db.execute("DELETE FROM meta")  # a version 1 file has no counting mark (store/counting.py)
        db.execute("INSERT INTO devices (id, name) VALUES (1, 'pump')")
        db.execute("INSERT INTO ledger (device_id, received, queued) VALUES (1, 1, 1)")
        db.execute("INSERT INTO points (device_id, pin, ts, value) VALUES (1, 1, 5, '1.0')")
    buf = Buffer(path)
    await buf.open()
    assert buf.recovery is None and (await buf.ledger("pump"))["queued"] == 1
    await buf.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


# the resend window (schema version 5) -------------------------------------------------------------------------


async def test_resend_window_is_written_with_the_points_and_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "RESEND_WINDOW_PER_PORT", 3)
    async with open_buffer(tmp_path / "b.db") as buf:
        for seq in range(1, 6):
            await buf.submit(points("pump", 1, 1, start=seq), resend=("/dev/ttyACM0", seq, seq * 1000, BASE_TS + seq))
        await buf.submit(points("pump", 1, 1, start=9), resend=("/dev/ttyUSB0", 1, None, BASE_TS))
        assert await buf.resend_window("/dev/ttyACM0") == [(s, s * 1000, BASE_TS + s) for s in (3, 4, 5)]
        assert await buf.resend_window("/dev/ttyUSB0") == [(1, None, BASE_TS)]
        # A reading the disk could not take is not remembered: its next copy must be stored.
        await buf.set_page_limit(await file_pages(buf))
        big = [Point("pump", 1, BASE_TS + i, "x" * 200) for i in range(2000)]
        with pytest.raises(IngestFailedError):
            await buf.submit(big, resend=("/dev/ttyACM0", 6, 6000, BASE_TS + 6))
        await buf.set_page_limit(1_000_000)
        assert [row[0] for row in await buf.resend_window("/dev/ttyACM0")] == [3, 4, 5]


# deliveries that ride later commits --------------------------------------------------------------------------


async def test_a_later_delivery_commits_before_any_read_and_before_the_next_budget(buffer: Buffer) -> None:
    await buffer.submit(points("pump", 1, 1) + points("pump", 2, 1))
    batch = await buffer.oldest("pump", 1, 10)
    commits = buffer.commits
    future = buffer.deliver_later("pump", [p.id for p in batch], "history")
    assert not future.done()  # returned at once: it rides a later commit
    assert await buffer.oldest("pump", 1, 10) == []  # the read committed it first
    assert await future == 1 and buffer.commits == commits + 1
    assert (await buffer.ledger("pump"))["delivered_history"] == 1

    batch = await buffer.oldest("pump", 2, 10)
    buffer.deliver_later("pump", [p.id for p in batch], "history")
    await buffer.spend("pump", BASE_TS / 1000, messages=1, points=1)  # the next request commits the delivery
    with sqlite3.connect(buffer.path) as db:
        assert db.execute("SELECT COUNT(*) FROM points WHERE pin = 2").fetchone() == (0,)


async def test_a_later_delivery_of_an_unknown_device_is_nothing(buffer: Buffer) -> None:
    assert await buffer.deliver_later("nobody", [1, 2], "live") == 0
