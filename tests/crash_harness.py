"""Kill -9 crash-consistency harness: the real daemon, a pty MCU, a flapping cloudsim, random kills."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import sqlite3
import time
import tty
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeforward.cloudsim import CloudSim, SimDevice
from edgeforward.config import load_config
from edgeforward.points import PinType
from edgeforward.status import read_status
from edgeforward.store import queries

from .conftest import TOKEN, DaemonProcess, Pty, ledger_adds_up, wait_for, write_config

BATCH_MAX_POINTS = 25
MCU_LINE_INTERVAL_S = 0.002
KILL_AFTER_MAX_S = 0.8
FLAP_MIN_S = 0.05
FLAP_MAX_S = 0.4
DRAIN_TIMEOUT_S = 60.0
START_TIMEOUT_S = 20.0
STATUS_POLL_S = 0.2
OUTAGES: tuple[str | None, ...] = (None, None, "503", "reset")
PHASES = ("ingest", "drain", "both")


class HarnessError(AssertionError):
    """An invariant of the crash harness does not hold."""


@dataclass
class KillRecord:
    """What the buffer said right after one kill -9."""

    phase: str
    outage: str | None
    received: int
    delivered: int
    queued: int


@dataclass
class HarnessResult:
    """The figures of one harness run."""

    kills: int
    written: int
    received: int
    delivered_distinct: int
    duplicates: int
    duplicate_bound: int
    seconds: float
    records: list[KillRecord] = field(default_factory=list)


class Mcu:
    """A microcontroller printing a counter on a pty; never blocks, a line is written whole or not at all."""

    def __init__(self, port: Pty) -> None:
        self.port = port
        self.written = 0
        self._pending = b""
        flags = fcntl.fcntl(port.master, fcntl.F_GETFL)
        fcntl.fcntl(port.master, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    def drain_input(self) -> None:
        """Discard what the daemon wrote back (nothing, unless acks are on)."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.port.master, 4096):
                pass

    def step(self) -> None:
        """Write the next line (or the rest of the last one) if the pty takes it."""
        if not self._pending:
            self._pending = f"v2={self.written}\n".encode()
            self.written += 1
        try:
            sent = os.write(self.port.master, self._pending)
        except BlockingIOError:
            return
        self._pending = self._pending[sent:]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.step()
            await asyncio.sleep(MCU_LINE_INTERVAL_S)


def open_pty() -> Pty:
    """Open a raw pseudo-terminal pair."""
    master, slave = os.openpty()
    tty.setraw(slave)
    return Pty(master, slave, os.ttyname(slave))


def make_cloud() -> CloudSim:
    """The cloudsim the harness forwards to."""
    return CloudSim([SimDevice(TOKEN, "pump", {1: PinType.DOUBLE, 2: PinType.INTEGER, 3: PinType.STRING})])


def harness_config(workdir: Path, cloud: CloudSim, port: Pty) -> Path:
    """A config with small batches and short intervals, so many kills land mid-batch."""
    return write_config(
        workdir,
        str(cloud.url),
        [{"path": port.path, "device": "pump"}],
        [{"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer", "v3": "string"}}],
        forward={
            "live_interval_s": 0.3,
            "history_interval_s": 0.1,
            "retry_initial_s": 0.05,
            "retry_max_s": 0.2,
        },
        limits={"batch_max_points": BATCH_MAX_POINTS, "points_per_day": 0, "messages_per_month": 0},
        buffer={"commit_interval_ms": 2},
    )


def check_buffer(config_path: Path, db_path: Path) -> dict[str, Any]:
    """Check the ledger from `status` and the points table; return the device's status entry."""

    entry: dict[str, Any] = read_status(load_config(config_path))["devices"]["pump"]
    if not ledger_adds_up(entry):
        raise HarnessError(f"ledger does not add up: {entry}")
    for key in ("expired", "dropped", "rejected", "downsampled"):
        if entry[key] != 0:
            raise HarnessError(f"{key} is {entry[key]}: nothing should leave the buffer that way here")
    if db_path.exists():
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT COUNT(*) FROM points").fetchone()[0]
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            inboxed = sum(counts.queued for counts in queries.inbox(db).values())  # store/inbox.py
        if rows + inboxed != entry["queued"]:
            raise HarnessError(
                f"{rows} rows in points and {inboxed} in the inbox but the ledger says {entry['queued']} queued"
            )
        if check != "ok":
            raise HarnessError(f"quick_check: {check}")
    return entry


async def start(daemon: DaemonProcess) -> None:
    """Start the daemon and wait for this run's `daemon_started` (the log file is shared by all runs)."""
    before = daemon.log().count("daemon_started")
    daemon.start()
    await wait_for(lambda: daemon.log().count("daemon_started") > before, START_TIMEOUT_S)


async def flap(cloud: CloudSim, rng: random.Random, stop: asyncio.Event) -> None:
    """Switch the cloud between up, 503 and reset at random."""
    while not stop.is_set():
        cloud.outage = rng.choice(OUTAGES)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(FLAP_MIN_S, FLAP_MAX_S))
    cloud.outage = None


async def run_crash_harness(
    workdir: Path, cloud: CloudSim, port: Pty, *, kills: int, seed: int, progress: bool = False
) -> HarnessResult:
    """Kill the daemon `kills` times at random moments, then drain and count what reached the cloud."""
    rng = random.Random(seed)
    started = time.monotonic()
    config = harness_config(workdir, cloud, port)
    db_path = workdir / "buffer.db"
    mcu = Mcu(port)
    records: list[KillRecord] = []
    last: dict[str, Any] | None = None
    for number in range(kills):
        phase = rng.choice(PHASES)
        daemon = DaemonProcess(config)
        try:
            await start(daemon)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(flap(cloud, rng, stop))]
            if phase != "drain":
                tasks.append(asyncio.create_task(mcu.run(stop)))
            if phase == "drain":
                cloud.outage = None
            await asyncio.sleep(rng.uniform(0.0, KILL_AFTER_MAX_S))
            outage = cloud.outage
            daemon.kill()
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            daemon.cleanup()
        mcu.drain_input()
        entry = check_buffer(config, db_path)
        if last is not None and (entry["received"] < last["received"] or entry["delivered"] < last["delivered"]):
            raise HarnessError(f"ledger went backwards after kill {number + 1}: {last} -> {entry}")
        last = entry
        records.append(KillRecord(phase, outage, entry["received"], entry["delivered"], entry["queued"]))
        if progress:
            print(
                f"kill {number + 1}/{kills}: {phase:6} cloud={outage or 'up':5} received={entry['received']} "
                f"delivered={entry['delivered']} queued={entry['queued']}",
                flush=True,
            )
    cloud.outage = None
    final = DaemonProcess(config)
    try:
        await start(final)

        def drained() -> bool:
            # While the daemon runs, the ledger and the points table are read in two transactions: compare them
            # (check_buffer) only once it has stopped, below.
            entry = read_status(load_config(config))["devices"]["pump"]
            return bool(entry["queued"] == 0)

        await wait_for(drained, DRAIN_TIMEOUT_S, interval=STATUS_POLL_S)
        if final.stop() != 0:
            raise HarnessError("the daemon did not stop cleanly after the drain")
    finally:
        final.cleanup()
    return summarize(cloud, check_buffer(config, db_path), mcu.written, kills, records, started)


def summarize(
    cloud: CloudSim, entry: dict[str, Any], written: int, kills: int, records: list[KillRecord], started: float
) -> HarnessResult:
    """Check that every committed reading reached the cloud and resends stayed within the bound."""
    seen = Counter(point.value for point in cloud.points(TOKEN, 2))
    stray = [value for value in seen if not isinstance(value, int) or not 0 <= value < written]
    if stray:
        raise HarnessError(f"the cloud holds values the MCU never wrote: {stray[:10]}")
    received = int(entry["received"])
    if entry["delivered"] != received:
        raise HarnessError(f"delivered {entry['delivered']} != received {received} after the drain")
    # Each committed reading is a distinct counter value, and only committed readings can be sent:
    # as many distinct values in the cloud as readings received means none is missing.
    if len(seen) != received:
        raise HarnessError(f"{received} readings committed but {len(seen)} distinct ones reached the cloud")
    duplicates = sum(count - 1 for count in seen.values())
    bound = kills * BATCH_MAX_POINTS
    if duplicates > bound:
        raise HarnessError(f"{duplicates} duplicates exceed the bound of one batch per kill ({bound})")
    return HarnessResult(kills, written, received, len(seen), duplicates, bound, time.monotonic() - started, records)


async def harness_main(kills: int, seed: int, workdir: Path) -> HarnessResult:
    """Run the harness outside pytest (scripts/soak)."""
    cloud = make_cloud()
    await cloud.start()
    port = open_pty()
    try:
        return await run_crash_harness(workdir, cloud, port, kills=kills, seed=seed, progress=True)
    finally:
        port.close()
        await cloud.stop()
