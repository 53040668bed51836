"""The SQLite buffer: points, ledger, budgets and state, written by one group-committing task."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import aiosqlite
import msgspec
import structlog

from .errors import EdgeforwardError
from .points import Point, value_json
from .redact import redact
from .servers import ServerError, remembered_target
from .timebase import utc_day, utc_month

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 3
PAGE_CACHE_KIB = 1024
VACUUM_CHECK_INTERVAL_S = 60.0
VACUUM_MIN_FREED_ROWS = 2_000
BUSY_TIMEOUT_MS = 10_000
GROUP_COMMIT_MAX_ITEMS = 20_000
# Incremental vacuum: give free pages back to the file system once this many are free (and a quarter of the file).
VACUUM_MIN_FREE_PAGES = 256
VACUUM_STEP_PAGES = 2048
# At the byte cap, drop at least this many oldest points per attempt to make room, and try this often.
ROOM_MIN_POINTS = 500
ROOM_ATTEMPTS = 20
CAP_SLACK_PAGES = 8
COMMIT_ERRORS_LOGGED_PER_MINUTE = 5
SALVAGE_BATCH_ROWS = 1000
MIN_ROWID = -(2**63)
MAX_ROWID = 2**63 - 1
SQLITE_HEADER_BYTES = 100
SQLITE_MAGIC = b"SQLite format 3\x00"

# Keys of the `meta` table that `status` shows.
META_RECOVERY: Final = "recovery"
META_RECOVERIES: Final = "recoveries"
META_INGEST_FAILED: Final = "ingest_failed"
META_HELD_UNSTAMPED: Final = "held_unstamped"

# Tables added by a schema version after the first (an older file lacks them until it is migrated).
TABLES_SINCE = {"held": 3}

# Tables copied out of a damaged buffer, in this order (devices first: the others refer to them).
SALVAGE_TABLES = ("devices", "points", "held", "ledger", "deadletter", "budget", "device_state", "servers", "meta")

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
# Version 3: readings stamped while the wall clock was untrusted (`mono_ms`: CLOCK_BOOTTIME of boot `boot_id`).
_HELD_SCHEMA = """
CREATE TABLE IF NOT EXISTS held (
    id INTEGER PRIMARY KEY,
    device_id INTEGER NOT NULL,
    pin INTEGER NOT NULL,
    mono_ms INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS held_by_boot ON held (boot_id, id);
"""
_SCHEMA += _HELD_SCHEMA

DeliveryPath = Literal["live", "history"]


class BufferError(EdgeforwardError):
    """Root of the buffer's errors."""


class BufferClosedError(BufferError):
    """The buffer was closed before the write could be committed."""


class BufferFullError(BufferError):
    """The disk is full: these points could not be committed (counted `ingest_failed`)."""


@dataclass(frozen=True, slots=True)
class Recovery:
    """What opening a damaged buffer did: where the damaged file went and what was saved from it."""

    at_ms: int
    reason: str
    moved_to: str
    salvaged: dict[str, int]
    lost_points: int
    lost_by_device: dict[str, int]
    unreadable_ranges: int

    def as_meta(self) -> str:
        """Return the JSON stored under the `recovery` meta key."""
        return json.dumps(
            {
                "at": self.at_ms,
                "reason": self.reason,
                "moved_to": self.moved_to,
                "salvaged": self.salvaged,
                "lost_points": self.lost_points,
                "lost_by_device": self.lost_by_device,
                "unreadable_ranges": self.unreadable_ranges,
            },
            sort_keys=True,
        )


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
class Settled:
    """What settling the held readings did once the wall clock was trusted."""

    rebased: int  # readings of this boot, given their exact wall time
    stamped: int  # readings of earlier boots, placed at the latest time they can have been taken
    unstamped: int  # readings of earlier boots still held (no exact wall time exists for them)


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
    held: list[tuple[str, Point]] = field(default_factory=list)
    ops: list[tuple[WriteOp, asyncio.Future[Any]]] = field(default_factory=list)
    point_waiters: list[tuple[asyncio.Future[None], int]] = field(default_factory=list)


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
        max_bytes: int = 0,
        full_policy: str = "drop_oldest",
        commit_interval_ms: float = 5.0,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._max_points = max_points
        self._max_bytes = max_bytes
        self._max_pages = 0
        self._full_policy = full_policy
        self._commit_interval_s = commit_interval_ms / 1000
        self._write: aiosqlite.Connection | None = None
        self._read: aiosqlite.Connection | None = None
        self._device_ids: dict[str, int] = {}
        self._queued_total = 0
        self._pending = _Pending()
        self._urgent: list[tuple[WriteOp, asyncio.Future[Any]]] = []
        self._next_vacuum_check = 0.0
        self._freed_rows = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._listeners: list[CommitListener] = []
        self._ingest_failed: dict[str, int] = {}
        self._ingest_failed_dirty = False
        self._full_since: float | None = None
        self._errors_logged: list[float] = []
        self._freed_since_vacuum = False
        self.commits = 0
        self.recovery: Recovery | None = None

    async def open(self) -> None:
        """Open the database: check it, recover it if damaged, create or migrate it."""
        self.recovery = await asyncio.to_thread(prepare_file, self.path)
        self._write = await aiosqlite.connect(self.path, isolation_level=None)
        await self._configure(self._write)
        if self._max_bytes:
            async with self._write.execute("PRAGMA page_size") as cursor:
                row = await cursor.fetchone()
            page_size = int(row[0]) if row else 4096
            async with self._write.execute(f"PRAGMA max_page_count = {max(1, self._max_bytes // page_size)}") as cursor:
                row = await cursor.fetchone()
            self._max_pages = int(row[0]) if row else 0
        self._read = await aiosqlite.connect(self.path, isolation_level=None)
        await self._configure(self._read)
        async with self._write.execute("SELECT id, name FROM devices") as cursor:
            self._device_ids = {name: device_id async for device_id, name in cursor}
        self._queued_total = await self._read_queued_total()
        async with self._write.execute("SELECT value FROM meta WHERE key = ?", (META_INGEST_FAILED,)) as cursor:
            row = await cursor.fetchone()
        if row:
            with contextlib.suppress(ValueError, TypeError):
                self._ingest_failed = {str(k): int(v) for k, v in json.loads(row[0]).items()}

    async def _configure(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        # Reads are index scans and writes are appends: a small page cache costs little and keeps RSS flat.
        await conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")

    async def set_page_limit(self, pages: int) -> int:
        """Limit the file to `pages` pages (simulates a full disk in tests); return the limit in force."""
        async with self._connection().execute(f"PRAGMA max_page_count = {int(pages)}") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    @property
    def ingest_failed(self) -> dict[str, int]:
        """Readings per device that could not be committed (disk full); never counted `received`."""
        return dict(self._ingest_failed)

    async def close(self) -> None:
        """Commit what is pending, checkpoint the WAL and close (after the writer has returned)."""
        self._closing = True
        # The reader goes first: a read cancelled mid-statement (a task stopped at start) leaves its statement
        # open, and the checkpoint below would wait the whole busy timeout for that read transaction to end.
        if self._read is not None:
            await self._read.close()
            self._read = None
        if self._write is not None:
            await self._flush()
            with contextlib.suppress(aiosqlite.Error):
                await self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await self._write.close()
            self._write = None
        self._fail_pending(BufferClosedError("buffer closed"))

    def add_listener(self, listener: CommitListener) -> None:
        """Call `listener` after every commit that added points."""
        self._listeners.append(listener)

    @property
    def queued_total(self) -> int:
        """Points queued across all devices."""
        return self._queued_total

    # writes -------------------------------------------------------------------------------------

    def submit(self, points: Sequence[Point], *, boot_id: str | None = None) -> asyncio.Future[None]:
        """Queue points for the next group commit; the future resolves once they are committed.

        With `boot_id`, the points' `ts_ms` is CLOCK_BOOTTIME of that boot: they are held, not sent,
        until `settle_held` gives them a wall time.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(BufferClosedError("buffer is closing"))
            return future
        # The buffer logs commit failures itself; callers that do not look at the outcome stay quiet.
        future.add_done_callback(_consume_exception)
        if boot_id is None:
            self._pending.points.extend(points)
        else:
            self._pending.held.extend((boot_id, point) for point in points)
        self._pending.point_waiters.append((future, len(points)))
        self._wake.set()
        return future

    def hold(self, points: Sequence[Point], boot_id: str) -> asyncio.Future[None]:
        """Commit points stamped with CLOCK_BOOTTIME of `boot_id` as held (see `submit`)."""
        return self.submit(points, boot_id=boot_id)

    async def run_op(self, op: WriteOp, *, urgent: bool = False) -> Any:
        """Run a write inside the next group-commit transaction and return its result.

        An urgent op (a request waiting for its budget to be counted) is committed ahead of what is pending.
        """
        if self._closing and self._write is None:
            raise BufferClosedError("buffer is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        (self._urgent if urgent else self._pending.ops).append((op, future))
        self._wake.set()
        return await future

    async def run_writer(self) -> None:
        """The one writer: commit whatever arrived in the last few ms, in one transaction, until stopped."""
        while not self._closing:
            await self._wake.wait()
            if self._commit_interval_s > 0 and not self._closing and not self._urgent:
                await asyncio.sleep(self._commit_interval_s)
            await asyncio.shield(self._flush())
        await self._flush()

    def stop_writer(self) -> None:
        """Ask the writer to commit what is pending and return."""
        self._closing = True
        self._wake.set()

    async def _flush(self) -> None:
        self._wake.clear()
        while self._urgent or self._pending.points or self._pending.held or self._pending.ops:
            if self._urgent:
                urgent, self._urgent = self._urgent, []
                await self._commit(_Pending(ops=urgent))
                continue
            pending, self._pending = self._pending, _Pending()
            await self._commit(pending)
        await self._maintain()

    async def _commit(self, pending: _Pending) -> None:
        ingest_error: BufferFullError | None = None
        try:
            try:
                committed, results = await self._transaction(pending.points, pending.ops, held=pending.held)
            except sqlite3.Error as exc:
                if not (pending.points or pending.held) or not _is_full(exc):
                    raise
                committed, results, ingest_error = await self._commit_when_full(pending)
        except sqlite3.Error as exc:
            self._log_commit_error(exc, pending)
            self._fail(pending, exc)
            await self._reload_queued_total()
            return
        self.commits += 1
        if ingest_error is None and self._full_since is not None:
            log.warning("buffer_ingest_resumed", full_for_s=round(time.monotonic() - self._full_since, 1))
            self._full_since = None
        for (_, future), result in zip(pending.ops, results, strict=True):
            if not future.done():
                future.set_result(result)
        for waiter, _ in pending.point_waiters:
            if not waiter.done():
                if ingest_error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(ingest_error)
        if committed:
            for listener in self._listeners:
                listener(committed)

    async def _transaction(
        self,
        points: list[Point],
        ops: list[tuple[WriteOp, asyncio.Future[Any]]],
        *,
        held: Sequence[tuple[str, Point]] = (),
        cap_dropped: bool = False,
    ) -> tuple[list[Committed], list[Any]]:
        conn = self._connection()
        committed: list[Committed] = []
        results: list[Any] = []
        queued_before, device_ids_before = self._queued_total, dict(self._device_ids)
        await conn.execute("BEGIN IMMEDIATE")
        try:
            if cap_dropped:
                if points or held:
                    await self._count_dropped_new(conn, [*points, *(point for _, point in held)])
            else:
                if points:
                    committed = await self._insert(conn, points)
                if held:
                    await self._insert_held(conn, held)
            queued_before_ops = self._queued_total
            for op, _ in ops:
                results.append(await op(conn))
            if self._ingest_failed_dirty:
                await conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (META_INGEST_FAILED, json.dumps(self._ingest_failed, sort_keys=True)),
                )
            await conn.execute("COMMIT")
        except BaseException:
            self._queued_total, self._device_ids = queued_before, device_ids_before
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise
        self._ingest_failed_dirty = False
        if ops:
            self._freed_rows += max(0, queued_before_ops - self._queued_total)
        return committed, results

    async def _commit_when_full(self, pending: _Pending) -> tuple[list[Committed], list[Any], BufferFullError | None]:
        """The points did not fit: make room (byte cap) or give them up (disk full); the ops still run."""
        if await self._at_byte_cap():
            if self._full_policy == "drop_oldest":
                for _ in range(ROOM_ATTEMPTS):
                    if not await self._make_room(len(pending.points) + len(pending.held)):
                        break
                    try:
                        committed, results = await self._transaction(pending.points, pending.ops, held=pending.held)
                    except sqlite3.Error as exc:
                        if not _is_full(exc):
                            raise
                        continue
                    return committed, results, None
            else:
                _, results = await self._transaction(pending.points, pending.ops, held=pending.held, cap_dropped=True)
                log.warning(
                    "buffer_full_dropped_newest",
                    points=len(pending.points) + len(pending.held),
                    max_bytes=self._max_bytes,
                )
                return [], results, None
        lost = [*pending.points, *(point for _, point in pending.held)]
        self._count_ingest_failed(lost)
        _, results = await self._transaction([], pending.ops)
        return [], results, BufferFullError(f"disk full: {len(lost)} readings not committed")

    async def _at_byte_cap(self) -> bool:
        if not self._max_pages:
            return False
        async with self._connection().execute("PRAGMA page_count") as cursor:
            row = await cursor.fetchone()
        return row is not None and int(row[0]) >= self._max_pages - CAP_SLACK_PAGES

    async def _make_room(self, wanted: int) -> bool:
        """Drop the oldest points in their own transaction; False when there is nothing left to drop."""
        count = max(wanted, ROOM_MIN_POINTS, self._queued_total // 100)
        dropped: list[int] = []

        async def op(conn: aiosqlite.Connection) -> None:
            dropped.append(await self._drop_oldest(conn, count))

        await self._transaction([], [(op, asyncio.get_running_loop().create_future())])
        return bool(dropped and dropped[0])

    async def _count_dropped_new(self, conn: aiosqlite.Connection, points: list[Point]) -> None:
        per_device: dict[int, int] = {}
        for point in points:
            device_id = await self._device_id(conn, point.device)
            per_device[device_id] = per_device.get(device_id, 0) + 1
        for device_id, dropped in per_device.items():
            await self._add_ledger(conn, device_id, received=dropped, dropped=dropped)

    def _count_ingest_failed(self, points: list[Point]) -> None:
        for point in points:
            self._ingest_failed[point.device] = self._ingest_failed.get(point.device, 0) + 1
        self._ingest_failed_dirty = True
        if self._full_since is None:
            self._full_since = time.monotonic()
            log.error("buffer_disk_full", points=len(points), ingest_failed=sum(self._ingest_failed.values()))

    def _log_commit_error(self, exc: sqlite3.Error, pending: _Pending) -> None:
        now = time.monotonic()
        self._errors_logged = [t for t in self._errors_logged if now - t < 60]
        if len(self._errors_logged) < COMMIT_ERRORS_LOGGED_PER_MINUTE:
            self._errors_logged.append(now)
            log.error(
                "buffer_commit_failed",
                error=str(exc),
                points=len(pending.points) + len(pending.held),
                ops=len(pending.ops),
            )

    async def _maintain(self) -> None:
        """Give free pages back to the file system once a backlog has drained (incremental vacuum)."""
        now = time.monotonic()
        # Two PRAGMA round trips after every delivery would be most of an idle gateway's CPU: look only once
        # many rows were freed, or now and then.
        due = self._freed_rows >= VACUUM_MIN_FREED_ROWS or (self._freed_rows and now >= self._next_vacuum_check)
        if not (self._freed_since_vacuum or due) or self._write is None:
            return
        self._next_vacuum_check = now + VACUUM_CHECK_INTERVAL_S
        self._freed_rows = 0
        self._freed_since_vacuum = False
        try:
            async with self._write.execute("PRAGMA freelist_count") as cursor:
                free = await cursor.fetchone()
            async with self._write.execute("PRAGMA page_count") as cursor:
                total = await cursor.fetchone()
            if not free or not total or free[0] < max(VACUUM_MIN_FREE_PAGES, total[0] // 4):
                return
            # execute() would step the pragma once, freeing a single page; a script runs it to completion.
            await self._write.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")
            # The file only shrinks when the WAL is copied back into it.
            async with self._write.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
                await cursor.fetchall()
            self._freed_since_vacuum = free[0] > VACUUM_STEP_PAGES  # more to give back: go on at the next commit
            log.debug("buffer_vacuumed", free_pages=free[0], pages=total[0])
        except sqlite3.Error as exc:
            log.warning("buffer_vacuum_failed", error=str(exc))

    def _fail(self, pending: _Pending, exc: Exception) -> None:
        for _, future in pending.ops:
            if not future.done():
                future.set_exception(exc)
        for waiter, _ in pending.point_waiters:
            if not waiter.done():
                waiter.set_exception(exc)

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, _Pending()
        pending.ops.extend(self._urgent)
        self._urgent = []
        self._fail(pending, exc)

    async def _read_queued_total(self) -> int:
        async with self._connection().execute("SELECT COALESCE(SUM(queued), 0) FROM ledger") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _reload_queued_total(self) -> None:
        with contextlib.suppress(aiosqlite.Error):
            self._queued_total = await self._read_queued_total()

    async def _fit(self, conn: aiosqlite.Connection, points: Sequence[Point]) -> tuple[int, int]:
        """Apply the point cap to new points: return the slice [start, stop) of them that is kept."""
        start, stop = 0, len(points)
        room = self._max_points - self._queued_total
        if len(points) > room:
            if self._full_policy == "drop_newest":
                stop = max(room, 0)
            else:
                await self._drop_oldest(conn, len(points) - max(room, 0))
                start = max(len(points) - self._max_points, 0)
        dropped_new: dict[int, int] = {}
        for point in (*points[:start], *points[stop:]):
            device_id = await self._device_id(conn, point.device)
            dropped_new[device_id] = dropped_new.get(device_id, 0) + 1
        for device_id, dropped in dropped_new.items():
            await self._add_ledger(conn, device_id, received=dropped, dropped=dropped)
        return start, stop

    async def _insert(self, conn: aiosqlite.Connection, points: list[Point]) -> list[Committed]:
        start, stop = await self._fit(conn, points)
        accepted = points if (start, stop) == (0, len(points)) else points[start:stop]
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
        self._queued_total += len(accepted)
        return [Committed(name, frozenset(pins), count[0]) for name, (pins, count) in per_device.items()]

    async def _insert_held(self, conn: aiosqlite.Connection, held: Sequence[tuple[str, Point]]) -> None:
        start, stop = await self._fit(conn, [point for _, point in held])
        per_device: dict[int, int] = {}
        rows = []
        for boot_id, point in held[start:stop]:
            device_id = await self._device_id(conn, point.device)
            rows.append((device_id, point.pin, point.ts_ms, boot_id, value_json(point.value)))
            per_device[device_id] = per_device.get(device_id, 0) + 1
        await conn.executemany(
            "INSERT INTO held (device_id, pin, mono_ms, boot_id, value) VALUES (?, ?, ?, ?, ?)", rows
        )
        for device_id, count in per_device.items():
            await self._add_ledger(conn, device_id, received=count, queued=count)
        self._queued_total += len(rows)

    async def _drop_oldest(self, conn: aiosqlite.Connection, count: int) -> int:
        if count <= 0:
            return 0
        per_device: dict[int, int] = {}
        left = count
        # Held readings (no wall time yet) go only when no sendable point is left to drop.
        for table in ("points", "held"):
            async with conn.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?) RETURNING device_id",
                (left,),
            ) as cursor:
                async for (device_id,) in cursor:
                    per_device[device_id] = per_device.get(device_id, 0) + 1
                    left -= 1
            if left <= 0:
                break
        for device_id, dropped in per_device.items():
            await self._add_ledger(conn, device_id, queued=-dropped, dropped=dropped)
            self._queued_total -= dropped
        if per_device:
            log.warning("buffer_full_dropped_oldest", points=sum(per_device.values()))
        return sum(per_device.values())

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
                [(device_id, p.pin, p.ts_ms, p.value_json, redact(reason), now_ms) for p in points],
            )
            if count:
                await self._add_ledger(conn, device_id, queued=-count, rejected=count)
                self._queued_total -= count
            return count

        result: int = await self.run_op(op)
        return result

    async def settle_held(
        self, boot_id: str, wall_now_ms: int, mono_now_ms: int, *, stamp_previous_boots: bool = False
    ) -> Settled:
        """Give held readings a wall time and make them sendable, in one transaction (the ledger is unchanged).

        Readings of boot `boot_id` get wall_now_ms - (mono_now_ms - mono_ms): exact. Readings of earlier
        boots have no exact wall time; with `stamp_previous_boots` each earlier boot is placed to end where
        the next one began (latest first, back from this boot's start), else they stay held and are
        counted under the `held_unstamped` meta key.
        """
        moved: list[tuple[int, int]] = []

        async def move(conn: aiosqlite.Connection, where: str, offset_ms: int, params: tuple[Any, ...]) -> int:
            async with conn.execute(f"SELECT DISTINCT device_id, pin FROM held WHERE {where}", params) as cursor:
                moved.extend([(int(row[0]), int(row[1])) async for row in cursor])
            await conn.execute(
                "INSERT INTO points (device_id, pin, ts, value) "
                f"SELECT device_id, pin, mono_ms + ?, value FROM held WHERE {where} ORDER BY id",
                (offset_ms, *params),
            )
            async with conn.execute(f"DELETE FROM held WHERE {where}", params) as cursor:
                return int(cursor.rowcount)

        async def op(conn: aiosqlite.Connection) -> Settled:
            boot_start_ms = wall_now_ms - mono_now_ms
            rebased = await move(conn, "boot_id = ?", boot_start_ms, (boot_id,))
            stamped = 0
            if stamp_previous_boots:
                async with conn.execute(
                    "SELECT boot_id, MAX(mono_ms) FROM held WHERE boot_id != ? GROUP BY boot_id ORDER BY MAX(id) DESC",
                    (boot_id,),
                ) as cursor:
                    earlier = [(str(row[0]), int(row[1])) async for row in cursor]
                end_ms = boot_start_ms
                for other, last_mono_ms in earlier:
                    stamped += await move(conn, "boot_id = ?", end_ms - last_mono_ms, (other,))
                    end_ms -= last_mono_ms
            async with conn.execute("SELECT COUNT(*) FROM held WHERE boot_id != ?", (boot_id,)) as cursor:
                row = await cursor.fetchone()
            unstamped = int(row[0]) if row else 0
            await conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_HELD_UNSTAMPED, str(unstamped))
            )
            return Settled(rebased, stamped, unstamped)

        settled: Settled = await self.run_op(op)
        names = {device_id: name for name, device_id in self._device_ids.items()}
        pins: dict[str, set[int]] = {}
        for device_id, pin in moved:
            pins.setdefault(names.get(device_id, ""), set()).add(pin)
        committed = [Committed(name, frozenset(p), 0) for name, p in pins.items() if name]
        if committed:
            for listener in self._listeners:
                listener(committed)
        return settled

    async def held_by_boot(self) -> dict[str, int]:
        """Return how many readings are held (awaiting a trusted clock) per boot id."""
        async with self._reader().execute("SELECT boot_id, COUNT(*) FROM held GROUP BY boot_id") as cursor:
            return {str(row[0]): int(row[1]) async for row in cursor}

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
            spent = Budget(day, max(0, current.points_day + points), month, current.messages_month + messages)
            await conn.execute(
                "INSERT OR REPLACE INTO budget (device_id, day, points_day, month, messages_month) "
                "VALUES (?, ?, ?, ?, ?)",
                (device_id, spent.day, spent.points_day, spent.month, spent.messages_month),
            )
            return spent

        result: Budget = await self.run_op(op, urgent=True)
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
                (device_id, state, None if reason is None else redact(reason), now_ms, success_ms),
            )

        await self.run_op(op)

    async def remembered_server(self, token: str, configured: str | None = None) -> str | None:
        """Return the server the cloud redirected this token to, if any; one no longer fit to use is forgotten."""
        async with self._reader().execute(
            "SELECT server FROM servers WHERE token_hash = ?", (token_hash(token),)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        try:
            return remembered_target(str(row[0]), configured)
        except ServerError as exc:
            log.warning("remembered_server_forgotten", reason=str(exc))
            await self.forget_server(token)
            return None

    async def forget_server(self, token: str) -> None:
        """Forget the regional server remembered for this token."""

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute("DELETE FROM servers WHERE token_hash = ?", (token_hash(token),))

        await self.run_op(op)

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
        values = [(*row[:6], redact(row[6]), now_ms) for row in rows]

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "INSERT OR REPLACE INTO ports "
                "(path, state, lines_ok, lines_bad, lines_ignored, reconnects, detail, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )

        await self.run_op(op)

    async def saved_ports(self) -> dict[str, tuple[int, int, int, int, str]]:
        """Return each port's last stored counters (lines ok, bad, ignored, reconnects, detail JSON)."""
        rows = await self._reader().execute_fetchall(
            "SELECT path, lines_ok, lines_bad, lines_ignored, reconnects, detail FROM ports"
        )
        return {str(row[0]): (int(row[1]), int(row[2]), int(row[3]), int(row[4]), str(row[5] or "")) for row in rows}

    async def set_meta(self, items: dict[str, str]) -> None:
        """Store small key/value facts (daemon pid, heartbeat)."""

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(items.items()))

        await self.run_op(op)

    # reads --------------------------------------------------------------------------------------

    async def meta(self, key: str) -> str | None:
        """Return one value of the `meta` table."""
        async with self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)) as cursor:
            row = await cursor.fetchone()
        return str(row[0]) if row else None

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
        # One fetchall: iterating the cursor would cost a thread hand-off per 64 rows.
        rows = await self._reader().execute_fetchall(
            "SELECT id, ts, value FROM points WHERE device_id = ? AND pin = ? AND id <= ? "
            "AND (ts > ? OR (ts = ? AND id > ?)) ORDER BY ts, id LIMIT ?",
            (device_id, pin, max_id if max_id is not None else 2**63 - 1, after_ts, after_ts, after_id, limit),
        )
        return [QueuedPoint(row[0], pin, row[1], row[2]) for row in rows]

    async def count_queued(
        self, device: str, pin: int, *, max_id: int | None = None, before_ts: int | None = None
    ) -> int:
        """Count a pin's queued points (row id <= max_id, timestamp < before_ts)."""
        device_id = self._device_ids.get(device)
        if device_id is None:
            return 0
        async with self._reader().execute(
            "SELECT COUNT(*) FROM points WHERE device_id = ? AND pin = ? AND id <= ? AND ts < ?",
            (
                device_id,
                pin,
                max_id if max_id is not None else 2**63 - 1,
                before_ts if before_ts is not None else 2**63 - 1,
            ),
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


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _is_full(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL


# opening, checking, migrating and recovering the file (synchronous, run in a thread) ---------------


def prepare_file(path: Path) -> Recovery | None:
    """Make `path` a healthy buffer of the current schema; move a damaged one aside and salvage it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    problem = check_file(path)
    recovery = None
    if problem is not None:
        recovery = recover_file(path, problem)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
        migrate(conn)
        if recovery is not None:
            count = conn.execute("SELECT value FROM meta WHERE key = ?", (META_RECOVERIES,)).fetchone()
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [
                    (META_RECOVERY, recovery.as_meta()),
                    (META_RECOVERIES, str(int(count[0]) + 1 if count and str(count[0]).isdigit() else 1)),
                ],
            )
    return recovery


def check_file(path: Path) -> str | None:
    """Return why `path` cannot be used as it is, or None when it is healthy (or absent)."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        return "not a regular file"
    try:
        # Read-only: a damaged file (and a WAL that may not be its own) stays exactly as it was found.
        uri = f"file:{path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)) as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                return f"schema version {version} is newer than this edgeforward's ({SCHEMA_VERSION})"
            problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(10)")]
            if problems != ["ok"]:
                return "quick_check: " + "; ".join(problems)
            if version == 0:
                tables = db.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()[0]
                return "not an edgeforward buffer" if tables else None
            expected = {table for table in _expected_columns() if TABLES_SINCE.get(table, 1) <= version}
            missing = expected - {row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
            if missing:
                return "missing tables: " + ", ".join(sorted(missing))
            for table in ("devices", "ledger", "meta"):
                db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"
    return None


def migrate(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring an older one to the current version."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if version < 2:
        # Version 2: incremental auto-vacuum, which SQLite only applies by rebuilding the file once.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        try:
            conn.execute("VACUUM")
        except sqlite3.Error as exc:
            log.warning("buffer_vacuum_failed", error=str(exc), detail="the file will not shrink after a backlog")
    # Version 3: the table of readings held until the wall clock is trusted.
    conn.executescript(f"BEGIN IMMEDIATE; {_HELD_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")


def _expected_columns() -> dict[str, list[str]]:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
        return {table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")] for table in tables}


def recover_file(path: Path, reason: str) -> Recovery:
    """Move the damaged file (and its WAL) aside, never deleting it, and salvage what it still holds."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    serial = 0
    while aside.exists() or aside.is_symlink():
        serial += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{serial}")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        companion = Path(f"{path}{suffix}")
        if companion.exists() or companion.is_symlink():
            os.replace(companion, Path(f"{aside}{suffix}"))
    log.error("buffer_damaged", reason=reason, moved_to=str(aside))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as fresh:
        migrate(fresh)
        salvaged, unreadable = _salvage(aside, path, fresh)
        lost = _reconcile(fresh)
    recovery = Recovery(
        at_ms=time.time_ns() // 1_000_000,
        reason=reason,
        moved_to=str(aside),
        salvaged=salvaged,
        lost_points=sum(lost.values()),
        lost_by_device=lost,
        unreadable_ranges=unreadable,
    )
    log.error(
        "buffer_recovered",
        reason=reason,
        moved_to=str(aside),
        salvaged=salvaged,
        lost_points=recovery.lost_points,
        lost_by_device=lost,
        unreadable_ranges=unreadable,
    )
    return recovery


def _salvage(aside: Path, path: Path, fresh: sqlite3.Connection) -> tuple[dict[str, int], int]:
    """Copy every readable row of the damaged file into `fresh`; return rows per table and unreadable ranges."""
    salvaged = dict.fromkeys(SALVAGE_TABLES, 0)
    if not aside.is_file():
        return salvaged, 0
    repaired = path.with_name(f"{path.name}.salvage-tmp")
    source = _open_damaged(aside, repaired)
    if source is None:
        return salvaged, 0
    unreadable = 0
    expected = _expected_columns()
    try:
        fresh.execute("BEGIN IMMEDIATE")
        for table in SALVAGE_TABLES:
            try:
                present = {row[1] for row in source.execute(f"PRAGMA table_info({table})")}
            except sqlite3.Error:
                continue
            columns = [c for c in expected[table] if c in present]
            if not columns:
                continue
            insert = f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            for rows, bad in _readable_rows(source, table, columns):
                unreadable += bad
                fresh.executemany(insert, rows)
                salvaged[table] += len(rows)
        fresh.execute("DELETE FROM meta WHERE key IN ('pid', 'running')")
        fresh.execute("COMMIT")
    finally:
        source.close()
        with contextlib.suppress(FileNotFoundError):
            repaired.unlink()
    return salvaged, unreadable


def _open_damaged(aside: Path, repaired: Path) -> sqlite3.Connection | None:
    """Open the damaged file read-only (with its WAL, else without it, else a copy with a rebuilt header)."""
    for uri in (f"file:{aside}?mode=ro", f"file:{aside}?immutable=1"):
        try:
            source = sqlite3.connect(uri, uri=True)
            tables = source.execute("SELECT COUNT(*) FROM sqlite_schema WHERE name = 'points'").fetchone()[0]
        except sqlite3.Error:
            continue
        if tables:
            return source
        source.close()
    try:
        shutil.copyfile(aside, repaired)
        _rebuild_header(repaired)
        source = sqlite3.connect(f"file:{repaired}?immutable=1", uri=True)
        source.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()
    except (sqlite3.Error, OSError) as exc:
        log.error("buffer_unreadable", error=str(exc), file=str(aside))
        return None
    return source


def _rebuild_header(copy: Path) -> None:
    """Replace the first 100 bytes of a copy with a valid header guessed from the file's size."""
    size = copy.stat().st_size
    with copy.open("r+b") as file:
        header = bytearray(file.read(SQLITE_HEADER_BYTES))
        stated = int.from_bytes(header[16:18], "big") if len(header) >= 18 else 0
        page_size = 65536 if stated == 1 else stated
        if page_size < 512 or page_size & (page_size - 1) or size % page_size:
            page_size = 4096
        with contextlib.closing(sqlite3.connect(":memory:")) as template_db:
            template_db.execute(f"PRAGMA page_size = {page_size}")
            template_db.execute("CREATE TABLE t (x)")
            template = bytearray(template_db.serialize()[:SQLITE_HEADER_BYTES])
        template[18:20] = b"\x01\x01"  # legacy journal: no WAL index needed to read the copy
        template[28:32] = (size // page_size).to_bytes(4, "big")
        template[32:40] = bytes(8)  # no freelist: reading needs none
        file.seek(0)
        file.write(template)


def _readable_rows(
    source: sqlite3.Connection, table: str, columns: list[str]
) -> Iterator[tuple[list[tuple[Any, ...]], int]]:
    """Yield (rows, unreadable ranges) in rowid order, stepping over ranges that cannot be read."""
    select = f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid >= ? ORDER BY rowid"
    start = MIN_ROWID
    while True:
        rows: list[tuple[Any, ...]] = []
        last: int | None = None
        try:
            for row in source.execute(select, (start,)):
                rows.append(row[1:])
                last = int(row[0])
                if len(rows) >= SALVAGE_BATCH_ROWS:
                    yield rows, 0
                    rows = []
        except sqlite3.Error:
            yield rows, 1
            resume = last + 1 if last is not None else start + 1
            found = _next_readable(source, table, resume)
            if found is None:
                return
            start = found
            continue
        yield rows, 0
        return


def _next_readable(source: sqlite3.Connection, table: str, resume: int) -> int | None:
    """Return the smallest rowid position from which the table reads again (doubling, then bisecting)."""
    probe = f"SELECT rowid FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT 1"

    def readable(position: int) -> bool:
        try:
            source.execute(probe, (position,)).fetchone()
        except sqlite3.Error:
            return False
        return True

    step = 1
    while resume + step <= MAX_ROWID:
        if readable(resume + step):
            low, high = resume + step // 2, resume + step
            while high - low > 1:
                middle = (low + high) // 2
                if readable(middle):
                    high = middle
                else:
                    low = middle
            return high
        step *= 2
    return None


def _reconcile(fresh: sqlite3.Connection) -> dict[str, int]:
    """Make every salvaged ledger add up again; return the queued points lost per device."""
    lost: dict[str, int] = {}
    fresh.execute("BEGIN IMMEDIATE")
    try:
        orphans = fresh.execute("DELETE FROM points WHERE device_id NOT IN (SELECT id FROM devices)").rowcount
        orphans += fresh.execute("DELETE FROM held WHERE device_id NOT IN (SELECT id FROM devices)").rowcount
        if orphans:
            lost["(unknown device)"] = orphans
        fresh.execute("DELETE FROM ledger WHERE device_id NOT IN (SELECT id FROM devices)")
        out = " + ".join(f for f in LEDGER_FIELDS if f != "received")
        for device_id, name in fresh.execute("SELECT id, name FROM devices").fetchall():
            stored = fresh.execute(
                "SELECT (SELECT COUNT(*) FROM points WHERE device_id = ?) "
                "+ (SELECT COUNT(*) FROM held WHERE device_id = ?)",
                (device_id, device_id),
            ).fetchone()[0]
            row = fresh.execute(f"SELECT queued, {out} FROM ledger WHERE device_id = ?", (device_id,)).fetchone()
            if row is None:
                # The ledger row is gone: count what is still queued as received and queued; history is lost.
                fresh.execute(
                    "INSERT INTO ledger (device_id, received, queued) VALUES (?, ?, ?)", (device_id, stored, stored)
                )
                continue
            queued, total_out = int(row[0]), int(row[1])
            missing = max(queued - stored, 0)
            if missing:
                lost[str(name)] = missing
            # Points that could not be salvaged are counted `dropped`; received is set so the ledger adds up.
            fresh.execute(
                "UPDATE ledger SET queued = ?, dropped = dropped + ?, received = ? WHERE device_id = ?",
                (stored, missing, total_out - queued + stored + missing, device_id),
            )
        fresh.execute("COMMIT")
    except BaseException:
        fresh.execute("ROLLBACK")
        raise
    return lost
