"""`edgeforward deadletter`: list, requeue or purge points the cloud refused for good."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from .buffer import BUSY_TIMEOUT_MS
from .config import Config, ConfigError
from .points import parse_pin_name


def run_deadletter(config: Config, action: str, *, device: str | None, pin: str | None, as_json: bool) -> int:
    """Carry out one dead-letter action; the ledger stays exact (rejected <-> queued)."""
    pin_number = None
    if pin is not None:
        pin_number = parse_pin_name(pin)
        if pin_number is None:
            raise ConfigError([f'--pin: expected a virtual pin name v0..v255, got "{pin}"'])
    path = Path(config.buffer.path)
    if not path.exists():
        print(f"{path}: no buffer yet, nothing refused", file=sys.stderr)
        return 0
    with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)) as db:
        where, params = _filter(db, device, pin_number)
        if action == "list":
            _list(db, where, params, as_json)
        elif action == "retry":
            count = _move_back(db, where, params)
            print(f"requeued {count} points")
        else:
            count = _purge(db, where, params)
            print(f"purged {count} points (they stay counted as rejected)")
    return 0


def _filter(db: sqlite3.Connection, device: str | None, pin: int | None) -> tuple[str, list[Any]]:
    clauses: list[str] = ["1"]
    params: list[Any] = []
    if device is not None:
        clauses.append("d.device_id = (SELECT id FROM devices WHERE name = ?)")
        params.append(device)
    if pin is not None:
        clauses.append("d.pin = ?")
        params.append(pin)
    return " AND ".join(clauses), params


def _list(db: sqlite3.Connection, where: str, params: list[Any], as_json: bool) -> None:
    rows = db.execute(
        "SELECT devices.name, d.pin, d.ts, d.value, d.reason, d.at FROM deadletter d "
        f"JOIN devices ON devices.id = d.device_id WHERE {where} ORDER BY d.id",
        params,
    ).fetchall()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "device": r[0],
                        "pin": f"v{r[1]}",
                        "ts": r[2],
                        "value": json.loads(r[3]),
                        "reason": r[4],
                        "at": r[5],
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    for name, pin, ts, value, reason, _ in rows:
        print(f"{name}\tv{pin}\t{ts}\t{value}\t{reason}")
    print(f"{len(rows)} points")


def _move_back(db: sqlite3.Connection, where: str, params: list[Any]) -> int:
    db.execute("BEGIN IMMEDIATE")
    try:
        per_device = db.execute(
            f"SELECT d.device_id, COUNT(*) FROM deadletter d WHERE {where} GROUP BY d.device_id", params
        ).fetchall()
        db.execute(
            "INSERT INTO points (device_id, pin, ts, value) "
            f"SELECT d.device_id, d.pin, d.ts, d.value FROM deadletter d WHERE {where} ORDER BY d.id",
            params,
        )
        db.execute(f"DELETE FROM deadletter WHERE id IN (SELECT d.id FROM deadletter d WHERE {where})", params)
        for device_id, count in per_device:
            db.execute(
                "UPDATE ledger SET rejected = rejected - ?, queued = queued + ? WHERE device_id = ?",
                (count, count, device_id),
            )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return sum(count for _, count in per_device)


def _purge(db: sqlite3.Connection, where: str, params: list[Any]) -> int:
    cursor = db.execute(f"DELETE FROM deadletter WHERE id IN (SELECT d.id FROM deadletter d WHERE {where})", params)
    return cursor.rowcount
