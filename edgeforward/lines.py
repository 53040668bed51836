"""Pure parsers of the serial line formats (kv, json, csv, nmea) and the MCU clock mapping."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .config import Config, NmeaPins, PortConfig
from .points import PIN_COUNT, STRING_MAX_BYTES, Location, PinType, Point, Value, parse_pin_name

MIN_TS_MS: Final = 1_577_836_800_000  # 2020-01-01T00:00:00Z; older is seconds, ts=0 or an MCU clock never set
MS_PER_DAY: Final = 86_400_000
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
INT64_MAX_DIGITS: Final = 19
DETAIL_MAX_CHARS: Final = 80
KNOTS_TO_KMH: Final = 1.852
NMEA_GGA_MIN_FIELDS: Final = 10
NMEA_RMC_MIN_FIELDS: Final = 8
NMEA_RMC_MODE_FIELD: Final = 12

MCU_COUNTER_SPAN: Final = 2**32  # Arduino millis() is an unsigned 32-bit counter
MCU_WRAP_WINDOW_MS: Final = MS_PER_DAY  # a wrap is only believed when both sides are this close to it
MCU_MAX_AHEAD_MS: Final = 1_000
MCU_DRIFT_PPM: Final = 1_000  # how fast the anchor may age: absorbs an MCU clock up to 0.1 % slow

FORMATS: Final = ("kv", "json", "csv", "nmea")
META_KEYS: Final = ("ts", "ms", "dev", "seq")
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
_PIN_KEYS: Final[Mapping[str, int]] = {f"v{pin}": pin for pin in range(PIN_COUNT)}
_META: Final = frozenset(META_KEYS)
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_NUMBER_RE: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# One character per step: "(?:[^"\\]+|\\.)*" backtracks exponentially on an unterminated quote (a hung loop).
_QUOTED_RE: Final = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_BARE_RE: Final = re.compile(r"\S*")
_UNESCAPE_RE: Final = re.compile(r'\\(["\\])')
_NMEA_COORD_RE: Final = re.compile(r"([0-9]*)([0-9]{2}(?:\.[0-9]*)?)")
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
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

    @classmethod
    def for_port(cls, config: Config, port: PortConfig) -> ParseContext:
        """Build the context of one configured port."""
        devices = {device.name: {pin: spec.type for pin, spec in device.pins.items()} for device in config.devices}
        return cls(devices, port.device, round(config.limits_of(port.device).max_future_days * MS_PER_DAY))


ParseResult = Reading | Rejected | Ignored


class _Bad(Exception):
    """Internal: a value failed its check; never leaves this module."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs in document order (duplicates kept)."""


def _show(value: object) -> str:
    """Render a value for a detail message, truncated to about DETAIL_MAX_CHARS."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _Pairs):
        return "an object"
    if isinstance(value, str | bytes):
        text = repr(value[:DETAIL_MAX_CHARS])
        return text + "..." if len(value) > DETAIL_MAX_CHARS else text
    if isinstance(value, list):
        if len(value) > 4 or not all(item is None or isinstance(item, int | float | str) for item in value):
            return f"an array of {len(value)} items"
        text = "[" + ", ".join(_show(item) for item in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= DETAIL_MAX_CHARS else text[: DETAIL_MAX_CHARS - 3] + "..."


# ---------------------------------------------------------------- typed values


def _int_or_none(text: str) -> int | None:
    """Return a signed 64-bit integer written as optional sign and decimal digits, else None."""
    if _INT_RE.fullmatch(text) is None or len(text.lstrip("+-").lstrip("0")) > INT64_MAX_DIGITS:
        return None
    number = int(text)
    return number if INT64_MIN <= number <= INT64_MAX else None


def _float_or_none(text: str) -> float | None:
    """Return a finite decimal number, else None (no nan, inf, hex or underscores)."""
    if _NUMBER_RE.fullmatch(text) is None:
        return None
    number = float(text)
    return number if math.isfinite(number) else None


def _location(lon: float, lat: float, shown: str) -> Location:
    if not -180.0 <= lon <= 180.0:
        raise _Bad("bad_value", f"longitude {lon} is outside -180..180 in {shown}")
    if not -90.0 <= lat <= 90.0:
        raise _Bad("bad_value", f"latitude {lat} is outside -90..90 in {shown}")
    return (lon, lat)


def _string(text: str) -> str:
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise _Bad("encoding", f"not valid Unicode (lone surrogate): {_show(text)}") from None
    if size > STRING_MAX_BYTES:
        raise _Bad("string_too_long", f"{size} bytes of UTF-8, at most {STRING_MAX_BYTES}")
    return text


def _text_integer(text: str) -> int:
    number = _int_or_none(text)
    if number is None:
        raise _Bad("bad_value", f"expected a 64-bit integer (sign and digits only), got {_show(text)}")
    return number


def _text_double(text: str) -> float:
    number = _float_or_none(text)
    if number is None:
        raise _Bad("bad_value", f"expected a finite decimal number, got {_show(text)}")
    return number


def _text_boolean(text: str) -> bool:
    flag = _BOOLEANS.get(text.lower())
    if flag is None:
        raise _Bad("bad_value", f"expected true, false, 1 or 0, got {_show(text)}")
    return flag


def _text_location(text: str) -> Location:
    lon_text, comma, lat_text = text.partition(",")
    lon = _float_or_none(lon_text)
    lat = _float_or_none(lat_text) if comma else None
    if lon is None or lat is None:
        raise _Bad("bad_value", f"expected LON,LAT (two finite numbers), got {_show(text)}")
    return _location(lon, lat, _show(text))


def _json_integer(value: Any) -> int:
    if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
        raise _Bad("bad_value", f"expected a 64-bit JSON integer, got {_show(value)}")
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
        raise _Bad("bad_value", f"expected a finite JSON number, got {_show(value)}")
    return number


def _json_string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("bad_value", f"expected a JSON string, got {_show(value)}")
    return _string(value)


def _json_boolean(value: Any) -> bool:
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return value == 1
    raise _Bad("bad_value", f"expected true, false, 0 or 1, got {_show(value)}")


def _json_location(value: Any) -> Location:
    if isinstance(value, list) and len(value) == 2:
        lon, lat = _json_number(value[0]), _json_number(value[1])
        if lon is not None and lat is not None:
            return _location(lon, lat, _show(value))
    raise _Bad("bad_value", f"expected [lon, lat] (two finite numbers), got {_show(value)}")


def _stripped(convert: Callable[[str], Value]) -> Callable[[str], Value]:
    return lambda text: convert(text.strip())


def _text_name(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class _Decoder:
    """How one format's raw values become typed values."""

    pins: Mapping[PinType, Callable[[Any], Value]]
    integer: Callable[[Any], int | None]  # ts, ms, seq
    name: Callable[[Any], str | None]  # dev


_TEXT: Final = _Decoder(
    pins={
        PinType.INTEGER: _text_integer,
        PinType.ENUM: _text_integer,
        PinType.DOUBLE: _text_double,
        PinType.STRING: _string,
        PinType.BOOLEAN: _text_boolean,
        PinType.LOCATION: _text_location,
    },
    integer=_int_or_none,
    name=_text_name,
)
# csv data loggers often pad with blanks: tolerate them around everything but strings.
_CSV: Final = _Decoder(
    pins={ptype: convert if ptype is PinType.STRING else _stripped(convert) for ptype, convert in _TEXT.pins.items()},
    integer=lambda text: _int_or_none(text.strip()),
    name=lambda text: text.strip(),
)
_JSON: Final = _Decoder(
    pins={
        PinType.INTEGER: _json_integer,
        PinType.ENUM: _json_integer,
        PinType.DOUBLE: _json_double,
        PinType.STRING: _json_string,
        PinType.BOOLEAN: _json_boolean,
        PinType.LOCATION: _json_location,
    },
    integer=lambda value: value if type(value) is int else None,
    name=_text_name,
)


# ---------------------------------------------------------------- common assembly


def _assemble(
    pairs: Iterable[tuple[str, Any]], ctx: ParseContext, now_ms: int, decoder: _Decoder
) -> Reading | Rejected:
    """Check keys, then line-level rules, then the device, then every pin value."""
    pin_raws: list[tuple[int, Any]] = []
    seen: set[int] = set()
    meta: dict[str, Any] = {}
    for key, raw in pairs:
        folded = key.lower()
        pin = _PIN_KEYS.get(folded)
        if pin is not None:
            if pin in seen:
                return Rejected("duplicate_key", f"pin v{pin} is given twice (again as {_show(key)})")
            seen.add(pin)
            pin_raws.append((pin, raw))
        elif folded in _META:
            if folded in meta:
                return Rejected("duplicate_key", f"{folded} is given twice (again as {_show(key)})")
            meta[folded] = raw
        else:
            return Rejected("unknown_key", f"unknown key {_show(key)} (expected v0..v255, ts, ms, dev or seq)")

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
                    return Rejected("bad_value", f"{name}: expected a non-negative integer, got {_show(meta[name])}")
                if name == "ms":
                    mcu_ms = number
                else:
                    seq = number
    if not pin_raws:
        return Rejected("no_values", "the line carries no pin value (v0..v255)")

    if "dev" in meta:
        device = decoder.name(meta["dev"])
        if device is None:
            return Rejected("bad_value", f"dev: expected a device name, got {_show(meta['dev'])}")
    elif ctx.default_device is not None:
        device = ctx.default_device
    else:
        return Rejected("no_device", "the line names no device (dev=) and the port has no default device")
    declared = ctx.devices.get(device)
    if declared is None:
        return Rejected("unknown_device", f"no device is named {_show(device)}")

    values: list[tuple[int, Value]] = []
    converters = decoder.pins
    for pin, raw in pin_raws:
        pin_type = declared.get(pin)
        if pin_type is None:
            return Rejected("unknown_pin", f"v{pin} is not declared for device {_show(device)}")
        try:
            values.append((pin, converters[pin_type](raw)))
        except _Bad as bad:
            return Rejected(bad.reason, f"v{pin} ({pin_type.value}): {bad.detail}")
    return Reading(device, tuple(values), ts_ms, mcu_ms, seq)


def _ts_problem(ts_ms: int | None, raw: Any, ctx: ParseContext, now_ms: int) -> str | None:
    if ts_ms is None:
        return f"ts: expected integer epoch milliseconds, got {_show(raw)}"
    if ts_ms < MIN_TS_MS:
        return f"ts: {ts_ms} is before 2020 (seconds instead of milliseconds, or an MCU clock never set?)"
    if ts_ms > now_ms + ctx.max_future_ms:
        return f"ts: {ts_ms} is more than {ctx.max_future_ms} ms ahead of the gateway clock ({now_ms})"
    return None


# ---------------------------------------------------------------- kv


def parse_kv(line: str, ctx: ParseContext, now_ms: int) -> Reading | Rejected:
    """Parse one `key=value ...` line."""
    if '"' in line:
        pairs = _quoted_pairs(line)
        if isinstance(pairs, Rejected):
            return pairs
        return _assemble(pairs, ctx, now_ms, _TEXT)
    plain: list[tuple[str, str]] = []
    for token in line.split():
        key, equals, value = token.partition("=")
        if not equals:
            return Rejected("syntax", f"expected key=value, got {_show(token)}")
        plain.append((key, value))
    return _assemble(plain, ctx, now_ms, _TEXT)


def _quoted_pairs(line: str) -> list[tuple[str, str]] | Rejected:
    """Tokenize a kv line that contains double quotes (the slow path)."""
    pairs: list[tuple[str, str]] = []
    size = len(line)
    pos = 0
    while True:
        while pos < size and line[pos].isspace():
            pos += 1
        if pos >= size:
            return pairs
        start = pos
        while pos < size and line[pos] != "=" and not line[pos].isspace():
            pos += 1
        key = line[start:pos]
        if pos >= size or line[pos] != "=":
            return Rejected("syntax", f"expected key=value, got {_show(key)}")
        if '"' in key:
            return Rejected("syntax", f"a quote in the key {_show(key)}")
        pos += 1
        if line.startswith('"', pos):
            quoted = _QUOTED_RE.match(line, pos)
            if quoted is None:
                return Rejected("syntax", f"unterminated quote in the value of {_show(key)}")
            value = _UNESCAPE_RE.sub(r"\1", quoted.group(1))
            pos = quoted.end()
            if pos < size and not line[pos].isspace():
                return Rejected("syntax", f"text right after the closing quote of {_show(key)}")
        else:
            bare = _BARE_RE.match(line, pos)
            end = bare.end() if bare is not None else pos
            value = line[pos:end]
            pos = end
            if '"' in value:
                return Rejected("syntax", f"a stray quote in the value of {_show(key)}: {_show(value)}")
        pairs.append((key, value))


def format_kv(reading: Reading, *, dev: bool = True) -> str:
    """Render a reading as a kv line that parse_kv reads back to the same reading."""
    parts = [f"v{pin}={_kv_value(value)}" for pin, value in reading.values]
    if reading.ts_ms is not None:
        parts.append(f"ts={reading.ts_ms}")
    if reading.mcu_ms is not None:
        parts.append(f"ms={reading.mcu_ms}")
    if reading.seq is not None:
        parts.append(f"seq={reading.seq}")
    if dev:
        parts.append(f"dev={_kv_text(reading.device)}")
    return " ".join(parts)


def _kv_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return f"{value[0]!r},{value[1]!r}"
    return _kv_text(value)


def _kv_text(text: str) -> str:
    if text and '"' not in text and not any(char.isspace() for char in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------- json


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(line: str, ctx: ParseContext, now_ms: int) -> Reading | Rejected:
    """Parse one line holding one JSON object."""
    try:
        document = json.loads(line, object_pairs_hook=_Pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return Rejected("syntax", f"invalid JSON: {_show(str(exc))}")
    if not isinstance(document, _Pairs):
        return Rejected("syntax", f"expected a JSON object, got {_show(document)}")
    return _assemble(document, ctx, now_ms, _JSON)


# ---------------------------------------------------------------- csv


def _csv_fields(line: str) -> list[str] | Rejected:
    if '"' not in line:
        return line.split(",")
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error as exc:
        return Rejected("syntax", f"csv: {exc}")
    if len(rows) != 1:
        return Rejected("syntax", "csv: expected one record on the line")
    return rows[0]


def _csv_columns(names: Sequence[str]) -> tuple[str, ...] | Rejected:
    """Normalize column names to kv keys ("v7", "ts", ...), or say what is wrong with them."""
    columns: list[str] = []
    for raw in names:
        name = raw.strip().lstrip("\ufeff").strip().lower()
        pin = _PIN_KEYS.get(name)
        if pin is None and name not in _META:
            return Rejected("unknown_key", f"column {_show(raw)} is not v0..v255, ts, ms, dev or seq")
        if name in columns:
            return Rejected("duplicate_key", f"column {name} is given twice")
        columns.append(name)
    if not any(name in _PIN_KEYS for name in columns):
        return Rejected("no_values", "no pin column (v0..v255)")
    return tuple(columns)


def csv_column_problems(columns: Sequence[str]) -> list[str]:
    """Return what is wrong with a port's `columns` (empty when valid), for config checks."""
    checked = _csv_columns(columns)
    return [checked.detail] if isinstance(checked, Rejected) else []


class CsvParser:
    """One csv port's state: its columns, from `columns` or from a header line.

    Any line whose fields are all distinct kv key names (with at least one pin) is a header:
    it is Ignored("header"), and with `header=True` and no `columns` it sets the columns
    (a microcontroller that reboots may print its header again). Configured `columns` win.
    """

    __slots__ = ("_columns", "_header", "_problem", "_seen_line")

    def __init__(self, columns: Sequence[str] | None, header: bool) -> None:
        self._header = header
        self._columns: tuple[str, ...] | None = None
        self._problem: Rejected | None = None
        self._seen_line = False
        if columns is not None:
            checked = _csv_columns(columns)
            if isinstance(checked, Rejected):
                self._problem = Rejected(checked.reason, f"port columns: {checked.detail}")
            else:
                self._columns = checked

    @property
    def columns(self) -> tuple[str, ...] | None:
        """The current columns as kv keys, or None while no header was seen."""
        return self._columns

    def parse(self, line: str, ctx: ParseContext, now_ms: int) -> Reading | Rejected | Ignored:
        """Parse one csv line (a header line or a record)."""
        fields = _csv_fields(line)
        if isinstance(fields, Rejected):
            return fields
        first = not self._seen_line
        self._seen_line = True
        header = _csv_columns(fields)
        if not isinstance(header, Rejected):
            if self._header and self._columns is None and self._problem is None:
                self._columns = header
            return Ignored("header")
        if self._problem is not None:
            return self._problem
        columns = self._columns
        if columns is None:
            if first:
                return Rejected(header.reason, f"header line: {header.detail}")
            return Rejected("no_header", "no valid header line has been seen on this port yet")
        if len(fields) != len(columns):
            return Rejected("syntax", f"csv: {len(fields)} fields, expected {len(columns)} ({','.join(columns)})")
        pairs = [(column, field) for column, field in zip(columns, fields, strict=True) if field != ""]
        return _assemble(pairs, ctx, now_ms, _CSV)


# ---------------------------------------------------------------- nmea

_NMEA_FIELDS: Final = ("location", "altitude_m", "speed_kmh", "satellites")


def parse_nmea(line: str, pins: NmeaPins, device: str, ctx: ParseContext, now_ms: int) -> Reading | Rejected | Ignored:
    """Parse one NMEA 0183 sentence: GGA and RMC with a fix become a reading stamped on receipt."""
    start = line.rfind("$")
    if start < 0:
        return Rejected("syntax", f"not an NMEA sentence: {_show(line)}")
    sentence = line[start:].rstrip()
    star = sentence.rfind("*")
    if star < 0:
        return Rejected("checksum", f"no checksum (*hh): {_show(sentence)}")
    body, given = sentence[1:star], sentence[star + 1 :]
    if len(given) != 2 or not _HEX_DIGITS.issuperset(given):
        return Rejected("checksum", f"malformed checksum {_show(given)}")
    if not body.isascii():
        return Rejected("syntax", f"non-ASCII text in {_show(sentence)}")
    computed = 0
    for byte in body.encode("ascii"):
        computed ^= byte
    if computed != int(given, 16):
        return Rejected("checksum", f"checksum {given.upper()} does not match {computed:02X}")

    fields = body.split(",")
    address = fields[0]
    proprietary = address.startswith("P")
    kind = address[2:] if len(address) == 5 and address.isalpha() and not proprietary else ""
    try:
        if kind == "GGA":
            fix = _nmea_gga(fields)
        elif kind == "RMC":
            fix = _nmea_rmc(fields)
        else:
            return Ignored("sentence")
        if isinstance(fix, Ignored):
            return fix
        declared = ctx.devices.get(device)
        if declared is None:
            return Rejected("unknown_device", f"no device is named {_show(device)}")
        values: list[tuple[int, Value]] = []
        for name in _NMEA_FIELDS:
            pin_name = getattr(pins, name)
            if pin_name is None or name not in fix:
                continue
            pin = parse_pin_name(pin_name)
            if pin is None:
                return Rejected("unknown_key", f"nmea.{name}: {_show(pin_name)} is not v0..v255")
            pin_type = declared.get(pin)
            if pin_type is None:
                return Rejected("unknown_pin", f"v{pin} (nmea {name}) is not declared for device {_show(device)}")
            values.append((pin, _nmea_value(name, fix[name], pin, pin_type)))
    except _Bad as bad:
        return Rejected(bad.reason, f"{address}: {bad.detail}")
    if not values:
        return Ignored("no_values")
    return Reading(device, tuple(values))


_Fix = dict[str, float | int | Location]


def _nmea_gga(fields: list[str]) -> _Fix | Ignored:
    if len(fields) < NMEA_GGA_MIN_FIELDS:
        raise _Bad("syntax", f"{len(fields)} fields, expected at least {NMEA_GGA_MIN_FIELDS}")
    quality = fields[6]
    if quality in ("", "0"):
        return Ignored("no_fix")
    if not quality.isdecimal():
        raise _Bad("bad_value", f"fix quality {_show(quality)}")
    location = _nmea_position(fields[2], fields[3], fields[4], fields[5])
    if location is None:
        return Ignored("no_fix")
    fix: _Fix = {"location": location}
    if fields[9]:
        fix["altitude_m"] = _nmea_number(fields[9], "altitude")
    if fields[7]:
        satellites = _int_or_none(fields[7])
        if satellites is None or satellites < 0:
            raise _Bad("bad_value", f"satellite count {_show(fields[7])}")
        fix["satellites"] = satellites
    return fix


def _nmea_rmc(fields: list[str]) -> _Fix | Ignored:
    if len(fields) < NMEA_RMC_MIN_FIELDS:
        raise _Bad("syntax", f"{len(fields)} fields, expected at least {NMEA_RMC_MIN_FIELDS}")
    # NMEA 2.3+ adds a mode indicator where N means "data not valid" even with status A.
    if fields[2] != "A" or (len(fields) > NMEA_RMC_MODE_FIELD and fields[NMEA_RMC_MODE_FIELD] == "N"):
        return Ignored("no_fix")
    location = _nmea_position(fields[3], fields[4], fields[5], fields[6])
    if location is None:
        return Ignored("no_fix")
    fix: _Fix = {"location": location}
    if fields[7]:
        fix["speed_kmh"] = _nmea_number(fields[7], "speed") * KNOTS_TO_KMH
    return fix


def _nmea_number(text: str, what: str) -> float:
    number = _float_or_none(text)
    if number is None:
        raise _Bad("bad_value", f"{what} {_show(text)} is not a number")
    return number


def _nmea_position(lat: str, north_south: str, lon: str, east_west: str) -> Location | None:
    if not lat or not lon:
        return None
    latitude = _nmea_degrees(lat, north_south, "NS", 90.0)
    longitude = _nmea_degrees(lon, east_west, "EW", 180.0)
    return (longitude, latitude)


def _nmea_degrees(text: str, hemisphere: str, letters: str, limit: float) -> float:
    """Convert (d)ddmm.mmmm and a hemisphere letter to signed decimal degrees."""
    match = _NMEA_COORD_RE.fullmatch(text)
    if match is None or hemisphere not in (letters[0], letters[1]):
        raise _Bad("bad_value", f"coordinate {_show(text)},{_show(hemisphere)}")
    degrees = int(match.group(1) or "0")
    minutes = float(match.group(2))
    value = degrees + minutes / 60.0
    if minutes >= 60.0 or value > limit:
        raise _Bad("bad_value", f"coordinate {_show(text)},{hemisphere} is out of range")
    return -value if hemisphere == letters[1] else value


def _nmea_value(name: str, value: float | int | Location, pin: int, pin_type: PinType) -> Value:
    """Fit a fix quantity to the declared type of the pin that receives it."""
    if isinstance(value, tuple) or pin_type is PinType.LOCATION:
        if isinstance(value, tuple) and pin_type is PinType.LOCATION:
            return value
    elif pin_type is PinType.DOUBLE:
        return float(value)
    elif pin_type in (PinType.INTEGER, PinType.ENUM):
        return round(value)
    elif pin_type is PinType.STRING:
        return str(value)
    raise _Bad("bad_value", f"nmea {name} cannot go to v{pin}, a {pin_type.value} pin")


# ---------------------------------------------------------------- lines


def parse_line(
    raw: bytes,
    fmt: str,
    ctx: ParseContext,
    now_ms: int,
    *,
    csv_parser: CsvParser | None = None,
    nmea_pins: NmeaPins | None = None,
) -> Reading | Rejected | Ignored | None:
    """Decode and parse one raw line; None for a blank line. Never raises.

    csv needs the port's CsvParser (its header state); nmea needs the port's pin table and
    uses ctx.default_device as the device.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("encoding", f"invalid UTF-8 at byte {exc.start}: {_show(raw)}")
    line = line.rstrip("\r\n")
    if not line or line.isspace():
        return None
    if fmt == "kv":
        return parse_kv(line, ctx, now_ms)
    if fmt == "json":
        return parse_json(line, ctx, now_ms)
    if fmt == "csv":
        if csv_parser is None:
            return Rejected("format", "the csv format needs the port's CsvParser")
        return csv_parser.parse(line, ctx, now_ms)
    if fmt == "nmea":
        if nmea_pins is None:
            return Rejected("format", "the nmea format needs the port's [port.nmea] pins")
        if ctx.default_device is None:
            return Rejected("no_device", "the nmea format needs the port's device")
        return parse_nmea(line, nmea_pins, ctx.default_device, ctx, now_ms)
    return Rejected("format", f"unknown line format {_show(fmt)} (expected one of {', '.join(FORMATS)})")


class LineParser:
    """One port's parser: its format, its context and its per-port state."""

    __slots__ = ("_csv", "_nmea", "ctx", "fmt")

    def __init__(
        self,
        fmt: str,
        ctx: ParseContext,
        *,
        columns: Sequence[str] | None = None,
        header: bool = False,
        nmea: NmeaPins | None = None,
    ) -> None:
        self.fmt = fmt
        self.ctx = ctx
        self._csv = CsvParser(columns, header) if fmt == "csv" else None
        self._nmea = nmea

    @classmethod
    def for_port(cls, config: Config, port: PortConfig) -> LineParser:
        """Build the parser of one configured port."""
        return cls(
            port.format,
            ParseContext.for_port(config, port),
            columns=port.columns,
            header=port.header,
            nmea=port.nmea,
        )

    def parse(self, raw: bytes, now_ms: int) -> Reading | Rejected | Ignored | None:
        """Parse one raw line (see parse_line)."""
        return parse_line(raw, self.fmt, self.ctx, now_ms, csv_parser=self._csv, nmea_pins=self._nmea)


# ---------------------------------------------------------------- MCU clock


class McuClock:
    """Maps a port's MCU millis() (ms=) to wall-clock epoch ms.

    The anchor is the MCU's boot time on the wall clock: the least `received_ms - mcu_ms`
    seen, because the line that arrived with the least delay tells it best (fresh lines
    have a small delay, lines the MCU replays from its buffer a large one). A line is
    mapped to anchor + mcu_ms, so it is never placed after its own arrival: a line that
    would be is the new anchor. The anchor ages by MCU_DRIFT_PPM of elapsed time, so that a
    slow MCU crystal is followed (a fast one is followed anyway, since it lowers the minimum).

    A backwards step of ms= is a 32-bit wrap when the previous value was within
    MCU_WRAP_WINDOW_MS of 2**32, the new one within it of 0, and the wrapped time is not
    after the arrival; otherwise it is a reboot, and the clock anchors afresh.

    Limits:
    - Lines replayed before any fresh line since the anchor was taken (gateway start,
      reboot, reset()) are placed too late, by up to the first line's delay.
    - Between fresh lines the anchor ages, so replayed lines may be placed up to
      MCU_DRIFT_PPM of the gap late (1 s per 1000 s without a fresh line).
    - ms= must not go backwards within one boot: resent older lines look like a reboot
      (send ts= for those). A reboot is only noticed when ms= goes backwards.
    - A step of the gateway's own clock (e.g. the first NTP sync of a board without RTC)
      is not noticed; call reset() when the wall clock jumps.
    - Counters wider than 32 bits work, but never wrap.
    """

    __slots__ = ("_anchor", "_anchor_at", "_epoch", "_last_mcu")

    def __init__(self) -> None:
        self._anchor: int | None = None  # boot time on the wall clock, in ms
        self._anchor_at = 0  # received_ms when the anchor was taken
        self._epoch = 0  # wraps seen since boot
        self._last_mcu = 0

    def reset(self) -> None:
        """Forget the anchor (the next line anchors afresh)."""
        self._anchor = None

    def to_wall(self, mcu_ms: int, received_ms: int) -> int:
        """Return the wall-clock epoch ms of a line stamped `mcu_ms` that arrived at `received_ms`."""
        anchor = self._anchor
        if anchor is None:
            return self._anchor_on(mcu_ms, received_ms)
        aging = max(0, received_ms - self._anchor_at) * MCU_DRIFT_PPM // 1_000_000
        epoch = self._epoch
        if mcu_ms < self._last_mcu:
            wrapped = (
                self._last_mcu >= MCU_COUNTER_SPAN - MCU_WRAP_WINDOW_MS
                and mcu_ms < MCU_WRAP_WINDOW_MS
                and anchor + (epoch + 1) * MCU_COUNTER_SPAN + mcu_ms <= received_ms + MCU_MAX_AHEAD_MS + aging
            )
            if not wrapped:
                return self._anchor_on(mcu_ms, received_ms)
            epoch += 1
            self._epoch = epoch
        self._last_mcu = mcu_ms
        counted = mcu_ms + epoch * MCU_COUNTER_SPAN
        aged = anchor + aging
        if received_ms - counted <= aged:
            self._anchor = received_ms - counted
            self._anchor_at = received_ms
            return received_ms
        return aged + counted

    def _anchor_on(self, mcu_ms: int, received_ms: int) -> int:
        self._anchor = received_ms - mcu_ms
        self._anchor_at = received_ms
        self._epoch = 0
        self._last_mcu = mcu_ms
        return received_ms
