"""Several ports at once through `edgeforward run`: kv, json, csv and nmea, noise, one port unplugged."""

from __future__ import annotations

import os
import random
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeforward.cloudsim import CloudSim, SimDevice
from edgeforward.ingest.parsers import parse_line
from edgeforward.ingest.parsers.common import ParseContext, Reading
from edgeforward.points import PinType

from .conftest import DaemonProcess, Pty, edgeforward, wait_for, write_config

DATA = Path(__file__).parent / "data"
GPS_LOG = DATA / "gpsd-bu353s4.log"
STATUS_TIMEOUT_S = 20.0
DELIVERY_TIMEOUT_S = 30.0
STATUS_POLL_S = 0.3
UNLIMITED = {"messages_per_month": 0}  # no message budget: the forwarder runs at its test intervals
JUNK_SEED = 6
OVERLONG_BYTES = 200_000

TOKENS = {name: f"tok-{name}-0123456789abcdef0123456789" for name in ("pump", "tank", "logger", "truck")}
PIN_TYPES: dict[str, dict[int, PinType]] = {
    "pump": {1: PinType.DOUBLE, 2: PinType.INTEGER, 3: PinType.STRING},
    "tank": {1: PinType.DOUBLE, 5: PinType.BOOLEAN},
    "logger": {1: PinType.DOUBLE, 2: PinType.INTEGER},
    "truck": {10: PinType.LOCATION, 11: PinType.DOUBLE, 12: PinType.DOUBLE, 13: PinType.INTEGER},
}
NMEA_PINS = {"location": "v10", "speed_kmh": "v11", "altitude_m": "v12", "satellites": "v13"}


def make_pty() -> Pty:
    master, slave = os.openpty()
    tty.setraw(slave)
    return Pty(master, slave, os.ttyname(slave))


@pytest.fixture
def ptys(tmp_path: Path) -> Iterator[dict[str, Pty]]:
    """One pty per format, each behind a by-id style link (Pty.path is the link)."""
    made: dict[str, Pty] = {}
    for name in ("kv", "json", "csv", "nmea"):
        pty = make_pty()
        link = tmp_path / f"usb-Acme_{name}-if00"
        link.symlink_to(pty.path)
        made[name] = Pty(pty.master, pty.slave, str(link))
    yield made
    for port in made.values():
        port.close()


@pytest.fixture
async def fleet_cloud() -> AsyncIterator[CloudSim]:
    sim = CloudSim([SimDevice(TOKENS[name], name, pins) for name, pins in PIN_TYPES.items()])
    await sim.start()
    yield sim
    await sim.stop()


def devices() -> list[dict[str, Any]]:
    return [
        {"name": name, "token": TOKENS[name], "pins": {f"v{pin}": kind.value for pin, kind in pins.items()}}
        for name, pins in PIN_TYPES.items()
    ]


def gps_sentences() -> list[bytes]:
    return [raw for raw in GPS_LOG.read_bytes().splitlines() if raw.startswith(b"$")]


def expected_fixes(sentences: list[bytes]) -> list[Reading]:
    """The readings the log holds, by the parser the daemon uses (its counts are checked in tests/ingest/parsers)."""
    context = ParseContext({"truck": PIN_TYPES["truck"]}, "truck", 1)
    results = (parse_line(raw, "nmea", context, 0, nmea_pins=NMEA_PINS) for raw in sentences)
    return [r for r in results if isinstance(r, Reading)]


def port_status(daemon: DaemonProcess, pty: Pty) -> dict[str, Any]:
    entry: dict[str, Any] = daemon.status()["ports"][pty.path]
    return entry


async def wait_port(daemon: DaemonProcess, pty: Pty, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def holds() -> bool:
        seen.update(port_status(daemon, pty))
        return check(seen)

    try:
        await wait_for(holds, STATUS_TIMEOUT_S, interval=STATUS_POLL_S)
    except AssertionError as exc:
        raise AssertionError(f"port {pty.path}: {seen}") from exc
    return seen


async def test_four_formats_at_once_with_noise_and_one_port_unplugged(
    tmp_path: Path,
    fleet_cloud: CloudSim,
    ptys: dict[str, Pty],
    daemon_factory: Callable[[Path], DaemonProcess],
) -> None:
    config = write_config(
        tmp_path,
        str(fleet_cloud.url),
        [
            {"path": ptys["kv"].path, "device": "pump"},
            {"path": ptys["json"].path, "format": "json", "device": "tank"},
            {"path": ptys["csv"].path, "format": "csv", "header": True, "device": "logger", "baud": 9600},
            {"path": ptys["nmea"].path, "format": "nmea", "device": "truck", "baud": 4800, "nmea": NMEA_PINS},
        ],
        devices(),
        limits=UNLIMITED,
        # Every point by history, with its read time: the live path would be stamped on arrival by the cloud,
        # and the order checks below are of read order.
        forward={"live_interval_s": 0},
    )
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    for pty in ptys.values():
        await wait_port(daemon, pty, lambda entry: entry["state"] == "open")

    # kv: good lines around a burst of binary junk (ending in a NUL) and a 200 kB line.
    junk = random.Random(JUNK_SEED).randbytes(20_000) + b"\x00"
    ptys["kv"].write("v1=0.5 v2=0\n")
    ptys["kv"].write_bytes(junk + b"v1=1.5 v2=1\r\n" + b"x" * OVERLONG_BYTES + b"\nv1=2.5 v2=2\n")
    ptys["kv"].write('v2=3 v3="door open"\n')
    # json, with a bad line.
    ptys["json"].write('{"v1": 10.25, "v5": true}\n{"v1": "wet"}\n{"v5": false, "v1": -3}\n')
    # csv with its header; an empty field is no value.
    ptys["csv"].write("v1,v2\r\n1.5,7\r\n2.5,\r\n,9\r\nnot,csv,at,all\r\n")
    # nmea: a real receiver log, with one sentence's checksum broken.
    sentences = gps_sentences()
    broken = sentences[3].replace(b"3747", b"3748", 1)
    ptys["nmea"].write_bytes(b"\r\n".join(sentences) + b"\r\n" + broken + b"\r\n")

    kv = await wait_port(daemon, ptys["kv"], lambda e: e["lines_ok"] == 4 and e["bad_reasons"].get("overlong") == 1)
    assert kv["bad_reasons"]["noise"] >= 1
    assert set(kv["bad_reasons"]) <= {"noise", "overlong", "syntax", "encoding", "unknown_key"}
    json_port = await wait_port(daemon, ptys["json"], lambda e: e["lines_ok"] == 2 and e["lines_bad"] == 1)
    assert json_port["bad_reasons"] == {"bad_value": 1}
    csv_port = await wait_port(daemon, ptys["csv"], lambda e: e["lines_ok"] == 3 and e["lines_bad"] == 1)
    assert csv_port["ignored_reasons"] == {"header": 1} and csv_port["bad_reasons"] == {"syntax": 1}
    fixes = expected_fixes(sentences)
    nmea = await wait_port(daemon, ptys["nmea"], lambda e: e["lines_ok"] == len(fixes) and e["lines_bad"] == 1)
    assert nmea["bad_reasons"] == {"checksum": 1}
    assert nmea["ignored_reasons"] == {"sentence": len(sentences) - len(fixes)}

    # One port unplugged: it shows absent, the others keep flowing.
    ptys["json"].close()
    os.unlink(ptys["json"].path)  # as udev removes the by-id link (the pty's number may be reused at once)
    await wait_port(daemon, ptys["json"], lambda e: e["state"] == "absent")
    ptys["kv"].write("v1=4.5 v2=4\n")
    ptys["csv"].write("3.5,10\r\n")
    await wait_port(daemon, ptys["kv"], lambda e: e["lines_ok"] == 5 and e["state"] == "open")
    await wait_port(daemon, ptys["csv"], lambda e: e["lines_ok"] == 4 and e["state"] == "open")

    def values(name: str, pin: int) -> list[Any]:
        return [p.value for p in sorted(fleet_cloud.points(TOKENS[name], pin), key=lambda p: p.ts_ms)]

    def delivered() -> bool:
        return (
            len(values("pump", 2)) == 5
            and len(values("tank", 1)) == 2
            and len(values("logger", 2)) == 3
            and len(values("truck", 10)) == len(fixes)
        )

    await wait_for(delivered, DELIVERY_TIMEOUT_S, interval=STATUS_POLL_S)
    assert daemon.stop() == 0

    assert values("pump", 2) == [0, 1, 2, 3, 4] and all(type(v) is int for v in values("pump", 2))
    assert values("pump", 1) == [0.5, 1.5, 2.5, 4.5]
    assert values("pump", 3) == ["door open"]
    assert values("tank", 1) == [10.25, -3.0] and values("tank", 5) == [True, False]
    assert values("logger", 1) == [1.5, 2.5, 3.5] and values("logger", 2) == [7, 9, 10]

    want: dict[int, list[Any]] = {10: [], 11: [], 12: [], 13: []}
    for reading in fixes:
        for pin, value in reading.values:
            want[pin].append(value)
    for pin, expected in want.items():
        got = [p.value for p in fleet_cloud.points(TOKENS["truck"], pin)]
        assert sorted(got, key=repr) == sorted(expected, key=repr), f"v{pin}"
    assert all(isinstance(v, float) for v in want[11] + want[12]) and all(type(v) is int for v in want[13])
    lon, lat = want[10][0]
    assert (round(lon, 4), round(lat, 4)) == (175.3149, -37.7848)  # 17518.8938,E 3747.0873,S


async def test_check_config_names_nmea_and_csv_problems(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        [
            {"path": "/dev/ttyLOG", "format": "csv", "device": "logger", "columns": ["ts", "temp"]},
            {"path": "/dev/ttyGPS", "format": "nmea", "device": "truck", "nmea": {"location": "v1", "speed_kmh": "v2"}},
        ],
        [
            {"name": "logger", "token": TOKENS["logger"], "pins": {"v1": "double"}},
            {"name": "truck", "token": TOKENS["truck"], "pins": {"v1": "double"}},
        ],
    )
    result = edgeforward("check-config", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "port[0].columns: column 'temp' is not v0..v255, ts, ms, dev or seq",
        'port[1].nmea.location: pin v1 is a double pin on device "truck", expected location',
        'port[1].nmea.speed_kmh: pin v2 is not declared on device "truck"',
    ]
