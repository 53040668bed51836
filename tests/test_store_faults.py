"""The store under every fault: a real small file system that fills, kills during recovery, two daemons."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeforward.cloudsim import CloudSim
from edgeforward.points import Point
from edgeforward.store import Buffer, StoreClosedError, StoreError, StoreFullError, queries
from edgeforward.store.recovery import BUILDING_SUFFIX, BUILT_SUFFIX

from .conftest import (
    TOKEN,
    DaemonProcess,
    Pty,
    edgeforward,
    fill,
    ledger_adds_up,
    open_buffer,
    wait_for,
    write_config,
)

BASE_TS = 1_764_000_000_000
FLOW_TIMEOUT_S = 60.0
PUMP = {"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer"}}


async def write_lines(pty: Pty, start: int, count: int) -> int:
    """Write `count` lines of two points (v1, v2 = the line number) without blocking the test's event loop."""
    for first in range(start, start + count, 200):
        text = "".join(f"v1={i}.5 v2={i}\n" for i in range(first, min(first + 200, start + count)))
        await asyncio.to_thread(pty.write, text)
        await asyncio.sleep(0)
    return count * 2


def full_disk_config(tmp_path: Path, cloud: CloudSim, pty: Pty, disk: Path) -> Path:
    return write_config(
        tmp_path,
        str(cloud.url),
        [{"path": pty.path, "device": "pump"}],
        [PUMP],
        buffer={"path": str(disk / "buffer.db")},
        limits={"batch_max_points": 2000, "points_per_day": 0},
        forward={"live_interval_s": 0},
    )


def requests_sent(cloud: CloudSim) -> int:
    return sum(1 for r in cloud.requests if r.endpoint.startswith(("batch", "update")))


async def test_disk_full_during_ingest_and_drain_keeps_running_and_counts_exactly(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, small_disk: Path, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = full_disk_config(tmp_path, cloud, pty_port, small_disk)
    cloud.outage = "503"  # every request fails: nothing frees space, budgets are spent on each attempt
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    written = 0
    line = 0

    def all_read() -> bool:
        status = daemon.status()["devices"]["pump"]
        return bool(status["received"] + status["ingest_failed"] == written)

    while "buffer_disk_full" not in daemon.log():
        written += await write_lines(pty_port, line, 5000)
        line += 5000
        assert line < 400_000, "the disk never filled"
        # A pty keeps only so much unread input (the kernel drops the rest): write the next lines once these
        # are read, however slowly the machine runs.
        await wait_for(all_read, FLOW_TIMEOUT_S, 0.2)
    written += await write_lines(pty_port, line, 5000)  # readings that arrive while it is full
    line += 5000
    await asyncio.sleep(3)  # requests keep failing and budgets keep being counted on the full disk

    await wait_for(all_read, FLOW_TIMEOUT_S, 0.5)
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()[-3000:]
    full = daemon.status()["devices"]["pump"]
    assert full["ingest_failed"] > 0 and ledger_adds_up(full)

    cloud.outage = None  # forwarding goes on, on the still-full disk, and frees space
    await wait_for(lambda: daemon.status()["devices"]["pump"]["queued"] == 0, FLOW_TIMEOUT_S, 0.5)
    written += await write_lines(pty_port, line, 100)
    await wait_for(all_read, FLOW_TIMEOUT_S, 0.5)
    await wait_for(lambda: daemon.status()["devices"]["pump"]["queued"] == 0, FLOW_TIMEOUT_S, 0.5)
    assert daemon.stop() == 0
    status = daemon.status()["devices"]["pump"]
    assert ledger_adds_up(status)
    assert status["received"] + status["ingest_failed"] == written  # exact, also after the stop
    in_cloud = Counter((p.pin, p.value) for p in cloud.points(TOKEN))
    assert len(in_cloud) == status["received"] == status["delivered"]
    # Every request the cloud saw was counted first: none was sent whose budget was not recorded.
    assert status["messages_this_month"] >= requests_sent(cloud)


async def test_starts_on_a_full_disk_and_drains(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, small_disk: Path, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = full_disk_config(tmp_path, cloud, pty_port, small_disk)
    cloud.outage = "503"
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    written = await write_lines(pty_port, 0, 20_000)
    await wait_for(lambda: daemon.status()["devices"]["pump"]["received"] == written, FLOW_TIMEOUT_S, 0.5)
    assert daemon.stop() == 0
    filler = fill(small_disk)  # nothing left, not even for the WAL or the lock file's PID
    assert shutil.disk_usage(small_disk).free < 64 * 1024

    cloud.outage = None
    again = daemon_factory(config)
    again.log_path = tmp_path / "daemon-2.log"
    again.start()
    await again.wait_started()  # READY on a full disk
    await wait_for(lambda: again.status()["devices"]["pump"]["queued"] == 0, FLOW_TIMEOUT_S, 0.5)
    assert again.process is not None and again.process.poll() is None
    filler.unlink()  # a person frees space: ingest goes on
    more = await write_lines(pty_port, 20_000, 50)
    await wait_for(lambda: again.status()["devices"]["pump"]["received"] == written + more, FLOW_TIMEOUT_S, 0.5)
    await wait_for(lambda: again.status()["devices"]["pump"]["queued"] == 0, FLOW_TIMEOUT_S, 0.5)
    assert again.stop() == 0
    status = again.status()["devices"]["pump"]
    assert ledger_adds_up(status) and status["delivered"] == written + more
    assert len({(p.pin, p.value) for p in cloud.points(TOKEN)}) == written + more


# recovery ----------------------------------------------------------------------------------------------

RECOVERY_POINTS = 60_000
RECOVERY_CHUNK = 20_000
KILLS = int(os.environ.get("EDGEFORWARD_RECOVERY_KILLS", "24"))
# Each kill is a daemon start, a recovery cut short (or finished) and one finished by the next open. 60,000
# points recover in about 0.5 s here, so 24 kills take about 45 s (200,000 took 120-140 s: the phases a kill
# can hit are the same, only longer).
KILL_ROUND_TIMEOUT_S = 20


async def build_damaged(path: Path) -> None:
    recent = time.time_ns() // 1_000_000 - 86_400_000  # a day old, whatever today is: nothing expires
    async with open_buffer(path) as buf:
        for start in range(0, RECOVERY_POINTS, RECOVERY_CHUNK):
            await buf.submit([Point("pump", 1 + i % 2, recent + start + i, float(i)) for i in range(RECOVERY_CHUNK)])
        await buf.deliver("pump", [p.id for p in await buf.oldest("pump", 1, 1000)], "history")
    with contextlib.closing(sqlite3.connect(path)) as db:
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        pages = [row[0] for row in db.execute("SELECT pageno FROM dbstat WHERE name = 'points' AND pagetype = 'leaf'")]
    rng = random.Random(12)
    with path.open("r+b") as file:
        for page in rng.sample(pages, 12 * 1024 // page_size):
            file.seek((page - 1) * page_size)
            file.write(rng.randbytes(page_size))


def _logged(daemon: DaemonProcess, event: str) -> bool:
    return event in daemon.log()


def ledger_of(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        total = queries.ledger_total(db)
        stored = int(db.execute("SELECT COUNT(*) FROM points").fetchone()[0])
    return {
        "received": total["received"],
        "delivered": total["delivered_history"],
        "queued": total["queued"],
        "dropped": total["dropped"],
        "stored": stored,
    }


@pytest.mark.timeout(KILLS * KILL_ROUND_TIMEOUT_S + 120)
async def test_kill9_during_recovery_at_random_points_keeps_the_ledger_exact(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty
) -> None:
    fixture = tmp_path / "damaged.db"
    await build_damaged(fixture)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    shutil.copyfile(fixture, reference_dir / "buffer.db")
    started = time.monotonic()
    reference = Buffer(reference_dir / "buffer.db")
    await reference.open()
    recovery_s = time.monotonic() - started
    assert reference.recovery is not None and reference.recovery.lost_points > 0
    await reference.close()
    expected = ledger_of(reference_dir / "buffer.db")
    assert expected["queued"] == expected["stored"] > RECOVERY_POINTS * 0.9
    assert expected["received"] == RECOVERY_POINTS

    rng = random.Random(int(os.environ.get("EDGEFORWARD_CRASH_SEED", "5")))
    phases: Counter[str] = Counter()
    cloud.outage = "503"  # nothing is delivered after a recovery finishes: the ledger stays comparable
    for kill in range(KILLS):
        run_dir = tmp_path / f"run{kill}"
        run_dir.mkdir()
        shutil.copyfile(fixture, run_dir / "buffer.db")
        config = write_config(run_dir, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP])
        daemon = DaemonProcess(config)
        daemon.start()
        try:
            await wait_for(functools.partial(_logged, daemon, "buffer_damaged"), 30, 0.005)
            await asyncio.sleep(rng.uniform(0, recovery_s * 1.2))
            daemon.kill()
        finally:
            daemon.cleanup()
        log = daemon.log()
        left = {p.name for p in run_dir.iterdir()}
        # Finished before the kill: the damaged file is aside (its `buffer_recovered` line may not be written yet:
        # the kill can land between the swap and the log).
        swapped = any(name.startswith("buffer.db.corrupt-") for name in left)
        phases["recovered" if swapped else "during"] += 1
        assert "buffer.db" in left or "buffer.db" + BUILT_SUFFIX in left, left  # never an empty buffer in front
        # The next start finishes (or redoes) the recovery: the ledger is exactly the uninterrupted one's.
        again = Buffer(run_dir / "buffer.db")
        await again.open()
        assert again.recovery is not None or swapped, log[-2000:]  # finished now, or before the kill
        await again.close()
        assert ledger_of(run_dir / "buffer.db") == expected, (kill, log[-2000:])
        leftovers = {p.name for p in run_dir.iterdir()} & {"buffer.db" + BUILDING_SUFFIX, "buffer.db" + BUILT_SUFFIX}
        assert not leftovers
        assert sum(1 for p in run_dir.iterdir() if p.name.startswith("buffer.db.corrupt-")) >= 1
        shutil.rmtree(run_dir)
    print(f"kills during recovery: {phases['during']}, after it: {phases['recovered']} (recovery {recovery_s:.2f} s)")
    assert phases["during"] >= KILLS // 3, phases


async def _damaged_on_a_full_disk(small_disk: Path, points: int) -> tuple[Path, int, Path]:
    """A buffer of `points` with 8 KiB of garbage in its middle, on a disk filled to the last byte."""
    path = small_disk / "buffer.db"
    async with open_buffer(path) as buf:
        for first in range(0, points, 20_000):
            await buf.submit(
                [Point("pump", 1, BASE_TS + i, float(i)) for i in range(first, min(points, first + 20_000))]
            )
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.seek(size // 2)
        file.write(random.Random(1).randbytes(8192))
    return path, size, fill(small_disk)


async def test_recovery_on_a_full_disk_builds_in_the_reserve_when_the_rows_fit(small_disk: Path) -> None:
    # 20,000 points salvage into about 0.6 MB: the reserve released at start (1 MiB) holds the fresh file,
    # which is written once (no WAL while it is built).
    path, _, filler = await _damaged_on_a_full_disk(small_disk, 20_000)
    buf = Buffer(path)
    await buf.open()
    try:
        assert buf.recovery is not None and buf.recovery.lost_points > 0
        counts = await buf.ledger("pump")
        assert counts["received"] == 20_000
        lost = buf.recovery.lost_points  # counted dropped: the ledger still adds up
        assert (counts["queued"], counts["dropped"]) == (20_000 - lost, lost)
        assert not _half_built(small_disk)
    finally:
        await buf.close()
    filler.unlink()


async def test_recovery_on_a_full_disk_leaves_the_damaged_file_and_recovers_once_there_is_room(
    small_disk: Path,
) -> None:
    # 60,000 points need more room than the released reserve gives: the recovery stops, the damaged file stays.
    path, size, filler = await _damaged_on_a_full_disk(small_disk, 60_000)
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.seek(size // 2)
    buf = Buffer(path)
    with pytest.raises(StoreError) as raised:
        await buf.open()
    assert "full" in str(raised.value).lower() or "space" in str(raised.value).lower()
    assert path.stat().st_size == size  # untouched, and nothing half-built left beside it
    assert not _half_built(small_disk)
    filler.unlink()
    buf = Buffer(path)
    await buf.open()
    assert buf.recovery is not None
    counts = await buf.ledger("pump")
    assert counts["received"] == 60_000 and counts["queued"] + counts["dropped"] == 60_000
    await buf.close()


def _half_built(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith((BUILDING_SUFFIX, BUILT_SUFFIX))]


# two daemons, and the commands beside one ---------------------------------------------------------------


async def test_second_run_refuses_naming_the_pid_while_commands_keep_working(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP])
    cloud.outage = "503"
    first = daemon_factory(config)
    first.start()
    await first.wait_started()
    assert first.process is not None
    started = time.monotonic()
    second = edgeforward("run", "--config", str(config), timeout=30)
    assert second.returncode == 1
    assert str(first.process.pid) in second.stderr and "already running" in second.stderr
    assert time.monotonic() - started < 10
    status = first.status()
    assert status["daemon"] == {"running": True, "pid": first.process.pid}
    csv = tmp_path / "logger.csv"
    recent = time.time_ns() // 1_000_000 - 3_600_000  # within max_age_days of whatever today is
    csv.write_text("ts,v1\n" + "".join(f"{recent + i * 1000},{i}.5\n" for i in range(300)))
    imported = edgeforward("import", "--config", str(config), "--device", "pump", str(csv))
    assert imported.returncode == 0, imported.stderr
    listed = edgeforward("deadletter", "list", "--config", str(config))
    assert listed.returncode == 0 and "0 points" in listed.stdout
    assert first.status()["devices"]["pump"]["queued"] == 300
    assert first.stop() == 0
    # The daemon's own counter saw the other process's points (its last word says how many are queued).
    stopped = [line for line in first.log().splitlines() if "daemon_stopped" in line]
    assert stopped and '"queued": 300' in stopped[-1]


# the writer -----------------------------------------------------------------------------------------------


async def test_close_waits_for_the_writer_and_loses_no_reading(tmp_path: Path) -> None:
    for attempt in range(30):
        path = tmp_path / f"b{attempt}.db"
        buf = Buffer(path, commit_interval_ms=1)
        await buf.open()
        writer = asyncio.create_task(buf.run_writer())
        first = buf.submit([Point("pump", 1, BASE_TS, 1.0)])
        await asyncio.sleep(0.001 * (attempt % 5))
        late = buf.submit([Point("pump", 1, BASE_TS + 1, 2.0)])  # submitted during shutdown
        await buf.close()  # without stop_writer(): close itself must wait for the writer
        await writer
        await first
        await late
        again = Buffer(path)
        await again.open()
        assert (await again.ledger("pump"))["received"] == 2
        await again.close()


async def test_busy_file_delays_readings_and_never_drops_them(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with open_buffer(path) as buf:
        await buf.submit([Point("pump", 1, BASE_TS, 1.0)])
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

        async def release() -> None:
            await asyncio.sleep(0.3)
            other.execute("COMMIT")

        releasing = asyncio.create_task(release())
        await buf.submit([Point("pump", 1, BASE_TS + 1, 2.0)])  # waits out the lock (busy timeout), then commits
        await releasing
        other.close()
        counts = await buf.ledger("pump")
        assert counts["received"] == 2 and buf.ingest_failed == {}


async def test_sqlite_errors_reach_callers_as_store_errors(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.db")
    await buf.open()
    await buf.close()
    with pytest.raises(StoreClosedError):
        await buf.max_id()
    assert issubclass(StoreClosedError, StoreError) and not issubclass(StoreError, BufferError)


# a budget that cannot be recorded is never spent ---------------------------------------------------------------


async def test_spend_that_cannot_be_committed_raises_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with open_buffer(path) as buf:
        await buf.submit([Point("pump", 1, BASE_TS, 1.0)])
        await buf.set_page_limit(await _pages(path))  # the file may not grow by a page
        failed = None
        for n in range(2000):
            try:
                await buf.spend(f"device-{n:04d}-" + "x" * 40, BASE_TS / 1000, points=1)
            except StoreFullError:
                failed = n
                break
        assert failed is not None, "the file never filled"
        await buf.set_device_state("pump", "offline", "test")  # a state write never raises: kept, retried
        await buf.set_page_limit(1_000_000)
        budget = await buf.budget(f"device-{failed:04d}-" + "x" * 40, BASE_TS / 1000)
        assert budget.messages_month == 0  # the refused budget was not counted (and its request not sent)
        assert (await buf.spend("pump", BASE_TS / 1000, points=1)).messages_month == 1
        await buf.submit([Point("pump", 1, BASE_TS + 1, 1.0)])  # a later commit carries the kept state
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT state, reason FROM device_state").fetchall() == [("offline", "test")]


async def _pages(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA page_count").fetchone()[0])
