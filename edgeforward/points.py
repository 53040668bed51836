"""Points, pin types, the key names of a line, and the wire forms of their values."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote

PIN_COUNT = 256
STRING_MAX_BYTES = 1024
META_KEYS = ("ts", "ms", "dev", "seq")  # the keys of a line besides its pins

Location = tuple[float, float]
Value = bool | int | float | str | Location


class PinType(enum.StrEnum):
    """Datastream data types a virtual pin can carry."""

    INTEGER = "integer"
    DOUBLE = "double"
    STRING = "string"
    BOOLEAN = "boolean"
    ENUM = "enum"
    LOCATION = "location"


PIN_TYPE_NAMES = "|".join(t.value for t in PinType)


@dataclass(frozen=True, slots=True)
class Point:
    """One timestamped value of one virtual pin of one device."""

    device: str
    pin: int
    ts_ms: int
    value: Value


def pin_name(pin: int) -> str:
    """Return the API name of a virtual pin number, e.g. 7 -> "v7"."""
    return f"v{pin}"


def parse_pin_name(name: str) -> int | None:
    """Return the pin number of "v0".."v255" (any case), or None."""
    if len(name) < 2 or name[0] not in "vV" or not name[1:].isdigit() or not name[1:].isascii():
        return None
    if len(name) > 2 and name[1] == "0":
        return None
    number = int(name[1:])
    return number if number < PIN_COUNT else None


class KeyProblem(NamedTuple):
    """Why a set of line keys (csv columns) is unusable: `reason` is a bad-line reason, `detail` for humans."""

    reason: str
    detail: str


def line_columns(names: Sequence[str]) -> tuple[str, ...] | KeyProblem:
    """Normalize csv column names to line keys ("v7", "ts", ...), or say what is wrong with them.

    The one rule for columns, whether a port's `columns` (checked by the config) or a header line (the csv parser).
    """
    columns: list[str] = []
    for raw in names:
        name = raw.strip().lstrip("\ufeff").strip().lower()
        if name not in META_KEYS and parse_pin_name(name) is None:
            return KeyProblem("unknown_key", f"column {raw[:80]!r} is not v0..v255, ts, ms, dev or seq")
        if name in columns:
            return KeyProblem("duplicate_key", f"column {name} is given twice")
        columns.append(name)
    if all(name in META_KEYS for name in columns):
        return KeyProblem("no_values", "no pin column (v0..v255)")
    return tuple(columns)


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_isfinite = math.isfinite


def value_json(value: Value) -> str:
    """Encode a value as the typed JSON the history POST body carries: compact, as json.dumps writes it.

    Called for every point stored, so a scalar skips the encoder (about 10x slower for a number): each branch writes
    what json.dumps(value, separators=(",", ":"), ensure_ascii=False) does. The one difference: a NaN or infinity,
    which the parsers never let through, is written null, as it always was, not as json's invalid NaN.
    """
    kind = type(value)
    if kind is float:
        return float.__repr__(value) if _isfinite(value) else "null"  # type: ignore[arg-type]
    if kind is int:
        return int.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    if isinstance(value, tuple):
        return f"[{value_json(value[0])},{value_json(value[1])}]"
    return _encode(value)


def value_from_json(text: str) -> Value:
    """Decode a value stored by value_json."""
    decoded = json.loads(text)
    if isinstance(decoded, list):
        return (float(decoded[0]), float(decoded[1]))
    if isinstance(decoded, bool | int | float | str):
        return decoded
    raise ValueError(f"not a pin value: {text!r}")


def query_values(value: Value) -> list[str]:
    """Return the query-string form of a value (two parts for a location)."""
    if isinstance(value, tuple):
        return [_number_text(value[0]), _number_text(value[1])]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, float):
        return [_number_text(value)]
    return [str(value)]


def encode_query_value(text: str) -> str:
    """Percent-encode one query value (everything but unreserved characters)."""
    return quote(text, safe="")


def _number_text(number: float) -> str:
    if math.isfinite(number) and number == int(number) and abs(number) < 1e15:
        return repr(float(number))
    return repr(number)
