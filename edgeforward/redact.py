"""The one redaction of secrets: device tokens, `token=` query values and URL credentials, in any text.

Every text that leaves the process or is stored (exception messages, device reasons, state rows, status
output, metric labels, log lines, CLI output) passes through `redact`. Known tokens are registered once
at start (`add_secrets`); a caller that holds a token may also pass it explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

REDACTED = "***"
MIN_SECRET_CHARS = 4  # shorter "secrets" would blank out ordinary words

# token=VALUE in a query string (also percent-encoded `token%3D`), up to the next separator.
_TOKEN_QUERY = re.compile(r"(token(?:=|%3D))[^&\s\"'#<>]+", re.IGNORECASE)
# scheme://USERINFO@ : everything between the scheme and the last @ before the host.
_URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/\s?#\"'<>]*@", re.IGNORECASE)

_secrets: tuple[str, ...] = ()


def _forms(secret: str) -> set[str]:
    """The ways a secret can appear in a text: as is, percent-encoded (a URL) or JSON-escaped."""
    return {secret, quote(secret, safe=""), quote(secret), secret.replace("\\", "\\\\").replace('"', '\\"')}


def _longest_first(secrets: Iterable[str]) -> tuple[str, ...]:
    forms = {form for secret in secrets if len(secret) >= MIN_SECRET_CHARS for form in _forms(secret)}
    return tuple(sorted(forms, key=len, reverse=True))


def add_secrets(secrets: Iterable[str]) -> None:
    """Register secrets (device tokens) that `redact` removes from every text, process-wide."""
    global _secrets  # noqa: PLW0603 (one process-wide set of secrets, grown at start)
    _secrets = _longest_first((*_secrets, *secrets))


def clear_secrets() -> None:
    """Forget every registered secret (tests)."""
    global _secrets  # noqa: PLW0603
    _secrets = ()


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove every registered secret, every given one, every `token=` query value and URL credentials."""
    extra = _longest_first(secrets) if secrets else ()
    for secret in (*extra, *_secrets):
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _TOKEN_QUERY.sub(r"\1" + REDACTED, text)
    return _URL_USERINFO.sub(r"\1" + REDACTED + "@", text)


def redact_value(value: Any, secrets: Iterable[str] = ()) -> Any:
    """Redact every text inside a JSON-like value (dicts, lists, tuples; keys too); other scalars as they are."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact_value(key, secrets): redact_value(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(item, secrets) for item in value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}", secrets)
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value), secrets)
