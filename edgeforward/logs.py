"""structlog setup: JSON lines for journald, a console view on a terminal, tokens redacted everywhere."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from .redact import REDACTED, add_secrets, redact, redact_value

JOURNAL_STREAM_ENV = "JOURNAL_STREAM"  # "DEVICE:INODE" of the journal's stream socket (systemd.exec(5))
# sd-daemon(3) priorities by level: journald takes a leading "<N>" as the line's priority and strips it.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Return whether `stream` is the journal's stream socket that systemd connected this service's output to."""
    expected = environ.get(JOURNAL_STREAM_ENV)
    if not expected:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or no file behind it (io.StringIO)
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == expected


def journal_priority(levelno: int) -> int:
    """Return the syslog priority of a logging level."""
    return next((priority for level, priority in _PRIORITIES if levelno >= level), DEBUG_PRIORITY)


class _JournalFormatter(structlog.stdlib.ProcessorFormatter):
    """The same line, led by its priority for journald."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{journal_priority(record.levelno)}>{super().format(record)}"


__all__ = [
    "REDACTED",
    "Throttle",
    "configure_logging",
    "journal_priority",
    "redact",
    "redact_processor",
    "writes_to_journal",
]


def redact_processor(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: redact secrets in every value of the event."""
    for key, value in list(event_dict.items()):
        if not key.startswith("_"):
            event_dict[key] = redact_value(value)
    return event_dict


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging through one redacting renderer."""
    add_secrets(secrets)
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback)
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamper,
    ]
    handler = logging.StreamHandler(out)
    formatter = _JournalFormatter if writes_to_journal(out) else structlog.stdlib.ProcessorFormatter
    handler.setFormatter(
        formatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_processor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )


class Throttle:
    """Allow `per_minute` events a minute, and the first event of each kind always; count what is held back."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._window_start = 0.0
        self._allowed = 0
        self._kinds: set[str] = set()
        self.suppressed = 0

    def allow(self, now: float | None = None, *, kind: str | None = None) -> bool:
        """Return True if this event may be logged: the first of its `kind`, or within the minute's allowance."""
        if kind is not None and kind not in self._kinds:
            # The first of a kind says what is wrong; a burst of another kind must not hide it.
            self._kinds.add(kind)
            return True
        now = time.monotonic() if now is None else now
        if now - self._window_start >= 60.0:
            self._window_start = now
            self._allowed = 0
        if self._allowed < self._per_minute:
            self._allowed += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """Return and reset the count of held-back events."""
        count, self.suppressed = self.suppressed, 0
        return count
