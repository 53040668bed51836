"""The quota planner: pure functions, checked with hypothesis for every backlog and budget."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeforward.forward.planner import (
    PinBacklog,
    allocate_points,
    clear_eta_s,
    downsample_keep,
    history_messages_left,
    live_interval_s,
)

backlog_lists = st.lists(
    st.builds(
        PinBacklog,
        pin=st.integers(0, 255),
        count=st.integers(0, 100_000),
        urgent=st.integers(0, 100_000),
        priority=st.floats(0.1, 10),
    ),
    max_size=12,
    unique_by=lambda b: b.pin,
)


@settings(max_examples=300, deadline=None)
@given(backlog_lists, st.integers(0, 200_000))
def test_allocation_never_exceeds_budget_or_backlog_and_wastes_nothing(backlogs: list[PinBacklog], budget: int) -> None:
    allocation = allocate_points(backlogs, budget)
    assert sum(allocation.values()) <= budget
    for backlog in backlogs:
        assert 0 <= allocation[backlog.pin] <= backlog.count
    total = sum(b.count for b in backlogs)
    assert sum(allocation.values()) == min(budget, total)


@settings(max_examples=300, deadline=None)
@given(backlog_lists, st.integers(0, 200_000))
def test_urgent_points_come_first(backlogs: list[PinBacklog], budget: int) -> None:
    allocation = allocate_points(backlogs, budget)
    urgent_total = sum(min(b.urgent, b.count) for b in backlogs)
    if budget >= urgent_total:
        for backlog in backlogs:
            assert allocation[backlog.pin] >= min(backlog.urgent, backlog.count)


def test_priority_weights_share_the_budget() -> None:
    allocation = allocate_points([PinBacklog(1, 10_000, 0, 3.0), PinBacklog(2, 10_000, 0, 1.0)], 4000)
    assert allocation == {1: 3000, 2: 1000}
    unlimited = allocate_points([PinBacklog(1, 5)], None)
    assert unlimited == {1: 5}


def test_small_pin_leaves_its_share_to_others() -> None:
    allocation = allocate_points([PinBacklog(1, 100), PinBacklog(2, 10_000)], 3000)
    assert allocation == {1: 100, 2: 2900}


@given(st.floats(0.1, 3600), st.integers(0, 1_000_000), st.floats(1, 31 * 86400), st.floats(0, 1))
def test_live_interval_never_faster_than_configured_and_within_share(
    base: float, left: int, seconds: float, share: float
) -> None:
    interval = live_interval_s(base, left, seconds, share)
    assert interval >= base
    if not math.isinf(interval):
        assert seconds / interval <= left * share + 1e-6


def test_live_interval_unlimited_and_off() -> None:
    assert live_interval_s(10, None, 1000, 0.5) == 10
    assert live_interval_s(0, 100, 1000, 0.5) == 0
    assert math.isinf(live_interval_s(10, 1, 1000, 0.5))
    # 1 Hz wish, 100,000 messages a month, half for live, 30 days left: one update every ~52 s.
    assert round(live_interval_s(1, 100_000, 30 * 86400, 0.5)) == 52


@given(st.integers(0, 1_000_000) | st.none(), st.floats(0, 1), st.booleans())
def test_history_keeps_the_live_share(left: int | None, share: float, live: bool) -> None:
    history = history_messages_left(left, share, live)
    if left is None:
        assert history is None
    else:
        assert history is not None and 0 <= history <= left
        if live:
            assert left - history >= left * share - 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1000, 1000), min_size=1, max_size=500), st.integers(3, 200))
def test_downsample_keeps_each_bucket_extremes(values: list[float], keep: int) -> None:
    timestamps = [1_764_000_000_000 + 1000 * i for i in range(len(values))]
    kept = downsample_keep(timestamps, values, keep)
    assert kept == sorted(set(kept))
    assert len(kept) <= max(keep, 0) or len(kept) == len(values)
    if len(values) <= keep:
        assert kept == list(range(len(values)))
    else:
        assert min(values) in {values[i] for i in kept}
        assert max(values) in {values[i] for i in kept}


def test_clear_eta() -> None:
    midnight = 1_764_028_800.0
    assert clear_eta_s(0, 10_000, 0, midnight - 100) == 0
    assert clear_eta_s(5000, 10_000, 6000, midnight - 100) == 0
    assert clear_eta_s(25_000, 10_000, 5000, midnight - 100) == 100 + 86400
    assert clear_eta_s(25_000, 0, 0, midnight) is None


@given(st.floats(0.1, 3600), st.integers(0, 1_000_000) | st.none(), st.floats(1, 31 * 86400), st.integers(0, 256))
def test_history_rounds_spread_over_the_month(base: float, messages: int | None, seconds: float, pins: int) -> None:
    from edgeforward.forward.planner import history_interval_s

    interval = history_interval_s(base, messages, seconds, pins)
    assert interval >= min(base, seconds) or (messages is not None and messages < 1)
    if messages is not None and messages >= 1:
        rounds = seconds / interval
        assert rounds * max(1, pins) <= messages + 1e-6
