"""`edgeforward ports` and `edgeforward init`: find the serial ports, learn what each prints, write a config.

Sniffing reads a port through the daemon's own SerialSource (framing, noise, reopen) and never writes to it.
The line format and the pin types are found by the daemon's own parsers: every format is tried on the lines
read, each pin starting at the narrowest type and widened whenever the parser refuses a value for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import grp
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from serial.tools import list_ports

from .config import ConfigError, load_config
from .ingest.parsers import CsvParser, NmeaPinMap, parse_line  # the ingest stage's parsers
from .ingest.parsers.common import Ignored, ParseContext, Reading, Rejected
from .ingest.source import SerialSource
from .points import PinType

BY_ID_DIR: Final = "/dev/serial/by-id"
DEFAULT_BAUD: Final = 115_200
SAMPLE_LINES: Final = 3
SAMPLE_CHARS: Final = 100
MAX_FUTURE_MS: Final = 30 * 86_400_000
# Each pin starts at the first type and is widened along this ladder when a value does not fit.
TYPE_LADDER: Final = (PinType.INTEGER, PinType.DOUBLE, PinType.BOOLEAN, PinType.LOCATION, PinType.STRING)
SNIFF_DEVICE: Final = "sniffed"  # stands for the port's device while sniffing
# nmea: each quantity on a pin of its own while sniffing (and in the config init writes).
NMEA_PINS: Final = {"location": 1, "altitude_m": 2, "speed_kmh": 3, "satellites": 4}
NMEA_TYPES: Final = {
    "location": PinType.LOCATION,
    "altitude_m": PinType.DOUBLE,
    "speed_kmh": PinType.DOUBLE,
    "satellites": PinType.INTEGER,
}
FORMAT_ORDER: Final = ("nmea", "json", "csv", "kv")


@dataclass(frozen=True, slots=True)
class PortInfo:
    """One serial port as the system knows it."""

    path: str  # as given, or the device node when listed
    device: str | None  # the device node it resolves to (None for a URL)
    by_id: tuple[str, ...] = ()
    usb: str | None = None  # "VID:PID manufacturer product (serial)"
    may_open: str = "yes"  # "yes", or why not


@dataclass
class _Pins(Mapping[int, PinType]):
    """The pin types of one device as learned so far: any pin is declared, at its current type."""

    types: dict[int, PinType] = field(default_factory=dict)
    last: int | None = None  # the pin the parser looked up last (the one a refused value belongs to)

    def __getitem__(self, pin: int) -> PinType:
        self.last = pin
        return self.types.setdefault(pin, TYPE_LADDER[0])

    def get(self, pin: int, default: Any = None) -> PinType:
        """Every pin is declared: the parser's lookup of a pin's type."""
        return self[pin]

    def __iter__(self) -> Iterator[int]:
        return iter(self.types)

    def __len__(self) -> int:
        return len(self.types)

    def widen(self, pin: int) -> bool:
        """Move a pin to the next wider type; False when it is already the widest."""
        index = TYPE_LADDER.index(self.types[pin])
        if index + 1 >= len(TYPE_LADDER):
            return False
        self.types[pin] = TYPE_LADDER[index + 1]
        return True


@dataclass
class _Devices(Mapping[str, _Pins]):
    """Every device name is known: lines naming one with dev= get pins of their own."""

    pins: dict[str, _Pins] = field(default_factory=dict)

    def __getitem__(self, name: str) -> _Pins:
        return self.pins.setdefault(name, _Pins())

    def get(self, name: str, default: Any = None) -> _Pins:
        """Every device is declared: the parser's lookup of a device."""
        return self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.pins)

    def __len__(self) -> int:
        return len(self.pins)


@dataclass
class Detection:
    """What one format made of a port's lines."""

    format: str
    readings: int = 0
    ignored: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    devices: dict[str, dict[int, PinType]] = field(default_factory=dict)
    nmea: list[str] = field(default_factory=list)  # quantities seen, in NMEA_PINS order

    @property
    def recognised(self) -> int:
        """Lines this format understood: readings, and the lines it knows to ignore (csv headers, other NMEA)."""
        known = {"nmea": ("sentence", "no_fix"), "csv": ("header",)}.get(self.format, ())
        return self.readings + sum(self.ignored[reason] for reason in known)


@dataclass
class Sniffed:
    """What a port printed while it was read."""

    path: str
    seconds: float
    lines: list[bytes]
    opened: bool
    error: str | None
    bad: dict[str, int]  # framing's own rejects (noise, overlong)
    detection: Detection | None

    @property
    def lines_per_second(self) -> float:
        """Lines framed per second of reading."""
        return len(self.lines) / self.seconds if self.seconds > 0 else 0.0


def detect(lines: Sequence[bytes], now_ms: int) -> Detection | None:
    """Return the format that understands most of the lines, with the pins and types it found; None if none does."""
    best: Detection | None = None
    for fmt in FORMAT_ORDER:
        result = _try_format(fmt, lines, now_ms)
        if result.readings and (best is None or result.recognised > best.recognised):
            best = result
    return best


def _try_format(fmt: str, lines: Sequence[bytes], now_ms: int) -> Detection:
    devices = _Devices()
    nmea_pins: NmeaPinMap | None = {name: f"v{pin}" for name, pin in NMEA_PINS.items()} if fmt == "nmea" else None
    if nmea_pins is not None:
        devices[SNIFF_DEVICE].types.update({NMEA_PINS[name]: kind for name, kind in NMEA_TYPES.items()})
    ctx = ParseContext(devices=devices, default_device=SNIFF_DEVICE, max_future_ms=MAX_FUTURE_MS)
    csv_parser = CsvParser(None, header=True) if fmt == "csv" else None
    detection = Detection(fmt)
    seen_pins: dict[str, set[int]] = {}
    for raw in lines:
        result = _parse_learning(raw, fmt, ctx, devices, now_ms, csv_parser=csv_parser, nmea_pins=nmea_pins)
        if isinstance(result, Reading):
            detection.readings += 1
            seen_pins.setdefault(result.device, set()).update(pin for pin, _ in result.values)
        elif isinstance(result, Ignored):
            detection.ignored[result.reason] += 1
        elif isinstance(result, Rejected):
            detection.rejected[result.reason] += 1
    detection.devices = {
        name: {pin: devices[name].types[pin] for pin in sorted(pins)} for name, pins in seen_pins.items()
    }
    if fmt == "nmea":
        seen = seen_pins.get(SNIFF_DEVICE, set())
        detection.nmea = [name for name, pin in NMEA_PINS.items() if pin in seen]
    return detection


def _parse_learning(
    raw: bytes,
    fmt: str,
    ctx: ParseContext,
    devices: _Devices,
    now_ms: int,
    *,
    csv_parser: CsvParser | None,
    nmea_pins: NmeaPinMap | None,
) -> Reading | Rejected | Ignored | None:
    """Parse one line; while the parser refuses a pin's value, widen that pin's type and parse it again."""
    while True:
        for pins in devices.pins.values():
            pins.last = None
        result = parse_line(raw, fmt, ctx, now_ms, csv_parser=csv_parser, nmea_pins=nmea_pins)
        if not isinstance(result, Rejected) or result.reason != "bad_value" or fmt == "nmea":
            return result
        # The value refused is the one of the pin looked up last (the parser converts each pin as it looks it up).
        culprit = next((pins for pins in devices.pins.values() if pins.last is not None), None)
        if culprit is None or culprit.last is None or not culprit.widen(culprit.last):
            return result


def port_info(path: str) -> PortInfo:
    """Describe one port path as the config accepts it: a device node, a link, a glob or a URL."""
    if "://" in path:
        return PortInfo(path=path, device=None, may_open="(a URL: opened when sniffed)")
    matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if len(matches) != 1 or not os.path.exists(matches[0]):
        found = "no device" if not matches or not os.path.exists(matches[0]) else f"{len(matches)} devices"
        return PortInfo(path=path, device=None, may_open=f"no: {found} found")
    node = os.path.realpath(matches[0])
    return _describe_node(path, node)


def list_serial_ports() -> list[PortInfo]:
    """Every serial port pyserial's list_ports finds (USB adapters, on-board UARTs), with its by-id names."""
    return [_describe_node(port.device, os.path.realpath(port.device)) for port in sorted(list_ports.comports())]


def _describe_node(path: str, node: str) -> PortInfo:
    usb = None
    for port in list_ports.comports():
        if os.path.realpath(port.device) == node and port.vid is not None:
            parts = [f"{port.vid:04x}:{port.pid or 0:04x}", port.manufacturer, port.product]
            usb = " ".join(part for part in parts if part) + (
                f" (serial {port.serial_number})" if port.serial_number else ""
            )
    by_id = tuple(link for link in sorted(glob.glob(f"{BY_ID_DIR}/*")) if os.path.realpath(link) == node)
    return PortInfo(path=path, device=node, by_id=by_id, usb=usb, may_open=_may_open(node))


def _may_open(node: str) -> str:
    if os.access(node, os.R_OK | os.W_OK):
        return "yes"
    try:
        group = grp.getgrgid(os.stat(node).st_gid).gr_name
    except (KeyError, OSError):
        return "no: permission denied"
    return (
        f"no: it belongs to group {group}; add yourself with `sudo usermod -aG {group} $USER` and log in again "
        "(the service joins it by itself)"
    )


async def sniff(path: str, seconds: float, baud: int = DEFAULT_BAUD) -> Sniffed:
    """Read a port for `seconds` without writing to it; detect what it prints."""
    lines: list[bytes] = []
    received: list[int] = []

    def on_line(raw: bytes, received_ms: int, first: bool) -> None:
        if not first:  # the first line may be the tail of one the device was already printing
            lines.append(raw)
            received.append(received_ms)

    source = SerialSource(path, baud, on_line)
    reader = asyncio.create_task(source.run(), name=f"sniff:{path}")
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(reader), seconds)
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    elapsed = min(seconds, time.monotonic() - started)
    now_ms = received[-1] if received else time.time_ns() // 1_000_000
    return Sniffed(
        path=path,
        seconds=elapsed,
        lines=lines,
        opened=source.open_attempts > 0 and source.stats.last_error is None,
        error=source.stats.last_error,
        bad=dict(source.stats.bad_reasons),
        detection=detect(lines, now_ms) if lines else None,
    )


def is_character_device(node: str) -> bool:
    """Return whether a path is a character device (a tty, a pty)."""
    with contextlib.suppress(OSError):
        return stat.S_ISCHR(os.stat(node).st_mode)
    return False


# ---------------------------------------------------------------- reports


def describe(info: PortInfo, sniffed: Sniffed | None) -> list[str]:
    """A port as plain lines, labels first, for any width."""
    rows: list[tuple[str, str]] = []
    if info.device is not None:
        kind = "" if is_character_device(info.device) else " (not a character device)"
        rows.append(("device", info.device + kind))
        rows.append(("by-id", ", ".join(info.by_id) or "-"))
        rows.append(("usb", info.usb or "-"))
    rows.append(("may open", info.may_open))
    if sniffed is not None:
        rows.extend(_sniff_rows(sniffed))
    out = [info.path]
    for label, value in rows:
        first, *rest = value.split("\n")
        out.append(f"  {label:<12}{first}")
        out.extend(f"  {'':<12}{line}" for line in rest)
    return out


def _sniff_rows(sniffed: Sniffed) -> list[tuple[str, str]]:
    rows = [("read", f"{len(sniffed.lines)} lines in {sniffed.seconds:.1f} s ({sniffed.lines_per_second:.1f} lines/s)")]
    if sniffed.error and not sniffed.lines:
        rows.append(("error", sniffed.error))
    detection = sniffed.detection
    if detection is None:
        hint = "no line was read" if not sniffed.lines else "no format understands these lines"
        rows.append(("format", f"unknown: {hint} (a wrong --baud gives noise; a device may print only on request)"))
    else:
        total = len(sniffed.lines)
        rows.append(("format", f"{detection.format} ({detection.recognised} of {total} lines understood)"))
        if detection.format == "nmea":
            quantities = ", ".join(detection.nmea) or "none (no fix yet)"
            rows.append(("fix", quantities))
        for name, pins in detection.devices.items():
            label = "pins" if name == SNIFF_DEVICE else f"dev={name}"
            rows.append((label, ", ".join(f"v{pin} {kind.value}" for pin, kind in pins.items())))
        refused = Counter(detection.rejected) + Counter(sniffed.bad)
        rows.append(("refused", ", ".join(f"{reason} {count}" for reason, count in sorted(refused.items())) or "-"))
    samples = [_sample(raw) for raw in sniffed.lines[:SAMPLE_LINES]]
    rows.append(("sample", "\n".join(samples) or "-"))
    return rows


def _sample(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 3] + "..."


def as_json(info: PortInfo, sniffed: Sniffed | None) -> dict[str, Any]:
    """A port as a JSON object (`ports --json`)."""
    document: dict[str, Any] = {
        "path": info.path,
        "device": info.device,
        "by_id": list(info.by_id),
        "usb": info.usb,
        "may_open": info.may_open,
    }
    if sniffed is not None:
        detection = sniffed.detection
        document["sniff"] = {
            "seconds": round(sniffed.seconds, 2),
            "lines": len(sniffed.lines),
            "lines_per_second": round(sniffed.lines_per_second, 2),
            "error": sniffed.error,
            "format": None if detection is None else detection.format,
            "devices": {}
            if detection is None
            else {
                name: {f"v{pin}": kind.value for pin, kind in pins.items()} for name, pins in detection.devices.items()
            },
            "nmea": [] if detection is None else detection.nmea,
            "refused": {} if detection is None else dict(Counter(detection.rejected) + Counter(sniffed.bad)),
            "sample": [_sample(raw) for raw in sniffed.lines[:SAMPLE_LINES]],
        }
    return document


async def _sniff_each(paths: Sequence[str], seconds: float, baud: int) -> list[Sniffed]:
    return [await sniff(path, seconds, baud) for path in paths]


def run_ports(paths: Sequence[str], sniff_s: float | None, baud: int, *, as_json_output: bool) -> int:
    """`edgeforward ports`: 0 when every port was found (and, with --sniff, printed lines of a known format)."""
    infos = [port_info(path) for path in paths] if paths else list_serial_ports()
    if not infos:
        print("no serial ports found (USB adapters show up when plugged in; give a path to look at one)")
        return 0
    readable = [info.path for info in infos if info.device is not None or "://" in info.path]
    sniffed: dict[str, Sniffed] = {}
    if sniff_s is not None:
        sniffed = dict(zip(readable, asyncio.run(_sniff_each(readable, sniff_s, baud)), strict=True))
    results = [(info, sniffed.get(info.path)) for info in infos]
    if as_json_output:
        print(json.dumps([as_json(info, found) for info, found in results], indent=2))
    else:
        print("\n\n".join("\n".join(describe(info, found)) for info, found in results))
    missing = any(info.device is None and "://" not in info.path for info in infos)
    unknown = sniff_s is not None and any(found is None or found.detection is None for _, found in results)
    return 1 if missing or unknown else 0


# ---------------------------------------------------------------- init


class InitError(Exception):
    """`init` cannot write a config (bad options, an existing file, a port that printed nothing usable)."""


@dataclass(frozen=True, slots=True)
class PortPlan:
    """One [[port]] of the config init writes, from what sniffing found."""

    path: str
    baud: int
    device: str
    sniffed: Sniffed


def render_config(plans: Sequence[PortPlan], buffer_path: str) -> str:
    """Return a commented config for the sniffed ports; the tokens are left to systemd credentials."""
    out = [
        "# edgeforward configuration written by `edgeforward init` from what the ports printed.",
        "# Check it:  edgeforward check-config --config THIS_FILE",
        "# Every key and its default: config/edgeforward.toml in the edgeforward repository.",
        "",
        "[cloud]",
        'server = "https://blynk.cloud"      # or your region, e.g. https://fra1.blynk.cloud',
        "",
        "[buffer]",
        f"path = {_toml(buffer_path)}  # the service's StateDirectory; a manual run needs a path it may write",
        "",
    ]
    devices: dict[str, dict[int, PinType]] = {}
    for plan in plans:
        detection = plan.sniffed.detection
        assert detection is not None
        out += [
            "[[port]]",
            f"path = {_toml(plan.path)}",
            f"baud = {plan.baud}",
            f"format = {_toml(detection.format)}",
            f"device = {_toml(plan.device)}              # the device of lines that carry no dev=",
        ]
        if detection.format == "csv":
            out.append("header = true                   # the columns are named by the header line the device prints")
        if detection.format == "nmea":
            out.append("[port.nmea]                     # the pin each quantity of a fix goes to")
            for name in detection.nmea:
                out.append(f'{name} = "v{NMEA_PINS[name]}"')
        out.append("")
        for name, pins in detection.devices.items():
            device = plan.device if name == SNIFF_DEVICE else name
            devices.setdefault(device, {}).update(pins)
    for name, pins in devices.items():
        out += [
            "[[device]]",
            f"name = {_toml(name)}",
            f"token_credential = {_toml(name)}",
            "# The Blynk device token is never in this file: the service reads it from a systemd credential,",
            f"# LoadCredential={name}:/etc/edgeforward/{name}.token (see the README, Install on a gateway).",
            '# For a manual run use token_env = "VAR" or token_file = "/path" instead (one of them only).',
            "[device.pins]                   # types as seen: integer | double | string | boolean | enum | location",
        ]
        out += [f"v{pin} = {_toml(kind.value)}" for pin, kind in sorted(pins.items())]
        out.append("")
    return "\n".join(out)


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def run_init(
    ports: Sequence[str],
    devices: Sequence[str],
    output: Path,
    *,
    seconds: float,
    baud: int,
    buffer_path: str,
    force: bool,
) -> int:
    """`edgeforward init`: sniff each port, write a config check-config accepts; 0 written, 1 not."""
    if output.exists() and not force:
        raise InitError(f"{output} exists (--force replaces it)")
    if len(devices) > len(ports):
        raise InitError("more --device names than --port paths")
    names = list(devices) + [
        "device" if len(ports) == 1 else f"device{index + 1}" for index in range(len(devices), len(ports))
    ]
    plans: list[PortPlan] = []
    for path, name, sniffed in zip(ports, names, asyncio.run(_sniff_each(ports, seconds, baud)), strict=True):
        print("\n".join(describe(port_info(path), sniffed)))
        plans.append(PortPlan(path, baud, name, sniffed))
    if any(plan.sniffed.detection is None for plan in plans):
        print(f"nothing written: a port printed no lines of a known format in {seconds:g} s")
        return 1
    text = render_config(plans, buffer_path)
    staged = output.with_name(f".{output.name}.init")
    staged.write_text(text, encoding="utf-8")
    try:
        load_config(staged, read_tokens=False)
    except ConfigError as exc:
        staged.unlink()
        print("nothing written: the config would be invalid:\n" + "\n".join(exc.problems))
        return 1
    staged.replace(output)
    print(f"\nwrote {output}: check it with  edgeforward check-config --config {output}")
    return 0
