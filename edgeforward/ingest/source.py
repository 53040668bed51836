"""The reopen loop: one port read line by line, reopened with backoff whenever the device goes away."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Final

import structlog

from ..backoff import Backoff
from .framing import DEFAULT_MAX_LINE_BYTES, NOISE_REASON, OVERLONG_REASON, LineFramer, LineHandler
from .links import Link, explain, now_ms, open_link

RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_MAX_S: Final = 2.0
RECONNECT_FACTOR: Final = 2.0
RECONNECT_JITTER: Final = 0.5  # each delay is drawn from [(1 - jitter) * base, base]
RECONNECT_STABLE_S: Final = 5.0  # an open that lasted this long resets the backoff


class PortState(enum.StrEnum):
    """Whether a port is currently open."""

    OPEN = "open"
    ABSENT = "absent"


@dataclass
class PortStats:
    """Counters of one port, read by status and metrics."""

    path: str
    state: PortState = PortState.ABSENT
    lines_ok: int = 0
    lines_bad: int = 0
    lines_ignored: int = 0
    bad_reasons: dict[str, int] = field(default_factory=dict)
    ignored_reasons: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0  # successful re-opens after the first open
    resent: int = 0  # readings the MCU sent again that were already committed: acknowledged again, not stored
    last_error: str | None = None  # kept after recovery: the most recent trouble, not the current one
    opened_ms: int | None = None  # wall-clock ms the current open started reading (None: never opened)
    waiting_at_open: bool = False  # bytes were already waiting then (the first may be the tail of a line)
    # Set when `state` changes (status stores a change at once, counters only every few seconds).
    changed: asyncio.Event = field(default_factory=asyncio.Event, compare=False, repr=False)

    def set_state(self, state: PortState) -> None:
        """Record whether the port is open; a change sets `changed`."""
        if state is not self.state:
            self.state = state
            self.changed.set()

    def count_ok(self) -> None:
        """Count one accepted line."""
        self.lines_ok += 1

    def count_bad(self, reason: str) -> None:
        """Count one rejected line under its reason."""
        self.lines_bad += 1
        self.bad_reasons[reason] = self.bad_reasons.get(reason, 0) + 1

    def count_resent(self) -> None:
        """Count one copy of a reading that was already committed."""
        self.resent += 1

    def count_ignored(self, reason: str) -> None:
        """Count one line that was deliberately ignored, under its reason."""
        self.lines_ignored += 1
        self.ignored_reasons[reason] = self.ignored_reasons.get(reason, 0) + 1


class SerialSource:
    """Reads lines from one serial port and reopens it whenever the device goes away."""

    def __init__(
        self,
        path: str,
        baud: int,
        on_line: LineHandler,
        *,
        stats: PortStats | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        newline: str = "lf",
        reset_on_open: bool = True,
    ) -> None:
        self.path = path
        self.baud = baud
        self.reset_on_open = reset_on_open
        self.stats = stats if stats is not None else PortStats(path=path)
        self.open_attempts = 0  # every try to open, successful or not
        self._framer = LineFramer(
            on_line, self._count_overlong, max_line_bytes, newline=newline, on_noise=self._count_noise
        )
        self._link: Link | None = None
        self._log = structlog.get_logger(__name__).bind(port=path)
        self._warned = False  # a WARNING was logged for the current trouble

    def _count_overlong(self) -> None:
        self.stats.count_bad(OVERLONG_REASON)

    def _count_noise(self) -> None:
        self.stats.count_bad(NOISE_REASON)

    def write(self, data: bytes) -> bool:
        """Best-effort write to the open port; False if the port is absent or the data was refused."""
        if self._link is None:
            return False
        return self._link.write(data)

    async def run(self) -> None:
        """Read until cancelled; device trouble is logged and followed by a reopen, never raised."""
        backoff = Backoff(RECONNECT_INITIAL_S, RECONNECT_MAX_S, RECONNECT_FACTOR, RECONNECT_JITTER)
        opened_before = False
        try:
            while True:
                self.open_attempts += 1
                try:
                    link = await open_link(self.path, self.baud, self._framer, reset_on_open=self.reset_on_open)
                except Exception as exc:  # noqa: BLE001 - whatever a URL handler raises, the port is retried
                    # Mostly SerialException (an OSError), ValueError for bad URLs and settings,
                    # NoMatch; letting anything escape would stop the daemon's whole task group.
                    self._note_trouble("serial port absent", exc)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                if opened_before:
                    self.stats.reconnects += 1
                opened_before = True
                opened_at = time.monotonic()
                reason = await self._serve(link)
                if time.monotonic() - opened_at >= RECONNECT_STABLE_S:
                    backoff.reset()
                    self._warned = False
                self._note_trouble("serial port lost", reason)
                await asyncio.sleep(backoff.next_delay())
        finally:
            self.stats.set_state(PortState.ABSENT)

    async def _serve(self, link: Link) -> BaseException:
        """Run one open link until the device goes away; always closes it."""
        self._framer.reset()
        self.stats.opened_ms = now_ms()
        self.stats.waiting_at_open = link.waiting()
        try:
            try:
                link.start()
            except (OSError, ValueError, RuntimeError) as exc:
                return exc
            self._link = link
            self.stats.set_state(PortState.OPEN)
            self._log.info(
                "serial port open",
                device=link.device,
                reconnects=self.stats.reconnects,
                recovered=self._warned,
            )
            return await link.lost
        finally:
            self._link = None
            self.stats.set_state(PortState.ABSENT)
            await link.close()

    def _note_trouble(self, event: str, exc: BaseException) -> None:
        self.stats.set_state(PortState.ABSENT)
        self.stats.last_error = explain(exc)
        if self._warned:
            self._log.debug(event, error=self.stats.last_error)
        else:
            self._warned = True
            self._log.warning(event, error=self.stats.last_error)
