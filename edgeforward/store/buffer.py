"""The buffer: points, ledger, budgets and state in one SQLite file, written by one group-committing task."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import heapq
import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import aiosqlite
import structlog

from ..points import Point, value_json
from ..redact import redact
from ..servers import ServerError, remembered_target
from ..timebase import utc_day, utc_month
from . import capacity, counting, filing, schema
from . import inbox as inboxes
from .errors import (
    IngestFailedError,
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    is_full,
    wrap,
)
from .filing import FILED, UNFILED, FilingPlan
from .inbox import ID_BASE, InboxFile, InboxPoint, Queue
from .lease import Budget, Lease
from .recovery import CheckInterrupted, Progress, Recovery, check_file, prepare_file, recover_file
from .schema import (
    BUSY_TIMEOUT_MS,
    LEDGER_FIELDS,
    META_HELD_UNSTAMPED,
    META_INGEST_FAILED,
    PAGE_CACHE_KIB,
    SET_META,
    WAL_AUTOCHECKPOINT_PAGES,
)
from .writer import (
    COMMIT_ATTEMPTS,
    COMMIT_ERRORS_LOGGED_PER_MINUTE,
    EXTERNAL_CHECK_S,
    GROUP_COMMIT_MAX_ITEMS,
    RETRIED,
    RETRY_MAX_S,
    Op,
    OpKind,
    Pending,
    ResendKey,
    Retry,
    WriteFn,
    wait_s,
)

log = structlog.get_logger(__name__)

VACUUM_CHECK_INTERVAL_S: Final = 60.0
VACUUM_MIN_FREED_ROWS: Final = 2_000
# Incremental vacuum: give free pages back to the file system once this many are free (and a quarter of the file).
VACUUM_MIN_FREE_PAGES: Final = 256
VACUUM_STEP_PAGES: Final = 2048
LOCK_SUFFIX: Final = ".lock"
VERIFY_STOP_TIMEOUT_S: Final = 2.0
VERIFY_INTERRUPT_POLL_S: Final = 0.02
SETTLE_POLL_S: Final = 0.002  # a read of SQLite and the inbox waits this long at a time for a settle to end

DeliveryPath = Literal["live", "history"]
WriteOp = WriteFn
CheckMode = Literal["auto", "full"]
_Read = TypeVar("_Read", bound=Callable[..., Any])
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class QueuedPoint:
    """A point as stored: its row id and its value as typed JSON text."""

    id: int
    pin: int
    ts_ms: int
    value_json: str


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


async def _record_resends(conn: aiosqlite.Connection, keys: Sequence[ResendKey]) -> None:
    """Remember committed readings in the resend window and prune each port's part of it."""
    await conn.executemany("INSERT INTO resend_window (port, seq, ms, ts) VALUES (?, ?, ?, ?)", keys)
    for port in {key[0] for key in keys}:
        await conn.execute(
            "DELETE FROM resend_window WHERE port = ? AND id <= "
            "(SELECT id FROM resend_window WHERE port = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (port, port, schema.RESEND_WINDOW_PER_PORT),
        )


def token_hash(token: str) -> str:
    """Return a short stable digest of a token (never store the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def lock_path(path: Path) -> Path:
    """Return the file a running daemon holds locked (and writes its PID into) for the buffer at `path`."""
    return path.with_name(path.name + LOCK_SUFFIX)


def running_pid(path: Path) -> int | None:
    """Return the PID of the daemon running on the buffer at `path`, or None when none runs."""
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _reading(method: _Read) -> _Read:
    """Raise a StoreError (the sqlite error as its cause) from a read that failed."""

    @functools.wraps(method)
    async def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise wrap(exc, f"reading {method.__name__}") from exc
        except ValueError as exc:  # aiosqlite: the connection was closed under the read
            raise StoreClosedError(f"reading {method.__name__}: {exc}") from exc

    return cast(_Read, read)


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
        exclusive: bool = False,
        check: CheckMode = "full",
        clock: Callable[[], float] = time.monotonic,
        inbox: bool = False,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._max_points = max_points
        self._max_bytes = max_bytes
        self._max_pages = 0
        self._full_policy = full_policy
        self._commit_interval_s = commit_interval_ms / 1000
        self._exclusive = exclusive
        self._check = check
        self._clock = clock
        self._write: aiosqlite.Connection | None = None
        self._read: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._device_ids: dict[str, int] = {}
        self._queued_total = 0
        self._pending = Pending()
        self._due_s: float | None = None  # when the pending writes must be committed (None: nothing pending)
        self._retry = Retry()
        self._commit_lock = asyncio.Lock()
        self._writer_task: asyncio.Task[None] | None = None
        self._next_vacuum_check = 0.0
        self._freed_rows = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._listeners: list[CommitListener] = []
        self._ingest_failed: dict[str, int] = {}
        self._ingest_failed_dirty = False
        self._full_since: float | None = None
        self._reserve_released = False
        self._errors_logged: list[float] = []
        self._freed_since_vacuum = False
        self._data_version = 0
        self._page_size = 4096
        self._limit_pages = -1
        self._disk_limited = False
        self._simulated_disk_pages: int | None = None
        self.needs_verify = False
        self._verify_check: asyncio.Future[str | None] | None = None
        self._verify_conn: sqlite3.Connection | None = None
        self.commits = 0
        self.recovery: Recovery | None = None
        self.startup = Progress()  # how far open() has got checking, recovering and migrating the file
        self._filing = FilingPlan(0)
        self._unsettled: set[asyncio.Future[Any]] = set()  # deliveries queued and not yet committed
        self._leases: dict[int, Lease] = {}  # device id -> its budget lease (store/lease.py)
        self._newest_unfiled = 0  # the newest unfiled row id the running transaction added (0: none)
        self._newest_filed = 0  # ... and the newest filed one
        self._uncounted = 0  # readings this buffer committed into the ledger's tail since its last fold
        self._folded_at: float | None = None  # when the last fold was committed (monotonic s; None: not yet)
        self._removed_rows = False  # whether the running transaction removed points (the mark may need lowering)
        # The inbox (store/inbox.py): the daemon's readings appended to a file of their own. Only a daemon, which
        # holds the lock, has one, and only where every commit is fsynced (synchronous FULL or EXTRA).
        self._inbox_wanted = inbox and exclusive and synchronous.upper() in ("FULL", "EXTRA")
        self._inbox: InboxFile | None = None
        self._inboxed = Queue()
        self._inbox_waiters: list[tuple[asyncio.Future[int], int]] = []  # deliveries awaiting a record, and count
        self._inbox_epoch = 0  # odd while a settle changes SQLite and the queue (reads of both wait)
        self._inbox_retry_s = 0.0  # a settle that failed is tried again from then (monotonic s)
        self._inbox_failed_logged = False

    # opening and closing ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file: lock it (a daemon), check it, recover it if damaged, create or migrate it.

        Raises StoreLockedError when another daemon runs on it, another StoreError when it cannot be opened.
        """
        daemon_elsewhere = False
        if self._exclusive:
            self._take_lock()
        else:
            daemon_elsewhere = running_pid(self.path) is not None
        try:
            if daemon_elsewhere:
                # The daemon checked, recovered and migrated the file: never move it from under the daemon.
                self.recovery = None
            else:
                # A clean stop leaves no WAL: then the pages are not all read before READY (see verify()).
                full = self._check == "full" or _stopped_uncleanly(self.path)
                self.needs_verify = not full
                if capacity.free_bytes(self.path) < capacity.RESUME_FREE_BYTES:
                    # Starting on a full disk: the reserve's room lets the file open, drain and free space.
                    self._reserve_released = await asyncio.to_thread(capacity.release_reserve, self.path)
                self.recovery = await asyncio.to_thread(prepare_file, self.path, full_check=full, progress=self.startup)
            await self._connect()
            if not daemon_elsewhere:
                await asyncio.to_thread(capacity.make_reserve, self.path)
            if self._inbox_wanted:
                await self._open_inbox()
        except BaseException:
            await self._disconnect()
            self._release_lock()
            raise

    def _take_lock(self) -> None:
        lock = lock_path(self.path)
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise wrap(exc, f"locking {self.path}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreLockedError(str(self.path), int(text) if text.isdigit() else None) from None
        with contextlib.suppress(OSError):  # a full disk must not stop the daemon: the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _connect(self) -> None:
        try:
            self._write = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._write)
            self._page_size = int(await self._pragma(self._write, "page_size") or 4096)
            if self._max_bytes:
                self._max_pages = max(1, self._max_bytes // self._page_size)
            self._limit_pages = -1
            await self._fit_disk()
            self._read = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._read)
            await self._load_caches()
        except sqlite3.Error as exc:
            raise wrap(exc, f"opening {self.path}") from exc
        if self._ingest_failed_dirty:
            self._wake.set()

    async def _disconnect(self) -> None:
        for conn in (self._write, self._read):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.close()
        self._write = self._read = None

    async def _load_caches(self) -> None:
        conn = self._connection()
        async with conn.execute("SELECT id, name FROM devices") as cursor:
            self._device_ids = {name: device_id async for device_id, name in cursor}
        self._queued_total = await self._read_queued_total()
        self._data_version = int(await self._pragma(conn, "data_version") or 0)
        async with conn.execute(f"SELECT ({filing.READ_MARK}), (SELECT MAX(id) FROM points)") as cursor:
            row = await cursor.fetchone()
        self._filing = FilingPlan(filing.mark_of(row[0]) if row else 0)
        if row and row[1] is not None and int(row[1]) >= self._filing.below:
            # Points at or above the mark may be unfiled (an earlier run's): filed once they wait long enough.
            self._filing.committed(int(row[1]), self._clock())
        async with conn.execute("SELECT value FROM meta WHERE key = ?", (META_INGEST_FAILED,)) as cursor:
            row = await cursor.fetchone()
        stored: dict[str, int] = {}
        if row:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                stored = {str(k): int(v) for k, v in json.loads(row[0]).items()}
        # Counts not yet written (the disk was full) stay: the larger of the two is the exact one.
        for device, count in stored.items():
            if count >= self._ingest_failed.get(device, 0):
                self._ingest_failed[device] = count
        self._ingest_failed_dirty = any(self._ingest_failed.get(d, 0) > stored.get(d, 0) for d in self._ingest_failed)

    async def _configure(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        await conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        # Reads are index scans and writes are appends: a small page cache costs little and keeps RSS flat.
        await conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")

    @staticmethod
    async def _pragma(conn: aiosqlite.Connection, pragma: str) -> Any:
        async with conn.execute(f"PRAGMA {pragma}") as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def verify(self) -> str | None:
        """Read every page (quick_check) of a file opened after a clean stop; recover it in place if damaged.

        The daemon runs this in the background after READY, so a large buffer starts fast; returns the problem
        found (None: healthy).
        """
        self.needs_verify = False

        def connected(conn: sqlite3.Connection) -> None:
            self._verify_conn = conn

        check = asyncio.ensure_future(asyncio.to_thread(check_file, self.path, full=True, on_connect=connected))
        self._verify_check = check
        try:
            problem = await asyncio.shield(check)  # cancelled or not, close() stops the thread and waits for it
        except CheckInterrupted:
            return None
        if problem is None or self._closing:
            return None
        async with self._commit_lock:
            await self._disconnect()
            try:
                self.recovery = await asyncio.to_thread(recover_file, self.path, problem)
                await asyncio.to_thread(prepare_file, self.path, full_check=False)
            finally:
                await self._connect()
        return problem

    async def set_page_limit(self, pages: int) -> int:
        """Limit the file to `pages` pages (simulates a full disk in tests); return the limit in force."""
        self._simulated_disk_pages = int(pages)
        await self._fit_disk()
        return self._limit_pages

    @property
    def ingest_failed(self) -> dict[str, int]:
        """Readings per device that could not be committed (disk full); never counted `received`."""
        return dict(self._ingest_failed)

    async def close(self) -> None:
        """Stop a running verify, wait for the writer to return, commit what is pending, checkpoint and close."""
        self._closing = True
        self._wake.set()
        await self._stop_verify()
        writer = self._writer_task
        if writer is not None and not writer.done() and writer is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(writer)
        # The reader goes first: a read cancelled mid-statement (a task stopped at start) leaves its statement
        # open, and the checkpoint below would wait the whole busy timeout for that read transaction to end.
        if self._read is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await self._read.close()
            self._read = None
        if self._write is not None:
            async with self._commit_lock:
                await self._flush_locked()
                await self._close_inbox()
                if self._ingest_failed_dirty or self._retry:
                    log.error(
                        "buffer_closed_unsaved",
                        ingest_failed=sum(self._ingest_failed.values()),
                        detail="the disk is full: these counts and states could not be written",
                    )
                with contextlib.suppress(sqlite3.Error):
                    await self._close_books()
                # PASSIVE, not TRUNCATE: the WAL keeps its blocks for the next start (no regrowth).
                with contextlib.suppress(sqlite3.Error):
                    await self._pragma(self._write, "wal_checkpoint(PASSIVE)")
        await self._disconnect()
        self._release_lock()
        self._fail_pending(StoreClosedError("buffer closed"))

    async def _stop_verify(self) -> None:
        """Interrupt a background quick_check and wait for its connection to close: the daemon's connections must
        be the last to close, so that the WAL is checkpointed and removed (else the next start takes the clean
        stop for an unclean one and reads every page before READY)."""
        check = self._verify_check
        if check is None or check.done():
            return
        deadline = time.monotonic() + VERIFY_STOP_TIMEOUT_S
        while not check.done() and time.monotonic() < deadline:
            conn = self._verify_conn
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.interrupt()  # safe from another thread; a no-op between statements, so again until done
            await asyncio.wait([check], timeout=VERIFY_INTERRUPT_POLL_S)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            check.exception()

    def add_listener(self, listener: CommitListener) -> None:
        """Call `listener` after every commit that added points."""
        self._listeners.append(listener)

    @property
    def queued_total(self) -> int:
        """Points queued across all devices (other processes' changes included, within a second)."""
        return self._queued_total + len(self._inboxed)

    # writes -------------------------------------------------------------------------------------

    def submit(
        self, points: Sequence[Point], *, boot_id: str | None = None, resend: ResendKey | None = None
    ) -> asyncio.Future[None]:
        """Queue points for the next group commit; the future resolves once they are committed.

        A full disk fails the future with IngestFailedError (the points are counted `ingest_failed`).
        With `boot_id`, the points' `ts_ms` is CLOCK_BOOTTIME of that boot: they are held, not sent,
        until `settle_held` gives them a wall time. With `resend`, the reading is remembered in the
        resend window in the same transaction (a reading the disk refused is not: its next copy is stored).
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(StoreClosedError("buffer is closing"))
            return future
        # The buffer logs commit failures itself; callers that do not look at the outcome stay quiet.
        future.add_done_callback(_consume_exception)
        self._pending.submits.append((boot_id, points, future, resend))
        self._due_by(self._clock() + self._commit_interval_s)
        return future

    def hold(self, points: Sequence[Point], boot_id: str, *, resend: ResendKey | None = None) -> asyncio.Future[None]:
        """Commit points stamped with CLOCK_BOOTTIME of `boot_id` as held (see `submit`)."""
        return self.submit(points, boot_id=boot_id, resend=resend)

    async def run_op(
        self, op: WriteOp, *, urgent: bool = False, kind: OpKind | None = None, key: Hashable = None
    ) -> Any:
        """Run a write inside the next group-commit transaction and return its result.

        An urgent op (a budget: a request waits for it) is committed at once, with everything queued before it.
        """
        if self._closing and self._write is None:
            raise StoreClosedError("buffer is closed")
        return await self._queue(op, kind or (OpKind.BUDGET if urgent else OpKind.CHANGE), key)

    def _queue(self, op: WriteOp, kind: OpKind, key: Hashable) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closing and self._write is None:
            future.set_exception(StoreClosedError("buffer is closed"))
            return future
        self._pending.ops.append(Op(op, future, kind, key))
        self._due_by(self._clock() + wait_s(kind, self._commit_interval_s))
        if kind is OpKind.FACT:
            future.set_result(None)  # nobody waits for a fact: it rides a later commit
        return future

    def _due_by(self, due_s: float) -> None:
        """A write arrived that must be committed by `due_s`: wake the writer if that is sooner than planned."""
        if self._due_s is None or due_s < self._due_s:
            self._due_s = due_s
            self._wake.set()

    async def run_writer(self) -> None:
        """The one writer: commit what is pending once the first write is due, in one transaction, until stopped.

        Each write waits no longer than its kind allows (see `writer.wait_s`): readings the ingest window, point
        lifecycle at most LIFECYCLE_WAIT_MAX_S, budgets not at all; a commit carries every write pending.
        """
        self._writer_task = asyncio.current_task()
        while not self._closing:
            now = self._clock()
            timeout = EXTERNAL_CHECK_S
            if self._retry:
                timeout = min(timeout, self._retry.due_s - now)
            if self._due_s is not None:
                timeout = min(timeout, self._due_s - now)
            if timeout > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                if self._wake.is_set() and not self._closing:
                    continue  # a write with an earlier deadline came: plan again
            await asyncio.shield(self._flush())
            await self._notice_other_writers()
        await self._flush()

    def stop_writer(self) -> None:
        """Ask the writer to commit what is pending and return."""
        self._closing = True
        self._wake.set()

    async def _flush(self) -> None:
        async with self._commit_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        self._wake.clear()
        if self._write is None:
            return
        retry_due = bool(self._retry) and (self._closing or self._clock() >= self._retry.due_s)
        # What arrives during a commit is committed right after it: a flood is never held back by deadlines.
        while self._pending or self._ingest_failed_dirty or retry_due or self._inboxed.unwritten:
            self._due_s = None
            pending, self._pending = self._pending, Pending()
            rest = pending.split(GROUP_COMMIT_MAX_ITEMS)
            if rest:
                # A bounded transaction: on a full disk only what did not fit is refused, not a whole backlog.
                self._pending = rest
                self._due_s = self._clock()
            if retry_due:
                facts = {op.key for op in pending.ops if op.kind is OpKind.FACT and op.key is not None}
                pending.ops[:0] = self._retry.take(facts)
            retry_due = False
            if self._inbox is not None:
                pending, appended = await self._to_inbox(pending)
                if not (pending or self._ingest_failed_dirty):
                    if appended:
                        continue
                    break  # the deliveries could not be written: a later flush tries again
            if not await self._commit(pending):
                break
        if self._pending and self._due_s is None:
            self._due_s = self._clock()
        await self._maintain()

    async def _commit(self, pending: Pending) -> bool:
        """Commit one batch; return False when it failed (what must survive is kept for a retry)."""
        readings = pending.readings
        failure: sqlite3.Error | _SkipReadings | None = None
        committed: list[Committed] = []
        results: list[Any] = []
        if readings and self._reserve_released and not capacity.room_to_resume(self.path):
            failure = _SkipReadings("the disk is still full")
        else:
            for attempt in range(1, COMMIT_ATTEMPTS + 1):
                try:
                    committed, results = await self._transaction(
                        pending.points, pending.ops, held=pending.held, resend=pending.resend
                    )
                except sqlite3.Error as exc:
                    failure = exc
                    if is_full(exc) or attempt == COMMIT_ATTEMPTS:
                        break
                    self._log_commit_error(exc, pending)
                    await asyncio.sleep(0.05 * attempt)
                else:
                    failure = None
                    break
        ingest_error: StoreError | None = None
        if failure is not None:
            if not readings:
                try:
                    results = await self._ops_transaction(pending.ops, failure)
                except sqlite3.Error as exc:
                    return self._ops_failed(pending, exc)
            try:
                committed, results, ingest_error = await self._commit_without(pending, failure)
            except sqlite3.Error as second:
                self._fail_readings(pending, IngestFailedError(f"{len(readings)} readings not committed"))
                return self._ops_failed(pending, second)
        self.commits += 1
        self._retry.succeeded()
        if ingest_error is None and readings:
            await self._ingest_resumed()
        for op, result in zip(pending.ops, results, strict=True):
            if not op.future.done():
                op.future.set_result(result)
        for waiter in pending.waiters:
            if not waiter.done():
                if ingest_error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(ingest_error)
        if committed:
            for listener in self._listeners:
                listener(committed)
        return True

    async def _ingest_resumed(self) -> None:
        """Readings were committed: a full disk that refused earlier ones has room again."""
        if self._full_since is None:
            return
        log.warning("buffer_ingest_resumed", full_for_s=round(self._clock() - self._full_since, 1))
        self._full_since = None
        if self._reserve_released and await asyncio.to_thread(capacity.make_reserve, self.path):
            self._reserve_released = False

    async def _commit_without(
        self, pending: Pending, failure: sqlite3.Error | _SkipReadings
    ) -> tuple[list[Committed], list[Any], StoreError | None]:
        """The readings did not fit: make room at the byte cap, or give them up (counted); the ops still run."""
        readings = pending.readings
        if isinstance(failure, sqlite3.Error) and is_full(failure) and await self._at_byte_cap():
            try:
                if self._full_policy == "drop_oldest":
                    for _ in range(capacity.ROOM_ATTEMPTS):
                        if not await self._make_room(len(readings)):
                            break
                        try:
                            committed, results = await self._transaction(
                                pending.points, pending.ops, held=pending.held, resend=pending.resend
                            )
                        except sqlite3.Error as again:
                            if not is_full(again):
                                raise
                            continue
                        return committed, results, None
                else:
                    _, results = await self._transaction(
                        pending.points, pending.ops, held=pending.held, cap_dropped=True
                    )
                    log.warning("buffer_full_dropped_newest", points=len(readings), max_bytes=self._max_bytes)
                    return [], results, None
            except sqlite3.Error as exc:
                failure = exc
        if isinstance(failure, sqlite3.Error):
            self._log_commit_error(failure, pending)
        # Counted before the ops are tried: the count rides with them, or stays in memory until a commit takes it.
        self._count_ingest_failed(readings)
        error = IngestFailedError(f"{failure}: {len(readings)} readings not committed")
        error.__cause__ = failure
        return [], await self._ops_transaction(pending.ops), error

    async def _ops_transaction(self, ops: list[Op], failed: BaseException | None = None) -> list[Any]:
        """Commit the ops alone; on a full disk give them the reserve's room and a fresh WAL, then try once more."""
        if failed is None:
            try:
                _, results = await self._transaction([], ops)
            except sqlite3.Error as exc:
                failed = exc
            else:
                return results
        if not (isinstance(failed, sqlite3.Error) and is_full(failed)):
            raise failed
        await self._make_disk_room()
        _, results = await self._transaction([], ops)
        return results

    async def _make_disk_room(self) -> None:
        if await asyncio.to_thread(capacity.release_reserve, self.path):
            self._reserve_released = True
        # A checkpoint lets the WAL start again from its beginning, over blocks the file already has.
        with contextlib.suppress(sqlite3.Error):
            await self._pragma(self._connection(), "wal_checkpoint(RESTART)")

    def _ops_failed(self, pending: Pending, exc: sqlite3.Error | None) -> bool:
        ops = pending.ops
        if exc is not None:
            self._log_commit_error(exc, pending)
        error = wrap(exc, "commit") if exc is not None else StoreFullError("disk full")
        if exc is not None:
            error.__cause__ = exc
        for op in ops:
            if op.future.done():
                continue
            if op.kind is OpKind.FACT:
                op.future.set_result(None)  # kept below and written later: the caller never waits for it
            elif op.kind not in RETRIED:
                op.future.set_exception(error)
        self._retry.keep([op for op in ops if op.kind is OpKind.FACT or op.kind in RETRIED], self._clock())
        if isinstance(error, StoreCorruptError):
            self.needs_verify = True
        self._wake.set()
        return False

    def _fail_readings(self, pending: Pending, error: StoreError) -> None:
        for waiter in pending.waiters:
            if not waiter.done():
                waiter.set_exception(error)

    async def _transaction(
        self,
        points: list[Point],
        ops: list[Op],
        *,
        held: Sequence[tuple[str, Point]] = (),
        resend: Sequence[ResendKey] = (),
        cap_dropped: bool = False,
    ) -> tuple[list[Committed], list[Any]]:
        conn = self._connection()
        committed: list[Committed] = []
        results: list[Any] = []
        queued_before, device_ids_before = self._queued_total, dict(self._device_ids)
        self._newest_unfiled = self._newest_filed = 0
        self._removed_rows = False
        uncounted_before = self._uncounted
        await conn.execute("BEGIN IMMEDIATE")
        cut: int | None = None
        try:
            if cap_dropped:
                if points or held:
                    await self._count_dropped_new(conn, [*points, *(point for _, point in held)])
            else:
                if points:
                    committed = await self._insert(conn, points, filed=len(points) >= filing.FILE_DIRECT_POINTS)
                if held:
                    await self._insert_held(conn, held)
                if resend:
                    await _record_resends(conn, resend)
            queued_before_ops = self._queued_total
            for op in ops:
                results.append(await op.fn(conn))
            if self._ingest_failed_dirty:
                await conn.execute(
                    SET_META,
                    (META_INGEST_FAILED, json.dumps(self._ingest_failed, sort_keys=True)),
                )
            if self._newest_unfiled:
                self._filing.committed(self._newest_unfiled, self._clock())
            if self._newest_filed:
                self._filing.seen(self._newest_filed)
            cut = await self._file(conn)
            folded = await self._fold(conn)
            if self._removed_rows:
                await conn.execute(counting.CLAMP)
            await conn.execute("COMMIT")
        except BaseException:
            self._queued_total, self._device_ids = queued_before, device_ids_before
            self._uncounted = uncounted_before
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise
        self._ingest_failed_dirty = False
        if cut is not None:
            self._filing.filed(cut)
        if folded:
            self._uncounted, self._folded_at = 0, self._clock()
        if ops:
            self._freed_rows += max(0, queued_before_ops - self._queued_total)
        return committed, results

    async def _keep_mark_below(self, conn: aiosqlite.Connection) -> None:
        """Once the table emptied, SQLite numbers new rows from its newest one again: lower the filing mark to
        there first, so that every point below it stays filed (store/filing.py)."""
        async with conn.execute(f"SELECT COALESCE(MAX(id), 0), ({filing.READ_MARK}) FROM points") as cursor:
            row = await cursor.fetchone()
        following = (int(row[0]) if row else 0) + 1
        self._filing.seen(following - 1)  # what other processes (import, deadletter retry) added, filed
        if row and following < filing.mark_of(row[1]):  # the file's mark: this transaction may yet roll back
            await conn.execute(filing.SET_MARK, (str(following),))
            self._filing = FilingPlan(min(following, self._filing.below))

    async def _fold(self, conn: aiosqlite.Connection, *, force: bool = False) -> bool:
        """Count the ledger's tail into it (store/counting.py) when due, riding this commit; return whether it did.

        Like filing, on a full disk it is left for later: a read counts the tail anyway.
        """
        now = self._clock()
        if self._folded_at is None:
            self._folded_at = now
        due = self._uncounted >= counting.FOLD_TAIL_MAX_ROWS or now - self._folded_at >= counting.FOLD_EVERY_S
        if not (force or (self._uncounted and due)):
            return False
        return await self._riding(conn, "fold", [(counting.FOLD, ()), (counting.PASS_TAIL, ())], defer_any=False)

    async def _file(self, conn: aiosqlite.Connection) -> int | None:
        """File the points that waited long enough (store/filing.py), riding this commit; return the new mark.

        Filing grows the index: on a full disk it is left for later (a savepoint keeps the rest of the commit,
        whose deliveries are what frees room).
        """
        cut = self._filing.cut(self._clock())
        if cut is None:
            return None
        steps: list[tuple[str, tuple[Any, ...]]] = [(filing.SET_MARK, (str(cut),))]
        if self._filing.unfiled:
            steps.insert(0, (filing.FILE_RANGE, (self._filing.below, cut)))
        return cut if await self._riding(conn, "filing", steps, defer_any=True) else None

    async def _riding(
        self,
        conn: aiosqlite.Connection,
        name: str,
        steps: Sequence[tuple[str, tuple[Any, ...]]],
        *,
        defer_any: bool,
    ) -> bool:
        """Run housekeeping that rides this commit (filing, the ledger's fold) in a savepoint; return whether it ran.

        It is left for later on a full disk, and undone alone when a statement fails (a full disk, or with
        `defer_any` any sqlite error): the rest of the commit, whose deliveries are what frees room, stands.
        """
        if self._full_since is not None or self._reserve_released:
            return False
        await conn.execute(f"SAVEPOINT {name}")
        try:
            for sql, params in steps:
                await conn.execute(sql, params)
        except sqlite3.Error as exc:
            await conn.execute(f"ROLLBACK TO {name}")
            await conn.execute(f"RELEASE {name}")
            if not (defer_any or is_full(exc)):
                raise
            log.debug("buffer_housekeeping_deferred", step=name, error=str(exc))
            return False
        await conn.execute(f"RELEASE {name}")
        return True

    async def _fit_disk(self) -> None:
        """Keep the file from growing into the room its WAL needs: on a full disk the file then refuses new
        readings early (free pages still take them), while deliveries, budgets and state commit, and free pages."""
        conn = self._connection()
        free = capacity.free_bytes(self.path)
        headroom = capacity.wal_headroom(self.path, self._page_size)
        if free >= 4 * headroom:
            disk_pages = None
        else:
            pages = int(await self._pragma(conn, "page_count") or 0)
            disk_pages = pages + max(0, free - headroom) // self._page_size
        if self._simulated_disk_pages is not None:
            disk_pages = min(disk_pages or capacity.MAX_PAGES, self._simulated_disk_pages)
        limit = min(p for p in (self._max_pages or None, disk_pages, capacity.MAX_PAGES) if p is not None)
        self._disk_limited = disk_pages is not None and limit == disk_pages and limit != self._max_pages
        if limit != self._limit_pages:
            self._limit_pages = int(await self._pragma(conn, f"max_page_count = {limit}") or limit)

    async def _at_byte_cap(self) -> bool:
        if not self._max_pages or self._disk_limited:
            return False
        pages = int(await self._pragma(self._connection(), "page_count") or 0)
        if pages >= self._max_pages - capacity.CAP_SLACK_PAGES:
            return True
        # A commit larger than the pages left under the cap: the cap refused it if the disk itself has room.
        return await asyncio.to_thread(capacity.free_bytes, self.path) >= capacity.RESUME_FREE_BYTES

    async def _make_room(self, wanted: int) -> bool:
        """Drop the oldest points in their own transaction; False when there is nothing left to drop."""
        count = max(wanted, capacity.ROOM_MIN_POINTS, self._queued_total // 100)
        dropped: list[int] = []

        async def op(conn: aiosqlite.Connection) -> None:
            dropped.append(await self._drop_oldest(conn, count))

        await self._transaction([], [Op(op, asyncio.get_running_loop().create_future())])
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
            self._full_since = self._clock()
            log.error("buffer_disk_full", points=len(points), ingest_failed=sum(self._ingest_failed.values()))

    def _log_commit_error(self, exc: sqlite3.Error, pending: Pending) -> None:
        now = self._clock()
        self._errors_logged = [t for t in self._errors_logged if now - t < 60]
        if len(self._errors_logged) < COMMIT_ERRORS_LOGGED_PER_MINUTE:
            self._errors_logged.append(now)
            log.error(
                "buffer_commit_failed",
                error=str(exc),
                points=len(pending.points) + len(pending.held),
                ops=len(pending.ops),
            )

    async def _notice_other_writers(self) -> None:
        """Reload the counters when another process (import, deadletter retry) committed to the file."""
        async with self._commit_lock:
            await self._notice_other_writers_locked()

    async def _notice_other_writers_locked(self) -> None:
        if self._write is None:
            return
        try:
            version = int(await self._pragma(self._write, "data_version") or 0)
            if version != self._data_version:
                self._data_version = version
                async with self._write.execute("SELECT id, name FROM devices") as cursor:
                    self._device_ids.update({name: device_id async for device_id, name in cursor})
                self._queued_total = await self._read_queued_total()
        except (sqlite3.Error, ValueError) as exc:
            log.debug("buffer_external_check_failed", error=str(exc))

    async def _maintain(self) -> None:
        """Give free pages back to the file system once a backlog has drained (incremental vacuum)."""
        if self._inbox is not None:
            await self._keep_inbox()
        if self._write is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._fit_disk()
        now = self._clock()
        # Two PRAGMA round trips after every delivery would be most of an idle gateway's CPU: look only once
        # many rows were freed, or now and then.
        due = self._freed_rows >= VACUUM_MIN_FREED_ROWS or (self._freed_rows and now >= self._next_vacuum_check)
        if not (self._freed_since_vacuum or due or self._reserve_released) or self._write is None:
            return
        self._next_vacuum_check = now + VACUUM_CHECK_INTERVAL_S
        self._freed_rows = 0
        self._freed_since_vacuum = False
        try:
            free = int(await self._pragma(self._write, "freelist_count") or 0)
            total = int(await self._pragma(self._write, "page_count") or 0)
            # On a full disk every free page given back is room for readings again.
            threshold = 1 if self._reserve_released else max(VACUUM_MIN_FREE_PAGES, total // 4)
            if not free or not total or free < threshold:
                return
            # execute() would step the pragma once, freeing a single page; a script runs it to completion.
            await self._write.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")
            # The file only shrinks when the WAL is copied back into it.
            await self._pragma(self._write, "wal_checkpoint(PASSIVE)")
            self._freed_since_vacuum = free > VACUUM_STEP_PAGES  # more to give back: go on at the next commit
            log.debug("buffer_vacuumed", free_pages=free, pages=total)
        except sqlite3.Error as exc:
            log.warning("buffer_vacuum_failed", error=str(exc))

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, Pending()
        kept = self._retry.take(set())
        for op in [*pending.ops, *kept]:
            if not op.future.done():
                op.future.set_exception(exc)
        self._fail_readings(pending, StoreClosedError(str(exc)))

    async def _read_queued_total(self) -> int:
        async with self._connection().execute(counting.QUEUED_TOTAL) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    # the inbox (store/inbox.py) -----------------------------------------------------------------

    async def _open_inbox(self) -> None:
        """Take up the inbox an earlier run left (its records into SQLite, when they fit), or start a new one."""
        path = inboxes.inbox_path(self.path)
        applied = inboxes.generation_of(await self.meta(inboxes.META_GENERATION))
        try:
            found = await asyncio.to_thread(inboxes.unapplied, self.path, applied)
        except OSError as exc:  # an inbox that cannot be read may hold readings: never start past it
            raise wrap(exc, f"reading {path}") from exc
        if found is None:
            try:
                aside = await asyncio.to_thread(inboxes.remove_stale, path, time.time())
                if aside is not None:
                    log.error("inbox_damaged", moved_to=aside.name, detail="its header is unreadable: kept aside")
                self._inbox = await asyncio.to_thread(InboxFile.create, path, max(applied, 1))
                await asyncio.to_thread(self._inbox.install, path)
            except OSError as exc:  # a full disk, a read-only directory: SQLite takes every commit, as it can
                self._inbox = None
                log.warning("inbox_unavailable", error=str(exc), detail="readings are committed to SQLite")
            return
        try:
            found_path, replay = found
            if found_path != path:  # a settle's new generation, committed in SQLite, not yet renamed
                await asyncio.to_thread(os.replace, found_path, path)
            self._inbox = await asyncio.to_thread(InboxFile.reopen, path, replay)
        except OSError as exc:
            raise wrap(exc, f"opening {path}") from exc
        self._inboxed = Queue.replayed(replay, self._clock())
        if replay.damaged:
            log.warning("inbox_damaged", records=replay.damaged, detail="their readings are lost")
        if self._inboxed.empty:
            return
        log.info("inbox_replayed", points=len(self._inboxed), records=len(replay.records), torn_tail=replay.torn_tail)
        try:  # start with everything in SQLite; on a full disk the replayed queue serves until a settle fits
            async with self._commit_lock:
                await self._settle_inbox(fold=True)
        except StoreError as exc:
            log.warning("inbox_settle_failed", error=str(exc), queued=len(self._inboxed))

    def _inbox_takes(self, pending: Pending, points: int) -> bool:
        """Whether a commit's `points` readings go to the inbox: wall-clock readings (none held), not a flood,
        within the point cap."""
        return (
            points > 0
            and all(boot_id is None for boot_id, _, _, _ in pending.submits)
            and points < filing.FILE_DIRECT_POINTS
            and self.queued_total + points <= self._max_points
            and len(self._inboxed) + points <= inboxes.FOLD_MAX_POINTS
            and (self._inbox is None or self._inbox.takes_readings)
        )

    async def _to_inbox(self, pending: Pending) -> tuple[Pending, bool]:
        """Append the readings and the deliveries not yet written as one record; return what is left for SQLite
        (everything, when the inbox does not take these readings or the append failed) and whether it appended."""
        inbox = self._inbox
        assert inbox is not None
        readings = pending.points
        takes = self._inbox_takes(pending, len(readings))
        if not takes and self._inboxed.points and any(points for _, points, _, _ in pending.submits):
            # Held readings, a flood, the point cap: SQLite's code handles them, after what the inbox queues.
            with contextlib.suppress(StoreError):
                await self._settle_inbox(fold=True)
        if not takes and not self._inboxed.unwritten:
            return pending, False
        points = readings if takes else []
        fresh = self._inboxed.new_points([(p.device, p.pin, p.ts_ms, value_json(p.value)) for p in points])
        resend = pending.resend if takes else []
        record = self._inboxed.record(fresh, resend)
        written = len(self._inboxed.unwritten)
        try:
            data = record.encode()
        except ValueError as exc:  # no reading the parsers let through fails to encode: SQLite takes it anyway
            log.error("inbox_encode_failed", error=str(exc), points=len(fresh))
            return pending, False
        try:
            await asyncio.to_thread(inbox.append, data)
        except OSError as exc:
            if not self._inbox_failed_logged:
                self._inbox_failed_logged = True
                log.error("inbox_append_failed", error=str(exc), points=len(fresh), detail="SQLite takes them")
            # The deliveries stay in memory (nothing sends those points again) and go with a later record.
            waiters, self._inbox_waiters = self._inbox_waiters, []
            for waiter, _ in waiters:
                if not waiter.done():
                    waiter.set_exception(wrap(exc, "writing the inbox"))
            return pending, False
        self._inbox_failed_logged = False
        del self._inboxed.unwritten[:written]
        self._inboxed.take(fresh, self._clock())
        self._inboxed.resend.extend(resend)
        self._inbox_written()
        self.commits += 1
        if not takes:
            return pending, True
        await self._ingest_resumed()
        for reading in pending.waiters:
            if not reading.done():
                reading.set_result(None)
        per_device: dict[str, tuple[set[int], list[int]]] = {}
        for point in points:
            pins, count = per_device.setdefault(point.device, (set(), [0]))
            pins.add(point.pin)
            count[0] += 1
        committed = [Committed(name, frozenset(pins), count[0]) for name, (pins, count) in per_device.items()]
        for listener in self._listeners:
            listener(committed)
        return Pending([], pending.ops), True

    def _inbox_written(self) -> None:
        """Every delivery of the inbox is in its file (or in SQLite): their callers may go on."""
        if self._inboxed.unwritten:
            return
        waiters, self._inbox_waiters = self._inbox_waiters, []
        for waiter, count in waiters:
            if not waiter.done():
                waiter.set_result(count)

    async def _keep_inbox(self) -> None:
        """Settle the inbox when it is due (after a commit, under the commit lock): fold a backlog into SQLite,
        or carry what little is queued into a new generation once the file has grown."""
        inbox = self._inbox
        now = self._clock()
        if inbox is None or now < self._inbox_retry_s or self._inboxed.unwritten:
            return
        queued = len(self._inboxed)
        oldest = self._inboxed.oldest_commit_s()
        if (
            queued >= inboxes.FOLD_MAX_POINTS
            or (oldest is not None and now - oldest >= inboxes.FOLD_AFTER_S)
            or inbox.size >= inboxes.COMPACT_MAX_BYTES
        ):
            fold = True
        elif inbox.size >= inboxes.COMPACT_BYTES:
            if queued * inboxes.CARRIED_POINT_BYTES > inbox.size * inboxes.CARRY_MAX_FRACTION:
                return  # most of the file is still queued: wait for the cloud to take it
            fold = False
        else:
            return
        try:
            await self._settle_inbox(fold=fold)
        except StoreError as exc:
            self._inbox_retry_s = now + RETRY_MAX_S
            log.warning("inbox_settle_failed", error=str(exc), queued=queued, retry_s=RETRY_MAX_S)

    async def _fold_inbox(
        self,
        ids: Iterable[int] = (),
        *,
        device: str | None = None,
        pin: int | None = None,
        before_ts: int | None = None,
    ) -> None:
        """Fold the inbox into SQLite when it holds any of `ids`, or a point of `device`/`pin` older than
        `before_ts` (the rare paths, refusals, thinning and expiry, keep their SQLite code)."""
        queue = self._inboxed
        if not queue.points:
            return
        needed = any(i in queue.points for i in ids)
        if not needed and device is not None and pin is not None and before_ts is not None:
            needed = any(p.ts_ms < before_ts for p in queue.of_pin(device, pin))
        if needed:
            async with self._commit_lock:
                if queue.points:
                    await self._settle_inbox(fold=True)

    def _translated(self, ids: Iterable[int]) -> list[int]:
        """Row ids of points that may have been folded from the inbox since their ids were read."""
        moved = self._inboxed.moved
        return [moved.get(i, i) for i in ids]

    async def _settle_inbox(self, *, fold: bool) -> None:
        """Commit what the inbox says to SQLite and start its next generation (the caller holds the commit lock).

        The ledger counts the delivered readings; with `fold` the queued points are inserted into the points
        table, else they are carried into the new file. The new file is written and fsynced first, SQLite's
        commit names its generation, then it is renamed into place (store/inbox.py: a crash anywhere leaves
        the generation SQLite names).
        """
        inbox, queue = self._inbox, self._inboxed
        if inbox is None:
            return
        path = inboxes.inbox_path(self.path)
        generation = inbox.generation + 1
        carried = [] if fold else [queue.carried()]
        try:
            new = await asyncio.to_thread(InboxFile.create, path, generation, carried)
        except OSError as exc:
            raise wrap(exc, "writing the inbox") from exc
        points = sorted(queue.points.values(), key=_fold_order) if fold else []
        folded: dict[int, int] = {}

        async def op(conn: aiosqlite.Connection) -> None:
            folded.update(await self._insert_folded(conn, points))
            for device, counts in queue.counts.items():
                delivered = counts.live + counts.history
                if delivered:
                    device_id = await self._device_id(conn, device)
                    await self._add_ledger(
                        conn,
                        device_id,
                        received=delivered,
                        delivered_live=counts.live,
                        delivered_history=counts.history,
                    )
            if queue.resend:
                await _record_resends(conn, queue.resend)
            await conn.execute(SET_META, (inboxes.META_GENERATION, str(generation)))

        self._inbox_epoch += 1  # odd: SQLite and the queue may disagree until both are settled (see _merged)
        try:
            await self._transaction([], [Op(op, asyncio.get_running_loop().create_future())])
        except BaseException as exc:
            self._inbox_epoch += 1
            await asyncio.to_thread(new.remove)
            if isinstance(exc, sqlite3.Error):
                raise wrap(exc, "settling the inbox") from exc
            raise
        queue.settled(folded=folded if fold else None)
        self._inbox_epoch += 1
        self._inbox_written()
        self._inbox = new
        inbox.close()
        try:
            await asyncio.to_thread(new.install, path)
        except OSError as exc:  # the next start renames it: SQLite names its generation
            log.warning("inbox_rename_failed", error=str(exc))
        if fold and points:
            log.debug("inbox_folded", points=len(points), generation=generation)

    async def _insert_folded(self, conn: aiosqlite.Connection, points: Sequence[InboxPoint]) -> dict[int, int]:
        """Insert the inbox's queued points, filed (they are a backlog now); return their new row ids."""
        if not points:
            return {}
        rows = []
        for point in points:
            known = self._device_ids.get(point.device)
            device_id = known if known is not None else await self._device_id(conn, point.device)
            rows.append((device_id, point.pin, point.ts_ms, point.value_json))
        await conn.executemany("INSERT INTO points (device_id, pin, ts, value, filed) VALUES (?, ?, ?, ?, 1)", rows)
        async with conn.execute("SELECT last_insert_rowid()") as cursor:
            row = await cursor.fetchone()
        newest = int(row[0]) if row else 0
        self._newest_filed = max(self._newest_filed, newest)
        self._uncounted += len(rows)  # counted by being in the tail (store/counting.py)
        self._queued_total += len(rows)
        first = newest - len(rows) + 1  # one statement, the write lock held: consecutive row ids
        return {point.id: first + offset for offset, point in enumerate(points)}

    async def _merged(self, read: Callable[[], Awaitable[_T]]) -> _T:
        """Run a read of SQLite whose result is combined with the queue's: never across a settle."""
        while True:
            epoch = self._inbox_epoch
            if epoch % 2 == 0:
                result = await read()
                if self._inbox_epoch == epoch:
                    return result
            await asyncio.sleep(SETTLE_POLL_S)

    async def _close_inbox(self) -> None:
        """At a clean stop: fold the inbox into SQLite and remove its file (kept, and replayed, if it cannot)."""
        inbox = self._inbox
        if inbox is None:
            return
        try:
            if not self._inboxed.empty:
                await self._settle_inbox(fold=True)
        except StoreError as exc:
            log.warning("inbox_settle_failed", error=str(exc), queued=len(self._inboxed), detail="replayed at start")
            inbox.close()
        else:
            await asyncio.to_thread(self._inbox.remove if self._inbox is not None else inbox.close)
        self._inbox = None

    # the point lifecycle ------------------------------------------------------------------------

    async def _fit(self, conn: aiosqlite.Connection, points: Sequence[Point]) -> tuple[int, int]:
        """Apply the point cap to new points: return the slice [start, stop) of them that is kept."""
        drop, start, stop = capacity.fit(self.queued_total, self._max_points, len(points), self._full_policy)
        if drop:
            await self._drop_oldest(conn, drop)
        dropped_new: dict[int, int] = {}
        for point in (*points[:start], *points[stop:]):
            device_id = await self._device_id(conn, point.device)
            dropped_new[device_id] = dropped_new.get(device_id, 0) + 1
        for device_id, dropped in dropped_new.items():
            await self._add_ledger(conn, device_id, received=dropped, dropped=dropped)
        return start, stop

    async def _insert(self, conn: aiosqlite.Connection, points: list[Point], *, filed: bool = False) -> list[Committed]:
        """Insert sendable points; readings go in unfiled (store/filing.py), imports filed."""
        start, stop = await self._fit(conn, points)
        accepted = points if (start, stop) == (0, len(points)) else points[start:stop]
        rows = []
        per_device: dict[str, tuple[set[int], list[int]]] = {}
        for point in accepted:
            known = self._device_ids.get(point.device)
            device_id = known if known is not None else await self._device_id(conn, point.device)
            rows.append((device_id, point.pin, point.ts_ms, value_json(point.value), int(filed)))
            pins, count = per_device.setdefault(point.device, (set(), [0]))
            pins.add(point.pin)
            count[0] += 1
        if rows and not filed:
            await self._keep_mark_below(conn)
        await conn.executemany("INSERT INTO points (device_id, pin, ts, value, filed) VALUES (?, ?, ?, ?, ?)", rows)
        if rows:
            async with conn.execute("SELECT last_insert_rowid()") as cursor:
                row = await cursor.fetchone()
            newest = int(row[0]) if row else 0
            if filed:
                self._newest_filed = max(self._newest_filed, newest)
            else:
                self._newest_unfiled = max(self._newest_unfiled, newest)
        # Counted by being in the tail (store/counting.py): the ledger's page is left alone.
        self._uncounted += len(rows)
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
        per_device = await self._delete_points(
            conn, "DELETE FROM points WHERE id IN (SELECT id FROM points ORDER BY id LIMIT ?)", (count,)
        )
        left = count - sum(removed for removed, _ in per_device.values())
        if left > 0:  # held readings (no wall time yet) go only when no sendable point is left to drop
            async with conn.execute(
                "DELETE FROM held WHERE id IN (SELECT id FROM held ORDER BY id LIMIT ?) RETURNING device_id", (left,)
            ) as cursor:
                async for (device_id,) in cursor:
                    removed, in_tail = per_device.get(device_id, (0, 0))
                    per_device[device_id] = (removed + 1, in_tail)
        for device_id, (dropped, in_tail) in per_device.items():
            await self._count_removed(conn, device_id, dropped, in_tail, "dropped")
        if per_device:
            log.warning("buffer_full_dropped_oldest", points=sum(removed for removed, _ in per_device.values()))
        return sum(removed for removed, _ in per_device.values())

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

    # the point lifecycle, budgets and state, for the forwarder --------------------------------------

    async def device_id(self, name: str) -> int:
        """Return (creating if needed) the numeric id of a device."""
        known = self._device_ids.get(name)
        if known is not None:
            return known
        result: int = await self.run_op(lambda conn: self._device_id(conn, name))
        return result

    async def deliver(self, device: str, ids: Sequence[int], path: DeliveryPath) -> int:
        """Delete points the cloud answered 200 for and count them delivered; return once committed."""
        future = self.deliver_later(device, ids, path)
        await self._settle_deliveries()
        return await future

    def deliver_later(self, device: str, ids: Sequence[int], path: DeliveryPath) -> asyncio.Future[int]:
        """Delete delivered points with a later commit (at most DELIVERY_WAIT_S away); the future says how many.

        What the forwarder does after a 200: the deletion rides the next reading's commit instead of paying an
        fdatasync of its own. Nothing can send the points again meanwhile: every read of queued points, and the
        budget of the next request, waits for it first. So a crash resends at most this batch, as it would have
        if the cloud's answer had been lost. Points in the inbox leave its queue at once; their delivery rides
        its next record.
        """
        column = "delivered_live" if path == "live" else "delivered_history"
        loop = asyncio.get_running_loop()
        parts: list[asyncio.Future[int]] = []
        if any(i >= ID_BASE for i in ids):
            taken = self._inboxed.deliver([i for i in ids if i >= ID_BASE], live=path == "live")
            ids = self._translated(i for i in ids if i < ID_BASE or i in self._inboxed.moved)
            if taken:
                waiter: asyncio.Future[int] = loop.create_future()
                self._inbox_waiters.append((waiter, len(taken)))
                self._due_by(self._clock() + wait_s(OpKind.DELIVERY, self._commit_interval_s))
                parts.append(waiter)
        device_id = self._device_ids.get(device)
        if device_id is not None and ids:  # else its points were never read through this buffer: none to delete
            parts.append(self._queue(self._remove_op(device_id, ids, column), OpKind.DELIVERY, None))
        future = _sum_of(loop, parts)
        for part in parts:
            self._unsettled.add(part)
            part.add_done_callback(self._unsettled.discard)
        future.add_done_callback(_consume_exception)
        return future

    async def _settle_deliveries(self) -> None:
        """Before a read of queued points: commit the deliveries still riding along (the read must not see them)."""
        if self._unsettled:
            self._due_by(self._clock())
            await asyncio.gather(*(asyncio.shield(f) for f in list(self._unsettled)), return_exceptions=True)

    async def expire(self, device: str, before_ts_ms: int, *, pin: int) -> int:
        """Delete a pin's points older than `before_ts_ms` and count them expired.

        Looked up first: a check that finds nothing to expire (nearly every one) is no commit of its own.
        """
        await self._fold_inbox(device=device, pin=pin, before_ts=before_ts_ms)
        device_id = await self.device_id(device)
        oldest = await self._oldest_of_pin(device_id, pin)
        if oldest is None or oldest >= before_ts_ms:
            return 0

        async def op(conn: aiosqlite.Connection) -> int:
            count = in_tail = 0
            for where in (FILED, UNFILED):
                removed = await self._delete_points(
                    conn,
                    f"DELETE FROM points WHERE device_id = ? AND pin = ? AND ts < ? AND {where}",
                    (device_id, pin, before_ts_ms),
                )
                for part, part_in_tail in removed.values():
                    count, in_tail = count + part, in_tail + part_in_tail
            if count > 0:
                await self._count_removed(conn, device_id, count, in_tail, "expired")
            return count

        result: int = await self.run_op(op, kind=OpKind.LIFECYCLE)
        return result

    async def reject(self, device: str, points: Sequence[QueuedPoint], reason: str) -> int:
        """Move points the cloud refused for good to the dead-letter table."""
        await self._fold_inbox([p.id for p in points])
        ids = self._translated(p.id for p in points)
        device_id = await self.device_id(device)
        now_ms = time.time_ns() // 1_000_000

        async def op(conn: aiosqlite.Connection) -> int:
            count, in_tail = await self._delete_ids(conn, ids)
            await conn.executemany(
                "INSERT INTO deadletter (device_id, pin, ts, value, reason, at) VALUES (?, ?, ?, ?, ?, ?)",
                [(device_id, p.pin, p.ts_ms, p.value_json, redact(reason), now_ms) for p in points],
            )
            if count:
                await self._count_removed(conn, device_id, count, in_tail, "rejected")
            return count

        result: int = await self.run_op(op, kind=OpKind.LIFECYCLE)
        return result

    async def import_points(self, points: Sequence[Point]) -> int:
        """Queue the points no earlier import queued and remember them, in one transaction; return how many."""
        unique = list({(p.device, p.pin, p.ts_ms): p for p in points}.values())

        async def op(conn: aiosqlite.Connection) -> int:
            fresh: list[Point] = []
            for point in unique:
                async with conn.execute(
                    "SELECT 1 FROM import_seen WHERE device = ? AND pin = ? AND ts = ?",
                    (point.device, point.pin, point.ts_ms),
                ) as cursor:
                    if await cursor.fetchone() is None:
                        fresh.append(point)
            if fresh:
                await self._insert(conn, fresh, filed=True)
                await conn.executemany(
                    "INSERT OR IGNORE INTO import_seen (device, pin, ts) VALUES (?, ?, ?)",
                    [(p.device, p.pin, p.ts_ms) for p in fresh],
                )
            return len(fresh)

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
            async with conn.execute(
                f"SELECT device_id, pin, COUNT(*) FROM held WHERE {where} GROUP BY device_id, pin", params
            ) as cursor:
                rows = [(int(row[0]), int(row[1]), int(row[2])) async for row in cursor]
            moved.extend((device_id, pin) for device_id, pin, _ in rows)
            await conn.execute(
                "INSERT INTO points (device_id, pin, ts, value) "
                f"SELECT device_id, pin, mono_ms + ?, value FROM held WHERE {where} ORDER BY id",
                (offset_ms, *params),
            )
            # Counted when they were held; in the points table the tail counts them (store/counting.py).
            per_device: dict[int, int] = {}
            for device_id, _, count in rows:
                per_device[device_id] = per_device.get(device_id, 0) + count
            for device_id, count in per_device.items():
                await self._add_ledger(conn, device_id, received=-count, queued=-count)
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
            await conn.execute(SET_META, (META_HELD_UNSTAMPED, str(unstamped)))
            return Settled(rebased, stamped, unstamped)

        settled: Settled = await self.run_op(op, kind=OpKind.LIFECYCLE)
        names = {device_id: name for name, device_id in self._device_ids.items()}
        pins: dict[str, set[int]] = {}
        for device_id, pin in moved:
            pins.setdefault(names.get(device_id, ""), set()).add(pin)
        committed = [Committed(name, frozenset(p), 0) for name, p in pins.items() if name]
        if committed:
            for listener in self._listeners:
                listener(committed)
        return settled

    @_reading
    async def held_by_boot(self) -> dict[str, int]:
        """Return how many readings are held (awaiting a trusted clock) per boot id."""
        async with self._reader().execute("SELECT boot_id, COUNT(*) FROM held GROUP BY boot_id") as cursor:
            return {str(row[0]): int(row[1]) async for row in cursor}

    async def thin(self, device: str, ids: Sequence[int]) -> int:
        """Delete points thinned out by the downsample policy and count them downsampled."""
        return await self._remove(device, ids, "downsampled")

    async def _remove(self, device: str, ids: Sequence[int], column: str) -> int:
        await self._fold_inbox(ids)
        op = self._remove_op(await self.device_id(device), self._translated(ids), column)
        result: int = await self.run_op(op, kind=OpKind.LIFECYCLE)
        return result

    def _remove_op(self, device_id: int, ids: Sequence[int], column: str) -> WriteOp:
        async def op(conn: aiosqlite.Connection) -> int:
            count, in_tail = await self._delete_ids(conn, ids)
            if count:
                await self._count_removed(conn, device_id, count, in_tail, column)
            return count

        return op

    async def _delete_ids(self, conn: aiosqlite.Connection, ids: Sequence[int]) -> tuple[int, int]:
        """Delete points by row id; return how many went, and how many of them were in the ledger's tail."""
        if not ids:
            return 0, 0
        per_device = await self._delete_points(
            conn,
            "DELETE FROM points WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(ids), separators=(",", ":")),),
        )
        return sum(n for n, _ in per_device.values()), sum(t for _, t in per_device.values())

    async def _delete_points(
        self, conn: aiosqlite.Connection, delete: str, params: tuple[Any, ...]
    ) -> dict[int, tuple[int, int]]:
        """Run a DELETE of points; return per device how many rows went, and how many of those were in the tail
        (not yet in the ledger: store/counting.py)."""
        async with conn.execute(counting.READ_MARK) as cursor:
            row = await cursor.fetchone()
        mark = int(row[0]) if row and row[0] is not None else None
        per_device: dict[int, tuple[int, int]] = {}
        async with conn.execute(f"{delete} RETURNING device_id, id", params) as cursor:
            async for device_id, row_id in cursor:
                removed, in_tail = per_device.get(int(device_id), (0, 0))
                per_device[int(device_id)] = (removed + 1, in_tail + int(mark is not None and row_id >= mark))
        if per_device:
            self._removed_rows = True
        return per_device

    async def _count_removed(
        self, conn: aiosqlite.Connection, device_id: int, count: int, in_tail: int, outcome: str
    ) -> None:
        """Count `count` removed points of a device under `outcome` (`in_tail` of them were not counted yet)."""
        await self._add_ledger(conn, device_id, **counting.removed(count, in_tail), **{outcome: count})
        self._queued_total -= count

    async def spend(self, device: str, now_s: float, *, messages: int = 1, points: int = 0) -> Budget:
        """Count a request (and its timestamped points) against the device's budget before it is sent.

        Returns once the file counts it: at once when the device's lease covers it (the exact count rides a later
        commit), else after a commit of a new reservation, with everything pending (store/lease.py). Either way,
        with a delivery still riding along, that is committed first: a crash never resends more than one batch.
        """
        device_id = await self.device_id(device)
        day, month = utc_day(now_s), utc_month(now_s)
        lease = self._leases.get(device_id)
        if lease is None:
            current = await self._budget(self._reader(), device_id, day, month)
            lease = self._leases.setdefault(device_id, Lease(current, current))
        before = lease.spent
        spent = lease.add(day, month, messages=messages, points=points)
        lease.spent = spent
        if lease.covers(spent):
            # A delivery still riding along is committed first (an inbox record, or a commit of SQLite's own).
            await self._settle_deliveries()
            self._queue(self._budget_op(device_id, lease, reserve=False), OpKind.FACT, ("budget", device_id))
            return spent
        reserved = lease.reservation(spent)
        try:
            await self.run_op(self._budget_op(device_id, lease, reserve=True, reserved=reserved), kind=OpKind.BUDGET)
        except BaseException:
            lease.spent = before  # not recorded: the request is not sent
            raise
        lease.reserved = reserved
        return spent

    @staticmethod
    def _budget_op(device_id: int, lease: Lease, *, reserve: bool, reserved: Budget | None = None) -> WriteOp:
        async def op(conn: aiosqlite.Connection) -> None:
            spent = lease.spent  # the newest count when the commit runs
            kept = reserved if reserve and reserved is not None else lease.reserved
            same = kept.day == spent.day and kept.month == spent.month
            await conn.execute(
                "INSERT OR REPLACE INTO budget (device_id, day, points_day, month, messages_month, "
                "points_day_reserved, messages_month_reserved) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    spent.day,
                    spent.points_day,
                    spent.month,
                    spent.messages_month,
                    max(spent.points_day, kept.points_day if same else 0),
                    max(spent.messages_month, kept.messages_month if same else 0),
                ),
            )

        return op

    async def _close_books(self) -> None:
        """At a clean stop: the reservations become the exact counts (nothing was sent past them), and the ledger
        counts its tail (store/counting.py), so that a stopped buffer's ledger table is whole."""
        rows = [
            (lease.spent.points_day, lease.spent.messages_month, device_id, lease.spent.day, lease.spent.month)
            for device_id, lease in self._leases.items()
        ]
        conn = self._connection()
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await conn.executemany(
                "UPDATE budget SET points_day = ?, messages_month = ?, points_day_reserved = points_day, "
                "messages_month_reserved = messages_month WHERE device_id = ? AND day = ? AND month = ?",
                rows,
            )
            await self._fold(conn, force=True)
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise

    @_reading
    async def budget(self, device: str, now_s: float) -> Budget:
        """Return what the device has spent today and this month (after a crash: what it had reserved)."""
        device_id = await self.device_id(device)
        day, month = utc_day(now_s), utc_month(now_s)
        lease = self._leases.get(device_id)
        if lease is not None:
            return lease.add(day, month, messages=0, points=0)
        return await self._budget(self._reader(), device_id, day, month)

    @staticmethod
    async def _budget(conn: aiosqlite.Connection, device_id: int, day: str, month: str) -> Budget:
        async with conn.execute(
            "SELECT day, MAX(points_day, points_day_reserved), month, MAX(messages_month, messages_month_reserved) "
            "FROM budget WHERE device_id = ?",
            (device_id,),
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

        await self.run_op(op, kind=OpKind.FACT, key=("state", device_id))

    @_reading
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

        await self.run_op(op, kind=OpKind.FACT, key=("server", token_hash(token)))

    async def save_ports(self, rows: Iterable[tuple[str, str, int, int, int, int, str]]) -> None:
        """Store a snapshot of the ports' state and counters for `status`."""
        now_ms = time.time_ns() // 1_000_000
        values = [(*row[:6], redact(row[6]), now_ms) for row in rows]

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "INSERT INTO ports (path, state, lines_ok, lines_bad, lines_ignored, reconnects, detail, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET state = excluded.state, "
                "lines_ok = excluded.lines_ok, lines_bad = excluded.lines_bad, lines_ignored = excluded.lines_ignored, "
                "reconnects = excluded.reconnects, detail = excluded.detail, updated = excluded.updated",
                values,
            )

        await self.run_op(op, kind=OpKind.FACT, key="ports")

    @_reading
    async def resend_window(self, port: str) -> list[tuple[int, int | None, int | None]]:
        """Return a port's part of the resend window as (seq, ms, ts) rows, oldest first."""
        rows = await self._reader().execute_fetchall(
            "SELECT seq, ms, ts FROM resend_window WHERE port = ? ORDER BY id", (port,)
        )
        inboxed = [(seq, ms, ts) for key_port, seq, ms, ts in self._inboxed.resend if key_port == port]
        window = [(int(row[0]), row[1], row[2]) for row in rows] + inboxed
        return window[-schema.RESEND_WINDOW_PER_PORT :]

    async def saved_ports(self) -> dict[str, tuple[int, int, int, int, str]]:
        """Return each port's last stored counters (lines ok, bad, ignored, reconnects, detail JSON)."""
        rows = await self._reader().execute_fetchall(
            "SELECT path, lines_ok, lines_bad, lines_ignored, reconnects, detail FROM ports"
        )
        return {str(row[0]): (int(row[1]), int(row[2]), int(row[3]), int(row[4]), str(row[5] or "")) for row in rows}

    async def set_meta(self, items: dict[str, str]) -> None:
        """Store small key/value facts (daemon pid, heartbeat)."""

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.executemany(SET_META, list(items.items()))

        await self.run_op(op, kind=OpKind.FACT, key=("meta", *sorted(items)))

    # reads --------------------------------------------------------------------------------------

    @_reading
    async def meta(self, key: str) -> str | None:
        """Return one value of the `meta` table."""
        async with self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)) as cursor:
            row = await cursor.fetchone()
        return str(row[0]) if row else None

    @_reading
    async def pins_queued(self, device: str, *, settle: bool = True) -> list[int]:
        """Return the pins that have queued points, ascending."""
        device_id = self._device_ids.get(device)
        if settle:  # see `ledger`
            await self._settle_deliveries()

        async def read() -> set[int]:
            if device_id is None:
                return set()
            async with self._reader().execute(filing.PINS_QUEUED, (device_id,)) as cursor:
                return {int(row[0]) async for row in cursor}

        pins = await self._merged(read)
        return sorted(pins | self._inboxed.pins(device))

    @_reading
    async def newest(self, device: str, pin: int) -> QueuedPoint | None:
        """Return the newest queued point of one pin."""
        device_id = self._device_ids.get(device)
        await self._settle_deliveries()

        read = self._point_rows(
            device_id,
            "SELECT id, ts, value FROM points WHERE device_id = ? AND pin = ? AND {where} "
            "ORDER BY ts DESC, id DESC LIMIT 1",
            (pin,),
        )
        rows = [*await self._merged(read), *_rows(self._inboxed.of_pin(device, pin))]
        row = max(rows, key=lambda r: (r[1], r[0]), default=None)
        return QueuedPoint(row[0], pin, row[1], row[2]) if row else None

    @_reading
    async def oldest(
        self, device: str, pin: int, limit: int, *, max_id: int | None = None, after: tuple[int, int] | None = None
    ) -> list[QueuedPoint]:
        """Return up to `limit` of a pin's queued points, oldest first, with row id <= max_id, past (ts, id) `after`."""
        device_id = self._device_ids.get(device)
        if limit <= 0:
            return []
        after_ts, after_id = after if after is not None else (-(2**63), -1)
        top = max_id if max_id is not None else 2**63 - 1
        if after is None:  # a read past a cursor comes after the points its reader delivered
            await self._settle_deliveries()

        read = self._point_rows(
            device_id,
            "SELECT id, ts, value FROM points WHERE device_id = ? AND pin = ? AND id <= ? "
            "AND (ts > ? OR (ts = ? AND id > ?)) AND {where} ORDER BY ts, id LIMIT ?",
            (pin, top, after_ts, after_ts, after_id, limit),
        )
        rows = await self._merged(read)
        inboxed = [
            p
            for p in self._inboxed.of_pin(device, pin)
            if p.id <= top and (p.ts_ms > after_ts or (p.ts_ms == after_ts and p.id > after_id))
        ]
        rows.extend(_rows(inboxed))
        return [QueuedPoint(row[0], pin, row[1], row[2]) for row in heapq.nsmallest(limit, rows, key=_time_order)]

    def _point_rows(
        self, device_id: int | None, part: str, params: tuple[Any, ...]
    ) -> Callable[[], Awaitable[list[Any]]]:
        """A read of a device's points, `part` over the filed and the unfiled ones (`filing.both`), in one fetchall
        (iterating the cursor would cost a thread hand-off per 64 rows); none for a device SQLite does not know."""

        async def read() -> list[Any]:
            if device_id is None:
                return []
            return list(await self._reader().execute_fetchall(filing.both(part), (device_id, *params) * 2))

        return read

    @_reading
    async def count_queued(
        self, device: str, pin: int, *, max_id: int | None = None, before_ts: int | None = None
    ) -> int:
        """Count a pin's queued points (row id <= max_id, timestamp < before_ts)."""
        device_id = self._device_ids.get(device)
        await self._settle_deliveries()
        bounds = (max_id if max_id is not None else 2**63 - 1, before_ts if before_ts is not None else 2**63 - 1)

        async def read() -> int:
            if device_id is None:
                return 0
            rows = await self._reader().execute_fetchall(
                filing.both(
                    "SELECT COUNT(*) FROM points WHERE device_id = ? AND pin = ? AND id <= ? AND ts < ? AND {where}"
                ),
                (device_id, pin, *bounds) * 2,
            )
            return sum(int(row[0]) for row in rows)

        counted = await self._merged(read)
        return counted + sum(1 for p in self._inboxed.of_pin(device, pin) if p.id <= bounds[0] and p.ts_ms < bounds[1])

    @_reading
    async def max_id(self) -> int:
        """Return the highest point id committed so far (an inbox id, above every row id, when it has any)."""
        if self._inboxed.next_seq:
            return ID_BASE + self._inboxed.next_seq - 1
        async with self._reader().execute("SELECT COALESCE(MAX(id), 0) FROM points") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    @_reading
    async def oldest_ts(self, device: str, *, settle: bool = True) -> int | None:
        """Return the timestamp of the device's oldest queued point."""
        device_id = self._device_ids.get(device)
        if settle:  # see `ledger`
            await self._settle_deliveries()

        async def read() -> int | None:
            if device_id is None:
                return None
            async with self._reader().execute(filing.OLDEST_TS_OF_DEVICE, (device_id,)) as cursor:
                row = await cursor.fetchone()
            return int(row[0]) if row and row[0] is not None else None

        found = [ts for ts in (await self._merged(read), self._inboxed.oldest_ts(device)) if ts is not None]
        return min(found, default=None)

    @_reading
    async def _oldest_of_pin(self, device_id: int, pin: int) -> int | None:
        async with self._reader().execute(filing.OLDEST_TS, (device_id, pin) * 2) as cursor:
            row = await cursor.fetchone()
        return min((int(ts) for ts in row or () if ts is not None), default=None)

    @_reading
    async def ledger(self, device: str, *, settle: bool = True) -> dict[str, int]:
        """Return a device's ledger counters: with `settle`, the deliveries still riding along committed first;
        without (a periodic report: STATUS=, metrics), as the file has them, never waiting for a commit."""
        device_id = self._device_ids.get(device)
        if settle:
            await self._settle_deliveries()

        async def read() -> dict[str, int]:
            counts = dict.fromkeys(LEDGER_FIELDS, 0)
            if device_id is None:
                return counts
            async with self._reader().execute(counting.LEDGER_OF, (device_id,)) as cursor:
                row = await cursor.fetchone()
            return counting.ledger_row(tuple(row)) if row else counts

        return inboxes.with_counts(await self._merged(read), self._inboxed.counts.get(device))

    def _connection(self) -> aiosqlite.Connection:
        if self._write is None:
            raise StoreClosedError("buffer is not open")
        return self._write

    def _reader(self) -> aiosqlite.Connection:
        if self._read is None:
            raise StoreClosedError("buffer is not open")
        return self._read


class _SkipReadings(Exception):
    """The disk is still full: readings are counted `ingest_failed` without trying to write them."""


def _stopped_uncleanly(path: Path) -> bool:
    """Whether the last process to close the file did not (a WAL with frames is left behind)."""
    wal = Path(f"{path}-wal")
    return not path.exists() or (wal.exists() and wal.stat().st_size > 0)


def _rows(points: Iterable[InboxPoint]) -> list[tuple[int, int, str]]:
    """Inbox points as (id, ts, value) rows, as the reads of SQLite give them."""
    return [(p.id, p.ts_ms, p.value_json) for p in points]


def _fold_order(point: InboxPoint) -> tuple[str, int, int, int]:
    """The order folded points are inserted in: each pin's together (its deliveries then free whole pages)."""
    return point.device, point.pin, point.ts_ms, point.id


def _time_order(row: Any) -> tuple[int, int]:
    """(ts, id) of an (id, ts, value) row: the order a pin's points are sent in."""
    return int(row[1]), int(row[0])


def _sum_of(loop: asyncio.AbstractEventLoop, parts: Sequence[asyncio.Future[int]]) -> asyncio.Future[int]:
    """A future of the parts' sum (the first failure, if one fails)."""
    total: asyncio.Future[int] = loop.create_future()
    if not parts:
        total.set_result(0)
        return total

    def finished(_: asyncio.Future[int]) -> None:
        if total.done() or not all(part.done() for part in parts):
            return
        for part in parts:
            if part.cancelled():
                total.cancel()
                return
            failure = part.exception()
            if failure is not None:
                total.set_exception(failure)
                return
        total.set_result(sum(part.result() for part in parts))

    for part in parts:
        part.add_done_callback(finished)
    return total


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
