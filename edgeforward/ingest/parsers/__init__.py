"""One parser per line format; parse_line decodes a raw line and hands it to the port's format."""

from __future__ import annotations

from .common import FORMATS, Ignored, ParseContext, Reading, Rejected, show
from .csv import CsvParser
from .json import parse_json
from .kv import parse_kv
from .nmea import NmeaPinMap, parse_nmea

__all__ = ["CsvParser", "NmeaPinMap", "parse_line"]


def parse_line(
    raw: bytes,
    fmt: str,
    ctx: ParseContext,
    now_ms: int,
    *,
    csv_parser: CsvParser | None = None,
    nmea_pins: NmeaPinMap | None = None,
) -> Reading | Rejected | Ignored | None:
    """Decode and parse one raw line; None for a blank line. Never raises.

    csv needs the port's CsvParser (its header state); nmea needs the port's pins (quantity -> pin) and
    uses ctx.default_device as the device.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("encoding", f"invalid UTF-8 at byte {exc.start}: {show(raw)}")
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
    return Rejected("format", f"unknown line format {show(fmt)} (expected one of {', '.join(FORMATS)})")
