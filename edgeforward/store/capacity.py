"""Capacity: the point cap and `full_policy`, the byte cap, and the reserve that keeps a full disk workable."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

import structlog

from .schema import WAL_AUTOCHECKPOINT_PAGES

log = structlog.get_logger(__name__)

# A file of this size sits beside the buffer. When the disk fills, it is deleted: the room it gives lets
# deliveries, budgets and state commit (and so free space) while new readings are refused and counted.
RESERVE_BYTES: Final = 1024 * 1024
RESERVE_SUFFIX: Final = ".reserve"
# Readings are taken again once the disk has room for the reserve and this much more.
RESUME_FREE_BYTES: Final = 2 * RESERVE_BYTES
# At the byte cap, drop at least this many oldest points per attempt to make room, and try this often.
ROOM_MIN_POINTS: Final = 500
ROOM_ATTEMPTS: Final = 20
CAP_SLACK_PAGES: Final = 8
MAX_PAGES: Final = 4_294_967_294  # SQLite's own limit
# Room kept free beside the WAL's own growth when the disk is nearly full.
DISK_MARGIN_BYTES: Final = 256 * 1024


def wal_headroom(path: Path, page_size: int) -> int:
    """Bytes the WAL may still need to grow to its checkpoint size, plus a margin."""
    try:
        current = os.stat(f"{path}-wal").st_size
    except OSError:
        current = 0
    return max(0, WAL_AUTOCHECKPOINT_PAGES * (page_size + 24) + 32 - current) + DISK_MARGIN_BYTES


def reserve_path(path: Path) -> Path:
    """Return where the reserve of the buffer at `path` lives."""
    return path.with_name(path.name + RESERVE_SUFFIX)


def free_bytes(path: Path) -> int:
    """Return the bytes an unprivileged writer may still use on the file system holding `path`."""
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def make_reserve(path: Path) -> bool:
    """Create the reserve if it is missing and there is room for it and more; return whether it exists."""
    reserve = reserve_path(path)
    if reserve.exists():
        return True
    if free_bytes(path) < RESUME_FREE_BYTES:
        return False
    partial = reserve.with_name(reserve.name + ".tmp")
    try:
        with partial.open("wb") as file:
            file.write(bytes(RESERVE_BYTES))  # real blocks: a sparse file would give nothing back
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, reserve)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        log.warning("buffer_reserve_not_made", error=exc.strerror or str(exc))
        return False
    return True


def release_reserve(path: Path) -> bool:
    """Delete the reserve to give its room to the buffer; return whether there was one."""
    try:
        reserve_path(path).unlink()
    except FileNotFoundError:
        return False
    log.warning("buffer_reserve_released", bytes=RESERVE_BYTES, detail="the disk is full")
    return True


def room_to_resume(path: Path) -> bool:
    """Whether the disk has room again for readings (and for the reserve)."""
    return free_bytes(path) >= RESUME_FREE_BYTES + (0 if reserve_path(path).exists() else RESERVE_BYTES)


def fit(queued_total: int, max_points: int, count: int, policy: str) -> tuple[int, int, int]:
    """Apply the point cap to `count` new points: return (oldest to drop, start, stop) of the new ones kept."""
    room = max_points - queued_total
    if count <= room:
        return 0, 0, count
    if policy == "drop_newest":
        return 0, 0, max(room, 0)
    return count - max(room, 0), max(count - max_points, 0), count
