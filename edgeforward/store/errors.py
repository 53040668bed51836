"""The store's one exception root; every sqlite error reaches callers wrapped in it, its cause kept."""

from __future__ import annotations

import sqlite3

from ..errors import EdgeforwardError


class StoreError(EdgeforwardError):
    """Root of the store's errors: the buffer file could not do what was asked (try again later)."""


class StoreClosedError(StoreError):
    """The store was closed before the write could be committed."""


class StoreFullError(StoreError):
    """The disk (or the configured byte cap) is full: the write was not committed."""


class StoreBusyError(StoreError):
    """Another process held the file's write lock for longer than the busy timeout."""


class StoreCorruptError(StoreError):
    """The file is damaged; it is recovered at the next start."""


class StoreLockedError(StoreError):
    """Another daemon already runs on this buffer."""

    def __init__(self, path: str, pid: int | None) -> None:
        running = f"process {pid}" if pid else "another process"
        super().__init__(f"{path}: {running} is already running edgeforward on this buffer")
        self.path = path
        self.pid = pid


class IngestFailedError(StoreFullError):
    """These readings could not be committed (disk full): counted `ingest_failed`, never `received`."""


def is_full(exc: BaseException) -> bool:
    """Whether a sqlite error means the disk (or max_page_count) is full."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return isinstance(exc, sqlite3.Error) and code == sqlite3.SQLITE_FULL


def wrap(exc: sqlite3.Error | OSError, doing: str) -> StoreError:
    """Return the store error for a sqlite (or file system) error; raise it `from exc` to keep the cause."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if isinstance(exc, OSError):
        kind: type[StoreError] = StoreFullError if exc.errno == 28 else StoreError
        return kind(f"{doing}: {exc.strerror or exc}")
    if code == sqlite3.SQLITE_FULL:
        kind = StoreFullError
    elif code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        kind = StoreBusyError
    elif code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        kind = StoreCorruptError
    else:
        kind = StoreError
    return kind(f"{doing}: {exc}")
