"""The live path: the newest fresh, changed value of each pin, in one multi-pin GET (locations by their own GET)."""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Final

from ..blynk import Refusal, RefusedError
from ..points import Value, value_from_json
from ..store import QueuedPoint
from .budget import ALLOWED, Path, Verdict
from .context import DeviceContext

LIVE_FRESH_MIN_S: Final = 5.0  # a value older than max(2 live intervals, this) is history's, not live
LIVE_QUERY_MAX_BYTES: Final = 4000  # the multi-pin GET's query stays below what proxies accept
PERMANENT: Final = (Refusal.INVALID_TOKEN, Refusal.QUOTA)  # answers about the device, not about a value


class LivePath:
    """Sends live values of one device; a value the cloud refuses is left to the history path."""

    def __init__(self, ctx: DeviceContext) -> None:
        self._ctx = ctx
        self._last_sent: dict[int, str] = {}  # pin -> the value JSON the dashboard shows
        self._excluded: dict[int, int] = {}  # pin -> id of its newest point, refused live (one per pin)

    async def tick(self, pins: Collection[int], skip: Collection[int]) -> tuple[bool, Verdict]:
        """Send what is new on `pins` (not `skip`); return whether anything was sent, and the budget verdict."""
        ctx = self._ctx
        verdict = ctx.guard.check(Path.LIVE, ctx.clock.wall())
        if not verdict.allowed:
            return False, verdict
        fresh_after_ms = int((ctx.clock.wall() - max(2 * ctx.forward.live_interval_s, LIVE_FRESH_MIN_S)) * 1000)
        scalars: list[QueuedPoint] = []
        locations: list[QueuedPoint] = []
        for pin in sorted(pins):
            if pin in skip:
                continue
            newest = await ctx.buffer.newest(ctx.name, pin)
            if newest is None or newest.ts_ms < fresh_after_ms or self._excluded.get(pin) == newest.id:
                continue
            self._excluded.pop(pin, None)
            if not self._changed(pin, newest.value_json):
                continue  # the dashboard already shows it; the point itself goes by history
            (locations if newest.value_json.startswith("[") else scalars).append(newest)
        fitted = self._fit_query(scalars)
        sent = False
        verdict = ALLOWED
        if fitted:
            sent, verdict = await self._send_scalars(fitted)
        for point in locations:
            if not verdict.allowed:
                break
            outcome, verdict = await self._send([point], functools.partial(self._send_location, point))
            sent = sent or outcome is _Outcome.SENT
        return sent, verdict

    async def _send_location(self, point: QueuedPoint) -> None:
        await self._ctx.client.update_location(point.pin, _location(point))

    def _changed(self, pin: int, value_json: str) -> bool:
        """Whether a pin's newest value differs from what was last sent live by more than its deadband."""
        last = self._last_sent.get(pin)
        if last is None:
            return True
        if last == value_json:
            return False
        spec = self._ctx.device.pins.get(pin)
        deadband = spec.deadband if spec is not None else None
        if deadband is None:
            return True
        try:
            return abs(float(value_json) - float(last)) > deadband
        except ValueError:
            return True

    def _fit_query(self, points: list[QueuedPoint]) -> list[QueuedPoint]:
        fitted: list[QueuedPoint] = []
        for point in points:
            candidate = [*fitted, point]
            if len(self._ctx.client.live_query(_values(candidate))) <= LIVE_QUERY_MAX_BYTES:
                fitted = candidate
        return fitted

    async def _send_scalars(self, points: Sequence[QueuedPoint]) -> tuple[bool, Verdict]:
        """One GET for all; when refused, halves until each refused value stands alone (and is excluded alone)."""
        client = self._ctx.client
        values = _values(points)
        outcome, verdict = await self._send(points, lambda: client.live(values))
        if outcome is not _Outcome.REFUSED or len(points) == 1:
            return outcome is _Outcome.SENT, verdict
        middle = len(points) // 2
        sent, verdict = await self._send_scalars(points[:middle])
        if verdict.allowed:
            sent_rest, verdict = await self._send_scalars(points[middle:])
            sent = sent or sent_rest
        return sent, verdict

    async def _send(
        self, points: Sequence[QueuedPoint], send: Callable[[], Awaitable[None]]
    ) -> tuple[_Outcome, Verdict]:
        ctx = self._ctx
        verdict = ctx.guard.check(Path.LIVE, ctx.clock.wall())
        if not verdict.allowed:
            return _Outcome.BLOCKED, verdict
        try:
            await send()
        except RefusedError as exc:
            if exc.refusal in PERMANENT:
                raise
            ctx.count(f"refused_{exc.refusal.value}")
            if len(points) == 1:
                # The history path sends this point too, timestamped, and settles it for its pin.
                self._excluded[points[0].pin] = points[0].id
                ctx.log.info("live_refused", reason=exc.message, pin=f"v{points[0].pin}")
            return _Outcome.REFUSED, ALLOWED
        ctx.buffer.deliver_later(ctx.name, [p.id for p in points], "live")
        self._last_sent.update((p.pin, p.value_json) for p in points)
        await ctx.succeeded()
        return _Outcome.SENT, ALLOWED


class _Outcome(enum.Enum):
    SENT = "sent"
    REFUSED = "refused"
    BLOCKED = "blocked"


def _values(points: Sequence[QueuedPoint]) -> list[tuple[int, Value]]:
    return [(p.pin, value_from_json(p.value_json)) for p in points]


def _location(point: QueuedPoint) -> tuple[float, float]:
    value = value_from_json(point.value_json)
    assert isinstance(value, tuple)
    return value
