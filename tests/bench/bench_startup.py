"""Start-up: time from process start to daemon_started and to sd_notify READY=1 with a 10 M point backlog.

Each start finds the buffer's files out of the page cache (written back, then dropped with
posix_fadvise(DONTNEED), which touches only these files, not the machine's whole cache): what a gateway
reads from its SD card at boot. After a clean stop the store checks the header, size and schema before
READY and reads every page in the background after it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from pathlib import Path

from .common import CLOSED_SERVER, DEVICE, Daemon, Result, backlog_copy, ptys, write_config

NAME = "startup"
BACKLOG_POINTS = 10_000_000
RUNS = 3
READY_WAIT_S = 5.0  # after daemon_started: longer means the daemon does not send READY=1
TARGET_S = 2.0


def drop_from_page_cache(database: Path) -> int:
    """Write back and drop the cached pages of a buffer's files; return the bytes of the files dropped."""
    dropped = 0
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return dropped


def _start_once(directory: Path, port_path: str) -> tuple[float, float | None]:
    """(seconds to daemon_started, seconds to READY=1 or None) for one start of the daemon, cache cold."""
    config = write_config(directory, server=CLOSED_SERVER, ports=[{"path": port_path, "device": DEVICE}])
    drop_from_page_cache(directory / "buffer.db")
    notify_path = directory / "notify.sock"
    with contextlib.suppress(FileNotFoundError):
        notify_path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        with Daemon(config, env={"NOTIFY_SOCKET": str(notify_path)}) as daemon:
            to_started = daemon.wait_started()
            ready: float | None = None
            deadline = time.monotonic() + READY_WAIT_S
            while ready is None and (left := deadline - time.monotonic()) > 0:
                notify.settimeout(left)
                try:
                    message = notify.recv(4096)
                except TimeoutError:
                    break
                if b"READY=1" in message.split(b"\n"):
                    ready = time.monotonic() - daemon.started_at
    return to_started, ready


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) else None


def run(work: Path) -> list[Result]:
    """Median of RUNS starts with a 10 M backlog, beside RUNS starts with an empty buffer."""
    results: list[Result] = []
    timings: dict[int, tuple[list[float], list[float | None]]] = {}
    build_s = 0.0
    for backlog in (0, BACKLOG_POINTS):
        directory = work / f"startup-{backlog}"
        directory.mkdir(parents=True, exist_ok=True)
        if backlog:
            build_s = backlog_copy(work, backlog, directory / "buffer.db")
        started: list[float] = []
        ready: list[float | None] = []
        with ptys(1) as (pty,):
            for _ in range(RUNS):
                to_started, to_ready = _start_once(directory, pty.path)
                started.append(to_started)
                ready.append(to_ready)
        timings[backlog] = (started, ready)
    started, ready = timings[BACKLOG_POINTS]
    empty_started, empty_ready = timings[0]
    notes = {
        "runs": RUNS,
        "started_s": [round(v, 3) for v in started],
        "empty_started_s": [round(v, 3) for v in empty_started],
        "backlog_build_s": round(build_s, 1),
        "page_cache": "cold: the buffer's files dropped (posix_fadvise DONTNEED) before each start",
        "buffer_bytes": (work / f"startup-{BACKLOG_POINTS}" / "buffer.db").stat().st_size,
    }
    median_started = statistics.median(started)
    results.append(
        Result(
            NAME,
            "process start -> daemon_started, 10 M backlog, cold cache",
            median_started,
            "s",
            statistics.median(empty_started),
            "same, empty buffer",
            f"< {TARGET_S:.0f} s",
            median_started < TARGET_S,
            notes,
        )
    )
    median_ready, empty_median_ready = _median(ready), _median(empty_ready)
    if median_ready is None:
        results.append(
            Result(
                NAME,
                "process start -> READY=1, 10 M backlog, cold cache",
                float("nan"),
                "s",
                None,
                "no READY=1 received: sd_notify not wired",
                f"< {TARGET_S:.0f} s",
                False,
                {"ready_s": ready},
            )
        )
    else:
        results.append(
            Result(
                NAME,
                "process start -> READY=1, 10 M backlog, cold cache",
                median_ready,
                "s",
                empty_median_ready,
                "same, empty buffer",
                f"< {TARGET_S:.0f} s",
                median_ready < TARGET_S,
                {"ready_s": [None if v is None else round(v, 3) for v in ready]},
            )
        )
    return results
