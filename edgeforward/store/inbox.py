"""The inbox: the daemon's newest readings in an append-only file, one fdatasync per commit window.

An SD card wears by the blocks a commit dirties, and one SQLite commit a second dirties several (the table's
leaf, a new leaf, their parent, the file header, the vacuum map, the WAL index) where an append dirties one:
at 10 lines/s with a 1 s window SQLite alone wrote 3.4x what an append-only file does (tests/bench). So the
daemon appends its readings here, and most of them never enter SQLite: the cloud takes them from here, and their
deliveries are appended too. SQLite takes only what has to wait (`Buffer._settle_inbox`):
- a point still queued FOLD_AFTER_S after its commit, or once the inbox queues FOLD_MAX_POINTS, is folded into
  SQLite's points table (a backlog: SQLite's index serves it, and a restart needs no long replay);
- once the file holds COMPACT_BYTES, what it says is settled: the ledger counts the delivered readings, and the
  few still queued are carried into the next generation of the file, under the same ids;
- a clean stop, a point the cloud refuses, thins or lets expire, and a commit too large or too full for the
  inbox fold it all first: the rare paths keep their SQLite code.

The file: a header line `EFINBOX1 <generation>`, then one record per commit, each a line `<crc32> <json>`. A
record holds the commit's points (ids `ID_BASE + seq`, in order from `i`), the ids delivered since the last
record (`l` live, `h` history) and the resend-window keys of its readings (`r`). The buffer's `meta` row
`inbox_generation` says which generation SQLite has not applied yet: a file of that generation (or a later one,
when the row was lost) is replayed whole, an older one was applied and is ignored. A settle writes the next
generation beside the file (`.new`), fsynced, commits its SQLite part with the new generation number, then
renames it into place: a crash at any moment leaves one of the two generations that SQLite's row names.

A torn last record (a power cut mid-append: never acknowledged) fails its checksum and is skipped, as is a
damaged one in the middle (counted and logged); a record is acknowledged only after its fdatasync.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import time
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from .writer import ResendKey

log = structlog.get_logger(__name__)

SUFFIX: Final = ".inbox"
NEW_SUFFIX: Final = ".new"
MAGIC: Final = b"EFINBOX1"
META_GENERATION: Final = "inbox_generation"
# Ids of points in the inbox: above any SQLite row id, so that a read sorts both by (ts, id) and `max_id` holds.
ID_BASE: Final = 1 << 60
# A point still queued this long after its commit goes into SQLite (the cloud is away: it is a backlog now).
FOLD_AFTER_S: Final = 300.0
# ... or sooner, once the inbox queues this many points (about 2 MB of memory; the replay after a crash stays
# small). Two minutes of 10 lines of 4 pins a second: a history round (60 s by default) finds them here.
FOLD_MAX_POINTS: Final = 5_000
# Settle once the file is this large; carry the queued points over only while they are a small part of it.
COMPACT_BYTES: Final = 64 * 1024
CARRY_MAX_FRACTION: Final = 0.25
CARRIED_POINT_BYTES: Final = 24  # about what a carried point takes in the new file (its id, time, value)
# ... and settle anyway when the file grows this large (what is still queued is folded into SQLite instead).
COMPACT_MAX_BYTES: Final = 1024 * 1024
# Room reserved for the file (fallocate, the size unchanged): appends need no new block, even on a full disk.
PREALLOCATE_BYTES: Final = 256 * 1024
# Once the disk has no room for more, the last of the reserved room is kept for delivery records (about 1,000):
# readings go to SQLite (or are counted `ingest_failed`), and the cloud's deliveries are still recorded.
DELIVERY_ROOM_BYTES: Final = 32 * 1024


def inbox_path(buffer_path: Path) -> Path:
    """The inbox file of the buffer at `buffer_path`."""
    return buffer_path.with_name(buffer_path.name + SUFFIX)


@dataclass(frozen=True, slots=True)
class InboxPoint:
    """A reading in the inbox: its id, device and pin, time and value (typed JSON text)."""

    id: int
    device: str
    pin: int
    ts_ms: int
    value_json: str


@dataclass(slots=True)
class Record:
    """One commit's line: its points, the deliveries since the record before, its resend-window keys."""

    points: list[InboxPoint] = field(default_factory=list)
    live: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    resend: list[ResendKey] = field(default_factory=list)

    def encode(self) -> bytes:
        """The record as one checksummed line."""
        body: dict[str, Any] = {}
        if self.points:
            devices: dict[str, int] = {}
            base_ts = self.points[0].ts_ms
            first = self.points[0].id
            body["i"] = first - ID_BASE
            body["t"] = base_ts
            rows: list[list[Any]] = []
            for offset, point in enumerate(self.points):
                index = devices.setdefault(point.device, len(devices))
                row: list[Any] = [index, point.pin, point.ts_ms - base_ts, point.value_json]
                if point.id != first + offset:
                    row.append(point.id - ID_BASE)  # a carried point keeps its id
                rows.append(row)
            body["d"] = list(devices)
            body["p"] = rows
        if self.live:
            body["l"] = [i - ID_BASE for i in self.live]
        if self.history:
            body["h"] = [i - ID_BASE for i in self.history]
        if self.resend:
            body["r"] = [list(key) for key in self.resend]
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        return b"%08x %s\n" % (zlib.crc32(text), text)

    @classmethod
    def decode(cls, line: bytes) -> Record:
        """Parse one line; ValueError when it is torn or damaged."""
        crc, _, text = line.rstrip(b"\n").partition(b" ")
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(text):
            raise ValueError("checksum mismatch")
        body = json.loads(text)
        record = cls()
        if "p" in body:
            devices = [str(name) for name in body["d"]]
            first, base_ts = ID_BASE + int(body["i"]), int(body["t"])
            for offset, row in enumerate(body["p"]):
                point_id = ID_BASE + int(row[4]) if len(row) > 4 else first + offset
                record.points.append(
                    InboxPoint(point_id, devices[int(row[0])], int(row[1]), base_ts + int(row[2]), str(row[3]))
                )
        record.live = [ID_BASE + int(i) for i in body.get("l", ())]
        record.history = [ID_BASE + int(i) for i in body.get("h", ())]
        record.resend = [(str(k[0]), int(k[1]), _int_or_none(k[2]), _int_or_none(k[3])) for k in body.get("r", ())]
        return record


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(str(value))


def generation_of(value: object) -> int:
    """The generation SQLite's `inbox_generation` row names (0: none, or not a number: every file is unapplied)."""
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0


def header(generation: int) -> bytes:
    """The first line of a file of this generation."""
    return b"%s %d\n" % (MAGIC, generation)


@dataclass
class Replay:
    """What a file says: its generation, its records, the damaged lines skipped, where the last whole line ends."""

    generation: int = 0
    records: list[Record] = field(default_factory=list)
    damaged: int = 0
    torn_tail: bool = False
    good_size: int = 0


def _generation_in(first_line: bytes) -> int | None:
    """The generation a header line names (None: it is no whole header line)."""
    parts = first_line.split()
    if not first_line.endswith(b"\n") or len(parts) != 2 or parts[0] != MAGIC or not parts[1].isdigit():
        return None
    return int(parts[1])


def read_file(path: Path) -> Replay | None:
    """Read an inbox file (None: there is none, or it has no valid header)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    first, newline, rest = data.partition(b"\n")
    generation = _generation_in(first + newline)
    if generation is None:
        return None
    replay = Replay(generation=generation, good_size=len(first) + 1)
    offset = replay.good_size
    for line in rest.splitlines(keepends=True):
        offset += len(line)
        if not line.endswith(b"\n"):
            replay.torn_tail = True  # an append a power cut cut short: never acknowledged
            break
        replay.good_size = offset
        try:
            replay.records.append(Record.decode(line))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            replay.damaged += 1
            log.debug("inbox_record_damaged", error=str(exc))
    return replay


def unapplied(buffer_path: Path, generation: int) -> tuple[Path, Replay] | None:
    """The file (or the settle's new file a crash left) holding what SQLite has not applied (None: nothing).

    `generation`: SQLite's `inbox_generation`, the first one it has not applied (0: none recorded, so every
    file is unapplied). A file of an older generation was applied: it is ignored.
    """
    path = inbox_path(buffer_path)
    current = read_file(path)
    if current is not None and current.generation >= generation:
        return path, current
    new_path = path.with_name(path.name + NEW_SUFFIX)
    new = read_file(new_path)
    if new is not None and new.generation == generation:
        return new_path, new
    return None


def remove_stale(path: Path, now_s: float) -> Path | None:
    """Delete an inbox whose every record SQLite has (and a settle's unfinished new file); one without a valid
    header is not deleted but moved aside, `.corrupt-<UTC time>` (what it holds is no longer readable here).
    Return where a damaged one went."""
    aside = None
    try:
        with path.open("rb") as file:  # the header alone: the records are not needed to tell
            damaged = _generation_in(file.readline(len(MAGIC) + 32)) is None
    except FileNotFoundError:
        damaged = False
    if damaged:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now_s))}")
        os.replace(path, aside)
    for stale in (path, path.with_name(path.name + NEW_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return aside


@dataclass
class Counts:
    """What the unapplied records say of one device, beside SQLite's ledger."""

    received: int = 0
    live: int = 0
    history: int = 0

    @property
    def queued(self) -> int:
        """Received here and not delivered here."""
        return self.received - self.live - self.history


def with_counts(ledger: dict[str, int], counts: Counts | None) -> dict[str, int]:
    """A device's ledger (SQLite's, LEDGER_FIELDS) with what the inbox counts beside it."""
    if counts is None:
        return ledger
    ledger = dict(ledger)
    ledger["received"] += counts.received
    ledger["queued"] += counts.queued
    ledger["delivered_live"] += counts.live
    ledger["delivered_history"] += counts.history
    return ledger


class InboxFile:
    """The open file: appends (each one fdatasynced) and the switch to a new generation. Blocking: run in a thread."""

    def __init__(self, path: Path, generation: int, fd: int, size: int) -> None:
        self.path = path
        self.generation = generation
        self._fd = fd
        self.size = size
        self.reserved_to: int | None = None  # blocks are reserved up to here (None: the file system cannot say)
        self.out_of_room = False  # the last reservation failed for want of space

    @property
    def takes_readings(self) -> bool:
        """False once the disk is full and little reserved room is left: that is kept for delivery records."""
        if not self.out_of_room or self.reserved_to is None:
            return True
        return self.reserved_to - self.size >= DELIVERY_ROOM_BYTES

    def _reserve(self) -> None:
        """Reserve the next PREALLOCATE_BYTES past the end (best effort; see _preallocate)."""
        reserved = _preallocate(self._fd, self.size)
        if reserved is None:
            self.reserved_to = None
        elif reserved:
            self.reserved_to, self.out_of_room = self.size + PREALLOCATE_BYTES, False
        else:
            self.reserved_to, self.out_of_room = max(self.reserved_to or 0, self.size), True

    @classmethod
    def create(cls, path: Path, generation: int, records: Sequence[Record] = ()) -> InboxFile:
        """Write a new generation beside `path` (with the records it carries), fsync it and rename it into place."""
        new = path.with_name(path.name + NEW_SUFFIX)
        data = header(generation) + b"".join(record.encode() for record in records)
        fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)  # as SQLite makes its files
        made = cls(new, generation, fd, 0)
        try:
            made._reserve()
            _pwrite_all(fd, data, 0)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                new.unlink()
            raise
        made.size = len(data)
        return made

    def install(self, path: Path) -> None:
        """Rename a file made by `create` over the inbox (after SQLite committed its generation)."""
        os.replace(self.path, path)
        self.path = path
        _fsync_dir(path.parent)

    @classmethod
    def reopen(cls, path: Path, replay: Replay) -> InboxFile:
        """Append to an existing file of `replay` (a settle at start-up could not be committed)."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        if replay.torn_tail:
            os.ftruncate(fd, replay.good_size)  # the next record must not be glued to a torn one
        reopened = cls(path, replay.generation, fd, replay.good_size)
        reopened._reserve()
        return reopened

    def append(self, data: bytes) -> None:
        """Append whole records and fdatasync; on failure the file is cut back to its last whole record."""
        written = len(data)
        try:
            _pwrite_all(self._fd, data, self.size)
            os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)  # which may also free the reserved blocks: reserve them again
                self.reserved_to = self.size if self.reserved_to is not None else None
                self._reserve()
            raise
        self.size += written
        if self.reserved_to is not None and self.reserved_to - self.size < PREALLOCATE_BYTES // 2:
            self._reserve()

    def close(self) -> None:
        """Close the file descriptor."""
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def remove(self) -> None:
        """Close and delete the file (everything it said is in SQLite)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


_FALLOC_FL_KEEP_SIZE: Final = 0x01


@functools.cache
def _fallocate() -> Any:
    """Linux fallocate(2) with 64-bit offsets (also on 32-bit ARM), or None where libc lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.fallocate64
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    call.restype = ctypes.c_int
    return call


def _preallocate(fd: int, size: int) -> bool | None:
    """Reserve the blocks of the next PREALLOCATE_BYTES past `size`, the file's size unchanged, so that appends
    into them need no new block on a full disk. True: reserved; False: no room; None: not supported here."""
    call = _fallocate()
    if call is None:
        return None
    if call(fd, _FALLOC_FL_KEEP_SIZE, size, PREALLOCATE_BYTES) == 0:
        return True
    return False if ctypes.get_errno() in (errno.ENOSPC, errno.EDQUOT) else None


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


MOVED_REMEMBERED: Final = FOLD_MAX_POINTS  # ids of folded points a caller may still hold (a batch in flight)


class Queue:
    """The inbox in memory: its queued points (by device and pin), what its records count, what is not written yet.

    The buffer owns one and changes it only once the file (or SQLite) has what the change says.
    """

    def __init__(self, next_seq: int = 0) -> None:
        self.points: dict[int, InboxPoint] = {}  # queued, by id, in commit order
        self._by_pin: dict[tuple[str, int], dict[int, InboxPoint]] = {}
        self._committed: deque[tuple[int, float]] = deque()  # (first id, monotonic s) of commits still queued
        self.counts: dict[str, Counts] = {}  # since this generation began: the ledger beside SQLite's
        self.resend: list[ResendKey] = []  # keys in this generation's records (SQLite has them after a settle)
        self.unwritten: list[tuple[int, bool]] = []  # deliveries (id, live) not yet in the file
        self.moved: dict[int, int] = {}  # id of a point folded into SQLite -> its row id there
        self.next_seq = next_seq

    @classmethod
    def replayed(cls, replay: Replay, now_s: float) -> Queue:
        """The state the records of a file leave (an earlier run's: its points count as committed now)."""
        queue = cls()
        for record in replay.records:
            queue.take(record.points, now_s)
            for ids, live in ((record.live, True), (record.history, False)):
                queue.deliver(ids, live=live, written=True)
            queue.resend.extend(record.resend)
        return queue

    def __len__(self) -> int:
        return len(self.points)

    @property
    def empty(self) -> bool:
        """Nothing queued, counted or waiting to be written: the file says nothing SQLite lacks."""
        return not (self.points or self.counts or self.resend or self.unwritten)

    def new_points(self, points: Sequence[tuple[str, int, int, str]]) -> list[InboxPoint]:
        """Give ids to a commit's points (device, pin, ts, value JSON); `take` them once they are written."""
        first = ID_BASE + self.next_seq
        self.next_seq += len(points)
        return [InboxPoint(first + n, device, pin, ts, value) for n, (device, pin, ts, value) in enumerate(points)]

    def take(self, points: Sequence[InboxPoint], now_s: float) -> None:
        if not points:
            return
        self._committed.append((points[0].id, now_s))
        for point in points:
            self.points[point.id] = point
            self._by_pin.setdefault((point.device, point.pin), {})[point.id] = point
            self.counts.setdefault(point.device, Counts()).received += 1
            self.next_seq = max(self.next_seq, point.id - ID_BASE + 1)

    def deliver(self, ids: Iterable[int], *, live: bool, written: bool = False) -> list[int]:
        """Take delivered points out of the queue (counted at once); return the ids that were queued here."""
        taken: list[int] = []
        for point_id in ids:
            point = self.points.pop(point_id, None)
            if point is None:
                continue
            pin_points = self._by_pin[(point.device, point.pin)]
            del pin_points[point_id]
            if not pin_points:
                del self._by_pin[(point.device, point.pin)]
            entry = self.counts[point.device]
            if live:
                entry.live += 1
            else:
                entry.history += 1
            taken.append(point_id)
            if not written:
                self.unwritten.append((point_id, live))
        return taken

    def record(self, points: Sequence[InboxPoint], resend: Sequence[ResendKey]) -> Record:
        """The next record: these points and keys, and every delivery not yet written."""
        return Record(
            points=list(points),
            live=[i for i, live in self.unwritten if live],
            history=[i for i, live in self.unwritten if not live],
            resend=list(resend),
        )

    def oldest_commit_s(self) -> float | None:
        """When the oldest commit with a point still queued was made (monotonic s; None: none queued)."""
        if not self.points:
            self._committed.clear()
            return None
        oldest = next(iter(self.points))  # ids grow in commit order, and the dict keeps that order
        committed = self._committed
        while len(committed) > 1 and committed[1][0] <= oldest:
            committed.popleft()  # a commit whose points have all left
        return committed[0][1] if committed and committed[0][0] <= oldest else None

    def carried(self) -> Record:
        """The queued points, as the one record a new generation starts with."""
        return Record(points=list(self.points.values()))

    def settled(self, *, folded: dict[int, int] | None) -> None:
        """A settle committed: the counts and keys are SQLite's now; with `folded`, so are the queued points."""
        self.counts = {}
        self.resend = []
        self.unwritten = []
        if folded is not None:
            self.moved.update(folded)
            while len(self.moved) > MOVED_REMEMBERED:
                del self.moved[next(iter(self.moved))]
            self.points, self._by_pin = {}, {}
            self._committed.clear()
        else:
            for point in self.points.values():  # carried: received in the new generation
                self.counts.setdefault(point.device, Counts()).received += 1

    # reads --------------------------------------------------------------------------------------

    def of_pin(self, device: str, pin: int) -> Iterable[InboxPoint]:
        """A pin's queued points, in commit order."""
        return self._by_pin.get((device, pin), {}).values()

    def pins(self, device: str) -> set[int]:
        """The device's pins with queued points here."""
        return {pin for (name, pin) in self._by_pin if name == device}

    def oldest_ts(self, device: str) -> int | None:
        """The timestamp of the device's oldest point queued here."""
        return min(
            (p.ts_ms for (name, _), points in self._by_pin.items() if name == device for p in points.values()),
            default=None,
        )
