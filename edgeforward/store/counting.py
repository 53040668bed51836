"""Counting: a reading's commit leaves the ledger alone; the file counts it, and the ledger catches up later.

A commit of one line that also updated the device's ledger row wrote two pages where one would do (the points
leaf and the ledger's). So the daemon's commits of readings do not touch the ledger: every `points` row with a
row id at or above the `counted_below` meta value (the tail) is received and queued, but not yet in the ledger's
`received` and `queued` columns. What the file says of a device is its ledger row plus its rows in the tail,
read in one statement (LEDGER: one snapshot, whatever any other process commits meanwhile).

What keeps that exact at every commit, in any process (the writers are the daemon, `import` and
`deadletter retry`; all of them go through this folder):
- a row entering `points` is counted by being in the tail; a reading already counted elsewhere (a held reading
  given its wall time, a refused one queued again) is taken out of the ledger's `received` and `queued` in the
  same transaction;
- removing a row of the tail (delivered, expired, refused, thinned, dropped) counts it `received` and under its
  outcome, leaving `queued` alone; a row below the mark counts `queued` down as before (`removed`);
- the daemon folds the tail into the ledger (FOLD), riding a commit it makes anyway, at most FOLD_EVERY_S apart
  or once its own tail holds FOLD_TAIL_MAX_ROWS, and at a clean stop: that bounds what a read has to count;
- SQLite numbers a new row one past the newest: once the newest rows are removed, new ones would get ids below
  the mark. Every commit that removed rows ends by lowering the mark to one past the newest row (CLAMP; no row
  lies between, so nothing is counted twice).

A crash costs nothing: the tail is counted from the file, so the next start finds the ledger as exact as it was.
"""

from __future__ import annotations

from typing import Final

from .schema import LEDGER_FIELDS, META_COUNTED_BELOW, NEXT_POINT_ID

# The daemon folds the tail into the ledger at most this far apart (a commit it makes anyway carries it) ...
FOLD_EVERY_S: Final = 60.0
# ... or sooner, once this many of its readings wait in the tail (every read of the ledger counts them).
FOLD_TAIL_MAX_ROWS: Final = 4096

MARK: Final = f"(SELECT CAST(value AS INTEGER) FROM meta WHERE key = '{META_COUNTED_BELOW}')"
_NEXT_ID: Final = NEXT_POINT_ID
# Per device: how many rows the tail holds (a file without the mark has none: every row is counted).
TAIL: Final = f"SELECT device_id, COUNT(*) AS n FROM points WHERE id >= {MARK} GROUP BY device_id"
READ_MARK: Final = f"SELECT {MARK}"
# Fold: count the tail into the ledger (upsert per device), then move the mark past the newest row.
FOLD: Final = (
    f"INSERT INTO ledger (device_id, received, queued) SELECT device_id, n, n FROM ({TAIL}) WHERE true "
    "ON CONFLICT (device_id) DO UPDATE SET received = received + excluded.received, queued = queued + excluded.queued"
)
PASS_TAIL: Final = f"UPDATE meta SET value = {_NEXT_ID} WHERE key = '{META_COUNTED_BELOW}' AND value != {_NEXT_ID}"
CLAMP: Final = (
    f"UPDATE meta SET value = {_NEXT_ID} WHERE key = '{META_COUNTED_BELOW}' AND CAST(value AS INTEGER) > {_NEXT_ID}"
)

_TAILED: Final = frozenset({"received", "queued"})


def _column(field: str) -> str:
    plus_tail = " + COALESCE(t.n, 0)" if field in _TAILED else ""
    return f"COALESCE(l.{field}, 0){plus_tail}"


# The file's ledger of every device (or, with LEDGER_OF, of one): (device id, *LEDGER_FIELDS).
LEDGER: Final = (
    f"SELECT d.id, {', '.join(_column(f) for f in LEDGER_FIELDS)} FROM devices d "
    f"LEFT JOIN ledger l ON l.device_id = d.id LEFT JOIN ({TAIL}) t ON t.device_id = d.id"
)
LEDGER_OF: Final = f"{LEDGER} WHERE d.id = ?"
QUEUED_TOTAL: Final = (
    f"SELECT (SELECT COALESCE(SUM(queued), 0) FROM ledger) + (SELECT COUNT(*) FROM points WHERE id >= {MARK})"
)


def removed(count: int, in_tail: int) -> dict[str, int]:
    """The ledger's change for `count` removed rows of a device, `in_tail` of them from the tail (add the
    outcome's own column: delivered, expired, ...)."""
    return {"received": in_tail, "queued": in_tail - count}


def ledger_row(row: tuple[object, ...] | None) -> dict[str, int]:
    """A LEDGER row as the ledger's fields (zeros: the device has no row)."""
    if row is None:
        return dict.fromkeys(LEDGER_FIELDS, 0)
    return {field: int(str(value)) for field, value in zip(LEDGER_FIELDS, row[1:], strict=True)}
