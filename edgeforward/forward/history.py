"""The history path: every other point, per pin, oldest first, in timestamped POST batches.

A batch the cloud refuses for a value is halved until the refused points stand alone (they go to the
dead letters, the rest is delivered); a pin the cloud does not know is parked; "too much data" halves
the batch size; an unknown refusal is retried slowly and bisected when the same batch keeps failing.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..blynk import Refusal, RefusedError
from ..store import QueuedPoint
from ..timebase import next_utc_day_s
from .budget import ALLOWED, Path, Verdict
from .context import DeviceContext
from .expiry import EXPIRE_MARGIN_S, Expiry
from .planner import PinBacklog, allocate_points, downsample_keep

PIN_PARK_RECHECK_S: Final = 600.0
UNKNOWN_REFUSALS_BEFORE_BISECTION: Final = 3  # when other requests succeed meanwhile: it is this batch
UNKNOWN_REFUSALS_BEFORE_BISECTION_ALONE: Final = 10  # when nothing succeeds: it may be the account
UNKNOWN_REFUSALS_REMEMBERED: Final = 64  # batches whose failures are counted at once (oldest forgotten)
BODY_MARGIN_BYTES: Final = 256
THIN_CHUNK_POINTS: Final = 50_000
TURN_BATCHES: Final = 8  # batches of one pin before the next pin's turn


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


@dataclass(frozen=True, slots=True)
class RoundResult:
    """How a history round ended: completed, cut short for a live tick, or blocked by the budget."""

    completed: bool
    verdict: Verdict
    requests: int  # pins with queued points (each costs at least one request per round)


class HistoryPath:
    """Sends one device's history; owns its parked pins and the memory of batches refused for no known reason."""

    def __init__(self, ctx: DeviceContext, expiry: Expiry) -> None:
        self._ctx = ctx
        self._expiry = expiry
        self.batch_cap = ctx.guard.limits.batch_max_points
        self._parked: dict[int, tuple[float, str]] = {}  # pin -> (recheck at, monotonic; reason)
        self._unknown: dict[tuple[int, int, int], tuple[int, float]] = {}  # (pin, first id, size) -> (fails, since)
        self.horizon = 0  # the newest row id history may send (newer ones await a live decision)
        # Pins whose last turn ended in an error: the next round takes them last, so that one pin the cloud
        # keeps failing does not hold back the others (whose success also tells it is that pin, not the account).
        self._failing: set[int] = set()

    # parked pins --------------------------------------------------------------------------------

    def parked(self) -> dict[int, str]:
        """Pins the cloud refused, with the reason; pins whose recheck time came are released."""
        now = self._ctx.clock.monotonic()
        for pin, (until, _) in list(self._parked.items()):
            if until <= now:
                del self._parked[pin]
        self._ctx.tracker.parked_pins = {pin: reason for pin, (_, reason) in self._parked.items()}
        return self._ctx.tracker.parked_pins

    def next_recheck(self) -> float:
        """When the next parked pin is looked at again (monotonic; inf: none parked)."""
        return min((until for until, _ in self._parked.values()), default=math.inf)

    # rounds -------------------------------------------------------------------------------------

    async def round(self, live_due: float) -> RoundResult:
        """Send every pin's batches in turn, oldest first; stop early when a live tick is due (monotonic)."""
        ctx = self._ctx
        parked = self.parked()
        pins = [p for p in await ctx.buffer.pins_queued(ctx.name) if p not in parked]
        pins.sort(key=lambda pin: pin in self._failing)  # stable: the others keep their order
        requests = len(pins)
        allocation, verdict = await self._allocate(pins)
        while pins and verdict.allowed:
            for pin in list(pins):
                if ctx.clock.monotonic() >= live_due:
                    return RoundResult(False, ALLOWED, requests)
                allowed = None if allocation is None else allocation[pin]
                try:
                    handled, verdict = (
                        await self._pin_turn(pin, allowed) if allowed is None or allowed > 0 else (0, ALLOWED)
                    )
                except Exception:
                    self._failing.add(pin)
                    raise
                self._failing.discard(pin)
                if allocation is not None:
                    allocation[pin] -= handled
                if handled == 0 or pin in self._parked:
                    pins.remove(pin)
                if not verdict.allowed:
                    break
        return RoundResult(True, verdict, requests)

    async def _pin_turn(self, pin: int, allowed: int | None) -> tuple[int, Verdict]:
        """Up to TURN_BATCHES of a pin's batches, reading the next while one is in flight."""
        return await self._pin_batches(pin, allowed)

    async def _pin_batches(self, pin: int, allowed: int | None) -> tuple[int, Verdict]:
        ctx = self._ctx

        def room(used: int) -> int:
            return self.batch_cap if allowed is None else min(self.batch_cap, allowed - used)

        handled = 0
        points = await ctx.buffer.oldest(ctx.name, pin, room(0), max_id=self.horizon)
        for _ in range(TURN_BATCHES):
            if not points:
                break
            if points[0].ts_ms < self._expiry.cutoff_ms():
                await self._expiry.run()
                return handled + 1, ALLOWED
            batch = build_history_batch(points, ctx.guard.limits.max_request_bytes - BODY_MARGIN_BYTES)
            following = room(handled + len(batch.points))
            last = batch.points[-1]
            prefetch = asyncio.ensure_future(
                ctx.buffer.oldest(ctx.name, pin, following, max_id=self.horizon, after=(last.ts_ms, last.id))
            )
            try:
                verdict = await self._send_batch(pin, batch.points, batch=batch)
            except BaseException:
                prefetch.cancel()
                raise
            if not verdict.allowed:
                prefetch.cancel()
                return handled, verdict
            points = await prefetch
            handled += len(batch.points)
            ctx.tracker.progressed()
            if pin in self._parked or following <= 0:
                break
        return handled, ALLOWED

    async def _allocate(self, pins: list[int]) -> tuple[dict[int, int] | None, Verdict]:
        """Share today's points among pins (urgent first, then by priority); None when points are unlimited."""
        ctx = self._ctx
        wall = ctx.clock.wall()
        room = ctx.guard.points_room(wall)
        if room is None or not pins:
            return None, ALLOWED
        verdict = ctx.guard.check(Path.HISTORY, wall, 1)
        if not verdict.allowed:
            return None, verdict
        limits = ctx.guard.limits
        urgent_before = int((next_utc_day_s(wall) - limits.max_age_days * 86400 + EXPIRE_MARGIN_S) * 1000)
        backlogs = []
        for pin in pins:
            spec = ctx.device.pins.get(pin)
            backlogs.append(
                PinBacklog(
                    pin,
                    await ctx.buffer.count_queued(ctx.name, pin, max_id=self.horizon),
                    await ctx.buffer.count_queued(ctx.name, pin, max_id=self.horizon, before_ts=urgent_before),
                    spec.priority if spec is not None else 1.0,
                )
            )
        allocation = allocate_points(backlogs, room)
        if ctx.forward.over_quota == "downsample":
            for backlog in backlogs:
                if backlog.urgent > allocation[backlog.pin]:
                    await self._thin(backlog.pin, backlog.urgent, allocation[backlog.pin])
        return allocation, ALLOWED

    async def _thin(self, pin: int, urgent: int, keep: int) -> None:
        """Thin the points that would expire before the budget reaches them, keeping each bucket's extremes."""
        ctx = self._ctx
        ratio = keep / urgent
        thinned = 0
        remaining = urgent
        cursor: tuple[int, int] | None = None
        while remaining > 0:
            chunk = await ctx.buffer.oldest(
                ctx.name, pin, min(THIN_CHUNK_POINTS, remaining), max_id=self.horizon, after=cursor
            )
            if not chunk:
                break
            values = [_numeric(p.value_json) for p in chunk]
            kept = set(downsample_keep([p.ts_ms for p in chunk], values, max(1, math.ceil(len(chunk) * ratio))))
            thinned += await ctx.buffer.thin(ctx.name, [p.id for i, p in enumerate(chunk) if i not in kept])
            remaining -= len(chunk)
            cursor = (chunk[-1].ts_ms, chunk[-1].id)
        if thinned:
            ctx.log.warning("points_downsampled", pin=f"v{pin}", points=thinned, kept_ratio=round(ratio, 3))

    # one batch ----------------------------------------------------------------------------------

    async def _send_batch(
        self, pin: int, points: Sequence[QueuedPoint], *, bisecting: bool = False, batch: HistoryBatch | None = None
    ) -> Verdict:
        ctx = self._ctx
        verdict = ctx.guard.check(Path.HISTORY, ctx.clock.wall(), len(points))
        if not verdict.allowed:
            return verdict
        if batch is None:
            batch = build_history_batch(points, ctx.guard.limits.max_request_bytes - BODY_MARGIN_BYTES)
        try:
            await ctx.client.history(pin, batch.body, len(points))
        except RefusedError as exc:
            ctx.count(f"refused_{exc.refusal.value}")
            return await self._refused(pin, points, exc, bisecting=bisecting)
        self._unknown.pop((pin, points[0].id, len(points)), None)
        # Rides a later commit; the buffer's next read of this device's points, or the next budget, waits for it.
        ctx.buffer.deliver_later(ctx.name, [p.id for p in points], "history")
        await ctx.succeeded()
        return ALLOWED

    async def _refused(self, pin: int, points: Sequence[QueuedPoint], exc: RefusedError, *, bisecting: bool) -> Verdict:
        ctx = self._ctx
        refusal = exc.refusal
        if refusal is Refusal.UNKNOWN and not bisecting:
            if not self._unknown_keeps_failing(pin, points):
                raise exc
            ctx.log.warning("batch_keeps_failing", pin=f"v{pin}", points=len(points), reason=exc.message)
        if refusal is Refusal.TOO_LARGE and len(points) > 1:
            self.batch_cap = max(1, len(points) // 2)
            ctx.log.warning("batch_too_large", points=len(points), new_cap=self.batch_cap)
            return ALLOWED
        if refusal in (Refusal.VALUE, Refusal.UNKNOWN, Refusal.TOO_LARGE):
            if len(points) == 1:
                await ctx.buffer.reject(ctx.name, points, exc.message)
                ctx.log.warning("point_rejected", pin=f"v{pin}", ts=points[0].ts_ms, reason=exc.message)
                return ALLOWED
            # Poison isolation: halve until the refused points stand alone; the rest is delivered.
            middle = len(points) // 2
            verdict = await self._send_batch(pin, points[:middle], bisecting=True)
            if not verdict.allowed:
                return verdict
            return await self._send_batch(pin, points[middle:], bisecting=True)
        if refusal is Refusal.PIN:
            self._parked[pin] = (ctx.clock.monotonic() + PIN_PARK_RECHECK_S, exc.message)
            self.parked()
            ctx.log.warning("pin_parked", pin=f"v{pin}", reason=exc.message, recheck_s=PIN_PARK_RECHECK_S)
            return ALLOWED
        raise exc

    def _unknown_keeps_failing(self, pin: int, points: Sequence[QueuedPoint]) -> bool:
        """Count one more unknown refusal of this batch; True once it is time to bisect it."""
        ctx = self._ctx
        key = (pin, points[0].id, len(points))
        now = ctx.clock.monotonic()
        failures, since = self._unknown.pop(key, (0, now))
        failures += 1
        # Bisect sooner when other requests succeed meanwhile: then it is this batch, not the account.
        success = ctx.tracker.last_success_mono
        others_ok = success is not None and success > since
        needed = UNKNOWN_REFUSALS_BEFORE_BISECTION if others_ok else UNKNOWN_REFUSALS_BEFORE_BISECTION_ALONE
        if failures >= needed:
            return True
        self._unknown[key] = (failures, since)  # re-inserted last: the dict keeps the most recent at its end
        while len(self._unknown) > UNKNOWN_REFUSALS_REMEMBERED:
            del self._unknown[next(iter(self._unknown))]
        return False


def _numeric(value_json: str) -> float:
    """A number standing for a stored value when thinning (non-numbers all look alike)."""
    try:
        value = float(value_json)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0
