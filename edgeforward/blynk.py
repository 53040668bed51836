"""HTTP client for the Blynk device API, mapping every answer to a result or one exception class."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import math
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from urllib.parse import quote

import aiohttp
import structlog
from yarl import URL

from .errors import EdgeforwardError, redacted_cause
from .points import Value, encode_query_value, pin_name, query_values
from .redact import redact
from .servers import ServerError, redirect_target, server_origin
from .timebase import SYSTEM_CLOCK, Clock

log = structlog.get_logger(__name__)

API_PATH = "/external/api/"
MAX_REDIRECTS = 3
FOLLOWED_REDIRECTS = frozenset({301, 302, 307, 308})
RATE_WINDOW_S = 1.0
RATE_MARGIN_S = 0.05
ERROR_BODY_MAX_BYTES = 4096
ANSWER_BODY_MAX_BYTES = 4096  # a 200 answer is "OK", "true" or a few values: never read more
RETRY_AFTER_MAX_S = 3600.0  # a longer (or endless) Retry-After would silence a device for good
HTTP_CONNECTIONS = 8
DNS_CACHE_S = 300


class CloudError(EdgeforwardError):
    """Root of every failure to get a request accepted by the cloud."""


class TransientError(CloudError):
    """The cloud could not be reached or asked us to come back later (retry with backoff).

    The message is redacted when built: the forwarder stores it as the device's reason.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None, secrets: Iterable[str] = ()) -> None:
        super().__init__(redact(message, secrets))
        self.retry_after_s = retry_after_s


class RedirectError(TransientError):
    """The cloud redirected to a server that is not followed; the device keeps its server and its points."""


class Refusal(enum.Enum):
    """Why the cloud refused a request for good (HTTP 4xx)."""

    INVALID_TOKEN = "invalid_token"  # noqa: S105 (a refusal name, not a secret)
    PIN = "pin"
    VALUE = "value"
    TOO_LARGE = "too_large"
    QUOTA = "quota"
    UNKNOWN = "unknown"


class RefusedError(CloudError):
    """The cloud answered and refused the request; `refusal` says why."""

    def __init__(self, refusal: Refusal, message: str, status: int, *, secrets: Iterable[str] = ()) -> None:
        message = redact(message, secrets)
        super().__init__(f"{status} {message}")
        self.refusal = refusal
        self.message = message
        self.status = status


# One table: a stable, case-insensitive substring of the cloud's message -> what it means.
_REFUSALS: tuple[tuple[str, Refusal], ...] = (
    ("invalid token", Refusal.INVALID_TOKEN),
    ("wrong pin format", Refusal.PIN),
    ("no datastream", Refusal.PIN),
    ("wrong datastreamid", Refusal.PIN),
    ("doesn't match the datastream", Refusal.VALUE),
    ("does not match the datastream", Refusal.VALUE),
    ("too much data", Refusal.TOO_LARGE),
    ("limit", Refusal.QUOTA),
    ("quota", Refusal.QUOTA),
)


def classify(status: int, message: str) -> Refusal:
    """Map a refused answer to its meaning."""
    if status == 413:
        return Refusal.TOO_LARGE
    lowered = message.lower()
    for needle, refusal in _REFUSALS:
        if needle in lowered:
            return refusal
    return Refusal.UNKNOWN


class RateLimiter:
    """At most `rate` request starts in any sliding window of one second."""

    def __init__(self, rate: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self._size = max(1, int(rate))
        self._window = RATE_WINDOW_S * self._size / rate + RATE_MARGIN_S
        self._starts: collections.deque[float] = collections.deque()
        self._clock = clock
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until one more request fits in the window."""
        async with self._lock:
            while True:
                now = self._clock.monotonic()
                # The same expression as the deadline below: a float rounding cannot make it spin.
                while self._starts and self._starts[0] + self._window <= now:
                    self._starts.popleft()
                if len(self._starts) < self._size:
                    self._starts.append(now)
                    return
                await self._clock.sleep_until(self._starts[0] + self._window)


RedirectHandler = Callable[[str], Awaitable[None]]
AttemptHandler = Callable[[int], Awaitable[None]]


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Return the TLS context: system trust roots, plus the configured extra root."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def open_session(
    ca_file: str | None, *, headers: Mapping[str, str] | None = None, connections: int = HTTP_CONNECTIONS
) -> aiohttp.ClientSession:
    """Return the HTTP session every request to the cloud goes through (use it as a context manager)."""
    connector = aiohttp.TCPConnector(ssl=ssl_context(ca_file), limit=connections, ttl_dns_cache=DNS_CACHE_S)
    session = aiohttp.ClientSession(connector=connector, headers=headers)
    # aiohttp silently resends a GET once after a reset: a live value the cloud may already have taken would
    # arrive twice. Retries are the forwarder's decision, never the library's. aiohttp has no public option
    # (aio-libs/aiohttp#10790); tests/test_hostile.py proves the suppression against a resetting server.
    if not hasattr(session, "_retry_connection"):
        log.warning("aiohttp_retry_suppression_unavailable", aiohttp=aiohttp.__version__)
    session._retry_connection = False
    return session


class BlynkClient:
    """Requests of one device (one token) to the Blynk device HTTPS API.

    `server` is the server to use now (the configured one or a remembered redirect); `configured_server`
    (default: `server`) decides whether a redirect to plain http is allowed. An invalid `server` raises
    ServerError: config and the buffer only ever hand out servers that passed `servers.server_origin`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: str,
        token: str,
        *,
        timeout_s: float,
        limiter: RateLimiter,
        on_redirect: RedirectHandler | None = None,
        on_attempt: AttemptHandler | None = None,
        on_refund: AttemptHandler | None = None,
        configured_server: str | None = None,
    ) -> None:
        self._session = session
        self.server = server.rstrip("/")
        server_origin(self.server)
        self._configured = (configured_server or server).rstrip("/")
        self._token = token
        self._secrets = (token,)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limiter = limiter
        self._on_redirect = on_redirect
        self._on_attempt = on_attempt
        self._on_refund = on_refund
        self.requests = 0

    def live_query(self, values: Sequence[tuple[int, Value]]) -> str:
        """Return the query of a multi-pin GET carrying these values (token left out)."""
        return "&".join(f"{pin_name(pin)}={encode_query_value(query_values(value)[0])}" for pin, value in values)

    async def live(self, values: Sequence[tuple[int, Value]]) -> None:
        """Send the newest values of several pins in one `GET batch/update`."""
        await self._request("GET", "batch/update", self.live_query(values))

    async def update_location(self, pin: int, location: tuple[float, float]) -> None:
        """Send one location value with `GET update?pin=vN&value=LON&value=LAT`."""
        lon, lat = query_values(location)
        query = f"pin={pin_name(pin)}&value={encode_query_value(lon)}&value={encode_query_value(lat)}"
        await self._request("GET", "update", query)

    async def history(self, pin: int, body: bytes, points: int) -> None:
        """Upload timestamped points of one pin with `POST batch/update?pin=vN`."""
        await self._request("POST", "batch/update", f"pin={pin_name(pin)}", body=body, points=points)

    async def is_hardware_connected(self) -> bool:
        """Ask `GET isHardwareConnected` (a cheap request that checks the token; sends no data)."""
        return (await self._request("GET", "isHardwareConnected", "")).strip().lower() == "true"

    async def _request(
        self, method: str, endpoint: str, query: str, *, body: bytes | None = None, points: int = 0
    ) -> str:
        headers = {"Content-Type": "application/json"} if body is not None else None
        server = self.server
        counted = points  # points counted against the budget and not yet imported by the cloud
        secrets = self._secrets
        for _ in range(MAX_REDIRECTS + 1):
            params = f"token={quote(self._token, safe='')}" + (f"&{query}" if query else "")
            if self._on_attempt is not None:
                await self._on_attempt(points)
                points = 0
            await self._limiter.acquire()
            self.requests += 1
            location: str | None = None
            try:
                url = URL(f"{server}{API_PATH}{endpoint}?{params}", encoded=True)
                async with self._session.request(
                    method, url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
                ) as response:
                    status = response.status
                    if status == 200:
                        raw = await response.content.read(ANSWER_BODY_MAX_BYTES)
                        return raw.decode("utf-8", "replace")
                    if 300 <= status < 400:
                        location = response.headers.get("Location")
                    else:
                        text = await _error_text(response)
                        retry_after = _retry_after(response.headers.get("Retry-After"))
            except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as exc:
                await self._refund(counted)  # never reached the cloud: nothing was imported
                raise TransientError(_describe(exc), secrets=secrets) from redacted_cause(exc, secrets)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                # The cloud may have imported the points before the answer was lost: keep them counted.
                raise TransientError(_describe(exc), secrets=secrets) from redacted_cause(exc, secrets)
            if 300 <= status < 400:
                try:
                    target = self._redirect_target(status, location)
                except ServerError as exc:
                    await self._refund(counted)  # a redirect imports nothing
                    raise RedirectError(f"refused a redirect ({status}): {exc}", secrets=secrets) from exc
                await self._follow(target)
                server = self.server
                continue
            await self._refund(counted)  # an error answer imports nothing
            if status == 429 or status >= 500:
                raise TransientError(f"{status} {text}".strip(), retry_after_s=retry_after, secrets=secrets)
            raise RefusedError(classify(status, text), text, status, secrets=secrets)
        await self._refund(counted)
        raise RedirectError(f"more than {MAX_REDIRECTS} redirects")

    def _redirect_target(self, status: int, location: str | None) -> str:
        if status not in FOLLOWED_REDIRECTS:
            raise ServerError(f"{status} is not a redirect that is followed")
        if not location:
            raise ServerError("no Location")
        return redirect_target(location, self._configured)

    async def _refund(self, points: int) -> None:
        if points and self._on_refund is not None:
            await self._on_refund(points)

    async def _follow(self, server: str) -> None:
        if server != self.server:
            self.server = server
            if self._on_redirect is not None:
                await self._on_redirect(server)


async def _error_text(response: aiohttp.ClientResponse) -> str:
    raw = await response.content.read(ERROR_BODY_MAX_BYTES)
    text = raw.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError, RecursionError, TypeError, KeyError, AttributeError):
        decoded = json.loads(raw)
        message = decoded["error"]["message"]
        if isinstance(message, str):
            return message
    return text or (response.reason or "")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds):
        return None
    return min(RETRY_AFTER_MAX_S, max(0.0, seconds))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS: {exc.os_error}" if exc.os_error else f"TLS: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"
