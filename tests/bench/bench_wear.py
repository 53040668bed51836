"""Wear: bytes the real daemon writes per line (cloud up: inserted, then deleted), beside the append floors.

Every figure is the `write_bytes` of `/proc/PID/io` of `edgeforward run` (what reached the block layer, WAL,
checkpoints and the final checkpoint at the clean stop included), from the first line fed until the exit,
after the cloud has taken every point. The floors run in their own processes at the same pace in the same
run: an append-only file with one fdatasync per line (the least per-line durability costs), and one with one
fdatasync per second. The same loads run on a copy of the code at BEFORE_COMMIT, so before and after share
the machine and the run. Lines are 4 pins each; the loads run at once, 5 minutes at 1 line/s (so that the
start, the last history round and the stop weigh about what they do in a day), 4 minutes at 10 lines/s (4 history
rounds) and 1 minute at 100 lines/s, so the run stays under 7 minutes. Also bytes on the wire per point for both
cloud paths.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import io
import json
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from edgeforward.config import CloudConfig, Device, ForwardConfig, Limits, PinSpec
from edgeforward.forward import Forwarder
from edgeforward.points import Point
from edgeforward.store import Buffer, Committed
from tests.conftest import wait_for

from .bench_drain import _batches
from .common import (
    DEVICE,
    PIN_TYPES,
    PINS,
    POINTS_PER_LINE,
    POLL_S,
    TOKEN,
    CloudSimProcess,
    Daemon,
    Result,
    backlog_copy,
    kv_lines,
    ledger,
    ptys,
    write_config,
)

NAME = "wear"
BEFORE_COMMIT = "98ac682"  # main before the inbox (store/inbox.py): the "before" of every figure
SETTLE_S = 2.0  # after daemon_started, before the count starts (start-up writes are not the load's)
DRAIN_TIMEOUT_S = 150.0  # after the last line: the cloud takes the rest with the next history round (60 s)
DRAIN_POLL_S = 1.0
READY_TIMEOUT_S = 60.0
TARGET_RATIO = 2.0
DAY_S = 86_400
LIVE_LINES = 10
LIVE_LINE_INTERVAL_S = 0.3
LIVE_INTERVAL_S = 0.2
HISTORY_POINTS = 100_000
WIRE_TIMEOUT_S = 120.0
PROXY_READ_BYTES = 65536


@dataclass(frozen=True)
class Load:
    """Lines of 4 pins at `rate` lines/s for `seconds`, with `[buffer] commit_interval_ms` (None: the default)."""

    rate: float
    seconds: float
    commit_interval_ms: float | None = None
    sync_every_s: float = 0.0  # the floor it is held against: fdatasync per line (0) or per interval
    target: bool = False  # the target: within TARGET_RATIO of its floor
    before: bool = False  # also run on BEFORE_COMMIT

    @property
    def label(self) -> str:
        window = "default window" if self.commit_interval_ms is None else f"window {self.commit_interval_ms:g} ms"
        return f"{self.rate:g} lines/s, {window}"

    @property
    def floor_key(self) -> tuple[float, float]:
        return self.rate, self.sync_every_s


LOADS = (
    Load(1, 300, target=True, before=True),  # 5 minutes: start-up, the last rounds and the stop weigh what they do
    # 4 minutes, 4 history rounds: at 30 s the run was one round, the idle wait for it and the stop, not a day's mix.
    Load(10, 240, 1000, sync_every_s=1.0, target=True, before=True),
    Load(10, 240),
    Load(100, 60),
)


def _value(line: int, pin: int) -> float:
    return line % 100 + pin / 10


def _before_tree(work: Path) -> Path | None:
    """The package at BEFORE_COMMIT, extracted from this checkout's git history (None: no git, or it cannot run)."""
    dest = work / f"before-{BEFORE_COMMIT}"
    if not (dest / "edgeforward").is_dir():
        root = Path(__file__).resolve().parents[2]
        try:
            archive = subprocess.run(
                ["git", "-C", str(root), "archive", BEFORE_COMMIT, "edgeforward"], capture_output=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    # It ran on the dependencies of its day (msgspec, since replaced): without them there is no "before" to run.
    probe = subprocess.run(
        [sys.executable, "-c", "import edgeforward.cli"], check=False, cwd=dest, capture_output=True, text=True
    )
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        print(f"wear: the 'before' runs are skipped: {BEFORE_COMMIT} does not import here ({reason})", flush=True)
        return None
    return dest


def _floor(directory: Path, rate: float, seconds: float, sync_every_s: float) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tests.bench.floor", str(directory / "append.log"), str(rate), str(seconds)]
    return subprocess.Popen([*argv, str(sync_every_s)], stdout=subprocess.PIPE)


def _daemon_load(directory: Path, load: Load, tree: Path | None) -> dict[str, float]:
    """Run `edgeforward run` (from `tree`, else this checkout) under `load` with cloudsim up; count its writes."""
    lines = kv_lines(round(load.rate * load.seconds))
    buffer = {} if load.commit_interval_ms is None else {"commit_interval_ms": load.commit_interval_ms}
    with ptys(1) as (port,), CloudSimProcess(directory) as sim:
        config = write_config(
            directory,
            server=sim.url,
            ports=[{"path": port.path, "device": DEVICE}],
            limits={"points_per_day": 0, "messages_per_month": 0},  # the cloud takes every point
            buffer=buffer,
            log_level="warning",
        )
        notify_path = directory / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        # READY=1 says the daemon runs; its log stays at warnings (its own writes to the log file count too).
        daemon = Daemon(config, env={"NOTIFY_SOCKET": str(notify_path)}, cwd=tree)
        daemon.start()
        try:
            _wait_ready(notify, daemon)
            time.sleep(SETTLE_S)
            before = _write_bytes(daemon.pid)
            started = time.monotonic()
            for number, line in enumerate(lines):
                time.sleep(max(0.0, started + number / load.rate - time.monotonic()))
                port.write_bytes(line + b"\n")
            fed_s = time.monotonic() - started
            db = directory / "buffer.db"
            deadline = time.monotonic() + DRAIN_TIMEOUT_S

            def settled() -> dict[str, int] | None:
                counts = ledger(db)
                received = counts["received"] == len(lines) * POINTS_PER_LINE
                return counts if received and counts["queued"] == 0 else None

            while (counts := settled()) is None and time.monotonic() < deadline:
                time.sleep(DRAIN_POLL_S)
            counts = ledger(db)
            code, written = daemon.stop_counting_writes()
        finally:
            notify.close()
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()
    if code != 0:
        raise RuntimeError(f"daemon exited {code}: {daemon.log()[-2000:]}")
    return {
        "bytes": written - before,
        "lines": len(lines),
        "fed_s": round(fed_s, 1),
        "received": counts["received"],
        "delivered": counts["delivered_live"] + counts["delivered_history"],
        "queued": counts["queued"],
    }


def _wait_ready(notify: socket.socket, daemon: Daemon) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(min(left, 1.0))
        try:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return
        except TimeoutError:
            if daemon.process is not None and daemon.process.poll() is not None:
                break
    raise RuntimeError(f"the daemon sent no READY=1: {daemon.log()[-2000:]}")


def _write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")


def _daemon_results(work: Path) -> list[Result]:
    """Every load on this checkout (and the target loads on BEFORE_COMMIT), all at once, beside the floors."""
    directory = work / "wear"
    tree = _before_tree(work)
    floors = {
        load.floor_key: _floor(
            directory / f"floor-{load.rate:g}-{load.sync_every_s:g}", load.rate, load.seconds, load.sync_every_s
        )
        for load in LOADS
    }
    runs: dict[tuple[str, Load], concurrent.futures.Future[dict[str, float]]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(LOADS) * 2) as pool:
        for load in LOADS:
            name = f"{load.rate:g}-{load.commit_interval_ms or 'default'}"
            runs["after", load] = pool.submit(_daemon_load, directory / f"after-{name}", load, None)
            if load.before and tree is not None:
                runs["before", load] = pool.submit(_daemon_load, directory / f"before-{name}", load, tree)
        measured = {key: future.result() for key, future in runs.items()}
    floor_bytes: dict[tuple[float, float], float] = {}
    for key, process in floors.items():
        out, _ = process.communicate(timeout=DRAIN_TIMEOUT_S)
        figures = json.loads(out)
        floor_bytes[key] = figures["bytes"] / figures["lines"]
    results: list[Result] = []
    for (which, load), figures in measured.items():
        per_line = figures["bytes"] / figures["lines"]
        floor = floor_bytes[load.floor_key]
        floor_name = "append, fdatasync per line" if load.sync_every_s == 0 else "append, fdatasync per second"
        target = f"<= {TARGET_RATIO:g}x floor" if load.target else "report (lower is better)"
        met = per_line <= TARGET_RATIO * floor if load.target and which == "after" else None
        prefix = "daemon" if which == "after" else f"daemon before ({BEFORE_COMMIT})"
        notes = {
            **figures,
            "bytes_per_point": round(per_line / POINTS_PER_LINE),
            "mb_per_day": round(per_line * load.rate * DAY_S / 1e6, 1),
            "floor_mb_per_day": round(floor * load.rate * DAY_S / 1e6, 1),
        }
        results.append(
            Result(NAME, f"{prefix}, {load.label}", per_line, "bytes/line", floor, floor_name, target, met, notes)
        )
    return results


class _CountingProxy:
    """A TCP relay on loopback counting the bytes each way (HTTP, before any TLS)."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self.up = 0
        self.down = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, upward: bool) -> None:
            try:
                while data := await source.read(PROXY_READ_BYTES):
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(
            pipe(reader, upstream_writer, True), pipe(upstream_reader, writer, False), return_exceptions=True
        )


def _notify(forwarder: Forwarder, committed: Sequence[Committed]) -> None:
    """What the daemon does after a commit: tell the device's forwarder which pins have new points."""
    for item in committed:
        if item.device == DEVICE:
            forwarder.notify(item.pins)


async def _wire(path: Path, sim_port: int, *, live: bool) -> tuple[int, int, int, int]:
    """(request bytes, response bytes, points delivered, requests) for the live or the history path."""
    proxy = _CountingProxy(sim_port)
    url = await proxy.start()
    buffer = Buffer(path)
    await buffer.open()
    device = Device(DEVICE, TOKEN, {pin: PinSpec(type=kind) for pin, kind in PIN_TYPES.items()})
    cloud = CloudConfig(server=url, limits=Limits(points_per_day=0, messages_per_month=0, requests_per_second=1000))
    forward = ForwardConfig(live_interval_s=LIVE_INTERVAL_S if live else 0, history_interval_s=60)
    writer = asyncio.create_task(buffer.run_writer())
    delivered = 0
    try:
        async with aiohttp.ClientSession() as session:
            forwarder = Forwarder(device, buffer, session, cloud, forward)
            buffer.add_listener(functools.partial(_notify, forwarder))
            task = asyncio.create_task(forwarder.run())
            try:
                async with asyncio.timeout(WIRE_TIMEOUT_S):
                    if live:
                        for line in range(LIVE_LINES):
                            now = time.time_ns() // 1_000_000
                            await buffer.submit([Point(DEVICE, pin, now, _value(line, pin)) for pin in PINS])
                            await asyncio.sleep(LIVE_LINE_INTERVAL_S)
                await wait_for(lambda: buffer.queued_total == 0, WIRE_TIMEOUT_S, POLL_S)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            requests = forwarder.snapshot().outcomes["ok"]
        ledger = await buffer.ledger(DEVICE)
        delivered = ledger["delivered_live" if live else "delivered_history"]
    finally:
        buffer.stop_writer()
        await writer
        await buffer.close()
        await proxy.stop()
    return proxy.up, proxy.down, delivered, requests


def run(work: Path) -> list[Result]:
    """Disk bytes per line of the real daemon (before and after) beside the floors; wire bytes per point."""
    results = _daemon_results(work)
    directory = work / "wear"
    with CloudSimProcess(directory) as sim:
        up, down, delivered, requests = asyncio.run(_wire(directory / "live.db", sim.port, live=True))
        payload = sum(len("&".join(f"v{pin}={_value(line, pin)}" for pin in PINS)) for line in range(LIVE_LINES)) / (
            LIVE_LINES * len(PINS)
        )
        results.append(
            Result(
                NAME,
                "wire, live GET batch/update (4 pins a line)",
                up / max(delivered, 1),
                "bytes/point",
                payload,
                "query values alone (pin=value)",
                "report (lower is better)",
                None,
                {"request_bytes": up, "response_bytes": down, "points": delivered, "requests": requests},
            )
        )
        history_db = directory / "history.db"
        backlog_copy(work, HISTORY_POINTS, history_db)
        body = sum(len(b) for _, b in _batches(history_db)) / HISTORY_POINTS
        up, down, delivered, requests = asyncio.run(_wire(history_db, sim.port, live=False))
        results.append(
            Result(
                NAME,
                "wire, history POST batch/update",
                up / max(delivered, 1),
                "bytes/point",
                body,
                "JSON body alone ([ts,value])",
                "report (lower is better)",
                None,
                {"request_bytes": up, "response_bytes": down, "points": delivered, "requests": requests},
            )
        )
    return results
