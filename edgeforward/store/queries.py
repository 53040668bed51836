"""Every read other processes make of the file (status, deadletter, demo), and the dead-letter changes."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..timebase import utc_day, utc_month
from . import counting, filing
from . import inbox as inboxes
from .errors import wrap
from .schema import BUSY_TIMEOUT_MS, LEDGER_FIELDS

_T = TypeVar("_T")


@contextlib.contextmanager
def connect(path: Path, *, readonly: bool = True) -> Iterator[sqlite3.Connection]:
    """Open the buffer file from a command's own process; sqlite errors come out as StoreError."""
    try:
        if readonly:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        else:
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    except sqlite3.Error as exc:
        raise wrap(exc, f"opening {path}") from exc
    try:
        yield db
    except sqlite3.Error as exc:
        raise wrap(exc, f"reading {path}") from exc
    finally:
        db.close()


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """What the file says of one device."""

    ledger: dict[str, int]
    oldest_queued_ts: int | None
    points_today: int
    messages_this_month: int
    state: tuple[str, str | None, int | None] | None
    deadletter: int


INBOX_READ_ATTEMPTS = 5  # a settle between the reads of SQLite and of the inbox: read both again


def _inbox_generation(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (inboxes.META_GENERATION,)).fetchone()
    return inboxes.generation_of(row[0] if row else None)


def _with_inbox(db: sqlite3.Connection, read: Callable[[sqlite3.Connection], _T]) -> tuple[_T, inboxes.Queue]:
    """`read` of SQLite, and the daemon's inbox (store/inbox.py) beside it, from one generation, as the daemon
    itself replays it."""
    files = [row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"]
    path = Path(files[0]) if files and files[0] else None
    for _ in range(INBOX_READ_ATTEMPTS):
        generation = _inbox_generation(db)
        result = read(db)
        try:
            found = inboxes.unapplied(path, generation) if path is not None else None
        except OSError as exc:
            raise wrap(exc, f"reading the inbox of {path}") from exc
        if _inbox_generation(db) == generation:
            break
    return result, inboxes.Queue.replayed(found[1], 0.0) if found is not None else inboxes.Queue()


def inbox(db: sqlite3.Connection) -> dict[str, inboxes.Counts]:
    """What the daemon's inbox counts per device beside SQLite's ledger (its queued points are in no table)."""
    return _with_inbox(db, lambda _: None)[1].counts


def devices(db: sqlite3.Connection, now_s: float) -> dict[str, DeviceRow]:
    """Return every device's ledger, budget, state and dead-letter count."""
    today, month = utc_day(now_s), utc_month(now_s)
    result: dict[str, DeviceRow] = {}
    rows, inboxed = _with_inbox(db, lambda conn: list(conn.execute(counting.LEDGER)))
    ledgers = {int(row[0]): counting.ledger_row(tuple(row)) for row in rows}
    names = db.execute("SELECT name, id FROM devices").fetchall()
    known = {str(name) for name, _ in names}
    names += [(name, -1) for name in inboxed.counts if name not in known]  # only in the inbox yet
    for name, device_id in names:
        extra = inboxed.counts.get(str(name))
        counts = inboxes.with_counts(ledgers.get(int(device_id), dict.fromkeys(LEDGER_FIELDS, 0)), extra)
        oldest = [ts for ts in (oldest_ts(db, device_id), inboxed.oldest_ts(str(name))) if ts is not None]
        budget = db.execute(
            "SELECT day, points_day, month, messages_month FROM budget WHERE device_id = ?", (device_id,)
        ).fetchone()
        state = db.execute(
            "SELECT state, reason, last_success FROM device_state WHERE device_id = ?", (device_id,)
        ).fetchone()
        result[str(name)] = DeviceRow(
            ledger=counts,
            oldest_queued_ts=min(oldest, default=None),
            points_today=int(budget[1]) if budget and budget[0] == today else 0,
            messages_this_month=int(budget[3]) if budget and budget[2] == month else 0,
            state=(str(state[0]), state[1], state[2]) if state else None,
            deadletter=int(
                db.execute("SELECT COUNT(*) FROM deadletter WHERE device_id = ?", (device_id,)).fetchone()[0]
            ),
        )
    return result


def oldest_ts(db: sqlite3.Connection, device_id: int) -> int | None:
    """Return the timestamp of a device's oldest queued point."""
    row = db.execute(filing.OLDEST_TS_OF_DEVICE, (device_id,)).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def ports(db: sqlite3.Connection) -> list[tuple[str, str, int, int, int, int, dict[str, Any]]]:
    """Return the daemon's last snapshot of every port: path, state, counters and details."""
    return [
        (path, state, ok, bad, ignored, reconnects, json.loads(detail) if detail else {})
        for path, state, ok, bad, ignored, reconnects, detail in db.execute(
            "SELECT path, state, lines_ok, lines_bad, lines_ignored, reconnects, detail FROM ports"
        )
    ]


def meta(db: sqlite3.Connection) -> dict[str, str]:
    """Return the whole `meta` table."""
    return {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta").fetchall()}


def held_by_device(db: sqlite3.Connection) -> dict[str, int]:
    """Return how many readings wait for a trusted clock, per device."""
    with contextlib.suppress(sqlite3.OperationalError):  # a buffer from before clock holding has no such table
        return {
            str(name): int(count)
            for name, count in db.execute(
                "SELECT devices.name, COUNT(*) FROM held JOIN devices ON devices.id = held.device_id "
                "GROUP BY held.device_id"
            ).fetchall()
        }
    return {}


def ledger_total(db: sqlite3.Connection) -> dict[str, int]:
    """Return the ledger summed over every device (the tail of uncounted points included: store/counting.py)."""
    total = dict.fromkeys(LEDGER_FIELDS, 0)
    rows, inboxed = _with_inbox(db, lambda conn: list(conn.execute(counting.LEDGER)))
    for row in rows:
        for field, value in counting.ledger_row(tuple(row)).items():
            total[field] += value
    for counts in inboxed.counts.values():
        total = inboxes.with_counts(total, counts)
    return total


# the dead-letter table ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """A point the cloud refused for good."""

    device: str
    pin: int
    ts_ms: int
    value_json: str
    reason: str
    at_ms: int


def _filter(device: str | None, pin: int | None) -> tuple[str, list[Any]]:
    clauses: list[str] = ["1"]
    params: list[Any] = []
    if device is not None:
        clauses.append("d.device_id = (SELECT id FROM devices WHERE name = ?)")
        params.append(device)
    if pin is not None:
        clauses.append("d.pin = ?")
        params.append(pin)
    return " AND ".join(clauses), params


def deadletter(db: sqlite3.Connection, device: str | None = None, pin: int | None = None) -> list[Refused]:
    """Return the refused points (of one device, one pin), oldest refusal first."""
    where, params = _filter(device, pin)
    rows = db.execute(
        "SELECT devices.name, d.pin, d.ts, d.value, d.reason, d.at FROM deadletter d "
        f"JOIN devices ON devices.id = d.device_id WHERE {where} ORDER BY d.id",
        params,
    ).fetchall()
    return [Refused(str(r[0]), int(r[1]), int(r[2]), str(r[3]), str(r[4]), int(r[5])) for r in rows]


def requeue_deadletter(db: sqlite3.Connection, device: str | None = None, pin: int | None = None) -> int:
    """Move refused points back into the queue (rejected -> queued), in one transaction; return how many.

    In the points table they are counted by the ledger's tail (store/counting.py): the ledger gives them up.
    """
    where, params = _filter(device, pin)
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
                "UPDATE ledger SET rejected = rejected - ?, received = received - ? WHERE device_id = ?",
                (count, count, device_id),
            )
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return sum(int(count) for _, count in per_device)


def purge_deadletter(db: sqlite3.Connection, device: str | None = None, pin: int | None = None) -> int:
    """Delete refused points for good (they stay counted `rejected`); return how many."""
    where, params = _filter(device, pin)
    cursor = db.execute(f"DELETE FROM deadletter WHERE id IN (SELECT d.id FROM deadletter d WHERE {where})", params)
    return int(cursor.rowcount)
