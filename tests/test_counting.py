"""Counting (store/counting.py): a reading's commit leaves the ledger alone, and the file's ledger stays exact.

The buffer's writer runs on a clock the test owns, so "FOLD_EVERY_S later" is a number, not a wait. Every check
reads the ledger as `status` does, from another connection (`queries`), beside the buffer's own answer.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeforward.points import Point
from edgeforward.store import LEDGER_FIELDS, Buffer, DeliveryPath, counting, queries
from edgeforward.store import inbox as inboxes
from edgeforward.store.recovery import recover_file

from .conftest import Ticks, open_buffer

BASE_TS = 1_764_000_000_000
OUTCOMES = ("delivered_live", "delivered_history", "expired", "dropped", "rejected", "downsampled")


@pytest.fixture
async def buf(tmp_path: Path, ticks: Ticks) -> AsyncIterator[Buffer]:
    async with open_buffer(tmp_path / "buffer.db", clock=ticks) as buffer:
        yield buffer


def line(number: int, device: str = "pump") -> list[Point]:
    """One reading of 4 pins."""
    return [Point(device, pin, BASE_TS + number * 1000, number + pin / 10) for pin in range(1, 5)]


def table_ledger(path: Path) -> tuple[int, int]:
    """(received, queued) of the ledger table alone, summed."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT COALESCE(SUM(received), 0), COALESCE(SUM(queued), 0) FROM ledger").fetchone()
    return int(row[0]), int(row[1])


def file_ledger(path: Path) -> dict[str, int]:
    """The ledger as `status` reads it from its own process."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return queries.ledger_total(db)


def stored(path: Path) -> int:
    """Points stored: rows of the points table, and the daemon's inbox's queued points (store/inbox.py)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        inboxed = sum(counts.queued for counts in queries.inbox(db).values())
        return int(db.execute("SELECT COUNT(*) FROM points").fetchone()[0]) + inboxed


def put_in_place(copy: Path, path: Path) -> None:
    """The copy stands for the damaged file: alone, without a WAL."""
    shutil.move(copy, path)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def adds_up(counts: dict[str, int]) -> bool:
    return counts["received"] == counts["queued"] + sum(counts[f] for f in OUTCOMES)


async def test_a_readings_commit_leaves_the_ledger_row_alone_and_every_read_counts_it(
    buf: Buffer, ticks: Ticks
) -> None:
    await buf.submit(line(0))
    ticks.now += counting.FOLD_EVERY_S + 1
    await buf.submit(line(1))  # folds: the ledger table holds both lines
    assert table_ledger(buf.path) == (8, 8)
    for number in range(2, 6):
        await buf.submit(line(number))
    assert table_ledger(buf.path) == (8, 8)  # four commits, none of them wrote the ledger's page
    assert (await buf.ledger("pump"))["received"] == 24 and (await buf.ledger("pump"))["queued"] == 24
    assert file_ledger(buf.path)["received"] == 24 and file_ledger(buf.path)["queued"] == 24
    assert buf.queued_total == 24


async def test_the_tail_is_folded_riding_a_commit_when_due_and_at_a_clean_stop(tmp_path: Path, ticks: Ticks) -> None:
    path = tmp_path / "buffer.db"
    async with open_buffer(path, clock=ticks) as buf:
        await buf.submit(line(0))
        ticks.now += counting.FOLD_EVERY_S / 2
        await buf.submit(line(1))
        assert table_ledger(path) == (0, 0)
        ticks.now += counting.FOLD_EVERY_S / 2 + 1
        await buf.submit(line(2))
        assert table_ledger(path) == (12, 12)
        await buf.submit(line(3))
    assert table_ledger(path) == (16, 16)  # the clean stop folded the rest
    with contextlib.closing(sqlite3.connect(path)) as db:
        mark = db.execute(counting.READ_MARK).fetchone()[0]
    assert mark == 17


async def test_a_full_tail_is_folded_without_waiting(buf: Buffer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(counting, "FOLD_TAIL_MAX_ROWS", 10)
    for number in range(3):
        await buf.submit(line(number))  # 12 readings' points: past the cap at the third commit
    assert table_ledger(buf.path) == (12, 12)


async def test_removing_points_of_the_tail_and_below_it_keeps_the_ledger_exact(buf: Buffer, ticks: Ticks) -> None:
    for number in range(4):
        await buf.submit(line(number))
    ticks.now += counting.FOLD_EVERY_S + 1
    await buf.submit(line(4))  # lines 0-4 counted in the table
    for number in range(5, 8):
        await buf.submit(line(number))  # lines 5-7 in the tail
    points = await buf.oldest("pump", 1, 100)
    assert len(points) == 8
    # Delivered: two counted points and two of the tail; then an expiry across both parts.
    await buf.deliver("pump", [points[0].id, points[1].id, points[6].id, points[7].id], "history")
    assert await buf.expire("pump", BASE_TS + 6000, pin=2) == 6
    counts = await buf.ledger("pump")
    assert counts["received"] == 32 and counts["delivered_history"] == 4 and counts["expired"] == 6
    assert counts["queued"] == 22 == stored(buf.path) and adds_up(counts)
    assert file_ledger(buf.path) == counts


async def test_the_newest_rows_removed_new_ones_reuse_their_ids_and_are_counted_once(buf: Buffer, ticks: Ticks) -> None:
    for number in range(3):
        await buf.submit(line(number))
    ticks.now += counting.FOLD_EVERY_S + 1
    await buf.submit(line(3))  # the mark is past the newest row: 17
    newest = [p.id for pin in range(1, 5) for p in await buf.oldest("pump", pin, 100) if p.ts_ms == BASE_TS + 3000]
    await buf.deliver("pump", newest, "live")  # rows 13-16 go: SQLite hands out 13 again
    await buf.submit(line(4))
    with contextlib.closing(sqlite3.connect(buf.path)) as db:
        assert db.execute("SELECT MAX(id) FROM points").fetchone()[0] == 16
    counts = await buf.ledger("pump")
    assert counts["received"] == 20 and counts["queued"] == 16 == stored(buf.path) and adds_up(counts)


async def test_a_crash_loses_no_count_the_tail_is_read_from_the_file(
    tmp_path: Path, ticks: Ticks, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "buffer.db"

    async def killed(self: Buffer) -> None:  # the process dies before its clean stop
        return None

    monkeypatch.setattr(Buffer, "_close_books", killed)
    async with open_buffer(path, clock=ticks) as buf:
        for number in range(5):
            await buf.submit(line(number))
    assert table_ledger(path) == (0, 0)
    monkeypatch.undo()
    async with open_buffer(path, clock=ticks) as again:
        counts = await again.ledger("pump")
        assert counts["received"] == counts["queued"] == 20 and again.queued_total == 20


async def test_other_processes_requeue_and_held_readings_settled_are_counted_once(buf: Buffer) -> None:
    await buf.submit(line(0))
    await buf.reject("pump", await buf.oldest("pump", 1, 1), "refused")
    with queries.connect(buf.path, readonly=False) as db:  # `deadletter retry` from its own process
        assert queries.requeue_deadletter(db) == 1
    await buf.hold([Point("pump", 9, 5_000, 1.5)], "boot-a")
    assert (await buf.ledger("pump"))["queued"] == 5
    await buf.settle_held("boot-a", BASE_TS, 10_000)
    await buf.submit(line(1))
    counts = await buf.ledger("pump")
    assert counts["received"] == 9 and counts["queued"] == 9 == stored(buf.path) and counts["rejected"] == 0
    assert file_ledger(buf.path) == counts


async def test_recovery_counts_the_tail_of_the_damaged_file(tmp_path: Path, ticks: Ticks) -> None:
    path = tmp_path / "buffer.db"
    async with open_buffer(path, clock=ticks) as buf:
        for number in range(3):
            await buf.submit(line(number))
        ticks.now += counting.FOLD_EVERY_S + 1
        await buf.submit(line(3))
        await buf.deliver("pump", [p.id for p in await buf.oldest("pump", 1, 2)], "history")
        for number in range(4, 6):
            await buf.submit(line(number))  # in the tail at the copy below
        damaged = tmp_path / "copy.db"
        with contextlib.closing(sqlite3.connect(path)) as db, contextlib.closing(sqlite3.connect(damaged)) as dst:
            db.backup(dst)
        before = file_ledger(path)
    put_in_place(damaged, path)
    recover_file(path, "test: salvage a file with a tail")
    after = file_ledger(path)
    assert after == before and after["queued"] == 22 == stored(path)
    assert table_ledger(path) == (before["received"], before["queued"])  # counted in the table now


@pytest.mark.parametrize("inbox", [False, True], ids=["sqlite", "inbox"])
@pytest.mark.parametrize("seed", range(4))
async def test_any_sequence_of_writes_keeps_the_file_ledger_exact(
    tmp_path: Path, ticks: Ticks, seed: int, inbox: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random readings, deliveries of any points, expiries, rejections, requeues and folds: at every step the
    ledger the buffer and `status` read is the one a model keeps, and queued is the rows stored. With the
    daemon's inbox (store/inbox.py) the rare paths fold it into SQLite, and small settles carry it over."""
    monkeypatch.setattr(counting, "FOLD_TAIL_MAX_ROWS", 30)
    monkeypatch.setattr(inboxes, "COMPACT_BYTES", 600)
    rng = random.Random(seed)
    model = dict.fromkeys(LEDGER_FIELDS, 0)
    async with open_buffer(tmp_path / "buffer.db", clock=ticks, inbox=inbox, exclusive=inbox) as buf:
        for step in range(120):
            action = rng.choice(("line", "line", "line", "deliver", "deliver", "expire", "reject", "requeue", "time"))
            queued = [p for pin in range(1, 5) for p in await buf.oldest("pump", pin, 1000)]
            if action == "line":
                await buf.submit(line(step))
                model["received"] += 4
                model["queued"] += 4
            elif action == "deliver" and queued:
                chosen = rng.sample(queued, rng.randint(1, len(queued)))
                path: DeliveryPath = rng.choice(("live", "history"))
                await buf.deliver("pump", [p.id for p in chosen], path)
                model[f"delivered_{path}"] += len(chosen)
                model["queued"] -= len(chosen)
            elif action == "expire" and queued:
                cut = rng.choice(queued).ts_ms
                count = await buf.expire("pump", cut, pin=1)
                assert count == sum(1 for p in queued if p.pin == 1 and p.ts_ms < cut)
                model["expired"] += count
                model["queued"] -= count
            elif action == "reject" and queued:
                chosen = rng.sample(queued, 1)
                await buf.reject("pump", chosen, "refused")
                model["rejected"] += 1
                model["queued"] -= 1
            elif action == "requeue":
                with queries.connect(buf.path, readonly=False) as db:
                    count = queries.requeue_deadletter(db)
                model["rejected"] -= count
                model["queued"] += count
            elif action == "time":
                ticks.now += counting.FOLD_EVERY_S + 1
            assert await buf.ledger("pump") == model, (step, action)
            assert file_ledger(buf.path) == model and stored(buf.path) == model["queued"]
    assert table_ledger(tmp_path / "buffer.db") == (model["received"], model["queued"])
