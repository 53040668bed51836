"""The daemon: ports -> parser -> buffer -> forwarders, wired in one TaskGroup, stopped by signal."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from . import __version__
from .backoff import Backoff
from .blynk import open_session
from .clock import UNKNOWN_FUTURE_MS, ClockWatcher
from .config import Config, PortConfig
from .forward import Forwarder, Peers
from .lines import CsvParser, Ignored, McuClock, ParseContext, Reading, Rejected, parse_line
from .logs import Throttle
from .notify import Notifier, ProgressMonitor, SystemdWatchdog, status_line, watchdog_interval_s
from .points import Point
from .redact import redact
from .serial_source import PortStats, SerialSource
from .store import Buffer, Committed, StoreError

if TYPE_CHECKING:
    # Imported when [metrics] listen is set: aiohttp.web and prometheus_client cost the daemon 5 MB otherwise.
    from .metrics import DaemonView, MetricsServer

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 5.0
M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2
SNAPSHOT_INTERVAL_S = 5.0  # port counters for status; each changed snapshot is a commit (SD wear, idle CPU)
BAD_LINES_LOGGED_PER_MINUTE = 5


def now_ms() -> int:
    """Return the wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class PortPipeline:
    """One port's lines: parse, stamp, submit to the buffer, count, acknowledge."""

    def __init__(
        self,
        port: PortConfig,
        config: Config,
        submit: Callable[[Sequence[Point]], asyncio.Future[None]],
        *,
        clock: ClockWatcher | None = None,
        hold: Callable[[Sequence[Point], str], asyncio.Future[None]] | None = None,
    ):
        self.port = port
        self.stats = PortStats(path=port.path)
        self.source = SerialSource(
            port.path,
            port.baud,
            self.on_line,
            stats=self.stats,
            max_line_bytes=port.max_line_bytes,
            newline=port.newline,
        )
        self._submit = submit
        self._wall = clock
        self._hold = hold
        self._context = ParseContext(
            devices={device.name: {pin: spec.type for pin, spec in device.pins.items()} for device in config.devices},
            default_device=port.device,
            max_future_ms=int(config.limits_of(port.device).max_future_days * 86_400_000),
        )
        self._context_untrusted = dataclasses.replace(self._context, max_future_ms=UNKNOWN_FUTURE_MS)
        self._clock = McuClock()
        self._csv = CsvParser(port.columns, port.header) if port.format == "csv" else None
        self._throttle = Throttle(BAD_LINES_LOGGED_PER_MINUTE)
        self._log = log.bind(port=port.path)
        self._before = _PortTotals()

    def on_line(self, raw: bytes, received_ms: int, first: bool) -> None:
        """Handle one framed line from the serial source."""
        result = self._parse(raw, received_ms)
        if result is None:
            return
        if isinstance(result, Rejected):
            if first:
                # The first bytes after opening are often the tail of a line the MCU was already printing.
                self.stats.count_ignored("partial")
                return
            self.stats.count_bad(result.reason)
            if self._throttle.allow():
                self._log.warning(
                    "line_rejected",
                    reason=result.reason,
                    detail=result.detail,
                    suppressed=self._throttle.take_suppressed(),
                )
            return
        if isinstance(result, Ignored):
            self.stats.count_ignored(result.reason)
            return
        self._accept(result, received_ms)

    def _parse(self, raw: bytes, received_ms: int) -> Reading | Rejected | Ignored | None:
        # An untrusted gateway clock cannot tell whether an MCU's own ts= lies in the future.
        context = self._context if self._wall is None or self._wall.trusted else self._context_untrusted
        return parse_line(raw, self.port.format, context, received_ms, csv_parser=self._csv, nmea_pins=self.port.nmea)

    def _accept(self, reading: Reading, received_ms: int) -> None:
        wall = self._wall
        if reading.ts_ms is not None or wall is None or self._hold is None or wall.trusted:
            if reading.ts_ms is not None:
                ts = reading.ts_ms
            elif reading.mcu_ms is not None:
                ts = self._clock.to_wall(reading.mcu_ms, received_ms)
            else:
                ts = received_ms
            committed = self._submit([Point(reading.device, pin, ts, value) for pin, value in reading.values])
        else:
            # The wall clock is untrusted: stamp on the boot's monotonic clock and hold until it is.
            mono = wall.mono_of(received_ms)
            if reading.mcu_ms is not None:
                mono = self._clock.to_wall(reading.mcu_ms, mono)
            points = [Point(reading.device, pin, mono, value) for pin, value in reading.values]
            committed = self._hold(points, wall.boot_id)
        self.stats.count_ok()
        if self.port.ack and reading.seq is not None:
            seq = reading.seq
            committed.add_done_callback(lambda future: self._acknowledge(future, seq))

    def reset_clock(self) -> None:
        """Forget the MCU clock anchor (the gateway's clock jumped or changed domain)."""
        self._clock.reset()

    def _acknowledge(self, future: asyncio.Future[None], seq: int) -> None:
        if not future.cancelled() and future.exception() is None:
            self.source.write(b"ACK %d\n" % seq)

    def restore(self, saved: tuple[int, int, int, int, str] | None) -> None:
        """Start `status`'s counters from what earlier runs counted (they are lifetime; metrics stay per process)."""
        if saved is None:
            return
        ok, bad, ignored, reconnects, detail = saved
        extra = _json_object(detail)
        self._before = _PortTotals(
            ok,
            bad,
            ignored,
            reconnects,
            _counts(extra.get("bad_reasons")),
            _counts(extra.get("ignored_reasons")),
        )

    def snapshot(self) -> tuple[str, str, int, int, int, int, str]:
        """Return the row `status` reads for this port: lifetime counters."""
        stats, before = self.stats, self._before
        detail = json.dumps(
            {
                "bad_reasons": _added(before.bad_reasons, stats.bad_reasons),
                "ignored_reasons": _added(before.ignored_reasons, stats.ignored_reasons),
                "last_error": stats.last_error,
            }
        )
        return (
            stats.path,
            str(stats.state),
            before.lines_ok + stats.lines_ok,
            before.lines_bad + stats.lines_bad,
            before.lines_ignored + stats.lines_ignored,
            before.reconnects + stats.reconnects,
            detail,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _PortTotals:
    """A port's counters from earlier runs of the daemon."""

    lines_ok: int = 0
    lines_bad: int = 0
    lines_ignored: int = 0
    reconnects: int = 0
    bad_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    ignored_reasons: dict[str, int] = dataclasses.field(default_factory=dict)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int)}


def _added(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    return {key: before.get(key, 0) + now.get(key, 0) for key in sorted(before.keys() | now.keys())}


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
        await self.buffer.open()
        try:
            saved = await self.buffer.saved_ports()
            for pipeline in self.pipelines:
                pipeline.restore(saved.get(pipeline.port.path))
            await self.clock.load(self.buffer)
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
        while True:
            rows = [pipeline.snapshot() for pipeline in self.pipelines]
            if rows != last:
                await self.buffer.save_ports(rows)
                last = rows
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)


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
