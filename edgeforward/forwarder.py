"""What to send to the cloud when: the live path, the history path, budgets, backoff and parking."""

from __future__ import annotations

import asyncio
import calendar
import collections
import contextlib
import enum
import functools
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import structlog

from .blynk import BlynkClient, RateLimiter, Refusal, RefusedError, TransientError
from .config import CloudConfig, Device, ForwardConfig
from .planner import (
    PinBacklog,
    allocate_points,
    downsample_keep,
    history_interval_s,
    history_messages_left,
    live_interval_s,
)
from .points import value_from_json
from .store import Budget, Buffer, QueuedPoint, utc_day, utc_month

log = structlog.get_logger(__name__)

LIVE_FRESH_MIN_S = 5.0
LIVE_QUERY_MAX_BYTES = 4000
EXPIRE_INTERVAL_S = 60.0
EXPIRE_MARGIN_S = 600.0
PARK_RECHECK_S = 300.0
PIN_PARK_RECHECK_S = 600.0
UNKNOWN_REFUSALS_BEFORE_BISECTION = 3
UNKNOWN_REFUSALS_BEFORE_BISECTION_ALONE = 10
BODY_MARGIN_BYTES = 256
THIN_CHUNK_POINTS = 50_000
TURN_BATCHES = 8
SUCCESS_RECORD_INTERVAL_S = 10.0


class DeviceState(enum.StrEnum):
    """Where a device stands with the cloud."""

    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"
    PARKED = "parked"


class _Wait(Exception):
    """Nothing can be sent until `until_s` (a budget is spent or the cloud asked us to wait)."""

    def __init__(self, until_s: float, reason: str, *, history_only: bool = False) -> None:
        super().__init__(reason)
        self.until_s = until_s
        self.reason = reason
        self.history_only = history_only


class Backoff:
    """Capped exponential backoff with jitter."""

    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self._initial = initial_s
        self._maximum = maximum_s
        self.attempt = 0

    def next(self) -> float:
        """Return the next delay and advance."""
        delay = min(self._maximum, self._initial * 2.0 ** min(self.attempt, 30))
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """Start again from the initial delay."""
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class HistoryBatch:
    """Points of one pin that fit one POST, and its body."""

    points: Sequence[QueuedPoint]
    body: bytes


def build_history_batch(points: Sequence[QueuedPoint], max_bytes: int) -> HistoryBatch:
    """Take points (oldest first) while the JSON body stays within max_bytes."""
    parts: list[str] = []
    size = 2
    for point in points:
        entry = f"[{point.ts_ms},{point.value_json}]"
        if parts and size + len(entry) + 1 > max_bytes:
            break
        parts.append(entry)
        size += len(entry) + 1
    return HistoryBatch(points[: len(parts)], ("[" + ",".join(parts) + "]").encode())


def next_utc_day_s(now_s: float) -> float:
    """Return the Unix time of the next UTC midnight."""
    return (math.floor(now_s / 86400) + 1) * 86400.0


def next_utc_month_s(now_s: float) -> float:
    """Return the Unix time of the first moment of next UTC month."""
    now = time.gmtime(now_s)
    year, month = (now.tm_year + 1, 1) if now.tm_mon == 12 else (now.tm_year, now.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _numeric(value_json: str) -> float:
    """A number standing for a stored value when thinning (non-numbers all look alike)."""
    try:
        value = float(value_json)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


class Forwarder:
    """Forwards one device's queued points: live values by multi-pin GET, the rest by per-pin POST."""

    def __init__(
        self,
        device: Device,
        buffer: Buffer,
        session: aiohttp.ClientSession,
        cloud: CloudConfig,
        forward: ForwardConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device = device
        self._buffer = buffer
        self._session = session
        self._cloud = cloud
        self._limits = device.limits or cloud.limits
        self._forward = forward
        self._clock = clock
        self._wake = asyncio.Event()
        self._dirty: set[int] = set()
        self._horizon = 0
        self._live_excluded: set[int] = set()
        self._parked_pins: dict[int, tuple[float, str]] = {}
        self._batch_cap = self._limits.batch_max_points
        self._unknown_refusals: dict[tuple[int, int, int], tuple[int, float]] = {}
        self._history_blocked_until = 0.0
        self._round_requests = 1
        self._deliveries: list[asyncio.Future[int]] = []
        self._last_live: dict[int, str] = {}
        self.live_interval_s = forward.live_interval_s
        self._budget: Budget | None = None
        self._next_expire = 0.0
        self._last_success_recorded = 0.0
        self.state = DeviceState.UNKNOWN
        self.reason: str | None = None
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.last_success_s: float | None = None
        self.last_attempt_s: float | None = None
        self._log = log.bind(device=device.name)
        self._client: BlynkClient | None = None

    def notify(self, pins: frozenset[int]) -> None:
        """Tell the forwarder that points of these pins were committed."""
        self._dirty |= pins
        self._wake.set()

    async def run(self) -> None:
        """Forward until cancelled."""
        server = await self._buffer.remembered_server(self.device.token) or self._cloud.server
        self._client = BlynkClient(
            self._session,
            server,
            self.device.token,
            timeout_s=self._cloud.timeout_s,
            limiter=RateLimiter(self._limits.requests_per_second),
            on_redirect=self._remember_server,
            on_attempt=self._spend,
            on_refund=self._refund,
        )
        self._budget = await self._buffer.budget(self.device.name, self._clock())
        self._dirty |= set(await self._buffer.pins_queued(self.device.name))
        self._horizon = await self._buffer.max_id()
        backoff = Backoff(self._forward.retry_initial_s, self._forward.retry_max_s)
        live = self._forward.live_interval_s > 0
        next_live = 0.0
        next_history = 0.0
        while True:
            self._wake.clear()
            now = self._clock()
            try:
                await self._expire_if_due(now)
                if live and self._dirty and now >= next_live:
                    # A tick that found nothing fresh and changed spent no message: the next may come sooner.
                    paced = min(self._live_interval(now), next_utc_month_s(now) - now)
                    next_live = now + self._forward.live_interval_s
                    if await self._live_tick(now):
                        next_live = now + paced
                if not live and self._dirty:
                    self._horizon = await self._buffer.max_id()
                    self._dirty.clear()
                if now >= max(next_history, self._history_blocked_until) and await self._history_round(
                    next_live if live else math.inf
                ):
                    # Stay due: a cheap look every interval finds points that other processes queued.
                    next_history = now + self._history_interval(now)
                backoff.reset()
            except TransientError as exc:
                self.outcomes["transient"] += 1
                await self._go_offline(str(exc), exc.retry_after_s or backoff.next(), backoff.attempt)
                continue
            except RefusedError as exc:
                self.outcomes[f"refused_{exc.refusal.value}"] += 1
                if exc.refusal is Refusal.INVALID_TOKEN:
                    await self._park(exc.message)
                elif exc.refusal is Refusal.QUOTA:
                    await self._wait_for_quota(exc.message)
                else:
                    # Unknown refusals are retried slowly; _history_refused bisects a batch that keeps failing.
                    self._log.warning("request_refused", reason=exc.message, status=exc.status)
                    await self._set_state(DeviceState.ONLINE, f"refused: {exc.message}")
                    await self._sleep(self._forward.retry_max_s)
                continue
            except _Wait as wait:
                if wait.until_s > self._history_blocked_until:
                    self._log.info("forward_waiting", reason=wait.reason, seconds=round(wait.until_s - self._clock()))
                if not wait.history_only:
                    await self._sleep_until(wait.until_s, wakeable=False)
                    continue
                self._history_blocked_until = wait.until_s
            wake_at = min(
                next_live if (live and self._dirty) else math.inf,
                max(next_history, self._history_blocked_until),
                self._next_parked_pin(),
            )
            await self._sleep_until(wake_at, wakeable=True)

    # live path ----------------------------------------------------------------------------------

    async def _live_tick(self, now: float) -> bool:
        """Send the newest fresh, changed value of each dirty pin; return whether anything was sent."""
        horizon = await self._buffer.max_id()
        fresh_after_ms = int((now - max(2 * self._forward.live_interval_s, LIVE_FRESH_MIN_S)) * 1000)
        scalars: list[QueuedPoint] = []
        locations: list[QueuedPoint] = []
        for pin in sorted(self._dirty):
            if pin in self._parked_pins:
                continue
            newest = await self._buffer.newest(self.device.name, pin)
            if newest is None or newest.ts_ms < fresh_after_ms or newest.id in self._live_excluded:
                continue
            if not self._changed(pin, newest.value_json):
                continue  # the dashboard already shows it; the point itself goes by history
            (locations if newest.value_json.startswith("[") else scalars).append(newest)
        self._dirty.clear()
        self._horizon = horizon
        client = self._client
        assert client is not None
        scalars = self._fit_live_query(scalars)
        if scalars:
            values = [(p.pin, value_from_json(p.value_json)) for p in scalars]
            await self._send_live(scalars, lambda: client.live(values))
        for point in locations:
            location = value_from_json(point.value_json)
            assert isinstance(location, tuple)
            await self._send_live([point], functools.partial(client.update_location, point.pin, location))
        return bool(scalars or locations)

    def _changed(self, pin: int, value_json: str) -> bool:
        """Whether a pin's newest value differs from what the live path last sent by more than its deadband."""
        last = self._last_live.get(pin)
        if last is None:
            return True
        if last == value_json:
            return False
        spec = self.device.pins.get(pin)
        deadband = spec.deadband if spec is not None else None
        if deadband is None:
            return True
        try:
            return abs(float(value_json) - float(last)) > deadband
        except ValueError:
            return True

    def _fit_live_query(self, points: list[QueuedPoint]) -> list[QueuedPoint]:
        assert self._client is not None
        fitted: list[QueuedPoint] = []
        for point in points:
            candidate = [*fitted, point]
            query = self._client.live_query([(p.pin, value_from_json(p.value_json)) for p in candidate])
            if len(query) > LIVE_QUERY_MAX_BYTES:
                continue
            fitted = candidate
        return fitted

    async def _send_live(self, points: list[QueuedPoint], send: Callable[[], Awaitable[None]]) -> None:
        self._check_messages(live=True)
        try:
            await send()
        except RefusedError as exc:
            if exc.refusal in (Refusal.INVALID_TOKEN, Refusal.QUOTA):
                raise
            self.outcomes[f"refused_{exc.refusal.value}"] += 1
            # The live GET cannot say which value it refused: the history path sorts it out per pin.
            self._live_excluded.update(p.id for p in points)
            self._log.info("live_refused", reason=exc.message, pins=[p.pin for p in points])
            return
        await self._buffer.deliver(self.device.name, [p.id for p in points], "live")
        self._last_live.update((p.pin, p.value_json) for p in points)
        await self._succeeded()

    # history path -------------------------------------------------------------------------------

    async def _history_round(self, live_due: float) -> bool:
        """Send history batches (pins in turn, oldest first); False if stopped early for a live tick."""
        if not self._dirty:
            # Nothing new awaits a live decision: points added by other processes (import, retry) are history's.
            self._horizon = await self._buffer.max_id()
        pins = [p for p in await self._buffer.pins_queued(self.device.name) if p not in self._parked_pins]
        self._round_requests = len(pins)
        allocation = await self._allocate(pins)
        while pins:
            for pin in list(pins):
                if self._dirty and self._clock() >= live_due:
                    return False
                allowed = None if allocation is None else allocation[pin]
                handled = await self._pin_turn(pin, allowed) if allowed is None or allowed > 0 else 0
                if allocation is not None:
                    allocation[pin] -= handled
                if handled == 0 or pin in self._parked_pins:
                    pins.remove(pin)
        return True

    async def _pin_turn(self, pin: int, allowed: int | None) -> int:
        """Send up to TURN_BATCHES of a pin's batches, reading the next while one is in flight."""
        try:
            return await self._pin_batches(pin, allowed)
        finally:
            await self._flush_deliveries()

    async def _flush_deliveries(self) -> None:
        """Wait for the deliveries still riding along with later commits; needed before anything re-reads."""
        deliveries, self._deliveries = self._deliveries, []
        if deliveries:
            await asyncio.gather(*deliveries)

    async def _pin_batches(self, pin: int, allowed: int | None) -> int:
        def room(used: int) -> int:
            return self._batch_cap if allowed is None else min(self._batch_cap, allowed - used)

        handled = 0
        points = await self._buffer.oldest(self.device.name, pin, room(0), max_id=self._horizon)
        for _ in range(TURN_BATCHES):
            if not points:
                break
            now = self._clock()
            if points[0].ts_ms < self._expiry_cutoff_ms(now):
                await self._flush_deliveries()
                await self._expire(now)
                return handled + 1
            batch = build_history_batch(points, self._limits.max_request_bytes - BODY_MARGIN_BYTES)
            following = room(handled + len(batch.points))
            prefetch = asyncio.ensure_future(
                self._buffer.oldest(
                    self.device.name,
                    pin,
                    following,
                    max_id=self._horizon,
                    after=(batch.points[-1].ts_ms, batch.points[-1].id),
                )
            )
            try:
                await self._send_batch(pin, batch.points, batch=batch)
            except BaseException:
                prefetch.cancel()
                raise
            points = await prefetch
            handled += len(batch.points)
            if pin in self._parked_pins or following <= 0:
                break
        return handled

    async def _allocate(self, pins: list[int]) -> dict[int, int] | None:
        """Share today's points among pins (urgent first, then by priority); None when points are unlimited."""
        now = self._clock()
        room = self._points_room(now)
        if room is None:
            return None
        urgent_before = int((next_utc_day_s(now) - self._limits.max_age_days * 86400 + EXPIRE_MARGIN_S) * 1000)
        backlogs = []
        for pin in pins:
            spec = self.device.pins.get(pin)
            backlogs.append(
                PinBacklog(
                    pin,
                    await self._buffer.count_queued(self.device.name, pin, max_id=self._horizon),
                    await self._buffer.count_queued(
                        self.device.name, pin, max_id=self._horizon, before_ts=urgent_before
                    ),
                    spec.priority if spec is not None else 1.0,
                )
            )
        allocation = allocate_points(backlogs, room)
        if self._forward.over_quota == "downsample":
            for backlog in backlogs:
                if backlog.urgent > allocation[backlog.pin]:
                    await self._thin(backlog.pin, backlog.urgent, allocation[backlog.pin])
        return allocation

    async def _thin(self, pin: int, urgent: int, keep: int) -> None:
        """Thin the points that would expire before the budget reaches them, keeping each bucket's extremes."""
        ratio = keep / urgent
        thinned = 0
        remaining = urgent
        cursor: tuple[int, int] | None = None
        while remaining > 0:
            chunk = await self._buffer.oldest(
                self.device.name, pin, min(THIN_CHUNK_POINTS, remaining), max_id=self._horizon, after=cursor
            )
            if not chunk:
                break
            values = [_numeric(p.value_json) for p in chunk]
            kept = set(downsample_keep([p.ts_ms for p in chunk], values, max(1, math.ceil(len(chunk) * ratio))))
            thinned += await self._buffer.thin(self.device.name, [p.id for i, p in enumerate(chunk) if i not in kept])
            remaining -= len(chunk)
            cursor = (chunk[-1].ts_ms, chunk[-1].id)
        if thinned:
            self._log.warning("points_downsampled", pin=f"v{pin}", points=thinned, kept_ratio=round(ratio, 3))

    async def _send_batch(
        self,
        pin: int,
        points: Sequence[QueuedPoint],
        *,
        bisecting: bool = False,
        batch: HistoryBatch | None = None,
    ) -> None:
        assert self._client is not None
        self._check_messages()
        self._check_points(len(points))
        if batch is None:
            batch = build_history_batch(points, self._limits.max_request_bytes - BODY_MARGIN_BYTES)
        try:
            await self._client.history(pin, batch.body, len(points))
        except RefusedError as exc:
            self.outcomes[f"refused_{exc.refusal.value}"] += 1
            await self._history_refused(pin, points, exc, bisecting=bisecting)
            return
        self._deliveries.append(
            asyncio.ensure_future(self._buffer.deliver(self.device.name, [p.id for p in points], "history"))
        )
        await self._succeeded()

    async def _history_refused(
        self, pin: int, points: Sequence[QueuedPoint], exc: RefusedError, *, bisecting: bool
    ) -> None:
        refusal = exc.refusal
        if refusal is Refusal.UNKNOWN and not bisecting:
            key = (pin, points[0].id, len(points))
            failures, first_s = self._unknown_refusals.get(key, (0, self._clock()))
            self._unknown_refusals[key] = (failures + 1, first_s)
            # Bisect sooner when other requests succeed meanwhile: then it is this batch, not the account.
            others_ok = self.last_success_s is not None and self.last_success_s > first_s
            needed = UNKNOWN_REFUSALS_BEFORE_BISECTION if others_ok else UNKNOWN_REFUSALS_BEFORE_BISECTION_ALONE
            if failures + 1 < needed:
                raise exc
            del self._unknown_refusals[key]
            self._log.warning("batch_keeps_failing", pin=f"v{pin}", points=len(points), reason=exc.message)
        if refusal is Refusal.TOO_LARGE and len(points) > 1:
            self._batch_cap = max(1, len(points) // 2)
            self._log.warning("batch_too_large", points=len(points), new_cap=self._batch_cap)
            return
        if refusal in (Refusal.VALUE, Refusal.UNKNOWN, Refusal.TOO_LARGE):
            if len(points) == 1:
                await self._buffer.reject(self.device.name, points, exc.message)
                self._log.warning("point_rejected", pin=f"v{pin}", ts=points[0].ts_ms, reason=exc.message)
                return
            # Poison isolation: halve until the refused points stand alone; the rest is delivered.
            middle = len(points) // 2
            await self._send_batch(pin, points[:middle], bisecting=True)
            await self._send_batch(pin, points[middle:], bisecting=True)
            return
        if refusal is Refusal.PIN:
            self._parked_pins[pin] = (self._clock() + PIN_PARK_RECHECK_S, exc.message)
            self._log.warning("pin_parked", pin=f"v{pin}", reason=exc.message, recheck_s=PIN_PARK_RECHECK_S)
            return
        raise exc

    # budgets ------------------------------------------------------------------------------------

    async def _spend(self, points: int) -> None:
        self.last_attempt_s = self._clock()
        self._budget = await self._buffer.spend(self.device.name, self._clock(), messages=1, points=points)

    async def _refund(self, points: int) -> None:
        """Give back the points of a request the cloud answered with an error (it imported none)."""
        self._budget = await self._buffer.spend(self.device.name, self._clock(), messages=0, points=-points)

    def _current_budget(self, now: float) -> Budget:
        budget = self._budget or Budget(utc_day(now), 0, utc_month(now), 0)
        day, month = utc_day(now), utc_month(now)
        return Budget(
            day,
            budget.points_day if budget.day == day else 0,
            month,
            budget.messages_month if budget.month == month else 0,
        )

    def _messages_left(self, now: float) -> int | None:
        limit = self._limits.messages_per_month
        if not limit:
            return None
        return max(0, limit - self._current_budget(now).messages_month)

    def _live_interval(self, now: float) -> float:
        """The live interval in effect: never faster than configured, slower when messages run short."""
        interval = live_interval_s(
            self._forward.live_interval_s,
            self._messages_left(now),
            next_utc_month_s(now) - now,
            self._forward.live_share,
        )
        if not math.isclose(interval, self.live_interval_s, rel_tol=0.05):
            self._log.info("live_interval_changed", seconds=None if math.isinf(interval) else round(interval, 1))
            self.live_interval_s = interval
        return interval

    def _history_interval(self, now: float) -> float:
        """The pause between history rounds in effect: slower when the month's messages run short."""
        left = history_messages_left(
            self._messages_left(now), self._forward.live_share, self._forward.live_interval_s > 0
        )
        return history_interval_s(
            self._forward.history_interval_s, left, next_utc_month_s(now) - now, self._round_requests
        )

    def _check_messages(self, *, live: bool = False) -> None:
        now = self._clock()
        left = self._messages_left(now)
        if not live:
            left = history_messages_left(left, self._forward.live_share, self._forward.live_interval_s > 0)
        if left is not None and left < 1:
            raise _Wait(next_utc_month_s(now), "monthly messages spent", history_only=not live)

    def _points_room(self, now: float) -> int | None:
        limit = self._limits.points_per_day
        if not limit:
            return None
        room = limit - self._current_budget(now).points_day
        if room <= 0:
            raise _Wait(next_utc_day_s(now), "daily points spent", history_only=True)
        return room

    def _check_points(self, count: int) -> None:
        room = self._points_room(self._clock())
        if room is not None and room < count:
            raise _Wait(next_utc_day_s(self._clock()), "daily points spent", history_only=True)

    # expiry -------------------------------------------------------------------------------------

    def _expiry_cutoff_ms(self, now: float) -> int:
        return int((now - self._limits.max_age_days * 86400 + EXPIRE_MARGIN_S) * 1000)

    async def _expire_if_due(self, now: float) -> None:
        if now >= self._next_expire:
            await self._expire(now)

    async def _expire(self, now: float) -> None:
        self._next_expire = now + EXPIRE_INTERVAL_S
        cutoff = self._expiry_cutoff_ms(now)
        expired = 0
        for pin in await self._buffer.pins_queued(self.device.name):
            expired += await self._buffer.expire(self.device.name, cutoff, pin=pin)
        if expired:
            self._log.warning("points_expired", points=expired, max_age_days=self._limits.max_age_days)

    # state --------------------------------------------------------------------------------------

    async def _succeeded(self) -> None:
        now = self._clock()
        self.outcomes["ok"] += 1
        self.last_success_s = now
        if self.state is not DeviceState.ONLINE or self.reason is not None:
            if self.state is DeviceState.OFFLINE:
                self._log.info("cloud_reachable_again")
            await self._set_state(DeviceState.ONLINE, None)
        elif now - self._last_success_recorded >= SUCCESS_RECORD_INTERVAL_S:
            await self._buffer.set_device_state(self.device.name, self.state, self.reason, success_ms=int(now * 1000))
        else:
            return
        self._last_success_recorded = now

    async def _set_state(self, state: DeviceState, reason: str | None) -> None:
        if state is self.state and reason == self.reason:
            return
        self.state, self.reason = state, reason
        success = int(self._clock() * 1000) if state is DeviceState.ONLINE and reason is None else None
        await self._buffer.set_device_state(self.device.name, state, reason, success_ms=success)

    async def _go_offline(self, reason: str, delay: float, attempt: int) -> None:
        if self.state is not DeviceState.OFFLINE:
            self._log.warning("cloud_unreachable", reason=reason, retry_s=round(delay, 1))
        else:
            self._log.debug("cloud_unreachable", reason=reason, retry_s=round(delay, 1), attempt=attempt)
        await self._set_state(DeviceState.OFFLINE, reason)
        await self._sleep(delay)

    async def _wait_for_quota(self, message: str) -> None:
        now = self._clock()
        until = next_utc_month_s(now) if "month" in message.lower() else next_utc_day_s(now)
        self._log.warning("cloud_quota_reached", reason=message, seconds=round(until - now))
        await self._set_state(DeviceState.ONLINE, f"quota: {message}")
        await self._sleep_until(until, wakeable=False)

    async def _park(self, reason: str) -> None:
        if self.state is not DeviceState.PARKED:
            self._log.error("device_parked", reason=reason, recheck_s=self._forward.park_recheck_s)
        await self._set_state(DeviceState.PARKED, reason)
        await self._sleep(self._forward.park_recheck_s)

    async def _remember_server(self, server: str) -> None:
        self._log.info("cloud_redirected", server=server)
        await self._buffer.remember_server(self.device.token, server)

    def _next_parked_pin(self) -> float:
        now = self._clock()
        for pin, (until, _) in list(self._parked_pins.items()):
            if until <= now:
                del self._parked_pins[pin]
        return min((until for until, _ in self._parked_pins.values()), default=math.inf)

    @property
    def parked_pins(self) -> dict[int, str]:
        """Pins refused by the cloud, with the reason."""
        return {pin: reason for pin, (_, reason) in self._parked_pins.items()}

    # waiting ------------------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def _sleep_until(self, when: float, *, wakeable: bool) -> None:
        delay = when - self._clock()
        if delay <= 0:
            return
        if not wakeable:
            await asyncio.sleep(delay)
            return
        timeout = None if math.isinf(delay) else delay
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
