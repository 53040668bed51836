"""Durability: kill -9 at random moments, corrupt buffers, a full disk, a byte cap, a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from edgeforward.cloudsim import CloudSim
from edgeforward.points import Point
from edgeforward.store import META_RECOVERY, Buffer

from .conftest import TOKEN, DaemonProcess, Pty, ledger_adds_up, open_buffer, wait_for, write_config
from .crash_harness import run_crash_harness
from .test_buffer import ledger_adds_up as buffer_ledger_adds_up

BASE_TS = 1_764_000_000_000
CI_KILLS = int(os.environ.get("EDGEFORWARD_CI_KILLS", "20"))
CI_SEED = int(os.environ.get("EDGEFORWARD_CRASH_SEED", "5"))


async def test_kill9_at_random_moments_loses_nothing_committed(tmp_path: Path, cloud: CloudSim, pty_port: Pty) -> None:
    result = await run_crash_harness(tmp_path, cloud, pty_port, kills=CI_KILLS, seed=CI_SEED)
    assert result.kills >= 20
    assert result.received > 0 and result.delivered_distinct == result.received
    assert result.duplicates <= result.duplicate_bound
    assert {record.phase for record in result.records} >= {"ingest", "drain"}


# corrupt buffers -------------------------------------------------------------------------------------

PAGE = 4096


async def populate(path: Path) -> None:
    """A buffer with two devices, a backlog, deliveries, a rejected point, budgets and a redirect."""
    async with open_buffer(path) as buf:
        await buf.submit([Point("pump", 1, BASE_TS + i, float(i)) for i in range(3000)])
        await buf.submit([Point("fan", 2, BASE_TS + i, i) for i in range(300)])
        await buf.deliver("pump", [p.id for p in await buf.oldest("pump", 1, 100)], "history")
        await buf.reject("fan", await buf.oldest("fan", 2, 2), "Value doesn't match the Datastream data type")
        await buf.spend("pump", BASE_TS / 1000, points=100)
        await buf.remember_server("secret", "https://fra1.blynk.cloud")


def crash_image(path: Path, target: Path, extra: int) -> None:
    """Copy a buffer (file and WAL) as a power cut would leave it, after `extra` more commits."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA wal_autocheckpoint = 0")
    device_id = db.execute("SELECT id FROM devices WHERE name = 'pump'").fetchone()[0]
    for i in range(extra):
        db.execute("BEGIN")
        # A reading's commit, as the daemon makes it: unfiled, counted by the ledger's tail (store/counting.py).
        db.execute("INSERT INTO points (device_id, pin, ts, value, filed) VALUES (?, 1, ?, '1.0', 0)", (device_id, i))
        db.execute("COMMIT")
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{path}{suffix}", f"{target}{suffix}")
    db.close()


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def page_size(path: Path) -> int:
    """The file's own page size (new buffers use 1 KiB pages, older ones 4 KiB)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA page_size").fetchone()[0])


def table_pages(path: Path, table: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [
            row[0] for row in db.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (table,))
        ]


def truncated(path: Path) -> None:
    size, page = path.stat().st_size, page_size(path)
    with path.open("r+b") as file:
        file.truncate(size * 6 // 10 // page * page + 123)


def garbage_header(path: Path) -> None:
    overwrite(path, 0, random.Random(1).randbytes(100))


def zeroed_middle(path: Path) -> None:
    page = page_size(path)
    pages = path.stat().st_size // page
    overwrite(path, pages // 2 * page, bytes(4 * page))


def random_over_points(path: Path) -> None:
    rng = random.Random(2)
    size = page_size(path)
    for page in rng.sample(table_pages(path, "points"), 3):
        overwrite(path, (page - 1) * size, rng.randbytes(size))


def broken_wal(path: Path) -> None:
    live = path.with_name("live.db")
    shutil.copyfile(path, live)
    crash_image(live, path, 20)
    wal = Path(f"{path}-wal")
    overwrite(wal, wal.stat().st_size // 2, random.Random(3).randbytes(3000))


def foreign_wal(path: Path) -> None:
    other = path.with_name("other.db")
    with contextlib.closing(sqlite3.connect(other, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE junk (x)")
    crash = path.with_name("crash.db")
    with contextlib.closing(sqlite3.connect(other, isolation_level=None)) as db:
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.executemany("INSERT INTO junk VALUES (?)", [(random.Random(i).randbytes(500),) for i in range(200)])
        shutil.copyfile(f"{other}-wal", f"{crash}-wal")
    shutil.copyfile(f"{crash}-wal", f"{path}-wal")


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def directory(path: Path) -> None:
    path.unlink()
    (path / "lost+found").mkdir(parents=True)


def newer_schema(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")


def not_a_database(path: Path) -> None:
    path.write_text("this is a log file somebody redirected here\n" * 500)


def schema_page_destroyed(path: Path) -> None:
    overwrite(path, 100, bytes(PAGE - 100))


# kind -> (is it damaged, must every queued point be salvaged)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], bool, bool]] = {
    "truncated": (truncated, True, False),
    "garbage_header": (garbage_header, True, True),
    "zeroed_pages": (zeroed_middle, True, False),
    "random_over_points": (random_over_points, True, False),
    "broken_wal": (broken_wal, False, True),
    "foreign_wal": (foreign_wal, True, True),
    "empty_file": (empty_file, False, False),
    "directory": (directory, True, False),
    "newer_schema": (newer_schema, True, True),
    "not_a_database": (not_a_database, True, False),
    "schema_page_destroyed": (schema_page_destroyed, True, False),
}


def file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}


def assert_kept(aside: Path, size: int | None) -> None:
    """The damaged file was moved aside whole, never deleted or changed."""
    assert aside.exists()
    if aside.is_file() and size is not None:
        assert aside.stat().st_size == size


async def ledgers_add_up(buf: Buffer) -> dict[str, dict[str, int]]:
    counts = {}
    with contextlib.closing(sqlite3.connect(buf.path)) as db:
        for (name,) in db.execute("SELECT name FROM devices").fetchall():
            counts[name] = await buf.ledger(name)
            stored = db.execute(
                "SELECT COUNT(*) FROM points WHERE device_id = (SELECT id FROM devices WHERE name = ?)", (name,)
            ).fetchone()[0]
            assert counts[name]["queued"] == stored, (name, counts[name], stored)
            assert buffer_ledger_adds_up(counts[name]), counts[name]
    return counts


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
async def test_damaged_buffer_recovers_without_a_human(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "buffer.db"
    await populate(path)
    damage, damaged, keeps_all = CORRUPTIONS[kind]
    damage(path)
    before = file_sizes(tmp_path)
    with structlog.testing.capture_logs() as logs:
        buf = Buffer(path)
        await buf.open()
    try:
        writer = asyncio.create_task(buf.run_writer())
        counts = await ledgers_add_up(buf)
        if damaged:
            assert buf.recovery is not None
            aside = Path(buf.recovery.moved_to)
            assert aside.name.startswith("buffer.db.corrupt-")
            assert_kept(aside, before.get(path.name))
            assert any(e["event"] == "buffer_recovered" and e["log_level"] == "error" for e in logs)
            with contextlib.closing(sqlite3.connect(path)) as db:
                meta = json.loads(db.execute("SELECT value FROM meta WHERE key = ?", (META_RECOVERY,)).fetchone()[0])
            assert meta["moved_to"] == str(aside) and meta["lost_points"] == buf.recovery.lost_points
        if keeps_all:
            assert counts["pump"]["queued"] >= 2900 and counts["fan"]["queued"] == 298
            assert counts["pump"]["received"] >= 3000 and counts["pump"]["dropped"] == 0
        if damaged and counts.get("pump", {}).get("received"):
            assert counts["pump"]["received"] >= 3000
        await buf.submit([Point("pump", 1, BASE_TS, 1.0)])
        assert buffer_ledger_adds_up(await buf.ledger("pump"))
        buf.stop_writer()
        await writer
    finally:
        await buf.close()
    again = Buffer(path)
    await again.open()
    assert again.recovery is None
    await again.close()


# graceful stop ---------------------------------------------------------------------------------------

GRACEFUL_STOP_S = 5.0


def wal_checkpointed(path: Path) -> bool:
    wal = Path(f"{path}-wal")
    return not wal.exists() or wal.stat().st_size == 0


async def test_sigterm_exits_0_within_5_s_while_the_cloud_hangs(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(
        tmp_path,
        str(cloud.url),
        [{"path": pty_port.path, "device": "pump"}],
        [{"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer"}}],
        forward={"live_interval_s": 0.2, "history_interval_s": 0.2},
    )
    cloud.outage = "hang"
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    for i in range(50):
        pty_port.write(f"v2={i}\n")
    await wait_for(lambda: daemon.status()["devices"]["pump"]["received"] == 50, 10, interval=0.1)
    await wait_for(lambda: any("hang" in (r.error or "") for r in cloud.requests), 10)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(GRACEFUL_STOP_S) == 0
    status = daemon.status()["devices"]["pump"]
    assert status["received"] == 50 and status["queued"] == 50 and ledger_adds_up(status)
    assert wal_checkpointed(tmp_path / "buffer.db")
    assert "daemon_stopped" in daemon.log()
