"""Stopping and logging as an operator sees them: SIGTERM right after start, the first bad line of each reason."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edgeforward.cloudsim import CloudSim
from edgeforward.ingest.pipeline import BAD_LINES_LOGGED_PER_MINUTE
from edgeforward.points import Point
from edgeforward.store import Buffer

from .conftest import TOKEN, DaemonProcess, Pty, wait_for, write_config

PUMP = {"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer"}}
STOP_WITHIN_S = 1.0
STARTS = 10
POLL_S = 0.002


async def test_close_after_reads_cancelled_mid_statement_checkpoints_at_once(tmp_path: Path) -> None:
    # A task stopped while its read is in SQLite's hands leaves that statement open; the WAL checkpoint of
    # close() used to wait the whole busy timeout (10 s) for it, and then gave up.
    buffer = Buffer(tmp_path / "buffer.db")
    await buffer.open()
    writer = asyncio.create_task(buffer.run_writer())
    await buffer.submit([Point("pump", 1, 1_764_000_000_000 + i, float(i)) for i in range(2000)])
    reads = [
        asyncio.create_task(buffer.pins_queued("pump")),
        asyncio.create_task(buffer.ledger("pump")),
        asyncio.create_task(buffer.oldest_ts("pump")),
    ]
    await asyncio.sleep(0)
    for read in reads:
        read.cancel()
    await asyncio.gather(*reads, return_exceptions=True)
    buffer.stop_writer()
    await writer
    started = time.monotonic()
    await buffer.close()
    elapsed = time.monotonic() - started
    wal = tmp_path / "buffer.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # the TRUNCATE checkpoint succeeded
    assert elapsed < STOP_WITHIN_S


async def test_sigterm_right_after_start_stops_within_a_second(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    for attempt in range(STARTS):
        home = tmp_path / f"run-{attempt}"
        home.mkdir()
        config = write_config(home, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP])
        daemon = daemon_factory(config)
        daemon.start()
        # The first instant after start: the forwarders' first reads are in flight.
        await wait_for(lambda daemon=daemon: "daemon_started" in daemon.log(), 20.0, POLL_S)  # type: ignore[misc]
        await asyncio.sleep(attempt * 0.002)
        signalled = time.monotonic()
        returncode = await asyncio.to_thread(daemon.stop)
        elapsed = time.monotonic() - signalled
        events = [json.loads(line)["event"] for line in daemon.log().splitlines() if line.startswith("{")]
        assert returncode == 0, daemon.log()
        assert "daemon_stopped" in events
        assert elapsed < STOP_WITHIN_S, (attempt, elapsed)


def test_sigterm_before_the_daemon_is_up_is_a_clean_stop(tmp_path: Path, pty_port: Pty) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", [{"path": pty_port.path, "device": "pump"}], [PUMP])
    # SIGTERM arrives while the config is being read, before the daemon installs its own handler.
    code = (
        "import os, signal, sys\n"
        "import edgeforward.cli as cli\n"
        "read = cli._load\n"
        "def load(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return read(*args, **kwargs)\n"
        "cli._load = load\n"
        f"sys.exit(cli.main(['run', '--config', {str(config)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_first_rejected_line_of_each_reason_is_always_logged(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP])
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    await wait_for(lambda: "serial port open" in daemon.log(), 20.0)
    pty_port.write("v1=1.5 v2=1\n")  # the first line after open may be a partial one: give it a good line
    burst = ["v7=1"] * 12 + ["v1=2.5 v2=2 ts=1764000000", "v1", "v1=x"]
    pty_port.write("".join(f"{line}\n" for line in burst))

    def rejected() -> dict[str, int]:
        counts: dict[str, int] = {}
        for line in daemon.log().splitlines():
            if line.startswith("{") and (event := json.loads(line))["event"] == "line_rejected":
                counts[event["reason"]] = counts.get(event["reason"], 0) + 1
        return counts

    await wait_for(lambda: {"bad_ts", "syntax", "bad_value"} <= rejected().keys(), 20.0)
    assert daemon.stop() == 0
    counts = rejected()
    # The first of each reason always; then BAD_LINES_LOGGED_PER_MINUTE a minute, whatever their reason.
    assert counts["unknown_pin"] == 1 + BAD_LINES_LOGGED_PER_MINUTE
    assert counts["bad_ts"] == counts["syntax"] == counts["bad_value"] == 1
