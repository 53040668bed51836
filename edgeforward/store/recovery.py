"""Checking the file at start, and recovering a damaged one atomically: built beside it, fsynced, renamed in."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from . import counting
from .errors import StoreError, StoreFullError, is_full, wrap
from .schema import (
    BUSY_TIMEOUT_MS,
    LEDGER_FIELDS,
    META_COUNTED_BELOW,
    META_RECOVERIES,
    META_RECOVERY,
    NEXT_POINT_ID,
    SALVAGE_TABLES,
    SCHEMA_VERSION,
    SET_META,
    TABLES_SINCE,
    WITHOUT_ROWID_TABLES,
    expected_columns,
    migrate,
    user_version,
)

log = structlog.get_logger(__name__)

SALVAGE_BATCH_ROWS: Final = 1000
# A salvage copies a table in row-id ranges this wide, each by one statement; a range that does not read is
# copied row by row. More ranges than this (very sparse row ids) and the table is one range.
SALVAGE_CHUNK_ROWIDS: Final = 100_000
SALVAGE_MAX_CHUNKS: Final = 100_000
MIN_ROWID: Final = -(2**63)
MAX_ROWID: Final = 2**63 - 1
SQLITE_HEADER_BYTES: Final = 100
PAGE_SIZES_TRIED: Final = (1024, 4096, 512, 2048, 8192, 16384, 32768, 65536)
# While a recovery builds the fresh file it is `<name>.recovering` (removed if a start finds it: incomplete);
# once fsynced it is renamed `<name>.recovered` (complete: a start that finds it finishes the swap).
BUILDING_SUFFIX: Final = ".recovering"
BUILT_SUFFIX: Final = ".recovered"
SALVAGE_COPY_SUFFIX: Final = ".salvage-tmp"
COMPANIONS: Final = ("-wal", "-shm", "-journal")
_DAMAGED: Final = "damaged"  # the schema name the damaged file is attached under while it is salvaged
# Below this much free space an error opening the file is taken for a full disk, not for damage.
FULL_DISK_BYTES: Final = 64 * 1024
# Preparing the file counts a step every this many SQLite instructions (and every batch a recovery copies).
PROGRESS_EVERY_OPS: Final = 100_000


class Progress:
    """How far preparing the file has got: what it is doing, and a count that grows while it works.

    The thread that prepares the file writes it; the event loop reads it (an int and a str: no lock needed) to
    ask systemd for more start-up time while the count grows (notify.StartExtender): a recovery of a large file
    outlasts any fixed start timeout, a stuck one stops growing.
    """

    def __init__(self) -> None:
        self.phase = "opening the buffer"
        self.steps = 0

    def enter(self, phase: str) -> None:
        """Start the next phase (a step of its own)."""
        self.phase = phase
        self.steps += 1

    def step(self) -> None:
        """Count one more piece of work done."""
        self.steps += 1

    def watch(self, conn: sqlite3.Connection) -> None:
        """Count the work of every statement `conn` runs, however long one of them takes."""
        conn.set_progress_handler(self._on_progress, PROGRESS_EVERY_OPS)

    def _on_progress(self) -> int:
        self.steps += 1
        return 0  # go on


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

    @classmethod
    def from_meta(cls, text: str) -> Recovery:
        """Read back what `as_meta` stored."""
        data = json.loads(text)
        return cls(
            at_ms=int(data["at"]),
            reason=str(data["reason"]),
            moved_to=str(data["moved_to"]),
            salvaged={str(k): int(v) for k, v in data["salvaged"].items()},
            lost_points=int(data["lost_points"]),
            lost_by_device={str(k): int(v) for k, v in data["lost_by_device"].items()},
            unreadable_ranges=int(data["unreadable_ranges"]),
        )


def prepare_file(path: Path, *, full_check: bool = True, progress: Progress | None = None) -> Recovery | None:
    """Make `path` a healthy buffer of the current schema; recover a damaged one. Raises StoreError."""
    progress = progress if progress is not None else Progress()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recovery = finish_interrupted_recovery(path)
        progress.enter("checking the buffer" + (" (every page)" if full_check else ""))
        problem = check_file(path, full=full_check, on_connect=progress.watch)
        if problem is not None:
            recovery = recover_file(path, problem, progress)
        progress.enter("migrating the buffer")
        with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
            progress.watch(conn)
            migrate(conn)
    except StoreError:
        raise
    except (sqlite3.Error, OSError) as exc:
        raise wrap(exc, f"preparing {path}") from exc
    return recovery


class CheckInterrupted(Exception):
    """The check was stopped from outside (the daemon is stopping): it found nothing either way."""


def check_file(
    path: Path, *, full: bool = True, on_connect: Callable[[sqlite3.Connection], None] | None = None
) -> str | None:
    """Return why `path` cannot be used as it is, or None when it is healthy (or absent).

    Without `full`, the pages are not all read (no quick_check): the header, the size, the schema and the
    small tables only, which a clean stop leaves consistent; `Buffer.verify` reads the rest later.
    `on_connect` receives the check's connection (another thread may `interrupt()` it: CheckInterrupted).
    """
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        return "not a regular file"
    try:
        if not full:
            problem = _check_size(path)
            if problem is not None:
                return problem
        # Read-only: a damaged file (and a WAL that may not be its own) stays exactly as it was found.
        uri = f"file:{path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)) as db:
            if on_connect is not None:
                on_connect(db)
            version = user_version(db)
            if version > SCHEMA_VERSION:
                return f"schema version {version} is newer than this edgeforward's ({SCHEMA_VERSION})"
            if full:
                problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(10)")]
                if problems != ["ok"]:
                    return "quick_check: " + "; ".join(problems)
            if version == 0:
                tables = db.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()[0]
                return "not an edgeforward buffer" if tables else None
            expected = {table for table in expected_columns() if TABLES_SINCE.get(table, 1) <= version}
            missing = expected - {row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
            if missing:
                return "missing tables: " + ", ".join(sorted(missing))
            for table in ("devices", "ledger", "meta"):
                db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
            if not full:
                # The two ends of the points table: a cheap look at the pages read first. Two subqueries, since
                # SQLite walks to an end of the b-tree only for a lone MIN() or MAX(): both at once scan every row
                # (450 MB read before READY at 10 M points).
                db.execute("SELECT (SELECT MIN(id) FROM points), (SELECT MAX(id) FROM points)").fetchone()
    except sqlite3.Error as exc:
        if on_connect is not None and "interrupt" in str(exc):
            raise CheckInterrupted(str(exc)) from exc
        if _disk_full(path):
            # Not damage: the file cannot be opened for want of room (its WAL index). Never "recover" it.
            raise StoreFullError(f"{path}: no room on the disk to open it ({exc})") from exc
        return f"{type(exc).__name__}: {exc}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"
    return None


def _disk_full(path: Path) -> bool:
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_DISK_BYTES


def _check_size(path: Path) -> str | None:
    """A file shorter than its header says (truncated) is damaged; SQLite would only find out page by page."""
    size = path.stat().st_size
    if size == 0:
        return None
    with path.open("rb") as file:
        header = file.read(SQLITE_HEADER_BYTES)
    if len(header) < SQLITE_HEADER_BYTES or not header.startswith(b"SQLite format 3\x00"):
        return "not a database (bad header)"
    stated = int.from_bytes(header[16:18], "big")
    page_size = 65536 if stated == 1 else stated
    pages = int.from_bytes(header[28:32], "big")
    valid_for = int.from_bytes(header[24:28], "big") == int.from_bytes(header[92:96], "big")
    wal = Path(f"{path}-wal")
    if valid_for and pages and size < pages * page_size and not (wal.exists() and wal.stat().st_size):
        return f"truncated: {size} bytes, the header says {pages * page_size}"
    return None


def finish_interrupted_recovery(path: Path) -> Recovery | None:
    """Complete or undo a recovery a crash interrupted; return it when it had completed its fresh file."""
    building = path.with_name(path.name + BUILDING_SUFFIX)
    for leftover in (building, path.with_name(path.name + SALVAGE_COPY_SUFFIX)):
        for suffix in ("", *COMPANIONS):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{leftover}{suffix}").unlink()
    built = path.with_name(path.name + BUILT_SUFFIX)
    if not built.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{built}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (META_RECOVERY,)).fetchone()
    recovery = Recovery.from_meta(str(row[0]))
    _swap_in(path, built, Path(recovery.moved_to))
    log.error("buffer_recovery_completed", moved_to=recovery.moved_to, detail="a crash had interrupted it")
    return recovery


def _swap_in(path: Path, built: Path, aside: Path) -> None:
    """Move the damaged file (and its WAL) aside, then the fresh one into place; each step a rename."""
    for suffix in ("", *COMPANIONS):
        damaged = Path(f"{path}{suffix}")
        if damaged.exists() or damaged.is_symlink():
            os.replace(damaged, Path(f"{aside}{suffix}"))
    os.replace(built, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    serial = 0
    while aside.exists() or aside.is_symlink():
        serial += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{serial}")
    return aside


def recover_file(path: Path, reason: str, progress: Progress | None = None) -> Recovery:
    """Salvage every readable row into a fresh file beside the damaged one, then swap them; never delete it.

    A kill at any moment leaves either the damaged file in place (recovered again at the next start) or the
    complete fresh file (swapped in by the next start): never an empty buffer in front of the data.
    """
    log.error("buffer_damaged", reason=reason, path=str(path))
    progress = progress if progress is not None else Progress()
    progress.enter("recovering the damaged buffer")
    aside = _aside_name(path)
    building = path.with_name(path.name + BUILDING_SUFFIX)
    built = path.with_name(path.name + BUILT_SUFFIX)
    try:
        # URI processing on: the damaged file is attached to it by a URI (read-only or immutable).
        with contextlib.closing(sqlite3.connect(f"file:{building}", uri=True, isolation_level=None)) as fresh:
            progress.watch(fresh)
            migrate(fresh)
            # A scratch file until it is fsynced and renamed (a crash before that discards it): its journal in
            # memory (a new file's pages need none: a rollback only forgets them), no syncs, so a recovery writes
            # the salvaged rows once, not through a WAL and then again.
            fresh.execute("PRAGMA journal_mode = MEMORY")
            fresh.execute("PRAGMA synchronous = OFF")
            salvaged, unreadable, previous = _salvage(path, fresh, progress)
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
            fresh.executemany(
                SET_META,
                [(META_RECOVERY, recovery.as_meta()), (META_RECOVERIES, str(previous + 1))],
            )
            fresh.execute("PRAGMA journal_mode = DELETE")  # a plain file, no WAL beside it, while it is renamed
        _fsync(building)
        os.replace(building, built)
        _fsync(path.parent)
    except BaseException:
        for suffix in ("", *COMPANIONS):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{building}{suffix}").unlink()
        raise
    _swap_in(path, built, aside)
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


def _salvage(damaged: Path, fresh: sqlite3.Connection, progress: Progress) -> tuple[dict[str, int], int, int]:
    """Copy every readable row of the damaged file into `fresh`; return rows per table, unreadable ranges and
    the number of recoveries the damaged file had counted."""
    salvaged = dict.fromkeys(SALVAGE_TABLES, 0)
    if not damaged.is_file():
        return salvaged, 0, 0
    repaired = damaged.with_name(damaged.name + SALVAGE_COPY_SUFFIX)
    opened = _open_damaged(damaged, repaired)
    if opened is None:
        return salvaged, 0, 0
    source, uri = opened
    progress.watch(source)
    unreadable = 0
    previous = 0
    expected = expected_columns()
    try:
        fresh.execute(f"ATTACH DATABASE ? AS {_DAMAGED}", (uri,))
        # The damaged file's mark says which of its points its ledger had not counted yet (store/counting.py).
        fresh.execute("DELETE FROM meta WHERE key = ?", (META_COUNTED_BELOW,))
        for table in SALVAGE_TABLES:
            try:
                present = {row[1] for row in source.execute(f"PRAGMA table_info({table})")}
            except sqlite3.Error:
                continue
            columns = [c for c in expected[table] if c in present]
            if not columns:
                continue
            ranges = [(MIN_ROWID, MAX_ROWID)] if table in WITHOUT_ROWID_TABLES else _rowid_ranges(source, table)
            for low, high in ranges:
                copied = _copy_range(fresh, table, columns, low, high)
                progress.step()
                if copied is not None:
                    salvaged[table] += copied
                    continue
                # A page in this range does not read: row by row, stepping over the ranges that do not.
                names, marks = ", ".join(columns), ", ".join("?" * len(columns))
                fresh.execute("BEGIN")  # deferred: IMMEDIATE would ask the read-only damaged file for a write lock
                for rows, bad in _readable_rows(source, table, columns, low, high):
                    unreadable += bad
                    fresh.executemany(f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})", rows)
                    salvaged[table] += len(rows)
                    progress.step()
                fresh.execute("COMMIT")
        fresh.execute("DELETE FROM meta WHERE key IN ('pid', 'running')")
        row = fresh.execute("SELECT value FROM meta WHERE key = ?", (META_RECOVERIES,)).fetchone()
        previous = int(row[0]) if row and str(row[0]).isdigit() else 0
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            fresh.execute("ROLLBACK")
        raise
    finally:
        with contextlib.suppress(sqlite3.Error):
            fresh.execute(f"DETACH DATABASE {_DAMAGED}")
        source.close()
        with contextlib.suppress(FileNotFoundError):
            repaired.unlink()
    return salvaged, unreadable, previous


def _rowid_ranges(source: sqlite3.Connection, table: str) -> list[tuple[int, int]]:
    """Row-id ranges [low, high] covering the table, SALVAGE_CHUNK_ROWIDS wide (one range: its ends do not read)."""
    try:
        first = source.execute(f"SELECT MIN(rowid) FROM {table}").fetchone()[0]
        last = source.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0]
    except sqlite3.Error:
        return [(MIN_ROWID, MAX_ROWID)]
    if first is None or last is None:
        return []
    if (last - first) // SALVAGE_CHUNK_ROWIDS > SALVAGE_MAX_CHUNKS:  # sparse ids: the ranges would be empty
        return [(MIN_ROWID, MAX_ROWID)]
    starts = [MIN_ROWID, *range(first + SALVAGE_CHUNK_ROWIDS, last + 1, SALVAGE_CHUNK_ROWIDS)]
    return [(low, next_low - 1) for low, next_low in itertools.pairwise([*starts, MAX_ROWID + 1])]


def _copy_range(fresh: sqlite3.Connection, table: str, columns: list[str], low: int, high: int) -> int | None:
    """Copy the rows of ids [low, high] of a table of the attached damaged file in one statement (SQLite's own
    loop, not a row at a time through Python: several times faster); None when a page in it does not read
    (nothing of the range is kept: the caller copies it row by row). Raises what is not damage (a full disk)."""
    names = ", ".join(columns)
    select = f"SELECT {names} FROM {_DAMAGED}.{table} WHERE rowid BETWEEN ? AND ? ORDER BY rowid"
    params: tuple[int, ...] = (low, high)
    if table in WITHOUT_ROWID_TABLES:  # the whole table, in its key's order
        select, params = f"SELECT {names} FROM {_DAMAGED}.{table}", ()
    fresh.execute("BEGIN")  # deferred: IMMEDIATE would ask the read-only damaged file for a write lock
    try:
        cursor = fresh.execute(f"INSERT OR IGNORE INTO main.{table} ({names}) {select}", params)
    except sqlite3.DatabaseError as exc:
        with contextlib.suppress(sqlite3.Error):
            fresh.execute("ROLLBACK")
        if is_full(exc):
            raise
        return None
    fresh.execute("COMMIT")
    return max(0, cursor.rowcount)


def _open_damaged(damaged: Path, repaired: Path) -> tuple[sqlite3.Connection, str] | None:
    """Open the damaged file read-only (with its WAL, else without it, else a copy with a rebuilt header);
    return the connection and the URI it was opened by."""
    for uri in (f"file:{damaged}?mode=ro", f"file:{damaged}?immutable=1"):
        try:
            source = sqlite3.connect(uri, uri=True)
            tables = source.execute("SELECT COUNT(*) FROM sqlite_schema WHERE name = 'points'").fetchone()[0]
        except sqlite3.Error:
            continue
        if tables:
            return source, uri
        source.close()
    try:
        shutil.copyfile(damaged, repaired)
    except OSError as exc:
        if exc.errno == 28:  # no room for the copy: the damaged file stays in place, retried at the next start
            raise
        log.error("buffer_unreadable", error=str(exc), file=str(damaged))
        return None
    # The header may be garbage: try the page size it states, then every size SQLite allows.
    error = "no page size reads the schema"
    for page_size in _page_sizes(repaired):
        try:
            _rebuild_header(repaired, page_size)
            uri = f"file:{repaired}?immutable=1"
            source = sqlite3.connect(uri, uri=True)
            if source.execute("SELECT COUNT(*) FROM sqlite_schema WHERE name = 'points'").fetchone()[0]:
                return source, uri
            source.close()
        except sqlite3.Error as exc:
            error = str(exc)
        except OSError as exc:
            error = str(exc)
            break
    log.error("buffer_unreadable", error=error, file=str(damaged))
    return None


def _page_sizes(copy: Path) -> list[int]:
    size = copy.stat().st_size
    with copy.open("rb") as file:
        header = file.read(SQLITE_HEADER_BYTES)
    stated = int.from_bytes(header[16:18], "big") if len(header) >= 18 else 0
    stated = 65536 if stated == 1 else stated
    sizes = [stated] if stated >= 512 and not stated & (stated - 1) else []
    sizes += [s for s in PAGE_SIZES_TRIED if s not in sizes]
    return [s for s in sizes if size % s == 0] or [4096]


def _rebuild_header(copy: Path, page_size: int) -> None:
    """Replace the first 100 bytes of a copy with a valid header for `page_size` and the file's size."""
    size = copy.stat().st_size
    with copy.open("r+b") as file:
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
    source: sqlite3.Connection, table: str, columns: list[str], low: int = MIN_ROWID, high: int = MAX_ROWID
) -> Iterator[tuple[list[tuple[Any, ...]], int]]:
    """Yield (rows, unreadable ranges) of row ids [low, high] in order, stepping over ranges that cannot be read."""
    if table in WITHOUT_ROWID_TABLES:
        # No rowid to step over a bad range with: take what reads in one pass.
        rows: list[tuple[Any, ...]] = []
        try:
            for row in source.execute(f"SELECT {', '.join(columns)} FROM {table}"):
                rows.append(tuple(row))
        except sqlite3.Error:
            yield rows, 1
            return
        yield rows, 0
        return
    select = f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid BETWEEN ? AND ? ORDER BY rowid"
    start = low
    while True:
        rows = []
        last: int | None = None
        try:
            for row in source.execute(select, (start, high)):
                rows.append(row[1:])
                last = int(row[0])
                if len(rows) >= SALVAGE_BATCH_ROWS:
                    yield rows, 0
                    rows = []
        except sqlite3.Error:
            yield rows, 1
            resume = last + 1 if last is not None else start + 1
            found = _next_readable(source, table, resume)
            if found is None or found > high:
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
        # The salvaged ledger plus its tail, as the damaged file said (every point counted in it afterwards).
        fresh.execute(counting.FOLD)
        fresh.execute(
            f"INSERT OR REPLACE INTO meta (key, value) VALUES (?, {NEXT_POINT_ID})",
            (META_COUNTED_BELOW,),
        )
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
        with contextlib.suppress(sqlite3.Error):
            fresh.execute("ROLLBACK")
        raise
    return lost
