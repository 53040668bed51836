"""Real serial servers on the LAN: socat behind socket://, ser2net 4.x behind rfc2217://, restarted under the daemon.

Both serve a pseudo-terminal the test owns (the test writes to its master as the device), so the
device outlives the server, as a GPS receiver wired to a serial server does. Debian's `socat` and
`ser2net` packages provide the binaries (.ci/run installs them); without them the tests skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
import tty
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeforward.cloudsim import CloudSim, SimDevice
from edgeforward.ingest.parsers.common import Ignored, ParseContext, Reading, Rejected
from edgeforward.ingest.parsers.nmea import parse_nmea
from edgeforward.ingest.source import PortState, SerialSource
from edgeforward.points import PinType

from .conftest import DaemonProcess, Pty, wait_for, write_config

# pyserial 3.5's rfc2217 client still calls Thread.setDaemon() and setName().
pytestmark = pytest.mark.filterwarnings(r"ignore:set(Daemon|Name)\(\) is deprecated:DeprecationWarning")

DATA = Path(__file__).parent / "data"
STATUS_TIMEOUT_S = 20.0
DELIVERY_TIMEOUT_S = 30.0
STATUS_POLL_S = 0.3
SOURCE_TIMEOUT_S = 10.0
SOURCE_POLL_S = 0.02
EVENT_POLL_S = 0.1
SERVER_STOP_TIMEOUT_S = 5.0
GPS_BAUD = 4800
KNOTS_TO_KMH = 1.852
COORD_DIGITS = 7  # well below the 0.0001' resolution of the logs, well above float noise
UNLIMITED = {"messages_per_month": 0}
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"

TOKEN = "tok-truck-0123456789abcdef0123456789"
DEVICE = "truck"
PINS = {10: PinType.LOCATION, 11: PinType.DOUBLE, 12: PinType.DOUBLE, 13: PinType.INTEGER}
NMEA_PINS = {"location": "v10", "speed_kmh": "v11", "altitude_m": "v12", "satellites": "v13"}
PIN_OF = {name: int(pin[1:]) for name, pin in NMEA_PINS.items()}
# Before the restart a GP-talker SiRF-IV log (fix, Hamilton NZ); after it a GN-talker GLONASS log
# that starts without a fix (tests/data/README names their source).
LOG_BEFORE = DATA / "gpsd-bu353s4.log"
LOG_AFTER = DATA / "gpsd-bu353-glonass.log"


def require(binary: str) -> str:
    """Return the binary's path, or skip the test with the reason."""
    # Debian installs ser2net in /usr/sbin, which a non-root PATH often lacks.
    found = shutil.which(binary) or shutil.which(binary, path=SBIN_PATH)
    if found is None:
        pytest.skip(f"{binary} not installed: .ci/run installs it (apt-get install -y {binary})")
    return found


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def make_pty() -> Pty:
    master, slave = os.openpty()
    tty.setraw(slave)
    return Pty(master, slave, os.ttyname(slave))


class SerialServer:
    """A serial server process serving one device on 127.0.0.1; start and kill it at will."""

    scheme = ""

    def __init__(self, device: str, workdir: Path) -> None:
        self.device = device
        self.port = free_tcp_port()
        self.workdir = workdir
        self.log_path = workdir / f"{type(self).__name__}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            # A session of its own: kill() takes the forked children serving a connection too.
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        """Kill the server and its children at once, as a crash or a power cut would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(SERVER_STOP_TIMEOUT_S)
        self.process = None

    def describe(self) -> str:
        alive = self.process is not None and self.process.poll() is None
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"{type(self).__name__} on {self.port} ({'running' if alive else 'not running'}): {log[-2000:]}"


class SocatServer(SerialServer):
    """socat: a raw TCP server (socket://); each connection opens the device anew."""

    scheme = "socket"

    def __init__(self, device: str, workdir: Path) -> None:
        self.binary = require("socat")
        super().__init__(device, workdir)

    def command(self) -> list[str]:
        return [
            self.binary,
            f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
            f"OPEN:{self.device},raw,echo=0",
        ]


class Ser2netServer(SerialServer):
    """ser2net 4.x with an RFC 2217 accepter; `local` because a pty has no modem-control lines."""

    scheme = "rfc2217"

    def __init__(self, device: str, workdir: Path) -> None:
        self.binary = require("ser2net")
        super().__init__(device, workdir)
        self.config = workdir / "ser2net.yaml"
        self.config.write_text(
            "%YAML 1.1\n---\n"
            "connection: &gps\n"
            f"  accepter: telnet(rfc2217),tcp,127.0.0.1,{self.port}\n"
            "  enable: on\n"
            "  options:\n"
            "    kickolduser: true\n"  # a client that vanished without closing must not lock the port
            f"  connector: serialdev,{self.device},{GPS_BAUD}n81,local\n"
        )

    @property
    def url(self) -> str:
        return super().url + "?ign_set_control"

    def command(self) -> list[str]:
        # -n: stay in the foreground; -u: no UUCP lock files (/var/lock is not ours).
        return [self.binary, "-n", "-u", "-c", str(self.config), "-P", str(self.workdir / "ser2net.pid")]


SERVERS: dict[str, type[SerialServer]] = {"socat": SocatServer, "ser2net": Ser2netServer}


@pytest.fixture
def gps() -> Iterator[Pty]:
    pty = make_pty()
    yield pty
    pty.close()


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest, gps: Pty, tmp_path: Path) -> Iterator[SerialServer]:
    made = SERVERS[request.param](gps.path, tmp_path)
    made.start()
    yield made
    made.kill()


@pytest.fixture
async def truck_cloud() -> AsyncIterator[CloudSim]:
    sim = CloudSim([SimDevice(TOKEN, DEVICE, PINS)])
    await sim.start()
    yield sim
    await sim.stop()


def sentences(log: Path) -> list[bytes]:
    """The NMEA sentences of a gpsd log, without its '#' header comments."""
    return [raw for raw in log.read_bytes().splitlines() if raw.startswith(b"$")]


def break_checksum(sentence: bytes) -> bytes:
    """The sentence with one payload digit changed, so its checksum no longer matches."""
    star = sentence.rindex(b"*")
    for index in range(star - 1, 0, -1):
        digit = sentence[index : index + 1]
        if digit.isdigit():
            return sentence[:index] + str((int(digit) + 1) % 10).encode() + sentence[index + 1 :]
    raise AssertionError(f"no digit in {sentence!r}")


def outcomes(lines: list[bytes]) -> tuple[list[Reading], Counter[str], Counter[str]]:
    """What parse_nmea makes of the lines: the fixes, and the bad and ignored counts by reason."""
    ctx = ParseContext({DEVICE: PINS}, DEVICE, 0)
    pins = NMEA_PINS
    fixes: list[Reading] = []
    bad: Counter[str] = Counter()
    ignored: Counter[str] = Counter()
    for raw in lines:
        result = parse_nmea(raw.decode("ascii"), pins, DEVICE, ctx, 0)
        if isinstance(result, Reading):
            fixes.append(result)
        elif isinstance(result, Rejected):
            bad[result.reason] += 1
        else:
            assert isinstance(result, Ignored)
            ignored[result.reason] += 1
    return fixes, bad, ignored


def degrees(value: str, hemisphere: str) -> float:
    """ddmm.mmmm (or dddmm.mmmm) and N/S/E/W to signed decimal degrees, independently of the parser."""
    whole, minutes = divmod(float(value), 100.0)
    return round((whole + minutes / 60.0) * (-1.0 if hemisphere in "SW" else 1.0), COORD_DIGITS)


def fixes_by_hand(lines: list[bytes]) -> dict[str, list[Any]]:
    """Location (lon, lat) and speed in km/h of every RMC/GGA with a fix, read straight off the fields."""
    want: dict[str, list[Any]] = {"location": [], "speed_kmh": []}
    for raw in lines:
        fields = raw.decode("ascii").split("*")[0].split(",")
        kind = fields[0][3:]
        if kind == "GGA" and fields[6] not in ("", "0") and fields[2]:
            want["location"].append((degrees(fields[4], fields[5]), degrees(fields[2], fields[3])))
        elif kind == "RMC" and fields[2] == "A" and fields[3]:
            want["location"].append((degrees(fields[5], fields[6]), degrees(fields[3], fields[4])))
            if fields[7]:
                want["speed_kmh"].append(round(float(fields[7]) * KNOTS_TO_KMH, COORD_DIGITS))
    return want


def port_events(daemon: DaemonProcess, port: str, event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log entries of one event on one port."""
    found = []
    for line in daemon.log().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event and entry.get("port") == port:
                found.append(entry)
    return found


async def wait_event(
    daemon: DaemonProcess, port: str, event: str, context: Callable[[], str] | None = None, **fields: Any
) -> None:
    """Wait until the daemon logs event on the port with the given fields (status lags, the log does not)."""

    def logged() -> bool:
        entries = port_events(daemon, port, event)
        return any(all(entry.get(k) == v for k, v in fields.items()) for entry in entries)

    try:
        await wait_for(logged, STATUS_TIMEOUT_S, interval=EVENT_POLL_S)
    except AssertionError as exc:
        raise AssertionError(f"no {event!r} {fields} on {port}; {context() if context else ''}") from exc


async def wait_port(
    daemon: DaemonProcess, server: SerialServer, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the daemon's status of the server's port until check holds."""
    seen: dict[str, Any] = {}

    def holds() -> bool:
        seen.clear()
        seen.update(daemon.status()["ports"][server.url])
        return check(seen)

    try:
        await wait_for(holds, STATUS_TIMEOUT_S, interval=STATUS_POLL_S)
    except AssertionError as exc:
        raise AssertionError(f"port {server.url}: {seen}; {server.describe()}") from exc
    return seen


async def test_gps_logs_through_a_serial_server_restarted_under_the_daemon(
    tmp_path: Path,
    truck_cloud: CloudSim,
    gps: Pty,
    server: SerialServer,
    daemon_factory: Callable[[Path], DaemonProcess],
) -> None:
    good_before, good_after = sentences(LOG_BEFORE), sentences(LOG_AFTER)
    before = [*good_before[:40], break_checksum(good_before[3]), *good_before[40:]]
    after = [*good_after, break_checksum(good_after[-1])]
    fixes_before, _, _ = outcomes(before)
    fixes, bad, ignored = outcomes(before + after)
    assert bad == {"checksum": 2} and ignored["sentence"] > 0 and ignored["no_fix"] > 0  # the logs hold all three
    assert 0 < len(fixes_before) < len(fixes)

    config = write_config(
        tmp_path,
        str(truck_cloud.url),
        [{"path": server.url, "format": "nmea", "device": DEVICE, "baud": GPS_BAUD, "nmea": NMEA_PINS}],
        [{"name": DEVICE, "token": TOKEN, "pins": {f"v{pin}": kind.value for pin, kind in PINS.items()}}],
        limits=UNLIMITED,
    )
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()

    def values(pin: int) -> list[Any]:
        return [point.value for point in truck_cloud.points(TOKEN, pin)]

    location = PIN_OF["location"]
    # The log shows open and lost at once; status snapshots lag by up to 5 s, so it is polled only
    # where the contract is status (absent while the server is down, the final counters).
    await wait_event(daemon, server.url, "serial port open", server.describe, reconnects=0)
    gps.write_bytes(b"\r\n".join(before) + b"\r\n")
    await wait_for(lambda: len(values(location)) == len(fixes_before), DELIVERY_TIMEOUT_S, interval=STATUS_POLL_S)

    server.kill()
    await wait_event(daemon, server.url, "serial port lost", server.describe)
    await wait_port(daemon, server, lambda e: e["state"] == "absent")
    server.start()
    await wait_event(daemon, server.url, "serial port open", server.describe, reconnects=1)
    gps.write_bytes(b"\r\n".join(after) + b"\r\n")

    want: dict[int, list[Any]] = {pin: [] for pin in PINS}
    for reading in fixes:
        for pin, value in reading.values:
            want[pin].append(value)
    await wait_for(
        lambda: all(len(values(pin)) == len(expected) for pin, expected in want.items()),
        DELIVERY_TIMEOUT_S,
        interval=STATUS_POLL_S,
    )
    final = await wait_port(
        daemon,
        server,
        lambda e: e["lines_ok"] == len(fixes) and e["bad_reasons"] == bad and e["ignored_reasons"] == ignored,
    )
    assert final["state"] == "open" and final["reconnects"] == 1
    assert final["lines_bad"] == 2 and final["lines_ignored"] == ignored.total()
    assert daemon.stop() == 0

    for pin, expected in want.items():
        assert sorted(values(pin), key=repr) == sorted(expected, key=repr), f"v{pin}"
    # Coordinates and units against the raw fields, not the parser: [lon, lat] degrees, knots -> km/h.
    by_hand = fixes_by_hand(good_before + good_after)
    got_locations = sorted((round(lon, COORD_DIGITS), round(lat, COORD_DIGITS)) for lon, lat in values(location))
    assert got_locations == sorted(by_hand["location"])
    assert sorted(round(v, COORD_DIGITS) for v in values(PIN_OF["speed_kmh"])) == sorted(by_hand["speed_kmh"])
    assert all(type(v) is float for v in values(PIN_OF["altitude_m"]) + values(PIN_OF["speed_kmh"]))
    assert all(type(v) is int for v in values(PIN_OF["satellites"]))
    # Signs: Hamilton NZ (S, E) before the restart, Moscow (N, E) after it.
    assert {(round(lon), round(lat)) for lon, lat in values(location)} == {(175, -38), (38, 56)}


# --- the rfc2217 client in-process ---------------------------------------------------------


@contextlib.asynccontextmanager
async def running(source: SerialSource) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(condition: Callable[[], bool]) -> None:
    await wait_for(condition, SOURCE_TIMEOUT_S, interval=SOURCE_POLL_S)


def read_master(pty: Pty, count: int) -> bytes:
    """Read up to count bytes the reader wrote to the device, giving up after SOURCE_TIMEOUT_S."""
    data = b""
    deadline = time.monotonic() + SOURCE_TIMEOUT_S
    while len(data) < count and time.monotonic() < deadline:
        readable, _, _ = select.select([pty.master], [], [], SOURCE_POLL_S)
        if readable:
            data += os.read(pty.master, count - len(data))
    return data


async def test_rfc2217_needs_ign_set_control_for_a_device_without_modem_lines(gps: Pty, tmp_path: Path) -> None:
    ser2net = Ser2netServer(gps.path, tmp_path)
    ser2net.start()
    lines: list[bytes] = []
    try:
        plain = SerialSource(ser2net.url.removesuffix("?ign_set_control"), GPS_BAUD, lambda *a: None)
        async with running(plain):
            # Refused until ser2net listens, then pyserial gives up waiting for the SET_CONTROL answer.
            await wait_until(lambda: "?ign_set_control" in (plain.stats.last_error or ""))
            assert plain.stats.state is PortState.ABSENT and plain.stats.reconnects == 0

        source = SerialSource(ser2net.url, GPS_BAUD, lambda line, ms, first: lines.append(line))
        async with running(source):
            await wait_until(lambda: source.stats.state is PortState.OPEN)
            gps.write("$GPTXT,hello*00\r\nv1=2\r\n")
            await wait_until(lambda: len(lines) == 2)
            assert source.write(b"ACK 7\n") is True  # the reply path an `ack = true` port uses
            assert await asyncio.to_thread(read_master, gps, 6) == b"ACK 7\n"
    finally:
        ser2net.kill()
    assert lines == [b"$GPTXT,hello*00", b"v1=2"]
