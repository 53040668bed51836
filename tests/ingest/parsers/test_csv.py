"""The csv format: configured columns, header lines."""

from __future__ import annotations

import pytest

from edgeforward.ingest.parsers import CsvParser, parse_line
from edgeforward.ingest.parsers.common import (
    Ignored,
    Reading,
)
from edgeforward.points import STRING_MAX_BYTES, KeyProblem, line_columns

from .cases import (
    CTX,
    NOW,
    assert_reading,
    assert_rejected,
)

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
    # the one rule for columns, also the config's (points.line_columns)
    assert line_columns(["ts", "temp"]) == KeyProblem(
        "unknown_key", "column 'temp' is not v0..v255, ts, ms, dev or seq"
    )
    assert line_columns([" TS", "\ufeffV1"]) == ("ts", "v1")
    assert line_columns(["ts", "dev"]) == KeyProblem("no_values", "no pin column (v0..v255)")
    assert line_columns(["v1", "V1"]) == KeyProblem("duplicate_key", "column v1 is given twice")
    assert isinstance(line_columns(["v1", "v01"]), KeyProblem)


def test_csv_through_parse_line() -> None:
    parser = CsvParser(None, header=True)
    assert parse_line(b"v1,v5\r\n", "csv", CTX, NOW, csv_parser=parser) == Ignored("header")
    assert_reading(
        parse_line(b"1,TRUE\r\n", "csv", CTX, NOW, csv_parser=parser), Reading("pump", ((1, 1.0), (5, True)))
    )
