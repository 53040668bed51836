"""`edgeforward status`: the contract's JSON keys and the human view, with the daemon stopped and running."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from edgeforward import daemon as daemon_module
from edgeforward.cloudsim import CloudSim
from edgeforward.config import load_config
from edgeforward.ingest.source import PortState, PortStats
from edgeforward.status import read_status, status_view

from .conftest import TOKEN, DaemonProcess, Pty, edgeforward, wait_for, write_config

PUMP = {"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer"}}
CONTRACT_DEVICE_KEYS = {
    "state", "received", "delivered", "queued", "expired", "dropped", "rejected", "downsampled",
    "oldest_queued_ts", "points_today", "messages_this_month",
}  # fmt: skip
EXTRA_DEVICE_KEYS = {
    "points_per_day_limit",
    "messages_per_month_limit",
    "live_interval_s",
    "history_interval_s",
    "waiting_reason",
    "next_attempt_ts",
    "parked_pins",
    "backlog_clears_in_s",
    "ingest_failed",
    "held_for_clock",
    "delivered_live",
    "delivered_history",
    "reason",
    "last_success_ts",
    "deadletter",
}
PORT_KEYS = {
    "state", "lines_ok", "lines_bad", "lines_ignored", "reconnects", "resent", "bad_reasons", "ignored_reasons",
    "last_error",
}  # fmt: skip
STATUS_WIDTH = 80
FLOW_TIMEOUT_S = 30.0
PLAN_MESSAGES = 100_000_000


def render(document: dict[str, Any], config: Path) -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(status_view(document))
    return console.export_text()


def test_status_before_the_first_run_keeps_every_contract_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", [{"path": "/dev/ttyACM-none", "device": "pump"}], [PUMP])
    result = edgeforward("status", "--json", "--config", str(config))
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert set(document["devices"]["pump"]) == CONTRACT_DEVICE_KEYS | EXTRA_DEVICE_KEYS
    assert set(document["ports"]["/dev/ttyACM-none"]) == PORT_KEYS
    assert document["daemon"] == {"running": False, "pid": None}
    assert document["buffer_exists"] is False
    # Exit 0 as the contract says (a fresh install has no buffer before its first run), with the reason in words.
    human = edgeforward("status", "--config", str(config))
    assert human.returncode == 0 and "not running" in human.stdout and "pump" in human.stdout
    assert "no such file yet: the daemon has not run with this config" in " ".join(human.stdout.split())


async def test_status_view_while_running_and_after_stop(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(
        tmp_path,
        str(cloud.url),
        [{"path": pty_port.path, "device": "pump"}],
        [PUMP],
        # A monthly plan so large that its pacing never binds, on any day of any month.
        limits={"messages_per_month": PLAN_MESSAGES},
    )
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    await wait_for(lambda: daemon.status()["ports"][pty_port.path]["state"] == "open", FLOW_TIMEOUT_S, 0.3)
    pty_port.write("v1=0.5 v2=0\n")
    for i in range(1, 6):
        pty_port.write(f"v1={i}.5 v2={i}\nv7=1\n")

    def settled() -> bool:
        document = daemon.status()
        entry = document["devices"]["pump"]
        port = document["ports"][pty_port.path]
        return bool(entry["delivered"] >= 10 and entry["queued"] == 0 and port["lines_bad"] == 5)

    await wait_for(settled, FLOW_TIMEOUT_S, 0.3)
    document = read_status(load_config(config))
    text = render(document, config)
    assert f"running (pid {daemon.process.pid if daemon.process else 0})" in text
    assert "online" in text and "unknown_pin 5" in text
    assert f"/{PLAN_MESSAGES} (0%)" in text  # messages this month against the plan
    assert " ago" in text  # last success
    # What the forwarder published: why points would wait, when it tries next, the intervals in effect.
    await wait_for(lambda: daemon.status()["devices"]["pump"]["next_attempt_ts"] is not None, FLOW_TIMEOUT_S, 0.3)
    entry = daemon.status()["devices"]["pump"]
    assert entry["waiting_reason"] is None  # drained: nothing waits (a queue would say why, e.g. "pacing")
    assert entry["history_interval_s"] == 0.5 and entry["live_interval_s"] == 0.5
    assert daemon.stop() == 0
    stopped_document = read_status(load_config(config))
    stopped = render(stopped_document, config)
    assert "not running" in stopped and "unknown_pin 5" in stopped
    assert stopped_document["devices"]["pump"]["next_attempt_ts"] is None  # nothing is planned while stopped

    # Port counters are lifetime: a restart does not forget the bad lines of the run before.
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    await wait_for(lambda: daemon.status()["ports"][pty_port.path]["state"] == "open", FLOW_TIMEOUT_S, 0.3)
    pty_port.write("v1=9.5 v2=9\nv7=2\n")

    def counted() -> bool:
        port = daemon.status()["ports"][pty_port.path]
        return bool(port["lines_bad"] == 6 and port["lines_ok"] == 7)

    await wait_for(counted, FLOW_TIMEOUT_S, 0.3)
    assert daemon.status()["ports"][pty_port.path]["bad_reasons"] == {"unknown_pin": 6}
    assert daemon.stop() == 0
    print(stopped)


async def test_status_at_80_columns_cuts_nothing_and_names_the_port_trouble(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    missing = "/dev/serial/by-id/usb-Arduino__www.arduino.cc__0043_85736323838351F0A1B2-if00"
    ports = [{"path": pty_port.path, "device": "pump"}, {"path": missing, "device": "pump"}]
    config = write_config(tmp_path, str(cloud.url), ports, [PUMP], limits={"messages_per_month": PLAN_MESSAGES})
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    await wait_for(lambda: daemon.status()["ports"][pty_port.path]["state"] == "open", FLOW_TIMEOUT_S, 0.3)
    pty_port.write("v1=0.5 v2=0\n")
    pty_port.write("v1=1.5 v2=1\nv7=1\n")

    def settled() -> bool:
        document = daemon.status()
        return bool(
            document["devices"]["pump"]["delivered"] >= 2
            and document["ports"][pty_port.path]["lines_bad"] == 1
            and document["ports"][missing]["last_error"]
            and document["devices"]["pump"]["next_attempt_ts"] is not None
        )

    await wait_for(settled, FLOW_TIMEOUT_S, 0.3)
    # Piped, as a script or `| less` sees it: rich draws at 80 columns.
    result = edgeforward("status", "--config", str(config), env={"COLUMNS": str(STATUS_WIDTH)})
    assert daemon.stop() == 0
    assert result.returncode == 0, result.stderr
    text = result.stdout
    print(text)
    assert all(len(line) <= STATUS_WIDTH for line in text.splitlines())
    assert "…" not in text and "..." not in text
    for label in ("device pump", "state", "received", "delivered", "queued", "points today", "next request"):
        assert label in text
    assert f"port {pty_port.path}" in text and missing in text
    assert "unknown_pin 1" in text
    assert "could not open port" in text and "No such file or directory" in text
    assert "[Errno" not in text
    # Drained or not by now: either nothing waits ("idle") or the points wait for the next round ("pacing").
    assert "next request idle, in" in text or "next request pacing, in" in text
    wide = render(read_status(load_config(config)), config)
    assert "┃ device" in wide and "┃ next request" in wide  # the devices table, where 200 columns hold it


async def test_a_port_opening_or_lost_is_stored_at_once_counters_at_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The snapshot interval is an hour here: a save that comes before it can only be the state change's.
    monkeypatch.setattr(daemon_module, "SNAPSHOT_INTERVAL_S", 3600.0)
    stats = PortStats(path="/dev/ttyACM0")
    saved: list[list[tuple[object, ...]]] = []

    class _Pipeline:
        def __init__(self) -> None:
            self.stats = stats

        def snapshot(self) -> tuple[str, str, int, int, int, int, str]:
            return (stats.path, str(stats.state), stats.lines_ok, stats.lines_bad, 0, 0, "{}")

    class _Buffer:
        async def save_ports(self, rows: Iterable[tuple[object, ...]]) -> None:
            saved.append(list(rows))

    owner = SimpleNamespace(pipelines=[_Pipeline()], buffer=_Buffer())
    loop = asyncio.create_task(daemon_module.Daemon._snapshot_loop(owner))  # type: ignore[arg-type]
    try:
        await wait_for(lambda: len(saved) == 1, FLOW_TIMEOUT_S, 0.01)
        stats.set_state(PortState.OPEN)
        await wait_for(lambda: len(saved) == 2, FLOW_TIMEOUT_S, 0.01)
        assert saved[-1][0][1] == "open"
        stats.count_ok()  # a counter alone waits for the interval
        stats.set_state(PortState.OPEN)  # not a change
        for _ in range(100):
            await asyncio.sleep(0)
        assert len(saved) == 2 and not stats.changed.is_set()
        stats.set_state(PortState.ABSENT)
        await wait_for(lambda: len(saved) == 3, FLOW_TIMEOUT_S, 0.01)
        assert saved[-1][0][1:3] == ("absent", 1)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
