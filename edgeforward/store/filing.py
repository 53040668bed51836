"""Filing: a new point skips the pin index until it has waited long enough to need it.

Most points are delivered within a history round, so indexing each one as it is committed costs an SD card the
index pages of every commit (a commit of one line rewrote 4 pages: the table, two index leaves and the ledger).
The daemon commits its readings unfiled (`filed = 0`): in the points table, not in the partial index
`points_by_pin`. A point still queued FILE_AFTER_S after its commit, or once the unfiled range spans more than
FILE_TAIL_MAX_IDS row ids, is filed in bulk (`filed = 1`, which puts it in the index) with a later commit.
Imports, settled readings and commits of FILE_DIRECT_POINTS or more are filed as they are written (they arrive
in bulk, or are old already).

The rule the reads rely on: every point with a row id below the `filed_below` meta value is filed; points at or
above it may be either. So a read takes the filed points through the index and the unfiled ones through a row-id
range scan from the mark (`UNFILED`, which reads the mark in the same statement: both parts see one snapshot).
Filing only ever moves points from the unfiled part to the filed one; a read made of several statements takes the
unfiled part first, so a filing between its statements can never hide a point from it.
"""

from __future__ import annotations

from collections import deque
from typing import Final

META_FILED_BELOW: Final = "filed_below"
# A point still queued this long after its commit is filed (a backlog: history reads it by pin and time).
FILE_AFTER_S: Final = 300.0
# ... or sooner once the unfiled part spans this many row ids (it bounds the range scan every read makes).
FILE_TAIL_MAX_IDS: Final = 20_000
# A commit of this many readings or more (a flood, a backlog read from a device) files them as it writes them:
# in bulk the index costs little per point, and filing them later would write every row twice.
FILE_DIRECT_POINTS: Final = 512
# Commits are remembered by their newest row id at most this often (a point may be filed this much early).
MARK_EVERY_S: Final = 10.0

FILED: Final = "filed = 1"
UNFILED: Final = (
    "id >= (SELECT COALESCE(MAX(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'filed_below') AND filed = 0"
)
FILE_RANGE: Final = "UPDATE points SET filed = 1 WHERE id >= ? AND id < ? AND filed = 0"
SET_MARK: Final = (
    "INSERT INTO meta (key, value) VALUES ('filed_below', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
READ_MARK: Final = "SELECT value FROM meta WHERE key = 'filed_below'"


def mark_of(value: object) -> int:
    """The `filed_below` mark from its meta value (0, when absent or not a number: every point may be unfiled)."""
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0


class FilingPlan:
    """When the daemon's writer files which points: it remembers when each unfiled row id was committed."""

    def __init__(self, below: int) -> None:
        self.below = below  # every point with a lower row id is filed
        self._marks: deque[tuple[float, int]] = deque()  # (monotonic s of a commit, the newest unfiled id it held)
        self._newest = below - 1  # the newest row id known, filed or not

    def committed(self, newest_id: int, now_s: float) -> None:
        """A commit added unfiled points up to row id `newest_id` (at start: what an earlier run left)."""
        self._newest = max(self._newest, newest_id)
        if self._marks and now_s - self._marks[-1][0] < MARK_EVERY_S:
            self._marks[-1] = (self._marks[-1][0], self._newest)
        else:
            self._marks.append((now_s, self._newest))

    def seen(self, newest_id: int) -> None:
        """Filed points exist up to row id `newest_id` (a flood, an import): the mark may pass them."""
        self._newest = max(self._newest, newest_id)

    @property
    def unfiled(self) -> bool:
        """Whether points this plan knows of may be unfiled at or above the mark."""
        return bool(self._marks)

    def cut(self, now_s: float) -> int | None:
        """The row id below which every point should be filed now (None: nothing is due)."""
        if not self._marks:
            cut = self._newest + 1  # nothing unfiled: the mark passes every filed point at no cost
        else:
            cut = self.below
            if self._marks[0][0] <= now_s - FILE_AFTER_S:
                # Due: file what waited half as long too, so that filing (and the mark's write) comes in steps.
                for committed_s, newest_id in self._marks:
                    if committed_s > now_s - FILE_AFTER_S / 2:
                        break
                    cut = max(cut, newest_id + 1)
            if self._newest + 1 - cut > FILE_TAIL_MAX_IDS:
                cut = self._newest + 1 - FILE_TAIL_MAX_IDS // 2
        return cut if cut > self.below else None

    def filed(self, cut: int) -> None:
        """The points below `cut` are filed (the commit that filed them went through)."""
        self.below = max(self.below, cut)
        while self._marks and self._marks[0][1] < self.below:  # marks of points all filed now
            self._marks.popleft()


# Reads of queued points, each one statement over both parts (one snapshot), for the buffer and the queries of
# other processes. Parameters: (device_id, pin, ...) for the filed part, then the same for the other.
OLDEST_TS: Final = (
    f"SELECT (SELECT MIN(ts) FROM points WHERE device_id = ? AND pin = ? AND {FILED}), "
    f"(SELECT MIN(ts) FROM points WHERE {UNFILED} AND device_id = ? AND pin = ?)"
)
# A device's pins with queued points, ascending (parameter: device_id): the unfiled ones from the range scan, the
# filed ones by a skip-scan of the pin index (one probe per pin, not a read of every point).
_FILED_PINS: Final = (
    "WITH RECURSIVE filed_pins (pin) AS ("
    f"SELECT (SELECT MIN(pin) FROM points WHERE device_id = ?1 AND {FILED}) UNION ALL "
    f"SELECT (SELECT MIN(pin) FROM points WHERE device_id = ?1 AND pin > filed_pins.pin AND {FILED}) "
    "FROM filed_pins WHERE filed_pins.pin IS NOT NULL) SELECT pin FROM filed_pins WHERE pin IS NOT NULL"
)
PINS_QUEUED: Final = f"{_FILED_PINS} UNION SELECT pin FROM points WHERE {UNFILED} AND device_id = ?1 ORDER BY pin"
# The timestamp of a device's oldest queued point (parameter: device_id; NULL: none): per filed pin through the
# index, and the unfiled part's range scan.
OLDEST_TS_OF_DEVICE: Final = (
    f"SELECT MIN(ts) FROM (SELECT (SELECT MIN(ts) FROM points WHERE device_id = ?1 AND pin = p.pin AND {FILED}) "
    f"AS ts FROM ({_FILED_PINS}) p UNION ALL SELECT MIN(ts) FROM points WHERE {UNFILED} AND device_id = ?1)"
)


def both(part: str) -> str:
    """`part` (a SELECT of points with `{where}` in it) over the filed points, then the unfiled ones."""
    return f"SELECT * FROM ({part.format(where=FILED)}) UNION ALL SELECT * FROM ({part.format(where=UNFILED)})"
