"""The commit window: readings wait for it, budgets and deliveries do not, facts ride later commits."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from edgeforward.cloudsim import CloudSim
from edgeforward.config import COMMIT_INTERVAL_MAX_MS
from edgeforward.points import Point
from edgeforward.store.writer import LIFECYCLE_WAIT_MAX_S

from .conftest import TOKEN, DaemonProcess, Pty, ledger_adds_up, open_buffer, wait_for, write_config

BASE_TS = 1_764_000_000_000
# Generous against a loaded machine, and still far below the window the writes must not wait out.
WELL_BEFORE_THE_WINDOW_S = COMMIT_INTERVAL_MAX_MS / 1000 / 2


def reading(n: int) -> list[Point]:
    return [Point("pump", 1, BASE_TS + n, float(n)), Point("pump", 2, BASE_TS + n, n)]


async def test_a_budget_commits_at_once_and_carries_the_readings_before_it(tmp_path: Path) -> None:
    async with open_buffer(tmp_path / "b.db", commit_interval_ms=COMMIT_INTERVAL_MAX_MS) as buffer:
        await buffer.device_id("pump")
        committed = buffer.submit(reading(1))
        started = time.monotonic()
        budget = await buffer.spend("pump", time.time(), points=2)
        assert time.monotonic() - started < WELL_BEFORE_THE_WINDOW_S
        assert budget.messages_month == 1
        assert committed.done() and committed.exception() is None  # the reading rode the budget's commit


async def test_a_delivery_never_waits_out_the_window(tmp_path: Path) -> None:
    async with open_buffer(tmp_path / "b.db", commit_interval_ms=COMMIT_INTERVAL_MAX_MS) as buffer:
        await buffer.device_id("pump")
        buffer.submit(reading(1))
        await buffer.spend("pump", time.time())
        queued = await buffer.oldest("pump", 1, 10)
        started = time.monotonic()
        assert await buffer.deliver("pump", [p.id for p in queued], "history") == 1
        assert time.monotonic() - started < WELL_BEFORE_THE_WINDOW_S
        assert LIFECYCLE_WAIT_MAX_S < WELL_BEFORE_THE_WINDOW_S


async def test_facts_return_at_once_and_ride_the_next_commit(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with open_buffer(path, commit_interval_ms=5) as buffer:
        await buffer.device_id("pump")
        before = buffer.commits
        await buffer.set_device_state("pump", "online", None)  # returns before any commit
        await buffer.save_ports([("/dev/ttyACM0", "open", 1, 0, 0, 0, "{}")])
        assert buffer.commits == before
        await buffer.submit(reading(1))  # the next commit carries the reading and both facts
        assert buffer.commits == before + 1
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT state FROM device_state").fetchone() == ("online",)
            assert db.execute("SELECT lines_ok FROM ports").fetchone() == (1,)


async def test_history_flows_at_the_longest_window_the_config_accepts(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(
        tmp_path,
        str(cloud.url),
        [{"path": pty_port.path, "device": "pump"}],
        [{"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer"}}],
        forward={"live_interval_s": 0.5, "history_interval_s": 1},
        limits={"points_per_day": 0, "messages_per_month": 0},
        buffer={"commit_interval_ms": COMMIT_INTERVAL_MAX_MS},
    )
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    lines = 60
    for n in range(lines):
        pty_port.write(f"v1={n}.5 v2={n}\n")
        await asyncio.sleep(0.05)

    def all_delivered() -> bool:
        entry = daemon.status()["devices"]["pump"]
        return bool(entry["received"] == 2 * lines and entry["queued"] == 0)

    # One window for the first commit, then every request's budget carries the readings queued before it.
    await wait_for(all_delivered, 4 * COMMIT_INTERVAL_MAX_MS / 1000, 0.5)
    entry = daemon.status()["devices"]["pump"]
    assert entry["delivered_history"] > 0 and ledger_adds_up(entry)
    assert sorted(p.value for p in cloud.points(TOKEN, 2)) == list(range(lines))
    assert daemon.stop() == 0
