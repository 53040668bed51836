"""Tests of the pure line parsers (kv, json, csv, nmea) and of the MCU clock."""

from __future__ import annotations

import json
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeforward.config import ConfigError, NmeaPins, parse_config
from edgeforward.lines import (
    IGNORE_REASONS,
    INT64_MAX,
    INT64_MIN,
    KNOTS_TO_KMH,
    MCU_COUNTER_SPAN,
    MCU_DRIFT_PPM,
    MCU_MAX_AHEAD_MS,
    META_KEYS,
    MIN_TS_MS,
    MS_PER_DAY,
    REJECT_REASONS,
    CsvParser,
    Ignored,
    LineParser,
    McuClock,
    ParseContext,
    Reading,
    Rejected,
    csv_column_problems,
    format_kv,
    parse_json,
    parse_kv,
    parse_line,
    parse_nmea,
)
from edgeforward.points import STRING_MAX_BYTES, PinType, Point, Value, parse_pin_name

NOW = 1_764_000_000_000
FUTURE_MS = 30 * MS_PER_DAY
PUMP = {
    0: PinType.INTEGER,
    1: PinType.DOUBLE,
    2: PinType.INTEGER,
    3: PinType.STRING,
    4: PinType.LOCATION,
    5: PinType.BOOLEAN,
    6: PinType.ENUM,
}
TRUCK = {10: PinType.LOCATION, 11: PinType.DOUBLE, 12: PinType.INTEGER, 13: PinType.INTEGER, 14: PinType.STRING}
DEVICES = {"pump": PUMP, "tank": {1: PinType.DOUBLE}, "truck": TRUCK}
CTX = ParseContext(DEVICES, "pump", FUTURE_MS)
NO_DEFAULT = ParseContext(DEVICES, None, FUTURE_MS)
NMEA = NmeaPins(location="v10", altitude_m="v11", speed_kmh="v11", satellites="v12")
GGA_PINS = NmeaPins(location="v10", altitude_m="v11", satellites="v12")
RMC_PINS = NmeaPins(location="v10", speed_kmh="v11")
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def typed(value: Any) -> Any:
    """A value with its exact type, so that 1 == 1.0 == True do not pass for each other."""
    if isinstance(value, tuple):
        return ("tuple", tuple(typed(item) for item in value))
    return (type(value).__name__, value)


def assert_reading(result: object, expected: Reading) -> None:
    assert isinstance(result, Reading), result
    assert result == expected
    assert [typed(value) for _, value in result.values] == [typed(value) for _, value in expected.values]


def assert_rejected(result: object, reason: str, *fragments: str) -> None:
    assert isinstance(result, Rejected), result
    assert result.reason == reason, result
    for fragment in fragments:
        assert fragment in result.detail, result


def check_invariants(result: object, ctx: ParseContext = CTX) -> None:
    """What every parse result must satisfy, whatever the input."""
    assert result is None or isinstance(result, Reading | Rejected | Ignored)
    if isinstance(result, Rejected):
        assert result.reason in REJECT_REASONS
        assert len(result.detail) < 400
    elif isinstance(result, Ignored):
        assert result.reason in IGNORE_REASONS
    elif isinstance(result, Reading):
        declared = ctx.devices[result.device]
        assert result.values
        assert len({pin for pin, _ in result.values}) == len(result.values)
        for pin, value in result.values:
            assert value_fits(declared[pin], value), (pin, value)
        assert result.ts_ms is None or result.mcu_ms is None


def value_fits(pin_type: PinType, value: Value) -> bool:
    if pin_type in (PinType.INTEGER, PinType.ENUM):
        return type(value) is int and INT64_MIN <= value <= INT64_MAX
    if pin_type is PinType.DOUBLE:
        return type(value) is float
    if pin_type is PinType.BOOLEAN:
        return type(value) is bool
    if pin_type is PinType.STRING:
        return type(value) is str and len(value.encode()) <= STRING_MAX_BYTES
    return (
        isinstance(value, tuple)
        and all(type(part) is float for part in value)
        and -180 <= value[0] <= 180
        and -90 <= value[1] <= 90
    )


def nmea(body: str) -> str:
    """Wrap a sentence body as $body*hh with its checksum."""
    return f"${body}*{reduce(lambda acc, char: acc ^ ord(char), body, 0):02X}"


# ---------------------------------------------------------------- kv: accepted

KV_ACCEPTED: list[tuple[str, Reading]] = [
    ("v1=23.5 v2=17 ts=1764000000000", Reading("pump", ((1, 23.5), (2, 17)), ts_ms=1764000000000)),
    ("V1=23.5 TS=1764000000000", Reading("pump", ((1, 23.5),), ts_ms=1764000000000)),
    ("v1=17", Reading("pump", ((1, 17.0),))),
    ("v1=-0.5e3", Reading("pump", ((1, -500.0),))),
    ("v1=.5", Reading("pump", ((1, 0.5),))),
    ("v1=+1.", Reading("pump", ((1, 1.0),))),
    ("v2=-9223372036854775808", Reading("pump", ((2, INT64_MIN),))),
    ("v2=+9223372036854775807", Reading("pump", ((2, INT64_MAX),))),
    ("v2=000000000000000000000042", Reading("pump", ((2, 42),))),
    ("v6=3", Reading("pump", ((6, 3),))),
    ("v0=-1", Reading("pump", ((0, -1),))),
    ("v5=true v6=0", Reading("pump", ((5, True), (6, 0)))),
    ("v5=FALSE", Reading("pump", ((5, False),))),
    ("v5=1", Reading("pump", ((5, True),))),
    ("v5=0", Reading("pump", ((5, False),))),
    ("v4=32.12,49.10", Reading("pump", ((4, (32.12, 49.1)),))),
    ("v4=-180,-90", Reading("pump", ((4, (-180.0, -90.0)),))),
    ('v3="door open"', Reading("pump", ((3, "door open"),))),
    ("v3=open", Reading("pump", ((3, "open"),))),
    ("v3=17", Reading("pump", ((3, "17"),))),
    ("v3=", Reading("pump", ((3, ""),))),
    ('v3=""', Reading("pump", ((3, ""),))),
    ('v3="say \\"hi\\" \\\\o/"', Reading("pump", ((3, 'say "hi" \\o/'),))),
    ('v3="a\\nb"', Reading("pump", ((3, "a\\nb"),))),
    ("v3=a\\b", Reading("pump", ((3, "a\\b"),))),
    ("v3=a=b", Reading("pump", ((3, "a=b"),))),
    ('v3="x=1 y" v1=2', Reading("pump", ((3, "x=1 y"), (1, 2.0)))),
    ("v3=温度", Reading("pump", ((3, "温度"),))),
    ("v3=" + "é" * (STRING_MAX_BYTES // 2), Reading("pump", ((3, "é" * (STRING_MAX_BYTES // 2)),))),
    ("  v1=1\t v2=2  ", Reading("pump", ((1, 1.0), (2, 2)))),
    ("dev=tank v1=2", Reading("tank", ((1, 2.0),))),
    ('DEV="tank" v1=2', Reading("tank", ((1, 2.0),))),
    ("v1=1 ms=0 seq=7", Reading("pump", ((1, 1.0),), mcu_ms=0, seq=7)),
    ("v1=1 ms=4294967295", Reading("pump", ((1, 1.0),), mcu_ms=4294967295)),
    ("v1=1 ts=1577836800000", Reading("pump", ((1, 1.0),), ts_ms=1577836800000)),
    (f"v1=1 ts={NOW + FUTURE_MS}", Reading("pump", ((1, 1.0),), ts_ms=NOW + FUTURE_MS)),
]


@pytest.mark.parametrize(("line", "expected"), KV_ACCEPTED)
def test_kv_accepts(line: str, expected: Reading) -> None:
    assert_reading(parse_kv(line, CTX, NOW), expected)


def test_kv_out_of_range_is_not_rejected() -> None:
    # min/max of a pin are the cloud's business (it clamps), not the parser's
    spec_ctx = ParseContext({"d": {1: PinType.INTEGER}}, "d", FUTURE_MS)
    assert_reading(parse_kv("v1=100000", spec_ctx, NOW), Reading("d", ((1, 100000),)))


def test_kv_old_timestamps_are_accepted() -> None:
    assert_reading(parse_kv("v1=1 ts=1600000000000", CTX, NOW), Reading("pump", ((1, 1.0),), ts_ms=1600000000000))


# ---------------------------------------------------------------- kv: rejected

KV_REJECTED: list[tuple[str, ...]] = [
    ("v1", "syntax", "'v1'"),
    ("v1=1 junk", "syntax", "'junk'"),
    ('v3="door open', "syntax", "unterminated"),
    ('v3="abc\\"', "syntax", "unterminated"),
    ('v3="a"b', "syntax", "after the closing quote"),
    ('v3=a"b', "syntax", "stray quote"),
    ('"v3"=a', "syntax", "quote in the key"),
    ('v1=1 v3="x" junk', "syntax", "'junk'"),
    ("x=1", "unknown_key", "'x'"),
    ("v1=1 temp=2", "unknown_key", "'temp'"),
    ("v256=1", "unknown_key", "'v256'"),
    ("v01=1", "unknown_key", "'v01'"),
    ("=1", "unknown_key", "''"),
    ("v1=1 V1=2", "duplicate_key", "v1"),
    ("ts=1764000000000 v1=1 TS=1764000000000", "duplicate_key", "ts"),
    ("dev=pump dev=pump v1=1", "duplicate_key", "dev"),
    ("v9=1", "unknown_pin", "v9", "'pump'"),
    ("dev=tank v2=1", "unknown_pin", "v2", "'tank'"),
    ("dev=nobody v1=1", "unknown_device", "'nobody'"),
    ("dev=Pump v1=1", "unknown_device", "'Pump'"),
    ("dev= v1=1", "unknown_device", "''"),
    ("ts=1764000000000", "no_values"),
    ("dev=pump seq=3", "no_values"),
    ("v1=1 ts=1764000000000 ms=5", "ts_and_ms"),
    ("v1=1 ts=1764000000", "bad_ts", "seconds"),
    ("v1=1 ts=-5", "bad_ts", "-5"),
    ("v1=1 ts=1.764e12", "bad_ts", "1.764e12"),
    ("v1=1 ts=", "bad_ts"),
    (f"v1=1 ts={NOW + FUTURE_MS + 1}", "bad_ts", "ahead"),
    ("v1=1 ts=" + "9" * 5000, "bad_ts"),
    ("v1=1 ms=-1", "bad_value", "ms"),
    ("v1=1 ms=1.5", "bad_value", "ms"),
    ("v1=1 seq=x", "bad_value", "seq"),
    ("v1=1 seq=99999999999999999999", "bad_value", "seq"),
    ("v2=17.0", "bad_value", "v2 (integer)", "'17.0'"),
    ("v2=1e3", "bad_value", "v2 (integer)"),
    ("v2=1_000", "bad_value", "v2 (integer)"),
    ("v2=0x10", "bad_value", "v2 (integer)"),
    ("v2=", "bad_value", "v2 (integer)"),
    ("v2=١٢", "bad_value", "v2 (integer)"),
    ("v2=9223372036854775808", "bad_value", "v2 (integer)"),
    ("v2=-9223372036854775809", "bad_value", "v2 (integer)"),
    ("v2=" + "1" * 5000, "bad_value", "v2 (integer)", "..."),
    ("v6=two", "bad_value", "v6 (enum)"),
    ("v1=nan", "bad_value", "v1 (double)", "'nan'"),
    ("v1=inf", "bad_value", "v1 (double)"),
    ("v1=-Infinity", "bad_value", "v1 (double)"),
    ("v1=1e999", "bad_value", "v1 (double)"),
    ("v1=1_000.5", "bad_value", "v1 (double)"),
    ("v1=0x1p3", "bad_value", "v1 (double)"),
    ("v1=", "bad_value", "v1 (double)"),
    ("v1=1,5", "bad_value", "v1 (double)"),
    ("v1=.", "bad_value", "v1 (double)"),
    ("v5=yes", "bad_value", "v5 (boolean)", "'yes'"),
    ("v5=2", "bad_value", "v5 (boolean)"),
    ("v4=32.1", "bad_value", "v4 (location)"),
    ("v4=32.1,49.1,3", "bad_value", "v4 (location)"),
    ("v4=181,0", "bad_value", "v4 (location)", "longitude"),
    ("v4=0,-90.5", "bad_value", "v4 (location)", "latitude"),
    ("v4=nan,1", "bad_value", "v4 (location)"),
    ("v3=" + "x" * (STRING_MAX_BYTES + 1), "string_too_long", "v3 (string)", "1025"),
    ("v3=" + "é" * (STRING_MAX_BYTES // 2) + "x", "string_too_long", "v3 (string)", "1025"),
]


@pytest.mark.parametrize("case", KV_REJECTED, ids=[case[0][:40] for case in KV_REJECTED])
def test_kv_rejects_with_reason(case: tuple[str, ...]) -> None:
    line, reason, *fragments = case
    assert_rejected(parse_kv(line, CTX, NOW), reason, *fragments)


def test_kv_no_device() -> None:
    assert_rejected(parse_kv("v1=1", NO_DEFAULT, NOW), "no_device")
    assert_reading(parse_kv("v1=1 dev=tank", NO_DEFAULT, NOW), Reading("tank", ((1, 1.0),)))


def test_kv_default_device_must_exist() -> None:
    ctx = ParseContext(DEVICES, "gone", FUTURE_MS)
    assert_rejected(parse_kv("v1=1", ctx, NOW), "unknown_device", "'gone'")


def test_kv_detail_echo_is_truncated() -> None:
    result = parse_kv("v5=" + "y" * 10_000, CTX, NOW)
    assert_rejected(result, "bad_value", "...")
    assert isinstance(result, Rejected)
    assert len(result.detail) < 200


def test_kv_first_problem_wins_in_documented_order() -> None:
    # syntax before keys, keys before line-level rules, those before the device, then the values
    assert_rejected(parse_kv("x=1 v1", CTX, NOW), "syntax")
    assert_rejected(parse_kv("x=1 v1=1 v1=2", CTX, NOW), "unknown_key")
    assert_rejected(parse_kv("v1=1 v1=2 x=1", CTX, NOW), "duplicate_key")
    assert_rejected(parse_kv("v1=x ts=1 ms=1", CTX, NOW), "ts_and_ms")
    assert_rejected(parse_kv("v9=x ts=1", CTX, NOW), "bad_ts")
    assert_rejected(parse_kv("v9=x dev=nobody", CTX, NOW), "unknown_device")
    assert_rejected(parse_kv("v1=x v9=1", CTX, NOW), "bad_value")
    assert_rejected(parse_kv("v9=1 v1=x", CTX, NOW), "unknown_pin")


ALL_PINS = ParseContext({"d": dict.fromkeys(range(256), PinType.INTEGER)}, "d", FUTURE_MS)


@FAST
@given(st.one_of(st.from_regex(r"[vV][0-9]{1,4}", fullmatch=True), st.text(max_size=6)))
def test_kv_pin_names_follow_parse_pin_name(name: str) -> None:
    if "=" in name or '"' in name or not name or any(char.isspace() for char in name):
        return
    if name.lower() in META_KEYS:
        return
    result = parse_kv(f"{name}=1", ALL_PINS, NOW)
    pin = parse_pin_name(name)
    if pin is None:
        assert_rejected(result, "unknown_key")
    else:
        assert_reading(result, Reading("d", ((pin, 1),)))


# ---------------------------------------------------------------- kv: round trip

VALUE_STRATEGIES: dict[PinType, st.SearchStrategy[Any]] = {
    PinType.INTEGER: st.integers(INT64_MIN, INT64_MAX),
    PinType.ENUM: st.integers(INT64_MIN, INT64_MAX),
    PinType.DOUBLE: st.floats(allow_nan=False, allow_infinity=False),
    PinType.STRING: st.text(max_size=40),
    PinType.BOOLEAN: st.booleans(),
    PinType.LOCATION: st.tuples(st.floats(-180, 180), st.floats(-90, 90)),
}


@st.composite
def readings(draw: st.DrawFn) -> Reading:
    device = draw(st.sampled_from(sorted(DEVICES)))
    declared = DEVICES[device]
    pins = draw(st.lists(st.sampled_from(sorted(declared)), min_size=1, unique=True))
    values = tuple((pin, draw(VALUE_STRATEGIES[declared[pin]])) for pin in pins)
    clock = draw(st.sampled_from(["none", "ts", "ms"]))
    ts_ms = draw(st.integers(MIN_TS_MS, NOW + FUTURE_MS)) if clock == "ts" else None
    mcu_ms = draw(st.integers(0, INT64_MAX)) if clock == "ms" else None
    seq = draw(st.none() | st.integers(0, INT64_MAX))
    return Reading(device, values, ts_ms, mcu_ms, seq)


@FAST
@given(readings())
def test_kv_round_trip(reading: Reading) -> None:
    text = format_kv(reading)
    assert_reading(parse_kv(text, CTX, NOW), reading)
    if "\n" not in text and "\r" not in text:
        assert_reading(parse_line(text.encode() + b"\r\n", "kv", CTX, NOW), reading)


def test_format_kv_quotes_only_when_needed() -> None:
    reading = Reading("pump", ((3, 'a "b"'), (5, True), (4, (1.5, -2.0)), (3, "plain")), seq=4)
    assert format_kv(reading, dev=False) == 'v3="a \\"b\\"" v5=true v4=1.5,-2.0 v3=plain seq=4'


# ---------------------------------------------------------------- json

JSON_ACCEPTED: list[tuple[str, Reading]] = [
    (
        '{"v1": 23.5, "v4": [32.12, 49.10], "ts": 1764000000000, "dev": "pump"}',
        Reading("pump", ((1, 23.5), (4, (32.12, 49.1))), ts_ms=1764000000000),
    ),
    ('{"V1": 17, "TS": 1764000000000}', Reading("pump", ((1, 17.0),), ts_ms=1764000000000)),
    ('{"v2": -9223372036854775808, "v6": 2}', Reading("pump", ((2, INT64_MIN), (6, 2)))),
    ('{"v5": true, "v0": 0}', Reading("pump", ((5, True), (0, 0)))),
    ('{"v5": 0}', Reading("pump", ((5, False),))),
    ('{"v5": 1}', Reading("pump", ((5, True),))),
    ('{"v3": "door \\"open\\"\\n"}', Reading("pump", ((3, 'door "open"\n'),))),
    ('{"v3": ""}', Reading("pump", ((3, ""),))),
    ('{"v4": [-180, 90]}', Reading("pump", ((4, (-180.0, 90.0)),))),
    ('{"v1": 1e300}', Reading("pump", ((1, 1e300),))),
    ('  {"dev": "tank", "v1": 2}  ', Reading("tank", ((1, 2.0),))),
    ('{"v1": 1, "ms": 123, "seq": 0}', Reading("pump", ((1, 1.0),), mcu_ms=123, seq=0)),
]


@pytest.mark.parametrize(("line", "expected"), JSON_ACCEPTED)
def test_json_accepts(line: str, expected: Reading) -> None:
    assert_reading(parse_json(line, CTX, NOW), expected)


JSON_REJECTED: list[tuple[str, ...]] = [
    ("{", "syntax", "invalid JSON"),
    ('{"v1": 1} x', "syntax", "invalid JSON"),
    ("[1, 2]", "syntax", "expected a JSON object"),
    ('"v1"', "syntax", "expected a JSON object"),
    ('{"v1": NaN}', "syntax", "NaN"),
    ('{"v1": Infinity}', "syntax", "Infinity"),
    ('{"v1": ' + "1" * 5000 + "}", "syntax", "invalid JSON"),
    ("[" * 100_000, "syntax", "invalid JSON"),
    ("{}", "no_values"),
    ('{"x": 1}', "unknown_key", "'x'"),
    ('{"v1": 1, "V1": 2}', "duplicate_key", "v1"),
    ('{"v1": 1, "v1": 2}', "duplicate_key", "v1"),
    ('{"v1": 1, "ts": 1764000000000, "Ts": 1764000000000}', "duplicate_key", "ts"),
    ('{"v1": 1, "ts": 1764000000000, "ms": 1}', "ts_and_ms"),
    ('{"v1": 1, "ts": 1764000000000.0}', "bad_ts", "1764000000000.0"),
    ('{"v1": 1, "ts": "1764000000000"}', "bad_ts"),
    ('{"v1": 1, "ts": true}', "bad_ts", "true"),
    ('{"v1": 1, "ts": 1764000000}', "bad_ts", "seconds"),
    ('{"v1": 1, "ms": -1}', "bad_value", "ms"),
    ('{"v1": 1, "seq": 1.0}', "bad_value", "seq"),
    ('{"v1": 1, "dev": 5}', "bad_value", "dev"),
    ('{"v1": 1, "dev": null}', "bad_value", "dev", "null"),
    ('{"v1": 1, "dev": "nobody"}', "unknown_device", "'nobody'"),
    ('{"v9": 1}', "unknown_pin", "v9"),
    ('{"v2": 1.0}', "bad_value", "v2 (integer)", "1.0"),
    ('{"v2": true}', "bad_value", "v2 (integer)", "true"),
    ('{"v2": "17"}', "bad_value", "v2 (integer)", "'17'"),
    ('{"v2": 9223372036854775808}', "bad_value", "v2 (integer)"),
    ('{"v6": 1.5}', "bad_value", "v6 (enum)"),
    ('{"v1": "23.5"}', "bad_value", "v1 (double)"),
    ('{"v1": true}', "bad_value", "v1 (double)"),
    ('{"v1": 1e999}', "bad_value", "v1 (double)"),
    ('{"v1": ' + "9" * 400 + "}", "bad_value", "v1 (double)"),
    ('{"v1": null}', "bad_value", "v1 (double)", "null"),
    ('{"v3": 5}', "bad_value", "v3 (string)"),
    ('{"v3": {"a": 1}}', "bad_value", "v3 (string)", "an object"),
    ('{"v3": "' + "x" * (STRING_MAX_BYTES + 1) + '"}', "string_too_long", "v3 (string)"),
    ('{"v3": "\\ud800"}', "encoding", "v3 (string)", "surrogate"),
    ('{"v5": 2}', "bad_value", "v5 (boolean)"),
    ('{"v5": "true"}', "bad_value", "v5 (boolean)"),
    ('{"v4": "32.1,49.1"}', "bad_value", "v4 (location)"),
    ('{"v4": [32.1]}', "bad_value", "v4 (location)", "[32.1]"),
    ('{"v4": [1, 2, 3, 4, 5]}', "bad_value", "v4 (location)", "an array of 5"),
    ('{"v4": [true, 1]}', "bad_value", "v4 (location)"),
    ('{"v4": [200, 1]}', "bad_value", "v4 (location)", "longitude"),
    ('{"v4": [[[[[[[[[[1]]]]]]]]], 2]}', "bad_value", "v4 (location)"),
]


@pytest.mark.parametrize("case", JSON_REJECTED, ids=[case[0][:40] for case in JSON_REJECTED])
def test_json_rejects_with_reason(case: tuple[str, ...]) -> None:
    line, reason, *fragments = case
    assert_rejected(parse_json(line, CTX, NOW), reason, *fragments)


def test_json_deeply_nested_value_detail_does_not_recurse() -> None:
    depth = 900
    result = parse_json('{"v3": ' + "[" * depth + "]" * depth + "}", CTX, NOW)
    assert_rejected(result, "bad_value", "an array of 1 items")


# ---------------------------------------------------------------- parse_line

LINE_CASES: list[tuple[bytes, str, object]] = [
    (b"v1=1\r", "kv", Reading("pump", ((1, 1.0),))),
    (b"v1=1\r\n", "kv", Reading("pump", ((1, 1.0),))),
    (b"v1=1\n", "kv", Reading("pump", ((1, 1.0),))),
    (b'{"v1": 1}\r', "json", Reading("pump", ((1, 1.0),))),
    (b"v3=\xc3\xa9t\xc3\xa9", "kv", Reading("pump", ((3, "été"),))),
    (b"", "kv", None),
    (b"\r", "kv", None),
    (b"   \t \r", "json", None),
    (b"\xc2\xa0", "kv", None),
]


@pytest.mark.parametrize(("raw", "fmt", "expected"), LINE_CASES)
def test_parse_line(raw: bytes, fmt: str, expected: object) -> None:
    result = parse_line(raw, fmt, CTX, NOW)
    if isinstance(expected, Reading):
        assert_reading(result, expected)
    else:
        assert result == expected


@pytest.mark.parametrize("raw", [b"v3=\xff", b"v3=\xc3", b"\xed\xa0\x80", b'{"v3": "\xe9"}'])
def test_parse_line_rejects_invalid_utf8(raw: bytes) -> None:
    assert_rejected(parse_line(raw, "kv", CTX, NOW), "encoding", "invalid UTF-8")


def test_parse_line_format_problems() -> None:
    assert_rejected(parse_line(b"v1=1", "xml", CTX, NOW), "format", "'xml'")
    assert_rejected(parse_line(b"1,2", "csv", CTX, NOW), "format")
    assert_rejected(parse_line(b"$GPGGA", "nmea", CTX, NOW), "format")
    assert_rejected(parse_line(b"$GPGGA", "nmea", NO_DEFAULT, NOW, nmea_pins=NMEA), "no_device")


def test_reading_points() -> None:
    reading = Reading("pump", ((1, 2.5), (5, True)))
    assert reading.points(NOW) == [Point("pump", 1, NOW, 2.5), Point("pump", 5, NOW, True)]


# ---------------------------------------------------------------- never raises

KV_PIECES = st.sampled_from(
    [
        *("v1=", "V3=", "v4=", "v5=", "v2=", "ts=", "ms=", "seq=", "dev=", "pump", "tank"),
        *('"', '\\"', "\\\\", "\\", "=", " ", "\t", ",", "1", "-", ".", "e", "17", "23.5", "true"),
        *("1764000000000", "\x00", "é", "\u2028"),
    ]
)
kv_texts = st.lists(st.one_of(KV_PIECES, st.text(max_size=4)), max_size=24).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["v1", "V3", "v4", "v5", "ts", "ms", "dev", "x"]) | st.text(max_size=3), children
        )
    ),
    max_leaves=12,
)
json_texts = json_values.map(json.dumps)
csv_texts = st.lists(
    st.one_of(st.sampled_from(["ts", "v1", "v3", "v4", '"', ",", "1.5", "1764000000000"]), st.text(max_size=3)),
    max_size=12,
).map("".join)
NMEA_PIECES = st.sampled_from(
    ["GPGGA", "GNRMC", "GPGSV", "PUBX", ",", "A", "V", "N", "S", "E", "W", "1", "0", "4807.038", "01131.000", "."]
)
nmea_texts = st.one_of(
    st.lists(NMEA_PIECES, max_size=20).map(lambda parts: nmea("".join(parts))),
    st.lists(st.one_of(NMEA_PIECES, st.sampled_from(["$", "*", "*47", "*4"]), st.text(max_size=3)), max_size=20).map(
        "".join
    ),
)


def parse_everything(raw: bytes) -> None:
    for fmt in ("kv", "json", "csv", "nmea", "other"):
        for header in (True, False):
            csv_parser = CsvParser(None if header else ["ts", "v1", "v3", "v4"], header)
            for _ in range(2):  # the second pass sees the header state the first one left
                result = parse_line(raw, fmt, CTX, NOW, csv_parser=csv_parser, nmea_pins=NMEA)
                check_invariants(result)


@FAST
@given(st.binary(max_size=200))
def test_never_raises_on_bytes(raw: bytes) -> None:
    parse_everything(raw)


@FAST
@given(st.one_of(st.text(max_size=120), kv_texts, json_texts, csv_texts, nmea_texts))
def test_never_raises_on_text(text: str) -> None:
    parse_everything(text.encode("utf-8", "surrogatepass"))
    for parse in (parse_kv, parse_json):
        check_invariants(parse(text, CTX, NOW))
    check_invariants(parse_nmea(text, NMEA, "truck", CTX, NOW))


# ---------------------------------------------------------------- csv

CSV_COLUMNS = ["ts", "v1", "v3", "v4"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("1764000000000,23.5,open,", Reading("pump", ((1, 23.5), (3, "open")), ts_ms=1764000000000)),
        (',23.5,"door, open","32.1,49.2"', Reading("pump", ((1, 23.5), (3, "door, open"), (4, (32.1, 49.2))))),
        (',,"say ""hi""",', Reading("pump", ((3, 'say "hi"'),))),
        (" 1764000000000 , 23.5 , padded ,", Reading("pump", ((1, 23.5), (3, " padded ")), ts_ms=1764000000000)),
    ],
)
def test_csv_accepts(line: str, expected: Reading) -> None:
    assert_reading(CsvParser(CSV_COLUMNS, header=False).parse(line, CTX, NOW), expected)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("1,2", "syntax"),
        ("1,2,3,4,5", "syntax"),
        ('1,"unterminated,x,y', "syntax"),
        ('1,"a"b,x,y', "syntax"),
        (",,,", "no_values"),
        ("1764000000,1,,", "bad_ts"),
        (",x,,", "bad_value"),
        (",,,181;0", "bad_value"),
        (",,," + '"' + "1" * 10 + '"', "bad_value"),
        (",,x" + "y" * STRING_MAX_BYTES + ",", "string_too_long"),
    ],
)
def test_csv_rejects(line: str, reason: str) -> None:
    assert_rejected(CsvParser(CSV_COLUMNS, header=False).parse(line, CTX, NOW), reason)


def test_csv_header_sets_columns() -> None:
    parser = CsvParser(None, header=True)
    assert parser.columns is None
    assert parser.parse("\ufeffTS, V1 ,dev", CTX, NOW) == Ignored("header")
    assert parser.columns == ("ts", "v1", "dev")
    assert_reading(parser.parse("1764000000000,2,tank", CTX, NOW), Reading("tank", ((1, 2.0),), ts_ms=1764000000000))
    assert_reading(parser.parse(",3,", CTX, NOW), Reading("pump", ((1, 3.0),)))
    # the microcontroller rebooted and prints its header again
    assert parser.parse("ts,v1,dev", CTX, NOW) == Ignored("header")
    assert parser.columns == ("ts", "v1", "dev")


def test_csv_without_header_yet() -> None:
    parser = CsvParser(None, header=True)
    assert_rejected(parser.parse("ts,v1,temperature", CTX, NOW), "unknown_key", "header line", "'temperature'")
    assert_rejected(parser.parse("1764000000000,2,3", CTX, NOW), "no_header")
    assert parser.parse("v1,v3", CTX, NOW) == Ignored("header")
    assert_reading(parser.parse("2,x", CTX, NOW), Reading("pump", ((1, 2.0), (3, "x"))))


def test_csv_duplicate_header_column() -> None:
    assert_rejected(CsvParser(None, header=True).parse("v1,V1", CTX, NOW), "duplicate_key", "v1")


def test_csv_configured_columns_win_over_header_lines() -> None:
    parser = CsvParser(["v1", "v3"], header=True)
    assert parser.parse("v3,v1", CTX, NOW) == Ignored("header")
    assert parser.columns == ("v1", "v3")
    assert_reading(parser.parse("1,a", CTX, NOW), Reading("pump", ((1, 1.0), (3, "a"))))


def test_csv_bad_configured_columns_reject_every_line() -> None:
    parser = CsvParser(["ts", "temp"], header=False)
    assert_rejected(parser.parse("1764000000000,2", CTX, NOW), "unknown_key", "port columns", "'temp'")
    assert csv_column_problems(["ts", "temp"]) == ["column 'temp' is not v0..v255, ts, ms, dev or seq"]
    assert csv_column_problems(["ts", "v1"]) == []
    assert csv_column_problems(["ts", "dev"]) == ["no pin column (v0..v255)"]
    assert csv_column_problems(["v1", "v01"]) != []


def test_csv_through_parse_line() -> None:
    parser = CsvParser(None, header=True)
    assert parse_line(b"v1,v5\r\n", "csv", CTX, NOW, csv_parser=parser) == Ignored("header")
    assert_reading(
        parse_line(b"1,TRUE\r\n", "csv", CTX, NOW, csv_parser=parser), Reading("pump", ((1, 1.0), (5, True)))
    )


# ---------------------------------------------------------------- nmea

# Real receiver output: GlobalSat BU-353-S4 near Hamilton NZ, from gpsd's test/daemon/bu353s4.log (BSD-2-Clause).
BU353_GGA = "$GPGGA,030719.000,3747.0873,S,17518.8938,E,1,08,1.1,59.9,M,23.7,M,,0000*7D"
BU353_RMC = "$GPRMC,030719.000,A,3747.0873,S,17518.8938,E,0.69,181.39,311214,,,A*7D"
BU353_GSA = "$GPGSA,A,3,17,28,06,01,30,20,26,13,,,,,1.8,1.1,1.5*33"
BU353_GSV = "$GPGSV,3,1,12,17,72,207,32,28,59,095,31,06,35,347,25,01,29,132,23*7B"
NZ = (175 + 18.8938 / 60, -(37 + 47.0873 / 60))


def test_nmea_gga_real_sentence() -> None:
    result = parse_nmea(BU353_GGA, GGA_PINS, "truck", CTX, NOW)
    assert_reading(result, Reading("truck", ((10, NZ), (11, 59.9), (12, 8))))
    assert isinstance(result, Reading)
    assert result.ts_ms is None


def test_nmea_rmc_real_sentence() -> None:
    result = parse_nmea(BU353_RMC, RMC_PINS, "truck", CTX, NOW)
    assert_reading(result, Reading("truck", ((10, NZ), (11, 0.69 * KNOTS_TO_KMH))))


def test_nmea_textbook_gga_and_gn_talker() -> None:
    textbook = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
    assert_reading(
        parse_nmea(textbook, GGA_PINS, "truck", CTX, NOW),
        Reading("truck", ((10, (11 + 31 / 60, 48 + 7.038 / 60)), (11, 545.4), (12, 8))),
    )
    gn_rmc = "$GNRMC,064607.000,A,4546.2282,N,00311.6590,E,0.76,0.00,230619,,,A*7D"
    assert_reading(
        parse_nmea(gn_rmc, RMC_PINS, "truck", CTX, NOW),
        Reading("truck", ((10, (3 + 11.6590 / 60, 45 + 46.2282 / 60)), (11, 0.76 * KNOTS_TO_KMH))),
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (BU353_GSA, Ignored("sentence")),
        (BU353_GSV, Ignored("sentence")),
        (nmea("PUBX,00,081350.00,4717.113210,N"), Ignored("sentence")),
        ("$GNRMC,,V,,,,,,,,,,N,V*37", Ignored("no_fix")),  # u-blox/Teseo before the first fix
        ("$GPGGA,,,,,,0,00,99.99,,,,,,*48", Ignored("no_fix")),
        (nmea("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W,N"), Ignored("no_fix")),
        (nmea("GPGGA,123519,,,,,1,00,,,M,,M,,"), Ignored("no_fix")),
        (nmea("GPRMC,123519,A,,,,,,,230394,,"), Ignored("no_fix")),
    ],
)
def test_nmea_ignored(line: str, expected: Ignored) -> None:
    assert parse_nmea(line, NMEA, "truck", CTX, NOW) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (BU353_GGA[:-2] + "7E", "checksum"),
        (BU353_GGA[:-3], "checksum"),
        (BU353_GGA[:-1], "checksum"),
        (BU353_GGA.replace("59.9", "59.8"), "checksum"),
        ("GPGGA,123519*47", "syntax"),
        ("$GPGGA,12,ü*47", "syntax"),
        (nmea("GPGGA,123519,4807.038"), "syntax"),
        (nmea("GPRMC,123519,A"), "syntax"),
        (nmea("GPGGA,123519,4807.038,X,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,4875.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,9107.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,4807.038,N,01131.000,E,x,08,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,high,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,4807.038,N,01131.000,E,1,-8,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPRMC,123519,A,4807.038,N,01131.000,E,fast,084.4,230394,003.1,W"), "bad_value"),
    ],
)
def test_nmea_rejected(line: str, reason: str) -> None:
    assert_rejected(parse_nmea(line, NMEA, "truck", CTX, NOW), reason)


def test_nmea_garbage_before_the_sentence_and_lowercase_checksum() -> None:
    line = "\x00\x7f noise " + BU353_GGA[:-2] + BU353_GGA[-2:].lower()
    assert isinstance(parse_nmea(line, GGA_PINS, "truck", CTX, NOW), Reading)


def test_nmea_pins_must_fit() -> None:
    assert_rejected(parse_nmea(BU353_GGA, NmeaPins(location="v11"), "truck", CTX, NOW), "bad_value", "v11")
    assert_rejected(parse_nmea(BU353_GGA, NmeaPins(altitude_m="v10"), "truck", CTX, NOW), "bad_value", "v10")
    assert_rejected(parse_nmea(BU353_GGA, NmeaPins(location="v20"), "truck", CTX, NOW), "unknown_pin", "v20")
    assert_rejected(parse_nmea(BU353_GGA, NmeaPins(location="x"), "truck", CTX, NOW), "unknown_key")
    assert_rejected(parse_nmea(BU353_GGA, NMEA, "nobody", CTX, NOW), "unknown_device")
    # quantities adapt to numeric and string pins
    pins = NmeaPins(altitude_m="v13", satellites="v14")
    assert_reading(parse_nmea(BU353_GGA, pins, "truck", CTX, NOW), Reading("truck", ((13, 60), (14, "8"))))


def test_nmea_no_configured_pin_for_the_sentence() -> None:
    assert parse_nmea(BU353_GGA, NmeaPins(speed_kmh="v11"), "truck", CTX, NOW) == Ignored("no_values")


def test_nmea_through_line_parser(tmp_path: Path) -> None:
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
    gps, logger, mcu = (LineParser.for_port(config, port) for port in config.ports)
    assert gps.ctx.max_future_ms == round(config.cloud.limits.max_future_days * MS_PER_DAY)
    assert_reading(
        gps.parse(BU353_RMC.encode() + b"\r\n", NOW), Reading("truck", ((10, NZ), (11, 0.69 * KNOTS_TO_KMH)))
    )
    assert gps.parse(BU353_GSV.encode(), NOW) == Ignored("sentence")
    assert logger.parse(b"v2,v1", NOW) == Ignored("header")
    assert_reading(logger.parse(b"3,4", NOW), Reading("pump", ((2, 3), (1, 4.0))))
    assert_reading(mcu.parse(b"v2=5 v1=6", NOW), Reading("pump", ((2, 5), (1, 6.0))))
    assert_rejected(mcu.parse(b"v10=1", NOW), "unknown_pin")


# ---------------------------------------------------------------- MCU clock


def test_clock_first_line_is_stamped_on_arrival() -> None:
    assert McuClock().to_wall(5_000, NOW) == NOW


def test_clock_replayed_lines_get_their_true_time() -> None:
    clock = McuClock()
    boot = NOW - 10_000_000
    for second in range(60):  # fresh lines, 3 ms on the wire
        mcu = 1_000_000 + second * 1000
        assert clock.to_wall(mcu, boot + mcu + 3) == boot + mcu + 3
    # the gateway missed 10 minutes; the MCU replays its buffer in one burst, then goes on
    gap_start = 1_060_000
    last_fresh = boot + gap_start - 1000 + 3
    arrival = boot + gap_start + 600_000
    for index in range(600):
        mcu = gap_start + index * 1000
        error = clock.to_wall(mcu, arrival + index) - (boot + mcu)
        aging = (arrival + index - last_fresh) * MCU_DRIFT_PPM // 1_000_000
        assert 0 <= error <= 3 + aging <= 3 + 602
    mcu = gap_start + 600_000
    assert clock.to_wall(mcu, boot + mcu + 2) == boot + mcu + 2


def test_clock_wrap_around() -> None:
    clock = McuClock()
    boot = NOW - MCU_COUNTER_SPAN
    last = MCU_COUNTER_SPAN - 500
    assert clock.to_wall(last, boot + last) == boot + last
    # 1000 ms later the 32-bit counter reads 500; this line arrived 40 ms late
    late = clock.to_wall(500, boot + MCU_COUNTER_SPAN + 500 + 40) - (boot + MCU_COUNTER_SPAN + 500)
    assert 0 <= late <= 1  # the anchor aged 1 ms in that second
    # a fresh line anchors the new epoch; a replayed one still maps onto it
    assert clock.to_wall(600, boot + MCU_COUNTER_SPAN + 600) == boot + MCU_COUNTER_SPAN + 600
    assert clock.to_wall(700, boot + MCU_COUNTER_SPAN + 60_000) - (boot + MCU_COUNTER_SPAN + 700) <= 60


def test_clock_reboot_reanchors() -> None:
    clock = McuClock()
    clock.to_wall(50_000, NOW)
    clock.to_wall(51_000, NOW + 1_000)
    # the MCU rebooted two minutes later: millis() starts again near 0
    assert clock.to_wall(800, NOW + 121_000) == NOW + 121_000
    assert clock.to_wall(1_800, NOW + 122_005) - (NOW + 122_000) <= 1
    assert clock.to_wall(2_800, NOW + 123_000) == NOW + 123_000


def test_clock_backwards_near_wrap_but_too_early_is_a_reboot() -> None:
    clock = McuClock()
    last = MCU_COUNTER_SPAN - 10_000
    clock.to_wall(last, NOW)
    # had it wrapped, 10 s + 60 s would have to have passed; only 20 s did: the MCU rebooted
    assert clock.to_wall(60_000, NOW + 20_000) == NOW + 20_000


def test_clock_follows_a_slow_crystal() -> None:
    clock = McuClock()
    boot = NOW - 30 * MS_PER_DAY
    ratio = 1 - 500e-6  # the MCU's millis() runs 0.05 % slow
    worst = 0
    for minute in range(10 * 24 * 60):
        true = boot + minute * 60_000
        mcu = round(minute * 60_000 * ratio) % MCU_COUNTER_SPAN
        worst = max(worst, abs(clock.to_wall(mcu, true + 2) - true))
    assert worst <= 100


def test_clock_reset() -> None:
    clock = McuClock()
    clock.to_wall(1_000, NOW)
    clock.reset()
    assert clock.to_wall(1_000, NOW + 50_000) == NOW + 50_000


@FAST
@given(st.lists(st.tuples(st.integers(0, 2 * MCU_COUNTER_SPAN), st.integers(-(10**7), 10**7)), min_size=1, max_size=40))
def test_clock_is_never_ahead_of_arrival(lines: list[tuple[int, int]]) -> None:
    clock = McuClock()
    received = NOW
    for mcu, step in lines:
        received += step
        assert clock.to_wall(mcu, received) <= received + MCU_MAX_AHEAD_MS


@FAST
@given(
    st.integers(MIN_TS_MS, NOW),
    st.integers(0, MCU_COUNTER_SPAN - 1),
    st.lists(st.tuples(st.integers(1, 10**7), st.integers(0, 5_000)), min_size=1, max_size=60),
)
def test_clock_one_boot_with_wraps(boot: int, uptime: int, steps: list[tuple[int, int]]) -> None:
    clock = McuClock()
    true = boot + uptime
    for gap, delay in steps:
        true += gap
        wall = clock.to_wall((true - boot) % MCU_COUNTER_SPAN, true + delay)
        assert true <= wall <= true + delay


boot_segments = st.lists(
    st.tuples(
        st.integers(0, 10**9),  # off time before this boot
        st.integers(0, 1_000),  # uptime of its first line
        st.lists(st.tuples(st.integers(1_001, 10**7), st.integers(0, 5_000)), min_size=1, max_size=15),
    ),
    min_size=1,
    max_size=6,
)


@FAST
@given(st.integers(MIN_TS_MS, NOW), boot_segments)
def test_clock_reboots(start: int, segments: list[tuple[int, int, list[tuple[int, int]]]]) -> None:
    clock = McuClock()
    true = start
    for off, first_uptime, steps in segments:
        boot = true + off
        uptime = first_uptime
        for gap, delay in [(0, 0), *steps]:
            uptime += gap
            true = boot + uptime
            wall = clock.to_wall(uptime, true + delay)
            assert true <= wall <= true + delay


# ---------------------------------------------------------------- real receiver logs (tests/data)

DATA = Path(__file__).parent / "data"
LOG_PINS = NmeaPins(location="v10", altitude_m="v11", speed_kmh="v13", satellites="v12")
GPS = {10: PinType.LOCATION, 11: PinType.DOUBLE, 12: PinType.INTEGER, 13: PinType.DOUBLE}
CTX_GPS = ParseContext({"truck": GPS}, "truck", FUTURE_MS)


def naive_fixes(lines: list[str]) -> int:
    """Count GGA/RMC sentences with a fix, the simplest possible way (an independent check)."""
    fixes = 0
    for line in lines:
        fields = line.split("*")[0].split(",")
        kind = fields[0][3:]
        gga_fix = kind == "GGA" and fields[6] not in ("", "0") and bool(fields[2])
        rmc_fix = kind == "RMC" and fields[2] == "A" and bool(fields[3])
        fixes += gga_fix or rmc_fix
    return fixes


@pytest.mark.parametrize(
    ("name", "fixes", "no_fix", "other", "box"),
    [
        # box: (lon_min, lon_max, lat_min, lat_max) from the place each log names or was taken at
        ("gpsd-bu353s4.log", 50, 0, 40, (175.2, 175.4, -37.9, -37.7)),  # Hamilton, NZ
        ("gpsd-bu353-glonass.log", 17, 20, 75, (37.5, 37.7, 55.6, 55.8)),  # Moscow, GN talker
        ("gpsd-bt451.log", 26, 8, 110, (23.5, 23.7, 55.7, 55.9)),  # Lithuania, starts indoors
        ("gpsd-gpslim236.log", 40, 0, 36, (2.2, 2.4, 48.8, 49.0)),  # near Paris
    ],
)
def test_nmea_real_receiver_logs(
    name: str, fixes: int, no_fix: int, other: int, box: tuple[float, float, float, float]
) -> None:
    raw_lines = [raw for raw in (DATA / name).read_bytes().splitlines() if raw.strip() and not raw.startswith(b"#")]
    parser = LineParser("nmea", CTX_GPS, nmea=LOG_PINS)
    results = [parser.parse(raw, NOW) for raw in raw_lines]
    readings = [r for r in results if isinstance(r, Reading)]
    ignored = [r.reason for r in results if isinstance(r, Ignored)]
    assert not [r for r in results if isinstance(r, Rejected)]
    assert len(readings) == fixes == naive_fixes([raw.decode() for raw in raw_lines])
    assert ignored.count("no_fix") == no_fix and ignored.count("sentence") == other
    for reading in readings:
        values = dict(reading.values)
        location = values[10]
        assert isinstance(location, tuple)
        lon, lat = location
        assert box[0] <= lon <= box[1] and box[2] <= lat <= box[3]
        assert all(isinstance(values[pin], float) for pin in (11, 13) if pin in values)
        assert isinstance(values.get(12, 0), int)


def test_nmea_real_log_with_corrupted_sentences() -> None:
    lines = [raw.decode() for raw in (DATA / "gpsd-bu353s4.log").read_bytes().splitlines() if raw.startswith(b"$")]
    corrupted = [line.replace("3747", "3748", 1) if "GGA" in line else line for line in lines]
    results = [parse_nmea(line, LOG_PINS, "truck", CTX_GPS, NOW) for line in corrupted]
    bad = [r.reason for r in results if isinstance(r, Rejected)]
    assert bad == ["checksum"] * 25
    assert sum(isinstance(r, Reading) for r in results) == 25  # the RMC fixes


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


def test_an_unterminated_quote_is_rejected_at_once_however_long_the_line() -> None:
    # The quoted-value pattern once backtracked exponentially here: one such line hung the daemon's loop.
    for text in ('v3="' + "ab " * 1300, 'v3="' + "a\\" * 2000):
        result = parse_kv(text, CTX, NOW)
        assert isinstance(result, Rejected) and result.reason == "syntax"
    quoted = parse_kv('v3="door \\"A\\" open" v1=1', CTX, NOW)
    assert isinstance(quoted, Reading) and dict(quoted.values)[3] == 'door "A" open'
