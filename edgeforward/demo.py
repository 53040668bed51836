"""`edgeforward demo`: a simulated MCU on a pseudo-terminal, a local cloud, the real daemon, an outage."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import tempfile
import time
import tty
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .cloudsim import CloudSim, SimDevice
from .config import parse_config
from .daemon import Daemon
from .ingest.source import PortStats
from .logs import configure_logging
from .points import PinType
from .store import queries

DEMO_TOKEN = "demo-device-token-0123456789abcdef"  # noqa: S105 (the simulated cloud's own token)
LINES_PER_SECOND = 10
OUTAGE_AFTER_SHARE = 0.25  # of the MCU's run: the outage begins then...
OUTAGE_SHARE = 0.35  # ...and lasts this long, ending while the MCU still prints
DRAIN_TIMEOUT_S = 25.0
TICK_S = 0.5
EVENTS_SHOWN = 6


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


@dataclass(frozen=True, slots=True)
class Frame:
    """What the demo shows at one tick."""

    elapsed_s: float
    cloud: str
    state: str
    reason: str | None
    port: PortStats
    counts: dict[str, int]
    messages_month: int
    points_today: int
    oldest_age_s: float | None
    events: tuple[str, ...]


def frame_line(frame: Frame) -> str:
    """Return one tick as a plain line (headless mode)."""
    counts = frame.counts
    return (
        f"t={frame.elapsed_s:4.1f}s  cloud {frame.cloud:6}  {frame.state:8}  lines {frame.port.lines_ok:4} ok "
        f"{frame.port.lines_bad:2} bad  received {counts['received']:4}  live {counts['delivered_live']:4}  "
        f"history {counts['delivered_history']:4}  queued {counts['queued']:4}  messages {frame.messages_month:4}"
    )


def frame_view(frame: Frame, port_path: str, server: str) -> Group:
    """Return one tick as a rich view: ports, queue, budget, the outage and the drain."""
    counts = frame.counts
    cloud_style = "green" if frame.cloud == "up" else "bold red"
    state_style = {"online": "green", "offline": "red"}.get(frame.state, "yellow")
    header = Text.from_markup(
        f"[bold]edgeforward demo[/]  t={frame.elapsed_s:4.1f}s  cloud [{cloud_style}]{frame.cloud}[/]  "
        f"device [{state_style}]{frame.state}[/]" + (f" ({escape(frame.reason)})" if frame.reason else "")
    )
    port = Table(title="serial port (simulated MCU)", title_justify="left")
    for column in ("port", "state", "lines ok", "bad", "bad by reason"):
        port.add_column(column)
    port.add_row(
        escape(port_path),
        str(frame.port.state),
        str(frame.port.lines_ok),
        str(frame.port.lines_bad),
        ", ".join(f"{k} {v}" for k, v in sorted(frame.port.bad_reasons.items())) or "-",
    )
    queue = Table(title=f"buffer -> cloud ({escape(server)})", title_justify="left")
    for column in ("received", "delivered live", "delivered history", "queued", "oldest queued", "messages used"):
        queue.add_column(column, justify="right")
    queue.add_row(
        str(counts["received"]),
        str(counts["delivered_live"]),
        str(counts["delivered_history"]),
        f"[bold]{counts['queued']}[/]",
        "-" if frame.oldest_age_s is None else f"{frame.oldest_age_s:.0f} s",
        f"{frame.messages_month} (points today {frame.points_today})",
    )
    bar = ProgressBar(total=max(1, counts["received"]), completed=counts["received"] - counts["queued"], width=60)
    events = Text("\n".join(frame.events[-EVENTS_SHOWN:]) or "waiting for the first readings")
    return Group(header, port, queue, Text("delivered / received"), bar, Text("events", style="bold"), events)


async def _demo(seconds: float, console: Console, *, headless: bool) -> bool:
    sim = CloudSim([SimDevice(DEMO_TOKEN, "demo", {1: PinType.DOUBLE, 2: PinType.INTEGER})])
    server = await sim.start()
    master, slave = os.openpty()
    tty.setraw(slave)
    port_path = os.ttyname(slave)
    outage_after = seconds * OUTAGE_AFTER_SHARE
    outage_until = outage_after + seconds * OUTAGE_SHARE
    with tempfile.TemporaryDirectory(prefix="edgeforward-demo-") as tmp:
        config = parse_config(
            {
                # The local cloud has no monthly cap: live updates are not paced to a plan's messages here.
                "cloud": {"server": server, "timeout_s": 2, "limits": {"messages_per_month": 0}},
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
        events: list[str] = []
        outage_on = outage_off = drained = False
        printed = 0
        live = Live(console=console, auto_refresh=False, transient=False) if not headless else None
        with live if live is not None else contextlib.nullcontext():
            while True:
                elapsed = time.monotonic() - started
                if not outage_on and elapsed >= outage_after:
                    sim.outage, outage_on = "503", True
                    events.append(f"t={elapsed:4.1f}s  cloud outage begins (HTTP 503): readings queue up")
                if outage_on and not outage_off and elapsed >= outage_until:
                    sim.outage, outage_off = None, True
                    events.append(f"t={elapsed:4.1f}s  cloud is back: the backlog drains by timestamped batches")
                frame = await _frame(daemon, sim, elapsed, tuple(events))
                if mcu.done() and not drained and frame.counts["queued"] == 0 and outage_off:
                    drained = True
                    events.append(f"t={elapsed:4.1f}s  MCU stopped; queue empty")
                if live is not None:
                    live.update(frame_view(frame, port_path, server), refresh=True)
                else:
                    for event in events[printed:]:
                        console.print(event, markup=False, highlight=False, soft_wrap=True)
                    printed = len(events)
                    console.print(frame_line(frame), markup=False, highlight=False, soft_wrap=True)
                if drained or (mcu.done() and elapsed > seconds + DRAIN_TIMEOUT_S):
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


async def _frame(daemon: Daemon, sim: CloudSim, elapsed: float, events: tuple[str, ...]) -> Frame:
    forwarder = daemon.forwarders["demo"]
    counts = await daemon.buffer.ledger("demo")
    budget = await daemon.buffer.budget("demo", time.time())
    oldest = await daemon.buffer.oldest_ts("demo")
    return Frame(
        elapsed_s=elapsed,
        cloud="up" if sim.outage is None else f"{sim.outage} outage",
        state=str(forwarder.state),
        reason=forwarder.reason,
        port=daemon.pipelines[0].stats,
        counts=counts,
        messages_month=budget.messages_month,
        points_today=budget.points_day,
        oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest / 1000),
        events=events,
    )


async def _final_ledger(path: str) -> dict[str, int]:
    with queries.connect(Path(path)) as db:
        return queries.ledger_total(db)


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


def run_demo(seconds: float = 20.0, *, headless: bool = False) -> int:
    """Run the demonstration; exit code 0 when every reading reached the cloud exactly once."""
    configure_logging("warning", "console")
    console = Console()
    ok = asyncio.run(_demo(seconds, console, headless=headless or not console.is_terminal))
    return 0 if ok else 1
