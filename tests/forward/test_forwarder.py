"""The forwarder on a fake clock against cloudsim on loopback: paths, limits, refusals, reconnects.

Waits are virtual (tests/fakeclock.py), so no test here depends on the date, the time of day or
the machine's load; the calendar is pinned to the middle of a month unless a test names another.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeforward.cloudsim import CloudSim, SimDevice, SimLimits
from edgeforward.forward import DeviceState, WaitReason
from edgeforward.forward import history as history_module
from edgeforward.forward.history import build_history_batch
from edgeforward.points import Point
from edgeforward.store import QueuedPoint
from edgeforward.timebase import next_utc_day_s, next_utc_month_s

from ..conftest import TOKEN, TOKEN_FAN
from ..fakeclock import CALENDAR, FakeClock
from .rig import MID_MONTH, PINS, SIM_PINS, adds_up, make_config, rig, sim_cloud

HOUR_MS = 3_600_000
DAY_S = 86_400.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall=MID_MONTH)


async def test_fresh_values_go_live_and_backlog_by_history(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url))
        old = clock.wall_ms() - HOUR_MS
        backlog = [Point("pump", 2, old + i, i) for i in range(50)]
        async with rig(config, backlog, clock=clock) as r:
            # The forwarder takes what history may send (the backlog) as it starts: the fresh values come after.
            await r.idle()
            await r.buffer.submit(
                [Point("pump", 1, clock.wall_ms(), 21.5), Point("pump", 4, clock.wall_ms(), (24.1, 56.9))]
            )
            counts = await r.drained()
        assert counts["delivered_history"] == 50 and counts["delivered_live"] == 2 and adds_up(counts)
        assert {(p.pin, p.path) for p in sim.points(TOKEN)} == {(2, "history"), (1, "live"), (4, "update")}
        assert [p.ts_ms for p in sim.points(TOKEN, 2)] == [old + i for i in range(50)]
        assert sim.points(TOKEN, 4)[0].value == (24.1, 56.9)


async def test_no_live_path_sends_everything_timestamped(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=0)
        stamp = clock.wall_ms()
        async with rig(config, clock=clock) as r:
            await r.idle()
            await r.buffer.submit([Point("pump", 1, stamp + i, float(i)) for i in range(5)])
            counts = await r.drained()
        assert counts["delivered_history"] == 5 and counts["delivered_live"] == 0
        assert [p.ts_ms for p in sim.points(TOKEN, 1)] == [stamp + i for i in range(5)]


async def test_batch_size_and_request_bytes_never_exceeded(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock, limits=SimLimits(batch_max_points=100, max_request_bytes=4096)) as sim:
        config = make_config(
            tmp_path, str(sim.url), limits={"batch_max_points": 100, "max_request_bytes": 4096}, live=0
        )
        old = clock.wall_ms() - 60_000
        backlog = [Point("pump", 3, old + i, f"reading number {i} " + "x" * 40) for i in range(500)]
        async with rig(config, backlog, clock=clock) as r:
            counts = await r.drained()
        assert counts["delivered_history"] == 500
        assert all(req.status == 200 for req in sim.requests)
        assert max(req.points for req in sim.requests) <= 100


async def test_requests_per_second_respected(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock, limits=SimLimits(requests_per_second=5)) as sim:
        config = make_config(tmp_path, str(sim.url), limits={"requests_per_second": 5, "batch_max_points": 1}, live=0)
        old = clock.wall_ms() - 60_000
        async with rig(config, [Point("pump", 2, old + i, i) for i in range(12)], clock=clock) as r:
            took = await r.run_until(lambda: len(sim.requests) >= 12)
            counts = await r.drained()
        assert counts["delivered_history"] == 12
        assert [req.status for req in sim.requests] == [200] * 12
        assert took >= 2.0  # 12 requests at 5 per second: the limiter waited (virtual) seconds, not the cloud


async def test_daily_points_budget_waits_instead_of_being_refused(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock, limits=SimLimits(points_per_day=30)) as sim:
        config = make_config(tmp_path, str(sim.url), limits={"points_per_day": 30}, live=0)
        old = clock.wall_ms() - 60_000
        async with rig(config, [Point("pump", 2, old + i, i) for i in range(50)], clock=clock) as r:
            await r.run_until(lambda: len(sim.points(TOKEN)) == 30)
            requests = len(sim.requests)
            await clock.advance(3600)  # an hour of rounds: nothing may be sent, nothing refused
            counts = await r.ledger()
            snapshot = r.forwarder.snapshot()
            assert len(sim.requests) == requests
            assert snapshot.waiting is WaitReason.POINTS_BUDGET and snapshot.by_design
            assert snapshot.next_attempt_wall == pytest.approx(next_utc_day_s(clock.wall()), abs=1)
            # The next UTC day brings the rest.
            await r.run_until(lambda: len(sim.points(TOKEN)) == 50, within_s=DAY_S)
        assert counts["delivered_history"] == 30 and counts["queued"] == 20
        assert all(req.status == 200 for req in sim.requests)


async def test_poison_values_isolated_by_bisection(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=0)
        old = clock.wall_ms() - 60_000
        backlog: list[Point] = [Point("pump", 2, old + i, i) for i in range(64)]
        backlog[10] = Point("pump", 2, old + 10, "ten")
        backlog[50] = Point("pump", 2, old + 50, 50.5)
        async with rig(config, backlog, clock=clock) as r:
            counts = await r.drained()
        assert counts["delivered_history"] == 62 and counts["rejected"] == 2 and adds_up(counts)
        assert sorted(p.value for p in sim.points(TOKEN, 2)) == [i for i in range(64) if i not in (10, 50)]
        assert len(sim.requests) <= 1 + 2 * 2 * 6  # about k * 2 * log2(n)


async def test_undeclared_pin_parked_others_flow(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        devices = [{"name": "pump", "token": TOKEN, "pins": {**PINS, "v9": "double"}}]
        config = make_config(tmp_path, str(sim.url), live=0, devices=devices)
        old = clock.wall_ms() - 60_000
        async with rig(config, [Point("pump", 9, old, 1.0), Point("pump", 1, old, 2.0)], clock=clock) as r:
            await r.run_until(lambda: len(sim.points(TOKEN, 1)) == 1 and 9 in r.forwarder.snapshot().parked_pins)
            counts = await r.ledger()
            parked = r.forwarder.snapshot().parked_pins
        assert counts["queued"] == 1 and counts["delivered_history"] == 1
        assert "No datastream" in parked[9]


async def test_invalid_token_parks_and_keeps_points(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock, devices=[SimDevice("another-token", "other", SIM_PINS)]) as sim:
        config = make_config(tmp_path, str(sim.url))
        async with rig(config, [Point("pump", 1, clock.wall_ms(), 1.0)], clock=clock) as r:
            await r.run_until(lambda: r.forwarder.snapshot().waiting is WaitReason.PARKED)
            counts = await r.ledger()
            snapshot = r.forwarder.snapshot()
        assert counts["queued"] == 1 and counts["delivered_live"] == 0
        assert snapshot.reason == "Invalid token." and snapshot.waiting is WaitReason.PARKED
        assert not snapshot.by_design


async def test_regional_redirect_followed_and_remembered(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as regional:
        home = CloudSim(redirects={TOKEN: str(regional.url)}, accept_any_token=True, clock=clock.wall_ms)
        await home.start()
        config = make_config(tmp_path, str(home.url), live=0)
        async with rig(config, [Point("pump", 1, clock.wall_ms() - 1000, 1.0)], clock=clock) as r:
            await r.drained()
        async with rig(config, [Point("pump", 1, clock.wall_ms() - 500, 2.0)], clock=clock) as r:
            await r.drained()
        await home.stop()
        assert len(home.requests) == 1  # only the first request went to the wrong region
        assert [p.value for p in regional.points(TOKEN, 1)] == [1.0, 2.0]


async def test_old_points_expire_instead_of_being_refused(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock, limits=SimLimits(max_age_days=1)) as sim:
        config = make_config(tmp_path, str(sim.url), limits={"max_age_days": 1}, live=0)
        now = clock.wall_ms()
        backlog = [Point("pump", 1, now - 2 * 86_400_000, 1.0), Point("pump", 1, now - 60_000, 2.0)]
        async with rig(config, backlog, clock=clock) as r:
            counts = await r.drained()
        assert counts["expired"] == 1 and counts["delivered_history"] == 1 and adds_up(counts)
        assert all(req.status == 200 for req in sim.requests)


async def test_outage_then_recovery_resumes(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=0)
        sim.outage = "reset"
        async with rig(config, [Point("pump", 1, clock.wall_ms(), 1.0)], clock=clock) as r:
            await r.run_until(lambda: r.forwarder.snapshot().waiting is WaitReason.BACKOFF)
            assert r.forwarder.state is DeviceState.OFFLINE
            sim.outage = None
            counts = await r.drained()
            state = r.forwarder.snapshot().state
        assert counts["delivered_history"] == 1 and state is DeviceState.ONLINE


async def test_reconnect_drains_the_backlog_at_once(tmp_path: Path, clock: FakeClock) -> None:
    """Seen from outside: after an outage, the backlog went only at the next history interval."""
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=10, forward={"history_interval_s": 60, "retry_max_s": 5})
        async with rig(config, clock=clock) as r:
            await r.buffer.submit([Point("pump", 1, clock.wall_ms(), 0.5)])
            await r.run_until(lambda: len(sim.points(TOKEN)) == 1)  # online, a history round just ran
            sim.outage = "503"
            start = clock.wall_ms()
            for i in range(56):  # a reading a second for 56 s of outage: 5,600 points on 100 pins... of one pin
                await r.buffer.submit([Point("pump", 2, start + i * 1000 + j, j) for j in range(100)])
                await clock.advance(1.0)
            assert r.forwarder.state is DeviceState.OFFLINE
            sim.outage = None
            back = clock.monotonic()
            await r.run_until(lambda: len(sim.points(TOKEN, 2)) == 5600, within_s=60)
            waited = clock.monotonic() - back
            counts = await r.ledger()
        # The backlog goes with the first request after the cloud is back: at most one backoff delay,
        # never the 60 s history interval.
        assert waited <= 5.0
        assert counts["queued"] == 0 and adds_up(counts)


async def test_a_success_on_the_server_wakes_devices_waiting_on_backoff(tmp_path: Path, clock: FakeClock) -> None:
    devices = [
        {"name": "pump", "token": TOKEN, "pins": PINS},
        {"name": "fan", "token": TOKEN_FAN, "pins": {"v1": "double"}},
    ]
    sims = [SimDevice(TOKEN, "pump", SIM_PINS), SimDevice(TOKEN_FAN, "fan", {1: SIM_PINS[1]})]
    async with sim_cloud(clock, devices=sims) as sim:
        config = make_config(tmp_path, str(sim.url), live=0, devices=devices, forward={"retry_max_s": 300})
        sim.outage = "reset"
        old = clock.wall_ms() - 60_000
        async with rig(config, [Point("pump", 1, old, 1.0), Point("fan", 1, old, 2.0)], clock=clock) as r:
            # Both offline, backing off towards 300 s.
            await r.run_until(
                lambda: all(f.snapshot().outcomes.get("transient", 0) >= 6 for f in r.forwarders.values())
            )
            sim.outage = None
            # Whichever retries first gets through; the other must not wait out its own backoff.
            first = min(r.forwarders.values(), key=lambda f: f.snapshot().next_check_mono or 0)
            other = next(f for f in r.forwarders.values() if f is not first)
            other_due = other.snapshot().next_check_mono
            assert other_due is not None
            await r.run_until(lambda: first.state is DeviceState.ONLINE)
            await r.run_until(lambda: other.state is DeviceState.ONLINE)
            assert clock.monotonic() < other_due  # woken by the peer, before its own backoff ended
            await r.drained(device="fan")
            await r.drained(device="pump")


async def test_strict_quotas_backlog_uses_the_day_and_then_waits(tmp_path: Path, clock: FakeClock) -> None:
    limits = {"points_per_day": 3000, "messages_per_month": 400, "batch_max_points": 500}
    sim_limits = SimLimits(points_per_day=3000, messages_per_month=400, batch_max_points=500)
    async with sim_cloud(clock, limits=sim_limits) as sim:
        config = make_config(tmp_path, str(sim.url), limits=limits, live=0.2)
        old = clock.wall_ms() - HOUR_MS
        backlog = [Point("pump", 2, old + i, i) for i in range(6000)] + [
            Point("pump", 1, old + i, float(i)) for i in range(4000)
        ]
        async with rig(config, backlog, clock=clock) as r:
            await r.run_until(lambda: sum(1 for p in sim.points(TOKEN) if p.path == "history") >= 2700)
            for i in range(5):
                await r.buffer.submit([Point("pump", 1, clock.wall_ms(), 0.5 + i)])
                await clock.advance(0.25)
            settled = len(sim.requests)
            await clock.advance(600)
            counts = await r.ledger()
            budget = await r.buffer.budget("pump", clock.wall())
            waiting = r.forwarder.snapshot().waiting
        history = [p for p in sim.points(TOKEN) if p.path == "history"]
        assert all(req.status == 200 for req in sim.requests), [req.error for req in sim.requests if req.status != 200]
        assert 2700 <= len(history) <= 3000
        assert budget.points_day <= 3000
        assert {p.pin for p in history} == {1, 2}  # both pins got a share
        assert counts["delivered_live"] >= 1  # live still flows (paced to the month's messages) while history waits
        assert len(sim.requests) - settled <= 1  # no hammering once the day's points are spent
        assert waiting is WaitReason.POINTS_BUDGET
        assert adds_up(counts)


@pytest.mark.parametrize("moment", sorted(CALENDAR))
async def test_live_paced_by_the_monthly_message_budget(tmp_path: Path, moment: str) -> None:
    clock = FakeClock(wall=CALENDAR[moment])
    async with sim_cloud(clock, limits=SimLimits(messages_per_month=400)) as sim:
        config = make_config(tmp_path, str(sim.url), limits={"messages_per_month": 400}, live=0.2)
        async with rig(config, clock=clock) as r:
            await r.idle()
            for i in range(10):
                await r.buffer.submit([Point("pump", 1, clock.wall_ms(), float(i))])
                await clock.advance(0.1)
            await r.run_until(lambda: len(sim.requests) >= 1)
            await clock.advance(0.5)
            interval = r.forwarder.snapshot().live_interval_s
        live_requests = [req for req in sim.requests if req.method == "GET"]
        assert all(req.status == 200 for req in sim.requests)  # the cloud enforces the 400 a month too
        seconds_left = next_utc_month_s(CALENDAR[moment]) - CALENDAR[moment]
        assert interval is not None
        if seconds_left > 3600:
            # The month's 400 messages, half of them live, spread over what is left of it.
            assert interval == pytest.approx(seconds_left / (400 * 0.5), rel=0.01)
            assert len(live_requests) == 1  # one live update, then paced to the month's budget
        else:
            # Seconds before the month ends: what is left of its budget is spent, not hoarded.
            assert len(live_requests) >= 2


@pytest.mark.parametrize("moment", sorted(CALENDAR))
async def test_the_month_turns_over_and_the_new_budget_flows(tmp_path: Path, moment: str) -> None:
    """At any moment of any month: the last message is paced to the month's end, the new month's flow at once."""
    clock = FakeClock(wall=CALENDAR[moment])
    async with sim_cloud(clock, limits=SimLimits(messages_per_month=2)) as sim:
        config = make_config(tmp_path, str(sim.url), limits={"messages_per_month": 2, "max_age_days": 60}, live=0)
        old = clock.wall_ms() - 60_000
        async with rig(config, [Point("pump", 1, old, 1.0)], clock=clock) as r:
            await r.run_until(lambda: len(sim.points(TOKEN, 1)) == 1)
            month = next_utc_month_s(clock.wall())
            await r.buffer.submit([Point("pump", 2, clock.wall_ms(), 7)])
            await r.idle()
            snapshot = r.forwarder.snapshot()
            assert snapshot.waiting is WaitReason.PACING and snapshot.by_design
            assert snapshot.next_attempt_wall is not None and snapshot.next_attempt_wall <= month + 1
            await r.drained(within_s=40 * DAY_S)
        arrived = sim.points(TOKEN, 2)[0].arrived_ms / 1000
        assert month <= arrived < month + 60  # the new month's messages, spent as soon as it began
        assert all(req.status == 200 for req in sim.requests)


async def test_downsample_thins_what_would_expire_and_keeps_extremes(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock, limits=SimLimits(points_per_day=300, max_age_days=1)) as sim:
        config = make_config(
            tmp_path,
            str(sim.url),
            limits={"points_per_day": 300, "max_age_days": 1},
            live=0,
            forward={"over_quota": "downsample"},
        )
        start = clock.wall_ms() - int(23.5 * HOUR_MS)
        values = [float((i * 37) % 1000) for i in range(3000)]
        values[1234], values[2222] = -500.0, 5000.0
        backlog = [Point("pump", 1, start + i * 600, values[i]) for i in range(3000)]
        async with rig(config, backlog, clock=clock) as r:
            await r.run_until(lambda: len(sim.points(TOKEN, 1)) >= 290)
            await clock.advance(0.5)
            counts = await r.ledger()
        sent = [p.value for p in sim.points(TOKEN, 1)]
        assert all(req.status == 200 for req in sim.requests)
        assert counts["downsampled"] >= 2600 and adds_up(counts)
        assert counts["delivered_history"] == len(sent) <= 300
        assert -500.0 in sent and 5000.0 in sent


async def test_unknown_refusal_retried_slowly_then_delivered(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=0)
        sim.outage = "error:Something the docs never mention"
        now = clock.wall_ms()
        async with rig(config, [Point("pump", 1, now - 1000, 1.0), Point("pump", 1, now - 900, 2.0)], clock=clock) as r:
            await r.run_until(lambda: len(sim.requests) >= 3)
            await r.idle()
            snapshot = r.forwarder.snapshot()
            assert snapshot.reason is not None and "Something" in snapshot.reason
            assert snapshot.waiting is WaitReason.REFUSED
            sim.outage = None
            counts = await r.drained()
        assert counts["delivered_history"] == 2 and counts["rejected"] == 0


async def test_a_pin_the_cloud_keeps_failing_does_not_hold_back_the_others(tmp_path: Path, clock: FakeClock) -> None:
    # Every history POST of v1 gets a 400 no document names; v2 is fine. v1 comes first in a round.
    async with sim_cloud(clock) as sim:
        sim.pin_failures = {1: "Something the docs never mention"}
        config = make_config(tmp_path, str(sim.url), live=0)
        now = clock.wall_ms()
        points = [Point("pump", pin, now - 1000 + i, i if pin == 2 else float(i)) for i in range(20) for pin in (1, 2)]

        def failed_v1() -> int:
            return sum(1 for r in sim.requests if r.status == 400 and "pin=v1" in r.query)

        async with rig(config, points, clock=clock) as r:
            await r.run_until(lambda: sum(1 for p in sim.points(TOKEN) if p.pin == 2) == 20)
            # v2 went in the round after v1's first failure, not after v1's ten (the account might be broken).
            assert failed_v1() <= 2
            counts = await r.drained()
        # v2 succeeding told it was v1's batch: bisected after 3 failures, each point dead-lettered alone.
        assert counts["delivered_history"] == 20 and counts["rejected"] == 20 and adds_up(counts)


async def test_value_refused_by_pattern_isolated_alone(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock, devices=[SimDevice(TOKEN, "pump", SIM_PINS, refuse={2: "^13$"})]) as sim:
        config = make_config(tmp_path, str(sim.url), live=0)
        async with rig(config, [Point("pump", 2, clock.wall_ms() - 1000 + i, i) for i in range(20)], clock=clock) as r:
            counts = await r.drained()
        assert counts["rejected"] == 1 and counts["delivered_history"] == 19 and adds_up(counts)


async def test_a_live_value_the_cloud_refuses_is_excluded_alone(tmp_path: Path, clock: FakeClock) -> None:
    """A multi-pin GET refused for one value: the other pins still go live, the refused one by history."""
    sims = [SimDevice(TOKEN, "pump", SIM_PINS, refuse={2: "^13$"})]
    async with sim_cloud(clock, devices=sims) as sim:
        config = make_config(tmp_path, str(sim.url), live=1, limits={"messages_per_month": 0})
        async with rig(config, clock=clock) as r:
            await r.idle()
            now = clock.wall_ms()
            await r.buffer.submit([Point("pump", 1, now, 1.5), Point("pump", 2, now, 13), Point("pump", 3, now, "x")])
            counts = await r.drained()
        live = {(p.pin, p.value) for p in sim.points(TOKEN) if p.path == "live"}
        assert live == {(1, 1.5), (3, "x")}  # halved until the refused value stood alone
        assert counts["delivered_live"] == 2 and counts["rejected"] == 1 and adds_up(counts)


async def test_live_sends_only_changed_pins_and_respects_deadband(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        devices = [
            {"name": "pump", "token": TOKEN, "pins": {"v1": {"type": "double", "deadband": 0.5}, "v2": "integer"}}
        ]
        config = make_config(tmp_path, str(sim.url), limits={"messages_per_month": 0}, devices=devices)
        async with rig(config, clock=clock) as r:
            await r.idle()
            for v1, v2 in [(20.0, 1), (20.3, 1), (21.0, 2)]:
                await r.buffer.submit([Point("pump", 1, clock.wall_ms(), v1), Point("pump", 2, clock.wall_ms(), v2)])
                await clock.advance(0.35)
            counts = await r.drained()
        live = [(p.pin, p.value) for p in sim.points(TOKEN) if p.path == "live"]
        assert (1, 20.3) not in live and (2, 1) in live and live.count((2, 1)) == 1
        assert (1, 21.0) in live and (2, 2) in live
        assert counts["delivered_live"] + counts["delivered_history"] == 6 and adds_up(counts)


async def test_429_retry_after_is_honored(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=0)
        sim.retry_after_s = 1.0
        sim.outage = "429"
        async with rig(config, [Point("pump", 1, clock.wall_ms() - 1000, 1.0)], clock=clock) as r:
            await r.run_until(lambda: r.forwarder.snapshot().waiting is WaitReason.RETRY_AFTER)
            await clock.advance(1.5)
            attempts_while_limited = len(sim.requests)
            sim.outage = None
            counts = await r.drained()
        # retry_max_s is 0.2 here: without Retry-After there would have been about eight attempts.
        assert attempts_while_limited <= 2
        assert counts["delivered_history"] == 1


async def test_cloud_quota_refusal_waits_for_the_reset(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=0)
        sim.outage = "error:Daily data points limit reached."
        async with rig(config, [Point("pump", 1, clock.wall_ms() - 1000, 1.0)], clock=clock) as r:
            await r.run_until(lambda: r.forwarder.snapshot().waiting is WaitReason.QUOTA)
            await clock.advance(3600)
            counts = await r.ledger()
            snapshot = r.forwarder.snapshot()
            assert len(sim.requests) == 1  # no hammering until the next UTC day
            sim.outage = None
            await r.drained(within_s=DAY_S)
        assert counts["queued"] == 1 and counts["rejected"] == 0
        assert snapshot.reason is not None and snapshot.reason.startswith("quota")
        assert snapshot.waiting is WaitReason.QUOTA and snapshot.by_design
        assert len(sim.requests) == 2 and clock.wall() >= next_utc_day_s(MID_MONTH)


async def test_a_wall_clock_step_neither_postpones_nor_hurries_a_deadline(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=0, forward={"history_interval_s": 60})
        async with rig(config, clock=clock) as r:
            await r.idle()
            due = r.forwarder.snapshot().next_check_mono
            assert due is not None
            clock.step_wall(-3 * 3600)  # NTP steps the clock back three hours
            r.forwarder.clock_stepped()
            await r.idle()
            assert r.forwarder.snapshot().next_check_mono == pytest.approx(due)
            clock.step_wall(+30 * 86400)
            r.forwarder.clock_stepped()
            await r.idle()
            assert r.forwarder.snapshot().next_check_mono == pytest.approx(due)
            assert len(sim.requests) == 0


async def test_a_wall_clock_step_re_derives_a_budget_deadline(tmp_path: Path, clock: FakeClock) -> None:
    async with sim_cloud(clock, limits=SimLimits(points_per_day=10)) as sim:
        config = make_config(tmp_path, str(sim.url), limits={"points_per_day": 10}, live=0)
        old = clock.wall_ms() - 60_000
        async with rig(config, [Point("pump", 2, old + i, i) for i in range(15)], clock=clock) as r:
            await r.run_until(lambda: r.forwarder.snapshot().waiting is WaitReason.POINTS_BUDGET)
            # The clock was wrong by a day: it is tomorrow already, and the new day's budget is there.
            clock.step_wall(DAY_S)
            r.forwarder.clock_stepped()
            took = await r.run_until(lambda: len(sim.points(TOKEN, 2)) == 15, within_s=DAY_S)
        assert took < 60


async def test_points_of_refused_or_failed_requests_are_given_back(tmp_path: Path, clock: FakeClock) -> None:
    sims = [SimDevice(TOKEN, "pump", SIM_PINS, refuse={2: "^13$"})]
    async with sim_cloud(clock, devices=sims, limits=SimLimits(points_per_day=100)) as sim:
        config = make_config(tmp_path, str(sim.url), limits={"points_per_day": 100}, live=0)
        sim.outage = "500"
        async with rig(config, [Point("pump", 2, clock.wall_ms() - 1000 + i, i) for i in range(40)], clock=clock) as r:
            await r.run_until(lambda: len(sim.requests) >= 3)
            sim.outage = None
            counts = await r.drained()
            budget = await r.buffer.budget("pump", clock.wall())
        # Three failed attempts and a bisection for the refused value: only the 39 imported points count.
        assert counts["delivered_history"] == 39 and counts["rejected"] == 1
        assert budget.points_day == 39
        assert budget.messages_month == len(sim.requests)


async def test_unknown_refusals_memory_is_bounded(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin whose queue grows while the cloud keeps refusing: each retry is a new batch, and each is counted."""
    monkeypatch.setattr(history_module, "UNKNOWN_REFUSALS_REMEMBERED", 3)
    async with sim_cloud(clock) as sim:
        config = make_config(tmp_path, str(sim.url), live=0)
        sim.outage = "error:Something the docs never mention"
        async with rig(config, [Point("pump", 1, clock.wall_ms() - 60_000, 1.0)], clock=clock) as r:
            sizes: list[int] = []
            for i in range(8):
                await r.run_until(lambda i=i: len(sim.requests) > i)
                history = r.forwarder._history  # the bound is the point of this test
                assert history is not None
                sizes.append(len(history._unknown))
                await r.buffer.submit([Point("pump", 1, clock.wall_ms() - 50_000 + i, 2.0 + i)])
        assert max(sizes) == 3 and sizes[-1] == 3  # remembered up to the bound, and no further


def test_history_batch_respects_bytes() -> None:
    points = [QueuedPoint(i, 1, 1_764_000_000_000 + i, "1.5") for i in range(100)]
    batch = build_history_batch(points, 200)
    assert len(batch.body) <= 200
    assert batch.body.startswith(b"[[1764000000000,1.5],")
    assert len(batch.points) == (200 - 2) // len(b"[1764000000000,1.5],")
