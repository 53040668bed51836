"""Footprint: idle RSS of the daemon with 1 port/1 device and 8 ports/8 devices, beside a bare asyncio process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import toml_value

from .common import TOKEN, CloudSimProcess, Daemon, Result, kv_lines, ptys, rss_kb

NAME = "footprint"
SETTLE_S = 3.0
MEASURE_S = 15.0
LINE_INTERVAL_S = 1.0
TARGETS_MB = {1: 45.0, 8: 50.0}
# The floor: a Python asyncio process that imports what the daemon's run imports from outside the standard
# library (rich, prometheus_client and aiohttp.web are for other commands and [metrics]).
BASELINE_CODE = """
import asyncio, sqlite3, ssl
import aiohttp, aiosqlite, attrs, cattrs, serial, structlog
print("ready", flush=True)
asyncio.run(asyncio.Event().wait())
"""


def _config(directory: Path, server: str, paths: list[str]) -> Path:
    sections = [f'[cloud]\nserver = "{server}"\n', '[buffer]\npath = "buffer.db"\n', '[log]\nformat = "json"\n']
    for index, path in enumerate(paths):
        sections.append(f'[[port]]\npath = {toml_value(path)}\ndevice = "dev{index}"\n')
    for index in range(len(paths)):
        sections.append(
            f'[[device]]\nname = "dev{index}"\ntoken = "{TOKEN}{index}"\n[device.pins]\n'
            'v1 = "double"\nv2 = "integer"\nv3 = "double"\nv4 = "double"\n'
        )
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "edgeforward.toml"
    config.write_text("\n".join(sections))
    return config


def _daemon_rss_mb(work: Path, count: int) -> tuple[float, dict[str, object]]:
    """Peak RSS of the daemon over MEASURE_S, one line a second on each port, the cloud up."""
    directory = work / f"footprint-{count}"
    lines = kv_lines(int(SETTLE_S + MEASURE_S) + 5)
    with ptys(count) as ports, CloudSimProcess(directory) as sim:
        config = _config(directory, sim.url, [port.path for port in ports])
        with Daemon(config) as daemon:
            daemon.wait_started()
            samples: list[int] = []
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < SETTLE_S + MEASURE_S:
                for port in ports:
                    port.write_bytes(lines[sent] + b"\n")
                sent += 1
                time.sleep(LINE_INTERVAL_S)
                if time.monotonic() - started >= SETTLE_S:
                    samples.append(rss_kb(daemon.pid))
            daemon.stop()
    return max(samples) / 1024, {"samples_mb": [round(kb / 1024, 1) for kb in samples], "lines_per_port": sent}


def _baseline_rss_mb() -> float:
    process = subprocess.Popen([sys.executable, "-c", BASELINE_CODE], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the baseline process did not start")
        time.sleep(SETTLE_S)
        return rss_kb(process.pid) / 1024
    finally:
        process.kill()
        process.wait()


def run(work: Path) -> list[Result]:
    """Idle daemon RSS at both sizes, each beside the bare process importing the same dependencies."""
    baseline = _baseline_rss_mb()
    results = []
    for count, target in TARGETS_MB.items():
        peak, notes = _daemon_rss_mb(work, count)
        results.append(
            Result(
                NAME,
                f"idle daemon RSS, {count} port{'s' if count > 1 else ''}/{count} device{'s' if count > 1 else ''}",
                peak,
                "MB",
                baseline,
                "bare asyncio process, same imports",
                f"<= {target:.0f} MB",
                peak <= target,
                notes,
            )
        )
    return results
