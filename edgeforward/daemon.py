"""The daemon: ports -> parser -> buffer -> forwarders, wired in one TaskGroup, stopped by signal."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from . import __version__
from .backoff import Backoff
from .blynk import open_session
from .clock import ClockWatcher
from .config import Config
from .forward import Forwarder, Peers
from .ingest.pipeline import PortPipeline
from .notify import Notifier, ProgressMonitor, StartExtender, SystemdWatchdog, status_line, watchdog_interval_s
from .redact import redact
from .store import Buffer, Committed, StoreError

if TYPE_CHECKING:
    # Imported when [metrics] listen is set: aiohttp.web and prometheus_client cost the daemon 5 MB otherwise.
    from .metrics import DaemonView, MetricsServer

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 5.0
M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2
SNAPSHOT_INTERVAL_S = 5.0  # port counters for status: a change is stored within this (an open or a loss at once)
# ... but a change of `lines_ok` alone (lines arriving, nothing else new) only every this many snapshots: each
# stored snapshot rides a commit and costs it a page of SD wear (tests/bench/bench_wear.py).
SNAPSHOT_LINES_ONLY_EVERY = 2


def now_ms() -> int:
    """Return the wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class Daemon:
    """Everything `edgeforward run` does, from open to orderly stop."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier(None)
        self.started_s = time.time()
        buffer_config = config.buffer
        self.buffer = Buffer(
            Path(buffer_config.path),
            synchronous=buffer_config.synchronous,
            max_points=buffer_config.max_points,
            full_policy=buffer_config.full_policy,
            commit_interval_ms=buffer_config.commit_interval_ms,
            max_bytes=buffer_config.max_bytes,
            exclusive=True,
            check="auto",
            inbox=True,
        )
        self.clock = ClockWatcher(config.clock.require_sync, config.clock.previous_boots)
        self.pipelines = [
            PortPipeline(port, config, self.buffer.submit, clock=self.clock, hold=self.buffer.hold)
            for port in config.ports
        ]
        self.forwarders: dict[str, Forwarder] = {}
        self.ready = asyncio.Event()
        self.metrics: MetricsServer | None = None

    def view(self) -> DaemonView:
        """Return what metrics, health and the demo read of this daemon."""
        from .metrics import DaemonView  # noqa: PLC0415 (see TYPE_CHECKING above)

        return DaemonView(self.config, self.buffer, self.forwarders, [p.stats for p in self.pipelines], self.started_s)

    def _on_commit(self, committed: Sequence[Committed]) -> None:
        for item in committed:
            forwarder = self.forwarders.get(item.device)
            if forwarder is not None:
                forwarder.notify(item.pins)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then stop in order: readers, forwarders, writer."""
        await self._open_buffer()
        try:
            saved = await self.buffer.saved_ports()
            await self.clock.load(self.buffer)
            for pipeline in self.pipelines:
                pipeline.restore(saved.get(pipeline.port.path), now_ms())
                pipeline.restore_window(await self.buffer.resend_window(pipeline.port.path))
            headers = {"User-Agent": f"edgeforward/{__version__}"}
            async with open_session(self.config.cloud.ca_file, headers=headers) as session:
                peers = Peers()
                for device in self.config.devices:
                    self.forwarders[device.name] = Forwarder(
                        device,
                        self.buffer,
                        session,
                        self.config.cloud,
                        self.config.forward,
                        limits=self.config.limits_of(device.name),
                        peers=peers,
                    )
                self.buffer.add_listener(self._on_commit)
                await self._start_metrics()
                try:
                    await self._run_tasks(stop)
                finally:
                    if self.metrics is not None:
                        await self.metrics.stop()
        finally:
            await self.buffer.close()

    async def _open_buffer(self) -> None:
        """Open the buffer; under systemd, ask for more start-up time while a long check or recovery progresses."""
        if not self.notifier.enabled:
            await self.buffer.open()
            return
        extender = asyncio.create_task(StartExtender(self.notifier, self.buffer.startup).run(), name="start-extender")
        try:
            await self.buffer.open()
        finally:
            extender.cancel()
            await asyncio.gather(extender, return_exceptions=True)

    async def _start_metrics(self) -> None:
        listen = self.config.metrics.listen
        if listen is None:
            return
        from .metrics import MetricsServer  # noqa: PLC0415 (see TYPE_CHECKING above)

        server = MetricsServer(self.view())
        try:
            await server.start(listen)
        except OSError as exc:
            # Forwarding matters more than metrics: say so loudly and go on without them.
            log.error("metrics_listen_failed", listen=listen, error=exc.strerror or str(exc))
            return
        self.metrics = server

    async def _run_tasks(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            writer = group.create_task(self.buffer.run_writer(), name="buffer-writer")
            readers = [
                group.create_task(pipeline.source.run(), name=f"port:{pipeline.port.path}")
                for pipeline in self.pipelines
            ]
            snapshots = group.create_task(self._snapshot_loop(), name="status-snapshot")
            await self.buffer.set_meta({"pid": str(os.getpid()), "started": str(now_ms()), "running": "1"})
            log.info(
                "daemon_started",
                version=__version__,
                ports=[p.port.path for p in self.pipelines],
                devices=list(self.forwarders),
                buffer=str(self.buffer.path),
                queued=self.buffer.queued_total,
            )
            self.ready.set()
            self.notifier.ready(await status_line(self.buffer, self.forwarders))
            # Forwarding starts after READY: its first reads of a large backlog (counting a day's share per pin)
            # would otherwise queue ahead of the status read on the reader connection and hold READY back.
            forwarders = [
                group.create_task(_supervised(forwarder.run, name), name=f"forward:{name}")
                for name, forwarder in self.forwarders.items()
            ]
            housekeeping = [snapshots]
            if self.buffer.needs_verify:
                # A clean stop: the pages are read after READY, not before (a large buffer starts fast).
                housekeeping.append(group.create_task(self._verify(), name="buffer-verify"))
            housekeeping.append(group.create_task(self.clock.run(self.buffer, self._reset_clocks), name="clock"))
            if self.notifier.enabled:
                watchdog = SystemdWatchdog(
                    self.notifier,
                    ProgressMonitor(self.buffer, self.forwarders, self.config),
                    lambda: status_line(self.buffer, self.forwarders),
                    watchdog_interval_s(),
                )
                housekeeping.append(group.create_task(watchdog.run(), name="systemd-watchdog"))
            await stop.wait()
            log.info("daemon_stopping")
            self.notifier.stopping()
            await _cancel_and_wait(readers, STOP_TIMEOUT_S)
            for pipeline in self.pipelines:
                pipeline.release_held()
            await _cancel_and_wait(forwarders, STOP_TIMEOUT_S)
            await _cancel_and_wait(housekeeping, STOP_TIMEOUT_S)
            await self.buffer.save_ports(p.snapshot() for p in self.pipelines)
            await self.buffer.set_meta({"running": "0", "stopped": str(now_ms())})
            self.buffer.stop_writer()
            await writer
        log.info("daemon_stopped", queued=self.buffer.queued_total)

    async def _verify(self) -> None:
        problem = await self.buffer.verify()
        if problem is not None:
            log.error("buffer_recovered_while_running", reason=problem)

    def _reset_clocks(self) -> None:
        for pipeline in self.pipelines:
            pipeline.reset_clock()
        for forwarder in self.forwarders.values():
            forwarder.clock_stepped()

    async def _snapshot_loop(self) -> None:
        last: list[tuple[str, str, int, int, int, int, str]] = []
        skipped = 0
        while True:
            rows = [pipeline.snapshot() for pipeline in self.pipelines]
            if rows != last:
                lines_only = len(rows) == len(last) and all(
                    (*new[:2], *new[3:]) == (*old[:2], *old[3:]) for new, old in zip(rows, last, strict=True)
                )
                if lines_only and skipped + 1 < SNAPSHOT_LINES_ONLY_EVERY:
                    skipped += 1
                else:
                    await self.buffer.save_ports(rows)
                    last, skipped = rows, 0
            await _first_change([pipeline.stats.changed for pipeline in self.pipelines], SNAPSHOT_INTERVAL_S)


async def _first_change(events: list[asyncio.Event], timeout_s: float) -> None:
    """Wait until one of `events` is set or `timeout_s` has passed; clear them all."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        if waits:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(timeout_s)
    finally:
        for wait in waits:
            wait.cancel()
        for event in events:
            event.clear()


STORE_RETRY_INITIAL_S = 0.5
STORE_RETRY_MAX_S = 30.0


async def _supervised(run: Callable[[], Awaitable[None]], device: str) -> None:
    """Run a device's forwarding; when the store cannot do what it asks (full disk, busy), wait and start again."""
    backoff = Backoff(STORE_RETRY_INITIAL_S, STORE_RETRY_MAX_S)
    while True:
        try:
            await run()
        except StoreError as exc:
            delay = backoff.next_delay()
            log.warning("forward_store_error", device=device, error=redact(str(exc)), retry_s=round(delay, 1))
            await asyncio.sleep(delay)
        else:
            return


async def _cancel_and_wait(tasks: Sequence[asyncio.Task[None]], within_s: float) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=within_s)


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas: each thread (SQLite, serial) would otherwise keep its own, and RSS grows."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)


async def run_daemon(config: Config, *, on_ready: Callable[[Daemon], None] | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    limit_malloc_arenas()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(config, notifier=Notifier.from_environ())
    try:
        if on_ready is not None:
            ready_task = asyncio.create_task(_call_when_ready(daemon, on_ready))
        await daemon.run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if on_ready is not None:
            ready_task.cancel()
        daemon.notifier.close()


async def _call_when_ready(daemon: Daemon, on_ready: Callable[[Daemon], None]) -> None:
    await daemon.ready.wait()
    on_ready(daemon)
