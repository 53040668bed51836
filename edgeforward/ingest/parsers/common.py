"""What every line format shares: the parse outcomes, the context lines are checked against, typed values."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ...points import META_KEYS, PIN_COUNT, STRING_MAX_BYTES, Location, PinType, Point, Value

MIN_TS_MS: Final = 1_577_836_800_000  # 2020-01-01T00:00:00Z; older is seconds, ts=0 or an MCU clock never set
MS_PER_DAY: Final = 86_400_000
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
INT64_MAX_DIGITS: Final = 19
DETAIL_MAX_CHARS: Final = 80
FORMATS: Final = ("kv", "json", "csv", "nmea")
REJECT_REASONS: Final = (
    "syntax",
    "unknown_key",
    "unknown_pin",
    "unknown_device",
    "no_device",
    "duplicate_key",
    "bad_value",
    "bad_ts",
    "ts_and_ms",
    "no_values",
    "string_too_long",
    "encoding",
    "checksum",
    "no_header",
    "format",
)
IGNORE_REASONS: Final = ("header", "sentence", "no_fix", "no_values")

# Same accepted names as points.parse_pin_name once lower-cased, as one dict lookup on the hot path.
PIN_KEYS: Final[Mapping[str, int]] = {f"v{pin}": pin for pin in range(PIN_COUNT)}
META: Final = frozenset(META_KEYS)
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_NUMBER_RE: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOLEANS: Final[Mapping[str, bool]] = {"true": True, "false": False, "1": True, "0": False}


@dataclass(frozen=True, slots=True)
class Reading:
    """One accepted line."""

    device: str
    values: tuple[tuple[int, Value], ...]  # (pin number, typed value) in line order
    ts_ms: int | None = None  # from ts=, epoch ms
    mcu_ms: int | None = None  # from ms= (MCU millis since boot)
    seq: int | None = None  # from seq=

    def points(self, ts_ms: int) -> list[Point]:
        """Return the reading's values as points stamped `ts_ms`."""
        return [Point(self.device, pin, ts_ms, value) for pin, value in self.values]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A bad line: `reason` is a short stable code (a counter label), `detail` is for humans."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A line that is fine but carries nothing to store (csv header, other NMEA sentence, no fix)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ParseContext:
    """What a port's lines are checked against."""

    devices: Mapping[str, Mapping[int, PinType]]  # device name -> declared pin -> type
    default_device: str | None  # the port's `device`
    max_future_ms: int  # ts more than this ahead of now_ms is "bad_ts"


ParseResult = Reading | Rejected | Ignored


class BadValue(Exception):
    """A value failed its check; never leaves the parsers (they turn it into a Rejected)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs in document order (duplicates kept)."""


def show(value: object) -> str:
    """Render a value for a detail message, truncated to about DETAIL_MAX_CHARS."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Pairs):
        return "an object"
    if isinstance(value, str | bytes):
        text = repr(value[:DETAIL_MAX_CHARS])
        return text + "..." if len(value) > DETAIL_MAX_CHARS else text
    if isinstance(value, list):
        if len(value) > 4 or not all(item is None or isinstance(item, int | float | str) for item in value):
            return f"an array of {len(value)} items"
        text = "[" + ", ".join(show(item) for item in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= DETAIL_MAX_CHARS else text[: DETAIL_MAX_CHARS - 3] + "..."


# ---------------------------------------------------------------- typed values


def int_or_none(text: str) -> int | None:
    """Return a signed 64-bit integer written as optional sign and decimal digits, else None."""
    if _INT_RE.fullmatch(text) is None or len(text.lstrip("+-").lstrip("0")) > INT64_MAX_DIGITS:
        return None
    number = int(text)
    return number if INT64_MIN <= number <= INT64_MAX else None


def float_or_none(text: str) -> float | None:
    """Return a finite decimal number, else None (no nan, inf, hex or underscores)."""
    if _NUMBER_RE.fullmatch(text) is None:
        return None
    number = float(text)
    return number if math.isfinite(number) else None


def location(lon: float, lat: float, shown: str) -> Location:
    if not -180.0 <= lon <= 180.0:
        raise BadValue("bad_value", f"longitude {lon} is outside -180..180 in {shown}")
    if not -90.0 <= lat <= 90.0:
        raise BadValue("bad_value", f"latitude {lat} is outside -90..90 in {shown}")
    return (lon, lat)


def string_value(text: str) -> str:
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadValue("encoding", f"not valid Unicode (lone surrogate): {show(text)}") from None
    if size > STRING_MAX_BYTES:
        raise BadValue("string_too_long", f"{size} bytes of UTF-8, at most {STRING_MAX_BYTES}")
    return text


def text_integer(text: str) -> int:
    number = int_or_none(text)
    if number is None:
        raise BadValue("bad_value", f"expected a 64-bit integer (sign and digits only), got {show(text)}")
    return number


def text_double(text: str) -> float:
    number = float_or_none(text)
    if number is None:
        raise BadValue("bad_value", f"expected a finite decimal number, got {show(text)}")
    return number


def text_boolean(text: str) -> bool:
    flag = _BOOLEANS.get(text.lower())
    if flag is None:
        raise BadValue("bad_value", f"expected true, false, 1 or 0, got {show(text)}")
    return flag


def text_location(text: str) -> Location:
    lon_text, comma, lat_text = text.partition(",")
    lon = float_or_none(lon_text)
    lat = float_or_none(lat_text) if comma else None
    if lon is None or lat is None:
        raise BadValue("bad_value", f"expected LON,LAT (two finite numbers), got {show(text)}")
    return location(lon, lat, show(text))


def stripped(convert: Callable[[str], Value]) -> Callable[[str], Value]:
    return lambda text: convert(text.strip())


def text_name(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Decoder:
    """How one format's raw values become typed values."""

    pins: Mapping[PinType, Callable[[Any], Value]]
    integer: Callable[[Any], int | None]  # ts, ms, seq
    name: Callable[[Any], str | None]  # dev


TEXT_DECODER: Final = Decoder(
    pins={
        PinType.INTEGER: text_integer,
        PinType.ENUM: text_integer,
        PinType.DOUBLE: text_double,
        PinType.STRING: string_value,
        PinType.BOOLEAN: text_boolean,
        PinType.LOCATION: text_location,
    },
    integer=int_or_none,
    name=text_name,
)

# ---------------------------------------------------------------- common assembly


def assemble(pairs: Iterable[tuple[str, Any]], ctx: ParseContext, now_ms: int, decoder: Decoder) -> Reading | Rejected:
    """Check keys, then line-level rules, then the device, then every pin value."""
    pin_raws: list[tuple[int, Any]] = []
    seen: set[int] = set()
    meta: dict[str, Any] = {}
    for key, raw in pairs:
        folded = key.lower()
        pin = PIN_KEYS.get(folded)
        if pin is not None:
            if pin in seen:
                return Rejected("duplicate_key", f"pin v{pin} is given twice (again as {show(key)})")
            seen.add(pin)
            pin_raws.append((pin, raw))
        elif folded in META:
            if folded in meta:
                return Rejected("duplicate_key", f"{folded} is given twice (again as {show(key)})")
            meta[folded] = raw
        else:
            return Rejected("unknown_key", f"unknown key {show(key)} (expected v0..v255, ts, ms, dev or seq)")

    ts_ms = mcu_ms = seq = None
    if meta:
        if "ts" in meta and "ms" in meta:
            return Rejected("ts_and_ms", "a line carries ts= or ms=, not both")
        if "ts" in meta:
            raw_ts = meta["ts"]
            ts_ms = decoder.integer(raw_ts)
            problem = _ts_problem(ts_ms, raw_ts, ctx, now_ms)
            if problem is not None:
                return Rejected("bad_ts", problem)
        for name in ("ms", "seq"):
            if name in meta:
                number = decoder.integer(meta[name])
                if number is None or number < 0:
                    return Rejected("bad_value", f"{name}: expected a non-negative integer, got {show(meta[name])}")
                if name == "ms":
                    mcu_ms = number
                else:
                    seq = number
    if not pin_raws:
        return Rejected("no_values", "the line carries no pin value (v0..v255)")

    if "dev" in meta:
        device = decoder.name(meta["dev"])
        if device is None:
            return Rejected("bad_value", f"dev: expected a device name, got {show(meta['dev'])}")
    elif ctx.default_device is not None:
        device = ctx.default_device
    else:
        return Rejected("no_device", "the line names no device (dev=) and the port has no default device")
    declared = ctx.devices.get(device)
    if declared is None:
        return Rejected("unknown_device", f"no device is named {show(device)}")

    values: list[tuple[int, Value]] = []
    converters = decoder.pins
    for pin, raw in pin_raws:
        pin_type = declared.get(pin)
        if pin_type is None:
            return Rejected("unknown_pin", f"v{pin} is not declared for device {show(device)}")
        try:
            values.append((pin, converters[pin_type](raw)))
        except BadValue as bad:
            return Rejected(bad.reason, f"v{pin} ({pin_type.value}): {bad.detail}")
    return Reading(device, tuple(values), ts_ms, mcu_ms, seq)


def _ts_problem(ts_ms: int | None, raw: Any, ctx: ParseContext, now_ms: int) -> str | None:
    if ts_ms is None:
        return f"ts: expected integer epoch milliseconds, got {show(raw)}"
    if ts_ms < MIN_TS_MS:
        return f"ts: {ts_ms} is before 2020 (seconds instead of milliseconds, or an MCU clock never set?)"
    if ts_ms > now_ms + ctx.max_future_ms:
        return f"ts: {ts_ms} is more than {ctx.max_future_ms} ms ahead of the gateway clock ({now_ms})"
    return None
