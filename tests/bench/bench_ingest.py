"""Ingest: lines -> parse -> group commit, in-process and from pseudo-terminals, against raw executemany."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from edgeforward.config import load_config
from edgeforward.ingest.parsers import parse_line
from edgeforward.ingest.parsers.common import ParseContext, Reading
from edgeforward.ingest.pipeline import PortPipeline
from edgeforward.points import Point, value_json
from edgeforward.store import Buffer, ResendKey
from tests.conftest import wait_for

from .common import (
    CLOSED_SERVER,
    DEVICE,
    PIN_TYPES,
    POINTS_PER_LINE,
    POLL_S,
    Feeder,
    Result,
    adds_up,
    create_buffer_file,
    kv_lines,
    ledger,
    ptys,
    write_config,
)

NAME = "ingest"
LINES_IN_PROCESS = 150_000
CHUNK_LINES = 2_000  # about one 64 KiB read of these lines: what one readiness event hands over
PTY_COUNT = 4
LINES_PER_PTY = 40_000
TARGET_RATIO = 0.25
TARGET_POINTS_PER_S = 100_000
OPEN_TIMEOUT_S = 10.0
INGEST_TIMEOUT_S = 120.0
INSERT = "INSERT INTO points (device_id, pin, ts, value) VALUES (?, ?, ?, ?)"


class _Tracker:
    """Passes submits through to the buffer and keeps the newest future (it resolves last)."""

    def __init__(self, buffer: Buffer) -> None:
        self._buffer = buffer
        self.last: asyncio.Future[None] | None = None

    def submit(self, points: Sequence[Point], *, resend: ResendKey | None = None) -> asyncio.Future[None]:
        self.last = self._buffer.submit(points, resend=resend)
        return self.last


async def _in_process(directory: Path, lines: list[bytes]) -> tuple[float, int, int]:
    config = load_config(write_config(directory, server=CLOSED_SERVER, ports=[{"path": "/dev/null", "device": DEVICE}]))
    buffer = Buffer(directory / "buffer.db", synchronous="FULL", commit_interval_ms=config.buffer.commit_interval_ms)
    await buffer.open()
    tracker = _Tracker(buffer)
    pipeline = PortPipeline(config.ports[0], config, tracker.submit)
    writer = asyncio.create_task(buffer.run_writer())
    started = time.perf_counter()
    for first in range(0, len(lines), CHUNK_LINES):
        received = time.time_ns() // 1_000_000
        for raw in lines[first : first + CHUNK_LINES]:
            pipeline.on_line(raw, received, False)
        await asyncio.sleep(0)
    assert tracker.last is not None
    await tracker.last
    elapsed = time.perf_counter() - started
    commits = buffer.commits
    buffer.stop_writer()
    await writer
    await buffer.close()
    assert pipeline.stats.lines_ok == len(lines), pipeline.stats
    return elapsed, len(lines) * POINTS_PER_LINE, commits


async def _from_ptys(directory: Path, lines: list[bytes], data: Path) -> tuple[float, int, int]:
    with ptys(PTY_COUNT) as opened:
        ports = [{"path": pty.path, "device": DEVICE} for pty in opened]
        config = load_config(write_config(directory, server=CLOSED_SERVER, ports=ports))
        buffer = Buffer(
            directory / "buffer.db", synchronous="FULL", commit_interval_ms=config.buffer.commit_interval_ms
        )
        await buffer.open()
        tracker = _Tracker(buffer)
        pipelines = [PortPipeline(port, config, tracker.submit) for port in config.ports]
        writer = asyncio.create_task(buffer.run_writer())
        readers = [asyncio.create_task(p.source.run()) for p in pipelines]
        feeder = Feeder(data, [pty.master for pty in opened])
        try:
            await wait_for(lambda: all(p.stats.state == "open" for p in pipelines), OPEN_TIMEOUT_S, POLL_S)
            total = len(lines) * PTY_COUNT
            started = feeder.go()
            await wait_for(
                lambda: sum(p.stats.lines_ok + p.stats.lines_bad + p.stats.lines_ignored for p in pipelines) >= total,
                INGEST_TIMEOUT_S,
                POLL_S,
            )
            assert tracker.last is not None
            await tracker.last
            elapsed = time.perf_counter() - started
        finally:
            feeder.close()
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        ok = sum(p.stats.lines_ok for p in pipelines)
        commits = buffer.commits
        buffer.stop_writer()
        await writer
        await buffer.close()
    assert ok == total, [p.stats for p in pipelines]
    return elapsed, total * POINTS_PER_LINE, commits


def _rows(lines: list[bytes]) -> list[tuple[int, int, int, str]]:
    """The rows edgeforward stores for these lines (parsed outside the timing)."""
    context = ParseContext({DEVICE: PIN_TYPES}, DEVICE, 0)
    received = time.time_ns() // 1_000_000
    rows: list[tuple[int, int, int, str]] = []
    for raw in lines:
        reading = parse_line(raw, "kv", context, received)
        if not isinstance(reading, Reading):
            raise TypeError(f"bench line refused: {raw!r}: {reading}")
        rows.extend((1, pin, received, value_json(value)) for pin, value in reading.values)
    return rows


def _raw(path: Path, rows: list[tuple[int, int, int, str]], batch: int) -> float:
    """Seconds for raw executemany of `rows`, one transaction per `batch` rows, synchronous=FULL, WAL."""
    create_buffer_file(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        started = time.perf_counter()
        for first in range(0, len(rows), batch):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, rows[first : first + batch])
            conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


def _result(name: str, seconds: float, points: int, commits: int, raw_s: float, ledger_ok: bool) -> Result:
    rate = points / seconds
    raw_rate = points / raw_s
    batch = points / max(commits, 1)
    return Result(
        NAME,
        name,
        rate,
        "points/s",
        raw_rate,
        f"raw executemany, {batch:,.0f} rows/txn",
        f">= {TARGET_RATIO:.0%} of raw and >= {TARGET_POINTS_PER_S:,} points/s",
        rate >= TARGET_RATIO * raw_rate and rate >= TARGET_POINTS_PER_S,
        {"points": points, "commits": commits, "mean_batch": round(batch, 1), "ledger_adds_up": ledger_ok},
    )


def run(work: Path) -> list[Result]:
    """Both ingest figures, each against raw executemany of the same rows in batches of the same size."""
    results: list[Result] = []
    lines = kv_lines(LINES_IN_PROCESS)
    directory = work / "ingest-inprocess"
    seconds, points, commits = asyncio.run(_in_process(directory, lines))
    ledger_ok = adds_up(ledger(directory / "buffer.db"))
    rows = _rows(lines)
    raw_s = _raw(directory / "raw.db", rows, max(1, round(points / commits)))
    results.append(_result("in-process (parse + group commit)", seconds, points, commits, raw_s, ledger_ok))

    pty_lines = kv_lines(LINES_PER_PTY)
    directory = work / "ingest-ptys"
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "lines.txt"
    data.write_bytes(b"".join(line + b"\n" for line in pty_lines))
    seconds, points, commits = asyncio.run(_from_ptys(directory, pty_lines, data))
    ledger_ok = adds_up(ledger(directory / "buffer.db"))
    rows = _rows(pty_lines) * PTY_COUNT
    raw_s = _raw(directory / "raw.db", rows, max(1, round(points / commits)))
    results.append(
        _result(f"{PTY_COUNT} ptys via SerialSource (full daemon path)", seconds, points, commits, raw_s, ledger_ok)
    )
    return results
