"""The forwarder against cloudsim on loopback, with a real SQLite buffer: paths, limits, refusals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeforward.cloudsim import CloudSim, SimDevice, SimLimits
from edgeforward.config import Config, parse_config
from edgeforward.forwarder import DeviceState, Forwarder, build_history_batch, next_utc_day_s, next_utc_month_s
from edgeforward.points import PinType, Point
from edgeforward.store import Buffer, Committed

from .conftest import TOKEN, open_buffer, wait_for

PINS = {"v1": "double", "v2": "integer", "v3": "string", "v4": "location"}
SIM_PINS = {1: PinType.DOUBLE, 2: PinType.INTEGER, 3: PinType.STRING, 4: PinType.LOCATION}


def now_ms() -> int:
    return int(time.time() * 1000)


def make_config(tmp_path: Path, server: str, *, limits: dict[str, Any] | None = None, live: float = 0.2) -> Config:
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
            },
            "device": [{"name": "pump", "token": TOKEN, "pins": PINS}],
        },
        tmp_path / "edgeforward.toml",
    )


@dataclass
class Rig:
    buffer: Buffer
    forwarder: Forwarder

    async def ledger(self) -> dict[str, int]:
        return await self.buffer.ledger("pump")

    async def drained(self, within_s: float = 15.0) -> dict[str, int]:
        counts: dict[str, int] = {}

        async def check() -> bool:
            nonlocal counts
            counts = await self.ledger()
            return counts["queued"] == 0 and counts["received"] > 0

        deadline = time.monotonic() + within_s
        while not await check():
            assert time.monotonic() < deadline, f"not drained: {counts}"
            await asyncio.sleep(0.05)
        return counts


@asynccontextmanager
async def rig(config: Config, backlog: Sequence[Point] = ()) -> AsyncIterator[Rig]:
    async with open_buffer(Path(config.buffer.path)) as buffer, aiohttp.ClientSession() as session:
        if backlog:
            await buffer.submit(list(backlog))
        forwarder = Forwarder(config.devices[0], buffer, session, config.cloud, config.forward)

        def notify(committed: Sequence[Committed]) -> None:
            for item in committed:
                forwarder.notify(item.pins)

        buffer.add_listener(notify)
        task = asyncio.create_task(forwarder.run())
        try:
            yield Rig(buffer, forwarder)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def adds_up(counts: dict[str, int]) -> bool:
    return counts["received"] == sum(v for k, v in counts.items() if k != "received")


@pytest.fixture
async def sim() -> AsyncIterator[CloudSim]:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)])
    await cloud.start()
    yield cloud
    await cloud.stop()


async def test_fresh_values_go_live_and_backlog_by_history(tmp_path: Path, sim: CloudSim) -> None:
    config = make_config(tmp_path, str(sim.url))
    old = now_ms() - 3_600_000
    backlog = [Point("pump", 2, old + i, i) for i in range(50)]
    async with rig(config, backlog) as r:
        await r.buffer.submit([Point("pump", 1, now_ms(), 21.5), Point("pump", 4, now_ms(), (24.1, 56.9))])
        counts = await r.drained()
    assert counts["delivered_history"] == 50 and counts["delivered_live"] == 2 and adds_up(counts)
    paths = {(p.pin, p.path) for p in sim.points(TOKEN)}
    assert paths == {(2, "history"), (1, "live"), (4, "update")}
    assert [p.ts_ms for p in sim.points(TOKEN, 2)] == [old + i for i in range(50)]
    assert sim.points(TOKEN, 4)[0].value == (24.1, 56.9)


async def test_no_live_path_sends_everything_timestamped(tmp_path: Path, sim: CloudSim) -> None:
    config = make_config(tmp_path, str(sim.url), live=0)
    stamp = now_ms()
    async with rig(config) as r:
        await r.buffer.submit([Point("pump", 1, stamp + i, float(i)) for i in range(5)])
        counts = await r.drained()
    assert counts["delivered_history"] == 5 and counts["delivered_live"] == 0
    assert [p.ts_ms for p in sim.points(TOKEN, 1)] == [stamp + i for i in range(5)]


async def test_batch_size_and_request_bytes_never_exceeded(tmp_path: Path) -> None:
    cloud = CloudSim(
        [SimDevice(TOKEN, "pump", SIM_PINS)], limits=SimLimits(batch_max_points=100, max_request_bytes=4096)
    )
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url), limits={"batch_max_points": 100, "max_request_bytes": 4096}, live=0)
    old = now_ms() - 60_000
    backlog = [Point("pump", 3, old + i, f"reading number {i} " + "x" * 40) for i in range(500)]
    async with rig(config, backlog) as r:
        counts = await r.drained()
    await cloud.stop()
    assert counts["delivered_history"] == 500
    assert all(req.status == 200 for req in cloud.requests)
    assert max(req.points for req in cloud.requests) <= 100


async def test_requests_per_second_respected(tmp_path: Path) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)], limits=SimLimits(requests_per_second=5))
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url), limits={"requests_per_second": 5, "batch_max_points": 1}, live=0)
    old = now_ms() - 60_000
    async with rig(config, [Point("pump", 2, old + i, i) for i in range(12)]) as r:
        counts = await r.drained()
    await cloud.stop()
    assert counts["delivered_history"] == 12
    assert [req.status for req in cloud.requests] == [200] * 12


async def test_daily_points_budget_waits_instead_of_being_refused(tmp_path: Path) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)], limits=SimLimits(points_per_day=30))
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url), limits={"points_per_day": 30}, live=0)
    old = now_ms() - 60_000
    async with rig(config, [Point("pump", 2, old + i, i) for i in range(50)]) as r:
        await wait_for(lambda: len(cloud.points(TOKEN)) == 30, 10)
        await asyncio.sleep(0.5)
        counts = await r.ledger()
        budget = await r.buffer.budget("pump", time.time())
    await cloud.stop()
    assert counts["delivered_history"] == 30 and counts["queued"] == 20
    assert budget.points_day == 30
    assert all(req.status == 200 for req in cloud.requests)


async def test_poison_values_isolated_by_bisection(tmp_path: Path, sim: CloudSim) -> None:
    config = make_config(tmp_path, str(sim.url), live=0)
    old = now_ms() - 60_000
    backlog: list[Point] = [Point("pump", 2, old + i, i) for i in range(64)]
    backlog[10] = Point("pump", 2, old + 10, "ten")
    backlog[50] = Point("pump", 2, old + 50, 50.5)
    async with rig(config, backlog) as r:
        counts = await r.drained()
    assert counts["delivered_history"] == 62 and counts["rejected"] == 2 and adds_up(counts)
    assert sorted(p.value for p in sim.points(TOKEN, 2)) == [i for i in range(64) if i not in (10, 50)]
    requests = len(sim.requests)
    assert requests <= 1 + 2 * 2 * 6  # about k * 2 * log2(n)


async def test_undeclared_pin_parked_others_flow(tmp_path: Path, sim: CloudSim) -> None:
    config = parse_config(
        {
            "cloud": {"server": str(sim.url), "timeout_s": 2},
            "buffer": {"path": str(tmp_path / "buffer.db")},
            "forward": {"live_interval_s": 0, "history_interval_s": 0.2},
            "device": [{"name": "pump", "token": TOKEN, "pins": {**PINS, "v9": "double"}}],
        },
        tmp_path / "edgeforward.toml",
    )
    old = now_ms() - 60_000
    backlog = [Point("pump", 9, old, 1.0), Point("pump", 1, old, 2.0)]
    async with rig(config, backlog) as r:
        await wait_for(lambda: len(sim.points(TOKEN, 1)) == 1, 10)
        await wait_for(lambda: 9 in r.forwarder.parked_pins, 5)
        counts = await r.ledger()
    assert counts["queued"] == 1 and counts["delivered_history"] == 1
    assert "No datastream" in r.forwarder.parked_pins[9]


async def test_invalid_token_parks_and_keeps_points(tmp_path: Path) -> None:
    cloud = CloudSim([SimDevice("another-token", "other", SIM_PINS)])
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url))
    async with rig(config, [Point("pump", 1, now_ms(), 1.0)]) as r:
        await wait_for(lambda: r.forwarder.state is DeviceState.PARKED, 5)
        counts = await r.ledger()
    await cloud.stop()
    assert counts["queued"] == 1 and counts["delivered_live"] == 0
    assert r.forwarder.reason == "Invalid token."


async def test_regional_redirect_followed_and_remembered(tmp_path: Path) -> None:
    regional = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)])
    regional_url = await regional.start()
    home = CloudSim(redirects={TOKEN: regional_url}, accept_any_token=True)
    await home.start()
    config = make_config(tmp_path, str(home.url), live=0)
    async with rig(config, [Point("pump", 1, now_ms() - 1000, 1.0)]) as r:
        await r.drained()
    async with rig(config, [Point("pump", 1, now_ms() - 500, 2.0)]) as r:
        await r.drained()
    await home.stop()
    await regional.stop()
    assert len(home.requests) == 1  # only the first request went to the wrong region
    assert [p.value for p in regional.points(TOKEN, 1)] == [1.0, 2.0]


async def test_old_points_expire_instead_of_being_refused(tmp_path: Path) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)], limits=SimLimits(max_age_days=1))
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url), limits={"max_age_days": 1}, live=0)
    backlog = [Point("pump", 1, now_ms() - 2 * 86_400_000, 1.0), Point("pump", 1, now_ms() - 60_000, 2.0)]
    async with rig(config, backlog) as r:
        counts = await r.drained()
    await cloud.stop()
    assert counts["expired"] == 1 and counts["delivered_history"] == 1 and adds_up(counts)
    assert all(req.status == 200 for req in cloud.requests)


async def test_outage_then_recovery_resumes(tmp_path: Path, sim: CloudSim) -> None:
    config = make_config(tmp_path, str(sim.url), live=0)
    sim.outage = "reset"
    async with rig(config, [Point("pump", 1, now_ms(), 1.0)]) as r:
        await wait_for(lambda: r.forwarder.state is DeviceState.OFFLINE, 5)
        sim.outage = None
        counts = await r.drained()
        assert r.forwarder.state is DeviceState.ONLINE
    assert counts["delivered_history"] == 1


def test_history_batch_respects_bytes() -> None:
    from edgeforward.store import QueuedPoint

    points = [QueuedPoint(i, 1, 1_764_000_000_000 + i, "1.5") for i in range(100)]
    batch = build_history_batch(points, 200)
    assert len(batch.body) <= 200
    assert batch.body.startswith(b"[[1764000000000,1.5],")
    assert len(batch.points) == (200 - 2) // len(b"[1764000000000,1.5],")


def test_budget_reset_times() -> None:
    assert next_utc_day_s(1_764_000_000) == 1_764_028_800
    assert next_utc_month_s(1_764_000_000) == 1_764_547_200  # 2025-12-01T00:00:00Z


async def test_strict_quotas_backlog_uses_the_day_and_then_waits(tmp_path: Path) -> None:
    limits = {"points_per_day": 3000, "messages_per_month": 400, "batch_max_points": 500}
    cloud = CloudSim(
        [SimDevice(TOKEN, "pump", SIM_PINS)],
        limits=SimLimits(points_per_day=3000, messages_per_month=400, batch_max_points=500),
    )
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url), limits=limits, live=0.2)
    old = now_ms() - 3_600_000
    backlog = [Point("pump", 2, old + i, i) for i in range(6000)] + [
        Point("pump", 1, old + i, float(i)) for i in range(4000)
    ]
    async with rig(config, backlog) as r:
        await wait_for(lambda: sum(1 for p in cloud.points(TOKEN) if p.path == "history") >= 2700, 20)
        for i in range(5):
            await r.buffer.submit([Point("pump", 1, now_ms(), 0.5 + i)])
            await asyncio.sleep(0.25)
        settled = len(cloud.requests)
        await asyncio.sleep(1.0)
        counts = await r.ledger()
        budget = await r.buffer.budget("pump", time.time())
    await cloud.stop()
    history = [p for p in cloud.points(TOKEN) if p.path == "history"]
    assert all(req.status == 200 for req in cloud.requests), [req.error for req in cloud.requests if req.status != 200]
    assert 2700 <= len(history) <= 3000
    assert budget.points_day <= 3000
    assert {p.pin for p in history} == {1, 2}  # both pins got a share
    assert counts["delivered_live"] >= 1  # live still flows (paced to the month's messages) while history waits
    assert len(cloud.requests) - settled <= 1  # no hammering once the day's points are spent
    assert adds_up(counts)


async def test_live_paced_by_the_monthly_message_budget(tmp_path: Path) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)], limits=SimLimits(messages_per_month=400))
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url), limits={"messages_per_month": 400}, live=0.2)
    async with rig(config) as r:
        for i in range(10):
            await r.buffer.submit([Point("pump", 1, now_ms(), float(i))])
            await asyncio.sleep(0.1)
        await wait_for(lambda: len(cloud.requests) >= 1, 5)
        await asyncio.sleep(0.5)
        interval = r.forwarder.live_interval_s
    await cloud.stop()
    seconds_left = next_utc_month_s(time.time()) - time.time()
    assert interval >= seconds_left / (400 * 0.5) * 0.99
    live_requests = [req for req in cloud.requests if req.method == "GET"]
    assert len(live_requests) == 1  # one live update, then paced to the month's budget
    assert all(req.status == 200 for req in cloud.requests)


async def test_downsample_thins_what_would_expire_and_keeps_extremes(tmp_path: Path) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)], limits=SimLimits(points_per_day=300, max_age_days=1))
    await cloud.start()
    base = make_config(tmp_path, str(cloud.url), limits={"points_per_day": 300, "max_age_days": 1}, live=0)
    config = parse_config(
        {
            "cloud": {"server": str(cloud.url), "timeout_s": 2, "limits": {"points_per_day": 300, "max_age_days": 1}},
            "buffer": {"path": base.buffer.path},
            "forward": {"live_interval_s": 0, "history_interval_s": 0.2, "over_quota": "downsample"},
            "device": [{"name": "pump", "token": TOKEN, "pins": PINS}],
        },
        tmp_path / "edgeforward.toml",
    )
    start = now_ms() - int(23.5 * 3_600_000)
    values = [float((i * 37) % 1000) for i in range(3000)]
    values[1234], values[2222] = -500.0, 5000.0
    backlog = [Point("pump", 1, start + i * 600, values[i]) for i in range(3000)]
    async with rig(config, backlog) as r:
        await wait_for(lambda: len(cloud.points(TOKEN, 1)) >= 290, 15)
        await asyncio.sleep(0.5)
        counts = await r.ledger()
    await cloud.stop()
    sent = [p.value for p in cloud.points(TOKEN, 1)]
    assert all(req.status == 200 for req in cloud.requests)
    assert counts["downsampled"] >= 2600 and adds_up(counts)
    assert counts["delivered_history"] == len(sent) <= 300
    assert -500.0 in sent and 5000.0 in sent


async def test_unknown_refusal_retried_slowly_then_delivered(tmp_path: Path, sim: CloudSim) -> None:
    config = make_config(tmp_path, str(sim.url), live=0)
    sim.outage = "error:Something the docs never mention"
    async with rig(config, [Point("pump", 1, now_ms() - 1000, 1.0), Point("pump", 1, now_ms() - 900, 2.0)]) as r:
        await wait_for(lambda: len(sim.requests) >= 3, 10)
        assert r.forwarder.reason is not None and "Something" in r.forwarder.reason
        sim.outage = None
        counts = await r.drained()
    assert counts["delivered_history"] == 2 and counts["rejected"] == 0


async def test_value_refused_by_pattern_isolated_alone(tmp_path: Path) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS, refuse={2: "^13$"})])
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url), live=0)
    async with rig(config, [Point("pump", 2, now_ms() - 1000 + i, i) for i in range(20)]) as r:
        counts = await r.drained()
    await cloud.stop()
    assert counts["rejected"] == 1 and counts["delivered_history"] == 19 and adds_up(counts)


async def test_live_sends_only_changed_pins_and_respects_deadband(tmp_path: Path, sim: CloudSim) -> None:
    config = parse_config(
        {
            "cloud": {"server": str(sim.url), "timeout_s": 2, "limits": {"messages_per_month": 0}},
            "buffer": {"path": str(tmp_path / "buffer.db")},
            "forward": {"live_interval_s": 0.2, "history_interval_s": 0.2},
            "device": [
                {
                    "name": "pump",
                    "token": TOKEN,
                    "pins": {"v1": {"type": "double", "deadband": 0.5}, "v2": "integer"},
                }
            ],
        },
        tmp_path / "edgeforward.toml",
    )
    async with rig(config) as r:
        for v1, v2 in [(20.0, 1), (20.3, 1), (21.0, 2)]:
            await r.buffer.submit([Point("pump", 1, now_ms(), v1), Point("pump", 2, now_ms(), v2)])
            await wait_for(lambda: len(sim.points(TOKEN)) >= 2, 5)
            await asyncio.sleep(0.35)
        counts = await r.drained()
    live = [(p.pin, p.value) for p in sim.points(TOKEN) if p.path == "live"]
    assert (1, 20.3) not in live and (2, 1) in live and live.count((2, 1)) == 1
    assert (1, 21.0) in live and (2, 2) in live
    assert counts["delivered_live"] + counts["delivered_history"] == 6 and adds_up(counts)


async def test_429_retry_after_is_honored(tmp_path: Path, sim: CloudSim) -> None:
    config = make_config(tmp_path, str(sim.url), live=0)
    sim.retry_after_s = 1.0
    sim.outage = "429"
    async with rig(config, [Point("pump", 1, now_ms() - 1000, 1.0)]) as r:
        await wait_for(lambda: len(sim.requests) >= 1, 5)
        await asyncio.sleep(1.5)
        attempts_while_limited = len(sim.requests)
        sim.outage = None
        counts = await r.drained()
    # retry_max_s is 0.2 here: without Retry-After there would have been about eight attempts.
    assert attempts_while_limited <= 3
    assert counts["delivered_history"] == 1


async def test_cloud_quota_refusal_waits_for_the_reset(tmp_path: Path, sim: CloudSim) -> None:
    config = make_config(tmp_path, str(sim.url), live=0)
    sim.outage = "error:Daily data points limit reached."
    async with rig(config, [Point("pump", 1, now_ms() - 1000, 1.0)]) as r:
        await wait_for(lambda: len(sim.requests) >= 1, 5)
        await asyncio.sleep(1.0)
        counts = await r.ledger()
        reason = r.forwarder.reason
    assert len(sim.requests) == 1  # no hammering until the next UTC day
    assert counts["queued"] == 1 and counts["rejected"] == 0
    assert reason is not None and reason.startswith("quota")


async def test_points_of_refused_or_failed_requests_are_given_back(tmp_path: Path) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS, refuse={2: "^13$"})], limits=SimLimits(points_per_day=100))
    await cloud.start()
    config = make_config(tmp_path, str(cloud.url), limits={"points_per_day": 100}, live=0)
    cloud.outage = "500"
    async with rig(config, [Point("pump", 2, now_ms() - 1000 + i, i) for i in range(40)]) as r:
        await wait_for(lambda: len(cloud.requests) >= 3, 5)
        cloud.outage = None
        counts = await r.drained()
        budget = await r.buffer.budget("pump", time.time())
    await cloud.stop()
    # Three failed attempts and a bisection for the refused value: only the 39 imported points count.
    assert counts["delivered_history"] == 39 and counts["rejected"] == 1
    assert budget.points_day == 39
    assert budget.messages_month == len(cloud.requests)
