"""`edgeforward status`: the ledger, budgets and port counters, read from the buffer database."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .buffer import BUSY_TIMEOUT_MS, LEDGER_FIELDS, utc_day, utc_month
from .config import Config

CONTRACT_LEDGER = ("received", "delivered", "queued", "expired", "dropped", "rejected", "downsampled")


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
    return {"devices": devices, "ports": ports, "daemon": daemon, "buffer": str(path)}


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
    }


def _empty_port() -> dict[str, Any]:
    return {
        "state": "absent",
        "lines_ok": 0,
        "lines_bad": 0,
        "lines_ignored": 0,
        "reconnects": 0,
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
    daemon = document["daemon"]
    running = f"running (pid {daemon['pid']})" if daemon["running"] else "not running"
    console.print(f"edgeforward {running}; buffer {document['buffer']}")
    devices = Table(title="devices", title_justify="left")
    for column in ("device", "state", "received", "delivered", "queued", "expired", "dropped", "rejected"):
        devices.add_column(column, justify="left" if column in ("device", "state") else "right")
    devices.add_column("oldest queued")
    devices.add_column("today / month")
    for name, entry in document["devices"].items():
        state = entry["state"] + (f" ({entry['reason']})" if entry.get("reason") else "")
        devices.add_row(
            name,
            state,
            *(str(entry[key]) for key in ("received", "delivered", "queued", "expired", "dropped", "rejected")),
            _age(entry["oldest_queued_ts"]),
            f"{entry['points_today']} pts / {entry['messages_this_month']} msgs",
        )
    console.print(devices)
    ports = Table(title="ports", title_justify="left")
    for column in ("port", "state", "ok", "bad", "ignored", "reconnects", "bad by reason"):
        ports.add_column(column)
    for path, entry in document["ports"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(entry["bad_reasons"].items()))
        ports.add_row(
            path,
            entry["state"],
            str(entry["lines_ok"]),
            str(entry["lines_bad"]),
            str(entry["lines_ignored"]),
            str(entry["reconnects"]),
            reasons,
        )
    console.print(ports)


def _age(ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    seconds = max(0, int(time.time() - ts_ms / 1000))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"
