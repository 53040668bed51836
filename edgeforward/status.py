"""`edgeforward status`: the ledger, budgets and port counters, read from the buffer database."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .config import Config
from .forward.planner import clear_eta_s
from .forward.state import parse_status_meta, status_meta_key
from .store import LEDGER_FIELDS, queries, running_pid

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
    return {"devices": devices, "ports": ports, "daemon": daemon, "buffer": str(path), **recovery}


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
