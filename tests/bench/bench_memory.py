"""Memory: RSS of the daemon ingesting and draining with a 10 M point backlog, against an empty buffer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .common import (
    DEVICE,
    CloudSimProcess,
    Daemon,
    Result,
    adds_up,
    backlog_copy,
    kv_lines,
    ledger,
    ptys,
    rss_kb,
    write_config,
)

NAME = "memory"
BACKLOG_POINTS = 10_000_000
SAMPLE_S = 40.0
BASELINE_SAMPLE_S = 20.0
SAMPLE_INTERVAL_S = 0.5
TICK_S = 0.02
LINES_PER_TICK = 5  # 250 lines/s, 1,000 points/s, while the backlog drains
WARMUP_S = 2.0  # the first samples cover imports and the first requests, not the steady state
TARGET_MB = 60.0
FLAT_MB = 5.0  # "flat": the last quarter's mean RSS within this of the first quarter's
RAISED_LIMITS = {"points_per_day": 0, "messages_per_month": 0, "requests_per_second": 1000}


def _run_daemon(work: Path, backlog: int, seconds: float) -> tuple[list[tuple[float, int]], dict[str, Any]]:
    directory = work / f"memory-{backlog}"
    directory.mkdir(parents=True, exist_ok=True)
    build_s = backlog_copy(work, backlog, directory / "buffer.db") if backlog else 0.0
    lines = kv_lines(int(seconds / TICK_S * LINES_PER_TICK) + LINES_PER_TICK)
    samples: list[tuple[float, int]] = []
    with ptys(1) as (pty,), CloudSimProcess(directory) as sim:
        config = write_config(
            directory, server=sim.url, ports=[{"path": pty.path, "device": DEVICE}], limits=RAISED_LIMITS
        )
        with Daemon(config) as daemon:
            daemon.wait_started()
            started = time.monotonic()
            next_sample = started
            sent = 0
            while (now := time.monotonic()) - started < seconds:
                pty.write_bytes(b"".join(line + b"\n" for line in lines[sent : sent + LINES_PER_TICK]))
                sent += LINES_PER_TICK
                if now >= next_sample:
                    samples.append((now - started, rss_kb(daemon.pid)))
                    next_sample += SAMPLE_INTERVAL_S
                time.sleep(TICK_S)
            daemon.stop()
    counts = ledger(directory / "buffer.db")
    notes = {
        "lines_sent": sent,
        "backlog_build_s": round(build_s, 1),
        "delivered": counts["delivered_history"] + counts["delivered_live"],
        "dropped": counts["dropped"],
        "queued_at_end": counts["queued"],
        "ledger_adds_up": adds_up(counts),
    }
    return samples, notes


def _summary(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """(max RSS in MB, growth in MB: last quarter's mean minus first quarter's) after the warm-up."""
    steady = [kb for t, kb in samples if t >= WARMUP_S] or [kb for _, kb in samples]
    quarter = max(1, len(steady) // 4)
    growth = (sum(steady[-quarter:]) / quarter - sum(steady[:quarter]) / quarter) / 1024
    return max(kb for _, kb in samples) / 1024, growth


def run(work: Path) -> list[Result]:
    """Peak and trend of RSS with a 10 M point backlog, beside the same daemon with an empty buffer."""
    empty_samples, empty_notes = _run_daemon(work, 0, BASELINE_SAMPLE_S)
    samples, notes = _run_daemon(work, BACKLOG_POINTS, SAMPLE_S)
    peak, growth = _summary(samples)
    empty_peak, empty_growth = _summary(empty_samples)
    flat = growth <= FLAT_MB
    return [
        Result(
            NAME,
            "daemon RSS peak, 10 M backlog, ingest + drain",
            peak,
            "MB",
            empty_peak,
            "same daemon and load, empty buffer",
            f"<= {TARGET_MB:.0f} MB and flat (growth <= {FLAT_MB:.0f} MB)",
            peak <= TARGET_MB and flat,
            {
                "growth_mb": round(growth, 1),
                "baseline_growth_mb": round(empty_growth, 1),
                "samples_mb": [round(kb / 1024, 1) for _, kb in samples[:: max(1, len(samples) // 20)]],
                **notes,
                "baseline": empty_notes,
            },
        )
    ]
