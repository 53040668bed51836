"""`edgeforward demo`: a simulated MCU on a pseudo-terminal, a local cloud, the real daemon, an outage."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import tempfile
import time
import tty
from collections import Counter
from pathlib import Path

from rich.console import Console

from .cloudsim import CloudSim, SimDevice
from .config import parse_config
from .daemon import Daemon
from .logs import configure_logging
from .points import PinType

DEMO_TOKEN = "demo-device-token-0123456789abcdef"  # noqa: S105 (the simulated cloud's own token)
LINES_PER_SECOND = 10
OUTAGE_AFTER_S = 5.0
OUTAGE_FOR_S = 5.0
DRAIN_TIMEOUT_S = 25.0
TICK_S = 1.0


async def _mcu(master: int, seconds: float) -> int:
    """Print readings like an Arduino would; return how many lines were written."""
    written = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        temperature = 21.0 + 3 * math.sin(written / 20)
        line = f"v1={temperature:.2f} v2={written}\r\n"
        os.write(master, line.encode())
        written += 1
        if written % 37 == 0:
            os.write(master, b"garbage \xff\xfe line\r\n")
        await asyncio.sleep(1 / LINES_PER_SECOND)
    return written


async def _demo(seconds: float, console: Console) -> bool:
    sim = CloudSim([SimDevice(DEMO_TOKEN, "demo", {1: PinType.DOUBLE, 2: PinType.INTEGER})])
    server = await sim.start()
    master, slave = os.openpty()
    tty.setraw(slave)
    port_path = os.ttyname(slave)
    with tempfile.TemporaryDirectory(prefix="edgeforward-demo-") as tmp:
        config = parse_config(
            {
                "cloud": {"server": server, "timeout_s": 2},
                "buffer": {"path": str(Path(tmp) / "buffer.db")},
                "forward": {
                    "live_interval_s": 1,
                    "history_interval_s": 1,
                    "retry_initial_s": 0.2,
                    "retry_max_s": 1,
                },
                "port": [{"path": port_path, "device": "demo"}],
                "device": [{"name": "demo", "token": DEMO_TOKEN, "pins": {"v1": "double", "v2": "integer"}}],
            },
            Path(tmp) / "edgeforward.toml",
        )
        console.print(f"[bold]edgeforward demo[/]: MCU on {port_path}, cloud at {server}, buffer in {tmp}")
        daemon = Daemon(config)
        stop = asyncio.Event()
        runner = asyncio.create_task(daemon.run(stop), name="daemon")
        await daemon.ready.wait()
        mcu = asyncio.create_task(_mcu(master, seconds), name="mcu")
        started = time.monotonic()
        outage_on = outage_off = False
        while not mcu.done() or daemon.buffer.queued_total > 0:
            elapsed = time.monotonic() - started
            if not outage_on and elapsed >= OUTAGE_AFTER_S:
                sim.outage, outage_on = "503", True
                console.print(f"[red]t={elapsed:4.1f}s  cloud outage begins (HTTP 503)[/]")
            if outage_on and not outage_off and elapsed >= OUTAGE_AFTER_S + OUTAGE_FOR_S:
                sim.outage, outage_off = None, True
                console.print(f"[green]t={elapsed:4.1f}s  cloud is back[/]")
            counts = await daemon.buffer.ledger("demo")
            console.print(
                f"t={elapsed:4.1f}s  {daemon.forwarders['demo'].state:8}  received {counts['received']:4}  "
                f"live {counts['delivered_live']:4}  history {counts['delivered_history']:4}  "
                f"queued {counts['queued']:4}"
            )
            if mcu.done() and elapsed > seconds + DRAIN_TIMEOUT_S:
                break
            await asyncio.sleep(TICK_S)
        lines = await mcu
        await asyncio.sleep(0.5)
        stop.set()
        await runner
        counts = await _final_ledger(config.buffer.path)
        os.close(master)
        os.close(slave)
    await sim.stop()
    return _summary(console, lines, counts, sim)


async def _final_ledger(path: str) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute(
            "SELECT received, delivered_live, delivered_history, queued, expired, dropped, rejected, downsampled "
            "FROM ledger"
        ).fetchone()
    keys = (
        "received",
        "delivered_live",
        "delivered_history",
        "queued",
        "expired",
        "dropped",
        "rejected",
        "downsampled",
    )
    return dict(zip(keys, row, strict=True))


def _summary(console: Console, lines: int, counts: dict[str, int], sim: CloudSim) -> bool:
    in_cloud = sim.points(DEMO_TOKEN)
    by_path = Counter(p.path for p in in_cloud)
    readings = Counter(p.value for p in in_cloud if p.pin == 2)
    duplicates = sum(1 for n in readings.values() if n > 1)
    missing = sum(1 for i in range(lines) if readings[i] == 0)
    delivered = counts["delivered_live"] + counts["delivered_history"]
    adds_up = counts["received"] == sum(v for k, v in counts.items() if k != "received")
    console.print()
    console.print("[bold]summary[/]")
    console.print(f"  MCU printed            {lines} readings ({lines * 2} points) and some garbage lines")
    console.print(f"  received (committed)   {counts['received']}")
    console.print(f"  delivered live         {counts['delivered_live']}  (multi-pin GET, stamped by the cloud)")
    console.print(f"  delivered by batch     {counts['delivered_history']}  (timestamped POST, the outage backlog)")
    console.print(f"  queued                 {counts['queued']}")
    console.print(
        f"  cloud recorded         {len(in_cloud)} points ({by_path['live']} live, {by_path['history']} history)"
    )
    console.print(f"  missing / duplicated   {missing} / {duplicates}")
    ok = (
        counts["received"] == lines * 2
        and delivered == counts["received"]
        and len(in_cloud) == delivered
        and missing == 0
        and duplicates == 0
        and adds_up
    )
    verdict = "[green]nothing lost, nothing sent twice[/]" if ok else "[red]MISMATCH[/]"
    console.print(f"  ledger adds up         {adds_up}: {verdict}")
    return ok


def run_demo(seconds: float = 20.0) -> int:
    """Run the demonstration; exit code 0 when every reading reached the cloud exactly once."""
    configure_logging("warning", "console")
    console = Console()
    ok = asyncio.run(_demo(seconds, console))
    return 0 if ok else 1
