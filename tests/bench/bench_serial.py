"""Serial: one pty at full speed through SerialSource, against a raw os.read loop of the same bytes."""

from __future__ import annotations

import asyncio
import os
import time
import tty
from collections.abc import Sequence
from pathlib import Path

from edgeforward.config import load_config
from edgeforward.ingest.pipeline import PortPipeline
from edgeforward.ingest.source import SerialSource
from edgeforward.points import Point
from edgeforward.store import Buffer, ResendKey
from tests.conftest import wait_for

from .common import CLOSED_SERVER, DEVICE, POLL_S, Feeder, Result, adds_up, kv_lines, ledger, ptys, write_config

NAME = "serial"
LINES = 2_000_000
PIPELINE_LINES = 200_000
TARGET_LINES_PER_S = 50_000
OPEN_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0
READ_CHUNK_BYTES = 65536


async def _through_source(path: str, master: int, data: Path, total: int) -> tuple[float, int, int]:
    counted = 0
    done = asyncio.Event()

    def on_line(raw: bytes, received_ms: int, first: bool) -> None:
        nonlocal counted
        counted += 1
        if counted >= total:
            done.set()

    source = SerialSource(path, 115_200, on_line)
    reader = asyncio.create_task(source.run())
    feeder = Feeder(data, [master])
    try:
        await wait_for(lambda: source.stats.state == "open", OPEN_TIMEOUT_S, POLL_S)
        started = feeder.go()
        async with asyncio.timeout(READ_TIMEOUT_S):
            await done.wait()
        elapsed = time.perf_counter() - started
    finally:
        feeder.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return elapsed, counted, source.stats.lines_bad


async def _through_pipeline(directory: Path, path: str, master: int, data: Path, total: int) -> tuple[float, int]:
    """Lines/s accepted and committed by the daemon's PortPipeline (parse, submit, group commit)."""
    config = load_config(write_config(directory, server=CLOSED_SERVER, ports=[{"path": path, "device": DEVICE}]))
    buffer = Buffer(directory / "buffer.db", synchronous="FULL", commit_interval_ms=config.buffer.commit_interval_ms)
    await buffer.open()
    last: list[asyncio.Future[None]] = []

    def submit(points: Sequence[Point], *, resend: ResendKey | None = None) -> asyncio.Future[None]:
        future = buffer.submit(points, resend=resend)
        last[:] = [future]
        return future

    pipeline = PortPipeline(config.ports[0], config, submit)
    writer = asyncio.create_task(buffer.run_writer())
    reader = asyncio.create_task(pipeline.source.run())
    feeder = Feeder(data, [master])
    stats = pipeline.stats
    try:
        await wait_for(lambda: stats.state == "open", OPEN_TIMEOUT_S, POLL_S)
        started = feeder.go()
        await wait_for(lambda: stats.lines_ok + stats.lines_bad + stats.lines_ignored >= total, READ_TIMEOUT_S, POLL_S)
        await last[0]
        elapsed = time.perf_counter() - started
    finally:
        feeder.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        buffer.stop_writer()
        await writer
        await buffer.close()
    return elapsed, stats.lines_ok


def _raw_read(path: str, master: int, data: Path, total: int) -> tuple[float, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        feeder = Feeder(data, [master])
        try:
            counted = 0
            started = feeder.go()
            deadline = started + READ_TIMEOUT_S
            while counted < total and time.perf_counter() < deadline:
                counted += os.read(fd, READ_CHUNK_BYTES).count(b"\n")
            elapsed = time.perf_counter() - started
        finally:
            feeder.close()
    finally:
        os.close(fd)
    return elapsed, counted


def run(work: Path) -> list[Result]:
    """Lines/s through SerialSource and through a bare os.read loop, same bytes, same feeder."""
    directory = work / "serial"
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "lines.txt"
    data.write_bytes(b"".join(line + b"\n" for line in kv_lines(LINES)))
    with ptys(1) as (pty,):
        raw_s, raw_lines = _raw_read(pty.path, pty.master, data, LINES)
    with ptys(1) as (pty,):
        seconds, lines, bad = asyncio.run(_through_source(pty.path, pty.master, data, LINES))
    pipeline_data = directory / "pipeline-lines.txt"
    pipeline_data.write_bytes(b"".join(line + b"\n" for line in kv_lines(PIPELINE_LINES)))
    with ptys(1) as (pty,):
        pipeline_s, accepted = asyncio.run(
            _through_pipeline(directory / "pipeline", pty.path, pty.master, pipeline_data, PIPELINE_LINES)
        )
    counts = ledger(directory / "pipeline" / "buffer.db")
    rate = lines / seconds
    pipeline_rate = accepted / pipeline_s
    lossless = lines == LINES and bad == 0 and raw_lines == LINES
    return [
        Result(
            NAME,
            "1 pty at full speed, lines framed by SerialSource",
            rate,
            "lines/s",
            raw_lines / raw_s,
            "raw os.read loop counting newlines",
            f">= {TARGET_LINES_PER_S:,} lines/s, no loss",
            rate >= TARGET_LINES_PER_S and lossless,
            {
                "lines_sent": LINES,
                "lines_framed": lines,
                "lines_bad": bad,
                "raw_lines": raw_lines,
                "bytes": data.stat().st_size,
            },
        ),
        Result(
            NAME,
            "1 pty at full speed, lines parsed and committed",
            pipeline_rate,
            "lines/s",
            raw_lines / raw_s,
            "raw os.read loop counting newlines",
            f">= {TARGET_LINES_PER_S:,} lines/s, no loss",
            pipeline_rate >= TARGET_LINES_PER_S and accepted == PIPELINE_LINES and adds_up(counts),
            {"lines_sent": PIPELINE_LINES, "lines_accepted": accepted, "points_committed": counts["received"]},
        ),
    ]
