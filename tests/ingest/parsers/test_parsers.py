"""parse_line across the formats, and no input makes any parser raise."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeforward.ingest.parsers import CsvParser, parse_line
from edgeforward.ingest.parsers.common import (
    Reading,
)
from edgeforward.ingest.parsers.json import parse_json
from edgeforward.ingest.parsers.kv import parse_kv
from edgeforward.ingest.parsers.nmea import parse_nmea
from edgeforward.points import Point

from .cases import (
    CTX,
    FAST,
    NMEA,
    NO_DEFAULT,
    NOW,
    assert_reading,
    assert_rejected,
    check_invariants,
    nmea,
)

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
