"""The inbox (store/inbox.py): the daemon's readings in an append-only file, settled into SQLite, on real files."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeforward.points import Point
from edgeforward.store import Buffer, IngestFailedError, queries, schema
from edgeforward.store import inbox as inboxes
from edgeforward.store.inbox import ID_BASE, InboxFile, InboxPoint, Record

from .conftest import Ticks, fill, open_buffer

BASE_TS = 1_764_000_000_000
KILL_ROUNDS = 20
CHILD_START_TIMEOUT_S = 30.0


def line(number: int, pins: int = 4) -> list[Point]:
    return [Point("pump", pin, BASE_TS + number * 1000, float(number) + pin / 10) for pin in range(1, pins + 1)]


@contextlib.asynccontextmanager
async def daemon_buffer(path: Path, **kwargs: object) -> AsyncIterator[Buffer]:
    """A buffer as the daemon opens it: locked, with its inbox."""
    async with open_buffer(path, exclusive=True, inbox=True, **kwargs) as buf:
        yield buf


async def after_housekeeping(buf: Buffer) -> None:
    """Return once the writer has done what follows its last commit (a settle): the next commit waits for it."""

    async def nothing(_conn: object) -> None:
        return None

    await buf.run_op(nothing)


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [tuple(row) for row in db.execute(sql)]


def status_ledger(path: Path) -> dict[str, int]:
    """The ledger as `status` reads it from its own process: SQLite and the inbox beside it."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return queries.ledger_total(db)


def adds_up(counts: dict[str, int]) -> bool:
    return counts["received"] == sum(value for field, value in counts.items() if field != "received")


# the file ---------------------------------------------------------------------------------------------------

values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-(2**53), 2**53).map(str),
    st.text(max_size=20).map(lambda text: json.dumps(text, ensure_ascii=False)),
)
points = st.lists(
    st.tuples(st.sampled_from(["pump", "weir", "ß-1"]), st.integers(0, 255), st.integers(0, 2**41), values),
    max_size=30,
)


@given(points, st.lists(st.integers(0, 10**6), max_size=5), st.booleans())
def test_a_record_reads_back_as_it_was_written(
    fields: list[tuple[str, int, int, str]], delivered: list[int], carried: bool
) -> None:
    made = [InboxPoint(ID_BASE + 7 + n * (3 if carried else 1), *f) for n, f in enumerate(fields)]
    record = Record(
        points=made,
        live=[ID_BASE + i for i in delivered],
        history=[ID_BASE + i + 1 for i in delivered],
        resend=[("/dev/ttyACM0", 5, None, BASE_TS), ("socket://h:1", 6, 99, None)],
    )
    encoded = record.encode()
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    assert Record.decode(encoded) == record


def test_a_torn_last_record_and_a_damaged_one_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db.inbox"
    good = [Record(points=[InboxPoint(ID_BASE + n, "pump", 1, BASE_TS + n, str(n))]) for n in range(3)]
    damaged = bytearray(good[1].encode())
    damaged[20] ^= 0x01  # one bit flipped inside: the checksum fails
    torn = Record(points=[InboxPoint(ID_BASE + 9, "pump", 1, BASE_TS, "9")]).encode()[:-5]
    path.write_bytes(inboxes.header(4) + good[0].encode() + bytes(damaged) + good[2].encode() + torn)
    replay = inboxes.read_file(path)
    assert replay is not None
    assert replay.generation == 4 and replay.records == [good[0], good[2]]
    assert replay.damaged == 1 and replay.torn_tail
    assert replay.good_size == path.stat().st_size - len(torn)
    # The next append after a torn tail goes after the last whole record, not after the torn bytes.
    reopened = InboxFile.reopen(path, replay)
    reopened.append(good[1].encode())
    reopened.close()
    again = inboxes.read_file(path)
    assert again is not None and again.records == [good[0], good[2], good[1]] and not again.torn_tail


def test_an_append_that_fails_leaves_the_file_at_its_last_whole_record(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db.inbox"
    made = InboxFile.create(path, 1)
    made.install(path)
    made.append(Record(points=[InboxPoint(ID_BASE, "pump", 1, BASE_TS, "1")]).encode())
    size = path.stat().st_size
    os.close(made._fd)  # the descriptor fails the next write, as a failing disk would
    with pytest.raises(OSError):
        made.append(b"x" * 100)
    assert path.stat().st_size == size and made.size == size


# the daemon's buffer ----------------------------------------------------------------------------------------


async def test_readings_go_to_the_inbox_and_every_read_and_status_sees_them(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with daemon_buffer(path) as buf:
        for number in range(5):
            await buf.submit(line(number))
        assert rows(path, "SELECT COUNT(*) FROM points") == [(0,)]  # not one row written to SQLite
        assert (await buf.ledger("pump"))["received"] == 20 and buf.queued_total == 20
        assert await buf.pins_queued("pump") == [1, 2, 3, 4]
        oldest = await buf.oldest("pump", 2, 3)
        assert [p.ts_ms for p in oldest] == [BASE_TS, BASE_TS + 1000, BASE_TS + 2000]
        assert all(p.id >= ID_BASE for p in oldest)
        newest = await buf.newest("pump", 2)
        assert newest is not None and newest.ts_ms == BASE_TS + 4000 and newest.value_json == "4.2"
        assert await buf.count_queued("pump", 2, before_ts=BASE_TS + 2000) == 2
        assert await buf.oldest_ts("pump") == BASE_TS
        assert await buf.max_id() == ID_BASE + 19  # the newest id given out, above every row id
        assert status_ledger(path)["received"] == 20
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            device = queries.devices(db, time.time())["pump"]  # `status` lists a device only the inbox knows
        assert device.ledger["queued"] == 20 and device.oldest_queued_ts == BASE_TS


async def test_a_delivery_is_a_record_and_a_crash_copy_replays_to_the_same_ledger(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    crash = tmp_path / "crash"
    crash.mkdir()
    async with daemon_buffer(path) as buf:
        for number in range(6):
            await buf.submit(line(number))
        batch = await buf.oldest("pump", 1, 4)
        assert await buf.deliver("pump", [p.id for p in batch], "history") == 4
        newest = await buf.newest("pump", 3)
        assert newest is not None
        assert await buf.deliver("pump", [newest.id], "live") == 1
        assert await buf.deliver("pump", [newest.id], "live") == 0  # delivered once only
        expected = await buf.ledger("pump")
        assert status_ledger(path) == expected
        # What a power cut leaves: every file as it is on the disk now.
        for name in ("buffer.db", "buffer.db-wal", "buffer.db.inbox"):
            if (tmp_path / name).exists():
                shutil.copy(tmp_path / name, crash / name)
    async with daemon_buffer(crash / "buffer.db") as again:
        assert await again.ledger("pump") == expected
        assert [p.ts_ms for p in await again.oldest("pump", 1, 10)] == [BASE_TS + 4000, BASE_TS + 5000]
        # The replay is in SQLite now (a start folds it), and the next start has nothing to replay.
        assert rows(crash / "buffer.db", "SELECT COUNT(*) FROM points") == [(24 - 5,)]


async def test_a_settle_carries_the_queued_points_over_under_their_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inboxes, "COMPACT_BYTES", 2_000)
    path = tmp_path / "buffer.db"
    async with daemon_buffer(path) as buf:
        for number in range(30):
            await buf.submit(line(number))
        sent = [p for pin in (1, 2, 3, 4) for p in await buf.oldest("pump", pin, 29)]
        await buf.deliver("pump", [p.id for p in sent], "history")
        kept = await buf.oldest("pump", 1, 10)
        await buf.submit(line(30))  # the commit after which the writer settles the file
        replay = inboxes.read_file(inboxes.inbox_path(path))
        assert replay is not None and replay.generation == 2
        assert rows(path, f"SELECT value FROM meta WHERE key = '{inboxes.META_GENERATION}'") == [("2",)]
        assert rows(path, "SELECT COUNT(*) FROM points") == [(0,)]  # carried, not folded
        assert rows(path, "SELECT SUM(delivered_history) FROM ledger") == [(116,)]
        assert (await buf.oldest("pump", 1, 10))[0] == kept[0]  # the same point, under the same id
        assert await buf.deliver("pump", [kept[0].id], "history") == 1  # the carried id is still good
        counts = await buf.ledger("pump")
        assert counts["received"] == 124 and counts["delivered_history"] == 117 and counts["queued"] == 7
        assert status_ledger(path) == counts and adds_up(counts)


async def test_a_backlog_is_folded_into_sqlite_and_old_ids_still_deliver(tmp_path: Path, ticks: Ticks) -> None:
    path = tmp_path / "buffer.db"
    async with daemon_buffer(path, clock=ticks) as buf:
        for number in range(3):
            await buf.submit(line(number))
        held = await buf.oldest("pump", 2, 2)  # a batch in flight when the fold comes
        ticks.now += inboxes.FOLD_AFTER_S + 1
        await buf.submit(line(3))
        await after_housekeeping(buf)
        assert rows(path, "SELECT COUNT(*) FROM points") == [(16,)]  # waited too long: SQLite's now
        assert rows(path, "SELECT pin FROM points ORDER BY id")[:4] == [(1,), (1,), (1,), (1,)]  # pin by pin
        assert await buf.deliver("pump", [p.id for p in held], "history") == 2
        assert [p.ts_ms for p in await buf.oldest("pump", 2, 10)] == [BASE_TS + 2000, BASE_TS + 3000]
        counts = await buf.ledger("pump")
        assert counts["queued"] == 14 and counts["delivered_history"] == 2 and adds_up(counts)
        assert status_ledger(path) == counts


async def test_refusal_thinning_and_expiry_of_inbox_points_fold_it_first(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with daemon_buffer(path) as buf:
        for number in range(4):
            await buf.submit(line(number))
        first = await buf.oldest("pump", 1, 1)
        assert await buf.reject("pump", first, "Value doesn't match the Datastream data type") == 1
        assert rows(path, "SELECT ts, value FROM deadletter") == [(BASE_TS, "0.1")]
        thin = await buf.oldest("pump", 2, 2)
        assert await buf.thin("pump", [p.id for p in thin]) == 2
        assert await buf.expire("pump", BASE_TS + 2000, pin=3) == 2
        counts = await buf.ledger("pump")
        assert (counts["rejected"], counts["downsampled"], counts["expired"], counts["queued"]) == (1, 2, 2, 11)
        assert status_ledger(path) == counts and adds_up(counts)


async def test_a_clean_stop_folds_the_inbox_and_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with daemon_buffer(path) as buf:
        for number in range(3):
            await buf.submit(line(number), resend=("/dev/ttyACM0", number, None, BASE_TS + number * 1000))
        await buf.deliver("pump", [p.id for p in await buf.oldest("pump", 4, 10)], "history")
        assert [seq for seq, _, _ in await buf.resend_window("/dev/ttyACM0")] == [0, 1, 2]
    assert not inboxes.inbox_path(path).exists()
    assert rows(path, "SELECT COUNT(*) FROM points") == [(9,)]
    assert rows(path, "SELECT seq FROM resend_window ORDER BY id") == [(0,), (1,), (2,)]
    assert rows(path, "SELECT received, queued, delivered_history FROM ledger") == [(12, 9, 3)]


async def test_an_inbox_that_cannot_be_written_hands_the_readings_to_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: InboxFile, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "buffer.db"
    async with daemon_buffer(path) as buf:
        await buf.submit(line(0))
        monkeypatch.setattr(InboxFile, "append", full)
        await buf.submit(line(1))  # committed all the same, by SQLite
        assert rows(path, "SELECT COUNT(*) FROM points") == [(4,)]
        counts = await buf.ledger("pump")
        assert counts["received"] == 8 and counts["queued"] == 8 and buf.ingest_failed == {}
        monkeypatch.undo()
        await buf.submit(line(2))
        assert (await buf.ledger("pump"))["received"] == 12


async def test_the_inbox_is_the_daemons_alone_and_only_with_fsynced_commits(tmp_path: Path) -> None:
    async with open_buffer(tmp_path / "a.db", inbox=True) as shared:  # not locked: import, deadletter retry
        await shared.submit(line(0))
    async with daemon_buffer(tmp_path / "b.db", synchronous="NORMAL") as normal:
        await normal.submit(line(0))
    for name in ("a.db", "b.db"):
        assert rows(tmp_path / name, "SELECT COUNT(*) FROM points") == [(4,)]
        assert not inboxes.inbox_path(tmp_path / name).exists()


async def test_a_settle_committed_but_not_renamed_is_finished_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with daemon_buffer(path) as buf:
        for number in range(2):
            await buf.submit(line(number))
    # As a crash after SQLite's commit of generation 5 leaves it: the new file beside the old one.
    inbox = inboxes.inbox_path(path)
    new = InboxFile.create(inbox, 5, [Record(points=[InboxPoint(ID_BASE, "pump", 9, BASE_TS, "7")])])
    new.close()
    inbox.write_bytes(inboxes.header(4) + Record(points=[InboxPoint(ID_BASE, "pump", 8, BASE_TS, "1")]).encode())
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(schema.SET_META, (inboxes.META_GENERATION, "5"))
        db.commit()
    async with daemon_buffer(path) as again:
        assert await again.pins_queued("pump") == [1, 2, 3, 4, 9]  # generation 5's point; 4's was applied


def kept_aside(directory: Path) -> list[bytes]:
    """The first line of each inbox moved aside as damaged."""
    return [path.read_bytes().split(b"\n")[0] for path in directory.glob("buffer.db.inbox.corrupt-*")]


async def test_an_inbox_whose_header_is_damaged_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with daemon_buffer(path) as buf:
        await buf.submit(line(0))
    inbox = inboxes.inbox_path(path)
    inbox.write_bytes(b"\x00garbage\n" + Record(points=[InboxPoint(ID_BASE, "pump", 1, BASE_TS, "1")]).encode())
    async with daemon_buffer(path) as again:
        await again.submit(line(1))
        assert (await again.ledger("pump"))["received"] == 8
    assert kept_aside(tmp_path) == [b"\x00garbage"]


async def test_on_a_full_disk_the_inbox_keeps_its_last_room_for_deliveries(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real tmpfs filled to the last byte: readings go on into the inbox's reserved room, then stop short of
    its end (SQLite takes them while it can, then they are counted `ingest_failed`), and the cloud's deliveries
    are still recorded there, so a crash on a full disk resends no more than it would elsewhere."""
    monkeypatch.setattr(inboxes, "PREALLOCATE_BYTES", 64 * 1024)  # used up before the queue's cap is reached
    path = small_disk / "buffer.db"
    async with daemon_buffer(path) as buf:
        await buf.submit(line(0))
        await asyncio.to_thread(fill, small_disk)
        taken = 1
        while taken < 50_000:
            try:
                await buf.submit(line(taken))
            except IngestFailedError:
                break
            taken += 1
        else:
            pytest.fail("a full disk took 50,000 lines")
        queued = [p for pin in (1, 2, 3, 4) for p in await buf.oldest("pump", pin, 10**6)]
        inboxed = [p for p in queued if p.id >= ID_BASE]
        assert len(inboxed) > 500  # the reserved room took readings after the disk was full
        # ... and stopped with DELIVERY_ROOM_BYTES of it left (then SQLite's reserve, released, took some more).
        size = await asyncio.to_thread(lambda: inboxes.inbox_path(path).stat().st_size)
        assert size <= 64 * 1024 - inboxes.DELIVERY_ROOM_BYTES + 1024
        for start in range(0, 500, 50):  # 10 requests' deliveries, each its own record
            batch = inboxed[start : start + 50]
            assert await buf.deliver("pump", [p.id for p in batch], "history") == len(batch)
        expected = await buf.ledger("pump")
        assert expected["delivered_history"] == 500 and buf.ingest_failed == {"pump": 4}
        # A power cut now: the files as they are.
        crash = await asyncio.to_thread(copy_buffer, small_disk, small_disk.parent / "crash")
    async with daemon_buffer(crash / "buffer.db") as again:
        replayed = await again.ledger("pump")
        assert replayed["delivered_history"] == 500 and replayed["received"] == expected["received"]


def copy_buffer(source: Path, destination: Path) -> Path:
    """The buffer's files as a power cut would leave them, copied elsewhere."""
    destination.mkdir()
    for name in ("buffer.db", "buffer.db-wal", "buffer.db.inbox"):
        if (source / name).exists():
            shutil.copy(source / name, destination / name)
    return destination


# kill -9 at random moments of settles -----------------------------------------------------------------------

_CHILD = """
import asyncio, sys
from pathlib import Path
from edgeforward.points import Point
from edgeforward.store import Buffer
from edgeforward.store import inbox

inbox.COMPACT_BYTES = 600  # a settle every few commits
inbox.FOLD_MAX_POINTS = 200  # and a fold into SQLite now and then

async def main(path, start):
    buf = Buffer(Path(path), exclusive=True, inbox=True, commit_interval_ms=1)
    await buf.open()
    writer = asyncio.create_task(buf.run_writer())
    number = start
    while True:
        await buf.submit([Point("pump", pin, 1_764_000_000_000 + number, float(number)) for pin in (1, 2)])
        print("acked", number, flush=True)
        number += 1
        if number % 3 == 0:
            batch = await buf.oldest("pump", number % 2 + 1, 10)
            await buf.deliver("pump", [p.id for p in batch], "history")
            await buf.spend("pump", 0.0)  # what the forwarder does before its next request
            print("delivered", len(batch), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _run_child(path: Path, start: int, seconds: float) -> tuple[int, int, int]:
    """Run the child until killed after `seconds`; return (first reading, readings acked, points delivered)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(start)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert child.stdout is not None
    os.set_blocking(child.stdout.fileno(), False)
    output = b""
    deadline = time.monotonic() + CHILD_START_TIMEOUT_S
    while b"acked" not in output and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
        output += child.stdout.read() or b""
    time.sleep(seconds)
    child.send_signal(signal.SIGKILL)
    child.wait()
    output += child.stdout.read() or b""
    # Whole lines only: the kill may cut the last one (under load, "acked" without its number).
    lines = [text.split() for text in output.decode().split("\n")[:-1]]
    acked = [int(parts[1]) for parts in lines if parts[0] == "acked"]
    delivered = sum(int(parts[1]) for parts in lines if parts[0] == "delivered")
    assert acked, f"the child never acknowledged a reading: {output[-500:]!r}"
    return start, len(acked), delivered


async def test_kill9_at_random_moments_keeps_every_acked_reading_and_the_ledger_exact(tmp_path: Path) -> None:
    """20 kills of a process that appends, delivers, settles and folds all the time: after each, every acked
    reading is there once, what the ledger says adds up, and SQLite and the inbox never hold a point twice."""
    path = tmp_path / "buffer.db"
    rng = random.Random(7)
    start = 0
    acked_total = 0
    delivered_total = 0
    settles = 0
    for _ in range(KILL_ROUNDS):
        first, acked, delivered = await asyncio.to_thread(_run_child, path, start, rng.uniform(0.05, 0.4))
        acked_total += acked
        delivered_total += delivered
        start = first + acked + 1  # a reading not acked may be stored or not: the next run numbers past it
        generation = rows(path, f"SELECT value FROM meta WHERE key = '{inboxes.META_GENERATION}'")
        settles = int(str(generation[0][0])) if generation else 0
        async with daemon_buffer(path) as buf:
            counts = await buf.ledger("pump")
            assert adds_up(counts), counts
            queued = [p for pin in (1, 2) for p in await buf.oldest("pump", pin, 10**6)]
            assert len(queued) == counts["queued"]
            assert len({(p.pin, p.ts_ms) for p in queued}) == len(queued), "a point is queued twice"
            # Delivered at most one batch more than acknowledged (the one in flight at the kill).
            assert delivered_total <= counts["delivered_history"] <= delivered_total + 10
            delivered_total = counts["delivered_history"]
            assert acked_total * 2 <= counts["received"] <= (acked_total + KILL_ROUNDS) * 2
        assert not inboxes.inbox_path(path).exists()  # a clean stop folded it
    print(f"{KILL_ROUNDS} kills: {acked_total} readings acked, {delivered_total} points delivered, {settles} settles")
    assert settles > KILL_ROUNDS, "the kills did not land among settles"
