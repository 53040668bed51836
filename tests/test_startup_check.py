"""Start-up: little is read before READY after a clean stop (a stop during the background check stays clean), a
damaged file is salvaged range by range, and systemd is asked for more start-up time while that goes on."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeforward import notify
from edgeforward.cloudsim import CloudSim
from edgeforward.config import load_config
from edgeforward.daemon import Daemon
from edgeforward.notify import Notifier
from edgeforward.points import Point
from edgeforward.store import Buffer, counting, recovery
from edgeforward.store.buffer import _stopped_uncleanly
from edgeforward.store.recovery import check_file

from .conftest import Pty, open_buffer, wait_for, write_config
from .systemd_guest import crashed_writer
from .test_notify import PUMP, RECV_TIMEOUT_S, NotifySocket

POINTS = 400_000
BASE_TS = 1_764_000_000_000


async def backlog(path: Path) -> None:
    """A cleanly closed buffer with POINTS queued points (bulk insert, ledger included)."""
    async with open_buffer(path):
        pass
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("BEGIN")
        db.execute("INSERT INTO devices (id, name) VALUES (1, 'pump')")
        db.execute(
            "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < ?) "
            "INSERT INTO points (device_id, pin, ts, value) SELECT 1, 1 + x % 4, ? + x, x FROM c",
            (POINTS, BASE_TS),
        )
        db.execute("INSERT INTO ledger (device_id, received, queued) VALUES (1, ?, ?)", (POINTS, POINTS))
        db.execute(counting.PASS_TAIL)  # counted in the ledger above, not by its tail (store/counting.py)
        db.execute("COMMIT")
    db.close()


def read_chars() -> int:
    """Bytes this process asked the kernel for (rchar: page cache or not, so the same on every run)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


async def test_the_check_before_ready_reads_a_few_pages_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    await backlog(path)
    assert not _stopped_uncleanly(path)
    before = read_chars()
    assert check_file(path, full=False) is None
    read = read_chars() - before
    assert read < path.stat().st_size // 20, (read, path.stat().st_size)


async def test_a_stop_during_the_background_check_is_a_clean_stop(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    await backlog(path)
    buffer = Buffer(path, exclusive=True, check="auto")
    await buffer.open()
    assert buffer.needs_verify  # a clean stop: the pages are read after READY
    writer = asyncio.create_task(buffer.run_writer())
    verify = asyncio.create_task(buffer.verify())
    await asyncio.sleep(0.05)  # the check has started reading (or, on a fast machine, is done)
    started = time.monotonic()
    verify.cancel()  # what the daemon does to its housekeeping on SIGTERM
    buffer.stop_writer()
    await writer
    await buffer.close()
    assert time.monotonic() - started < 5
    assert not _stopped_uncleanly(path)  # the next start skips the full check before READY
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM points").fetchone()[0] == POINTS  # not taken for damage
    db.close()


def test_a_salvage_in_many_ranges_keeps_what_one_range_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The salvage copies a table range by range in SQL and only a range that does not read row by row: cutting
    # the table finer must keep exactly the same rows and name the same loss.
    template = tmp_path / "template.db"
    asyncio.run(backlog(template))
    size = template.stat().st_size
    with template.open("r+b") as file:
        for offset in (size // 3, size // 2, 2 * size // 3):  # three damaged spots
            file.seek(offset)
            file.write(random.Random(offset).randbytes(6000))
    outcomes = []
    for chunk in (recovery.SALVAGE_CHUNK_ROWIDS, 997):
        monkeypatch.setattr(recovery, "SALVAGE_CHUNK_ROWIDS", chunk)
        damaged = tmp_path / f"chunks-{chunk}" / "buffer.db"
        damaged.parent.mkdir()
        shutil.copyfile(template, damaged)
        found = recovery.recover_file(damaged, "test")
        with sqlite3.connect(damaged) as db:
            ids = db.execute("SELECT COUNT(*), SUM(id), SUM(ts) FROM points").fetchone()
        db.close()
        outcomes.append((found.salvaged, found.lost_points, ids))
    assert outcomes[0] == outcomes[1]
    assert 0 < outcomes[0][1] < POINTS and outcomes[0][0]["points"] == POINTS - outcomes[0][1]


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"@edgeforward-startup-{uuid.uuid4().hex}")
    yield listener
    listener.close()


async def test_daemon_asks_for_more_start_time_while_it_recovers_a_damaged_buffer(
    tmp_path: Path,
    cloud: CloudSim,
    pty_port: Pty,
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A recovery outlasting TimeoutStartSec (a 10 M-point file: 34 s on an x86 VM, minutes on an SD card) must not
    # be killed and begun again forever: while it progresses, systemd hears EXTEND_TIMEOUT_USEC before READY.
    path = tmp_path / "buffer.db"
    async with open_buffer(path) as buffer:
        for first in range(0, 200_000, 20_000):
            await buffer.submit(
                [Point("pump", 1, 1_764_000_000_000 + i, float(i)) for i in range(first, first + 20_000)]
            )
    with path.open("r+b") as file:
        file.seek(path.stat().st_size // 2)
        file.write(os.urandom(16384))
    # ... and the last process to write it crashed (a WAL left behind): the start checks every page, before READY.
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", crashed_writer(path)], check=True)
    monkeypatch.setattr(notify, "START_EXTEND_EVERY_S", 0.02)
    config = write_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP])
    daemon = Daemon(load_config(config), notifier=Notifier(notify_socket.address))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_for(lambda: notify_socket.has("READY", "1"), RECV_TIMEOUT_S)
    finally:
        stop.set()
        await task
    assert daemon.buffer.recovery is not None
    fields = [f for _, f in notify_socket.messages]
    ready = next(i for i, f in enumerate(fields) if f.get("READY") == "1")
    extensions = [f for f in fields[:ready] if "EXTEND_TIMEOUT_USEC" in f]
    assert extensions and all(f["EXTEND_TIMEOUT_USEC"] == str(int(notify.START_EXTEND_BY_S * 1e6)) for f in extensions)
    assert any(f.get("STATUS") == "starting: recovering the damaged buffer" for f in extensions)
    assert not any("EXTEND_TIMEOUT_USEC" in f for f in fields[ready:])
