"""The SQLite buffer: points, ledger, budgets and state, written by one group-committing task."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import msgspec
import structlog

from .points import Point, value_json

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000
GROUP_COMMIT_MAX_ITEMS = 20_000

LEDGER_FIELDS = (
    "received",
    "delivered_live",
    "delivered_history",
    "queued",
    "expired",
    "dropped",
    "rejected",
    "downsampled",
)

_SCHEMA = """
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE points (
    id INTEGER PRIMARY KEY,
    device_id INTEGER NOT NULL,
    pin INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX points_by_pin ON points (device_id, pin, ts);
CREATE TABLE ledger (
    device_id INTEGER PRIMARY KEY,
    received INTEGER NOT NULL DEFAULT 0,
    delivered_live INTEGER NOT NULL DEFAULT 0,
    delivered_history INTEGER NOT NULL DEFAULT 0,
    queued INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    downsampled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE deadletter (
    id INTEGER PRIMARY KEY,
    device_id INTEGER NOT NULL,
    pin INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE budget (
    device_id INTEGER PRIMARY KEY,
    day TEXT NOT NULL,
    points_day INTEGER NOT NULL,
    month TEXT NOT NULL,
    messages_month INTEGER NOT NULL
);
CREATE TABLE device_state (
    device_id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT,
    since INTEGER NOT NULL,
    last_success INTEGER
);
CREATE TABLE servers (
    token_hash TEXT PRIMARY KEY,
    server TEXT NOT NULL
);
CREATE TABLE ports (
    path TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    lines_ok INTEGER NOT NULL,
    lines_bad INTEGER NOT NULL,
    lines_ignored INTEGER NOT NULL,
    reconnects INTEGER NOT NULL,
    detail TEXT NOT NULL,
    updated INTEGER NOT NULL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

DeliveryPath = Literal["live", "history"]


class BufferError(Exception):
    """Root of the buffer's errors."""


class BufferClosedError(BufferError):
    """The buffer was closed before the write could be committed."""


@dataclass(frozen=True, slots=True)
class QueuedPoint:
    """A point as stored: its row id and its value as typed JSON text."""

    id: int
    pin: int
    ts_ms: int
    value_json: str


@dataclass(frozen=True, slots=True)
class Budget:
    """What a device has spent in the current UTC day and month."""

    day: str
    points_day: int
    month: str
    messages_month: int


@dataclass(frozen=True, slots=True)
class Committed:
    """What one commit of points did to a device's ledger."""

    device: str
    pins: frozenset[int]
    count: int


CommitListener = Callable[[Sequence[Committed]], None]
WriteOp = Callable[[aiosqlite.Connection], Awaitable[Any]]


@dataclass
class _Pending:
    points: list[Point] = field(default_factory=list)
    ops: list[tuple[WriteOp, asyncio.Future[Any]]] = field(default_factory=list)
    point_waiters: list[tuple[asyncio.Future[None], int]] = field(default_factory=list)


def utc_day(now_s: float) -> str:
    """Return the UTC day of a Unix time as YYYY-MM-DD."""
    return time.strftime("%Y-%m-%d", time.gmtime(now_s))


def utc_month(now_s: float) -> str:
    """Return the UTC month of a Unix time as YYYY-MM."""
    return time.strftime("%Y-%m", time.gmtime(now_s))


def token_hash(token: str) -> str:
    """Return a short stable digest of a token (never store the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


class Buffer:
    """One SQLite file holding every point until the cloud has it, and the ledger that counts them."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        max_points: int = 10_000_000,
        full_policy: str = "drop_oldest",
        commit_interval_ms: float = 5.0,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._max_points = max_points
        self._full_policy = full_policy
        self._commit_interval_s = commit_interval_ms / 1000
        self._write: aiosqlite.Connection | None = None
        self._read: aiosqlite.Connection | None = None
        self._device_ids: dict[str, int] = {}
        self._queued_total = 0
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._closing = False
        self._listeners: list[CommitListener] = []
        self.commits = 0

    async def open(self) -> None:
        """Open (and create or migrate) the database."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write = await aiosqlite.connect(self.path, isolation_level=None)
        await self._configure(self._write)
        await self._migrate(self._write)
        self._read = await aiosqlite.connect(self.path, isolation_level=None)
        await self._configure(self._read)
        async with self._write.execute("SELECT id, name FROM devices") as cursor:
            self._device_ids = {name: device_id async for device_id, name in cursor}
        async with self._write.execute("SELECT COALESCE(SUM(queued), 0) FROM ledger") as cursor:
            row = await cursor.fetchone()
        self._queued_total = int(row[0]) if row else 0

    async def _configure(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        async with conn.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise BufferError(f"{self.path} has schema {version}, newer than this edgeforward ({SCHEMA_VERSION})")
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await _execute_script(conn, _SCHEMA)
            await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Commit what is pending, checkpoint the WAL and close (after the writer has returned)."""
        self._closing = True
        if self._write is not None:
            await self._flush()
            with contextlib.suppress(aiosqlite.Error):
                await self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await self._write.close()
            self._write = None
        if self._read is not None:
            await self._read.close()
            self._read = None
        self._fail_pending(BufferClosedError("buffer closed"))

    def add_listener(self, listener: CommitListener) -> None:
        """Call `listener` after every commit that added points."""
        self._listeners.append(listener)

    @property
    def queued_total(self) -> int:
        """Points queued across all devices."""
        return self._queued_total

    # writes -------------------------------------------------------------------------------------

    def submit(self, points: Sequence[Point]) -> asyncio.Future[None]:
        """Queue points for the next group commit; the future resolves once they are committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(BufferClosedError("buffer is closing"))
            return future
        self._pending.points.extend(points)
        self._pending.point_waiters.append((future, len(points)))
        self._wake.set()
        return future

    async def run_op(self, op: WriteOp) -> Any:
        """Run a write inside the next group-commit transaction and return its result."""
        if self._closing and self._write is None:
            raise BufferClosedError("buffer is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.ops.append((op, future))
        self._wake.set()
        return await future

    async def run_writer(self) -> None:
        """The one writer: commit whatever arrived in the last few ms, in one transaction, until stopped."""
        while not self._closing:
            await self._wake.wait()
            if self._commit_interval_s > 0 and not self._closing:
                await asyncio.sleep(self._commit_interval_s)
            await asyncio.shield(self._flush())
        await self._flush()

    def stop_writer(self) -> None:
        """Ask the writer to commit what is pending and return."""
        self._closing = True
        self._wake.set()

    async def _flush(self) -> None:
        self._wake.clear()
        while self._pending.points or self._pending.ops:
            pending, self._pending = self._pending, _Pending()
            await self._commit(pending)

    async def _commit(self, pending: _Pending) -> None:
        conn = self._connection()
        committed: list[Committed] = []
        results: list[Any] = []
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                if pending.points:
                    committed = await self._insert(conn, pending.points)
                for op, _ in pending.ops:
                    results.append(await op(conn))
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            log.error("buffer_commit_failed", error=str(exc), points=len(pending.points), ops=len(pending.ops))
            self._fail(pending, exc)
            await self._reload_queued_total()
            return
        self.commits += 1
        for (_, future), result in zip(pending.ops, results, strict=True):
            if not future.done():
                future.set_result(result)
        for waiter, _ in pending.point_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if committed:
            for listener in self._listeners:
                listener(committed)

    def _fail(self, pending: _Pending, exc: Exception) -> None:
        for _, future in pending.ops:
            if not future.done():
                future.set_exception(exc)
        for waiter, _ in pending.point_waiters:
            if not waiter.done():
                waiter.set_exception(exc)

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, _Pending()
        self._fail(pending, exc)

    async def _reload_queued_total(self) -> None:
        with contextlib.suppress(aiosqlite.Error):
            async with self._connection().execute("SELECT COALESCE(SUM(queued), 0) FROM ledger") as cursor:
                row = await cursor.fetchone()
            self._queued_total = int(row[0]) if row else 0

    async def _insert(self, conn: aiosqlite.Connection, points: list[Point]) -> list[Committed]:
        accepted = points
        dropped_new: dict[int, int] = {}
        room = self._max_points - self._queued_total
        if len(points) > room:
            if self._full_policy == "drop_newest":
                accepted = points[: max(room, 0)]
                for point in points[len(accepted) :]:
                    device_id = await self._device_id(conn, point.device)
                    dropped_new[device_id] = dropped_new.get(device_id, 0) + 1
            else:
                await self._drop_oldest(conn, len(points) - max(room, 0))
                if len(points) > self._max_points:
                    accepted = points[-self._max_points :]
                    for point in points[: len(points) - len(accepted)]:
                        device_id = await self._device_id(conn, point.device)
                        dropped_new[device_id] = dropped_new.get(device_id, 0) + 1
        rows = []
        per_device: dict[str, tuple[set[int], list[int]]] = {}
        for point in accepted:
            known = self._device_ids.get(point.device)
            device_id = known if known is not None else await self._device_id(conn, point.device)
            rows.append((device_id, point.pin, point.ts_ms, value_json(point.value)))
            pins, count = per_device.setdefault(point.device, (set(), [0]))
            pins.add(point.pin)
            count[0] += 1
        await conn.executemany("INSERT INTO points (device_id, pin, ts, value) VALUES (?, ?, ?, ?)", rows)
        for name, (_, count) in per_device.items():
            await self._add_ledger(conn, self._device_ids[name], received=count[0], queued=count[0])
        for device_id, dropped in dropped_new.items():
            await self._add_ledger(conn, device_id, received=dropped, dropped=dropped)
        self._queued_total += len(accepted)
        return [Committed(name, frozenset(pins), count[0]) for name, (pins, count) in per_device.items()]

    async def _drop_oldest(self, conn: aiosqlite.Connection, count: int) -> None:
        if count <= 0:
            return
        async with conn.execute(
            "DELETE FROM points WHERE id IN (SELECT id FROM points ORDER BY id LIMIT ?) RETURNING device_id",
            (count,),
        ) as cursor:
            per_device: dict[int, int] = {}
            async for (device_id,) in cursor:
                per_device[device_id] = per_device.get(device_id, 0) + 1
        for device_id, dropped in per_device.items():
            await self._add_ledger(conn, device_id, queued=-dropped, dropped=dropped)
            self._queued_total -= dropped
        if per_device:
            log.warning("buffer_full_dropped_oldest", points=sum(per_device.values()))

    async def _device_id(self, conn: aiosqlite.Connection, name: str) -> int:
        device_id = self._device_ids.get(name)
        if device_id is not None:
            return device_id
        await conn.execute("INSERT OR IGNORE INTO devices (name) VALUES (?)", (name,))
        async with conn.execute("SELECT id FROM devices WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        device_id = int(row[0])
        self._device_ids[name] = device_id
        return device_id

    async def _add_ledger(self, conn: aiosqlite.Connection, device_id: int, **deltas: int) -> None:
        columns = [name for name in deltas if name in LEDGER_FIELDS]
        await conn.execute(
            f"INSERT INTO ledger (device_id, {', '.join(columns)}) VALUES (?, {', '.join('?' * len(columns))}) "
            f"ON CONFLICT (device_id) DO UPDATE SET {', '.join(f'{c} = {c} + excluded.{c}' for c in columns)}",
            (device_id, *(deltas[c] for c in columns)),
        )

    async def device_id(self, name: str) -> int:
        """Return (creating if needed) the numeric id of a device."""
        known = self._device_ids.get(name)
        if known is not None:
            return known
        result: int = await self.run_op(lambda conn: self._device_id(conn, name))
        return result

    async def deliver(self, device: str, ids: Sequence[int], path: DeliveryPath) -> int:
        """Delete points the cloud answered 200 for and count them delivered."""
        column = "delivered_live" if path == "live" else "delivered_history"
        return await self._remove(device, ids, column)

    async def expire(self, device: str, before_ts_ms: int, *, pin: int) -> int:
        """Delete a pin's points older than `before_ts_ms` and count them expired."""
        device_id = await self.device_id(device)

        async def op(conn: aiosqlite.Connection) -> int:
            async with conn.execute(
                "DELETE FROM points WHERE device_id = ? AND pin = ? AND ts < ?",
                (device_id, pin, before_ts_ms),
            ) as cursor:
                count = cursor.rowcount
            if count > 0:
                await self._add_ledger(conn, device_id, queued=-count, expired=count)
                self._queued_total -= count
            return count

        result: int = await self.run_op(op)
        return result

    async def reject(self, device: str, points: Sequence[QueuedPoint], reason: str) -> int:
        """Move points the cloud refused for good to the dead-letter table."""
        device_id = await self.device_id(device)
        now_ms = time.time_ns() // 1_000_000

        async def op(conn: aiosqlite.Connection) -> int:
            count = await self._delete_ids(conn, [p.id for p in points])
            await conn.executemany(
                "INSERT INTO deadletter (device_id, pin, ts, value, reason, at) VALUES (?, ?, ?, ?, ?, ?)",
                [(device_id, p.pin, p.ts_ms, p.value_json, reason, now_ms) for p in points],
            )
            if count:
                await self._add_ledger(conn, device_id, queued=-count, rejected=count)
                self._queued_total -= count
            return count

        result: int = await self.run_op(op)
        return result

    async def thin(self, device: str, ids: Sequence[int]) -> int:
        """Delete points thinned out by the downsample policy and count them downsampled."""
        return await self._remove(device, ids, "downsampled")

    async def _remove(self, device: str, ids: Sequence[int], column: str) -> int:
        device_id = await self.device_id(device)

        async def op(conn: aiosqlite.Connection) -> int:
            count = await self._delete_ids(conn, ids)
            if count:
                await self._add_ledger(conn, device_id, queued=-count, **{column: count})
                self._queued_total -= count
            return count

        result: int = await self.run_op(op)
        return result

    @staticmethod
    async def _delete_ids(conn: aiosqlite.Connection, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        async with conn.execute(
            "DELETE FROM points WHERE id IN (SELECT value FROM json_each(?))",
            (msgspec.json.encode(list(ids)).decode(),),
        ) as cursor:
            return int(cursor.rowcount)

    async def spend(self, device: str, now_s: float, *, messages: int = 1, points: int = 0) -> Budget:
        """Count a request (and its timestamped points) against the device's budget before it is sent."""
        device_id = await self.device_id(device)
        day, month = utc_day(now_s), utc_month(now_s)

        async def op(conn: aiosqlite.Connection) -> Budget:
            current = await self._budget(conn, device_id, day, month)
            spent = Budget(day, current.points_day + points, month, current.messages_month + messages)
            await conn.execute(
                "INSERT OR REPLACE INTO budget (device_id, day, points_day, month, messages_month) "
                "VALUES (?, ?, ?, ?, ?)",
                (device_id, spent.day, spent.points_day, spent.month, spent.messages_month),
            )
            return spent

        result: Budget = await self.run_op(op)
        return result

    async def budget(self, device: str, now_s: float) -> Budget:
        """Return what the device has spent today and this month."""
        device_id = await self.device_id(device)
        return await self._budget(self._reader(), device_id, utc_day(now_s), utc_month(now_s))

    @staticmethod
    async def _budget(conn: aiosqlite.Connection, device_id: int, day: str, month: str) -> Budget:
        async with conn.execute(
            "SELECT day, points_day, month, messages_month FROM budget WHERE device_id = ?", (device_id,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return Budget(day, 0, month, 0)
        return Budget(day, row[1] if row[0] == day else 0, month, row[3] if row[2] == month else 0)

    async def set_device_state(
        self, device: str, state: str, reason: str | None, *, success_ms: int | None = None
    ) -> None:
        """Record a device's forwarding state (and the time of its last success)."""
        device_id = await self.device_id(device)
        now_ms = time.time_ns() // 1_000_000

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO device_state (device_id, state, reason, since, last_success) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET "
                "since = CASE WHEN state = excluded.state THEN since ELSE excluded.since END, "
                "state = excluded.state, reason = excluded.reason, "
                "last_success = COALESCE(excluded.last_success, last_success)",
                (device_id, state, reason, now_ms, success_ms),
            )

        await self.run_op(op)

    async def remembered_server(self, token: str) -> str | None:
        """Return the regional server the cloud redirected this token to, if any."""
        async with self._reader().execute(
            "SELECT server FROM servers WHERE token_hash = ?", (token_hash(token),)
        ) as cursor:
            row = await cursor.fetchone()
        return str(row[0]) if row else None

    async def remember_server(self, token: str, server: str) -> None:
        """Remember the regional server for this token across restarts."""

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT OR REPLACE INTO servers (token_hash, server) VALUES (?, ?)", (token_hash(token), server)
            )

        await self.run_op(op)

    async def save_ports(self, rows: Iterable[tuple[str, str, int, int, int, int, str]]) -> None:
        """Store a snapshot of the ports' state and counters for `status`."""
        now_ms = time.time_ns() // 1_000_000
        values = [(*row, now_ms) for row in rows]

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "INSERT OR REPLACE INTO ports "
                "(path, state, lines_ok, lines_bad, lines_ignored, reconnects, detail, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )

        await self.run_op(op)

    async def set_meta(self, items: dict[str, str]) -> None:
        """Store small key/value facts (daemon pid, heartbeat)."""

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(items.items()))

        await self.run_op(op)

    # reads --------------------------------------------------------------------------------------

    async def pins_queued(self, device: str) -> list[int]:
        """Return the pins that have queued points (a skip-scan over the index)."""
        device_id = self._device_ids.get(device)
        if device_id is None:
            return []
        pins: list[int] = []
        last = -1
        conn = self._reader()
        while True:
            async with conn.execute(
                "SELECT MIN(pin) FROM points WHERE device_id = ? AND pin > ?", (device_id, last)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None or row[0] is None:
                return pins
            last = int(row[0])
            pins.append(last)

    async def newest(self, device: str, pin: int) -> QueuedPoint | None:
        """Return the newest queued point of one pin."""
        device_id = self._device_ids.get(device)
        if device_id is None:
            return None
        async with self._reader().execute(
            "SELECT id, ts, value FROM points WHERE device_id = ? AND pin = ? ORDER BY ts DESC, id DESC LIMIT 1",
            (device_id, pin),
        ) as cursor:
            row = await cursor.fetchone()
        return QueuedPoint(row[0], pin, row[1], row[2]) if row else None

    async def oldest(
        self, device: str, pin: int, limit: int, *, max_id: int | None = None, after: tuple[int, int] | None = None
    ) -> list[QueuedPoint]:
        """Return up to `limit` of a pin's queued points, oldest first, with row id <= max_id, past (ts, id) `after`."""
        device_id = self._device_ids.get(device)
        if device_id is None or limit <= 0:
            return []
        after_ts, after_id = after if after is not None else (-(2**63), -1)
        async with self._reader().execute(
            "SELECT id, ts, value FROM points WHERE device_id = ? AND pin = ? AND id <= ? "
            "AND (ts > ? OR (ts = ? AND id > ?)) ORDER BY ts, id LIMIT ?",
            (device_id, pin, max_id if max_id is not None else 2**63 - 1, after_ts, after_ts, after_id, limit),
        ) as cursor:
            return [QueuedPoint(row[0], pin, row[1], row[2]) async for row in cursor]

    async def count_queued(self, device: str, pin: int, *, max_id: int | None = None, before_ts: int | None = None) -> int:
        """Count a pin's queued points (row id <= max_id, timestamp < before_ts)."""
        device_id = self._device_ids.get(device)
        if device_id is None:
            return 0
        async with self._reader().execute(
            "SELECT COUNT(*) FROM points WHERE device_id = ? AND pin = ? AND id <= ? AND ts < ?",
            (device_id, pin, max_id if max_id is not None else 2**63 - 1, before_ts if before_ts is not None else 2**63 - 1),
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def max_id(self) -> int:
        """Return the highest point row id ever committed so far."""
        async with self._reader().execute("SELECT COALESCE(MAX(id), 0) FROM points") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def oldest_ts(self, device: str) -> int | None:
        """Return the timestamp of the device's oldest queued point."""
        oldest: int | None = None
        device_id = self._device_ids.get(device)
        if device_id is None:
            return None
        for pin in await self.pins_queued(device):
            async with self._reader().execute(
                "SELECT MIN(ts) FROM points WHERE device_id = ? AND pin = ?", (device_id, pin)
            ) as cursor:
                row = await cursor.fetchone()
            if row and row[0] is not None and (oldest is None or row[0] < oldest):
                oldest = int(row[0])
        return oldest

    async def ledger(self, device: str) -> dict[str, int]:
        """Return a device's ledger counters."""
        device_id = self._device_ids.get(device)
        counts = dict.fromkeys(LEDGER_FIELDS, 0)
        if device_id is None:
            return counts
        async with self._reader().execute(
            f"SELECT {', '.join(LEDGER_FIELDS)} FROM ledger WHERE device_id = ?", (device_id,)
        ) as cursor:
            row = await cursor.fetchone()
        if row:
            counts = dict(zip(LEDGER_FIELDS, (int(v) for v in row), strict=True))
        return counts

    def _connection(self) -> aiosqlite.Connection:
        if self._write is None:
            raise BufferClosedError("buffer is not open")
        return self._write

    def _reader(self) -> aiosqlite.Connection:
        if self._read is None:
            raise BufferClosedError("buffer is not open")
        return self._read


async def _execute_script(conn: aiosqlite.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            await conn.execute(statement)
