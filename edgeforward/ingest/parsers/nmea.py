"""The nmea format: NMEA 0183 GGA and RMC sentences with a fix become a reading stamped on receipt."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from ...points import Location, PinType, Value, parse_pin_name
from .common import BadValue, Ignored, ParseContext, Reading, Rejected, float_or_none, int_or_none, show

KNOTS_TO_KMH: Final = 1.852
NMEA_GGA_MIN_FIELDS: Final = 10
NMEA_RMC_MIN_FIELDS: Final = 8
NMEA_RMC_MODE_FIELD: Final = 12
_NMEA_COORD_RE: Final = re.compile(r"([0-9]*)([0-9]{2}(?:\.[0-9]*)?)")
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")

NMEA_FIELDS: Final = ("location", "altitude_m", "speed_kmh", "satellites")
NmeaPinMap = Mapping[str, str]
"""A port's [port.nmea] table: quantity (one of NMEA_FIELDS) -> pin name; quantities without a pin are left out."""


def parse_nmea(
    line: str, pins: NmeaPinMap, device: str, ctx: ParseContext, now_ms: int
) -> Reading | Rejected | Ignored:
    """Parse one NMEA 0183 sentence: GGA and RMC with a fix become a reading stamped on receipt."""
    start = line.rfind("$")
    if start < 0:
        return Rejected("syntax", f"not an NMEA sentence: {show(line)}")
    sentence = line[start:].rstrip()
    star = sentence.rfind("*")
    if star < 0:
        return Rejected("checksum", f"no checksum (*hh): {show(sentence)}")
    body, given = sentence[1:star], sentence[star + 1 :]
    if len(given) != 2 or not _HEX_DIGITS.issuperset(given):
        return Rejected("checksum", f"malformed checksum {show(given)}")
    if not body.isascii():
        return Rejected("syntax", f"non-ASCII text in {show(sentence)}")
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
            return Rejected("unknown_device", f"no device is named {show(device)}")
        values: list[tuple[int, Value]] = []
        for name in NMEA_FIELDS:
            pin_name = pins.get(name)
            if pin_name is None or name not in fix:
                continue
            pin = parse_pin_name(pin_name)
            if pin is None:
                return Rejected("unknown_key", f"nmea.{name}: {show(pin_name)} is not v0..v255")
            pin_type = declared.get(pin)
            if pin_type is None:
                return Rejected("unknown_pin", f"v{pin} (nmea {name}) is not declared for device {show(device)}")
            values.append((pin, _nmea_value(name, fix[name], pin, pin_type)))
    except BadValue as bad:
        return Rejected(bad.reason, f"{address}: {bad.detail}")
    if not values:
        return Ignored("no_values")
    return Reading(device, tuple(values))


_Fix = dict[str, float | int | Location]


def _nmea_gga(fields: list[str]) -> _Fix | Ignored:
    if len(fields) < NMEA_GGA_MIN_FIELDS:
        raise BadValue("syntax", f"{len(fields)} fields, expected at least {NMEA_GGA_MIN_FIELDS}")
    quality = fields[6]
    if quality in ("", "0"):
        return Ignored("no_fix")
    if not quality.isdecimal():
        raise BadValue("bad_value", f"fix quality {show(quality)}")
    location = _nmea_position(fields[2], fields[3], fields[4], fields[5])
    if location is None:
        return Ignored("no_fix")
    fix: _Fix = {"location": location}
    if fields[9]:
        fix["altitude_m"] = _nmea_number(fields[9], "altitude")
    if fields[7]:
        satellites = int_or_none(fields[7])
        if satellites is None or satellites < 0:
            raise BadValue("bad_value", f"satellite count {show(fields[7])}")
        fix["satellites"] = satellites
    return fix


def _nmea_rmc(fields: list[str]) -> _Fix | Ignored:
    if len(fields) < NMEA_RMC_MIN_FIELDS:
        raise BadValue("syntax", f"{len(fields)} fields, expected at least {NMEA_RMC_MIN_FIELDS}")
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
    number = float_or_none(text)
    if number is None:
        raise BadValue("bad_value", f"{what} {show(text)} is not a number")
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
        raise BadValue("bad_value", f"coordinate {show(text)},{show(hemisphere)}")
    degrees = int(match.group(1) or "0")
    minutes = float(match.group(2))
    value = degrees + minutes / 60.0
    if minutes >= 60.0 or value > limit:
        raise BadValue("bad_value", f"coordinate {show(text)},{hemisphere} is out of range")
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
    raise BadValue("bad_value", f"nmea {name} cannot go to v{pin}, a {pin_type.value} pin")
