"""Quota planning as pure functions: how to spend a day's points and a month's messages."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class PinBacklog:
    """What one pin has queued: how many points, how many must go today to escape expiry, its weight."""

    pin: int
    count: int
    urgent: int = 0
    priority: float = 1.0


def live_interval_s(base_s: float, messages_left: int | None, seconds_left_in_month: float, live_share: float) -> float:
    """Return the live interval that spends at most `live_share` of the messages left, evenly to month end."""
    if base_s <= 0:
        return 0.0
    if messages_left is None:
        return base_s
    affordable = messages_left * live_share
    if affordable < 1:
        return math.inf
    return max(base_s, seconds_left_in_month / affordable)


def history_interval_s(
    base_s: float, history_messages: int | None, seconds_left_in_month: float, requests_per_round: int
) -> float:
    """Return the pause between history rounds that spreads history's messages evenly to month end."""
    if history_messages is None:
        return base_s
    if history_messages < 1:
        return seconds_left_in_month
    return max(base_s, seconds_left_in_month * max(1, requests_per_round) / history_messages)


def history_messages_left(messages_left: int | None, live_share: float, live_enabled: bool) -> int | None:
    """Return the messages history may spend now, keeping the live path's share of what is left."""
    if messages_left is None:
        return None
    if not live_enabled:
        return messages_left
    return max(0, messages_left - math.ceil(messages_left * live_share))


def allocate_points(backlogs: Sequence[PinBacklog], points_left: int | None) -> dict[int, int]:
    """Share today's point budget among pins: urgent points first, then by priority weight, never idle budget."""
    wanted = {b.pin: max(0, b.count) for b in backlogs}
    if points_left is None:
        return wanted
    budget = max(0, points_left)
    allocation = dict.fromkeys(wanted, 0)
    urgent = {b.pin: min(max(0, b.urgent), wanted[b.pin]) for b in backlogs}
    weights = {b.pin: b.priority if b.priority > 0 else 1.0 for b in backlogs}
    budget = _water_fill(urgent, weights, budget, allocation)
    remaining = {pin: wanted[pin] - allocation[pin] for pin in wanted}
    _water_fill(remaining, weights, budget, allocation)
    return allocation


def _water_fill(demand: Mapping[int, int], weights: Mapping[int, float], budget: int, out: dict[int, int]) -> int:
    """Give each pin up to its demand in proportion to its weight; return the budget left."""
    open_pins = {pin for pin, need in demand.items() if need > 0}
    given = dict.fromkeys(demand, 0)
    while budget > 0 and open_pins:
        total_weight = sum(weights[pin] for pin in open_pins)
        round_budget = budget
        progressed = False
        for pin in sorted(open_pins, key=lambda p: (-weights[p], p)):
            share = max(1, math.floor(round_budget * weights[pin] / total_weight))
            take = min(share, demand[pin] - given[pin], budget)
            if take > 0:
                given[pin] += take
                budget -= take
                progressed = True
            if given[pin] >= demand[pin]:
                open_pins.discard(pin)
            if budget == 0:
                break
        if not progressed:
            break
    for pin, amount in given.items():
        out[pin] = out.get(pin, 0) + amount
    return budget


def downsample_keep(timestamps: Sequence[int], values: Sequence[float], keep: int) -> list[int]:
    """Indices to keep so the series keeps its shape: per time bucket its min, max and last point."""
    count = len(timestamps)
    if keep >= count:
        return list(range(count))
    if keep <= 0:
        return []
    buckets = max(1, keep // 3)
    start, end = timestamps[0], timestamps[-1]
    span = max(1, end - start + 1)
    chosen: set[int] = set()
    bucket_members: dict[int, list[int]] = {}
    for index, ts in enumerate(timestamps):
        bucket = min(buckets - 1, (ts - start) * buckets // span)
        bucket_members.setdefault(bucket, []).append(index)
    for members in bucket_members.values():
        chosen.add(min(members, key=lambda i: (values[i], i)))
        chosen.add(max(members, key=lambda i: (values[i], -i)))
        chosen.add(members[-1])
    ordered = sorted(chosen)
    if len(ordered) > keep:
        # Rounding gave a few buckets three points: keep the extremes, drop surplus "last" points evenly.
        extremes = {min(m, key=lambda i: (values[i], i)) for m in bucket_members.values()} | {
            max(m, key=lambda i: (values[i], -i)) for m in bucket_members.values()
        }
        surplus = [i for i in ordered if i not in extremes]
        drop = set(surplus[: len(ordered) - keep])
        ordered = [i for i in ordered if i not in drop][:keep]
    return ordered


def clear_eta_s(queued: int, points_per_day: int, points_left_today: int, now_s: float) -> float | None:
    """Seconds until a backlog clears at the daily point budget (0 if it fits today, None if unlimited)."""
    if queued <= 0:
        return 0.0
    if points_per_day <= 0:
        return None
    if queued <= points_left_today:
        return 0.0
    after_today = queued - max(0, points_left_today)
    days = math.ceil(after_today / points_per_day)
    to_midnight = SECONDS_PER_DAY - (now_s % SECONDS_PER_DAY)
    return to_midnight + (days - 1) * SECONDS_PER_DAY
