"""Drain: points/s from a 1 M point backlog to cloudsim on loopback, against a bare aiohttp client."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from edgeforward.config import CloudConfig, Device, ForwardConfig, Limits, PinSpec
from edgeforward.forward import Forwarder
from edgeforward.store import Buffer

from .common import DEVICE, PIN_TYPES, TOKEN, CloudSimProcess, Result, adds_up, backlog_copy, cpu_seconds, ledger

NAME = "drain"
BACKLOG_POINTS = 1_000_000
BATCH_POINTS = 10_000  # the default batch_max_points of the plan and of cloudsim
REQUESTS_PER_SECOND = 10_000.0  # raised far beyond what loopback reaches
TARGET_RATIO = 0.5
DRAIN_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 60.0


def _batches(path: Path) -> list[tuple[int, bytes]]:
    """The history POST bodies of the backlog: per pin, oldest first, BATCH_POINTS each."""
    conn = sqlite3.connect(path)
    try:
        batches: list[tuple[int, bytes]] = []
        for pin in sorted(PIN_TYPES):
            rows = conn.execute("SELECT ts, value FROM points WHERE pin = ? ORDER BY ts, id", (pin,)).fetchall()
            for first in range(0, len(rows), BATCH_POINTS):
                body = "[" + ",".join(f"[{ts},{value}]" for ts, value in rows[first : first + BATCH_POINTS]) + "]"
                batches.append((pin, body.encode()))
        return batches
    finally:
        conn.close()


async def _sim_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/_sim/stats") as response:
        stats: dict[str, Any] = json.loads(await response.read())
        return stats


async def _bare(url: str, batches: list[tuple[int, bytes]]) -> tuple[float, int]:
    """Post the pre-built batches one after another, as fast as the server answers."""
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        for pin, body in batches:
            async with session.post(
                f"{url}/external/api/batch/update?token={TOKEN}&pin=v{pin}", data=body, headers=headers
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"bare client: {response.status}")
        elapsed = time.perf_counter() - started
        stats = await _sim_stats(session, url)
    return elapsed, int(stats["points"]["history"])


async def _forwarder(path: Path, url: str) -> tuple[float, int, int]:
    """Drain the backlog with edgeforward's Forwarder (live off, limits raised)."""
    buffer = Buffer(path)
    await buffer.open()
    device = Device(DEVICE, TOKEN, {pin: PinSpec(type=kind) for pin, kind in PIN_TYPES.items()})
    cloud = CloudConfig(
        server=url,
        timeout_s=HTTP_TIMEOUT_S,
        limits=Limits(points_per_day=0, messages_per_month=0, requests_per_second=REQUESTS_PER_SECOND),
    )
    forward = ForwardConfig(live_interval_s=0)
    writer = asyncio.create_task(buffer.run_writer())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
        forwarder = Forwarder(device, buffer, session, cloud, forward)
        started = time.perf_counter()
        task = asyncio.create_task(forwarder.run())
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while buffer.queued_total > 0:
                    if task.done():
                        task.result()
                        raise RuntimeError("forwarder stopped")
                    await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stats = await _sim_stats(session, url)
    requests = forwarder.snapshot().outcomes["ok"]
    buffer.stop_writer()
    await writer
    await buffer.close()
    return elapsed, int(stats["points"]["history"]), requests


def run(work: Path) -> list[Result]:
    """Drain rate of the Forwarder and of a bare client, each to its own fresh cloudsim process."""
    directory = work / "drain"
    db = directory / "buffer.db"
    build_s = backlog_copy(work, BACKLOG_POINTS, db)
    batches = _batches(db)
    with CloudSimProcess(directory) as sim:
        cpu_before = cpu_seconds(sim.pid)
        bare_s, bare_points = asyncio.run(_bare(sim.url, batches))
        bare_sim_busy = (cpu_seconds(sim.pid) - cpu_before) / bare_s
    with CloudSimProcess(directory) as sim:
        cpu_before = cpu_seconds(sim.pid)
        seconds, delivered, requests = asyncio.run(_forwarder(db, sim.url))
        sim_busy = (cpu_seconds(sim.pid) - cpu_before) / seconds
    counts = ledger(db)
    rate = delivered / seconds
    bare_rate = bare_points / bare_s
    return [
        Result(
            NAME,
            "1 M point backlog -> cloudsim (Forwarder)",
            rate,
            "points/s",
            bare_rate,
            f"bare aiohttp, same {len(batches)} bodies",
            f">= {TARGET_RATIO:.0%} of the bare client",
            rate >= TARGET_RATIO * bare_rate and delivered == BACKLOG_POINTS and adds_up(counts),
            {
                "backlog_build_s": round(build_s, 1),
                "delivered": delivered,
                "bare_delivered": bare_points,
                "requests": requests,
                "bare_requests": len(batches),
                "seconds": round(seconds, 2),
                "bare_seconds": round(bare_s, 2),
                "cloudsim_busy_bare": round(bare_sim_busy, 2),  # share of one core: 1.0 = cloudsim is the limit
                "cloudsim_busy_forwarder": round(sim_busy, 2),
                "ledger_adds_up": adds_up(counts),
                "delivered_history": counts["delivered_history"],
            },
        )
    ]
