"""`edgeforward demo`: a simulated MCU on a pseudo-terminal, a local cloud, the real daemon, an outage."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
import time
import tty
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
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
EVENTS_MIN_LINES = 5  # the events panel, borders included, on the smallest terminal


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


@dataclass(frozen=True, slots=True)
class Plan:
    """What the demo will do, and when (seconds after the MCU starts)."""

    seconds: float
    outage_from_s: float
    outage_until_s: float
    port_path: str
    server: str

    def intro(self) -> str:
        """Say up front what will happen and what live and history mean."""
        return (
            f"A simulated MCU prints {LINES_PER_SECOND} readings/s (and some garbage) on {self.port_path} for "
            f"{self.seconds:g} s; the real daemon buffers them and forwards them to a local cloud.\n"
            f"t={self.outage_from_s:.0f}-{self.outage_until_s:.0f} s: the cloud is down (HTTP 503), readings "
            "queue up; then the queue drains and the demo ends.\n"
            "live: the newest value of each pin, sent at once, stamped by the cloud. history: every other point, "
            "sent later with its own timestamp."
        )


class EventLog(io.StringIO):
    """The daemon's log as a stream: each JSON line becomes one event line of the demo, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.started = time.monotonic()
        self._partial = ""

    def elapsed(self) -> float:
        """Seconds since the MCU started (0 before)."""
        return max(0.0, time.monotonic() - self.started)

    def add(self, text: str) -> None:
        """Record one event, stamped with the demo's time."""
        self.events.append(f"t={self.elapsed():4.1f}s  {text}")

    def write(self, data: str) -> int:
        """Take what the log handler writes; whole lines become events."""
        lines = (self._partial + data).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.add(_log_event(line))
        return len(data)

    def isatty(self) -> bool:
        """Not a terminal: the log renders JSON lines, which this stream reads back."""
        return False


def _log_event(line: str) -> str:
    """One daemon log line as an event: "warning line_rejected port=... reason=syntax"."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    fields = " ".join(
        f"{key}={value}"
        for key, value in record.items()
        if key not in ("event", "level", "timestamp", "logger") and value not in (None, "", 0)
    )
    return f"{record.get('level', 'log')} {record.get('event', '')} {fields}".rstrip()


def frame_line(frame: Frame) -> str:
    """Return one tick as a plain line (headless mode)."""
    counts = frame.counts
    return (
        f"t={frame.elapsed_s:4.1f}s  cloud {frame.cloud:6}  {frame.state:8}  lines {frame.port.lines_ok:4} ok "
        f"{frame.port.lines_bad:2} bad  received {counts['received']:4}  live {counts['delivered_live']:4}  "
        f"history {counts['delivered_history']:4}  queued {counts['queued']:4}  messages {frame.messages_month:4}"
    )


class View(Group):
    """One tick's view, and how many events it had no room for."""

    def __init__(self, *renderables: RenderableType, hidden: int) -> None:
        super().__init__(*renderables)
        self.hidden = hidden


def frame_view(frame: Frame, plan: Plan, console: Console, height: int) -> View:
    """Return one tick as a view `height` lines tall: the plan, the counters, progress, and the newest events."""
    counts = frame.counts
    cloud_style = "green" if frame.cloud == "up" else "bold red"
    state_style = {"online": "green", "offline": "red"}.get(frame.state, "yellow")
    intro = Panel(Text(plan.intro()), title="edgeforward demo: what happens", title_align="left")
    header = Text.assemble(
        (f"t={frame.elapsed_s:4.1f}s", "bold"),
        "  cloud ",
        (frame.cloud, cloud_style),
        "  device ",
        (frame.state, state_style),
        f" ({frame.reason})" if frame.reason else "",
    )
    header.overflow = "fold"
    numbers = Table.grid(padding=(0, 2))
    numbers.add_column(style="dim", no_wrap=True)
    numbers.add_column(overflow="fold")
    numbers.add_column(style="dim", no_wrap=True)
    numbers.add_column(overflow="fold")
    bad = ", ".join(f"{k} {v}" for k, v in sorted(frame.port.bad_reasons.items()))
    oldest = "" if frame.oldest_age_s is None else f" (oldest {frame.oldest_age_s:.0f} s)"
    numbers.add_row("lines", f"{frame.port.lines_ok} ok, {frame.port.lines_bad} bad", "bad", bad or "-")
    numbers.add_row("received", str(counts["received"]), "queued", Text(f"{counts['queued']}{oldest}", style="bold"))
    numbers.add_row("live", str(counts["delivered_live"]), "history", str(counts["delivered_history"]))
    numbers.add_row("messages", str(frame.messages_month), "points today", str(frame.points_today))
    done = counts["received"] - counts["queued"]
    progress = Table.grid(padding=(0, 1))
    progress.add_column(no_wrap=True)
    progress.add_column(ratio=1)
    progress.add_row("delivered", ProgressBar(total=max(1, counts["received"]), completed=done))
    top = Group(intro, header, numbers, progress)
    used = len(console.render_lines(top, console.options, pad=False))
    events, hidden = _events_panel(frame.events, console, max(EVENTS_MIN_LINES, height - used))
    return View(top, events, hidden=hidden)


def _events_panel(events: tuple[str, ...], console: Console, height: int) -> tuple[Panel, int]:
    """The newest events that fit in `height` lines (borders included), oldest first; older ones counted."""
    width = max(10, console.options.max_width - 4)
    room = height - 2
    shown: list[Text] = []
    for event in reversed(events):
        text = Text(event, style=_event_style(event))
        lines = len(text.wrap(console, width))
        if lines > room:
            break
        shown.insert(0, text)
        room -= lines
    earlier = len(events) - len(shown)
    title = f"events ({earlier} earlier, all of them listed at the end)" if earlier else "events"
    body = Text("\n").join(shown) if shown else Text("no events yet", style="dim")
    # As tall as the events need while they fit, then all the room there is.
    needed = sum(len(text.wrap(console, width)) for text in shown) + 2
    panel = Panel(body, title=title, title_align="left", height=max(EVENTS_MIN_LINES, min(height, needed)))
    return panel, earlier


def _event_style(event: str) -> str:
    if " warning " in event or " error " in event:
        return "yellow"
    return ""


def all_events_panel(events: Sequence[str]) -> Panel:
    """Every event of the run, in order (printed once the live view has ended)."""
    body = Text("\n").join(Text(event, style=_event_style(event)) for event in events)
    return Panel(body, title=f"events (all {len(events)})", title_align="left")


async def _demo(seconds: float, console: Console, *, headless: bool) -> bool:
    sim = CloudSim([SimDevice(DEMO_TOKEN, "demo", {1: PinType.DOUBLE, 2: PinType.INTEGER})])
    server = await sim.start()
    master, slave = os.openpty()
    tty.setraw(slave)
    port_path = os.ttyname(slave)
    plan = Plan(
        seconds=seconds,
        outage_from_s=seconds * OUTAGE_AFTER_SHARE,
        outage_until_s=seconds * (OUTAGE_AFTER_SHARE + OUTAGE_SHARE),
        port_path=port_path,
        server=server,
    )
    log = EventLog()
    configure_logging("warning", "json", stream=log)  # the daemon's log goes to the events, never the screen
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
        if headless:
            for line in plan.intro().splitlines():
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            console.print(f"buffer in {tmp}", markup=False, highlight=False, soft_wrap=True)
        daemon = Daemon(config)
        stop = asyncio.Event()
        runner = asyncio.create_task(daemon.run(stop), name="daemon")
        await daemon.ready.wait()
        log.started = time.monotonic()
        mcu = asyncio.create_task(_mcu(master, seconds), name="mcu")
        log.add(f"MCU starts printing on {port_path}; daemon running, buffer in {tmp}")
        story = _Story(plan, sim, log)
        printed = hidden = 0
        live = (
            None if headless else Live(console=console, auto_refresh=False, transient=False, vertical_overflow="crop")
        )
        with live if live is not None else contextlib.nullcontext():
            while True:
                elapsed = log.elapsed()
                story.before(elapsed)
                frame = await _frame(daemon, sim, elapsed, ())
                finished = story.after(frame, mcu.done())
                frame = dataclasses.replace(frame, events=tuple(log.events))
                if live is not None:
                    view = frame_view(frame, plan, console, console.size.height - 1)
                    hidden = view.hidden
                    live.update(view, refresh=True)
                else:
                    for event in log.events[printed:]:
                        console.print(event, markup=False, highlight=False, soft_wrap=True)
                    printed = len(log.events)
                    console.print(frame_line(frame), markup=False, highlight=False, soft_wrap=True)
                if finished or (mcu.done() and elapsed > seconds + DRAIN_TIMEOUT_S):
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
    if live is not None:
        if hidden:  # the live view had no room for every event: list them all once it has ended
            console.print(all_events_panel(log.events))
    else:
        for event in log.events[printed:]:
            console.print(event, markup=False, highlight=False, soft_wrap=True)
    return _summary(console, lines, counts, sim)


class _Story:
    """The demo's own events: the outage it makes, and what it sees happen, each once and in order."""

    def __init__(self, plan: Plan, sim: CloudSim, log: EventLog) -> None:
        self.plan = plan
        self.sim = sim
        self.log = log
        self.outage_on = self.outage_off = self.drained = False
        self.first_reading = False
        self.state = "unknown"

    def before(self, elapsed: float) -> None:
        """Start and end the outage on time."""
        if not self.outage_on and elapsed >= self.plan.outage_from_s:
            self.sim.outage, self.outage_on = "503", True
            self.log.add("cloud outage begins (HTTP 503): readings queue up in the buffer")
        if self.outage_on and not self.outage_off and elapsed >= self.plan.outage_until_s:
            self.sim.outage, self.outage_off = None, True
            self.log.add("cloud is back: the backlog drains by timestamped batches (history)")

    def after(self, frame: Frame, mcu_done: bool) -> bool:
        """Note what the frame shows that is new; return True once the run is over."""
        if not self.first_reading and frame.counts["received"]:
            self.first_reading = True
            self.log.add(f"first readings committed to the buffer ({frame.counts['received']} points)")
        if frame.state != self.state:
            self.state = frame.state
            self.log.add(f"device demo {frame.state}" + (f" ({frame.reason})" if frame.reason else ""))
        if mcu_done and not self.drained and frame.counts["queued"] == 0 and self.outage_off:
            self.drained = True
            self.log.add("MCU stopped; queue empty")
        return self.drained


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
    console = Console()
    ok = asyncio.run(_demo(seconds, console, headless=headless or not console.is_terminal))
    return 0 if ok else 1
