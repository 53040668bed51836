"""Break 5 of issue 12: a kill -9 during a drain resends at most the one batch in flight per device."""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from edgeforward.cloudsim import CloudSim
from edgeforward.points import Point

from .conftest import TOKEN, DaemonProcess, ledger_adds_up, open_buffer, wait_for, write_config

BATCH_MAX_POINTS = 2000
POINTS_PER_PIN = 30_000
PINS = (1, 2)
KILLS = 5
SEED = 5
REQUESTS_PER_SECOND = 4  # a drain of several seconds, so every kill lands in the middle of it
ARRIVAL_POLL_S = 0.001
START_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 120.0


async def queue_backlog(path: Path) -> None:
    """Queue POINTS_PER_PIN distinct values on each pin of `pump`, stamped within the last hour."""
    start_ms = int(time.time() * 1000) - 3_600_000
    async with open_buffer(path) as buffer:
        for first in range(0, POINTS_PER_PIN, 5000):
            await buffer.submit(
                [Point("pump", pin, start_ms + n, n) for n in range(first, first + 5000) for pin in PINS]
            )


def copies(cloud: CloudSim) -> Counter[tuple[int, object]]:
    """How many times each (pin, value) reached the cloud."""
    return Counter((point.pin, point.value) for point in cloud.points(TOKEN))


def arrived(cloud: CloudSim, count: int) -> bool:
    return len(cloud.points(TOKEN)) >= count


def duplicates(cloud: CloudSim) -> int:
    return sum(count - 1 for count in copies(cloud).values())


async def test_each_kill_during_a_drain_resends_at_most_one_batch(
    tmp_path: Path, cloud: CloudSim, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    await queue_backlog(tmp_path / "buffer.db")
    config = write_config(
        tmp_path,
        str(cloud.url),
        [],
        [{"name": "pump", "token": TOKEN, "pins": {f"v{pin}": "integer" for pin in PINS}}],
        forward={"live_interval_s": 0},  # history only: every point goes in a batch of the drain
        limits={
            "batch_max_points": BATCH_MAX_POINTS,
            "points_per_day": 0,
            "requests_per_second": REQUESTS_PER_SECOND,
        },
    )
    rng = random.Random(SEED)
    resent: list[int] = []
    before = 0
    for _ in range(KILLS):
        daemon = daemon_factory(config)
        daemon.start()
        await daemon.wait_started()
        # The worst moment: the cloud has just taken a batch, its answer and the delivery's commit are on their
        # way (a delivery that trailed the next request would show here as a second batch sent again).
        target = len(cloud.points(TOKEN)) + rng.randint(1, 3) * BATCH_MAX_POINTS
        await wait_for(functools.partial(arrived, cloud, target), START_TIMEOUT_S, ARRIVAL_POLL_S)
        daemon.kill()
        entry = daemon.status()["devices"]["pump"]
        assert ledger_adds_up(entry) and entry["queued"] > 0, entry  # killed mid-drain, the ledger exact
        now = duplicates(cloud)
        resent.append(now - before)  # copies the run after the previous kill sent again
        before = now
    final = daemon_factory(config)
    final.start()
    await final.wait_started()
    await wait_for(lambda: final.status()["devices"]["pump"]["queued"] == 0, DRAIN_TIMEOUT_S, 0.3)
    assert final.stop() == 0
    resent.append(duplicates(cloud) - before)
    # Each run resends what the kill before it left in flight: at most one batch (one device, one request).
    assert all(count <= BATCH_MAX_POINTS for count in resent), resent
    seen = copies(cloud)
    assert set(seen) == {(pin, n) for pin in PINS for n in range(POINTS_PER_PIN)}  # nothing lost
    entry = final.status()["devices"]["pump"]
    assert entry["delivered"] == entry["received"] == len(PINS) * POINTS_PER_PIN and ledger_adds_up(entry)
