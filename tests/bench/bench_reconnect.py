"""Reconnect: how long a 5,000-point outage backlog waits once the cloud is back, with the daemon's defaults.

The real `edgeforward run` (default `[forward]`: live every 10 s, history rounds every 60 s, retries
backing off from 1 s to 60 s) reads a pty, while cloudsim answers 503 for a while; 5,000 points queue.
The cloud comes back and we time, from that moment, the first history request and the drained queue.
Baseline, same run: the same 5,000 points sent with the cloud up all along (the drain itself).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from .common import (
    POINTS_PER_LINE,
    CloudSimProcess,
    Daemon,
    Result,
    adds_up,
    kv_lines,
    ledger,
    ptys,
    wait_until,
    write_config,
)

NAME = "reconnect"
BACKLOG_POINTS = 5_000
OUTAGE_S = 20.0
DRAIN_TIMEOUT_S = 180.0
TARGET_S = 60.0  # never the history interval on top of the backoff: at most the longest backoff


def _sim(url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{url}/_sim/{path}", timeout=10) as response:
        return json.loads(response.read())


def _queued(db: Path) -> int:
    return ledger(db)["queued"] if db.exists() else -1


def _history_points(url: str) -> int:
    stats = _sim(url, "stats")
    return int(stats["points"]["history"])


def _episode(directory: Path, *, outage: bool) -> dict[str, float]:
    """One daemon run: lines written (during an outage, or not), then the time until the queue is empty."""
    with ptys(1) as (pty,), CloudSimProcess(directory) as sim:
        config = write_config(directory, server=sim.url, ports=[{"path": pty.path, "device": "pump"}])
        db = directory / "buffer.db"
        with Daemon(config) as daemon:
            daemon.wait_started()
            pty.write_bytes(kv_lines(1)[0] + b"\n")
            wait_until(lambda: _queued(db) == 0 and ledger(db)["received"] > 0, DRAIN_TIMEOUT_S, "online")
            if outage:
                _sim(sim.url, "outage?mode=503")
            lines = kv_lines(BACKLOG_POINTS // POINTS_PER_LINE, offset=1)
            started = time.monotonic()
            for line in lines:
                pty.write_bytes(line + b"\n")
            wait_until(lambda: ledger(db)["received"] >= BACKLOG_POINTS, DRAIN_TIMEOUT_S, "lines read")
            history_before = _history_points(sim.url)
            if outage:
                time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
                _sim(sim.url, "outage?mode=")
            back = time.monotonic()
            wait_until(lambda: _history_points(sim.url) > history_before, DRAIN_TIMEOUT_S, "first history", 0.05)
            first = time.monotonic() - back
            wait_until(lambda: _queued(db) == 0, DRAIN_TIMEOUT_S, "drained", 0.05)
            drained = time.monotonic() - back
        counts = ledger(db)
    return {"first_history_s": first, "drained_s": drained, "adds_up": float(adds_up(counts))}


def run(work: Path) -> list[Result]:
    """The wait after the cloud comes back, beside the drain with the cloud up all along."""
    baseline = _episode(work / "reconnect-up", outage=False)
    after = _episode(work / "reconnect-outage", outage=True)
    return [
        Result(
            NAME,
            "5,000 queued points: cloud back -> drained",
            after["drained_s"],
            "s",
            baseline["drained_s"],
            "the same points, cloud up all along",
            f"<= {TARGET_S:.0f} s (the longest backoff, never the history interval on top)",
            after["drained_s"] <= TARGET_S and bool(after["adds_up"]),
            {
                "outage_s": OUTAGE_S,
                "first_history_request_after_back_s": round(after["first_history_s"], 2),
                "baseline_first_history_request_s": round(baseline["first_history_s"], 2),
            },
        )
    ]
