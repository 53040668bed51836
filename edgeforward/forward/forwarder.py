"""The scheduler of one device: decides what is due, runs the paths, and sleeps until the next due time.

Every step returns when it wants to run again and why the points wait until then; no exception is
used to say "wait". Deadlines are monotonic; budget keys and the moments they reset come from the wall
clock, converted to monotonic deadlines when set and again when the wall clock steps.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog

from ..backoff import Backoff
from ..blynk import BlynkClient, RateLimiter, Refusal, RefusedError, TransientError
from ..config import CloudConfig, Device, ForwardConfig, Limits, resolve_limits
from ..redact import redact
from ..store import Buffer, StoreError
from ..timebase import SYSTEM_CLOCK, Clock, mono_deadline, next_utc_day_s, next_utc_month_s
from .budget import BudgetGuard, Path, Verdict
from .context import DeviceContext
from .expiry import Expiry
from .history import HistoryPath
from .live import LivePath
from .peers import Peers
from .state import ENDED_BY_PEER_SUCCESS, DeviceSnapshot, DeviceState, DeviceTracker, WaitReason, status_meta_key

log = structlog.get_logger(__name__)

SUCCESS_RECORD_INTERVAL_S: Final = 10.0  # the time of the last success is stored at most this often
LIVE_INTERVAL_LOG_TOLERANCE: Final = 0.05  # a change of the paced live interval by more than this is logged


@dataclass(frozen=True, slots=True)
class _Block:
    """A wait that no new point ends: backoff, a cloud quota, a parked token, a store failure."""

    until_mono: float
    reason: WaitReason
    until_wall: float | None = None  # set when the deadline is a wall-clock moment (re-derived on a clock step)


@dataclass(frozen=True, slots=True)
class _Next:
    """What a step decided: sleep until when, why points wait, and whether new points may wake it."""

    until_mono: float
    waiting: WaitReason | None
    points_wake: bool


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
        limits: Limits | None = None,
        clock: Clock = SYSTEM_CLOCK,
        peers: Peers | None = None,
    ) -> None:
        self.device = device
        self._buffer = buffer
        self._session = session
        self._cloud = cloud
        self._forward = forward
        self._clock = clock
        self._peers = peers or Peers()
        self.guard = BudgetGuard(limits or resolve_limits(cloud, device), forward)
        self.tracker = DeviceTracker(device.name, clock)
        self._log = log.bind(device=device.name)
        self._wake_event: asyncio.Event | None = None
        self._points_wake = True
        self._dirty: set[int] = set()
        self._next_live = -math.inf
        self._next_history = -math.inf
        self._history_block: _Block | None = None
        self._block: _Block | None = None
        self._last_success_recorded = -math.inf
        self._requests_per_round = 1
        self._maybe_queued = True  # False once a round found nothing to send and no point came since
        self._ctx: DeviceContext | None = None
        self._history: HistoryPath | None = None

    # what others see and do ---------------------------------------------------------------------

    def snapshot(self) -> DeviceSnapshot:
        """The device as it stands now (what notify, metrics, status and the demo read)."""
        return self.tracker.snapshot()

    @property
    def state(self) -> DeviceState:
        """The contract state."""
        return self.tracker.state

    @property
    def reason(self) -> str | None:
        """Why the device is in its state (None when all is well)."""
        return self.tracker.reason

    def notify(self, pins: frozenset[int]) -> None:
        """Points of these pins were committed."""
        self._dirty |= pins
        self._maybe_queued = True
        if self._points_wake:
            self._wake()

    def poke(self) -> None:
        """Another device on this server got through: a wait on backoff ends now."""
        block = self._block
        if block is not None and block.reason in ENDED_BY_PEER_SUCCESS:
            self._block = None
            self._wake()

    def clock_stepped(self) -> None:
        """The wall clock stepped: deadlines derived from wall-clock moments are derived again."""
        self._block = _rederive(self._block, self._clock)
        self._history_block = _rederive(self._history_block, self._clock)
        self._wake()

    def _wake(self) -> None:
        if self._wake_event is not None:
            self._wake_event.set()

    # the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forward until cancelled."""
        self._wake_event = asyncio.Event()
        ctx = await self._context()
        self._ctx = ctx
        expiry = Expiry(ctx)
        history = HistoryPath(ctx, expiry)
        self._history = history
        live = LivePath(ctx)
        self._dirty |= set(await self._buffer.pins_queued(self.device.name))
        history.horizon = await self._buffer.max_id()
        backoff = Backoff(self._forward.retry_initial_s, self._forward.retry_max_s)
        self._peers.join(ctx.client.server, self.device.name, self.poke)
        try:
            while True:
                self._wake_event.clear()
                self.tracker.working()
                step = await self._step(ctx, live, history, expiry, backoff)
                self.tracker.sleeping(step.until_mono, step.waiting, step.until_mono)
                self._points_wake = step.points_wake
                await self._persist_status()
                await self._clock.sleep_until(step.until_mono, self._wake_event)
        finally:
            self._peers.leave(self.device.name)

    async def _context(self) -> DeviceContext:
        configured = self._cloud.server
        server = await self._buffer.remembered_server(self.device.token, configured=configured) or configured
        client = BlynkClient(
            self._session,
            server,
            self.device.token,
            configured_server=configured,
            timeout_s=self._cloud.timeout_s,
            limiter=RateLimiter(self.guard.limits.requests_per_second, clock=self._clock),
            on_redirect=self._remember_server,
            on_attempt=self._spend,
            on_refund=self._refund,
        )
        return DeviceContext(
            device=self.device,
            buffer=self._buffer,
            client=client,
            guard=self.guard,
            tracker=self.tracker,
            clock=self._clock,
            forward=self._forward,
            succeeded=self._succeeded,
            log=self._log,
        )

    async def _step(
        self, ctx: DeviceContext, live: LivePath, history: HistoryPath, expiry: Expiry, backoff: Backoff
    ) -> _Next:
        now = self._clock.monotonic()
        block = self._block
        if block is not None and block.until_mono > now:
            return _Next(block.until_mono, block.reason, points_wake=False)
        self._block = None
        live_enabled = self.guard.live_enabled
        try:
            await expiry.run_if_due()
            live_due = live_enabled and bool(self._dirty) and now >= self._next_live
            history_due = now >= self._history_due()
            if live_due or history_due:
                # Other processes may spend too (check-config --online): the buffer is the record.
                self.guard.record(await self._buffer.budget(self.device.name, self._clock.wall()))
            if live_due:
                await self._live_tick(live, history, now)
            if not live_enabled and self._dirty:
                history.horizon = await self._buffer.max_id()
                self._dirty.clear()
            if history_due:
                await self._history_round(history, live_enabled)
            backoff.reset()
        except TransientError as exc:
            ctx.count("transient")
            delay = exc.retry_after_s if exc.retry_after_s is not None else backoff.next_delay()
            reason = WaitReason.RETRY_AFTER if exc.retry_after_s is not None else WaitReason.BACKOFF
            await self._go_offline(str(exc), delay, backoff.attempt)
            self._block = _Block(now + delay, reason)
        except RefusedError as exc:
            ctx.count(f"refused_{exc.refusal.value}")
            await self._refused(exc, now)
        except StoreError as exc:
            delay = backoff.next_delay()
            self._log.error("forward_store_failed", error=redact(str(exc)), retry_s=round(delay, 1))
            self._block = _Block(now + delay, WaitReason.STORE)
        if self._block is not None:
            # Whatever failed, history is due again the moment the wait ends: a reconnect drains the backlog.
            self._next_history = min(self._next_history, self._block.until_mono)
            return _Next(self._block.until_mono, self._block.reason, points_wake=False)
        self._update_intervals()
        verdict = self.guard.check(Path.HISTORY, self._clock.wall())
        if not verdict.allowed:
            self._history_blocked(verdict)  # spent by the round, or by the live path meanwhile
        live_at = self._next_live if live_enabled and self._dirty else math.inf
        history_at = self._history_due()
        until = min(live_at, history_at, history.next_recheck())
        blocked = self._history_block
        # The binding wait names the reason: the budget when it ends after the paced round would come.
        by_budget = blocked is not None and blocked.until_mono > now and blocked.until_mono >= self._next_history
        waiting: WaitReason | None = blocked.reason if by_budget and blocked is not None else WaitReason.PACING
        if not self._maybe_queued:
            waiting = None  # nothing is queued for the cloud: nothing waits
        return _Next(until, waiting, points_wake=True)

    def _history_due(self) -> float:
        block = self._history_block
        return max(self._next_history, block.until_mono if block is not None else -math.inf)

    async def _live_tick(self, live: LivePath, history: HistoryPath, now: float) -> None:
        pins = frozenset(self._dirty)
        self._dirty.clear()
        horizon = await self._buffer.max_id()
        sent, verdict = await live.tick(pins, history.parked())
        history.horizon = horizon
        wall = self._clock.wall()
        if not verdict.allowed:
            assert verdict.until_wall is not None
            self._next_live = mono_deadline(self._clock, verdict.until_wall)
            self._dirty |= pins  # nothing was sent: the values wait for the budget (or go by history)
        elif sent:
            self._next_live = now + self.guard.live_interval_s(wall)
        else:
            # A tick that found nothing fresh and changed spent no message: the next may come sooner.
            self._next_live = now + self._forward.live_interval_s

    async def _history_round(self, history: HistoryPath, live_enabled: bool) -> None:
        if not self._dirty:
            # Nothing new awaits a live decision: points added by other processes (import, retry) are history's.
            history.horizon = await self._buffer.max_id()

        def live_due() -> float:
            return self._next_live if live_enabled and self._dirty else math.inf

        started = self._clock.monotonic()
        result = await history.round(live_due())
        self._requests_per_round = result.requests
        self._maybe_queued = result.requests > 0 or bool(self._dirty)
        if not result.verdict.allowed:
            self._history_blocked(result.verdict)
        elif self._history_block is not None:
            self._history_block = None
        if result.completed:
            # Stay due: a cheap look every interval finds points that other processes queued.
            self._next_history = started + self.guard.history_interval_s(self._clock.wall(), result.requests)

    def _history_blocked(self, verdict: Verdict) -> None:
        assert verdict.reason is not None and verdict.until_wall is not None
        block = _Block(mono_deadline(self._clock, verdict.until_wall), verdict.reason, verdict.until_wall)
        previous = self._history_block
        if previous is None or previous.reason is not block.reason or block.until_mono > previous.until_mono + 1:
            self._log.info(
                "forward_waiting",
                reason=str(verdict.reason),
                path="history",
                seconds=round(block.until_mono - self._clock.monotonic()),
            )
        self._history_block = block

    def _update_intervals(self) -> None:
        wall = self._clock.wall()
        tracker = self.tracker
        if self.guard.live_enabled:
            interval = self.guard.live_interval_s(wall)
            previous = tracker.live_interval_s
            if previous is None or not math.isclose(interval, previous, rel_tol=LIVE_INTERVAL_LOG_TOLERANCE):
                self._log.info("live_interval_changed", seconds=round(interval, 1))
            tracker.live_interval_s = interval
        tracker.history_interval_s = self.guard.history_interval_s(wall, self._requests_per_round)

    # answers ------------------------------------------------------------------------------------

    async def _refused(self, exc: RefusedError, now: float) -> None:
        if exc.refusal is Refusal.INVALID_TOKEN:
            if self.tracker.state is not DeviceState.PARKED:
                self._log.error("device_parked", reason=exc.message, recheck_s=self._forward.park_recheck_s)
            await self._set_state(DeviceState.PARKED, exc.message)
            self._block = _Block(now + self._forward.park_recheck_s, WaitReason.PARKED)
        elif exc.refusal is Refusal.QUOTA:
            wall = self._clock.wall()
            until = next_utc_month_s(wall) if "month" in exc.message.lower() else next_utc_day_s(wall)
            self._log.warning("cloud_quota_reached", reason=exc.message, seconds=round(until - wall))
            await self._set_state(DeviceState.ONLINE, f"quota: {exc.message}")
            self._block = _Block(mono_deadline(self._clock, until), WaitReason.QUOTA, until)
        else:
            # Unknown refusals are retried slowly; the history path bisects a batch that keeps failing.
            self._log.warning("request_refused", reason=exc.message, status=exc.status)
            await self._set_state(DeviceState.ONLINE, f"refused: {exc.message}")
            self._block = _Block(now + self._forward.retry_max_s, WaitReason.REFUSED)

    async def _succeeded(self) -> None:
        wall, now = self._clock.wall(), self._clock.monotonic()
        tracker = self.tracker
        tracker.outcomes["ok"] += 1
        tracker.last_success_wall = wall
        tracker.last_success_mono = now
        tracker.progressed()
        if tracker.state is not DeviceState.ONLINE or tracker.reason is not None:
            if tracker.state is DeviceState.OFFLINE:
                self._log.info("cloud_reachable_again")
                self._next_history = now  # a reconnect drains the backlog at once
            await self._set_state(DeviceState.ONLINE, None)
            self._last_success_recorded = now
        elif now - self._last_success_recorded >= SUCCESS_RECORD_INTERVAL_S:
            await self._record_state(success_ms=int(wall * 1000))
            self._last_success_recorded = now
        if self._ctx is not None:
            self._peers.succeeded(self._ctx.client.server, self.device.name)

    async def _go_offline(self, reason: str, delay: float, attempt: int) -> None:
        if self.tracker.state is not DeviceState.OFFLINE:
            self._log.warning("cloud_unreachable", reason=reason, retry_s=round(delay, 1))
        else:
            self._log.debug("cloud_unreachable", reason=reason, retry_s=round(delay, 1), attempt=attempt)
        await self._set_state(DeviceState.OFFLINE, reason)

    # bookkeeping in the buffer ------------------------------------------------------------------

    async def _spend(self, points: int) -> None:
        """Count a request before it is sent; if this cannot be recorded, the request is not sent."""
        wall = self._clock.wall()
        self.tracker.last_attempt_wall = wall
        self.tracker.progressed()
        self.guard.record(await self._buffer.spend(self.device.name, wall, messages=1, points=points))

    async def _refund(self, points: int) -> None:
        """Give back the points of a request the cloud answered with an error (it imported none)."""
        self.guard.record(await self._buffer.spend(self.device.name, self._clock.wall(), messages=0, points=-points))

    async def _set_state(self, state: DeviceState, reason: str | None) -> None:
        if self.tracker.set_state(state, reason):
            success = int(self._clock.wall() * 1000) if state is DeviceState.ONLINE and reason is None else None
            await self._record_state(success_ms=success)

    async def _record_state(self, *, success_ms: int | None) -> None:
        try:
            await self._buffer.set_device_state(
                self.device.name, self.tracker.state, self.tracker.reason, success_ms=success_ms
            )
        except StoreError as exc:
            # The state is shown by `status`; forwarding does not depend on it. Written again on the next change.
            self._log.warning("device_state_not_recorded", error=redact(str(exc)))

    async def _persist_status(self) -> None:
        fields = self.tracker.status_to_persist()
        if fields is None:
            return
        try:
            await self._buffer.set_meta({status_meta_key(self.device.name): json.dumps(fields, sort_keys=True)})
        except StoreError as exc:
            self.tracker.forget_persisted()
            self._log.warning("forward_status_not_recorded", error=redact(str(exc)))

    async def _remember_server(self, server: str) -> None:
        self._log.info("cloud_redirected", server=server)
        self._peers.join(server, self.device.name, self.poke)
        await self._buffer.remember_server(self.device.token, server)


def _rederive(block: _Block | None, clock: Clock) -> _Block | None:
    if block is None or block.until_wall is None:
        return block
    return _Block(mono_deadline(clock, block.until_wall), block.reason, block.until_wall)
