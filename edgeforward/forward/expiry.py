"""Expiry: points older than the plan's `max_age_days` are never sent; they are counted expired instead."""

from __future__ import annotations

from typing import Final

from .context import DeviceContext

EXPIRE_INTERVAL_S: Final = 60.0  # how often queued points are checked against the age limit
EXPIRE_MARGIN_S: Final = 600.0  # points this close to the limit are expired rather than sent and refused


class Expiry:
    """Expires one device's points that the cloud would refuse as too old."""

    def __init__(self, ctx: DeviceContext) -> None:
        self._ctx = ctx
        self._next_mono = ctx.clock.monotonic()

    def cutoff_ms(self) -> int:
        """Points stamped before this (epoch ms) are too old to send."""
        limits = self._ctx.guard.limits
        return int((self._ctx.clock.wall() - limits.max_age_days * 86400 + EXPIRE_MARGIN_S) * 1000)

    @property
    def next_mono(self) -> float:
        """When the next periodic check is due (monotonic)."""
        return self._next_mono

    async def run_if_due(self) -> None:
        """Expire if the interval has passed."""
        if self._ctx.clock.monotonic() >= self._next_mono:
            await self.run()

    async def run(self) -> None:
        """Expire every pin's too-old points now."""
        ctx = self._ctx
        self._next_mono = ctx.clock.monotonic() + EXPIRE_INTERVAL_S
        cutoff = self.cutoff_ms()
        expired = 0
        for pin in await ctx.buffer.pins_queued(ctx.name):
            expired += await ctx.buffer.expire(ctx.name, cutoff, pin=pin)
        if expired:
            ctx.log.warning("points_expired", points=expired, max_age_days=ctx.guard.limits.max_age_days)
