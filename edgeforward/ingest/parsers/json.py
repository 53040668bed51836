"""The json format: one object per line with the kv keys."""

from __future__ import annotations

import json
import math
from typing import Any, Final

from ...points import Location, PinType
from .common import (
    INT64_MAX,
    INT64_MIN,
    BadValue,
    Decoder,
    Pairs,
    ParseContext,
    Reading,
    Rejected,
    assemble,
    location,
    show,
    string_value,
    text_name,
)


def _json_integer(value: Any) -> int:
    if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
        raise BadValue("bad_value", f"expected a 64-bit JSON integer, got {show(value)}")
    return value


def _json_number(value: Any) -> float | None:
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _json_double(value: Any) -> float:
    number = _json_number(value)
    if number is None:
        raise BadValue("bad_value", f"expected a finite JSON number, got {show(value)}")
    return number


def _json_string(value: Any) -> str:
    if not isinstance(value, str):
        raise BadValue("bad_value", f"expected a JSON string, got {show(value)}")
    return string_value(value)


def _json_boolean(value: Any) -> bool:
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return value == 1
    raise BadValue("bad_value", f"expected true, false, 0 or 1, got {show(value)}")


def _json_location(value: Any) -> Location:
    if isinstance(value, list) and len(value) == 2:
        lon, lat = _json_number(value[0]), _json_number(value[1])
        if lon is not None and lat is not None:
            return location(lon, lat, show(value))
    raise BadValue("bad_value", f"expected [lon, lat] (two finite numbers), got {show(value)}")


_JSON: Final = Decoder(
    pins={
        PinType.INTEGER: _json_integer,
        PinType.ENUM: _json_integer,
        PinType.DOUBLE: _json_double,
        PinType.STRING: _json_string,
        PinType.BOOLEAN: _json_boolean,
        PinType.LOCATION: _json_location,
    },
    integer=lambda value: value if type(value) is int else None,
    name=text_name,
)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(line: str, ctx: ParseContext, now_ms: int) -> Reading | Rejected:
    """Parse one line holding one JSON object."""
    try:
        document = json.loads(line, object_pairs_hook=Pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return Rejected("syntax", f"invalid JSON: {show(str(exc))}")
    if not isinstance(document, Pairs):
        return Rejected("syntax", f"expected a JSON object, got {show(document)}")
    return assemble(document, ctx, now_ms, _JSON)
