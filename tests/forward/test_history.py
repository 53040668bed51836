"""The history path's poison isolation, and the live path handing refused values to it (fake clock, cloudsim)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeforward.cloudsim import SimDevice
from edgeforward.points import PinType, Point

from ..conftest import TOKEN
from ..fakeclock import FakeClock
from .rig import MID_MONTH, SIM_PINS, adds_up, make_config, rig, sim_cloud


@pytest.mark.parametrize(
    ("positions", "size"),
    [([0], 64), ([63], 64), ([31], 64), ([0, 63], 64), ([5, 6], 64), ([10, 20, 30, 40], 64), ([0], 1), ([0, 1], 2)],
)
async def test_bisection_isolates_poison_with_few_requests(tmp_path: Path, positions: list[int], size: int) -> None:
    clock = FakeClock(wall=MID_MONTH)
    async with sim_cloud(clock) as cloud:
        config = make_config(tmp_path, str(cloud.url), live=0)
        old = clock.wall_ms() - 60_000
        backlog = [Point("pump", 2, old + i, "poison" if i in positions else i) for i in range(size)]
        async with rig(config, backlog, clock=clock) as r:
            counts = await r.drained()
        poison = len(positions)
        assert counts["rejected"] == poison and counts["delivered_history"] == size - poison and adds_up(counts)
        assert sorted(p.value for p in cloud.points(TOKEN, 2)) == [i for i in range(size) if i not in positions]
        depth = max(1, (size - 1).bit_length())
        assert len(cloud.requests) <= 1 + 2 * poison * depth


async def test_live_refusal_retried_through_history(tmp_path: Path) -> None:
    clock = FakeClock(wall=MID_MONTH)
    async with sim_cloud(clock, devices=[SimDevice(TOKEN, "pump", {**SIM_PINS, 1: PinType.INTEGER})]) as cloud:
        config = make_config(tmp_path, str(cloud.url))
        async with rig(config, clock=clock) as r:
            await r.idle()
            await r.buffer.submit([Point("pump", 1, clock.wall_ms(), 1.5), Point("pump", 2, clock.wall_ms(), 7)])
            counts = await r.drained()
        # The multi-pin GET was refused; halved, 7 went live alone, and 1.5 was settled by history (refused there too).
        assert counts["rejected"] == 1 and counts["delivered_live"] == 1 and adds_up(counts)
        assert [(p.value, p.path) for p in cloud.points(TOKEN, 2)] == [(7, "live")]
        assert [p.path for p in cloud.points(TOKEN, 1)] == []
