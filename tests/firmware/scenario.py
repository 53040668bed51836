"""The README's sketch in simavr, on a pty, against the real daemon through a stop (SIGTERM) and a kill (SIGKILL).

The harness (firmware/simavr_pty.c) writes every line the firmware sends to a tap file with the time of its first
byte on the MCU's own real-time clock: the first transmission of each seq= is when the reading was taken (the sketch
sends it at once), and its v1= is distinct (the harness's ADC counts up), so each cloud point names its reading.

`python -m tests.firmware.scenario [--pythonpath DIR] [--keep-reset]` runs it against another build of the
daemon (e.g. an older commit unpacked in DIR, which knows no reset_on_open) and prints the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeforward.cloudsim import CloudSim, SimDevice
from edgeforward.points import PinType

from ..conftest import write_config
from . import avr

TOKEN = "tok-uno-0123456789abcdef0123456789ab"
INTERVAL_MS = 250  # -DINTERVAL_MS: four readings a second keep the outages short
FIRST_UP_S = 10.0  # the first run: the MCU is older than an outage by then (see README: young MCUs)
UP_S = 4.0  # the daemon runs this long between outages
OUTAGE_S = 6.0  # the daemon is away this long (the ring holds 64 * 250 ms = 16 s)
SETTLE_S = 5.0  # after the last start: fresh readings, then the cut-off for "every reading arrived"
DELIVERY_TIMEOUT_S = 40.0
LATE_COPIES_S = 2.0  # after every reading arrived, wait this long for copies that should not come
TRUE_TIME_TOLERANCE_MS = 1_000
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.2
ADC_STEP = 0.1  # v1 = analogRead(A0) * 0.1 and the harness's ADC counts 1, 2, 3, ...


@dataclass(frozen=True)
class Taken:
    """A reading as the MCU took it: its seq= and the wall time of its first transmission."""

    seq: int
    taken_ms: int


@dataclass
class Outcome:
    """What reached the cloud, reading by reading."""

    taken: int  # readings taken before the cut-off
    delivered: int  # of those, readings with a point in the cloud
    missing: list[int] = field(default_factory=list)  # seq of readings without a point
    duplicates: dict[int, int] = field(default_factory=dict)  # seq -> distinct stored points (more than one)
    retransmitted: int = 0  # identical copies (same pin, time and value: the cloud keeps one)
    off: dict[int, int] = field(default_factory=dict)  # seq -> ms off its true time, where more than the tolerance
    worst_off_ms: int = 0
    resent_counted: int = 0  # status: readings the daemon acknowledged again without storing them
    lines_on_wire: int = 0
    log: str = ""

    def summary(self) -> dict[str, Any]:
        """The outcome without the daemon's log."""
        return {
            "taken": self.taken,
            "delivered": self.delivered,
            "missing": len(self.missing),
            "duplicates": len(self.duplicates),
            "retransmitted": self.retransmitted,
            "off_by_more_than_1s": len(self.off),
            "worst_off_ms": self.worst_off_ms,
            "resent_counted": self.resent_counted,
            "lines_on_wire": self.lines_on_wire,
        }


def step_of(value: object) -> int:
    """The ADC step a v1 value carries."""
    if not isinstance(value, float):
        raise AssertionError(f"v1 is a double pin, got {value!r}")
    return round(value / ADC_STEP)


def read_tap(tap: Path) -> tuple[dict[int, Taken], int]:
    """Return the readings by their v1 step (first transmission of each seq) and the number of lines sent."""
    readings: dict[int, Taken] = {}
    lines = 0
    for raw in tap.read_text(errors="replace").splitlines():
        stamp, _sent, line = raw.split(" ", 2)
        fields = dict(part.split("=", 1) for part in line[1:].split() if "=" in part)
        if not {"v1", "seq", "ms"} <= fields.keys():
            continue
        lines += 1
        step = round(float(fields["v1"]) / ADC_STEP)
        readings.setdefault(step, Taken(int(fields["seq"]), int(stamp)))
    return readings, lines


class Harness:
    """The simavr harness: the firmware running on a pty."""

    def __init__(self, binary: Path, elf: Path, tap: Path) -> None:
        self.tap = tap
        self.process = subprocess.Popen(
            [str(binary), str(elf), avr.MCU, str(avr.F_CPU), str(tap)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.path = ""
        for line in self.process.stdout:  # simavr prints what it loaded first
            if line.startswith("PTY "):
                self.path = line.split()[1]
                break
        if not self.path:
            raise AssertionError(f"the harness gave no pty: {self.stop()}")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err


class Daemon:
    """`edgeforward run` as a subprocess (of this build, or of the one on `pythonpath`)."""

    def __init__(self, config: Path, pythonpath: str | None) -> None:
        self.config = config
        self.log_path = config.parent / "daemon.log"
        self.env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
        self.cwd = pythonpath  # `python -m` puts the working directory first on the path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgeforward", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        self.starts += 1

    async def wait_open(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.log().count("serial port open") < self.starts:
            if time.monotonic() > deadline:
                raise AssertionError(f"the port did not open:\n{self.log()[-3000:]}")
            await asyncio.sleep(POLL_S)

    def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(STOP_TIMEOUT_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "edgeforward", "status", "--json", "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.cwd,
            timeout=STOP_TIMEOUT_S,
            check=True,
        )
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


async def run(work: Path, elf: Path, harness_binary: Path, *, pythonpath: str | None, keep_lines: bool) -> Outcome:
    """Run the firmware through a daemon stop and a kill; return what reached the cloud."""
    cloud = CloudSim([SimDevice(TOKEN, "uno", {1: PinType.DOUBLE})])
    await cloud.start()
    harness = Harness(harness_binary, elf, work / "tap.txt")
    daemon: Daemon | None = None
    try:
        port: dict[str, Any] = {"path": harness.path, "device": "uno", "ack": True}
        if keep_lines:
            port["reset_on_open"] = False
        device = {"name": "uno", "token": TOKEN, "pins": {"v1": "double"}}
        # No live path: every point then travels with the gateway's own stamp, which is what is checked.
        config = write_config(work, str(cloud.url), [port], [device], forward={"live_interval_s": 0})
        daemon = Daemon(config, pythonpath)
        daemon.start()
        await daemon.wait_open()
        await asyncio.sleep(FIRST_UP_S)
        assert daemon.signal(signal.SIGTERM) == 0, daemon.log()[-3000:]
        await asyncio.sleep(OUTAGE_S)
        daemon.start()
        await daemon.wait_open()
        await asyncio.sleep(UP_S)
        daemon.signal(signal.SIGKILL)
        await asyncio.sleep(OUTAGE_S)
        daemon.start()
        await daemon.wait_open()
        await asyncio.sleep(SETTLE_S)
        cut_ms = time.time_ns() // 1_000_000
        due = {step: taken for step, taken in read_tap(harness.tap)[0].items() if taken.taken_ms <= cut_ms}
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while not set(due) <= {step_of(p.value) for p in cloud.points(TOKEN, 1)}:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        await asyncio.sleep(LATE_COPIES_S)
        resent = daemon.status()["ports"][harness.path].get("resent", 0)
        assert daemon.signal(signal.SIGTERM) == 0
        readings, lines = read_tap(harness.tap)
        return judge(due, readings, cloud, resent, lines, daemon.log())
    finally:
        if daemon is not None:
            daemon.cleanup()
        harness.stop()
        await cloud.stop()


def judge(
    due: dict[int, Taken], readings: dict[int, Taken], cloud: CloudSim, resent: int, lines: int, log: str
) -> Outcome:
    """Compare the cloud's record with what the MCU took."""
    points = cloud.points(TOKEN, 1)
    copies = Counter((p.ts_ms, step_of(p.value)) for p in points)
    stored: dict[int, list[int]] = {}
    for ts, step in copies:
        stored.setdefault(step, []).append(ts)
    outcome = Outcome(taken=len(due), delivered=sum(step in stored for step in due), resent_counted=resent)
    outcome.lines_on_wire = lines
    outcome.log = log
    outcome.retransmitted = sum(count - 1 for count in copies.values())
    outcome.missing = sorted(taken.seq for step, taken in due.items() if step not in stored)
    for step, stamps in stored.items():
        taken = readings.get(step)
        if taken is None:
            continue
        if len(stamps) > 1:
            outcome.duplicates[taken.seq] = len(stamps)
        worst = max(abs(ts - taken.taken_ms) for ts in stamps)
        outcome.worst_off_ms = max(outcome.worst_off_ms, worst)
        if worst > TRUE_TIME_TOLERANCE_MS:
            outcome.off[taken.seq] = worst
    return outcome


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edgeforward-simavr-") as directory:
        yield Path(directory)


def main() -> None:
    """Run the scenario once and print its outcome as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pythonpath", help="run the daemon from this source tree instead")
    parser.add_argument("--keep-reset", action="store_true", help="leave out reset_on_open = false")
    args = parser.parse_args()
    problem = avr.missing_tools()
    if problem:
        raise SystemExit(problem)
    with _workdir() as work:
        elf = avr.build_sketch(work / "build", [f"INTERVAL_MS={INTERVAL_MS}UL"])
        harness = avr.build_harness(work / "build")
        outcome = asyncio.run(run(work, elf, harness, pythonpath=args.pythonpath, keep_lines=not args.keep_reset))
    print(json.dumps(outcome.summary(), indent=2))


if __name__ == "__main__":
    main()
