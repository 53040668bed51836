"""`edgeforward status`: the ledger, budgets and port counters, read from the buffer database."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .buffer import BUSY_TIMEOUT_MS, LEDGER_FIELDS
from .config import Config
from .forward.planner import clear_eta_s
from .forward.state import parse_status_meta, status_meta_key
from .timebase import utc_day, utc_month

CONTRACT_LEDGER = ("received", "delivered", "queued", "expired", "dropped", "rejected", "downsampled")
FORWARD_FIELDS = ("waiting_reason", "next_attempt_ts", "live_interval_s", "history_interval_s", "parked_pins")


def read_status(config: Config, *, now_s: float | None = None) -> dict[str, Any]:
    """Return the status document of ../CONTRACT.md (`status --json`), with extra fields."""
    now_s = time.time() if now_s is None else now_s
    devices: dict[str, dict[str, Any]] = {d.name: _empty_device() for d in config.devices}
    ports: dict[str, dict[str, Any]] = {p.path: _empty_port() for p in config.ports}
    daemon: dict[str, Any] = {"running": False, "pid": None}
    path = Path(config.buffer.path)
    if path.exists():
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        ) as db:
            _read_devices(db, devices, now_s)
            _read_ports(db, ports)
            daemon = _read_daemon(db)
            _read_forward(db, devices, running=bool(daemon["running"]))
            recovery = _read_recovery(db, devices)
    else:
        recovery = {"buffer_recovery": None, "recoveries": 0, "clock": None, "held_unstamped": 0}
    for name, entry in devices.items():
        entry.update(_forecast(config, name, entry, now_s))
    return {"devices": devices, "ports": ports, "daemon": daemon, "buffer": str(path), **recovery}


def _read_recovery(db: sqlite3.Connection, devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the last recovery of a damaged buffer saved and lost, and readings a full disk refused."""
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    failed = json.loads(meta["ingest_failed"]) if meta.get("ingest_failed") else {}
    for name, entry in devices.items():
        entry["ingest_failed"] = int(failed.get(name, 0))
    recoveries = meta.get("recoveries", "0")
    held: dict[str, int] = {}
    with contextlib.suppress(sqlite3.OperationalError):  # a buffer from before clock holding has no such table
        held = dict(
            db.execute(
                "SELECT devices.name, COUNT(*) FROM held JOIN devices ON devices.id = held.device_id "
                "GROUP BY held.device_id"
            ).fetchall()
        )
    for name, entry in devices.items():
        entry["held_for_clock"] = int(held.get(name, 0))
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


def _read_forward(db: sqlite3.Connection, devices: dict[str, dict[str, Any]], *, running: bool) -> None:
    """What each forwarder published: why its points wait, the next attempt, the intervals in effect."""
    for name, entry in devices.items():
        row = db.execute("SELECT value FROM meta WHERE key = ?", (status_meta_key(name),)).fetchone()
        published = parse_status_meta(row[0] if row else None)
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
    }


def _read_devices(db: sqlite3.Connection, devices: dict[str, dict[str, Any]], now_s: float) -> None:
    ids = dict(db.execute("SELECT name, id FROM devices").fetchall())
    today, month = utc_day(now_s), utc_month(now_s)
    for name, device_id in ids.items():
        entry = devices.setdefault(name, _empty_device())
        row = db.execute(f"SELECT {', '.join(LEDGER_FIELDS)} FROM ledger WHERE device_id = ?", (device_id,)).fetchone()
        if row:
            counts = dict(zip(LEDGER_FIELDS, row, strict=True))
            entry.update({key: counts[key] for key in LEDGER_FIELDS if key in CONTRACT_LEDGER})
            entry["delivered_live"] = counts["delivered_live"]
            entry["delivered_history"] = counts["delivered_history"]
            entry["delivered"] = counts["delivered_live"] + counts["delivered_history"]
        entry["oldest_queued_ts"] = _oldest_ts(db, device_id)
        budget = db.execute(
            "SELECT day, points_day, month, messages_month FROM budget WHERE device_id = ?", (device_id,)
        ).fetchone()
        if budget:
            entry["points_today"] = budget[1] if budget[0] == today else 0
            entry["messages_this_month"] = budget[3] if budget[2] == month else 0
        state = db.execute(
            "SELECT state, reason, last_success FROM device_state WHERE device_id = ?", (device_id,)
        ).fetchone()
        if state:
            entry["state"], entry["reason"], entry["last_success_ts"] = state
        entry["deadletter"] = db.execute(
            "SELECT COUNT(*) FROM deadletter WHERE device_id = ?", (device_id,)
        ).fetchone()[0]


def _oldest_ts(db: sqlite3.Connection, device_id: int) -> int | None:
    oldest: int | None = None
    pin = -1
    while True:
        row = db.execute("SELECT MIN(pin) FROM points WHERE device_id = ? AND pin > ?", (device_id, pin)).fetchone()
        if row is None or row[0] is None:
            return oldest
        pin = row[0]
        ts = db.execute("SELECT MIN(ts) FROM points WHERE device_id = ? AND pin = ?", (device_id, pin)).fetchone()[0]
        if ts is not None and (oldest is None or ts < oldest):
            oldest = ts


def _read_ports(db: sqlite3.Connection, ports: dict[str, dict[str, Any]]) -> None:
    for path, state, ok, bad, ignored, reconnects, detail in db.execute(
        "SELECT path, state, lines_ok, lines_bad, lines_ignored, reconnects, detail FROM ports"
    ):
        if path not in ports:
            continue
        extra = json.loads(detail) if detail else {}
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
            }
        )


def _read_daemon(db: sqlite3.Connection) -> dict[str, Any]:
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
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
    """Print the status document as tables."""
    console.print(status_view(document))


def status_view(document: dict[str, Any], *, now_s: float | None = None) -> Group:
    """Return the human view of a status document: a headline, the devices and the ports."""
    now = time.time() if now_s is None else now_s
    daemon = document["daemon"]
    running = f"[green]running[/] (pid {daemon['pid']})" if daemon["running"] else "[yellow]not running[/]"
    headline = Text.from_markup(f"edgeforward {running}  buffer {escape(document['buffer'])}")
    return Group(
        headline,
        _devices_table(document["devices"], now),
        _ports_table(document["ports"], running=bool(daemon["running"])),
    )


def _devices_table(devices: dict[str, Any], now: float) -> Table:
    table = Table(title="devices", title_justify="left", expand=False)
    table.add_column("device")
    table.add_column("state (why)")
    for column in ("received", "delivered live/history", "queued", "expired", "dropped", "rejected"):
        table.add_column(column, justify="right")
    table.add_column("oldest queued", justify="right")
    table.add_column("budget: points today", justify="right")
    table.add_column("messages this month", justify="right")
    table.add_column("last success", justify="right")
    for name, entry in devices.items():
        state = f"[{_STATE_STYLES.get(entry['state'], 'white')}]{entry['state']}[/]"
        if entry.get("reason"):
            state += f" ({escape(str(entry['reason']))})"
        state += _waiting(entry, now)
        rejected = str(entry["rejected"]) + (f" ({entry['deadletter']} in dead letters)" if entry["deadletter"] else "")
        table.add_row(
            escape(name),
            state,
            str(entry["received"]),
            f"{entry['delivered']} ({entry['delivered_live']}/{entry['delivered_history']})",
            str(entry["queued"]),
            str(entry["expired"]),
            str(entry["dropped"]),
            rejected,
            _age(entry["oldest_queued_ts"], now),
            _used(entry["points_today"], entry["points_per_day_limit"]),
            _used(entry["messages_this_month"], entry["messages_per_month_limit"]),
            _age(entry["last_success_ts"], now, suffix=" ago"),
        )
    return table


def _ports_table(ports: dict[str, Any], *, running: bool) -> Table:
    table = Table(title="ports", title_justify="left", expand=False)
    table.add_column("port")
    table.add_column("state")
    for column in ("lines ok", "bad", "ignored", "reconnects", "resent"):
        table.add_column(column, justify="right")
    table.add_column("bad by reason")
    table.add_column("ignored by reason")
    for path, entry in ports.items():
        style = "green" if entry["state"] == "open" else "red"
        state = f"[{style}]{entry['state']}[/]" if running else "closed (daemon stopped)"
        table.add_row(
            escape(path),
            state,
            str(entry["lines_ok"]),
            str(entry["lines_bad"]),
            str(entry["lines_ignored"]),
            str(entry["reconnects"]),
            str(entry["resent"]),
            escape(_reasons(entry["bad_reasons"])),
            escape(_reasons(entry["ignored_reasons"])),
        )
    return table


_STATE_STYLES = {"online": "green", "offline": "red", "parked": "red", "unknown": "yellow"}


def _waiting(entry: dict[str, Any], now: float) -> str:
    """Why queued points wait and when the next request is planned, e.g. "; pacing, next in 40 s"."""
    reason = entry.get("waiting_reason")
    if not reason or not entry.get("queued"):
        return ""
    text = f"; {reason}"
    next_ts = entry.get("next_attempt_ts")
    if next_ts is not None:
        text += f", next in {_duration(max(0.0, next_ts / 1000 - now))}"
    interval = entry.get("history_interval_s")
    if reason == "pacing" and interval is not None:
        text += f" (history every {_duration(interval)})"
    return escape(text)


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items())) or "-"


def _used(used: int, limit: int) -> str:
    if not limit:
        return f"{used} (no limit)"
    return f"{used} / {limit} ({100 * used / limit:.0f}%)"


def _age(ts_ms: int | None, now: float, suffix: str = "") -> str:
    if ts_ms is None:
        return "-"
    return _duration(max(0.0, now - ts_ms / 1000)) + suffix


def _duration(seconds_f: float) -> str:
    seconds = int(seconds_f)
    if seconds < 120:
        text = f"{seconds} s"
    elif seconds < 7200:
        text = f"{seconds // 60} min"
    elif seconds < 172800:
        text = f"{seconds // 3600} h"
    else:
        text = f"{seconds // 86400} d"
    return text
