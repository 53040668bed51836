"""A local Blynk-compatible device HTTPS API server for tests, the demo and bench testing."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import math
import random
import re
import ssl
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web

from .config import ConfigError, Limits, load_config
from .config import split_listen as config_split_listen
from .errors import EdgeforwardError
from .points import PIN_COUNT, STRING_MAX_BYTES, PinType, Value, parse_pin_name
from .redact import redact

_log = structlog.get_logger(__name__)

API_PREFIX: Final = "/external/api/"
CONTROL_PREFIX: Final = "/_sim/"

CONNECTED_WINDOW_MS: Final = 60_000  # isHardwareConnected: a write within this window means online
RATE_WINDOW_MS: Final = 1_000
RETRY_AFTER_S: Final = 1  # default Retry-After of a 429 (rate limit or fault mode)
DAY_MS: Final = 86_400_000
MAX_URL_BYTES: Final = 65_536  # request line limit (aiohttp's default of 8190 is too small for strings)
STOP_GRACE_S: Final = 1.0  # how long stop() lets running handlers finish
HANG_POLL_S: Final = 0.05  # how often a hung request checks whether its client gave up
WAIT_TIMEOUT_S: Final = 5.0
REQUEST_LOG_MAX: Final = 100_000  # requests kept in `requests` (the newest); /_sim/stats counts them all
READ_CHUNK_BYTES: Final = 65_536
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**63 - 1

DEFAULT_BATCH_MAX_POINTS: Final = 10_000
DEFAULT_MAX_REQUEST_BYTES: Final = 2_000_000

MSG_INVALID_TOKEN: Final = "Invalid token."  # noqa: S105 (an error message, not a secret)
MSG_WRONG_PIN: Final = "Wrong pin format."
MSG_NO_DATASTREAM: Final = "No datastream setup for that pin."
MSG_VALUE: Final = "Value doesn't match the Datastream data type"
MSG_CONTENT_TYPE: Final = "Unknown content type."
MSG_WRONG_ID: Final = "Wrong dataStreamId format."
MSG_DAILY: Final = "Daily data points limit reached."
MSG_MONTHLY: Final = "Monthly messages limit reached."
MSG_RATE: Final = "Too many requests."
MSG_NO_VALUE: Final = "No value for that pin yet."
MSG_NOT_FOUND: Final = "Not found."
MSG_METHOD: Final = "Method not allowed."
MSG_UNAVAILABLE: Final = "Service unavailable."
MSG_INTERNAL: Final = "Internal server error."

OUTAGE_MODES: Final = ("503", "500", "429", "reset", "hang", "invalid_token")
ERROR_MODE_PREFIX: Final = "error:"  # "error:<message>" answers 400 with that message
PATH_LIVE: Final = "live"
PATH_UPDATE: Final = "update"
PATH_HISTORY: Final = "history"

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

Bounds = tuple[float | None, float | None]


class SimError(EdgeforwardError):
    """Root of cloudsim's errors (bad devices file, bad settings, cannot listen)."""


class _Refusal(SimError):
    """An answer other than success; raised inside request handling only."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class SimLimits:
    """Plan limits the simulated cloud enforces (0 = unlimited / no check)."""

    batch_max_points: int = DEFAULT_BATCH_MAX_POINTS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    points_per_day: int = 0  # history points per token per UTC day
    messages_per_month: int = 0  # requests per token per UTC calendar month
    requests_per_second: float = 0  # per token, sliding one-second window
    max_age_days: float = 0
    max_future_days: float = 0

    def __post_init__(self) -> None:
        """Refuse limits that make no sense."""
        if self.batch_max_points < 1 or self.max_request_bytes < 1:
            raise SimError("batch_max_points and max_request_bytes must be at least 1")
        for name in ("points_per_day", "messages_per_month", "requests_per_second", "max_age_days", "max_future_days"):
            if getattr(self, name) < 0:
                raise SimError(f"{name} must not be negative")


@dataclass(frozen=True)
class SimDevice:
    """A device the simulated cloud knows; no pins = any pin with any scalar value."""

    token: str = field(repr=False)
    name: str = ""
    pins: Mapping[int, PinType] = field(default_factory=dict)
    ranges: Mapping[int, Bounds] = field(default_factory=dict)  # min/max clamping, like datastream settings
    refuse: Mapping[int, str] = field(default_factory=dict)  # pin -> regex of value texts refused as a type mismatch


@dataclass(frozen=True)
class Received:
    """One accepted point."""

    token: str = field(repr=False)
    pin: int
    ts_ms: int
    value: Value
    path: str
    arrived_ms: int


@dataclass(frozen=True)
class SimRequest:
    """One request as the simulated cloud saw it (token redacted)."""

    method: str
    endpoint: str
    query: str
    status: int  # 0 = not answered (outage "reset" or "hang")
    error: str | None = None
    device: str | None = None
    points: int = 0
    arrived_ms: int = 0


@dataclass(frozen=True)
class SimUsage:
    """A token's counters in the current UTC day and month."""

    messages_this_month: int
    points_today: int


@dataclass
class _TokenState:
    month: tuple[int, int] = (0, 0)
    messages: int = 0
    day: int = -1
    day_points: int = 0
    window: collections.deque[int] = field(default_factory=collections.deque)
    last_write_ms: int | None = None
    latest: dict[int, tuple[int, Value]] = field(default_factory=dict)


def token_label(token: str, name: str = "") -> str:
    """A loggable stand-in for a token: the device name or a short hash."""
    if name:
        return name
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def limits_from_config(limits: Limits) -> SimLimits:
    """Enforce an edgeforward config's [cloud.limits] (what the daemon promises never to exceed)."""
    return SimLimits(
        batch_max_points=limits.batch_max_points,
        max_request_bytes=limits.max_request_bytes,
        points_per_day=limits.points_per_day,
        messages_per_month=limits.messages_per_month,
        requests_per_second=limits.requests_per_second,
        max_age_days=limits.max_age_days,
        max_future_days=limits.max_future_days,
    )


def check_fault_mode(mode: str) -> str:
    """Return mode if it is a fault mode (one of OUTAGE_MODES or "error:<message>"); raise SimError otherwise."""
    if mode in OUTAGE_MODES:
        return mode
    if mode.startswith(ERROR_MODE_PREFIX) and mode[len(ERROR_MODE_PREFIX) :].strip():
        return mode
    raise SimError(f"fault mode must be one of {', '.join(OUTAGE_MODES)} or error:<message>, got {mode!r}")


def check_fault_rates(rates: Mapping[str, float]) -> dict[str, float]:
    """Return a copy of mode -> probability per API request; raise SimError unless each is in 0..1, sum <= 1."""
    checked: dict[str, float] = {}
    for mode, rate in rates.items():
        check_fault_mode(mode)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise SimError(f"fault rate of {mode!r} must be a number in 0..1, got {rate!r}")
        checked[mode] = float(rate)
    if math.fsum(checked.values()) > 1:
        raise SimError("fault rates must add up to at most 1")
    return checked


def parse_fault_rates(text: str) -> dict[str, float]:
    """Parse "MODE:RATE,MODE:RATE" (e.g. "500:0.1,429:0.05,error:Quota exceeded.:0.01") for --fault."""
    rates: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        mode, sep, rate_text = item.strip().rpartition(":")
        try:
            rate = float(rate_text)
        except ValueError:
            rate = math.nan
        if not sep or not math.isfinite(rate):
            raise SimError(f'expected "MODE:RATE" with RATE in 0..1, got "{item.strip()}"')
        if mode in rates:
            raise SimError(f"fault mode {mode!r} is given twice")
        rates[mode] = rate
    return check_fault_rates(rates)


def server_ssl_context(cert_file: Path, key_file: Path | None = None) -> ssl.SSLContext:
    """A TLS server context from a PEM certificate chain and its key (None = the key is in cert_file)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise SimError(f"cannot load TLS certificate {cert_file}: {getattr(exc, 'strerror', None) or exc}") from exc
    return context


# --- value parsing (pure) ---------------------------------------------------------------------


def parse_text_value(kind: PinType | None, text: str) -> Value:
    """Parse one query-string value as the pin type (None = infer); raise ValueError if it does not fit."""
    if kind in (PinType.INTEGER, PinType.ENUM):
        return _text_int(text)
    if kind is PinType.DOUBLE:
        return _text_float(text)
    if kind is PinType.BOOLEAN:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise ValueError("not a boolean")
    if kind is PinType.STRING:
        return _string(text)
    if kind is PinType.LOCATION:
        raise ValueError("a location needs two values")
    if _INT_RE.fullmatch(text):
        return _text_int(text)
    if _FLOAT_RE.fullmatch(text):
        return _text_float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return _string(text)


def parse_text_location(texts: list[str]) -> tuple[float, float]:
    """Parse the two query values LON, LAT of a location."""
    if len(texts) != 2:
        raise ValueError("a location needs two values")
    return (_text_float(texts[0]), _text_float(texts[1]))


def parse_json_value(kind: PinType | None, raw: object) -> Value:
    """Check one decoded JSON value against the pin type (None = any scalar or [lon, lat])."""
    if kind in (PinType.INTEGER, PinType.ENUM):
        if type(raw) is not int:
            raise ValueError("not an integer")
        return _int_range(raw)
    if kind is PinType.DOUBLE:
        return _json_number(raw)
    if kind is PinType.STRING:
        if not isinstance(raw, str):
            raise ValueError("not a string")
        return _string(raw)
    if kind is PinType.BOOLEAN:
        if not isinstance(raw, bool):
            raise ValueError("not a boolean")
        return raw
    if kind is PinType.LOCATION:
        return _json_location(raw)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int):
        return _int_range(raw)
    if isinstance(raw, float):
        return _json_number(raw)
    if isinstance(raw, str):
        return _string(raw)
    return _json_location(raw)


def clamp(kind: PinType | None, value: Value, bounds: Bounds | None) -> Value:
    """Bound a number by a datastream's min/max, as the cloud does."""
    if bounds is None or isinstance(value, bool) or kind not in (PinType.INTEGER, PinType.DOUBLE):
        return value
    low, high = bounds
    if isinstance(value, int):
        if low is not None:
            value = max(value, math.ceil(low))
        if high is not None:
            value = min(value, math.floor(high))
        return value
    if isinstance(value, float):
        if low is not None:
            value = max(value, float(low))
        if high is not None:
            value = min(value, float(high))
    return value


def _text_int(text: str) -> int:
    if not _INT_RE.fullmatch(text):
        raise ValueError("not an integer")
    return _int_range(int(text))


def _int_range(number: int) -> int:
    if not INT_MIN <= number <= INT_MAX:
        raise ValueError("integer out of range")
    return number


def _text_float(text: str) -> float:
    if not _FLOAT_RE.fullmatch(text):
        raise ValueError("not a number")
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _json_number(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError("not a number")  # noqa: TRY004 (every mismatch is one ValueError)
    if isinstance(raw, int):
        _int_range(raw)
    number = float(raw)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _json_location(raw: object) -> tuple[float, float]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise ValueError("not [lon, lat]")
    return (_json_number(raw[0]), _json_number(raw[1]))


def _string(text: str) -> str:
    if len(text.encode("utf-8", "surrogatepass")) > STRING_MAX_BYTES:
        raise ValueError("string too long")
    return text


# --- the server ---------------------------------------------------------------------------------


class _RedactingFilter(logging.Filter):
    """Keep tokens out of aiohttp's own server log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_http_logger = logging.getLogger(__name__ + ".http")
_http_logger.addFilter(_RedactingFilter())


def _json_text(data: object) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _json_bytes(data: object) -> bytes:
    return _json_text(data).encode()


def _json_body(body: bytes) -> object:
    """Decode a request body as strictly as the cloud: UTF-8 without a BOM, and no NaN or Infinity (ValueError)."""
    return json.loads(body.decode("utf-8"), parse_constant=_no_constant)


def _no_constant(name: str) -> object:
    raise ValueError(f"not JSON: {name}")


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=_json_bytes({"error": {"message": message}}), content_type="application/json"
    )


def _value_text(value: Value) -> str:
    if isinstance(value, str):
        return value
    return _json_text(list(value) if isinstance(value, tuple) else value)


def _point_json(point: Received, label: str) -> dict[str, Any]:
    value = list(point.value) if isinstance(point.value, tuple) else point.value
    return {
        "device": label,
        "pin": point.pin,
        "ts_ms": point.ts_ms,
        "value": value,
        "path": point.path,
        "arrived_ms": point.arrived_ms,
    }


def _month_of(ms: int) -> tuple[int, int]:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return (moment.year, moment.month)


class CloudSim:
    """An aiohttp server that behaves like the Blynk device HTTPS API, strictly."""

    def __init__(
        self,
        devices: Iterable[SimDevice] = (),
        *,
        limits: SimLimits = SimLimits(),
        accept_any_token: bool = False,
        redirects: Mapping[str, str] | None = None,
        record_path: Path | None = None,
        clock: Callable[[], int] = now_ms,
        fault_rates: Mapping[str, float] | None = None,
        seed: int | None = None,
        retry_after_s: float = RETRY_AFTER_S,
        request_log_max: int = REQUEST_LOG_MAX,
    ) -> None:
        """Set up the application; start() begins listening."""
        self._devices: dict[str, SimDevice] = {}
        self._refuse: dict[str, dict[int, re.Pattern[str]]] = {}
        for device in devices:
            self._add_device(device)
        self.limits = limits
        self.accept_any_token = accept_any_token
        self.redirects = dict(redirects or {})
        for target in self.redirects.values():
            if not target.startswith(("http://", "https://")):
                raise SimError(f"redirect target must be an http(s) base URL, got {target!r}")
        self.record_path = record_path
        # pin -> message of a 400 that every history POST of that pin gets, a message no document names (a
        # server fault tied to one pin: the client cannot tell it from a broken account by the answer alone).
        self.pin_failures: dict[int, str] = {}
        self.received: list[Received] = []
        if request_log_max < 1:
            raise SimError(f"request_log_max must be at least 1, got {request_log_max}")
        self.requests: collections.deque[SimRequest] = collections.deque(maxlen=request_log_max)
        self._request_total = 0
        self._by_endpoint: dict[str, dict[str, int]] = {}
        self._by_status: dict[str, int] = {}
        self.url: str | None = None
        self._outage: str | None = None
        self._fault_rates = check_fault_rates(fault_rates or {})
        self._random = random.Random(seed)
        if not math.isfinite(retry_after_s) or retry_after_s < 0:
            raise SimError(f"retry_after_s must be a non-negative number, got {retry_after_s!r}")
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._states: dict[str, _TokenState] = {}
        self._stopping = asyncio.Event()
        self._arrival = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_route("*", API_PREFIX + "{endpoint:.*}", self._api)
        self.app.router.add_post(CONTROL_PREFIX + "outage", self._control_outage)
        self.app.router.add_get(CONTROL_PREFIX + "outage", self._control_outage)
        self.app.router.add_post(CONTROL_PREFIX + "faults", self._control_faults)
        self.app.router.add_get(CONTROL_PREFIX + "faults", self._control_faults)
        self.app.router.add_get(CONTROL_PREFIX + "points", self._control_points)
        self.app.router.add_get(CONTROL_PREFIX + "stats", self._control_stats)

    def _add_device(self, device: SimDevice) -> None:
        if not device.token or any(ch.isspace() for ch in device.token):
            raise SimError(f"device {device.name!r}: the token is empty or contains white space")
        if device.token in self._devices:
            raise SimError(f"device {device.name!r}: its token is given twice")
        try:
            pins = {int(pin): PinType(kind) for pin, kind in device.pins.items()}
        except ValueError as exc:
            raise SimError(f"device {device.name!r}: {exc}") from exc
        for pin in [*pins, *device.ranges, *device.refuse]:
            if not 0 <= pin < PIN_COUNT:
                raise SimError(f"device {device.name!r}: pin {pin} is not in v0..v{PIN_COUNT - 1}")
        refuse: dict[int, re.Pattern[str]] = {}
        for pin, pattern in device.refuse.items():
            try:
                refuse[pin] = re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise SimError(f"device {device.name!r}: refuse pattern of v{pin}: {exc}") from exc
        self._devices[device.token] = SimDevice(
            device.token, device.name, pins, dict(device.ranges), dict(device.refuse)
        )
        self._refuse[device.token] = refuse

    # --- public helpers ---

    @property
    def outage(self) -> str | None:
        """None when up; else the fault mode every API request gets (OUTAGE_MODES or "error:<message>")."""
        return self._outage

    @outage.setter
    def outage(self, mode: str | None) -> None:
        if mode == "off":
            mode = None
        if mode is not None:
            check_fault_mode(mode)
        self._outage = mode
        _log.info("cloudsim outage", mode=mode or "off")

    @property
    def fault_rates(self) -> Mapping[str, float]:
        """Fault mode -> probability that an API request gets it (when no outage is set); assign to change."""
        return types.MappingProxyType(self._fault_rates)

    @fault_rates.setter
    def fault_rates(self, rates: Mapping[str, float]) -> None:
        self._fault_rates = check_fault_rates(rates)
        _log.info("cloudsim fault rates", rates=dict(self._fault_rates))

    def reseed(self, seed: int | None) -> None:
        """Restart the random fault sequence from seed."""
        self._random.seed(seed)

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> str:
        """Listen on host:port (0 = a free port), over TLS if ssl_context is given, and return the base URL."""
        if self._runner is not None:
            raise SimError("cloudsim is already running")
        self._stopping.clear()
        runner = web.AppRunner(
            self.app,
            access_log=None,  # aiohttp's access log would print tokens
            logger=_http_logger,
            shutdown_timeout=STOP_GRACE_S,
            max_line_size=MAX_URL_BYTES,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SimError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._runner = runner
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        scheme = "http" if ssl_context is None else "https"
        self.url = f"{scheme}://{shown}:{bound}"
        return self.url

    async def stop(self) -> None:
        """Release hung requests, close every connection and stop listening."""
        runner, self._runner = self._runner, None
        self._stopping.set()
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> CloudSim:
        """Start on a free loopback port."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop."""
        await self.stop()

    def points(self, token: str | None = None, pin: int | None = None) -> list[Received]:
        """Accepted points, optionally of one token and/or pin."""
        return [
            point
            for point in self.received
            if (token is None or point.token == token) and (pin is None or point.pin == pin)
        ]

    async def wait_points(
        self, count: int, token: str | None = None, pin: int | None = None, within_s: float = WAIT_TIMEOUT_S
    ) -> list[Received]:
        """Wait until at least count points (of token/pin) arrived; raise TimeoutError otherwise."""
        async with asyncio.timeout(within_s):
            while len(found := self.points(token, pin)) < count:
                self._arrival.clear()
                await self._arrival.wait()
        return found

    def usage(self, token: str) -> SimUsage:
        """A token's message count this UTC month and history points this UTC day."""
        state = self._states.get(token)
        if state is None:
            return SimUsage(0, 0)
        now = self._clock()
        messages = state.messages if state.month == _month_of(now) else 0
        points = state.day_points if state.day == now // DAY_MS else 0
        return SimUsage(messages, points)

    def label(self, token: str) -> str:
        """The device name of a token, or a short hash of it."""
        device = self._devices.get(token)
        return token_label(token, device.name if device else "")

    # --- the device API ---

    async def _api(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        arrived = self._clock()
        query = redact(request.rel_url.raw_query_string)
        token = request.query.get("token", "")
        fault = self._outage or self._draw_fault()
        if fault is not None:
            return await self._fault_answer(request, fault, endpoint, query=query, token=token, arrived=arrived)
        label: str | None = None
        points: list[Received] = []
        try:
            device = self._admit(request, endpoint, token)
            label = self.label(token)
            points = await self._handle(request, endpoint, device, arrived)
            response = self._success(request, endpoint, device)
        except _Refusal as refusal:
            response = _error(refusal.status, refusal.message)
            response.headers.update(refusal.headers)
        except Exception as exc:  # noqa: BLE001 (answer 500 and log it redacted instead of aiohttp's log)
            _log.error("cloudsim handler failed", endpoint=endpoint, error=redact(repr(exc)))
            response = _error(500, MSG_INTERNAL)
        error = None
        if response.status >= 300:
            error = self._message_of(response)
        self._note(SimRequest(request.method, endpoint, query, response.status, error, label, len(points), arrived))
        return response

    def _admit(self, request: web.Request, endpoint: str, token: str) -> SimDevice:
        if token in self.redirects:
            target = self.redirects[token].rstrip("/")
            location = f"{target}{API_PREFIX}{endpoint}?{request.rel_url.raw_query_string}"
            raise _Refusal(308, "Permanent Redirect", {"Location": location})
        allowed = _ROUTES.get(endpoint)
        if allowed is None:
            raise _Refusal(404, MSG_NOT_FOUND)
        if request.method not in allowed:
            raise _Refusal(405, MSG_METHOD)
        device = self._devices.get(token)
        if device is None:
            if not self.accept_any_token or not token or any(ch.isspace() for ch in token):
                raise _Refusal(400, MSG_INVALID_TOKEN)
            device = SimDevice(token)
        state = self._state(token)
        now = self._clock()
        if request.method == "POST" or endpoint in ("update", "batch/update"):
            state.last_write_ms = now
        month = _month_of(now)
        if state.month != month:
            state.month, state.messages = month, 0
        state.messages += 1
        if self.limits.messages_per_month and state.messages > self.limits.messages_per_month:
            raise _Refusal(400, MSG_MONTHLY)
        if self.limits.requests_per_second:
            window = state.window
            while window and now - window[0] >= RATE_WINDOW_MS:
                window.popleft()
            if len(window) + 1 > self.limits.requests_per_second:
                raise _Refusal(429, MSG_RATE, {"Retry-After": self._retry_after_text()})
            window.append(now)
        return device

    async def _handle(self, request: web.Request, endpoint: str, device: SimDevice, arrived: int) -> list[Received]:
        if endpoint == "batch/update" and request.method == "POST":
            points = await self._history(request, device, arrived)
        elif endpoint == "batch/update":
            points = self._live(request, device, arrived)
        elif endpoint == "update":
            points = self._update(request, device, arrived)
        else:
            return []
        self._accept(points)
        return points

    def _success(self, request: web.Request, endpoint: str, device: SimDevice) -> web.Response:
        if endpoint == "batch/update":
            return web.Response(text="OK")
        if endpoint == "update":
            return web.Response(text="")
        if endpoint == "isHardwareConnected":
            last = self._state(device.token).last_write_ms
            online = last is not None and self._clock() - last < CONNECTED_WINDOW_MS
            return web.Response(text="true" if online else "false")
        return self._get(request, device)

    def _live(self, request: web.Request, device: SimDevice, arrived: int) -> list[Received]:
        grouped = _pin_params(request)
        if not grouped:
            raise _Refusal(400, MSG_WRONG_PIN)
        points: list[Received] = []
        for name, texts in grouped.items():
            pin = self._pin(device, name)
            kind = device.pins.get(pin)
            if kind is PinType.LOCATION or len(texts) != 1:
                raise _Refusal(400, MSG_VALUE)
            value = self._text_value(device, pin, texts)
            points.append(Received(device.token, pin, arrived, value, PATH_LIVE, arrived))
        return points

    def _update(self, request: web.Request, device: SimDevice, arrived: int) -> list[Received]:
        params = _pin_params(request)
        if "dataStreamId" in params:
            ids = params.pop("dataStreamId")
            if len(ids) != 1 or not ids[0].isdigit() or not ids[0].isascii() or int(ids[0]) >= PIN_COUNT:
                raise _Refusal(400, MSG_WRONG_ID)
            pin_text = f"v{int(ids[0])}"
            texts = params.pop("value", [])
        elif "pin" in params:
            names = params.pop("pin")
            if len(names) != 1:
                raise _Refusal(400, MSG_WRONG_PIN)
            pin_text = names[0]
            texts = params.pop("value", [])
        else:
            if len(params) != 1:
                raise _Refusal(400, MSG_WRONG_PIN)
            pin_text, texts = params.popitem()
        if params:
            raise _Refusal(400, MSG_WRONG_PIN)
        pin = self._pin(device, pin_text)
        value = self._text_value(device, pin, texts)
        return [Received(device.token, pin, arrived, value, PATH_UPDATE, arrived)]

    async def _history(self, request: web.Request, device: SimDevice, arrived: int) -> list[Received]:
        names = request.query.getall("pin", [])
        if len(names) != 1:
            raise _Refusal(400, MSG_WRONG_PIN)
        pin = self._pin(device, names[0])
        if pin in self.pin_failures:
            raise _Refusal(400, self.pin_failures[pin])
        if request.content_type != "application/json":
            raise _Refusal(400, MSG_CONTENT_TYPE)
        body = await self._read_body(request)
        try:
            entries = _json_body(body)
        except (ValueError, RecursionError) as exc:
            raise _Refusal(400, MSG_VALUE) from exc
        if not isinstance(entries, list):
            raise _Refusal(400, MSG_VALUE)
        limit = self.limits.batch_max_points
        if len(entries) > limit:
            raise _Refusal(400, f"Too much data in batch. Maximum batch size is {limit} points.")
        kind = device.pins.get(pin)
        bounds = device.ranges.get(pin)
        points: list[Received] = []
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 2:
                raise _Refusal(400, MSG_VALUE)
            ts, raw = entry
            if type(ts) is not int or not 0 <= ts <= INT_MAX:
                raise _Refusal(400, MSG_VALUE)
            try:
                if isinstance(raw, str):
                    raw.encode()  # a lone surrogate ("\\ud800") is no text
                value = clamp(kind, parse_json_value(kind, raw), bounds)
            except ValueError as exc:
                raise _Refusal(400, MSG_VALUE) from exc
            self._check_refused(device, pin, raw if isinstance(raw, str) else _json_text(raw))
            points.append(Received(device.token, pin, ts, value, PATH_HISTORY, arrived))
        self._check_timestamps(points, arrived)
        state = self._state(device.token)
        day = arrived // DAY_MS
        if state.day != day:
            state.day, state.day_points = day, 0
        if self.limits.points_per_day and state.day_points + len(points) > self.limits.points_per_day:
            raise _Refusal(400, MSG_DAILY)
        state.day_points += len(points)
        return points

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.limits.max_request_bytes
        too_large = _Refusal(413, f"Request is too large. Maximum request size is {limit} bytes.")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(READ_CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_timestamps(self, points: list[Received], now: int) -> None:
        if self.limits.max_age_days:
            oldest = now - self.limits.max_age_days * DAY_MS
            for point in points:
                if point.ts_ms < oldest:
                    raise _Refusal(
                        400,
                        f"Timestamp {point.ts_ms} is too old. Maximum age is {self.limits.max_age_days:g} days.",
                    )
        if self.limits.max_future_days:
            newest = now + self.limits.max_future_days * DAY_MS
            for point in points:
                if point.ts_ms > newest:
                    raise _Refusal(
                        400,
                        f"Timestamp {point.ts_ms} is too far in the future. "
                        f"Maximum is {self.limits.max_future_days:g} days ahead.",
                    )

    def _get(self, request: web.Request, device: SimDevice) -> web.Response:
        names = [name for name in _pin_params(request) if name]
        if not names:
            raise _Refusal(400, MSG_WRONG_PIN)
        latest = self._state(device.token).latest
        pins = [(name, self._pin(device, name)) for name in names]
        if len(pins) == 1:
            found = latest.get(pins[0][1])
            if found is None:
                raise _Refusal(400, MSG_NO_VALUE)
            return web.Response(text=_value_text(found[1]))
        values: dict[str, Any] = {}
        for name, pin in pins:
            found = latest.get(pin)
            if found is not None:
                value = found[1]
                values[name.lower()] = list(value) if isinstance(value, tuple) else value
        return web.Response(body=_json_bytes(values), content_type="application/json")

    def _pin(self, device: SimDevice, name: str) -> int:
        pin = parse_pin_name(name)
        if pin is None:
            raise _Refusal(400, MSG_WRONG_PIN)
        if device.pins and pin not in device.pins:
            raise _Refusal(400, MSG_NO_DATASTREAM)
        return pin

    def _text_value(self, device: SimDevice, pin: int, texts: list[str]) -> Value:
        kind = device.pins.get(pin)
        location = kind is PinType.LOCATION or (kind is None and len(texts) == 2)
        if not location and len(texts) != 1:
            raise _Refusal(400, MSG_VALUE)
        try:
            if location:
                value: Value = parse_text_location(texts)
            else:
                value = clamp(kind, parse_text_value(kind, texts[0]), device.ranges.get(pin))
        except ValueError as exc:
            raise _Refusal(400, MSG_VALUE) from exc
        self._check_refused(device, pin, f"[{','.join(texts)}]" if location else texts[0])
        return value

    def _check_refused(self, device: SimDevice, pin: int, text: str) -> None:
        """Refuse a value whose text matches the pin's `refuse` pattern, as the cloud refuses a type mismatch."""
        pattern = self._refuse.get(device.token, {}).get(pin)
        if pattern is not None and pattern.fullmatch(text):
            raise _Refusal(400, MSG_VALUE)

    def _state(self, token: str) -> _TokenState:
        state = self._states.get(token)
        if state is None:
            state = self._states[token] = _TokenState()
        return state

    def _accept(self, points: list[Received]) -> None:
        if not points:
            return
        self.received.extend(points)
        self._arrival.set()
        for point in points:
            latest = self._state(point.token).latest
            known = latest.get(point.pin)
            if known is None or point.ts_ms >= known[0]:
                latest[point.pin] = (point.ts_ms, point.value)
        if self.record_path is not None:
            self._append_record(points)

    def _append_record(self, points: list[Received]) -> None:
        lines = b"".join(_json_bytes(_point_json(point, self.label(point.token))) + b"\n" for point in points)
        assert self.record_path is not None
        with self.record_path.open("ab") as file:
            file.write(lines)

    def _draw_fault(self) -> str | None:
        if not self._fault_rates:
            return None
        draw = self._random.random()
        for mode, rate in self._fault_rates.items():
            if draw < rate:
                return mode
            draw -= rate
        return None

    def _retry_after_text(self) -> str:
        return f"{self.retry_after_s:g}"

    async def _fault_answer(
        self, request: web.Request, mode: str, endpoint: str, *, query: str, token: str, arrived: int
    ) -> web.StreamResponse:
        label = self.label(token) if token else None
        answer = self._fault_response(mode)
        status = 0 if answer is None else answer.status
        self._note(SimRequest(request.method, endpoint, query, status, f"fault {mode}", label, 0, arrived))
        if answer is not None:
            return answer
        if mode == "hang":
            while not self._stopping.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                try:
                    async with asyncio.timeout(HANG_POLL_S):
                        await self._stopping.wait()
                except TimeoutError:
                    pass
        if request.transport is not None:
            request.transport.abort()
        # Never delivered: the connection is gone; aiohttp notices and drops it quietly.
        return web.Response(status=503)

    def _fault_response(self, mode: str) -> web.Response | None:
        """The answer of a fault mode; None for "reset" and "hang" (no answer at all)."""
        if mode == "503":
            return _error(503, MSG_UNAVAILABLE)
        if mode == "500":
            return _error(500, MSG_INTERNAL)
        if mode == "429":
            response = _error(429, MSG_RATE)
            response.headers["Retry-After"] = self._retry_after_text()
            return response
        if mode == "invalid_token":
            return _error(400, MSG_INVALID_TOKEN)
        if mode.startswith(ERROR_MODE_PREFIX):
            return _error(400, mode[len(ERROR_MODE_PREFIX) :])
        return None

    def _note(self, record: SimRequest) -> None:
        self.requests.append(record)
        self._request_total += 1
        status = str(record.status)
        counts = self._by_endpoint.setdefault(f"{record.method} {record.endpoint}", {})
        counts[status] = counts.get(status, 0) + 1
        self._by_status[status] = self._by_status.get(status, 0) + 1
        _log.info(
            "cloudsim request",
            method=record.method,
            endpoint=record.endpoint,
            query=record.query,
            status=record.status,
            error=record.error,
            device=record.device,
            points=record.points,
        )

    @staticmethod
    def _message_of(response: web.Response) -> str | None:
        if not isinstance(response.body, bytes):
            return None
        try:
            decoded: Any = json.loads(response.body)
            return str(decoded["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return None

    # --- control endpoints (never subject to outage) ---

    async def _control_outage(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.outage = request.query.get("mode", "")
            except SimError as exc:
                return _error(400, str(exc))
        return web.Response(body=_json_bytes({"outage": self._outage or "off"}), content_type="application/json")

    async def _control_faults(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.fault_rates = parse_fault_rates(request.query.get("rates", ""))
                if "seed" in request.query:
                    self.reseed(int(request.query["seed"]))
            except SimError as exc:
                return _error(400, str(exc))
            except ValueError:
                return _error(400, "seed must be an integer")
        return web.Response(body=_json_bytes({"fault_rates": dict(self._fault_rates)}), content_type="application/json")

    async def _control_points(self, request: web.Request) -> web.Response:
        device = request.query.get("device")
        path = request.query.get("path")
        pin_text = request.query.get("pin")
        pin = None
        if pin_text is not None:
            pin = parse_pin_name(pin_text) if not pin_text.isdigit() else int(pin_text)
            if pin is None:
                return _error(400, MSG_WRONG_PIN)
        listed = []
        for point in self.received:
            label = self.label(point.token)
            wanted = (device is None or label == device) and (pin is None or point.pin == pin)
            if wanted and (path is None or point.path == path):
                listed.append(_point_json(point, label))
        return web.Response(body=_json_bytes(listed), content_type="application/json")

    async def _control_stats(self, _request: web.Request) -> web.Response:
        points: dict[str, int] = {PATH_LIVE: 0, PATH_UPDATE: 0, PATH_HISTORY: 0}
        for point in self.received:
            points[point.path] += 1
        devices = {}
        for token in self._states:
            usage = self.usage(token)
            devices[self.label(token)] = {
                "messages_this_month": usage.messages_this_month,
                "points_today": usage.points_today,
            }
        stats = {
            "requests": self._request_total,
            "by_endpoint": self._by_endpoint,
            "by_status": self._by_status,
            "points": points,
            "devices": devices,
            "outage": self._outage or "off",
            "fault_rates": dict(self._fault_rates),
        }
        return web.Response(body=_json_bytes(stats), content_type="application/json")


_ROUTES: Final[Mapping[str, tuple[str, ...]]] = {
    "batch/update": ("GET", "POST"),
    "update": ("GET",),
    "get": ("GET",),
    "isHardwareConnected": ("GET",),
}


def _pin_params(request: web.Request) -> dict[str, list[str]]:
    """Every query parameter but the token, grouped by name in order."""
    grouped: dict[str, list[str]] = {}
    for key, value in request.query.items():
        if key != "token":
            grouped.setdefault(key, []).append(value)
    return grouped


# --- devices files and the command -----------------------------------------------------------


def devices_from_file(path: Path) -> list[SimDevice]:
    """Read devices from JSON {"TOKEN": {"name", "pins": {"v1": "double"}, "refuse": {"v1": REGEX}}} or a config."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SimError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        return _devices_from_json(text, path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise SimError("\n".join(exc.problems)) from exc
    return [
        SimDevice(
            token=device.token,
            name=device.name,
            pins={pin: spec.type for pin, spec in device.pins.items()},
            ranges={
                pin: (spec.min, spec.max)
                for pin, spec in device.pins.items()
                if spec.min is not None or spec.max is not None
            },
        )
        for device in config.devices
    ]


def _devices_from_json(text: str, path: Path) -> list[SimDevice]:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise SimError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SimError(f"{path}: expected an object of TOKEN -> device")
    problems: list[str] = []
    devices: list[SimDevice] = []
    for index, (token, spec) in enumerate(raw.items()):
        where = f"{path}: device[{index}]"
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected an object with name, pins and refuse")
            continue
        unknown = set(spec) - {"name", "pins", "refuse"}
        if unknown:
            problems.append(f"{where}: unknown key {sorted(unknown)[0]}")
        name = spec.get("name", "")
        if not isinstance(name, str):
            problems.append(f"{where}.name: expected a string")
            name = ""
        where = f"{path}: device {name!r}" if name else where
        if not token or any(ch.isspace() for ch in token):
            problems.append(f"{where}: the token is empty or contains white space")
            continue
        pins_raw = spec.get("pins", {})
        if not isinstance(pins_raw, dict):
            problems.append(f"{where}.pins: expected an object")
            continue
        pins: dict[int, PinType] = {}
        ranges: dict[int, Bounds] = {}
        for pin_name_text, pin_spec in pins_raw.items():
            _json_pin(
                pin_name_text,
                pin_spec,
                where=f"{where}.pins.{pin_name_text}",
                pins=pins,
                ranges=ranges,
                problems=problems,
            )
        refuse = _json_refuse(spec.get("refuse", {}), where=f"{where}.refuse", problems=problems)
        devices.append(SimDevice(token=token, name=name, pins=pins, ranges=ranges, refuse=refuse))
    if problems:
        raise SimError("\n".join(problems))
    return devices


def _json_refuse(raw: object, *, where: str, problems: list[str]) -> dict[int, str]:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected an object of pin -> regular expression")
        return {}
    refuse: dict[int, str] = {}
    for name, pattern in raw.items():
        pin = parse_pin_name(name)
        if pin is None:
            problems.append(f"{where}.{name}: expected a virtual pin name v0..v255")
            continue
        if not isinstance(pattern, str):
            problems.append(f"{where}.{name}: expected a regular expression string")
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"{where}.{name}: not a valid regular expression: {exc}")
            continue
        refuse[pin] = pattern
    return refuse


def _json_pin(
    name: str,
    spec: object,
    *,
    where: str,
    pins: dict[int, PinType],
    ranges: dict[int, Bounds],
    problems: list[str],
) -> None:
    pin = parse_pin_name(name)
    if pin is None:
        problems.append(f"{where}: expected a virtual pin name v0..v255")
        return
    table = {"type": spec} if isinstance(spec, str) else spec
    if not isinstance(table, dict) or set(table) - {"type", "min", "max"}:
        problems.append(f"{where}: expected a type name or an object with type, min, max")
        return
    try:
        pins[pin] = PinType(str(table.get("type")))
    except ValueError:
        problems.append(f"{where}.type: expected one of {', '.join(t.value for t in PinType)}")
        return
    low, high = table.get("min"), table.get("max")
    for bound in (low, high):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
            problems.append(f"{where}: min and max must be numbers")
            return
    if low is not None or high is not None:
        ranges[pin] = (low, high)


def split_listen(listen: str) -> tuple[str, int]:
    """Split "HOST:PORT" (port 0 = any free port)."""
    try:
        return config_split_listen(listen, any_port=True)
    except ValueError as exc:
        raise SimError(str(exc)) from None


async def serve(
    listen: str,
    devices: list[SimDevice],
    limits: SimLimits,
    accept_any_token: bool,
    record_path: Path | None,
    *,
    redirects: Mapping[str, str] | None = None,
    on_ready: Callable[[str], None] | None = None,
    fault_rates: Mapping[str, float] | None = None,
    seed: int | None = None,
    retry_after_s: float = RETRY_AFTER_S,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Run a CloudSim on listen ("HOST:PORT"), over TLS if ssl_context is given, until cancelled."""
    host, port = split_listen(listen)
    sim = CloudSim(
        devices,
        limits=limits,
        accept_any_token=accept_any_token,
        redirects=redirects,
        record_path=record_path,
        fault_rates=fault_rates,
        seed=seed,
        retry_after_s=retry_after_s,
    )
    url = await sim.start(host, port, ssl_context=ssl_context)
    try:
        _log.info(
            "cloudsim listening",
            url=url,
            devices=len(devices),
            accept_any_token=accept_any_token,
            fault_rates=dict(sim.fault_rates),
        )
        if on_ready is not None:
            on_ready(url)
        await asyncio.Event().wait()
    finally:
        await sim.stop()
