"""Wear: bytes written to disk per point (group commit vs each point alone vs every 0.1 s), bytes on the wire."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from edgeforward.config import CloudConfig, Device, ForwardConfig, Limits, PinSpec
from edgeforward.forward import Forwarder
from edgeforward.points import Point
from edgeforward.store import Buffer, Committed
from tests.conftest import wait_for

from .bench_drain import _batches
from .common import DEVICE, PIN_TYPES, PINS, POLL_S, TOKEN, CloudSimProcess, Result, backlog_copy, io_counters

NAME = "wear"
ALONE_POINTS = 1_200
RATES = ((100, 3.0), (1_000, 2.0))  # (lines/s, seconds); 4 points a line
TICK_S = 0.01
GROUP_COMMIT_MS = 5.0  # the default commit_interval_ms
INTERVAL_COMMIT_MS = 100.0
LIVE_LINES = 10
LIVE_LINE_INTERVAL_S = 0.3
LIVE_INTERVAL_S = 0.2
HISTORY_POINTS = 100_000
WIRE_TIMEOUT_S = 120.0
PROXY_READ_BYTES = 65536


def _value(line: int, pin: int) -> float:
    return line % 100 + pin / 10


async def _disk_bytes(path: Path, commit_interval_ms: float, rate: float, seconds: float) -> tuple[int, int, int]:
    """(bytes written, points, commits): lines of 4 points at `rate` lines/s; rate 0 = each point alone."""
    buffer = Buffer(path, synchronous="FULL", commit_interval_ms=commit_interval_ms)
    await buffer.open()
    writer = asyncio.create_task(buffer.run_writer())
    before = io_counters()["write_bytes"]
    points = 0
    if rate == 0:
        for n in range(ALONE_POINTS):
            await buffer.submit([Point(DEVICE, PINS[n % len(PINS)], time.time_ns() // 1_000_000, float(n))])
        points = ALONE_POINTS
    else:
        per_tick = max(1, round(rate * TICK_S))
        started = time.monotonic()
        last: asyncio.Future[None] | None = None
        line = 0
        for tick in range(round(seconds / TICK_S)):
            await asyncio.sleep(max(0.0, started + tick * TICK_S - time.monotonic()))
            now = time.time_ns() // 1_000_000
            for _ in range(per_tick):
                last = buffer.submit([Point(DEVICE, pin, now, _value(line, pin)) for pin in PINS])
                line += 1
        assert last is not None
        await last
        points = line * len(PINS)
    commits = buffer.commits
    buffer.stop_writer()
    await writer
    await buffer.close()  # its checkpoint writes the WAL into the database: part of the cost
    return io_counters()["write_bytes"] - before, points, commits


class _CountingProxy:
    """A TCP relay on loopback counting the bytes each way (HTTP, before any TLS)."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self.up = 0
        self.down = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, upward: bool) -> None:
            try:
                while data := await source.read(PROXY_READ_BYTES):
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(
            pipe(reader, upstream_writer, True), pipe(upstream_reader, writer, False), return_exceptions=True
        )


def _notify(forwarder: Forwarder, committed: Sequence[Committed]) -> None:
    """What the daemon does after a commit: tell the device's forwarder which pins have new points."""
    for item in committed:
        if item.device == DEVICE:
            forwarder.notify(item.pins)


async def _wire(path: Path, sim_port: int, *, live: bool) -> tuple[int, int, int, int]:
    """(request bytes, response bytes, points delivered, requests) for the live or the history path."""
    proxy = _CountingProxy(sim_port)
    url = await proxy.start()
    buffer = Buffer(path)
    await buffer.open()
    device = Device(DEVICE, TOKEN, {pin: PinSpec(type=kind) for pin, kind in PIN_TYPES.items()})
    cloud = CloudConfig(server=url, limits=Limits(points_per_day=0, messages_per_month=0, requests_per_second=1000))
    forward = ForwardConfig(live_interval_s=LIVE_INTERVAL_S if live else 0, history_interval_s=60)
    writer = asyncio.create_task(buffer.run_writer())
    delivered = 0
    try:
        async with aiohttp.ClientSession() as session:
            forwarder = Forwarder(device, buffer, session, cloud, forward)
            buffer.add_listener(functools.partial(_notify, forwarder))
            task = asyncio.create_task(forwarder.run())
            try:
                async with asyncio.timeout(WIRE_TIMEOUT_S):
                    if live:
                        for line in range(LIVE_LINES):
                            now = time.time_ns() // 1_000_000
                            await buffer.submit([Point(DEVICE, pin, now, _value(line, pin)) for pin in PINS])
                            await asyncio.sleep(LIVE_LINE_INTERVAL_S)
                await wait_for(lambda: buffer.queued_total == 0, WIRE_TIMEOUT_S, POLL_S)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            requests = forwarder.snapshot().outcomes["ok"]
        ledger = await buffer.ledger(DEVICE)
        delivered = ledger["delivered_live" if live else "delivered_history"]
    finally:
        buffer.stop_writer()
        await writer
        await buffer.close()
        await proxy.stop()
    return proxy.up, proxy.down, delivered, requests


def run(work: Path) -> list[Result]:
    """Disk bytes per point for three commit policies, and wire bytes per point for both cloud paths."""
    directory = work / "wear"
    directory.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    alone_bytes, alone_points, alone_commits = asyncio.run(_disk_bytes(directory / "alone.db", 0, 0, 0))
    alone = alone_bytes / alone_points
    for rate, seconds in RATES:
        for label, interval in (("group commit (5 ms)", GROUP_COMMIT_MS), ("commit every 0.1 s", INTERVAL_COMMIT_MS)):
            written, points, commits = asyncio.run(
                _disk_bytes(directory / f"{rate}-{interval}.db", interval, rate, seconds)
            )
            results.append(
                Result(
                    NAME,
                    f"disk, {label}, {rate} lines/s",
                    written / points,
                    "bytes/point",
                    alone,
                    "each point committed alone",
                    "report (lower is better)",
                    None,
                    {"points": points, "commits": commits, "bytes": written, "alone_commits": alone_commits},
                )
            )
    with CloudSimProcess(directory) as sim:
        up, down, delivered, requests = asyncio.run(_wire(directory / "live.db", sim.port, live=True))
        payload = sum(len("&".join(f"v{pin}={_value(line, pin)}" for pin in PINS)) for line in range(LIVE_LINES)) / (
            LIVE_LINES * len(PINS)
        )
        results.append(
            Result(
                NAME,
                "wire, live GET batch/update (4 pins a line)",
                up / max(delivered, 1),
                "bytes/point",
                payload,
                "query values alone (pin=value)",
                "report (lower is better)",
                None,
                {"request_bytes": up, "response_bytes": down, "points": delivered, "requests": requests},
            )
        )
        history_db = directory / "history.db"
        backlog_copy(work, HISTORY_POINTS, history_db)
        body = sum(len(b) for _, b in _batches(history_db)) / HISTORY_POINTS
        up, down, delivered, requests = asyncio.run(_wire(history_db, sim.port, live=False))
        results.append(
            Result(
                NAME,
                "wire, history POST batch/update",
                up / max(delivered, 1),
                "bytes/point",
                body,
                "JSON body alone ([ts,value])",
                "report (lower is better)",
                None,
                {"request_bytes": up, "response_bytes": down, "points": delivered, "requests": requests},
            )
        )
    return results
