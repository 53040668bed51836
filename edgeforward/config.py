"""TOML configuration decoded into frozen, typed, validated objects."""

from __future__ import annotations

import enum
import os
import tomllib
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import list_structure_factory, mapping_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn

from .errors import EdgeforwardError
from .points import PIN_TYPE_NAMES, KeyProblem, PinType, line_columns, parse_pin_name
from .redact import redact
from .servers import ServerError, server_origin

T = TypeVar("T")

CONFIG_ENV = "EDGEFORWARD_CONFIG"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
DEFAULT_SERVER = "https://blynk.cloud"
DEFAULT_BUFFER_PATH = "/var/lib/edgeforward/buffer.db"
# The longest group-commit window: a power cut may cost the readings of one window (they are not yet ACKed).
# Budgets, deliveries and state never wait it out (see store/writer.py), so history flows at any window.
COMMIT_INTERVAL_MAX_MS = 10_000


@dataclass(frozen=True, slots=True)
class Bounds:
    """The range of a config number (or the shortest a string may be): the one place a key's limits are written."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_length: int | None = None

    def problem(self, value: Any, kind: str) -> str | None:
        """Why `value` (already of `kind`: int, float or str) is out of range, or None."""
        if self.min_length is not None and len(value) < self.min_length:
            return f"expected {kind} of length >= {self.min_length}"
        shown: Callable[[float], str] = (lambda bound: repr(float(bound))) if kind == "float" else str
        # Written so that NaN fails every bound.
        if self.ge is not None and not value >= self.ge:
            return f"expected {kind} >= {shown(self.ge)}"
        if self.gt is not None and not value > self.gt:
            return f"expected {kind} > {shown(self.gt)}"
        if self.le is not None and not value <= self.le:
            return f"expected {kind} <= {shown(self.le)}"
        return None


PositiveInt = Annotated[int, Bounds(ge=1)]
NonNegativeInt = Annotated[int, Bounds(ge=0)]
PositiveFloat = Annotated[float, Bounds(gt=0)]
NonNegativeFloat = Annotated[float, Bounds(ge=0)]


class ConfigError(EdgeforwardError):
    """The configuration is invalid; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen(kw_only=True)
class Limits:
    """Plan limits of the Blynk device API (defaults: the free plan)."""

    points_per_day: NonNegativeInt = 10_000
    messages_per_month: NonNegativeInt = 100_000
    batch_max_points: PositiveInt = 10_000
    max_request_bytes: Annotated[int, Bounds(ge=1024)] = 2_000_000
    requests_per_second: PositiveFloat = 50.0
    max_age_days: PositiveFloat = 30.0
    max_future_days: PositiveFloat = 30.0


@attrs.frozen(kw_only=True)
class CloudConfig:
    """Where the cloud is and how long to wait for it."""

    server: str = DEFAULT_SERVER
    ca_file: str | None = None
    timeout_s: PositiveFloat = 30.0
    limits: Limits = attrs.field(factory=Limits)


@attrs.frozen(kw_only=True)
class BufferConfig:
    """The SQLite buffer file and its cap."""

    path: str = DEFAULT_BUFFER_PATH
    max_points: PositiveInt = 10_000_000
    max_bytes: NonNegativeInt = 0  # cap on the database file in bytes; 0 = none
    full_policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    synchronous: Literal["FULL", "NORMAL", "full", "normal"] = "FULL"
    commit_interval_ms: Annotated[float, Bounds(ge=0, le=COMMIT_INTERVAL_MAX_MS)] = 5.0


@attrs.frozen(kw_only=True)
class ForwardConfig:
    """How often each path to the cloud runs."""

    live_interval_s: NonNegativeFloat = 10.0
    history_interval_s: PositiveFloat = 60.0
    retry_initial_s: PositiveFloat = 1.0
    retry_max_s: PositiveFloat = 60.0
    park_recheck_s: PositiveFloat = 300.0
    live_share: Annotated[float, Bounds(ge=0, le=1)] = 0.5
    over_quota: Literal["defer", "downsample"] = "defer"


@attrs.frozen(kw_only=True)
class NmeaPins:
    """Pins that NMEA fixes are written to."""

    location: str | None = None
    altitude_m: str | None = None
    speed_kmh: str | None = None
    satellites: str | None = None


@attrs.frozen(kw_only=True)
class PortConfig:
    """One serial port (a device path or a pyserial URL)."""

    path: str
    baud: PositiveInt = 115_200
    format: Literal["kv", "json", "csv", "nmea"] = "kv"
    device: str | None = None
    ack: bool = False
    max_line_bytes: Annotated[int, Bounds(ge=16, le=1_048_576)] = 4096
    columns: list[str] | None = None
    header: bool = False
    nmea: NmeaPins | None = None
    newline: Literal["lf", "crlf", "cr", "any"] = "lf"
    reset_on_open: bool = True  # false: closing leaves DTR/RTS as they are, so an Uno, Nano or Mega is not reset


@attrs.frozen(kw_only=True)
class PinSpec:
    """Type and range of one virtual pin."""

    type: PinType
    min: float | None = None
    max: float | None = None
    priority: PositiveFloat = 1.0
    deadband: NonNegativeFloat | None = None  # live: a change this small does not earn a live update


@attrs.frozen(kw_only=True)
class _DeviceTable:
    name: Annotated[str, Bounds(min_length=1)]
    token: str | None = None
    token_file: str | None = None
    token_env: str | None = None
    token_credential: str | None = None
    pins: dict[str, Any] = attrs.field(factory=dict)
    limits: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class MetricsConfig:
    """Prometheus metrics and health endpoint (off unless `listen` is set)."""

    listen: str | None = None
    stale_after_s: PositiveFloat = 900.0


@attrs.frozen(kw_only=True)
class ClockConfig:
    """When the wall clock is trusted for stamping readings (see clock.py for the "auto" rule)."""

    require_sync: Literal["auto"] | bool = "auto"
    previous_boots: Literal["hold", "stamp"] = "hold"


@attrs.frozen(kw_only=True)
class LogConfig:
    """Logging level and rendering."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True, slots=True)
class Device:
    """A Blynk device: its name, resolved token and declared pins."""

    name: str
    token: str = field(repr=False)  # "" when the config was loaded without reading tokens (see load_config)
    pins: Mapping[int, PinSpec]
    limits: Limits | None = None  # [device.limits]: this device's plan, when it differs from [cloud.limits]


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    path: Path
    cloud: CloudConfig
    buffer: BufferConfig
    forward: ForwardConfig
    ports: tuple[PortConfig, ...]
    devices: tuple[Device, ...]
    metrics: MetricsConfig
    log: LogConfig
    clock: ClockConfig = field(default_factory=ClockConfig)

    def device(self, name: str) -> Device | None:
        """Return the device called `name`, if configured."""
        for device in self.devices:
            if device.name == name:
                return device
        return None

    def limits_of(self, name: str | None) -> Limits:
        """Return the plan limits of a device: its own [device.limits] over [cloud.limits] (None: the cloud's)."""
        return resolve_limits(self.cloud, None if name is None else self.device(name))

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every device token that was read (for log redaction)."""
        return tuple(device.token for device in self.devices if device.token)


def resolve_limits(cloud: CloudConfig, device: Device | None) -> Limits:
    """The one resolver of a device's plan: its own [device.limits] (merged over [cloud.limits]), else the cloud's."""
    if device is not None and device.limits is not None:
        return device.limits
    return cloud.limits


_TOP_LEVEL = {
    "cloud": CloudConfig,
    "buffer": BufferConfig,
    "forward": ForwardConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
    "clock": ClockConfig,
}


def config_path(cli_value: str | None) -> Path:
    """Return the config path from the command line or EDGEFORWARD_CONFIG."""
    value = cli_value or os.environ.get(CONFIG_ENV)
    if not value:
        raise ConfigError([f"config: no --config given and {CONFIG_ENV} is not set"])
    return Path(value)


def load_config(path: Path, *, read_tokens: bool = True) -> Config:
    """Read, decode and validate a config file; raise ConfigError listing every problem.

    With read_tokens=False, token_file, token_env and token_credential are checked for form only, never read,
    and those devices' tokens are "": for commands that never talk to the cloud (status, deadletter, import,
    check-config offline), which then run outside the service, where its credentials do not exist.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"config: cannot read {path}: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config: {path} is not UTF-8: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config: {path} is not valid TOML: {exc}"]) from exc
    return parse_config(raw, path, read_tokens=read_tokens)


def parse_config(raw: dict[str, Any], path: Path, *, read_tokens: bool = True) -> Config:
    """Validate an already-parsed TOML document."""
    problems: list[str] = []
    base = path.resolve().parent
    for key in raw:
        if key not in _TOP_LEVEL and key not in ("port", "device"):
            problems.append(f"{key}: unknown key")

    tables: dict[str, Any] = {}
    for key, table_type in _TOP_LEVEL.items():
        tables[key] = _convert(raw.get(key, {}), table_type, key, problems) or table_type()
    cloud: CloudConfig = tables["cloud"]
    buffer: BufferConfig = tables["buffer"]
    _check_server(cloud.server, problems)
    if cloud.ca_file is not None:
        ca_path = _resolve(base, cloud.ca_file)
        if not ca_path.is_file():
            problems.append(f"cloud.ca_file: no such file {ca_path}")
        cloud = attrs.evolve(cloud, ca_file=str(ca_path))
    synchronous: Literal["FULL", "NORMAL"] = "NORMAL" if buffer.synchronous.upper() == "NORMAL" else "FULL"
    buffer = attrs.evolve(buffer, path=str(_resolve(base, buffer.path)), synchronous=synchronous)
    metrics: MetricsConfig = tables["metrics"]
    if metrics.listen is not None and _split_listen(metrics.listen) is None:
        problems.append(f'metrics.listen: expected "HOST:PORT", got "{metrics.listen}"')

    cloud_raw = raw.get("cloud", {})
    limits_raw = cloud_raw.get("limits", {}) if isinstance(cloud_raw, dict) else {}
    devices = _parse_devices(_array(raw, "device", problems), base, problems, limits_raw, read_tokens)
    ports = _parse_ports(_array(raw, "port", problems), devices, problems)
    if problems:
        raise ConfigError(problems)
    return Config(
        path=path,
        cloud=cloud,
        buffer=buffer,
        forward=tables["forward"],
        ports=ports,
        devices=devices,
        metrics=metrics,
        log=tables["log"],
        clock=tables["clock"],
    )


def _array(raw: dict[str, Any], key: str, problems: list[str]) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        problems.append(f"{key}: expected an array of tables ([[{key}]]), got {_kind(value)}")
        return []
    return value


def _parse_devices(
    items: list[Any], base: Path, problems: list[str], cloud_limits: Any, read_tokens: bool
) -> tuple[Device, ...]:
    devices: list[Device] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        where = f"device[{index}]"
        table = _convert(item, _DeviceTable, where, problems)
        if table is None:
            continue
        if table.name in seen:
            problems.append(f'{where}.name: device "{table.name}" is defined twice')
        seen.add(table.name)
        pins = _parse_pins(table.pins, f"{where}.pins", problems)
        token = _resolve_token(table, where, base, problems, read_tokens)
        limits = None
        if table.limits is not None:
            merged = {**(cloud_limits if isinstance(cloud_limits, dict) else {}), **table.limits}
            limits = _convert(merged, Limits, f"{where}.limits", problems)
        # Kept even when its token failed (the problem is listed; no Config is built): ports still know the name.
        devices.append(Device(name=table.name, token=token or "", pins=pins, limits=limits))
    return tuple(devices)


def _parse_pins(raw: dict[str, Any], where: str, problems: list[str]) -> dict[int, PinSpec]:
    pins: dict[int, PinSpec] = {}
    for name, spec in raw.items():
        pin = parse_pin_name(name)
        if pin is None:
            problems.append(f'{where}.{name}: expected a virtual pin name v0..v255, got "{name}"')
            continue
        if pin in pins:
            problems.append(f"{where}.{name}: pin v{pin} is declared twice")
            continue
        table = {"type": spec} if isinstance(spec, str) else spec
        if not isinstance(table, dict):
            problems.append(f"{where}.{name}: expected a type name or a table with type, got {_kind(spec)}")
            continue
        type_name = table.get("type")
        if type_name not in {t.value for t in PinType}:
            shown = f'"{type_name}"' if isinstance(type_name, str) else _kind(type_name)
            problems.append(f"{where}.{name}.type: expected one of {PIN_TYPE_NAMES}, got {shown}")
            continue
        parsed = _convert(table, PinSpec, f"{where}.{name}", problems)
        if parsed is None:
            continue
        if parsed.min is not None and parsed.max is not None and parsed.min > parsed.max:
            problems.append(f"{where}.{name}.min: {parsed.min} is above max {parsed.max}")
        pins[pin] = parsed
    return pins


def _resolve_token(table: _DeviceTable, where: str, base: Path, problems: list[str], read: bool) -> str | None:
    sources = {
        "token": table.token,
        "token_file": table.token_file,
        "token_env": table.token_env,
        "token_credential": table.token_credential,
    }
    given = [key for key, value in sources.items() if value is not None]
    if not given:
        problems.append(f"{where}.token: missing (set token, token_file, token_env or token_credential)")
        return None
    if len(given) > 1:
        problems.append(f"{where}.{given[1]}: give only one of {', '.join(given)}")
        return None
    key = given[0]
    value = sources[key]
    assert value is not None
    token: str | None
    if key != "token" and not value.strip():
        problems.append(f"{where}.{key}: empty")
        return None
    if key != "token" and not read:
        return ""
    if key == "token":
        token = value
    elif key == "token_env":
        token = os.environ.get(value)
        if token is None:
            problems.append(f"{where}.token_env: environment variable {value} is not set")
            return None
    else:
        if key == "token_credential":
            directory = os.environ.get(CREDENTIALS_ENV)
            if not directory:
                problems.append(f"{where}.token_credential: {CREDENTIALS_ENV} is not set")
                return None
            file = Path(directory) / value
        else:
            file = _resolve(base, value)
        try:
            token = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{where}.{key}: cannot read {file}: {getattr(exc, 'strerror', None) or exc}")
            return None
    token = token.strip()
    if not token or any(ch.isspace() for ch in token):
        problems.append(f"{where}.{key}: the token is empty or contains white space")
        return None
    return token


def _parse_ports(items: list[Any], devices: tuple[Device, ...], problems: list[str]) -> tuple[PortConfig, ...]:
    ports: list[PortConfig] = []
    names = {device.name for device in devices}
    paths: set[str] = set()
    for index, item in enumerate(items):
        where = f"port[{index}]"
        port = _convert(item, PortConfig, where, problems)
        if port is None:
            continue
        if port.path in paths:
            problems.append(f'{where}.path: port "{port.path}" is configured twice')
        paths.add(port.path)
        if port.device is not None and port.device not in names:
            problems.append(f'{where}.device: no [[device]] is named "{port.device}"')
        if port.format == "csv" and not port.columns and not port.header:
            problems.append(f"{where}.columns: csv needs columns = [...] or header = true")
        if port.columns:
            checked = line_columns(port.columns)
            if isinstance(checked, KeyProblem):
                problems.append(f"{where}.columns: {checked.detail}")
        if not port.reset_on_open and "://" in port.path:
            problems.append(f"{where}.reset_on_open: only a device path has DTR/RTS lines to keep, not a URL")
        if port.format == "nmea":
            if port.nmea is None:
                problems.append(f"{where}.nmea: nmea needs a [port.nmea] table naming pins")
            elif port.device is None:
                problems.append(f"{where}.device: nmea needs a device")
        if port.nmea is not None:
            for key in ("location", "altitude_m", "speed_kmh", "satellites"):
                value = getattr(port.nmea, key)
                if value is not None and parse_pin_name(value) is None:
                    problems.append(f'{where}.nmea.{key}: expected a virtual pin name, got "{value}"')
            if port.device is not None and port.device in names:
                _check_nmea_pins(port.nmea, next(d for d in devices if d.name == port.device), where, problems)
        ports.append(port)
    return tuple(ports)


_NMEA_PIN_TYPES: Mapping[str, tuple[PinType, ...]] = {
    "location": (PinType.LOCATION,),
    "altitude_m": (PinType.DOUBLE, PinType.INTEGER),
    "speed_kmh": (PinType.DOUBLE, PinType.INTEGER),
    "satellites": (PinType.INTEGER, PinType.DOUBLE),
}


def _check_nmea_pins(nmea: NmeaPins, device: Device, where: str, problems: list[str]) -> None:
    """Each [port.nmea] pin must be declared on the port's device with a type its quantity fits."""
    for key, allowed in _NMEA_PIN_TYPES.items():
        name = getattr(nmea, key)
        pin = parse_pin_name(name) if name is not None else None
        if pin is None:
            continue
        spec = device.pins.get(pin)
        if spec is None:
            problems.append(f'{where}.nmea.{key}: pin v{pin} is not declared on device "{device.name}"')
        elif spec.type not in allowed:
            expected = " or ".join(t.value for t in allowed)
            problems.append(
                f'{where}.nmea.{key}: pin v{pin} is a {spec.type.value} pin on device "{device.name}", '
                f"expected {expected}"
            )


# ---------------------------------------------------------------- structuring TOML into the tables
#
# cattrs builds the tables (unknown keys refused, every problem of a table collected); the hooks below make it
# strict the way TOML's types are: no str -> int, a bool is not an int, an int is a float. Problems keep the
# wording the config has always had ("expected int >= 0", "expected str | null, got int"): a TOML value's kind
# is named as below, and a union's kinds come in this order.

_KIND_NAMES: dict[type, str] = {
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    datetime: "datetime",
    date: "date",
    time: "time",
    list: "array",
    dict: "object",
    type(None): "null",
}
_KIND_ORDER = list(_KIND_NAMES.values())


class _Invalid(ValueError):
    """A value of the wrong kind or out of range; the message is the problem, without its key path."""


class _BadChoice(ValueError):
    """A string that is none of a key's choices (the key's type lists them)."""

    def __init__(self, value: str) -> None:
        super().__init__(value)
        self.value = value


def _kind_name(value: Any) -> str:
    return _KIND_NAMES.get(type(value), type(value).__name__)


def _arms(kind: Any) -> list[tuple[str, tuple[type, ...]]]:
    """The kinds of TOML value a config type admits: (name, the Python types TOML gives them)."""
    origin = get_origin(kind)
    if origin is Annotated:
        return _arms(get_args(kind)[0])
    if _is_union(kind):
        return [arm for member in get_args(kind) for arm in _arms(member)]
    if origin is Literal or (isinstance(kind, type) and issubclass(kind, enum.Enum)):
        return [("str", (str,))]
    if kind is float:
        return [("float", (int, float))]
    if kind in (list, dict) or origin in (list, dict):
        base = origin or kind
        return [(_KIND_NAMES[base], (base,))]
    if attrs.has(kind):
        return [("object", (dict,))]
    return [(_KIND_NAMES[kind], (kind,))]


def _expected(kind: Any) -> str:
    names = {name for name, _ in _arms(kind)}
    return " | ".join(sorted(names, key=_KIND_ORDER.index))


def _check_kind(value: Any, kind: Any) -> None:
    if not any(type(value) in accepted for _, accepted in _arms(kind)):
        raise _Invalid(f"expected {_expected(kind)}, got {_kind_name(value)}")


def _scalar(value: Any, kind: Any) -> Any:
    _check_kind(value, kind)
    return float(value) if kind is float else value


def _choice(value: Any, kind: Any) -> Any:
    _check_kind(value, kind)
    if value not in _choices(kind):
        raise _BadChoice(value)
    return kind(value) if isinstance(kind, type) else value


def _choices(kind: Any) -> list[Any]:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return [member.value for member in kind]
    return list(get_args(kind))


def _union(kind: Any) -> Callable[[Any, Any], Any]:
    hooks = [
        (frozenset(t for _, accepted in _arms(arm) for t in accepted), arm, _converter.get_structure_hook(arm))
        for arm in get_args(kind)
    ]

    def structure(value: Any, _: Any) -> Any:
        for accepted, arm, hook in hooks:
            if type(value) in accepted:
                return hook(value, arm)
        raise _Invalid(f"expected {_expected(kind)}, got {_kind_name(value)}")

    return structure


def _bounded(kind: Any) -> Callable[[Any, Any], Any]:
    base, *metadata = get_args(kind)
    hook = _converter.get_structure_hook(base)
    bounds = [meta for meta in metadata if isinstance(meta, Bounds)]

    def structure(value: Any, _: Any) -> Any:
        structured = hook(value, base)
        for bound in bounds:
            if problem := bound.problem(structured, _expected(base)):
                raise _Invalid(problem)
        return structured

    return structure


def _checked(factory: Callable[[Any, cattrs.Converter], Callable[[Any, Any], Any]]) -> Any:
    """A cattrs hook factory for containers, after a check that the value is one (cattrs iterates any iterable)."""

    def make(kind: Any) -> Callable[[Any, Any], Any]:
        hook = factory(kind, _converter)

        def structure(value: Any, _: Any) -> Any:
            _check_kind(value, kind)
            return hook(value, kind)

        return structure

    return make


def _is_bounded(kind: Any) -> bool:
    return get_origin(kind) is Annotated and any(isinstance(meta, Bounds) for meta in get_args(kind)[1:])


def _is_choice(kind: Any) -> bool:
    return get_origin(kind) is Literal or (isinstance(kind, type) and issubclass(kind, enum.Enum))


def _is_union(kind: Any) -> bool:
    return get_origin(kind) in (Union, types.UnionType)


def _is_list(kind: Any) -> bool:
    return get_origin(kind) is list


def _is_dict(kind: Any) -> bool:
    return get_origin(kind) is dict


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
for _type in (bool, int, float, str, type(None)):
    _converter.register_structure_hook(_type, _scalar)
_converter.register_structure_hook(enum.StrEnum, _choice)  # by class, like str's hook, which it comes before
_converter.register_structure_hook_func(_is_choice, _choice)
_converter.register_structure_hook_factory(_is_union, _union)
_converter.register_structure_hook_factory(_is_bounded, _bounded)
_converter.register_structure_hook_factory(_is_list, _checked(list_structure_factory))
_converter.register_structure_hook_factory(_is_dict, _checked(mapping_structure_factory))
_converter.register_structure_hook_factory(attrs.has, _checked(make_dict_structure_fn))


def _convert(value: Any, target: type[T], where: str, problems: list[str]) -> T | None:
    """Structure one table (or a value) of the config; add its problems, each with its key path, and give None."""
    try:
        return _converter.structure(value, target)
    except (_Invalid, _BadChoice, ClassValidationError, IterableValidationError) as exc:
        problems.extend(_describe(exc, where, target))
        return None


def _describe(exc: BaseException, where: str, kind: Any) -> Iterator[str]:
    """The problems an exception from structuring says, `where` being the key path to what it structured."""
    if isinstance(exc, ClassValidationError):
        located, others = exc.group_exceptions()
        for sub, attribute in located:
            yield from _describe(sub, f"{where}.{attribute.name}", attribute.type)
        for sub in others:
            yield from _describe(sub, where, kind)
    elif isinstance(exc, IterableValidationError):
        indexed, rest = exc.group_exceptions()
        for sub, item in indexed:
            yield from _describe(sub, f"{where}[{item.index}]", item.type)
        for sub in rest:
            yield from _describe(sub, where, kind)
    elif isinstance(exc, ForbiddenExtraKeysError):
        yield from (f"{where}.{key}: unknown key" for key in sorted(exc.extra_fields))
    elif isinstance(exc, KeyError):  # structuring a table reads each required key
        yield f"{where}: missing"
    elif isinstance(exc, _BadChoice):
        shown = repr(exc.value)
        if shown.startswith("'"):
            shown = f'"{shown[1:-1]}"'
        yield f"{where}: expected one of {'|'.join(_literals(kind))}, got {shown}"
    else:
        yield f"{where}: {exc}"


def _literals(kind: Any) -> list[str]:
    """Every literal a type admits, TOML-spelled, case variants once ("FULL" stands for "full" too)."""
    origin = get_origin(kind)
    values: list[str] = []
    if origin is Annotated:
        values = _literals(get_args(kind)[0])
    elif _is_choice(kind):
        values = [str(choice) for choice in _choices(kind)]
    elif _is_union(kind):
        values = [value for arm in get_args(kind) for value in _literals(arm)]
    elif kind is bool:
        values = ["true", "false"]
    shown: dict[str, str] = {}
    for value in values:
        shown.setdefault(value.lower(), value)
    return list(shown.values())


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _check_server(server: str, problems: list[str]) -> None:
    try:
        server_origin(server)
    except ServerError as exc:
        problems.append(f'cloud.server: expected "https://host[:port]", got "{redact(server)}": {exc}')


def _split_listen(listen: str, *, any_port: bool = False) -> tuple[str, int] | None:
    host, sep, port = listen.rpartition(":")
    lowest = 0 if any_port else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def split_listen(listen: str, *, any_port: bool = False) -> tuple[str, int]:
    """Split "HOST:PORT" into its parts (with any_port, port 0 asks for a free port)."""
    parsed = _split_listen(listen, any_port=any_port)
    if parsed is None:
        raise ValueError(f'expected "HOST:PORT", got "{listen}"')
    return parsed
