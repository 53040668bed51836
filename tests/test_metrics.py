"""Metrics and /healthz over HTTP on loopback: an in-process daemon, an MCU on a pty, cloudsim."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from edgeforward.cloudsim import CloudSim
from edgeforward.config import load_config
from edgeforward.daemon import Daemon

from .conftest import TOKEN, Pty, wait_for, write_config

PLAN_MESSAGES = 100_000_000
PUMP = {"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer"}}
HTTP_TIMEOUT_S = 10.0
FLOW_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
RECOVER_TIMEOUT_S = 45.0  # the planner paces the drain; a loaded CI machine is slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def metrics_config(tmp_path: Path, server: str, ports: list[dict[str, Any]], stale_after_s: float = 60) -> Path:
    # A monthly plan so large that its pacing never binds, on any day of any month.
    path = write_config(tmp_path, server, ports, [PUMP], limits={"messages_per_month": PLAN_MESSAGES})
    listen = f"127.0.0.1:{free_port()}"
    path.write_text(path.read_text() + f'\n[metrics]\nlisten = "{listen}"\nstale_after_s = {stale_after_s}\n')
    return path


@asynccontextmanager
async def running(config_path: Path) -> AsyncIterator[tuple[Daemon, str]]:
    config = load_config(config_path)
    daemon = Daemon(config)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), FLOW_TIMEOUT_S)
        assert config.metrics.listen is not None
        yield daemon, f"http://{config.metrics.listen}"
    finally:
        stop.set()
        await asyncio.wait_for(task, STOP_TIMEOUT_S)


async def get(url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.text()


async def scrape(base: str) -> Samples:
    status, text = await get(base + "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def poll(check: Callable[[], Any], within_s: float = FLOW_TIMEOUT_S) -> None:
    """Wait until an async check returns true."""
    result = [False]

    async def probe() -> None:
        result[0] = bool(await check())

    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        await probe()
        if result[0]:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.1)


async def test_metrics_match_the_ledger_exactly_and_health_is_ok(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty
) -> None:
    config = metrics_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}])
    async with running(config) as (daemon, base):
        await wait_for(lambda: daemon.pipelines[0].stats.state == "open", FLOW_TIMEOUT_S)
        pty_port.write("v1=1.5 v2=1\n")  # the first line may be taken for the tail of an earlier one
        for i in range(2, 12):
            pty_port.write(f"v1={i}.5 v2={i}\nv9=oops\n")
        await wait_for(lambda: daemon.pipelines[0].stats.lines_bad >= 10, FLOW_TIMEOUT_S)

        async def drained() -> bool:
            ledger = await daemon.buffer.ledger("pump")
            return ledger["received"] >= 20 and ledger["queued"] == 0

        await poll(drained)
        samples = await scrape(base)
        ledger = await daemon.buffer.ledger("pump")
        assert value(samples, "edgeforward_points_received_total", device="pump") == ledger["received"]
        assert (
            value(samples, "edgeforward_points_delivered_total", device="pump", path="live")
            == (ledger["delivered_live"])
        )
        assert (
            value(samples, "edgeforward_points_delivered_total", device="pump", path="history")
            == (ledger["delivered_history"])
        )
        for key in ("queued", "expired", "dropped", "rejected", "downsampled"):
            name = "edgeforward_points_queued" if key == "queued" else f"edgeforward_points_{key}_total"
            assert value(samples, name, device="pump") == ledger[key] == 0
        ok_requests = value(samples, "edgeforward_requests_total", device="pump", outcome="ok")
        assert ok_requests == daemon.forwarders["pump"].snapshot().outcomes["ok"] > 0
        assert value(samples, "edgeforward_messages_this_month", device="pump") >= ok_requests
        assert value(samples, "edgeforward_messages_budget_left", device="pump") == (
            PLAN_MESSAGES - value(samples, "edgeforward_messages_this_month", device="pump")
        )
        assert value(samples, "edgeforward_oldest_queued_age_seconds", device="pump") == 0
        assert value(samples, "edgeforward_device_state", device="pump", state="online") == 1
        assert value(samples, "edgeforward_port_lines_total", port=pty_port.path, result="bad") == 10
        assert value(samples, "edgeforward_port_lines_bad_total", port=pty_port.path, reason="unknown_pin") == 10
        assert value(samples, "edgeforward_port_open", port=pty_port.path) == 1
        assert value(samples, "edgeforward_healthy") == 1
        assert await get(base + "/healthz") == (200, "ok\n")
        assert TOKEN not in (await get(base + "/metrics"))[1]


async def test_health_turns_503_when_the_cloud_accepts_nothing_while_points_are_due(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty
) -> None:
    config = metrics_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], stale_after_s=1)
    async with running(config) as (daemon, base):
        await wait_for(lambda: daemon.pipelines[0].stats.state == "open", FLOW_TIMEOUT_S)
        cloud.outage = "503"
        for i in range(5):
            pty_port.write(f"v2={i}\n")

        async def unhealthy() -> bool:
            status, _ = await get(base + "/healthz")
            return status == 503

        await poll(unhealthy, RECOVER_TIMEOUT_S)
        status, text = await get(base + "/healthz")
        assert status == 503 and "device pump: the cloud accepted nothing" in text and "offline" in text
        samples = await scrape(base)
        assert value(samples, "edgeforward_healthy") == 0
        assert value(samples, "edgeforward_requests_total", device="pump", outcome="transient") > 0
        assert value(samples, "edgeforward_points_queued", device="pump") > 0
        cloud.outage = None

        async def healthy() -> bool:
            pty_port.write("v2=99\n")  # the MCU goes on printing
            return await get(base + "/healthz") == (200, "ok\n")

        await poll(healthy, RECOVER_TIMEOUT_S)


async def test_health_is_503_while_a_port_is_absent(tmp_path: Path, cloud: CloudSim) -> None:
    missing = str(tmp_path / "ttyUSB-missing")
    config = metrics_config(tmp_path, str(cloud.url), [{"path": missing, "device": "pump"}])
    async with running(config) as (_daemon, base):
        status, text = await get(base + "/healthz")
        assert status == 503 and f"port {missing} is absent" in text
        samples = await scrape(base)
        assert value(samples, "edgeforward_port_open", port=missing) == 0
