"""The pipeline: the one parse-context builder, the port parser, the resend window, the saved MCU clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from edgeforward.config import parse_config
from edgeforward.ingest import pipeline as pipeline_module
from edgeforward.ingest.parsers.common import (
    MS_PER_DAY,
    Ignored,
    Reading,
)
from edgeforward.ingest.parsers.nmea import KNOTS_TO_KMH
from edgeforward.ingest.pipeline import PortParser, PortPipeline
from edgeforward.points import Point
from edgeforward.store import ResendKey

from ..conftest import Pty, wait_for
from .parsers.cases import (
    BU353_GSV,
    BU353_RMC,
    NOW,
    NZ,
    assert_reading,
    assert_rejected,
)
from .test_source import running


def test_port_parser_of_each_format(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "device": [
            {"name": "truck", "token": "t" * 32, "pins": {"v10": "location", "v11": "double"}},
            {"name": "pump", "token": "p" * 32, "pins": {"v1": "double", "v2": "integer"}},
        ],
        "port": [
            {
                "path": "/dev/ttyGPS",
                "format": "nmea",
                "device": "truck",
                "nmea": {"location": "v10", "speed_kmh": "v11"},
            },
            {"path": "/dev/ttyLOG", "format": "csv", "device": "pump", "header": True},
            {"path": "/dev/ttyACM0", "format": "kv", "device": "pump"},
        ],
    }
    config = parse_config(raw, tmp_path / "edgeforward.toml")
    gps, logger, mcu = (PortParser(config, port) for port in config.ports)
    assert gps.context.max_future_ms == round(config.cloud.limits.max_future_days * MS_PER_DAY)
    assert_reading(
        gps.parse(BU353_RMC.encode() + b"\r\n", NOW), Reading("truck", ((10, NZ), (11, 0.69 * KNOTS_TO_KMH)))
    )
    assert gps.parse(BU353_GSV.encode(), NOW) == Ignored("sentence")
    assert logger.parse(b"v2,v1", NOW) == Ignored("header")
    assert_reading(logger.parse(b"3,4", NOW), Reading("pump", ((2, 3), (1, 4.0))))
    assert_reading(mcu.parse(b"v2=5 v1=6", NOW), Reading("pump", ((2, 5), (1, 6.0))))
    assert_rejected(mcu.parse(b"v10=1", NOW), "unknown_pin")


# ---------------------------------------------------------------- the resend window, the saved clock, the burst


class Store:
    """Stands in for Buffer.submit: records what is submitted; the test decides when a commit happens."""

    def __init__(self) -> None:
        self.submitted: list[tuple[list[Point], ResendKey | None, asyncio.Future[None]]] = []

    def submit(self, points: Sequence[Point], *, resend: ResendKey | None = None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submitted.append((list(points), resend, future))
        return future

    def commit_all(self) -> None:
        for _, _, future in self.submitted:
            if not future.done():
                future.set_result(None)

    @property
    def stamps(self) -> list[int]:
        return [points[0].ts_ms for points, _, _ in self.submitted]


def mcu_pipeline(tmp_path: Path, store: Store) -> tuple[PortPipeline, list[bytes]]:
    raw: dict[str, Any] = {
        "device": [{"name": "pump", "token": "p" * 32, "pins": {"v1": "double"}}],
        "port": [{"path": "/dev/ttyACM0", "device": "pump", "ack": True}],
    }
    config = parse_config(raw, tmp_path / "edgeforward.toml")
    pipeline = PortPipeline(config.ports[0], config, store.submit)
    written: list[bytes] = []

    def write(data: bytes) -> bool:
        written.append(data)
        return True

    pipeline.source.write = write  # type: ignore[method-assign]
    return pipeline, written


async def test_a_resent_copy_is_acknowledged_again_and_not_stored(tmp_path: Path) -> None:
    store = Store()
    pipeline, written = mcu_pipeline(tmp_path, store)
    pipeline.on_line(b"v1=1.5 seq=7 ms=100000", NOW, False)
    pipeline.on_line(b"v1=1.5 seq=7 ms=100000", NOW + 5, False)  # a copy before the first is committed
    assert len(store.submitted) == 1 and written == []
    assert store.submitted[0][1] == ("/dev/ttyACM0", 7, 100000, NOW)
    store.commit_all()
    await asyncio.sleep(0)
    assert written == [b"ACK 7\n", b"ACK 7\n"]  # each copy acknowledged, once committed
    pipeline.on_line(b"v1=1.5 seq=7 ms=100000", NOW + 2_000, False)  # a copy after the commit: at once
    assert written[-1] == b"ACK 7\n" and len(written) == 3
    assert (pipeline.stats.lines_ok, pipeline.stats.resent, len(store.submitted)) == (1, 2, 1)
    assert json.loads(pipeline.snapshot()[6])["resent"] == 2
    # ts= lines are one reading when their times are equal
    pipeline.on_line(b"v1=2 seq=8 ts=1764000001000", NOW, False)
    pipeline.on_line(b"v1=2 seq=8 ts=1764000001000", NOW, False)
    pipeline.on_line(b"v1=3 seq=8 ts=1764000002000", NOW, False)  # seq= again, another time: another reading
    assert len(store.submitted) == 3 and pipeline.stats.resent == 3


async def test_same_seq_and_ms_after_a_reboot_is_another_reading(tmp_path: Path) -> None:
    store = Store()
    pipeline, _ = mcu_pipeline(tmp_path, store)
    pipeline.on_line(b"v1=1 seq=1 ms=1000", NOW, False)
    pipeline.on_line(b"v1=1 seq=2 ms=2000", NOW + 1_000, False)
    # the MCU reboots 10 s later and counts seq= and ms= from the start again
    pipeline.on_line(b"v1=9 seq=1 ms=1000", NOW + 11_000, False)
    assert store.stamps == [NOW, NOW + 1_000, NOW + 11_000]
    assert pipeline.stats.resent == 0


async def test_an_uncommitted_reading_is_stored_from_its_next_copy(tmp_path: Path) -> None:
    store = Store()
    pipeline, written = mcu_pipeline(tmp_path, store)
    pipeline.on_line(b"v1=1 seq=5 ms=5000", NOW, False)
    store.submitted[0][2].set_exception(OSError("disk full"))
    await asyncio.sleep(0)
    pipeline.on_line(b"v1=1 seq=5 ms=5000", NOW + 2_000, False)
    assert len(store.submitted) == 2 and written == [] and pipeline.stats.resent == 0


async def test_the_window_and_the_clock_are_taken_up_after_a_restart(tmp_path: Path) -> None:
    store = Store()
    before, _ = mcu_pipeline(tmp_path, store)
    boot = NOW - 100_000
    for ms in (97_000, 98_000, 99_000):
        before.on_line(f"v1=1 seq={ms // 1000} ms={ms}".encode(), boot + ms + 2, ms == 97_000)
    store.commit_all()
    _, _, ok, bad, ignored, reconnects, detail = before.snapshot()
    window = [(key[1], key[2], key[3]) for _, key, _ in store.submitted if key is not None]

    after_store = Store()
    after, written = mcu_pipeline(tmp_path, after_store)
    after.restore((ok, bad, ignored, reconnects, detail), NOW + 8_000)
    after.restore_window(window)
    # the port buffered while the daemon was away: a resend of 98 s, then readings of 100 and 101 s, 8 s late
    burst = NOW + 9_000
    after.on_line(b"v1=1 seq=98 ms=98000", burst, True)
    after.on_line(b"v1=1 seq=100 ms=100000", burst, False)
    after.on_line(b"v1=1 seq=101 ms=101000", burst, False)
    assert after.stats.resent == 1 and written == [b"ACK 98\n"]  # committed by the earlier run: at once
    assert after_store.stamps == [boot + 100_000 + 2 + 9, boot + 101_000 + 2 + 9]  # aged 9 ms meanwhile
    assert (after.stats.lines_ok, json.loads(after.snapshot()[6])["resent"]) == (2, 1)


async def test_the_opening_burst_waits_for_a_fresh_line_without_a_saved_clock(tmp_path: Path) -> None:
    store = Store()
    pipeline, written = mcu_pipeline(tmp_path, store)
    boot = NOW - 60_000
    burst = NOW  # what the port buffered: readings of 50..54 s, all in the first read, 6-10 s late
    for second in range(50, 55):
        pipeline.on_line(f"v1=1 seq={second} ms={second * 1000}".encode(), burst, second == 50)
    pipeline.on_line(b"v1=1 seq=50 ms=50000", burst, False)  # a resend among them
    assert store.submitted == [] and written == []
    # a later read: a resend (no fresh line yet) is held too, then the fresh readings of 60 and 61 s fix the anchor
    pipeline.on_line(b"v1=1 seq=51 ms=51000", NOW + 100, False)
    assert store.submitted == []
    pipeline.on_line(b"v1=1 seq=60 ms=60000", boot + 60_000 + 3, False)
    assert store.submitted == []  # one fresh line may still be late: the next one must agree
    pipeline.on_line(b"v1=1 seq=61 ms=61000", boot + 61_000 + 3, False)
    assert store.stamps == [boot + second * 1000 + 3 for second in (50, 51, 52, 53, 54, 60, 61)]
    assert pipeline.stats.resent == 2


async def test_held_lines_are_committed_at_a_stop(tmp_path: Path) -> None:
    store = Store()
    pipeline, _ = mcu_pipeline(tmp_path, store)
    pipeline.on_line(b"v1=1 seq=1 ms=5000", NOW, True)
    pipeline.on_line(b"v1=1 ms=6000", NOW, False)  # no seq: nothing would ever resend it
    assert store.submitted == []
    pipeline.release_held()
    assert store.stamps == [NOW - 1_000, NOW]  # mapped with the best anchor there is


# ---------------------------------------------------------------- a csv line cut by the open

CSV_PORT_TIMEOUT_S = 10.0


def csv_pipeline(tmp_path: Path, path: str, store: Store) -> PortPipeline:
    raw: dict[str, Any] = {
        "device": [{"name": "pump", "token": "p" * 32, "pins": {"v1": "double", "v2": "integer"}}],
        "port": [{"path": path, "device": "pump", "format": "csv", "columns": ["v1", "v2"]}],
    }
    config = parse_config(raw, tmp_path / "edgeforward.toml")
    return PortPipeline(config.ports[0], config, store.submit)


async def test_a_csv_line_waiting_at_the_open_may_be_a_tail_and_is_ignored(
    tmp_path: Path, pty_port: Pty, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a kill -9 mid-line leaves in the port: the tail "3.5,1017" of "23.5,1017", then whole lines. Its
    # field count is right and its first value wrong. (No time window here: only the bytes waiting count.)
    monkeypatch.setattr(pipeline_module, "TORN_TAIL_MS", 0)
    store = Store()
    pty_port.write("3.5,1017\n24.5,1018\n")
    pipeline = csv_pipeline(tmp_path, pty_port.path, store)
    async with running(pipeline.source):
        await wait_for(lambda: pipeline.stats.lines_ok == 1, CSV_PORT_TIMEOUT_S, 0.01)
    assert [(p.pin, p.value) for points, _, _ in store.submitted for p in points] == [(1, 24.5), (2, 1018)]
    assert pipeline.stats.ignored_reasons == {"partial": 1} and pipeline.stats.lines_bad == 0
    # A port opened with nothing waiting: its first line begins after the open, so it is whole and kept.
    store = Store()
    quiet = csv_pipeline(tmp_path, pty_port.path, store)
    async with running(quiet.source):
        await wait_for(lambda: quiet.stats.state == "open", CSV_PORT_TIMEOUT_S, 0.01)
        pty_port.write("25.5,1019\n")
        await wait_for(lambda: quiet.stats.lines_ok == 1, CSV_PORT_TIMEOUT_S, 0.01)
    assert [(p.pin, p.value) for points, _, _ in store.submitted for p in points] == [(1, 25.5), (2, 1019)]
    assert quiet.stats.ignored_reasons == {} and not quiet.stats.waiting_at_open


async def test_a_first_csv_line_read_right_after_the_open_is_ignored_later_kept(tmp_path: Path) -> None:
    # The MCU may be mid-line when the port opens, its tail arriving a moment later: nothing waited yet.
    for delay_ms, kept in ((0, False), (pipeline_module.TORN_TAIL_MS - 1, False), (pipeline_module.TORN_TAIL_MS, True)):
        store = Store()
        pipeline = csv_pipeline(tmp_path, "/dev/ttyLOG", store)
        pipeline.stats.opened_ms = NOW
        pipeline.on_line(b"3.5,1017", NOW + delay_ms, True)
        pipeline.on_line(b"24.5,1018", NOW + delay_ms, False)
        assert len(store.submitted) == (2 if kept else 1), delay_ms
        assert pipeline.stats.ignored_reasons == ({} if kept else {"partial": 1})
    # Named values are never misread when cut ("3=41.25" is no pin, the whole line is rejected): kv keeps them.
    store = Store()
    pipeline, _ = mcu_pipeline(tmp_path, store)
    pipeline.stats.opened_ms = NOW
    pipeline.on_line(b"v1=41.25", NOW, True)
    assert len(store.submitted) == 1
