"""End to end: `edgeforward run` as a subprocess, an MCU on a pty, cloudsim on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from edgeforward.cloudsim import CloudSim

from .conftest import (
    BAD_TOKEN,
    TOKEN,
    TOKEN_FAN,
    DaemonProcess,
    Pty,
    edgeforward,
    ledger_adds_up,
    wait_for,
    write_config,
)

PUMP = {"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer", "v3": "string"}}
DRAIN_TIMEOUT_S = 30.0


def pump_config(tmp_path: Path, cloud: CloudSim, pty_port: Pty, **kwargs: object) -> Path:
    return write_config(
        tmp_path,
        str(cloud.url),
        [{"path": pty_port.path, "device": "pump"}],
        [PUMP],
        **kwargs,  # type: ignore[arg-type]
    )


def readings_in_cloud(cloud: CloudSim, token: str = TOKEN) -> Counter[object]:
    """How many times each v2 counter value reached the cloud."""
    return Counter(p.value for p in cloud.points(token, 2))


async def drained(daemon: DaemonProcess, device: str, received: int) -> None:
    def done() -> bool:
        entry = daemon.status()["devices"][device]
        return bool(entry["received"] >= received and entry["queued"] == 0)

    await wait_for(done, DRAIN_TIMEOUT_S, interval=0.3)


async def test_every_reading_arrives_once_with_value_and_timestamp(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    daemon = daemon_factory(pump_config(tmp_path, cloud, pty_port))
    daemon.start()
    await daemon.wait_started()
    past = int(time.time() * 1000) - 3_600_000
    for i in range(40):
        pty_port.write(f"v1={20 + i / 10:.1f} v2={i}\r\n")
        await asyncio.sleep(0.02)
    for i in range(40, 60):
        pty_port.write(f'v2={i} v3="door open {i}" ts={past + i}\n')
    await drained(daemon, "pump", 40 * 2 + 20 * 2)

    assert daemon.stop() == 0
    status = daemon.status()["devices"]["pump"]
    assert status["received"] == 120 and status["delivered"] == 120 and ledger_adds_up(status)
    assert readings_in_cloud(cloud) == Counter(range(60))
    history = {p.value: p.ts_ms for p in cloud.points(TOKEN, 2) if p.path == "history"}
    for i in range(40, 60):
        assert history[i] == past + i
    strings = {p.value for p in cloud.points(TOKEN, 3)}
    assert strings == {f"door open {i}" for i in range(40, 60)}
    assert sum(1 for p in cloud.points(TOKEN) if p.path == "live") == status["delivered_live"] > 0
    assert TOKEN not in daemon.log()


async def test_outage_backlog_drains_without_loss_or_duplicates(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    daemon = daemon_factory(pump_config(tmp_path, cloud, pty_port))
    daemon.start()
    await daemon.wait_started()
    for i in range(10):
        pty_port.write(f"v1=1.5 v2={i}\n")
        await asyncio.sleep(0.02)
    cloud.outage = "503"
    for i in range(10, 60):
        pty_port.write(f"v1=2.5 v2={i}\n")
        await asyncio.sleep(0.02)
    await wait_for(lambda: daemon.status()["devices"]["pump"]["state"] == "offline", 10, interval=0.2)
    cloud.outage = "reset"
    await asyncio.sleep(0.5)
    cloud.outage = None
    for i in range(60, 70):
        pty_port.write(f"v1=3.5 v2={i}\n")
    await drained(daemon, "pump", 140)
    status = daemon.status()["devices"]["pump"]
    assert status["state"] == "online"
    assert ledger_adds_up(status) and status["delivered"] == 140
    assert readings_in_cloud(cloud) == Counter(range(70))
    assert status["delivered_history"] > 0
    assert daemon.stop() == 0


async def test_kill9_loses_no_committed_point(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = pump_config(tmp_path, cloud, pty_port)
    written = 0

    async def mcu(count: int) -> None:
        nonlocal written
        for _ in range(count):
            pty_port.write(f"v1=1.0 v2={written}\n")
            written += 1
            await asyncio.sleep(0.005)

    for round_ in range(3):
        daemon = daemon_factory(config)
        daemon.start()
        await daemon.wait_started()
        if round_ == 1:
            cloud.outage = "503"
        feeding = asyncio.create_task(mcu(150))
        await asyncio.sleep(0.3 + 0.2 * round_)
        daemon.kill()
        await feeding
        cloud.outage = None
    final = daemon_factory(config)
    final.start()
    await final.wait_started()
    await wait_for(lambda: final.status()["devices"]["pump"]["queued"] == 0, DRAIN_TIMEOUT_S, interval=0.3)
    status = final.status()["devices"]["pump"]
    assert ledger_adds_up(status)
    seen = readings_in_cloud(cloud)
    # Every committed reading is in the cloud; only the batches in flight at a kill may be there twice. A kill
    # may take the start of a line with it (read, never committed): the rest, `v2=N`, is then a reading of its
    # own, one point instead of two. At most one such fragment per kill.
    fragments = len(seen) * 2 - status["received"]
    assert 0 <= fragments <= 3, (len(seen), status["received"])
    assert set(seen) <= set(range(written))
    duplicates = sum(n - 1 for n in seen.values())
    assert duplicates <= 3 * 2 * 10_000
    assert final.stop() == 0


async def test_bad_lines_counted_and_wrong_token_parked(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    fan = {"name": "fan", "token": BAD_TOKEN, "pins": {"v1": "double"}}
    config = write_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP, fan])
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    pty_port.write("v1=1.0 v2=0\n")
    garbage = ["hello world", "v9=1", "v2=1.5", "v1=abc", "dev=nobody v1=1", "v1=1 v1=2", "{not json"]
    for i, bad in enumerate(garbage, start=1):
        pty_port.write(f"{bad}\nv1=1.0 v2={i}\ndev=fan v1={i}.5\n")
    pty_port.write_bytes(b"v3=caf\xc3( v2=99\n\n\nv2=100\n")
    await drained(daemon, "pump", 2 * (1 + len(garbage)) + 1)
    await wait_for(lambda: daemon.status()["devices"]["fan"]["state"] == "parked", 10, interval=0.2)
    document = daemon.status()
    fan_status, pump_status = document["devices"]["fan"], document["devices"]["pump"]
    assert fan_status["queued"] == len(garbage) and fan_status["delivered"] == 0
    assert "Invalid token" in (fan_status["reason"] or "")
    assert pump_status["delivered"] == pump_status["received"] == 2 * (1 + len(garbage)) + 1
    assert readings_in_cloud(cloud) == Counter([*range(len(garbage) + 1), 100])
    assert cloud.points(TOKEN_FAN) == []
    await wait_for(lambda: daemon.status()["ports"][pty_port.path]["lines_bad"] == len(garbage) + 1, 30, interval=0.3)
    port = daemon.status()["ports"][pty_port.path]
    assert port["state"] == "open"
    assert port["lines_ok"] == 1 + 2 * len(garbage) + 1
    assert port["bad_reasons"]["encoding"] == 1
    assert daemon.stop() == 0
    log = daemon.log()
    assert TOKEN not in log and BAD_TOKEN not in log
    assert "line_rejected" in log and "device_parked" in log


def test_check_config_reports_every_problem_with_its_key_path(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[cloud]\ntimeout_s = "soon"\n[forward]\nlive_every = 3\n'
        '[[port]]\npath = "/dev/ttyACM0"\ndevice = "ghost"\n'
        '[[device]]\nname = "pump"\n[device.pins]\nv7 = "decimal"\nv300 = "double"\n'
    )
    result = edgeforward("check-config", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert 'device[0].pins.v7.type: expected one of integer|double|string|boolean|enum|location, got "decimal"' in lines
    for key in ("cloud.timeout_s", "forward.live_every", "port[0].device", "device[0].pins.v300", "device[0].token"):
        assert any(line.startswith(key + ":") for line in lines), (key, lines)
    assert edgeforward("run", "--config", str(config)).returncode == 2


def test_check_config_accepts_the_shipped_example_and_env(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config" / "edgeforward.toml"
    result = edgeforward("check-config", env={"EDGEFORWARD_CONFIG": str(example), "PUMP_TOKEN": "example-token"})
    assert result.returncode == 0, result.stderr


def test_status_without_buffer_and_daemon(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", [{"path": "/dev/ttyNOPE", "device": "pump"}], [PUMP])
    result = edgeforward("status", "--json", "--config", str(config))
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document["devices"]["pump"]["state"] == "unknown"
    assert document["ports"]["/dev/ttyNOPE"] == {**document["ports"]["/dev/ttyNOPE"], "state": "absent", "lines_ok": 0}
    human = edgeforward("status", "--config", str(config))
    assert human.returncode == 0 and "pump" in human.stdout
