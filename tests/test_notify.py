"""sd_notify and the watchdog: a real AF_UNIX datagram socket, the daemon as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeforward import notify
from edgeforward.cloudsim import CloudSim
from edgeforward.config import load_config
from edgeforward.forward import Forwarder, WaitReason
from edgeforward.metrics import DaemonView, health
from edgeforward.notify import Notifier, ProgressMonitor, StartExtender, watchdog_interval_s
from edgeforward.points import Point
from edgeforward.store import Buffer, Progress
from edgeforward.timebase import next_utc_month_s

from .conftest import TOKEN, Pty, open_buffer, wait_for, write_config
from .fakeclock import FakeClock
from .forward.rig import MID_MONTH, PINS, make_config, rig, sim_cloud

PUMP = {"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer"}}
WATCHDOG_USEC = 600_000  # pings every 0.3 s
RECV_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


class NotifySocket:
    """The listening end systemd would hold: collects every datagram."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def has(self, key: str, value: str | None = None) -> bool:
        self.drain()
        return any(key in f and (value is None or f[key] == value) for _, f in self.messages)

    def pings_since(self, since: float) -> int:
        self.drain()
        return sum(1 for at, f in self.messages if at >= since and f.get("WATCHDOG") == "1")

    def statuses(self) -> list[str]:
        self.drain()
        return [f["STATUS"] for _, f in self.messages if "STATUS" in f]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"@edgeforward-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


@contextlib.contextmanager
def daemon_with(config: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = (config.parent / "daemon.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeforward", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    log.close()
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def test_notifier_reaches_path_and_abstract_sockets() -> None:
    with tempfile.TemporaryDirectory(prefix="ef-") as tmp:  # short: sun_path holds 108 bytes
        for address in (f"{tmp}/notify", f"@edgeforward-unit-{uuid.uuid4().hex}"):
            listener = NotifySocket(address)
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
            assert notifier.enabled
            assert notifier.ready("starting")
            assert notifier.watchdog()
            notifier.close()
            listener.drain()
            assert [f for _, f in listener.messages] == [
                {"READY": "1", "STATUS": "starting", "MAINPID": str(os.getpid())},
                {"WATCHDOG": "1"},
            ]
            listener.close()


def test_notifier_without_socket_or_with_a_vanished_one_does_not_raise() -> None:
    assert not Notifier.from_environ({}).send("READY=1")
    with tempfile.TemporaryDirectory(prefix="ef-") as tmp:
        notifier = Notifier(f"{tmp}/gone")
        assert notifier.enabled and not notifier.ready("x")
        notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


async def test_daemon_notifies_ready_status_watchdog_and_stopping(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, abstract_socket: NotifySocket
) -> None:
    config = write_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP])
    env = {"NOTIFY_SOCKET": abstract_socket.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with daemon_with(config, env) as process:
        await wait_for(lambda: abstract_socket.has("READY", "1"), RECV_TIMEOUT_S)
        # READY=1 comes once the buffer is open.
        assert (tmp_path / "buffer.db").exists()
        assert abstract_socket.statuses()[0].startswith("queued 0, delivered 0")
        for i in range(10):
            pty_port.write(f"v1={i}.5 v2={i}\n")
        await wait_for(lambda: any("delivered 20" in s for s in abstract_socket.statuses()), RECV_TIMEOUT_S)
        since = time.monotonic()
        await wait_for(lambda: abstract_socket.pings_since(since) >= 3, RECV_TIMEOUT_S)
        process.send_signal(signal.SIGTERM)
        assert process.wait(STOP_TIMEOUT_S) == 0
    assert abstract_socket.has("STOPPING", "1")
    assert TOKEN not in "".join(abstract_socket.statuses())


async def test_watchdog_withheld_while_the_writer_is_stuck_and_resumed_after(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, abstract_socket: NotifySocket
) -> None:
    config = write_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP])
    env = {"NOTIFY_SOCKET": abstract_socket.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with daemon_with(config, env):
        await wait_for(lambda: abstract_socket.pings_since(0) >= 2, RECV_TIMEOUT_S)
        # Another process holds the database's write lock: the daemon's writer blocks in BEGIN.
        blocker = sqlite3.connect(tmp_path / "buffer.db", isolation_level=None, timeout=RECV_TIMEOUT_S)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            pty_port.write("v1=1.5 v2=1\n")
            await wait_for(lambda: any(s.startswith("stalled: buffer writer") for s in abstract_socket.statuses()))
            quiet_from = time.monotonic()
            await asyncio.sleep(4 * WATCHDOG_USEC / 1e6)
            assert abstract_socket.pings_since(quiet_from) == 0
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        resumed = time.monotonic()
        await wait_for(lambda: abstract_socket.pings_since(resumed) >= 2, RECV_TIMEOUT_S)
    assert "watchdog_withheld" in (tmp_path / "daemon.log").read_text()


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    async with open_buffer(tmp_path / "buffer.db", commit_interval_ms=0) as buf:
        yield buf


async def test_a_wedged_forwarder_is_a_stall(tmp_path: Path, buffer: Buffer) -> None:
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9", [], [PUMP]))
    clock = FakeClock(wall=MID_MONTH)
    async with aiohttp.ClientSession() as session:
        # Constructed but never run: it never reaches its first deadline.
        forwarder = Forwarder(config.devices[0], buffer, session, config.cloud, config.forward, clock=clock)
        monitor = ProgressMonitor(buffer, {"pump": forwarder}, config, clock=clock)
        assert await monitor.stalls(1.0) == []
        await clock.advance(monitor.allowance_s() + 1)
        stalls = await monitor.stalls(1.0)
        assert len(stalls) == 1 and "forwarder pump is" in stalls[0] and "late" in stalls[0]


@pytest.mark.parametrize("case", ["device-plan-points-spent", "one-message-left-this-month"])
async def test_waiting_by_design_is_neither_a_stall_nor_unhealthy(tmp_path: Path, case: str) -> None:
    """The two false stalls: (A) a device plan smaller than [cloud.limits] with today's points spent, and
    (B) one message left this month. Both wait by design: the watchdog keeps pinging, /healthz stays 200."""
    clock = FakeClock(wall=MID_MONTH)
    async with sim_cloud(clock) as sim:
        if case == "device-plan-points-spent":
            device = {"name": "pump", "token": TOKEN, "pins": PINS, "limits": {"points_per_day": 100}}
            cloud_limits: dict[str, Any] = {"points_per_day": 100_000}
        else:
            device = {"name": "pump", "token": TOKEN, "pins": PINS}
            cloud_limits = {"messages_per_month": 10}
        config = make_config(tmp_path, str(sim.url), live=0, limits=cloud_limits, devices=[device])
        async with rig(config, clock=clock) as r:
            await r.idle()
            if case == "device-plan-points-spent":
                await r.buffer.spend("pump", clock.wall(), messages=1, points=100)
            else:
                await r.buffer.spend("pump", clock.wall(), messages=9)
            old = clock.wall_ms() - 60_000
            await r.buffer.submit([Point("pump", 1, old + i, float(i)) for i in range(500)])
            monitor = ProgressMonitor(r.buffer, r.forwarders, config, clock=clock)
            view = DaemonView(config, r.buffer, r.forwarders, [], clock.wall())
            for _ in range(48):  # two days in hours: the watchdog would have been withheld after 95 s
                await clock.advance(3600)
                assert await monitor.stalls(1.0) == []
                snapshot = await view.snapshot(clock.wall())
                if case == "device-plan-points-spent" or clock.wall() < next_utc_month_s(MID_MONTH):
                    assert health(snapshot, config).ok, health(snapshot, config).reasons
                    assert r.forwarder.snapshot().by_design
            sent = [req for req in sim.requests if req.method == "POST"]
        if case == "device-plan-points-spent":
            # Two new UTC days of the device's own plan (100 points each), never the cloud plan's 100,000.
            assert sum(req.points for req in sent) == 200
            assert r.forwarder.snapshot().waiting is WaitReason.POINTS_BUDGET
        else:
            assert len(sent) <= 1  # the last message of the month: history keeps the live share, so none


UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edgeforward.service"
MAX_EXPOSURE = 2.0
SYSTEMD_ANALYZE_TIMEOUT_S = 60


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    return path


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_is_notify_with_watchdog_and_serial_devices() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert int(settings["WatchdogSec"][0]) > 0
    assert settings["PrivateDevices"] == ["no"] and settings["DevicePolicy"] == ["closed"]
    # The USB majors as numbers too: names resolve only against drivers loaded when the unit starts.
    assert {"char-188 rw", "char-166 rw", "char-ttyUSB rw", "char-ttyACM rw"} <= set(settings["DeviceAllow"])
    assert {"adjtimex", "clock_adjtime", "clock_adjtime64"} <= set(" ".join(settings["SystemCallFilter"]).split())
    assert "ProcSubset" not in settings  # it would hide /proc/sys/kernel/random/boot_id
    # The daemon checks its config and exits 2 (not restarted); an ExecStartPre= exit would be restarted.
    assert "ExecStartPre" not in settings and settings["RestartPreventExitStatus"] == ["2"]
    assert settings["SupplementaryGroups"] == ["dialout"] and settings["StateDirectory"] == ["edgeforward"]
    assert "AF_INET" in settings["RestrictAddressFamilies"][0].split()
    assert "AF_UNIX" in settings["RestrictAddressFamilies"][0].split()  # sd_notify


def test_unit_exposure_is_at_most_two() -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=SYSTEMD_ANALYZE_TIMEOUT_S,
        check=False,
    )
    match = re.search(r"Overall exposure level for edgeforward\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_verifies_with_an_installed_executable(tmp_path: Path) -> None:
    installed = Path(sys.executable).parent / "edgeforward"
    if not installed.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    # /usr/local/bin/edgeforward does not exist on a build machine: point a copy at the installed script.
    unit = tmp_path / "edgeforward.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/edgeforward", str(installed)))
    result = subprocess.run(
        [systemd_analyze(), "verify", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=SYSTEMD_ANALYZE_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0 and "edgeforward.service" not in result.stderr, result.stderr


def test_start_extender_asks_for_time_only_while_the_preparation_progresses(abstract_socket: NotifySocket) -> None:
    progress = Progress()
    notifier = Notifier(abstract_socket.address)
    extender = StartExtender(notifier, progress)
    assert not extender.tick()  # nothing done since it began watching
    progress.step()
    assert extender.tick()
    assert not extender.tick()  # stuck: no extension, so systemd's own start timeout stands
    progress.enter("recovering the damaged buffer")
    assert extender.tick()
    notifier.close()
    abstract_socket.drain()
    usec = str(int(notify.START_EXTEND_BY_S * 1_000_000))
    assert [f for _, f in abstract_socket.messages] == [
        {"EXTEND_TIMEOUT_USEC": usec, "STATUS": "starting: opening the buffer"},
        {"EXTEND_TIMEOUT_USEC": usec, "STATUS": "starting: recovering the damaged buffer"},
    ]
