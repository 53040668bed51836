"""The command line as a user runs it: check-config on the example config, bad configs, the demo."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .conftest import edgeforward

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "edgeforward.toml"
DEMO_TIMEOUT_S = 90


def test_example_config_passes_check_config() -> None:
    result = edgeforward("check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "ok (1 devices, 1 ports)" in result.stdout


def test_example_config_with_metrics_enabled_passes(tmp_path: Path) -> None:
    config = tmp_path / "edgeforward.toml"
    config.write_text(EXAMPLE.read_text().replace('# listen = "127.0.0.1:9108"', 'listen = "127.0.0.1:9108"'))
    result = edgeforward("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr


def test_bad_config_exits_2_and_names_each_key(tmp_path: Path) -> None:
    config = tmp_path / "edgeforward.toml"
    text = (
        EXAMPLE.read_text()
        .replace('v3 = "string"', 'v3 = "decimal"')
        .replace("stale_after_s = 900", "stale_after_s = -1")
    )
    config.write_text(text)
    result = edgeforward("check-config", "--config", str(config))
    assert result.returncode == 2
    assert 'device[0].pins.v3.type: expected one of integer|double|string|boolean|enum|location, got "decimal"' in (
        result.stderr
    )
    assert "metrics.stale_after_s" in result.stderr
    # The token is read by --online (and by run), never offline.
    missing_token = edgeforward("check-config", "--online", "--config", str(EXAMPLE), env={"CREDENTIALS_DIRECTORY": ""})
    assert missing_token.returncode == 2 and "device[0].token_credential" in missing_token.stderr


def test_commands_without_the_cloud_run_where_the_token_credential_does_not_exist(tmp_path: Path) -> None:
    config = tmp_path / "edgeforward.toml"
    config.write_text(EXAMPLE.read_text().replace("/var/lib/edgeforward/buffer.db", str(tmp_path / "buffer.db")))
    assert 'token_credential = "pump"' in config.read_text()
    for command in (["check-config"], ["status", "--json"], ["deadletter", "list"]):
        result = edgeforward(*command, "--config", str(config), env={"CREDENTIALS_DIRECTORY": ""})
        assert result.returncode == 0, (command, result.stderr)
    online = edgeforward("check-config", "--online", "--config", str(config), env={"CREDENTIALS_DIRECTORY": ""})
    assert online.returncode == 2
    # The device whose token failed is still a device: no false "no [[device]] is named" for its port.
    assert online.stderr.splitlines() == ["device[0].token_credential: CREDENTIALS_DIRECTORY is not set"]


def test_demo_headless_ends_by_itself_with_exit_0() -> None:
    result = edgeforward("demo", "--headless", "--duration", "8", timeout=DEMO_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cloud outage begins" in result.stdout and "cloud is back" in result.stdout
    assert "nothing lost, nothing sent twice" in result.stdout
    assert "demo-device-token" not in result.stdout + result.stderr
    # Piped: one line per event, never wrapped at 80 columns; the daemon's log among the events, in order.
    lines = result.stdout.splitlines()
    assert any("A simulated MCU prints" in line and "to a local cloud." in line for line in lines)
    events = [line for line in lines if line.startswith("t=") and "cloud " not in line[:20]]
    assert any("warning line_rejected port=" in line and "reason=syntax" in line for line in events)
    assert events[-1].endswith("MCU stopped; queue empty")
    assert result.stderr == ""


async def test_check_config_online_checks_ports_and_tokens(tmp_path: Path) -> None:
    from edgeforward.cloudsim import CloudSim, SimDevice

    from .conftest import BAD_TOKEN, TOKEN, write_config

    cloud = CloudSim([SimDevice(TOKEN, "pump")])
    url = await cloud.start()
    present = tmp_path / "ttyFAKE"
    present.write_text("")
    devices = [{"name": "pump", "token": TOKEN, "pins": {"v1": "double"}}]
    good = write_config(tmp_path, url, [{"path": str(present), "device": "pump"}], devices)
    result = await asyncio.to_thread(edgeforward, "check-config", "--online", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert "token accepted" in result.stdout and TOKEN not in result.stdout + result.stderr
    bad_devices = [*devices, {"name": "fan", "token": BAD_TOKEN, "pins": {"v1": "double"}}]
    bad = write_config(tmp_path, url, [{"path": str(tmp_path / "ttyGONE"), "device": "pump"}], bad_devices)
    result = await asyncio.to_thread(edgeforward, "check-config", "--online", "--config", str(bad))
    await cloud.stop()
    assert result.returncode == 1
    assert "device[1].token: the cloud refused it for fan: Invalid token." in result.stderr
    assert "ttyGONE: no device found" in result.stderr
    assert [p for p in cloud.points()] == []


async def test_check_config_online_answers_hostile_servers_and_urls_in_one_line_each(tmp_path: Path) -> None:
    from .conftest import TOKEN, write_config
    from .hostile import HostileServer

    server = await HostileServer(modes={TOKEN: "redirect_userinfo"}).start()
    devices = [{"name": "pump", "token": TOKEN, "pins": {"v1": "double"}}]
    config = write_config(tmp_path, server.url, [{"path": "socket://127.0.0.1:99999", "device": "pump"}], devices)
    try:
        result = await asyncio.to_thread(edgeforward, "check-config", "--online", "--config", str(config))
    finally:
        await server.stop()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "port socket://127.0.0.1:99999: not a valid URL (host or port)",
        f"cloud.server: cannot reach {server.url} for pump: refused a redirect (308): carries user credentials",
    ]
    assert TOKEN not in result.stdout + result.stderr and "token accepted" not in result.stdout


def test_every_subcommand_help_has_a_description_and_its_exit_codes() -> None:
    from edgeforward.cli import COMMAND_HELP, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert set(commands.choices) == set(COMMAND_HELP)  # type: ignore[arg-type]
    for name, sub in commands.choices.items():  # type: ignore[union-attr]
        text = sub.format_help()
        description, exit_codes = COMMAND_HELP[name]
        assert " ".join(description.split()[:6]) in " ".join(text.split()), name
        assert "exit codes:" in text and all(f"  {code}  " in text for code, _ in exit_codes), name
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    for name in COMMAND_HELP:
        assert f"`edgeforward {name}" in readme, name
