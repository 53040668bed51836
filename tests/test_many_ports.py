"""Sixteen pseudo-terminals through one `edgeforward run`, one unplugged and replugged while the others flow."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeforward.cloudsim import CloudSim, SimDevice
from edgeforward.points import PinType

from .conftest import DaemonProcess, Pty, wait_for, write_config
from .test_serial_servers import make_pty, wait_event

PORTS = 16
LINES_PER_ROUND = 40
UNPLUGGED = 5  # the port that goes away during the second round
STATUS_TIMEOUT_S = 20.0
DELIVERY_TIMEOUT_S = 30.0
POLL_S = 0.3
TOKEN = "tok-hub-0123456789abcdef0123456789"
DEVICE = "hub"
PINS = {pin: PinType.INTEGER for pin in range(PORTS)}  # port i writes pin vi


@pytest.fixture
def links(tmp_path: Path) -> Iterator[list[Pty]]:
    """One pty per port, each behind a by-id style link (Pty.path is the link)."""
    made: list[Pty] = []
    for index in range(PORTS):
        pty = make_pty()
        link = tmp_path / f"usb-Acme_MCU_{index:02d}-if00"
        link.symlink_to(pty.path)
        made.append(Pty(pty.master, pty.slave, str(link)))
    yield made
    for pty in made:
        pty.close()


@pytest.fixture
async def hub_cloud() -> AsyncIterator[CloudSim]:
    sim = CloudSim([SimDevice(TOKEN, DEVICE, PINS)])
    await sim.start()
    yield sim
    await sim.stop()


def write_round(ports: dict[int, Pty], round_no: int) -> None:
    """Interleave one round of lines over the ports: port i sends vi = round * LINES_PER_ROUND + n."""
    for n in range(LINES_PER_ROUND):
        for index, pty in ports.items():
            pty.write(f"v{index}={round_no * LINES_PER_ROUND + n}\n")


async def test_sixteen_ports_at_once_one_unplugged_and_replugged(
    tmp_path: Path,
    hub_cloud: CloudSim,
    links: list[Pty],
    daemon_factory: Callable[[Path], DaemonProcess],
) -> None:
    config = write_config(
        tmp_path,
        str(hub_cloud.url),
        [{"path": pty.path, "device": DEVICE} for pty in links],
        [{"name": DEVICE, "token": TOKEN, "pins": {f"v{pin}": kind.value for pin, kind in PINS.items()}}],
        limits={"messages_per_month": 0},
    )
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    for pty in links:
        await wait_event(daemon, pty.path, "serial port open", reconnects=0)

    everyone = dict(enumerate(links))
    write_round(everyone, 0)

    def values(pin: int) -> list[Any]:
        return sorted(point.value for point in hub_cloud.points(TOKEN, pin))

    # Unplugged once its round is in (what a device held unread when it went is lost with it):
    # the device and its by-id link vanish while the others keep sending.
    await wait_for(lambda: len(values(UNPLUGGED)) == LINES_PER_ROUND, DELIVERY_TIMEOUT_S, interval=POLL_S)
    gone = links[UNPLUGGED]
    gone.close()
    os.unlink(gone.path)
    await wait_event(daemon, gone.path, "serial port lost")
    others = {index: pty for index, pty in everyone.items() if index != UNPLUGGED}
    write_round(others, 1)
    ports: dict[str, Any] = {}

    def states_are(wanted: Callable[[int], str]) -> bool:
        ports.update(daemon.status()["ports"])
        return all(ports[pty.path]["state"] == wanted(index) for index, pty in enumerate(links))

    await wait_for(lambda: states_are(lambda i: "absent" if i == UNPLUGGED else "open"), STATUS_TIMEOUT_S, POLL_S)

    # Replugged as a new tty node behind the same link, as udev does.
    fresh = make_pty()
    os.symlink(fresh.path, gone.path)
    links[UNPLUGGED] = everyone[UNPLUGGED] = Pty(fresh.master, fresh.slave, gone.path)
    await wait_event(daemon, gone.path, "serial port open", reconnects=1)
    write_round(everyone, 2)

    rounds = {index: (0, 2) if index == UNPLUGGED else (0, 1, 2) for index in range(PORTS)}
    expected = {
        index: [r * LINES_PER_ROUND + n for r in rs for n in range(LINES_PER_ROUND)] for index, rs in rounds.items()
    }

    try:
        await wait_for(
            lambda: all(len(values(pin)) == len(want) for pin, want in expected.items()),
            DELIVERY_TIMEOUT_S,
            interval=POLL_S,
        )
    except AssertionError as exc:
        missing = {f"v{pin}": sorted(set(want) - set(values(pin))) for pin, want in expected.items()}
        raise AssertionError(f"not delivered: {missing}; status: {daemon.status()}") from exc

    def counted() -> bool:
        ports.update(daemon.status()["ports"])
        return all(ports[pty.path]["lines_ok"] == len(expected[i]) for i, pty in enumerate(links))

    await wait_for(counted, STATUS_TIMEOUT_S, interval=POLL_S)
    assert daemon.stop() == 0

    for index, pty in enumerate(links):
        assert values(index) == expected[index], f"v{index}"
        entry = ports[pty.path]
        assert entry["state"] == "open", (index, entry)
        assert (entry["lines_bad"], entry["lines_ignored"]) == (0, 0), (index, entry)
        assert entry["reconnects"] == (1 if index == UNPLUGGED else 0), (index, entry)
