"""Framing: a port's byte stream cut into lines, with noise and overlong lines cut off and counted.

Line ends (``newline``): ``lf`` (default: ``\\n`` ends a line, one ``\\r`` before it is dropped,
a lone ``\\r`` stays in the line, where the parsers take it as white space), ``crlf`` (only
``\\r\\n``), ``cr`` (``\\r``; one ``\\n`` right after it is dropped) or ``any`` (each ``\\r`` or ``\\n``).

Noise: bytes that never occur in a text line (NUL, the C0 controls but tab, CR and LF, DEL,
and the bytes 0xC0, 0xC1, 0xF5-0xFF that never occur in UTF-8) mark noise, such as the junk an
RS-485 transceiver or a booting MCU emits. Everything up to the last such byte of a line is
dropped and the line counted bad as ``noise``; the rest of the line, if any, is delivered as
the line (and limited by ``max_line_bytes``), so a good line right after junk that ends in
noise (a NUL, 0xFF...) is not lost. Empty lines are skipped (not delivered, not counted).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import structlog

DEFAULT_MAX_LINE_BYTES: Final = 4096
OVERLONG_REASON: Final = "overlong"
NOISE_REASON: Final = "noise"
NEWLINES: Final = ("lf", "crlf", "cr", "any")

# Bytes never found in a UTF-8 text line (tab, LF and CR excepted).
_NOISE_RE: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\xc0\xc1\xf5-\xff]")
_SEPARATORS: Final = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r", "any": b"\n"}

log = structlog.get_logger(__name__)

LineHandler = Callable[[bytes, int, bool], None]
"""(line without \\n or \\r\\n, received epoch ms, first).

``first`` is True only for the line framed first after an open: it began before the
port was opened, so it may be the tail of a line. If that first frame was empty or
overlong, no line of this open carries ``first``.
"""


class LineFramer:
    """Splits a byte stream into lines and hands each to a handler.

    Lines end as `newline` says (see the module docstring) and empty lines are skipped.
    Noise is cut off the front of a line and reported through `on_noise` once per line;
    a line that is still longer than ``max_line_bytes`` (not counting its line end) is
    dropped and reported through ``on_overlong`` once. Only the bytes after the last noise
    byte are kept, at most ``max_line_bytes`` + 1 of them, so memory stays bounded and a
    good line right after a burst of junk that ended in noise is still delivered.
    """

    def __init__(
        self,
        on_line: LineHandler,
        on_overlong: Callable[[], None],
        max_line_bytes: int,
        *,
        newline: str = "lf",
        on_noise: Callable[[], None] | None = None,
    ) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        if newline not in _SEPARATORS:
            raise ValueError(f"newline must be one of {', '.join(NEWLINES)}, got {newline!r}")
        self._on_line = on_line
        self._on_overlong = on_overlong
        self._on_noise = on_noise if on_noise is not None else _ignore
        self._max_line_bytes = max_line_bytes
        self._newline = newline
        self._sep = _SEPARATORS[newline]
        # The unfinished line: its kept bytes, whether noise was cut from it, whether it
        # outgrew the bound since its last noise byte (then only a possible \r is kept).
        self._partial = b""
        self._noisy = False
        self._too_long = False
        self._first = True

    def reset(self) -> None:
        """Forget any partial line; the next framed line is the first of a new stream."""
        self._partial = b""
        self._noisy = False
        self._too_long = False
        self._first = True

    def feed(self, data: bytes, received_ms: int) -> None:
        """Frame one chunk read at received_ms and deliver its complete lines."""
        if self._newline == "any":
            data = data.replace(b"\r", b"\n")
        if self._partial:
            data = self._partial + data
        noisy = _NOISE_RE.search(data) is not None
        lines = data.split(self._sep)
        tail = lines.pop()
        if lines:
            self._deliver(lines, received_ms, noisy)
        if noisy:
            cut = _noise_end(tail)
            if cut:
                tail = tail[cut:]
                self._noisy = True
                self._too_long = False
        # +1: an unterminated tail may still end with the \r of a \r\n.
        if len(tail) > self._max_line_bytes + 1:
            self._too_long = True
            tail = tail[-1:] if self._newline == "crlf" else b""
        self._partial = tail

    def _deliver(self, lines: list[bytes], received_ms: int, noisy: bool) -> None:
        first = self._first
        self._first = False
        line_noisy, too_long = self._noisy, self._too_long
        self._noisy = self._too_long = False
        limit = self._max_line_bytes
        on_line = self._on_line
        newline = self._newline
        for raw in lines:
            line = raw
            if noisy:
                cut = _noise_end(line)
                if cut:
                    line = line[cut:]
                    line_noisy = True
                    too_long = False
            if newline == "lf":
                if line.endswith(b"\r"):
                    line = line[:-1]
            elif newline == "cr" and not line_noisy and not too_long and line.startswith(b"\n"):
                # The \n of a \r\n sent to a cr port starts the next line.
                line = line[1:]
            if line_noisy:
                self._on_noise()
            if too_long or len(line) > limit:
                self._on_overlong()
            elif line and not (line_noisy and line.isspace()):
                try:
                    on_line(line, received_ms, first)
                except Exception:
                    # A bug in one line's handling must not stop the port or lose the other lines.
                    log.exception("line handler failed", line=line[:80])
            first = line_noisy = too_long = False


def _noise_end(data: bytes) -> int:
    """Return the index just after the last noise byte of data (0 if it has none)."""
    # Searching the reversed bytes finds the last one in linear time.
    found = _NOISE_RE.search(data[::-1])
    return 0 if found is None else len(data) - found.start()


def _ignore() -> None:
    """Do nothing (the default noise callback)."""
