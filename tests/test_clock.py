"""Clocks without an RTC: trust rule, jumps, readings held on the monotonic clock and rebased, real SQLite."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import re
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeforward.clock import (
    META_CLOCK,
    META_CLOCK_TRUSTED_BOOT,
    RELEASE_FLOOR_MS,
    TIME_ERROR,
    ClockSources,
    ClockWatcher,
    KernelSync,
    assess,
    hardware_clock,
    read_adjtimex,
    read_boot_id,
    timesyncd_synchronized,
)
from edgeforward.cloudsim import CloudSim, SimDevice
from edgeforward.config import Config, parse_config
from edgeforward.forward import Forwarder
from edgeforward.ingest.parsers import parse_line
from edgeforward.ingest.parsers.common import ParseContext, Rejected
from edgeforward.ingest.pipeline import PortPipeline
from edgeforward.points import PinType, Point
from edgeforward.store import META_HELD_UNSTAMPED, SCHEMA_VERSION, Buffer, Committed

from .conftest import TOKEN, DaemonProcess, Pty, open_buffer, wait_for, write_config

BOOT = "11111111-2222-3333-4444-555555555555"
OLD_BOOT = "99999999-8888-7777-6666-555555555555"
# A Pi without RTC restored the time it shut down at: months before the real time.
STALE_WALL_MS = RELEASE_FLOOR_MS - 200 * 86_400_000
SYNCED = KernelSync(state=0, status=0, maxerror_us=1000)
UNSYNCED = KernelSync(state=TIME_ERROR, status=0x40, maxerror_us=16_000_000)
CHECK_INTERVAL_S = 0.02


def real_wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class FakeClock:
    """The gateway's clocks and sync state, moved by the test."""

    wall: int = STALE_WALL_MS
    mono: int = 40_000
    kernel: KernelSync | None = UNSYNCED
    flag: bool = False
    timesyncd: bool = False
    origin: str | None = None
    boot: str = BOOT

    def advance(self, ms: int) -> None:
        self.wall += ms
        self.mono += ms

    def sync(self) -> int:
        """NTP steps the wall clock to the real time and the kernel reports synchronized; return the step."""
        step = real_wall_ms() - self.wall
        self.wall += step
        self.kernel = SYNCED
        return step

    def sources(self) -> ClockSources:
        return ClockSources(
            wall_ms=lambda: self.wall,
            mono_ms=lambda: self.mono,
            kernel_sync=lambda: self.kernel,
            timesync_flag=lambda: self.flag,
            timesync_present=lambda: self.timesyncd,
            hardware_clock=lambda: self.origin,
            boot_id=lambda: self.boot,
        )


# the real system calls -------------------------------------------------------------------------


def test_adjtimex_answers_on_this_machine() -> None:
    kernel = read_adjtimex()
    assert kernel is not None
    assert 0 <= kernel.state <= TIME_ERROR
    assert kernel.maxerror_us >= 0
    assert isinstance(kernel.synchronized, bool)
    assert kernel.synchronized == (kernel.state != TIME_ERROR and not kernel.status & 0x40)


def test_other_sources_answer_on_this_machine(tmp_path: Path) -> None:
    assert re.fullmatch(r"[0-9a-f-]{36}", read_boot_id())
    assert read_boot_id() == read_boot_id()
    assert hardware_clock() in (None, "rtc", "vm")
    assert not timesyncd_synchronized(tmp_path / "synchronized")
    (tmp_path / "synchronized").touch()
    assert timesyncd_synchronized(tmp_path / "synchronized")


def test_auto_trusts_this_ci_machine() -> None:
    """The default must not hold readings forever on a machine whose clock is right (CI, VM, container)."""
    kernel = read_adjtimex()
    expected = kernel is None or kernel.synchronized or timesyncd_synchronized() or hardware_clock() is not None
    assert ClockWatcher("auto").check().became_trusted == expected


# the trust rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("require", "clock", "trusted", "reason"),
    [
        (False, FakeClock(), True, "config"),
        ("auto", FakeClock(kernel=SYNCED), True, "adjtimex"),
        (True, FakeClock(kernel=SYNCED), True, "adjtimex"),
        ("auto", FakeClock(flag=True), True, "timesyncd"),
        (True, FakeClock(flag=True), True, "timesyncd"),
        # A Raspberry Pi before NTP: no RTC, unsynchronized, a restored (plausible looking) clock.
        ("auto", FakeClock(wall=RELEASE_FLOOR_MS + 10**9), False, "unsynchronized"),
        ("auto", FakeClock(origin="rtc", wall=RELEASE_FLOOR_MS + 1), True, "rtc"),
        ("auto", FakeClock(origin="vm", wall=RELEASE_FLOOR_MS + 1), True, "vm"),
        # An RTC with a flat battery: the floor vetoes it.
        ("auto", FakeClock(origin="rtc", wall=946_684_800_000), False, "rtc_before_floor"),
        (True, FakeClock(origin="rtc", wall=RELEASE_FLOOR_MS + 1), False, "unsynchronized"),
        ("auto", FakeClock(kernel=None, wall=RELEASE_FLOOR_MS + 1), True, "no_adjtimex"),
        ("auto", FakeClock(kernel=None, wall=0), False, "no_adjtimex_before_floor"),
        # Under ProtectClock= adjtimex is filtered; with timesyncd running, its flag decides.
        ("auto", FakeClock(kernel=None, timesyncd=True, wall=RELEASE_FLOOR_MS + 1), False, "unsynchronized"),
        ("auto", FakeClock(kernel=None, timesyncd=True, flag=True), True, "timesyncd"),
    ],
)
def test_trust_rule(require: Any, clock: FakeClock, trusted: bool, reason: str) -> None:
    trust = assess(require, clock.sources())
    assert (trust.trusted, trust.reason) == (trusted, reason)


def test_floor_includes_last_trusted_time() -> None:
    clock = FakeClock(origin="vm", wall=RELEASE_FLOOR_MS + 1000)
    assert assess("auto", clock.sources(), floor_ms=RELEASE_FLOOR_MS + 2000).reason == "vm_before_floor"


def test_jump_detection_and_sticky_trust() -> None:
    clock = FakeClock(kernel=SYNCED, wall=real_wall_ms())
    watcher = ClockWatcher("auto", sources=clock.sources())
    assert watcher.check().became_trusted
    clock.advance(10_000)
    assert watcher.check().jump_ms is None
    clock.wall += 1_500  # NTP slews or small steps below the threshold are not jumps
    assert watcher.check().jump_ms is None
    clock.wall -= 3_600_000
    check = watcher.check()
    assert check.jump_ms == -3_600_000 and not check.became_trusted
    clock.wall += 5_000
    assert watcher.check().jump_ms == 5_000
    assert watcher.jumps == 2 and watcher.last_jump_ms == 5_000
    # Hours without NTP make the kernel say "unsynchronized" again; the clock stays trusted this boot.
    clock.kernel = UNSYNCED
    assert watcher.check().jump_ms is None and watcher.trusted


# the buffer: held readings, rebase, earlier boots ----------------------------------------------


def adds_up(counts: dict[str, int]) -> bool:
    return counts["received"] == sum(v for k, v in counts.items() if k != "received")


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return [tuple(row) for row in db.execute(sql)]


async def test_held_readings_are_committed_queued_and_not_sendable(tmp_path: Path) -> None:
    async with open_buffer(tmp_path / "buffer.db") as buffer:
        seen: list[Committed] = []
        buffer.add_listener(seen.extend)
        await buffer.hold([Point("pump", 1, 40_000, 1.0), Point("pump", 1, 41_000, 2.0)], BOOT)
        await buffer.submit([Point("pump", 2, real_wall_ms(), 7)])
        counts = await buffer.ledger("pump")
        assert counts["received"] == 3 and counts["queued"] == 3 and adds_up(counts)
        assert buffer.queued_total == 3
        assert await buffer.pins_queued("pump") == [2]
        assert await buffer.oldest("pump", 1, 10) == []
        assert await buffer.held_by_boot() == {BOOT: 2}
        assert [c.pins for c in seen] == [frozenset({2})]


async def test_rebase_gives_exact_wall_time_in_one_step(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with open_buffer(path) as buffer:
        seen: list[Committed] = []
        buffer.add_listener(seen.extend)
        await buffer.hold([Point("pump", 1, 40_000, 1.0), Point("pump", 1, 41_500, 2.0)], BOOT)
        wall_now, mono_now = 1_800_000_000_000, 100_000
        settled = await buffer.settle_held(BOOT, wall_now, mono_now)
        assert (settled.rebased, settled.stamped, settled.unstamped) == (2, 0, 0)
        batch = await buffer.oldest("pump", 1, 10)
        assert [p.ts_ms for p in batch] == [wall_now - 60_000, wall_now - 58_500]
        assert [p.value_json for p in batch] == ["1.0", "2.0"]
        counts = await buffer.ledger("pump")
        assert counts["received"] == 2 and counts["queued"] == 2 and adds_up(counts)
        assert await buffer.held_by_boot() == {}
        assert frozenset({1}) in [c.pins for c in seen]
        assert await buffer.meta(META_HELD_UNSTAMPED) == "0"
        assert (await buffer.settle_held(BOOT, wall_now, mono_now)).rebased == 0
    assert rows(path, "SELECT COUNT(*) FROM held") == [(0,)]


async def test_previous_boot_is_held_or_stamped_at_its_latest(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with open_buffer(path) as buffer:
        await buffer.hold([Point("pump", 1, 5_000, 1.0), Point("pump", 1, 9_000, 2.0)], OLD_BOOT)
        await buffer.hold([Point("pump", 1, 30_000, 3.0)], BOOT)
        wall_now, mono_now = 1_800_000_000_000, 60_000
        held = await buffer.settle_held(BOOT, wall_now, mono_now)
        assert (held.rebased, held.unstamped) == (1, 2)
        assert await buffer.meta(META_HELD_UNSTAMPED) == "2"
        assert await buffer.held_by_boot() == {OLD_BOOT: 2}
        assert adds_up(await buffer.ledger("pump"))
        stamped = await buffer.settle_held(BOOT, wall_now, mono_now, stamp_previous_boots=True)
        assert (stamped.stamped, stamped.unstamped) == (2, 0)
        boot_start = wall_now - mono_now
        ts = [p.ts_ms for p in await buffer.oldest("pump", 1, 10)]
        # The earlier boot ends where this one began, its readings keep their spacing.
        assert ts == [boot_start - 4_000, boot_start, wall_now - 30_000]
        counts = await buffer.ledger("pump")
        assert counts["queued"] == 3 and adds_up(counts)


async def test_point_cap_drops_held_only_after_sendable_points(tmp_path: Path) -> None:
    async with open_buffer(tmp_path / "buffer.db", max_points=3) as buffer:
        await buffer.hold([Point("pump", 1, 1_000 + i, float(i)) for i in range(2)], BOOT)
        await buffer.submit([Point("pump", 2, real_wall_ms(), 1)])
        await buffer.hold([Point("pump", 1, 5_000, 9.0)], BOOT)
        counts = await buffer.ledger("pump")
        assert counts["queued"] == 3 and counts["dropped"] == 1 and adds_up(counts)
        assert await buffer.pins_queued("pump") == []
        await buffer.hold([Point("pump", 1, 6_000, 10.0)], BOOT)
        counts = await buffer.ledger("pump")
        assert counts["queued"] == 3 and counts["dropped"] == 2 and adds_up(counts)
        assert await buffer.held_by_boot() == {BOOT: 3}


async def test_version_2_buffer_is_migrated_not_treated_as_damaged(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with open_buffer(path) as buffer:
        await buffer.submit([Point("pump", 1, real_wall_ms(), 1.0)])
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE held")
        db.execute("PRAGMA user_version = 2")
    async with open_buffer(path) as buffer:
        assert buffer.recovery is None
        await buffer.hold([Point("pump", 1, 1_000, 2.0)], BOOT)
        assert (await buffer.ledger("pump"))["queued"] == 2
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_salvage_keeps_held_readings(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with open_buffer(path) as buffer:
        await buffer.hold([Point("pump", 1, 1_000, 2.0)], BOOT)
    with path.open("r+b") as file:
        file.write(b"garbage garbage!")  # a broken header: recovery must salvage the held table too
    async with open_buffer(path) as buffer:
        assert buffer.recovery is not None and buffer.recovery.lost_points == 0
        assert await buffer.held_by_boot() == {BOOT: 1}
        assert adds_up(await buffer.ledger("pump"))


# the port pipeline and the forwarder, with an injected clock ----------------------------------


def pipeline_config(tmp_path: Path, server: str) -> Config:
    return parse_config(
        {
            # No monthly plan: its pacing follows the real calendar, and these tests are about the clock's trust.
            "cloud": {"server": server, "timeout_s": 2, "limits": {"messages_per_month": 0}},
            "buffer": {"path": str(tmp_path / "buffer.db")},
            "forward": {"live_interval_s": 0, "history_interval_s": 0.2, "retry_initial_s": 0.05},
            "port": [{"path": str(tmp_path / "no-such-port"), "device": "pump"}],
            "device": [{"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "double"}}],
        },
        tmp_path / "edgeforward.toml",
    )


@dataclass
class Gateway:
    buffer: Buffer
    pipeline: PortPipeline
    watcher: ClockWatcher
    clock: FakeClock
    resets: list[int] = field(default_factory=list)

    def line(self, text: str) -> None:
        self.pipeline.on_line(text.encode(), self.clock.wall, False)


@pytest.fixture
async def sim() -> AsyncIterator[CloudSim]:
    cloud = CloudSim([SimDevice(TOKEN, "pump", {1: PinType.DOUBLE, 2: PinType.DOUBLE})])
    await cloud.start()
    yield cloud
    await cloud.stop()


@asynccontextmanager
async def gateway(tmp_path: Path, sim: CloudSim, clock: FakeClock) -> AsyncIterator[Gateway]:
    config = pipeline_config(tmp_path, str(sim.url))
    watcher = ClockWatcher(sources=clock.sources(), check_interval_s=CHECK_INTERVAL_S)
    async with open_buffer(Path(config.buffer.path)) as buffer, aiohttp.ClientSession() as session:
        await watcher.load(buffer)
        pipeline = PortPipeline(config.ports[0], config, buffer.submit, clock=watcher, hold=buffer.hold)
        forwarder = Forwarder(config.devices[0], buffer, session, config.cloud, config.forward)

        def notify(committed: Sequence[Committed]) -> None:
            for item in committed:
                forwarder.notify(item.pins)

        buffer.add_listener(notify)
        rig = Gateway(buffer, pipeline, watcher, clock)

        def reset() -> None:
            rig.resets.append(clock.wall)
            pipeline.reset_clock()

        tasks = [asyncio.create_task(forwarder.run()), asyncio.create_task(watcher.run(buffer, reset))]
        try:
            yield rig
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def settle(condition: Callable[[], Any], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)


async def test_untrusted_readings_held_then_rebased_and_sent(tmp_path: Path, sim: CloudSim) -> None:
    clock = FakeClock()
    async with gateway(tmp_path, sim, clock) as gw:
        assert not gw.watcher.trusted
        own_ts = real_wall_ms() - 120_000
        gw.line("v1=1")  # stamped by the gateway: held
        clock.advance(1_000)
        gw.line("v1=2 ms=5000")  # mapped by the MCU clock: held (anchor on the monotonic clock)
        clock.advance(2_000)
        gw.line("v1=3 ms=7000")
        gw.line(f"v2=4 ts={own_ts}")  # carries its own time: sent at once
        await settle(lambda: _count(sim, 2, 1))
        await asyncio.sleep(0.3)  # a few forwarder rounds: nothing held may leave
        assert [p.pin for p in sim.points(TOKEN)] == [2]
        counts = await gw.buffer.ledger("pump")
        assert counts["received"] == 4 and counts["queued"] == 3 and adds_up(counts)
        assert await gw.buffer.held_by_boot() == {BOOT: 3}
        meta = json.loads(await gw.buffer.meta(META_CLOCK) or "{}")
        assert meta["trusted"] is False and meta["reason"] == "unsynchronized"

        clock.advance(10_000)
        step = clock.sync()
        synced_at = clock.wall
        await settle(lambda: _count(sim, 1, 3))
        arrived = sorted((p.ts_ms, p.value) for p in sim.points(TOKEN, 1))
        # 13 s, 12 s and 10 s before the sync, on the real wall clock (not the stale one).
        assert arrived == [(synced_at - 13_000, 1.0), (synced_at - 12_000, 2.0), (synced_at - 10_000, 3.0)]
        assert sim.points(TOKEN, 2)[0].ts_ms == own_ts
        assert step > 0 and gw.resets  # the MCU anchors were forgotten when the clock became trusted
        await settle(lambda: _drained(gw.buffer))
        counts = await gw.buffer.ledger("pump")
        assert counts["received"] == 4 and counts["queued"] == 0 and adds_up(counts)
        meta = json.loads(await gw.buffer.meta(META_CLOCK) or "{}")
        assert meta["trusted"] is True and meta["reason"] == "adjtimex"
        assert await gw.buffer.meta(META_CLOCK_TRUSTED_BOOT) == BOOT

        # Trusted now: readings are stamped with the wall clock straight away.
        clock.advance(500)
        gw.line("v1=5")
        await settle(lambda: _count(sim, 1, 4))
        assert max(p.ts_ms for p in sim.points(TOKEN, 1)) == clock.wall


async def test_jump_while_trusted_resets_mcu_anchors(tmp_path: Path, sim: CloudSim) -> None:
    clock = FakeClock(wall=real_wall_ms(), kernel=SYNCED)
    async with gateway(tmp_path, sim, clock) as gw:
        assert gw.watcher.trusted
        gw.line("v1=1 ms=1000")
        clock.advance(1_000)
        clock.wall += 30_000
        await settle(lambda: _true(bool(gw.resets)))
        assert gw.watcher.last_jump_ms == 30_000
        await settle(lambda: _meta_jumps(gw.buffer, 1))
        assert json.loads(await gw.buffer.meta(META_CLOCK) or "{}")["trusted"] is True
        # After the reset the anchor is taken afresh on the stepped clock: no reading lands 30 s off.
        gw.line("v1=2 ms=2000")
        await settle(lambda: _count(sim, 1, 2))
        assert max(p.ts_ms for p in sim.points(TOKEN, 1)) == clock.wall


async def test_restart_in_the_same_boot_keeps_trust(tmp_path: Path) -> None:
    clock = FakeClock(kernel=SYNCED, wall=real_wall_ms())
    path = tmp_path / "buffer.db"
    async with open_buffer(path) as buffer:
        watcher = ClockWatcher(sources=clock.sources())
        await watcher.load(buffer)
        await watcher.settle(buffer)
    clock.kernel = UNSYNCED
    async with open_buffer(path) as buffer:
        again = ClockWatcher(sources=clock.sources())
        await again.load(buffer)
        assert again.trust.reason == "earlier_this_boot"
        clock.boot = OLD_BOOT
        rebooted = ClockWatcher(sources=clock.sources())
        await rebooted.load(buffer)
        assert not rebooted.trusted


async def _count(sim: CloudSim, pin: int, count: int) -> bool:
    return len(sim.points(TOKEN, pin)) >= count


async def _drained(buffer: Buffer) -> bool:
    return (await buffer.ledger("pump"))["queued"] == 0


async def _true(value: bool) -> bool:
    return value


async def _meta_jumps(buffer: Buffer, jumps: int) -> bool:
    return int(json.loads(await buffer.meta(META_CLOCK) or "{}").get("jumps", 0)) >= jumps


# ingest rejects impossible timestamps ----------------------------------------------------------


@pytest.mark.parametrize("ts", ["0", "946684799999", "-1", "1764000000"])
def test_far_past_timestamps_rejected_at_ingest(ts: str) -> None:
    ctx = ParseContext(devices={"pump": {1: PinType.DOUBLE}}, default_device="pump", max_future_ms=86_400_000)
    result = parse_line(f"v1=1 ts={ts}".encode(), "kv", ctx, real_wall_ms())
    assert isinstance(result, Rejected) and result.reason == "bad_ts"


# the daemon: held while unsynchronized, sent after a restart that trusts the clock --------------


@pytest.mark.skipif(
    (read_adjtimex() or SYNCED).synchronized or timesyncd_synchronized(),
    reason="this machine's clock is NTP-synchronized: require_sync cannot make it untrusted",
)
async def test_daemon_holds_until_trusted(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    ports = [{"path": pty_port.path, "device": "pump"}]
    devices = [{"name": "pump", "token": TOKEN, "pins": {"v1": "double"}}]
    config = write_config(tmp_path, str(cloud.url), ports, devices, forward={"live_interval_s": 0})
    text = config.read_text()
    config.write_text(text + '\n[clock]\nrequire_sync = true\nprevious_boots = "hold"\n')
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    before = real_wall_ms()
    for value in range(3):
        pty_port.write(f"v1={value}\n")
    await wait_for(lambda: daemon.status()["devices"]["pump"]["received"] == 3, 15, interval=0.2)
    await asyncio.sleep(1.0)  # forwarder rounds at 0.5 s: none may send a held reading
    assert cloud.points(TOKEN) == []
    assert '"clock_untrusted"' in daemon.log()
    assert daemon.stop() == 0
    assert rows(tmp_path / "buffer.db", "SELECT COUNT(*) FROM held") == [(3,)]

    config.write_text(text + "\n[clock]\nrequire_sync = false\n")
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    await wait_for(lambda: len(cloud.points(TOKEN)) == 3, 15)
    after = real_wall_ms()
    stamps = [p.ts_ms for p in cloud.points(TOKEN)]
    # Rebasing goes through two clocks read in whole milliseconds: a millisecond either way is rounding.
    assert all(before - 2 <= ts <= after for ts in stamps), (before, after, stamps)
    # The cloud has them; the deliveries commit a moment later.
    await wait_for(lambda: daemon.status()["devices"]["pump"]["queued"] == 0, 15, interval=0.2)
    assert daemon.status()["devices"]["pump"]["received"] == 3
    assert daemon.stop() == 0


def test_libc_is_loaded_once_and_no_process_is_spawned(monkeypatch: pytest.MonkeyPatch) -> None:
    # read_adjtimex runs every second while the clock is untrusted (days on a Pi without network):
    # ctypes.util.find_library would spawn /sbin/ldconfig -p each time.
    read_adjtimex()
    loads: list[object] = []
    real_cdll = ctypes.CDLL

    def counting_cdll(*args: Any, **kwargs: Any) -> ctypes.CDLL:
        loads.append(args)
        return real_cdll(*args, **kwargs)

    def no_spawn(*args: Any, **_kwargs: Any) -> None:
        raise AssertionError(f"spawned a process: {args!r}")

    def no_find_library(name: str) -> None:
        raise AssertionError(f"find_library({name!r}) called")

    monkeypatch.setattr(ctypes, "CDLL", counting_cdll)
    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    monkeypatch.setattr(ctypes.util, "find_library", no_find_library)
    results = [read_adjtimex() for _ in range(5)]
    assert loads == []
    assert len({result is None for result in results}) == 1  # the same answer each time
