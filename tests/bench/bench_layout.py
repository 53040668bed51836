"""Layout: bytes a table layout writes per line at 10 lines/s with a 1 s commit window, beside the floor.

The wear target at 10 lines/s (tests/bench/bench_wear.py) is not met by today's layout. This measures candidate
layouts of the queue under the daemon's own cadence, each in its own process, side by side with the floor
(an append-only file with one fdatasync per second) in the same run, so that the layout is chosen by measurement:
- lines of 4 pins at 10 lines/s, one fsynced commit a second (synchronous = FULL, WAL, 1,000-page checkpoints);
- a live delivery every 10 s (the newest point of each pin leaves the queue with the next commit);
- a history round every 60 s: one commit per pin (a crash resends at most one batch), then, for layouts
  with delivered-up-to marks, one commit deleting what every pin has passed.
Candidates: `rows` is today's layout (the store's own schema: one row per point, a history delivery deletes the
pin's rows); `rows+marks` keeps the rows and records a delivery as a per-pin mark; `packed+marks` stores one row
per reading (its points in one column); then `packed+marks` without the vacuum map (auto_vacuum = NONE), and
with 512-byte pages. Two more insert the lines and never deliver them (`rows, inserts only`, `packed, inserts
only`): what one commit a second costs before any delivery, the least each layout can reach. Figures are
`write_bytes` of each process (WAL, checkpoints, the WAL index).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from edgeforward.store import schema

from .common import PINS, Result, create_buffer_file, io_counters, kv_lines

NAME = "layout"
RATE: Final = 10.0
SECONDS: Final = 240.0  # 4 history rounds
LIVE_EVERY_S: Final = 10
HISTORY_EVERY_S: Final = 60
ROUND_GAP_S: Final = 0.05  # between a round's per-pin commits (a request each)
RUN_TIMEOUT_S: Final = SECONDS + 60
CANDIDATES: Final = (
    "rows",
    "rows+marks",
    "packed+marks",
    "packed+marks, auto_vacuum none",
    "packed+marks, 512 B pages",
    # The least a layout's commit a second costs: the lines inserted, never delivered (no live, no history).
    "rows, inserts only",
    "packed, inserts only",
)
DEVICE_ID: Final = 1
TARGET_RATIO: Final = 2.0

_MARKS = "CREATE TABLE marks (device_id INTEGER, pin INTEGER, upto INTEGER NOT NULL, PRIMARY KEY (device_id, pin))"
_PACKED = "CREATE TABLE readings (id INTEGER PRIMARY KEY, device_id INTEGER NOT NULL, ts INTEGER NOT NULL, pts TEXT)"


class _Layout:
    """One candidate: how a second's lines, a live delivery and a history round touch the file."""

    def __init__(self, name: str, path: Path) -> None:
        self.packed = name.startswith("packed")
        self.marks = "marks" in name
        self.inserts_only = name.endswith("inserts only")
        if name.split(",", maxsplit=1)[0] == "rows":
            create_buffer_file(path)  # the store's own file, schema and settings
            self.conn = sqlite3.connect(path, isolation_level=None)
        else:
            self.conn = sqlite3.connect(path, isolation_level=None)
            self.conn.execute(f"PRAGMA page_size = {512 if '512' in name else schema.PAGE_SIZE_BYTES}")
            self.conn.execute(f"PRAGMA auto_vacuum = {'NONE' if 'none' in name else 'INCREMENTAL'}")
            self.conn.executescript(schema.SCHEMA)
            self.conn.execute(_MARKS)
            self.conn.execute(_PACKED)
            self.conn.executemany("INSERT INTO marks VALUES (?, ?, 0)", [(DEVICE_ID, pin) for pin in PINS])
            self.conn.execute("INSERT INTO devices (id, name) VALUES (?, 'pump')", (DEVICE_ID,))
        schema.configure(self.conn)
        self.newest: dict[int, int] = {}  # pin -> id of its newest point (packed: of its reading)
        self.live_due: list[int] = []

    def commit_second(self, lines: list[bytes], ts_ms: int) -> None:
        """One commit: the second's lines, and the live delivery riding along."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        for offset, line in enumerate(lines):
            values = [token.split(b"=", 1) for token in line.split()]
            if self.packed:
                packed = ";".join(f"{name.decode()[1:]}={value.decode()}" for name, value in values)
                cursor = conn.execute(
                    "INSERT INTO readings (device_id, ts, pts) VALUES (?, ?, ?)", (DEVICE_ID, ts_ms + offset, packed)
                )
                for pin_number in PINS:
                    self.newest[pin_number] = int(cursor.lastrowid or 0)
            else:
                for name, value in values:
                    cursor = conn.execute(
                        "INSERT INTO points (device_id, pin, ts, value, filed) VALUES (?, ?, ?, ?, 0)",
                        (DEVICE_ID, int(name[1:]), ts_ms + offset, value.decode()),
                    )
                    self.newest[int(name[1:])] = int(cursor.lastrowid or 0)
        for pin in self.live_due:
            if self.packed:  # the pin's value leaves its reading: the row is rewritten (on the newest page)
                row = conn.execute("SELECT pts FROM readings WHERE id = ?", (self.newest[pin],)).fetchone()
                kept = [part for part in str(row[0] if row else "").split(";") if not part.startswith(f"{pin}=")]
                conn.execute("UPDATE readings SET pts = ? WHERE id = ?", (";".join(kept), self.newest[pin]))
            else:
                conn.execute("DELETE FROM points WHERE id = ?", (self.newest[pin],))
        self.live_due = []
        conn.execute("COMMIT")

    def live(self) -> None:
        self.live_due = list(PINS)

    def history_round(self) -> None:
        """One commit per pin, then (marks) one that deletes what every pin has passed."""
        conn = self.conn
        top = max(self.newest.values(), default=0)
        for pin in PINS:
            time.sleep(ROUND_GAP_S)
            conn.execute("BEGIN IMMEDIATE")
            if self.marks:
                conn.execute("UPDATE marks SET upto = ? WHERE device_id = ? AND pin = ?", (top, DEVICE_ID, pin))
            else:
                conn.execute("DELETE FROM points WHERE device_id = ? AND pin = ? AND id <= ?", (DEVICE_ID, pin, top))
            conn.execute(
                "INSERT INTO ledger (device_id, delivered_history) VALUES (?, 1) ON CONFLICT (device_id) "
                "DO UPDATE SET delivered_history = delivered_history + 1",
                (DEVICE_ID,),
            )
            conn.execute("COMMIT")
        if self.marks:
            table = "readings" if self.packed else "points"
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"DELETE FROM {table} WHERE id <= (SELECT MIN(upto) FROM marks WHERE device_id = ?)", (1,))
            conn.execute("COMMIT")


def _child(name: str, directory: Path, seconds: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob("layout.db*"):
        leftover.unlink()
    layout = _Layout(name, directory / "layout.db")
    per_second = round(RATE)
    count = round(RATE * seconds)
    lines = kv_lines(count)
    before = io_counters()["write_bytes"]
    started = time.monotonic()
    for second in range(round(seconds)):
        time.sleep(max(0.0, started + second + 1 - time.monotonic()))
        layout.commit_second(lines[second * per_second : (second + 1) * per_second], time.time_ns() // 1_000_000)
        if layout.inserts_only:
            continue
        if (second + 1) % LIVE_EVERY_S == 0:
            layout.live()
        if (second + 1) % HISTORY_EVERY_S == 0:
            layout.history_round()
    layout.conn.close()
    print(json.dumps({"bytes": io_counters()["write_bytes"] - before, "lines": count}))


def _spawn(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE)


def run(work: Path) -> list[Result]:
    """Every candidate at once, beside the floor (append, one fdatasync per second) of the same run."""
    directory = work / "layout"
    directory.mkdir(parents=True, exist_ok=True)
    floor = _spawn("-m", "tests.bench.floor", str(directory / "append.log"), str(RATE), str(SECONDS), "1")
    children = {
        name: _spawn("-m", "tests.bench.bench_layout", name, str(directory / f"c{number}"), str(SECONDS))
        for number, name in enumerate(CANDIDATES)
    }
    measured = {name: json.loads(child.communicate(timeout=RUN_TIMEOUT_S)[0]) for name, child in children.items()}
    floor_figures = json.loads(floor.communicate(timeout=RUN_TIMEOUT_S)[0])
    floor_per_line = floor_figures["bytes"] / floor_figures["lines"]
    return [
        Result(
            NAME,
            f"{name}, 10 lines/s, 1 s commits",
            figures["bytes"] / figures["lines"],
            "bytes/line",
            floor_per_line,
            "append, fdatasync per second",
            f"report (the daemon's target: <= {TARGET_RATIO:g}x floor)",
            None,
            figures,
        )
        for name, figures in measured.items()
    ]


if __name__ == "__main__":
    _child(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]))
