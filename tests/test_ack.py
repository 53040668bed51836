"""ACK and MCU time end to end: the test plays a microcontroller with a ring buffer on a pty."""

from __future__ import annotations

import asyncio
import os
import select
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeforward.cloudsim import CloudSim
from edgeforward.ingest.mcu_clock import MCU_COUNTER_SPAN

from .conftest import TOKEN, DaemonProcess, Pty, wait_for, write_config

ACK_TIMEOUT_S = 10.0
STATUS_TIMEOUT_S = 20.0
DELIVERY_TIMEOUT_S = 30.0
STATUS_POLL_S = 0.3
UNLIMITED = {"messages_per_month": 0}  # no message budget: the forwarder runs at its test intervals
TS_TOLERANCE_MS = 250  # the anchor is off by the least delay of a fresh line: milliseconds, unless very loaded
OUTAGE_STEP_S = 0.25
OUTAGE_READINGS = 8
MIN_REPLAY_AGE_MS = 1_000
PUMP = {"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer", "v3": "string"}}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_pty() -> Pty:
    master, slave = os.openpty()
    tty.setraw(slave)
    return Pty(master, slave, os.ttyname(slave))


def repoint(link: Path, target: str) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


class Mcu:
    """The microcontroller's side of a pty: writes readings, reads ACK lines."""

    def __init__(self, pty: Pty) -> None:
        self.pty = pty
        self._buffer = b""

    def send(self, line: str) -> None:
        self.pty.write(line + "\n")

    async def acks(self, count: int) -> list[int]:
        """Read `count` ACK lines (in arrival order)."""
        got: list[int] = []
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while len(got) < count:
            while b"\n" in self._buffer and len(got) < count:
                line, self._buffer = self._buffer.split(b"\n", 1)
                word, _, number = line.decode().partition(" ")
                assert word == "ACK", line
                got.append(int(number))
            if len(got) == count:
                break
            left = deadline - time.monotonic()
            assert left > 0, f"only {got} acknowledged"
            if await asyncio.to_thread(self._readable, min(left, 0.2)):
                self._buffer += os.read(self.pty.master, 4096)
        return got

    def _readable(self, within_s: float) -> bool:
        return bool(select.select([self.pty.master], [], [], within_s)[0])

    def nothing_pending(self) -> bool:
        return not self._buffer and not select.select([self.pty.master], [], [], 0)[0]


@pytest.fixture
def link(tmp_path: Path) -> Path:
    return tmp_path / "usb-Acme_Logger_1234-if00"


@pytest.fixture
def first_pty(link: Path) -> Iterator[Pty]:
    pty = make_pty()
    repoint(link, pty.path)
    yield pty
    pty.close()


async def start(tmp_path: Path, cloud: CloudSim, link: Path, factory: Callable[[Path], DaemonProcess]) -> DaemonProcess:
    config = write_config(
        tmp_path, str(cloud.url), [{"path": str(link), "device": "pump", "ack": True}], [PUMP], limits=UNLIMITED
    )
    daemon = factory(config)
    daemon.start()
    await daemon.wait_started()
    await wait_port(daemon, str(link), lambda entry: entry["state"] == "open")
    return daemon


async def wait_port(daemon: DaemonProcess, path: str, check: Callable[[dict[str, object]], bool]) -> None:
    await wait_for(lambda: check(daemon.status()["ports"][path]), STATUS_TIMEOUT_S, interval=STATUS_POLL_S)


async def test_ack_only_after_commit_and_in_order(
    tmp_path: Path, cloud: CloudSim, link: Path, first_pty: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    daemon = await start(tmp_path, cloud, link, daemon_factory)
    mcu = Mcu(first_pty)
    boot = now_ms() - 60_000
    for seq in range(1, 4):
        mcu.send(f"v2={seq} seq={seq} ms={now_ms() - boot}")
        assert await mcu.acks(1) == [seq]
        # Acknowledged means committed: the buffer's ledger already counts it.
        assert daemon.status()["devices"]["pump"]["received"] >= seq
    mcu.send("v2=4 seq=4 ms=bad")  # rejected: never acknowledged
    mcu.send("v2=5 ms=1")  # no seq: nothing to acknowledge (and ms going back: a reboot)
    mcu.send("v2=6 seq=6 ms=2")
    mcu.send("v2=7 seq=7 ts=" + str(now_ms()))
    burst = range(100, 160)
    mcu.pty.write("".join(f"v2={seq} v1={seq / 2} seq={seq} ms={3 + seq}\n" for seq in burst))
    assert await mcu.acks(2 + len(burst)) == [6, 7, *burst]
    await asyncio.sleep(STATUS_POLL_S)
    assert mcu.nothing_pending()
    await wait_for(lambda: len(cloud.points(TOKEN, 2)) == 5 + 1 + len(burst), DELIVERY_TIMEOUT_S, STATUS_POLL_S)
    assert daemon.stop() == 0
    assert sorted(p.value for p in cloud.points(TOKEN, 2)) == [1, 2, 3, 5, 6, 7, *burst]


async def test_replay_after_reconnect_gets_past_timestamps_then_reboot_and_wrap(
    tmp_path: Path, cloud: CloudSim, link: Path, first_pty: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    daemon = await start(tmp_path, cloud, link, daemon_factory)
    mcu = Mcu(first_pty)
    boot = now_ms() - 3_600_000  # the MCU has been up an hour
    for seq in range(1, 4):
        mcu.send(f"v2={seq} seq={seq} ms={now_ms() - boot}")
        await asyncio.sleep(0.05)
    assert await mcu.acks(3) == [1, 2, 3]

    # Unplugged: the MCU keeps measuring into its ring buffer.
    first_pty.close()
    os.unlink(link)  # as udev removes the by-id link (the pty's number may be reused at once)
    taken: dict[int, int] = {}
    for seq in range(4, 4 + OUTAGE_READINGS):
        taken[seq] = now_ms()
        await asyncio.sleep(OUTAGE_STEP_S)
    await wait_port(daemon, str(link), lambda entry: entry["state"] == "absent")

    # Plugged in again (a new tty behind the same by-id link): replay the unacknowledged, then go on.
    second = make_pty()
    try:
        repoint(link, second.path)
        await wait_port(daemon, str(link), lambda entry: entry["state"] == "open" and entry["reconnects"] == 1)
        mcu = Mcu(second)
        replay = "".join(f"v2={seq} seq={seq} ms={ts - boot}\n" for seq, ts in taken.items())
        fresh_seq = 4 + OUTAGE_READINGS
        mcu.pty.write(replay + f"v2={fresh_seq} seq={fresh_seq} ms={now_ms() - boot}\n")
        assert await mcu.acks(OUTAGE_READINGS + 1) == [*taken, fresh_seq]

        # The MCU reboots: millis() starts again near 0, stamped on arrival.
        rebooted_at = now_ms()
        mcu.send("v2=500 seq=1 ms=20")
        # Later it runs 49.7 days and millis() wraps: fresh lines just before the wrap,
        # then lines taken just after it, sent late (as a replay): still their own time.
        wrap_boot = now_ms() - (MCU_COUNTER_SPAN - 3_000)
        for seq in (600, 601):
            mcu.send(f"v2={seq} seq={seq} ms={now_ms() - wrap_boot}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(3.5)  # the counter wraps meanwhile
        after_wrap = {602: now_ms() - 1_200, 603: now_ms() - 1_100}
        mcu.pty.write(
            "".join(f"v2={seq} seq={seq} ms={(ts - wrap_boot) % MCU_COUNTER_SPAN}\n" for seq, ts in after_wrap.items())
            + f"v2=604 seq=604 ms={(now_ms() - wrap_boot) % MCU_COUNTER_SPAN}\n"
        )
        assert await mcu.acks(6) == [1, 600, 601, 602, 603, 604]
    finally:
        second.close()

    await wait_for(
        lambda: len(cloud.points(TOKEN, 2)) == 3 + OUTAGE_READINGS + 1 + 6, DELIVERY_TIMEOUT_S, STATUS_POLL_S
    )
    assert daemon.stop() == 0
    points = {p.value: p for p in cloud.points(TOKEN, 2)}
    for seq, ts in taken.items():
        point = points[seq]
        assert point.path == "history"
        assert abs(point.ts_ms - ts) <= TS_TOLERANCE_MS, (seq, point.ts_ms - ts)
    assert points[4].arrived_ms - points[4].ts_ms >= MIN_REPLAY_AGE_MS  # really in the past
    assert abs(points[500].ts_ms - rebooted_at) <= TS_TOLERANCE_MS + 1_000
    for seq, ts in after_wrap.items():
        assert points[seq].path == "history"
        assert abs(points[seq].ts_ms - ts) <= TS_TOLERANCE_MS, (seq, points[seq].ts_ms - ts)
