"""A forwarder on a fake clock against cloudsim on loopback, with a real SQLite buffer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from edgeforward.cloudsim import CloudSim, SimDevice, SimLimits
from edgeforward.config import Config, parse_config
from edgeforward.forward import Forwarder, Peers
from edgeforward.forward.state import Activity
from edgeforward.points import PinType, Point
from edgeforward.store import Buffer, Committed

from ..conftest import TOKEN, open_buffer
from ..fakeclock import CALENDAR, POLL_S, REAL_TIMEOUT_S, FakeClock

PINS = {"v1": "double", "v2": "integer", "v3": "string", "v4": "location"}
SIM_PINS = {1: PinType.DOUBLE, 2: PinType.INTEGER, 3: PinType.STRING, 4: PinType.LOCATION}
MID_MONTH = CALENDAR["mid-month"]


def make_config(
    tmp_path: Path,
    server: str,
    *,
    limits: dict[str, Any] | None = None,
    live: float = 0.2,
    forward: dict[str, Any] | None = None,
    devices: list[dict[str, Any]] | None = None,
) -> Config:
    return parse_config(
        {
            "cloud": {"server": server, "timeout_s": 2, "limits": limits or {}},
            "buffer": {"path": str(tmp_path / "buffer.db")},
            "forward": {
                "live_interval_s": live,
                "history_interval_s": 0.2,
                "retry_initial_s": 0.05,
                "retry_max_s": 0.2,
                "park_recheck_s": 0.5,
                **(forward or {}),
            },
            "device": devices or [{"name": "pump", "token": TOKEN, "pins": PINS}],
        },
        tmp_path / "edgeforward.toml",
    )


def adds_up(counts: dict[str, int]) -> bool:
    return counts["received"] == sum(v for k, v in counts.items() if k != "received")


@dataclass
class Rig:
    buffer: Buffer
    clock: FakeClock
    forwarders: dict[str, Forwarder]
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def forwarder(self) -> Forwarder:
        return next(iter(self.forwarders.values()))

    async def ledger(self, device: str = "pump") -> dict[str, int]:
        return await self.buffer.ledger(device)

    async def drained(self, within_s: float = 600.0, device: str = "pump") -> dict[str, int]:
        """Run the clock until the device's queue is empty and every forwarder sleeps; return its ledger."""
        await self.run_until(lambda: self._empty(device), within_s)
        return await self.ledger(device)

    async def _empty(self, device: str) -> bool:
        counts = await self.ledger(device)
        return counts["queued"] == 0 and counts["received"] > 0

    async def run_until(self, condition: Any, within_s: float = 600.0) -> float:
        """Run the clock until `condition` holds, then let every forwarder finish its step."""
        took = await self.clock.run_until(condition, within_s=within_s, sleepers=len(self.forwarders))
        await self.idle()
        return took

    async def idle(self) -> None:
        """Wait (real time) until every forwarder has finished its step and sleeps on the clock."""
        for _ in range(5):
            await asyncio.sleep(0)  # a forwarder just woken has not resumed yet
        deadline = time.monotonic() + REAL_TIMEOUT_S
        while not all(f.snapshot().activity is Activity.SLEEPING for f in self.forwarders.values()):
            assert time.monotonic() < deadline, "a forwarder never went back to sleep"
            await asyncio.sleep(POLL_S)
        await self.clock.settle(len(self.forwarders))


@asynccontextmanager
async def rig(
    config: Config, backlog: Sequence[Point] = (), *, clock: FakeClock | None = None, start: bool = True
) -> AsyncIterator[Rig]:
    clock = clock or FakeClock(wall=MID_MONTH)
    async with open_buffer(Path(config.buffer.path)) as buffer, aiohttp.ClientSession() as session:
        if backlog:
            await buffer.submit(list(backlog))
        peers = Peers()
        forwarders = {
            device.name: Forwarder(
                device,
                buffer,
                session,
                config.cloud,
                config.forward,
                limits=config.limits_of(device.name),
                clock=clock,
                peers=peers,
            )
            for device in config.devices
        }

        def notify(committed: Sequence[Committed]) -> None:
            for item in committed:
                forwarder = forwarders.get(item.device)
                if forwarder is not None:
                    forwarder.notify(item.pins)

        buffer.add_listener(notify)
        result = Rig(buffer, clock, forwarders)
        if start:
            result.tasks = {
                name: asyncio.create_task(f.run(), name=f"forward:{name}") for name, f in forwarders.items()
            }
        try:
            yield result
        finally:
            for task in result.tasks.values():
                task.cancel()
            await asyncio.gather(*result.tasks.values(), return_exceptions=True)


@asynccontextmanager
async def sim_cloud(
    clock: FakeClock, *, devices: Sequence[SimDevice] | None = None, limits: SimLimits | None = None
) -> AsyncIterator[CloudSim]:
    cloud = CloudSim(
        devices if devices is not None else [SimDevice(TOKEN, "pump", SIM_PINS)],
        limits=limits or SimLimits(),
        clock=clock.wall_ms,
    )
    await cloud.start()
    try:
        yield cloud
    finally:
        await cloud.stop()
