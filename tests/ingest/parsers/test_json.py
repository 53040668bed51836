"""The json format."""

from __future__ import annotations

import pytest

from edgeforward.ingest.parsers.common import (
    INT64_MIN,
    Reading,
)
from edgeforward.ingest.parsers.json import parse_json
from edgeforward.points import STRING_MAX_BYTES

from .cases import (
    CTX,
    NOW,
    assert_reading,
    assert_rejected,
)

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
