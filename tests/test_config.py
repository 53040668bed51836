"""Config: typed, frozen, every problem named by its key path."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

from edgeforward.config import ConfigError, config_path, load_config, parse_config
from edgeforward.points import PinType

TOKEN = "tok-0123456789abcdef"


def problems_of(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, tmp_path / "edgeforward.toml")
    return caught.value.problems


def device(**extra: Any) -> dict[str, Any]:
    return {"name": "pump", "token": TOKEN, "pins": {"v1": "double"}, **extra}


def test_minimal_config_defaults_and_frozen(tmp_path: Path) -> None:
    config = parse_config({"device": [device()]}, tmp_path / "edgeforward.toml")
    assert config.cloud.server == "https://blynk.cloud"
    assert config.cloud.limits.points_per_day == 10_000 and config.cloud.limits.messages_per_month == 100_000
    assert config.buffer.synchronous == "FULL"
    assert config.devices[0].pins[1].type is PinType.DOUBLE
    with pytest.raises(AttributeError):
        config.cloud.timeout_s = 1  # type: ignore[misc]
    assert TOKEN not in repr(config.devices[0])


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "pump.token").write_text(TOKEN + "\n")
    raw = {"buffer": {"path": "data/buffer.db"}, "device": [{"name": "pump", "token_file": "pump.token"}]}
    config = parse_config(raw, tmp_path / "edgeforward.toml")
    assert config.buffer.path == str(tmp_path / "data" / "buffer.db")
    assert config.devices[0].token == TOKEN


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUMP_TOKEN", TOKEN)
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "fan").write_text(TOKEN + "x")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    raw = {
        "device": [
            {"name": "pump", "token_env": "PUMP_TOKEN"},
            {"name": "fan", "token_credential": "fan"},
        ]
    }
    config = parse_config(raw, tmp_path / "edgeforward.toml")
    assert [d.token for d in config.devices] == [TOKEN, TOKEN + "x"]
    assert config.tokens == (TOKEN, TOKEN + "x")


def test_every_problem_on_its_own_line_with_its_key_path(tmp_path: Path) -> None:
    raw = {
        "extra": 1,
        "cloud": {"server": "ftp://x", "limits": {"points_per_day": -1}},
        "forward": {"over_quota": "burst"},
        "port": [{"path": "/dev/ttyACM0", "device": "ghost", "format": "xml"}],
        "device": [
            {"name": "pump", "pins": {"v7": "decimal", "v300": "double", "x1": "double"}},
            {"name": "fan", "token": TOKEN, "token_env": "X"},
            {"name": "fan2", "token": TOKEN, "limits": {"batch_max_points": 0}},
        ],
    }
    problems = problems_of(raw, tmp_path)
    expected_starts = [
        "extra: unknown key",
        "cloud.limits.points_per_day:",
        "forward.over_quota:",
        'device[0].pins.v7.type: expected one of integer|double|string|boolean|enum|location, got "decimal"',
        'device[0].pins.v300: expected a virtual pin name v0..v255, got "v300"',
        "device[0].pins.x1:",
        "device[0].token: missing",
        "device[1].token_env: give only one of token, token_env",
        "device[2].limits.",
        "port[0].format:",
    ]
    for start in expected_starts:
        assert any(problem.startswith(start) for problem in problems), (start, problems)


def test_device_limits_override_the_cloud_plan_key_by_key(tmp_path: Path) -> None:
    raw = {
        "cloud": {"limits": {"points_per_day": 3000, "messages_per_month": 500}},
        "device": [device(), {**device(name="pro", limits={"points_per_day": 100_000, "messages_per_month": 0})}],
    }
    config = parse_config(raw, tmp_path / "edgeforward.toml")
    assert config.limits_of("pump").points_per_day == 3000
    pro = config.limits_of("pro")
    assert (pro.points_per_day, pro.messages_per_month) == (100_000, 0)
    assert pro.batch_max_points == config.cloud.limits.batch_max_points


def test_nmea_and_csv_ports_checked(tmp_path: Path) -> None:
    raw = {
        "port": [
            {"path": "/dev/ttyUSB0", "format": "csv", "device": "pump"},
            {"path": "/dev/ttyUSB1", "format": "nmea", "device": "pump", "nmea": {"location": "v1"}},
        ],
        "device": [device()],
    }
    problems = problems_of(raw, tmp_path)
    assert any(p.startswith("port[0].columns: csv needs") for p in problems)
    assert any(p.startswith("port[1].nmea.location: pin v1 is a double pin") for p in problems)


def test_load_config_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cloud\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    monkeypatch.setenv("EDGEFORWARD_CONFIG", str(bad))
    assert config_path(None) == bad
    monkeypatch.delenv("EDGEFORWARD_CONFIG")
    with pytest.raises(ConfigError, match="EDGEFORWARD_CONFIG"):
        config_path(None)


def test_limits_table_is_typed() -> None:
    from edgeforward.config import Limits, _convert

    problems: list[str] = []
    assert _convert({"requests_per_second": "fast"}, Limits, "cloud.limits", problems) is None
    assert problems == ["cloud.limits.requests_per_second: expected float, got str"]
    limits = _convert({"requests_per_second": 5, "points_per_day": 0}, Limits, "cloud.limits", problems)
    assert limits == Limits(requests_per_second=5.0, points_per_day=0)
    assert type(limits.requests_per_second) is float


# What TOML gives and what the config says of it, word for word: the wording users and their scripts know.
WORDING = [
    ({"cloud": {"limits": {"points_per_day": -1}}}, ["cloud.limits.points_per_day: expected int >= 0"]),
    ({"cloud": {"limits": {"points_per_day": "5"}}}, ["cloud.limits.points_per_day: expected int, got str"]),
    ({"cloud": {"limits": {"points_per_day": 5.0}}}, ["cloud.limits.points_per_day: expected int, got float"]),
    ({"cloud": {"limits": {"points_per_day": True}}}, ["cloud.limits.points_per_day: expected int, got bool"]),
    (
        {"cloud": {"limits": {"requests_per_second": True}}},
        ["cloud.limits.requests_per_second: expected float, got bool"],
    ),
    ({"cloud": {"limits": {"requests_per_second": 0}}}, ["cloud.limits.requests_per_second: expected float > 0.0"]),
    ({"cloud": {"limits": {"max_age_days": float("nan")}}}, ["cloud.limits.max_age_days: expected float > 0.0"]),
    ({"cloud": {"limits": {"max_request_bytes": 10}}}, ["cloud.limits.max_request_bytes: expected int >= 1024"]),
    ({"cloud": {"limits": {"bogus": 1}}}, ["cloud.limits.bogus: unknown key"]),
    ({"cloud": {"limits": [1]}}, ["cloud.limits: expected object, got array"]),
    ({"cloud": "x"}, ["cloud: expected object, got str"]),
    ({"cloud": {"server": {"a": 1}}}, ["cloud.server: expected str, got object"]),
    ({"cloud": {"ca_file": 5}}, ["cloud.ca_file: expected str | null, got int"]),
    ({"buffer": {"synchronous": True}}, ["buffer.synchronous: expected str, got bool"]),
    ({"buffer": {"commit_interval_ms": 10_001}}, ["buffer.commit_interval_ms: expected float <= 10000.0"]),
    ({"buffer": {"commit_interval_ms": -1}}, ["buffer.commit_interval_ms: expected float >= 0.0"]),
    ({"forward": {"live_share": 1.5}}, ["forward.live_share: expected float <= 1.0"]),
    ({"clock": {"require_sync": 1}}, ["clock.require_sync: expected bool | str, got int"]),
    ({"log": {"level": "INFO"}}, ['log.level: expected one of debug|info|warning|error, got "INFO"']),
    ({"port": [{"device": "pump"}]}, ["port[0].path: missing"]),
    ({"port": [{"path": "/dev/x", "ack": 1}]}, ["port[0].ack: expected bool, got int"]),
    ({"port": [{"path": "/dev/x", "max_line_bytes": 2_000_000}]}, ["port[0].max_line_bytes: expected int <= 1048576"]),
    ({"port": [{"path": "/dev/x", "columns": "ts,v1"}]}, ["port[0].columns: expected array | null, got str"]),
    ({"port": [{"path": "/dev/x", "columns": ["ts", 1]}]}, ["port[0].columns[1]: expected str, got int"]),
    ({"port": [{"path": "/dev/x", "nmea": "v1"}]}, ["port[0].nmea: expected object | null, got str"]),
    ({"port": [{"path": "/dev/x", "nmea": {"loc": "v1"}}]}, ["port[0].nmea.loc: unknown key"]),
    ({"port": [5]}, ["port[0]: expected object, got int"]),
    ({"device": [device(name="")]}, ["device[0].name: expected str of length >= 1"]),
    ({"device": [{"token": TOKEN}]}, ["device[0].name: missing"]),
    ({"device": [device(pins=["v1"])]}, ["device[0].pins: expected object, got array"]),
    ({"device": [device(limits="x")]}, ["device[0].limits: expected object | null, got str"]),
    (
        {"device": [device(pins={"v1": {"type": "double", "min": True}})]},
        ["device[0].pins.v1.min: expected float | null, got bool"],
    ),
    (
        {"device": [device(pins={"v1": {"type": "double", "min": 5, "max": 1}})]},
        ["device[0].pins.v1.min: 5.0 is above max 1.0"],
    ),
    ({"device": [device(pins={"v1": {"type": "double", "unit": "C"}})]}, ["device[0].pins.v1.unit: unknown key"]),
]


@pytest.mark.parametrize(("raw", "expected"), WORDING)
def test_problem_wording(raw: dict[str, Any], expected: list[str], tmp_path: Path) -> None:
    assert problems_of({"device": [device()], **raw}, tmp_path) == expected


def test_every_problem_of_one_table_is_listed(tmp_path: Path) -> None:
    raw = {"cloud": {"timeout_s": "x", "server": 5, "zz": 1, "bogus": 1}, "port": [{"baud": 0}], "device": [device()]}
    assert problems_of(raw, tmp_path) == [
        "cloud.server: expected str, got int",
        "cloud.timeout_s: expected float, got str",
        "cloud.bogus: unknown key",
        "cloud.zz: unknown key",
        "port[0].path: missing",
        "port[0].baud: expected int >= 1",
    ]


def test_toml_values_convert_as_they_did(tmp_path: Path) -> None:
    raw = {
        "cloud": {"timeout_s": 5, "limits": {"max_age_days": float("inf")}},
        "clock": {"require_sync": False},
        "port": [{"path": "/dev/x", "device": "pump", "columns": ["ts", "v1"], "format": "csv"}],
        "device": [device(pins={"v1": {"type": "double", "min": 0, "max": 10}})],
    }
    config = parse_config(raw, tmp_path / "edgeforward.toml")
    assert type(config.cloud.timeout_s) is float and config.cloud.limits.max_age_days == float("inf")
    assert config.clock.require_sync is False
    assert config.ports[0].columns == ["ts", "v1"]
    spec = config.devices[0].pins[1]
    assert (spec.type, spec.min, spec.max) == (PinType.DOUBLE, 0.0, 10.0) and type(spec.min) is float


def test_without_reading_tokens_sources_are_checked_for_form_only(tmp_path: Path) -> None:
    raw = {
        "port": [{"path": "/dev/ttyACM0", "device": "pump"}],
        "device": [
            {"name": "pump", "token_credential": "pump", "pins": {"v1": "double"}},
            {"name": "fan", "token_file": "missing.token"},
            {"name": "heater", "token_env": "EDGEFORWARD_TEST_UNSET"},
            {"name": "inline", "token": TOKEN},
        ],
    }
    config = parse_config(raw, tmp_path / "edgeforward.toml", read_tokens=False)
    assert [d.token for d in config.devices] == ["", "", "", TOKEN]
    assert config.tokens == (TOKEN,)
    bad = {"device": [{"name": "pump", "token_file": " "}, {"name": "fan", "token": TOKEN, "token_env": "X"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, tmp_path / "edgeforward.toml", read_tokens=False)
    assert caught.value.problems == [
        "device[0].token_file: empty",
        "device[1].token_env: give only one of token, token_env",
    ]


def test_a_device_whose_token_fails_is_still_a_device_for_its_ports(tmp_path: Path) -> None:
    raw = {
        "port": [{"path": "/dev/ttyACM0", "device": "pump"}],
        "device": [{"name": "pump", "token_file": "missing.token", "pins": {"v1": "double"}}],
    }
    problems = problems_of(raw, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("device[0].token_file: cannot read")


# ---------------------------------------------------------------- config checks of csv and nmea ports


def port_problems(port: dict[str, Any], tmp_path: Path) -> list[str]:
    raw: dict[str, Any] = {
        "device": [{"name": "truck", "token": "t" * 32, "pins": {"v10": "location", "v11": "double", "v12": "string"}}],
        "port": [port],
    }
    try:
        parse_config(raw, tmp_path / "edgeforward.toml")
    except ConfigError as exc:
        return exc.problems
    return []


def test_config_checks_nmea_pins_against_the_device(tmp_path: Path) -> None:
    port = {
        "path": "/dev/ttyGPS",
        "format": "nmea",
        "device": "truck",
        "nmea": {"location": "v10", "speed_kmh": "v11", "altitude_m": "v12", "satellites": "v13"},
    }
    assert port_problems(port, tmp_path) == [
        'port[0].nmea.altitude_m: pin v12 is a string pin on device "truck", expected double or integer',
        'port[0].nmea.satellites: pin v13 is not declared on device "truck"',
    ]
    port["nmea"] = {"location": "v11"}
    assert port_problems(port, tmp_path) == [
        'port[0].nmea.location: pin v11 is a double pin on device "truck", expected location'
    ]
    port["nmea"] = {"location": "v10", "speed_kmh": "v11"}
    assert port_problems(port, tmp_path) == []


def test_config_checks_csv_columns(tmp_path: Path) -> None:
    port: dict[str, Any] = {"path": "/dev/ttyLOG", "format": "csv", "device": "truck", "columns": ["ts", "temp"]}
    assert port_problems(port, tmp_path) == ["port[0].columns: column 'temp' is not v0..v255, ts, ms, dev or seq"]
    port["columns"] = ["ts", "v11", "v11"]
    assert port_problems(port, tmp_path) == ["port[0].columns: column v11 is given twice"]
    port["columns"] = ["ts", "v11"]
    assert port_problems(port, tmp_path) == []


def test_config_newline_option(tmp_path: Path) -> None:
    assert port_problems({"path": "/dev/ttyS0", "newline": "cr"}, tmp_path) == []
    assert port_problems({"path": "/dev/ttyS0", "newline": "lfcr"}, tmp_path) == [
        'port[0].newline: expected one of lf|crlf|cr|any, got "lfcr"'
    ]


def test_config_reset_on_open_is_for_device_paths(tmp_path: Path) -> None:
    assert port_problems({"path": "/dev/ttyACM0", "reset_on_open": False}, tmp_path) == []
    assert port_problems({"path": "socket://10.0.0.5:2000", "reset_on_open": False}, tmp_path) == [
        "port[0].reset_on_open: only a device path has DTR/RTS lines to keep, not a URL"
    ]


def test_enum_errors_list_the_valid_values(tmp_path: Path) -> None:
    raw = {
        "buffer": {"synchronous": "off"},
        "forward": {"over_quota": "burst"},
        "clock": {"require_sync": "yes"},
        "log": {"level": "loud"},
        "port": [{"path": "/dev/ttyACM0", "device": "pump", "format": "KV"}],
        "device": [device()],
    }
    assert problems_of(raw, tmp_path) == [
        'buffer.synchronous: expected one of FULL|NORMAL, got "off"',
        'forward.over_quota: expected one of defer|downsample, got "burst"',
        'log.level: expected one of debug|info|warning|error, got "loud"',
        'clock.require_sync: expected one of auto|true|false, got "yes"',
        'port[0].format: expected one of kv|json|csv|nmea, got "KV"',
    ]


EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "edgeforward.toml"
_TABLE_RE = re.compile(r"^(?:# )?\[\[?([a-z_.]+)\]\]?")
_KEY_RE = re.compile(r"^(?:# )?([a-z_0-9]+)\s*=\s*(.*)$")


def _schema() -> dict[str, set[str]]:
    """Every key the config accepts, by table, from the attrs classes that decode it."""
    from edgeforward import config as model

    def keys(struct: Any, *skip: str) -> set[str]:
        return {f.name for f in attrs.fields(struct)} - set(skip)

    tables = {name: keys(struct, "limits") for name, struct in model._TOP_LEVEL.items()}  # [cloud.limits] below
    return {
        **tables,
        "cloud.limits": keys(model.Limits),
        "port": keys(model.PortConfig, "nmea"),
        "port.nmea": keys(model.NmeaPins),
        "device": keys(model._DeviceTable, "pins", "limits"),
        "device.pins": keys(model.PinSpec),
        "device.limits": keys(model.Limits),
    }


def _example_keys() -> dict[str, set[str]]:
    """Every key the example sets or shows commented out ("# key = value"), by table."""
    found: dict[str, set[str]] = {}
    table = ""
    for line in EXAMPLE.read_text().splitlines():
        if header := _TABLE_RE.match(line):
            table = header.group(1)
            found.setdefault(table, set())
            continue
        key = _KEY_RE.match(line)
        if key is None:
            continue
        # A commented key is valid TOML once uncommented (a reader can trust the example).
        value = tomllib.loads(f"{key.group(1)} = {key.group(2)}")[key.group(1)]
        if table == "device.pins":
            found[table] |= set(value) if isinstance(value, dict) else {"type"}
        else:
            found[table].add(key.group(1))
    return found


def test_the_example_config_lists_every_key_of_the_schema() -> None:
    schema, example = _schema(), _example_keys()
    assert set(example) == set(schema)
    for table, keys in schema.items():
        assert example[table] == keys, (table, keys - example[table], example[table] - keys)
    parse_config(tomllib.loads(EXAMPLE.read_text()), EXAMPLE, read_tokens=False)
