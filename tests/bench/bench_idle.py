"""Idle cost: CPU of the daemon over 60 s with one port at 1 line/s and the cloud up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .common import CLK_TCK, DEVICE, CloudSimProcess, Daemon, Result, cpu_seconds, kv_lines, ptys, write_config

NAME = "idle"
MEASURE_S = 60.0
SETTLE_S = 3.0
LINE_INTERVAL_S = 1.0
TARGET_PERCENT = 0.2

# The floor: the least an asyncio process can do with one line a second (read it, count it).
BASELINE_CODE = """
import asyncio, os, sys, tty
async def main():
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    lines = 0
    def readable():
        nonlocal lines
        lines += os.read(fd, 65536).count(b"\\n")
    asyncio.get_running_loop().add_reader(fd, readable)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def run(work: Path) -> list[Result]:
    """CPU share of the daemon (default config) and of a bare asyncio line reader, same lines, same minute."""
    directory = work / "idle"
    lines = kv_lines(int(SETTLE_S + MEASURE_S) + 10)
    with ptys(2) as (port, other), CloudSimProcess(directory) as sim:
        config = write_config(directory, server=sim.url, ports=[{"path": port.path, "device": DEVICE}])
        floor = subprocess.Popen([sys.executable, "-c", BASELINE_CODE, other.path])
        try:
            with Daemon(config) as daemon:
                daemon.wait_started()
                sent = 0

                def tick() -> None:
                    nonlocal sent
                    for pty in (port, other):
                        pty.write_bytes(lines[sent] + b"\n")
                    sent += 1

                settle_until = time.monotonic() + SETTLE_S
                while time.monotonic() < settle_until:
                    tick()
                    time.sleep(LINE_INTERVAL_S)
                cpu_daemon, cpu_floor = cpu_seconds(daemon.pid), cpu_seconds(floor.pid)
                started = time.monotonic()
                while time.monotonic() - started < MEASURE_S:
                    tick()
                    time.sleep(LINE_INTERVAL_S)
                elapsed = time.monotonic() - started
                used_daemon = cpu_seconds(daemon.pid) - cpu_daemon
                used_floor = cpu_seconds(floor.pid) - cpu_floor
                with urllib.request.urlopen(f"{sim.url}/_sim/stats") as response:
                    cloud_requests = json.loads(response.read())["requests"]
        finally:
            floor.kill()
            floor.wait()
    percent = 100 * used_daemon / elapsed
    floor_percent = 100 * used_floor / elapsed
    return [
        Result(
            NAME,
            "daemon CPU, 1 line/s, cloud up, 60 s",
            percent,
            "% of a core",
            floor_percent,
            "bare asyncio reader of the same lines",
            f"<= {TARGET_PERCENT}% of one core",
            percent <= TARGET_PERCENT,
            {
                "cpu_s": round(used_daemon, 3),
                "baseline_cpu_s": round(used_floor, 3),
                "seconds": round(elapsed, 1),
                "lines": sent,
                "clock_tick_s": 1 / CLK_TCK,
                "cloud_requests_whole_run": cloud_requests,
            },
        )
    ]
