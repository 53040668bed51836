"""`edgeforward status`: the ledger, budgets and port counters, read from the buffer database."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .config import Config
from .forward.planner import clear_eta_s
from .forward.state import parse_status_meta, status_meta_key
from .store import LEDGER_FIELDS, queries, running_pid

CONTRACT_LEDGER = ("received", "delivered", "queued", "expired", "dropped", "rejected", "downsampled")
UNLIMITED_WIDTH = 100_000
FORWARD_FIELDS = ("waiting_reason", "next_attempt_ts", "live_interval_s", "history_interval_s", "parked_pins")


def read_status(config: Config, *, now_s: float | None = None) -> dict[str, Any]:
    """Return the status document of ../CONTRACT.md (`status --json`), with extra fields."""
    now_s = time.time() if now_s is None else now_s
    devices: dict[str, dict[str, Any]] = {d.name: _empty_device() for d in config.devices}
    ports: dict[str, dict[str, Any]] = {p.path: _empty_port() for p in config.ports}
    daemon: dict[str, Any] = {"running": False, "pid": None}
    path = Path(config.buffer.path)
    exists = path.exists()
    if exists:
        with queries.connect(path) as db:
            _read_devices(queries.devices(db, now_s), devices)
            _read_ports(queries.ports(db), ports)
            meta = queries.meta(db)
            daemon = _read_daemon(path, meta)
            _read_forward(meta, devices, running=bool(daemon["running"]))
            recovery = _read_recovery(meta, queries.held_by_device(db), devices)
    else:
        recovery = {"buffer_recovery": None, "recoveries": 0, "clock": None, "held_unstamped": 0}
    for name, entry in devices.items():
        entry.update(_forecast(config, name, entry, now_s))
    document = {"devices": devices, "ports": ports, "daemon": daemon, "buffer": str(path), "buffer_exists": exists}
    return {**document, **recovery}


def _read_recovery(meta: dict[str, str], held: dict[str, int], devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the last recovery of a damaged buffer saved and lost, and readings a full disk refused."""
    failed = json.loads(meta["ingest_failed"]) if meta.get("ingest_failed") else {}
    for name, entry in devices.items():
        entry["ingest_failed"] = int(failed.get(name, 0))
        entry["held_for_clock"] = int(held.get(name, 0))
    recoveries = meta.get("recoveries", "0")
    unstamped = meta.get("held_unstamped", "0")
    return {
        "buffer_recovery": json.loads(meta["recovery"]) if meta.get("recovery") else None,
        "recoveries": int(recoveries) if recoveries.isdigit() else 0,
        "clock": json.loads(meta["clock"]) if meta.get("clock") else None,
        "held_unstamped": int(unstamped) if unstamped.isdigit() else 0,
    }


def _forecast(config: Config, name: str, entry: dict[str, Any], now_s: float) -> dict[str, Any]:
    """The device's limits, and when the backlog clears at the current budget."""
    limits = config.limits_of(name)
    clears = clear_eta_s(entry["queued"], limits.points_per_day, limits.points_per_day - entry["points_today"], now_s)
    return {
        "points_per_day_limit": limits.points_per_day,
        "messages_per_month_limit": limits.messages_per_month,
        "backlog_clears_in_s": None if clears is None else round(clears),
    }


def _read_forward(meta: dict[str, str], devices: dict[str, dict[str, Any]], *, running: bool) -> None:
    """What each forwarder published: why its points wait, the next attempt, the intervals in effect."""
    for name, entry in devices.items():
        published = parse_status_meta(meta.get(status_meta_key(name)))
        for key in FORWARD_FIELDS:
            entry[key] = published.get(key, entry[key])
        if not running:
            # Nothing is planned while the daemon is stopped; the intervals it last used stay shown.
            entry["waiting_reason"] = None
            entry["next_attempt_ts"] = None


def _empty_device() -> dict[str, Any]:
    return {
        "state": "unknown",
        **dict.fromkeys(CONTRACT_LEDGER, 0),
        "oldest_queued_ts": None,
        "points_today": 0,
        "messages_this_month": 0,
        "delivered_live": 0,
        "delivered_history": 0,
        "reason": None,
        "last_success_ts": None,
        "deadletter": 0,
        "ingest_failed": 0,
        "held_for_clock": 0,
        "waiting_reason": None,
        "next_attempt_ts": None,
        "live_interval_s": None,
        "history_interval_s": None,
        "parked_pins": {},
    }


def _empty_port() -> dict[str, Any]:
    return {
        "state": "absent",
        "lines_ok": 0,
        "lines_bad": 0,
        "lines_ignored": 0,
        "reconnects": 0,
        "resent": 0,
        "bad_reasons": {},
        "ignored_reasons": {},
        "last_error": None,
    }


def _read_devices(rows: dict[str, queries.DeviceRow], devices: dict[str, dict[str, Any]]) -> None:
    for name, row in rows.items():
        entry = devices.setdefault(name, _empty_device())
        counts = row.ledger
        entry.update({key: counts[key] for key in LEDGER_FIELDS if key in CONTRACT_LEDGER})
        entry["delivered_live"] = counts["delivered_live"]
        entry["delivered_history"] = counts["delivered_history"]
        entry["delivered"] = counts["delivered_live"] + counts["delivered_history"]
        entry["oldest_queued_ts"] = row.oldest_queued_ts
        entry["points_today"] = row.points_today
        entry["messages_this_month"] = row.messages_this_month
        if row.state is not None:
            entry["state"], entry["reason"], entry["last_success_ts"] = row.state
        entry["deadletter"] = row.deadletter


def _read_ports(
    rows: list[tuple[str, str, int, int, int, int, dict[str, Any]]], ports: dict[str, dict[str, Any]]
) -> None:
    for path, state, ok, bad, ignored, reconnects, extra in rows:
        if path not in ports:
            continue
        ports[path].update(
            {
                "state": state,
                "lines_ok": ok,
                "lines_bad": bad,
                "lines_ignored": ignored,
                "reconnects": reconnects,
                "resent": extra.get("resent", 0),
                "bad_reasons": extra.get("bad_reasons", {}),
                "ignored_reasons": extra.get("ignored_reasons", {}),
                "last_error": extra.get("last_error"),
            }
        )


def _read_daemon(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    # The lock is the truth (a full disk may keep the daemon from writing its pid); meta is for older daemons.
    locked = running_pid(path)
    if locked:
        return {"running": True, "pid": locked}
    pid = int(meta["pid"]) if meta.get("pid", "").isdigit() else None
    running = meta.get("running") == "1" and pid is not None and _alive(pid)
    return {"running": running, "pid": pid if running else None}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render_status(document: dict[str, Any], console: Console) -> None:
    """Print the status document: wide tables where they fit, one block per device and port where not."""
    console.print(status_view(document))


def status_view(document: dict[str, Any], *, now_s: float | None = None) -> StatusView:
    """Return the human view of a status document; its layout is chosen for the width it is drawn at."""
    return StatusView(document, time.time() if now_s is None else now_s)


class StatusView:
    """A headline, then the devices and the ports: each section a table if it fits the width, else stacked."""

    def __init__(self, document: dict[str, Any], now_s: float) -> None:
        self.document = document
        self.now_s = now_s

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Draw the view at the width rich offers (a terminal's, 80 columns when piped)."""
        document, now = self.document, self.now_s
        running = bool(document["daemon"]["running"])
        yield _headline(document)
        yield Text()
        devices = document["devices"]
        ports = document["ports"]
        for wide, stacked in (
            (_devices_table(devices, now, running=running), _device_blocks(devices, now, running=running)),
            (_ports_table(ports, running=running), _port_blocks(ports, running=running)),
        ):
            # Measured without a width limit: rich caps a table's measure at the width it is offered.
            if Measurement.get(console, options.update(max_width=UNLIMITED_WIDTH), wide).maximum <= options.max_width:
                yield wide
                yield Text()
            else:
                yield from stacked  # each block ends with a blank line


def _headline(document: dict[str, Any]) -> Text:
    daemon = document["daemon"]
    text = Text("edgeforward ", style="bold")
    if daemon["running"]:
        text.append("running", style="green").append(f" (pid {daemon['pid']})")
    else:
        text.append("not running", style="yellow")
    text.append("\nbuffer ").append(str(document["buffer"]), style="cyan")
    if document.get("buffer_exists") is False:
        text.append(
            "\nno such file yet: the daemon has not run with this config, or [buffer] path names another "
            "file (the counts below are zero)",
            style="yellow",
        )
    text.overflow = "fold"
    return text


_STATE_STYLES = {"online": "green", "offline": "red", "parked": "red", "unknown": "yellow", "open": "green"}
_WAITING = {
    "pacing": "the next live tick or history round is due",
    "points_budget": "today's points are spent; history resumes at 00:00 UTC",
    "messages_budget": "this month's messages are spent; resumes on the 1st, 00:00 UTC",
    "quota": "the cloud says a quota is reached",
    "retry_after": "the cloud asked to wait (429 Retry-After)",
    "backoff": "the cloud could not be reached; retrying with backoff",
    "refused": "the cloud refused a request without a documented reason",
    "parked": "the token was refused; checked again every park_recheck_s",
    "store": "the buffer could not record what a request would spend",
}


def _state(entry: dict[str, Any]) -> Text:
    text = Text(str(entry["state"]), style=_STATE_STYLES.get(str(entry["state"]), "white"))
    if entry.get("reason"):
        text.append(f" ({entry['reason']})")
    return text


def _next(entry: dict[str, Any], now: float, *, running: bool) -> str:
    """What the forwarder does next: "pacing, in 40 s", or why nothing is planned."""
    if not running:
        return "nothing planned (daemon stopped)"
    reason = entry.get("waiting_reason")
    text = str(reason) if reason else ("sending" if entry.get("queued") else "idle")
    next_ts = entry.get("next_attempt_ts")
    if next_ts is not None:
        text += f", in {_duration(max(0.0, next_ts / 1000 - now))}"
    return text


def _intervals(entry: dict[str, Any]) -> str:
    live, history = entry.get("live_interval_s"), entry.get("history_interval_s")
    parts = []
    if live:
        parts.append(f"live every {_duration(live)}")
    if history:
        parts.append(f"history every {_duration(history)}")
    return ", ".join(parts) or "-"


def _rejected(entry: dict[str, Any]) -> str:
    return str(entry["rejected"]) + (f" ({entry['deadletter']} in dead letters)" if entry["deadletter"] else "")


def _devices_table(devices: dict[str, Any], now: float, *, running: bool) -> Table:
    table = Table(title="devices", title_justify="left", title_style="bold", expand=False)
    table.add_column("device", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for column in ("received", "delivered (live/history)", "queued (oldest)", "expired/dropped/rejected"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("points today", justify="right", no_wrap=True)
    table.add_column("messages (month)", justify="right", no_wrap=True)
    table.add_column("last success", justify="right", no_wrap=True)
    table.add_column("next request", no_wrap=True)
    for name, entry in devices.items():
        oldest = f" ({_age(entry['oldest_queued_ts'], now)})" if entry["queued"] else ""
        table.add_row(
            Text(name),
            _state(entry),
            str(entry["received"]),
            f"{entry['delivered']} ({entry['delivered_live']}/{entry['delivered_history']})",
            f"{entry['queued']}{oldest}",
            f"{entry['expired']}/{entry['dropped']}/{entry['rejected']}",
            _used(entry["points_today"], entry["points_per_day_limit"], compact=True),
            _used(entry["messages_this_month"], entry["messages_per_month_limit"], compact=True),
            _age(entry["last_success_ts"], now, suffix=" ago"),
            _next(entry, now, running=running),
        )
    return table


def _block(title: str, name: str, rows: list[tuple[str, str | Text]]) -> Table:
    """One device or port, stacked: its name, then a label and a value per line (values wrap, never cut)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, value)
    outer = Table.grid()
    outer.add_column(overflow="fold")
    outer.add_row(Text(f"{title} ", style="bold").append(name))
    outer.add_row(Padding(grid, (0, 0, 1, 2)))
    return outer


def _device_blocks(devices: dict[str, Any], now: float, *, running: bool) -> list[Table]:
    blocks = []
    for name, entry in devices.items():
        waiting = _next(entry, now, running=running)
        meaning = _WAITING.get(str(entry.get("waiting_reason"))) if running else None
        queued = str(entry["queued"])
        if entry["queued"]:
            queued += f", oldest {_age(entry['oldest_queued_ts'], now)}"
        rows: list[tuple[str, str | Text]] = [
            ("state", _state(entry)),
            ("received", str(entry["received"])),
            (
                "delivered",
                f"{entry['delivered']} (live {entry['delivered_live']}, history {entry['delivered_history']})",
            ),
            ("queued", queued),
            (
                "not sent",
                f"expired {entry['expired']}, dropped {entry['dropped']}, rejected {_rejected(entry)}, "
                f"downsampled {entry['downsampled']}",
            ),
            ("points today", _used(entry["points_today"], entry["points_per_day_limit"])),
            ("messages", _used(entry["messages_this_month"], entry["messages_per_month_limit"]) + " this month"),
            ("last success", _age(entry["last_success_ts"], now, suffix=" ago")),
            ("next request", waiting + (f" ({meaning})" if meaning else "")),
            ("intervals", _intervals(entry)),
        ]
        blocks.append(_block("device", name, rows))
    return blocks


def _port_state(entry: dict[str, Any], *, running: bool) -> Text:
    if not running:
        return Text("closed (daemon stopped)", style="yellow")
    return Text(str(entry["state"]), style="green" if entry["state"] == "open" else "red")


def _ports_table(ports: dict[str, Any], *, running: bool) -> Table:
    table = Table(title="ports", title_justify="left", title_style="bold", expand=False)
    table.add_column("port", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for column in ("lines ok", "bad", "ignored", "reconnects", "resent"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("bad by reason", no_wrap=True)
    table.add_column("ignored by reason", no_wrap=True)
    table.add_column("last error", no_wrap=True)
    for path, entry in ports.items():
        table.add_row(
            Text(path),
            _port_state(entry, running=running),
            str(entry["lines_ok"]),
            str(entry["lines_bad"]),
            str(entry["lines_ignored"]),
            str(entry["reconnects"]),
            str(entry["resent"]),
            _reasons(entry["bad_reasons"]),
            _reasons(entry["ignored_reasons"]),
            Text(entry.get("last_error") or "-"),
        )
    return table


def _port_blocks(ports: dict[str, Any], *, running: bool) -> list[Table]:
    blocks = []
    for path, entry in ports.items():
        rows: list[tuple[str, str | Text]] = [
            ("state", _port_state(entry, running=running)),
            ("lines", f"{entry['lines_ok']} ok, {entry['lines_bad']} bad, {entry['lines_ignored']} ignored"),
            ("reconnects", str(entry["reconnects"])),
            ("bad", _reasons(entry["bad_reasons"])),
            ("ignored", _reasons(entry["ignored_reasons"])),
            ("last error", Text(entry.get("last_error") or "-")),
        ]
        blocks.append(_block("port", path, rows))
    return blocks


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items())) or "-"


def _used(used: int, limit: int, *, compact: bool = False) -> str:
    if not limit:
        return f"{used} (no limit)"
    slash = "/" if compact else " / "
    return f"{used}{slash}{limit} ({100 * used / limit:.0f}%)"


def _age(ts_ms: int | None, now: float, suffix: str = "") -> str:
    if ts_ms is None:
        return "-"
    return _duration(max(0.0, now - ts_ms / 1000)) + suffix


def _duration(seconds_f: float) -> str:
    seconds = int(seconds_f)
    if seconds_f < 10:
        text = f"{round(seconds_f, 1):g} s"
    elif seconds < 120:
        text = f"{seconds} s"
    elif seconds < 7200:
        text = f"{seconds // 60} min"
    elif seconds < 172800:
        text = f"{seconds // 3600} h"
    else:
        text = f"{seconds // 86400} d"
    return text
