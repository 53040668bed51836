"""systemd integration: the sd_notify datagram protocol, and a watchdog that pings only on forward progress."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

import aiosqlite
import structlog

from .config import Config
from .forward import DeviceSnapshot, Forwarder, WaitReason
from .store import Buffer, Progress
from .timebase import SYSTEM_CLOCK, Clock

log = structlog.get_logger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
STATUS_INTERVAL_S = 10.0  # how often STATUS= is refreshed when no watchdog asks for more
MIN_TICK_S = 0.05
STALL_MARGIN_S = 30.0  # slack for scheduling and the buffer on top of the request timeouts
# Before READY: while preparing the buffer makes progress, ask for this much more start-up time this often
# (a datagram every 2 s; an extension outlives many of them, and a start timeout of a few seconds still holds).
START_EXTEND_EVERY_S = 2.0
START_EXTEND_BY_S = 30.0


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET; does nothing when it is unset."""

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        self._socket: socket.socket | None = None
        self._failed = False
        if address:
            # A leading '@' names a socket in the abstract namespace (a leading NUL byte on the wire).
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Return a notifier for the socket systemd handed this process, if any."""
        env = os.environ if environ is None else environ
        return cls(env.get(NOTIFY_SOCKET_ENV))

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._socket is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` assignments in one datagram; return False if it could not be sent."""
        if self._socket is None or self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("sd_notify_failed", error=exc.strerror or str(exc))
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        """Tell systemd start-up is complete."""
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        """Tell systemd the service is stopping."""
        return self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Tell systemd the service is making progress."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class StartExtender:
    """Asks systemd for more start-up time while the buffer's preparation makes progress (EXTEND_TIMEOUT_USEC).

    A recovery of a damaged 10 M-point buffer can take longer than the unit's TimeoutStartSec (34 s on an x86
    VM, minutes on an SD card): killed at the timeout, the daemon would start the recovery again, forever. Each
    extension lasts START_EXTEND_BY_S; once the preparation stops making progress none is asked for, and the
    unit's timeout stands.
    """

    def __init__(self, notifier: Notifier, progress: Progress) -> None:
        self._notifier = notifier
        self._progress = progress
        self._seen = progress.steps

    def tick(self) -> bool:
        """Extend the start timeout if the preparation progressed since the last tick; return whether it did."""
        steps = self._progress.steps
        if steps == self._seen:
            return False
        self._seen = steps
        return self._extend(f"STATUS=starting: {self._progress.phase}")

    def _extend(self, *also: str) -> bool:
        return self._notifier.send(f"EXTEND_TIMEOUT_USEC={int(START_EXTEND_BY_S * 1_000_000)}", *also)

    async def run(self) -> None:
        """Ask at once (the preparation begins: a start timeout of a few seconds must not end it before the first
        tick), then tick every START_EXTEND_EVERY_S until cancelled."""
        self._extend()
        while True:
            await asyncio.sleep(START_EXTEND_EVERY_S)
            self.tick()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Return how often to ping the watchdog (half of WATCHDOG_USEC), or None when it is off for us."""
    env = os.environ if environ is None else environ
    usec = env.get(WATCHDOG_USEC_ENV, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get(WATCHDOG_PID_ENV, "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


class ProgressMonitor:
    """Decides whether the writer and every forwarder made progress since the previous check.

    A forwarder publishes when it will look again; it is stalled when it is late for its own deadline
    (or one working step outlasts two request timeouts). Waiting for a budget, a quota or a backoff is
    a deadline like any other, so a device that waits by design is never taken for a stalled one.
    """

    def __init__(
        self,
        buffer: Buffer,
        forwarders: Mapping[str, Forwarder],
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._buffer = buffer
        self._forwarders = forwarders
        self._config = config
        self._clock = clock
        self._commits = buffer.commits

    async def stalls(self, probe_timeout_s: float) -> list[str]:
        """Return why the daemon is not progressing (empty when it is)."""
        writer = await self._writer_stall(probe_timeout_s)
        if writer is not None:
            # Forwarders read through the writer (budgets, deliveries): judge them once it moves again.
            return [writer]
        now = self._clock.monotonic()
        allowance = self.allowance_s()
        problems = []
        for name, forwarder in self._forwarders.items():
            snapshot = forwarder.snapshot()
            late = snapshot.overdue_s(now)
            if late > allowance:
                waiting = f", waiting: {snapshot.waiting}" if snapshot.waiting is not None else ""
                problems.append(f"forwarder {name} is {late:.0f} s late ({snapshot.activity}{waiting})")
        return problems

    async def _writer_stall(self, probe_timeout_s: float) -> str | None:
        if self._buffer.commits != self._commits:
            self._commits = self._buffer.commits
            return None
        # No commit since the last check: an empty write proves the writer drains what is pending.
        try:
            await asyncio.wait_for(self._buffer.run_op(_no_op), probe_timeout_s)
        except TimeoutError:
            return f"buffer writer has not committed for {probe_timeout_s:.1f} s"
        except Exception as exc:  # noqa: BLE001 (any failure of the probe means the writer is not progressing)
            return f"buffer writer failed: {type(exc).__name__}"
        self._commits = self._buffer.commits
        return None

    def allowance_s(self) -> float:
        """How late a forwarder may be: one working step may wait out two request timeouts."""
        return 2 * self._config.cloud.timeout_s + STALL_MARGIN_S


async def _no_op(_conn: aiosqlite.Connection) -> None:
    return None


async def status_line(buffer: Buffer, forwarders: Mapping[str, Forwarder]) -> str:
    """Return the one-line STATUS= text: queued and delivered counts and the devices' states."""
    delivered = 0
    for name in forwarders:
        ledger = await buffer.ledger(name, settle=False)
        delivered += ledger["delivered_live"] + ledger["delivered_history"]
    states = ", ".join(f"{name} {_device_status(forwarder.snapshot())}" for name, forwarder in forwarders.items())
    return f"queued {buffer.queued_total}, delivered {delivered}; {states}"


def _device_status(snapshot: DeviceSnapshot) -> str:
    if snapshot.waiting is None or snapshot.waiting is WaitReason.PACING:
        return str(snapshot.state)
    return f"{snapshot.state} ({snapshot.waiting})"


class SystemdWatchdog:
    """Sends STATUS= periodically and WATCHDOG=1 while the monitor sees progress."""

    def __init__(
        self,
        notifier: Notifier,
        monitor: ProgressMonitor,
        status: Callable[[], Awaitable[str]],
        interval_s: float | None,
    ):
        self._notifier = notifier
        self._monitor = monitor
        self._status = status
        self._interval_s = interval_s
        self.pings = 0
        self.stalled: list[str] = []

    @property
    def tick_s(self) -> float:
        """How often the loop runs."""
        if self._interval_s is None:
            return STATUS_INTERVAL_S
        return max(MIN_TICK_S, min(self._interval_s, STATUS_INTERVAL_S))

    async def run(self) -> None:
        """Run until cancelled."""
        last_status = ""
        while True:
            if self._interval_s is not None:
                # Half the tick for the probe, so a healthy writer answers before the next ping is due.
                stalls = await self._monitor.stalls(self.tick_s / 2)
                self._report(stalls)
                if not stalls:
                    self._notifier.watchdog()
                    self.pings += 1
            text = await self._status() if not self.stalled else "stalled: " + "; ".join(self.stalled)
            if text != last_status:
                self._notifier.status(text)
                last_status = text
            await asyncio.sleep(self.tick_s)

    def _report(self, stalls: list[str]) -> None:
        if stalls and stalls != self.stalled:
            log.error("watchdog_withheld", reasons=stalls)
        elif not stalls and self.stalled:
            log.info("watchdog_progress_again")
        self.stalled = stalls
