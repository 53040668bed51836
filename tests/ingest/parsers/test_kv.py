"""The kv format: accepted and rejected lines, the documented order of checks, the round trip."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeforward.ingest.parsers import parse_line
from edgeforward.ingest.parsers.common import (
    INT64_MAX,
    INT64_MIN,
    MIN_TS_MS,
    ParseContext,
    Reading,
    Rejected,
)
from edgeforward.ingest.parsers.kv import format_kv, parse_kv
from edgeforward.points import META_KEYS, STRING_MAX_BYTES, PinType, parse_pin_name

from .cases import (
    CTX,
    DEVICES,
    FAST,
    FUTURE_MS,
    NO_DEFAULT,
    NOW,
    assert_reading,
    assert_rejected,
)

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


def test_an_unterminated_quote_is_rejected_at_once_however_long_the_line() -> None:
    # The quoted-value pattern once backtracked exponentially here: one such line hung the daemon's loop.
    for text in ('v3="' + "ab " * 1300, 'v3="' + "a\\" * 2000):
        result = parse_kv(text, CTX, NOW)
        assert isinstance(result, Rejected) and result.reason == "syntax"
    quoted = parse_kv('v3="door \\"A\\" open" v1=1', CTX, NOW)
    assert isinstance(quoted, Reading) and dict(quoted.values)[3] == 'door "A" open'
