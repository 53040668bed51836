"""Prometheus metrics and the /healthz endpoint, read from the ledger and the live daemon at scrape time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from .config import Config, split_listen
from .forward import DeviceSnapshot, DeviceState, Forwarder, WaitReason
from .ingest.source import PortState, PortStats
from .store import Buffer
from .timebase import SYSTEM_CLOCK, Clock

log = structlog.get_logger(__name__)

PREFIX = "edgeforward"
DEVICE_STATES = tuple(state.value for state in DeviceState)
WAIT_REASONS = tuple(reason.value for reason in WaitReason)
LINE_RESULTS = ("ok", "bad", "ignored")
STOP_GRACE_S = 1.0


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One device as read at scrape time: its ledger and budget from the buffer, its forwarder's snapshot."""

    name: str
    ledger: Mapping[str, int]
    points_today: int
    messages_this_month: int
    points_left: int | None  # today's timestamped points left (None: unlimited), as the budget guard says
    messages_left: int | None  # this month's messages left (None: unlimited)
    oldest_ts_ms: int | None
    forward: DeviceSnapshot


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape or health check reports, read at one moment."""

    now_s: float
    started_s: float
    commits: int
    devices: Sequence[DeviceReading]
    ports: Sequence[PortStats]


@dataclass(frozen=True, slots=True)
class Health:
    """The answer of /healthz: healthy, and why not."""

    ok: bool
    reasons: tuple[str, ...] = field(default=())


class DaemonView:
    """The parts of a running daemon that metrics and health read."""

    def __init__(
        self,
        config: Config,
        buffer: Buffer,
        forwarders: Mapping[str, Forwarder],
        ports: Sequence[PortStats],
        started_s: float,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.buffer = buffer
        self.forwarders = forwarders
        self.ports = ports
        self.started_s = started_s
        self._clock = clock

    async def snapshot(self, now_s: float | None = None) -> Snapshot:
        """Read the ledger, budgets and live state now (wall time: budgets are keyed by the UTC day and month)."""
        now = self._clock.wall() if now_s is None else now_s
        devices = []
        for name, forwarder in self.forwarders.items():
            budget = await self.buffer.budget(name, now)
            devices.append(
                DeviceReading(
                    name=name,
                    ledger=await self.buffer.ledger(name, settle=False),
                    points_today=budget.points_day,
                    messages_this_month=budget.messages_month,
                    points_left=forwarder.guard.points_room(now),
                    messages_left=forwarder.guard.messages_left(now),
                    oldest_ts_ms=await self.buffer.oldest_ts(name, settle=False),
                    forward=forwarder.snapshot(),
                )
            )
        return Snapshot(now, self.started_s, self.buffer.commits, devices, list(self.ports))


def health(snapshot: Snapshot, config: Config) -> Health:
    """Healthy while points are forwarded or wait by design; not when the cloud stalls or a port is absent."""
    reasons: list[str] = []
    for port in snapshot.ports:
        if port.state is not PortState.OPEN:
            detail = f": {port.last_error}" if port.last_error else ""
            reasons.append(f"port {port.path} is absent{detail}")
    stale_after = config.metrics.stale_after_s
    for device in snapshot.devices:
        queued = device.ledger["queued"]
        forward = device.forward
        if queued == 0 or forward.by_design:
            continue  # the plan or the cloud's quota answer says wait: that is not the cloud stalling
        # Points wait since the later of: the last success, the daemon's start, the oldest point's stamp.
        waiting_since = max(
            forward.last_success_wall or 0.0,
            snapshot.started_s,
            (device.oldest_ts_ms or 0) / 1000,
        )
        waited = snapshot.now_s - waiting_since
        if waited > stale_after:
            why = f" ({forward.state}: {forward.reason})" if forward.reason else f" ({forward.state})"
            reasons.append(
                f"device {device.name}: the cloud accepted nothing for {waited:.0f} s "
                f"while {queued} points are queued{why}"
            )
    return Health(not reasons, tuple(reasons))


class SnapshotCollector:
    """A prometheus-client collector over one snapshot (built per scrape, so it matches the ledger)."""

    def __init__(self, snapshot: Snapshot, config: Config) -> None:
        self._snapshot = snapshot
        self._config = config

    def collect(self) -> Iterable[Metric]:
        """Yield every metric family."""
        yield from self._devices()
        yield from self._ports()
        snapshot = self._snapshot
        commits = CounterMetricFamily(f"{PREFIX}_buffer_commits", "Group commits of the buffer writer since start")
        commits.add_metric([], snapshot.commits)
        yield commits
        healthy = GaugeMetricFamily(f"{PREFIX}_healthy", "1 when /healthz answers 200")
        healthy.add_metric([], 1.0 if health(snapshot, self._config).ok else 0.0)
        yield healthy

    def _devices(self) -> Iterable[Metric]:
        devices = self._snapshot.devices
        counters = {
            key: CounterMetricFamily(f"{PREFIX}_points_{key}", f"Points {key} (ledger)", labels=["device"])
            for key in ("received", "expired", "dropped", "rejected", "downsampled")
        }
        delivered = CounterMetricFamily(
            f"{PREFIX}_points_delivered", "Points the cloud accepted (ledger), by path", labels=["device", "path"]
        )
        queued = GaugeMetricFamily(f"{PREFIX}_points_queued", "Points in the buffer (ledger)", labels=["device"])
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "Requests to the cloud since start, by outcome", labels=["device", "outcome"]
        )
        today = GaugeMetricFamily(f"{PREFIX}_points_today", "Timestamped points spent today (UTC)", labels=["device"])
        month = GaugeMetricFamily(f"{PREFIX}_messages_this_month", "Messages spent this month (UTC)", labels=["device"])
        points_left = GaugeMetricFamily(
            f"{PREFIX}_points_budget_left", "Timestamped points left today (absent: unlimited)", labels=["device"]
        )
        messages_left = GaugeMetricFamily(
            f"{PREFIX}_messages_budget_left", "Messages left this month (absent: unlimited)", labels=["device"]
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_queued_age_seconds", "Age of the oldest queued point (0: none)", labels=["device"]
        )
        state = GaugeMetricFamily(
            f"{PREFIX}_device_state", "1 for the device's current state", labels=["device", "state"]
        )
        waiting = GaugeMetricFamily(
            f"{PREFIX}_device_waiting", "1 for why the device's points wait now", labels=["device", "reason"]
        )
        last_success = GaugeMetricFamily(
            f"{PREFIX}_last_success_timestamp_seconds", "When the cloud last accepted a request", labels=["device"]
        )
        for device in devices:
            name = [device.name]
            for key, family in counters.items():
                family.add_metric(name, device.ledger[key])
            delivered.add_metric([device.name, "live"], device.ledger["delivered_live"])
            delivered.add_metric([device.name, "history"], device.ledger["delivered_history"])
            queued.add_metric(name, device.ledger["queued"])
            for outcome, count in sorted(device.forward.outcomes.items()):
                requests.add_metric([device.name, outcome], count)
            today.add_metric(name, device.points_today)
            month.add_metric(name, device.messages_this_month)
            if device.points_left is not None:
                points_left.add_metric(name, device.points_left)
            if device.messages_left is not None:
                messages_left.add_metric(name, device.messages_left)
            age = 0.0 if device.oldest_ts_ms is None else max(0.0, self._snapshot.now_s - device.oldest_ts_ms / 1000)
            oldest.add_metric(name, age)
            for value in DEVICE_STATES:
                state.add_metric([device.name, value], 1.0 if device.forward.state == value else 0.0)
            for reason in WAIT_REASONS:
                waiting.add_metric([device.name, reason], 1.0 if device.forward.waiting == reason else 0.0)
            if device.forward.last_success_wall is not None:
                last_success.add_metric(name, device.forward.last_success_wall)
        yield from counters.values()
        yield from (delivered, queued, requests, today, month, points_left, messages_left, oldest, state, waiting)
        yield last_success

    def _ports(self) -> Iterable[Metric]:
        lines = CounterMetricFamily(f"{PREFIX}_port_lines", "Lines read, by result", labels=["port", "result"])
        bad = CounterMetricFamily(f"{PREFIX}_port_lines_bad", "Rejected lines, by reason", labels=["port", "reason"])
        ignored = CounterMetricFamily(
            f"{PREFIX}_port_lines_ignored", "Ignored lines, by reason", labels=["port", "reason"]
        )
        up = GaugeMetricFamily(f"{PREFIX}_port_open", "1 while the port is open, 0 while absent", labels=["port"])
        reconnects = CounterMetricFamily(f"{PREFIX}_port_reconnects", "Re-opens after the first open", labels=["port"])
        for port in self._snapshot.ports:
            for result, count in zip(LINE_RESULTS, (port.lines_ok, port.lines_bad, port.lines_ignored), strict=True):
                lines.add_metric([port.path, result], count)
            for reason, count in sorted(port.bad_reasons.items()):
                bad.add_metric([port.path, reason], count)
            for reason, count in sorted(port.ignored_reasons.items()):
                ignored.add_metric([port.path, reason], count)
            up.add_metric([port.path], 1.0 if port.state is PortState.OPEN else 0.0)
            reconnects.add_metric([port.path], port.reconnects)
        yield from (lines, bad, ignored, up, reconnects)


def render_metrics(snapshot: Snapshot, config: Config) -> bytes:
    """Return the Prometheus text exposition of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, config))
    return generate_latest(registry)


class MetricsServer:
    """The HTTP server of /metrics and /healthz."""

    def __init__(self, view: DaemonView) -> None:
        self._view = view
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._app = app

    async def start(self, listen: str) -> None:
        """Listen on HOST:PORT."""
        host, port = split_listen(listen)
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=STOP_GRACE_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metrics_listening", listen=listen)

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        snapshot = await self._view.snapshot()
        body = render_metrics(snapshot, self._view.config)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        result = health(await self._view.snapshot(), self._view.config)
        if result.ok:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="\n".join(result.reasons) + "\n")
