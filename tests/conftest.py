"""Shared fixtures: pseudo-terminals, cloudsim on loopback, the daemon as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeforward.cloudsim import CloudSim, SimDevice
from edgeforward.config import load_config
from edgeforward.points import PinType
from edgeforward.redact import redact_value
from edgeforward.status import read_status
from edgeforward.store import Buffer

TOKEN = "tok-pump-0123456789abcdef0123456789"
TOKEN_FAN = "tok-fan-0123456789abcdef0123456789"
BAD_TOKEN = "tok-wrong-0123456789abcdef01234567"
PROCESS_START_TIMEOUT_S = 20.0
PROCESS_STOP_TIMEOUT_S = 15.0


@dataclass
class Pty:
    """A pseudo-terminal: the test writes to `master` as the MCU, the daemon opens `path`."""

    master: int
    slave: int
    path: str

    def write(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_bytes(self, data: bytes) -> None:
        while data:
            written = os.write(self.master, data)
            data = data[written:]

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def pty_port() -> Iterator[Pty]:
    master, slave = os.openpty()
    tty.setraw(slave)
    port = Pty(master, slave, os.ttyname(slave))
    yield port
    port.close()


@pytest.fixture
async def cloud() -> AsyncIterator[CloudSim]:
    sim = CloudSim(
        [
            SimDevice(TOKEN, "pump", {1: PinType.DOUBLE, 2: PinType.INTEGER, 3: PinType.STRING}),
            SimDevice(TOKEN_FAN, "fan", {1: PinType.DOUBLE}),
        ]
    )
    await sim.start()
    yield sim
    await sim.stop()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def write_config(
    tmp_path: Path,
    server: str,
    ports: list[dict[str, Any]],
    devices: list[dict[str, Any]],
    *,
    forward: dict[str, Any] | None = None,
    buffer: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
) -> Path:
    """Write an edgeforward config tuned for fast tests."""
    sections: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        sections.append(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))

    table("cloud", {"server": server, "timeout_s": 2})
    # Unlimited messages unless a test says otherwise: the free plan's pacing would slow every test down.
    table("cloud.limits", {"messages_per_month": 0, **(limits or {})})
    table("buffer", {"path": "buffer.db", **(buffer or {})})
    table(
        "forward",
        {
            "live_interval_s": 0.5,
            "history_interval_s": 0.5,
            "retry_initial_s": 0.1,
            "retry_max_s": 0.5,
            "park_recheck_s": 1,
            **(forward or {}),
        },
    )
    table("log", {"level": "debug", "format": "json"})
    for port in ports:
        sections.append("[[port]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in port.items()))
    for device in devices:
        pins = device.get("pins", {})
        body = "".join(f"{k} = {toml_value(v)}\n" for k, v in device.items() if k != "pins")
        sections.append(
            "[[device]]\n" + body + "[device.pins]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in pins.items())
        )
    path = tmp_path / "edgeforward.toml"
    path.write_text("\n".join(sections))
    return path


def edgeforward(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "edgeforward", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


class DaemonProcess:
    """`edgeforward run` in a subprocess, its log in a file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgeforward", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_started(self) -> None:
        await wait_for(lambda: "daemon_started" in self.log(), PROCESS_START_TIMEOUT_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(PROCESS_STOP_TIMEOUT_S)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(PROCESS_STOP_TIMEOUT_S)

    def status(self) -> dict[str, Any]:
        """What `status --json` prints, read in this process: polled from a test's event loop, a CLI
        subprocess would block the loop that serves the test's cloudsim for as long as Python starts
        (seconds on a loaded machine), and the daemon's requests would time out. `edgeforward("status", ...)`
        runs the command itself where a test is about the CLI."""
        document: dict[str, Any] = redact_value(read_status(load_config(self.config, read_tokens=False)))
        return document

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(PROCESS_STOP_TIMEOUT_S)


@pytest.fixture
def daemon_factory() -> Iterator[Callable[[Path], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(config: Path) -> DaemonProcess:
        process = DaemonProcess(config)
        started.append(process)
        return process

    yield make
    for process in started:
        process.cleanup()


TMPFS_BYTES = 6 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs of a few MB, mounted for the test (needs root; skipped with the reason otherwise)."""
    mount = tmp_path / "sd"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs ({result.stderr.strip() or result.returncode}): needs root"
        print(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path, name: str = "filler") -> Path:
    """Fill the file system to the last byte with one file."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1024 * 1024, 64 * 1024, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(size)) == size:
                    pass
    finally:
        os.close(fd)
    return path


@contextlib.asynccontextmanager
async def open_buffer(path: Path, **kwargs: Any) -> AsyncIterator[Buffer]:
    """A real buffer file with its writer running; committed and closed on exit."""
    buffer = Buffer(path, **kwargs)
    await buffer.open()
    writer = asyncio.create_task(buffer.run_writer())
    try:
        yield buffer
    finally:
        buffer.stop_writer()
        await writer
        await buffer.close()


class Ticks:
    """The buffer's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


async def wait_for(condition: Callable[[], bool], within_s: float = 10.0, interval: float = 0.05) -> None:
    """Poll `condition` until it holds or fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(interval)


def ledger_adds_up(device: dict[str, Any]) -> bool:
    out = sum(device[k] for k in ("delivered", "queued", "expired", "dropped", "rejected", "downsampled"))
    return bool(device["received"] == out)
