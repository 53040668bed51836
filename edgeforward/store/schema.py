"""The buffer file's schema: its tables, the ordered migrations that reach them, and the connection settings."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Final

import structlog

log = structlog.get_logger(__name__)

SCHEMA_VERSION: Final = 7
BUSY_TIMEOUT_MS: Final = 10_000
PAGE_CACHE_KIB: Final = 1024
# New files get small pages: a commit of one line rewrites a few pages, and 1 KiB pages write a quarter of the
# bytes of 4 KiB ones (tests/bench/bench_wear.py measures it). Existing files keep the page size they have.
PAGE_SIZE_BYTES: Final = 1024
# Checkpoint when the WAL holds this many pages. The WAL file is reused from its start after each checkpoint,
# never truncated, so commits overwrite blocks the file already has (no file growth, no journal commit per
# fdatasync, and room to write on a full disk).
WAL_AUTOCHECKPOINT_PAGES: Final = 1000

# Keys of the `meta` table.
META_RECOVERY: Final = "recovery"
META_RECOVERIES: Final = "recoveries"
META_INGEST_FAILED: Final = "ingest_failed"
META_HELD_UNSTAMPED: Final = "held_unstamped"
META_COUNTED_BELOW: Final = "counted_below"  # store/counting.py
NEXT_POINT_ID: Final = "(SELECT COALESCE(MAX(id), 0) + 1 FROM points)"
# Set a meta value in place: INSERT OR REPLACE would delete and insert the row, rewriting the key's index page too.
SET_META: Final = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"

LEDGER_FIELDS: Final = (
    "received",
    "delivered_live",
    "delivered_history",
    "queued",
    "expired",
    "dropped",
    "rejected",
    "downsampled",
)

_BASE = """
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE points (
    id INTEGER PRIMARY KEY,
    device_id INTEGER NOT NULL,
    pin INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value TEXT NOT NULL,
    filed INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX points_by_pin ON points (device_id, pin, ts) WHERE filed = 1;
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
    messages_month INTEGER NOT NULL,
    points_day_reserved INTEGER NOT NULL DEFAULT 0,
    messages_month_reserved INTEGER NOT NULL DEFAULT 0
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
_HELD = """
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
# Version 4: what `import` already queued, by (device, pin, ts); older importers created it on their own.
_IMPORT_SEEN = """
CREATE TABLE IF NOT EXISTS import_seen (
    device TEXT NOT NULL,
    pin INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (device, pin, ts)
) WITHOUT ROWID;
"""
# Version 5: readings an MCU may send again (seq= with ms= or ts=), per port, so that a resent copy is
# acknowledged again and not stored again, also after a restart (ingest/pipeline.py). Written in the same
# transaction as the reading's points, pruned to the newest RESEND_WINDOW_PER_PORT rows of a port. `ms` is NULL
# for ts= lines, `ts` NULL for readings held until the wall clock is trusted. Not salvaged after a recovery:
# losing it costs at most one duplicate of a reading resent across the recovery.
RESEND_WINDOW_PER_PORT: Final = 4096
_RESEND_WINDOW = """
CREATE TABLE IF NOT EXISTS resend_window (
    id INTEGER PRIMARY KEY,
    port TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ms INTEGER,
    ts INTEGER
);
CREATE INDEX IF NOT EXISTS resend_window_by_port ON resend_window (port, id);
"""
# Version 6: points the daemon commits are `filed = 0` (out of the pin index) until they wait long enough to need
# it (store/filing.py); every point of an older file is filed, so the mark starts past the newest one. The index
# is built again, once: a partial index cannot be made from the full one.
_FILED_COLUMN = "ALTER TABLE points ADD COLUMN filed INTEGER NOT NULL DEFAULT 1;"
# ... and budgets are reserved ahead of the requests they count (store/lease.py).
_LEASE_COLUMNS = (
    "ALTER TABLE budget ADD COLUMN points_day_reserved INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE budget ADD COLUMN messages_month_reserved INTEGER NOT NULL DEFAULT 0;"
)
_FILING = """
DROP INDEX IF EXISTS points_by_pin;
CREATE INDEX points_by_pin ON points (device_id, pin, ts) WHERE filed = 1;
INSERT OR REPLACE INTO meta (key, value) VALUES ('filed_below', (SELECT COALESCE(MAX(id), 0) + 1 FROM points))
"""
# Version 7: a reading's commit leaves the ledger alone; rows from the mark on are counted from the file
# (store/counting.py). Every row of an older file is counted in its ledger already: the mark starts past them.
_COUNTING = f"INSERT OR IGNORE INTO meta (key, value) VALUES ('{META_COUNTED_BELOW}', {NEXT_POINT_ID});"
SCHEMA: Final = _BASE + _HELD + _IMPORT_SEEN + _RESEND_WINDOW + _COUNTING

# The version that added each table after the first (an older file lacks it until it is migrated).
TABLES_SINCE: Final = {"held": 3, "import_seen": 4, "resend_window": 5}

# Tables without a rowid (a recovery cannot step over a bad range of them by id: it copies each in one pass).
# tests/test_migrations.py holds this to the tables' definitions.
WITHOUT_ROWID_TABLES: Final = frozenset({"import_seen"})

# Tables copied out of a damaged buffer, in this order (devices first: the others refer to them).
SALVAGE_TABLES: Final = (
    "devices",
    "points",
    "held",
    "ledger",
    "deadletter",
    "budget",
    "device_state",
    "servers",
    "import_seen",
    "meta",
)


def configure(conn: sqlite3.Connection, synchronous: str = "FULL") -> None:
    """Apply the settings every connection to the buffer uses."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    # Reads are index scans and writes are appends: a small page cache costs little and keeps RSS flat.
    conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")


def _in_one_transaction(conn: sqlite3.Connection, script: str, version: int) -> None:
    """Run a migration step and stamp its version in one transaction: a crash leaves one or the other."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {int(version)}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _to_v2(conn: sqlite3.Connection) -> None:
    # Incremental auto-vacuum is applied only by rebuilding the file, and VACUUM cannot run inside a transaction:
    # the step is idempotent, so a crash before the stamp just runs it again.
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    try:
        conn.execute("VACUUM")
    except sqlite3.Error as exc:
        log.warning("buffer_vacuum_failed", error=str(exc), detail="the file will not shrink after a backlog")
    _in_one_transaction(conn, "", 2)


def _to_v6(conn: sqlite3.Connection) -> None:
    points = {row[1] for row in conn.execute("PRAGMA table_info(points)")}
    budget = {row[1] for row in conn.execute("PRAGMA table_info(budget)")}
    script = "" if "filed" in points else _FILED_COLUMN
    script += "" if "points_day_reserved" in budget else _LEASE_COLUMNS
    _in_one_transaction(conn, script + _FILING, 6)


# version -> the step that brings a file of the version before it there, in order.
MIGRATIONS: Final[tuple[tuple[int, Callable[[sqlite3.Connection], None]], ...]] = (
    (2, _to_v2),
    (3, lambda conn: _in_one_transaction(conn, _HELD, 3)),
    (4, lambda conn: _in_one_transaction(conn, _IMPORT_SEEN, 4)),
    (5, lambda conn: _in_one_transaction(conn, _RESEND_WINDOW, 5)),
    (6, _to_v6),
    (7, lambda conn: _in_one_transaction(conn, _COUNTING, 7)),
)


def user_version(conn: sqlite3.Connection) -> int:
    """Return the schema version stamped in the file (0: a new file)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, *, page_size: int = PAGE_SIZE_BYTES) -> None:
    """Create the schema in a new file, or bring an older one to the current version, step by step."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    version = user_version(conn)
    if version == 0:
        # Page size and auto-vacuum take effect without a rebuild only before the first table exists.
        conn.execute(f"PRAGMA page_size = {int(page_size)}")
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    if version == 0:
        _in_one_transaction(conn, SCHEMA, SCHEMA_VERSION)
        return
    for target, step in MIGRATIONS:
        if version < target:
            step(conn)
            version = target


def expected_columns() -> dict[str, list[str]]:
    """Return every table of the current schema with its columns, in order."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.executescript(SCHEMA)
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
        return {table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")] for table in tables}
