"""What a cloud server may be: the one rule for the configured server, a redirect's target and a remembered one."""

from __future__ import annotations

import ipaddress
import re
from typing import Final
from urllib.parse import urlsplit

from .errors import EdgeforwardError

SCHEMES: Final = ("http", "https")
MAX_HOST_CHARS: Final = 253
_LABEL: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class ServerError(EdgeforwardError, ValueError):
    """Not a usable server; the message says why and never repeats the URL (it may carry a token)."""


def server_origin(url: str, *, allow_path: bool = False) -> str:
    """Return the origin `scheme://host[:port]` of an absolute http(s) URL, or raise ServerError saying why not.

    Without allow_path the URL must be the origin itself (a configured or remembered server); with it, a
    path and query may follow (a redirect's Location) and are dropped.
    """
    if not url or any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise ServerError("empty, or contains white space or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ServerError(f"not a valid URL ({_reason(exc)})") from None
    if parts.scheme.lower() not in SCHEMES or not parts.netloc:
        raise ServerError("not an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise ServerError("carries user credentials")
    host = _host(parts.hostname or "", bracketed=parts.netloc.startswith("["))
    if port == 0:
        raise ServerError("port 0 is not a port to connect to")
    if not allow_path and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ServerError("give scheme://host[:port] only")
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None else "")


def redirect_target(location: str, configured: str) -> str:
    """Return the server a redirect's Location points to, or raise ServerError saying why it is not followed."""
    return _no_downgrade(server_origin(location, allow_path=True), configured)


def remembered_target(server: str, configured: str | None = None) -> str:
    """Return a remembered server still fit to use (checked against the configured one if given), or raise."""
    origin = server_origin(server)
    return origin if configured is None else _no_downgrade(origin, configured)


def _no_downgrade(target: str, configured: str) -> str:
    # https is never given up for plain http unless the configured server is plain http itself.
    if target.startswith("http://") and not configured.lower().startswith("http://"):
        raise ServerError("would downgrade https to plain http")
    return target


def _host(host: str, *, bracketed: bool) -> str:
    if not host:
        raise ServerError("has no host")
    if bracketed:
        try:
            return f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise ServerError("not a valid IPv6 address") from None
    labels = host.rstrip(".").split(".")
    if len(host) > MAX_HOST_CHARS or not all(_LABEL.fullmatch(label) for label in labels):
        raise ServerError("not a valid host name")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ServerError("not a valid IPv4 address") from None
    return host


def _reason(exc: ValueError) -> str:
    # Never urlsplit's own text: "Port could not be cast to integer value as '...'" repeats part of the URL.
    text = str(exc)
    if "Port" in text:
        return "the port is not a number in 1-65535"
    if "IPv6" in text:
        return "not a valid IPv6 address"
    return "malformed"
