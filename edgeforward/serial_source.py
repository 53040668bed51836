"""Serial port reader: opens a port, frames its bytes into lines, reopens it when the device goes away.

I/O model (a hybrid, chosen over pyserial-asyncio-fast):

- Ports whose pyserial object is a plain fd (POSIX device paths, ptys, ``socket://``) are
  read with ``loop.add_reader`` and one ``os.read`` of up to ``READ_CHUNK_BYTES`` per
  readiness event: zero wakeups while idle, one syscall per chunk under load.
- Any other URL (``loop://``, ``rfc2217://``, ``spy://``...) has no fd that carries the
  payload, so a thread does blocking pyserial reads with a ``THREAD_READ_TIMEOUT_S``
  timeout and hands chunks to the loop with ``call_soon_threadsafe``.

Opening and closing run in short-lived daemon threads because both may block (USB
drivers, the TCP connect of ``socket://``, pyserial's socket ``close()`` which sleeps);
unlike the default executor, the loop's shutdown does not wait for them.
Lines are framed here but never parsed; empty lines are skipped here (not delivered,
not counted), so the handler only sees lines with content.

Line ends (``newline``): ``lf`` (default: ``\n`` ends a line, one ``\r`` before it is dropped,
a lone ``\r`` stays in the line, where the parsers take it as white space), ``crlf`` (only
``\r\n``), ``cr`` (``\r``; one ``\n`` right after it is dropped) or ``any`` (each ``\r`` or ``\n``).

Noise: bytes that never occur in a text line (NUL, the C0 controls but tab, CR and LF, DEL,
and the bytes 0xC0, 0xC1, 0xF5-0xFF that never occur in UTF-8) mark noise, such as the junk an
RS-485 transceiver or a booting MCU emits. Everything up to the last such byte of a line is
dropped and the line counted bad as ``noise``; the rest of the line, if any, is delivered as
the line (and limited by ``max_line_bytes``), so a good line right after junk that ends in
noise (a NUL, 0xFF...) is not lost.

A ``path`` with glob characters (``*?[``) must match exactly one device at each open; none
or several is the same as an absent device (retried with backoff, named in ``last_error``).

``rfc2217://`` to a server whose device has no modem-control lines (a pty, ser2net's
``local`` option) needs ``?ign_set_control`` on the URL: without it pyserial waits for the
answer to SET_CONTROL and gives up after 3 s; ``last_error`` then says so.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import enum
import errno
import glob
import io
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import serial
import structlog
from serial.urlhandler.protocol_socket import Serial as SocketSerial

from .backoff import Backoff
from .errors import EdgeforwardError

RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_MAX_S: Final = 2.0
RECONNECT_FACTOR: Final = 2.0
RECONNECT_JITTER: Final = 0.5  # each delay is drawn from [(1 - jitter) * base, base]
RECONNECT_STABLE_S: Final = 5.0  # an open that lasted this long resets the backoff
DEFAULT_MAX_LINE_BYTES: Final = 4096
READ_CHUNK_BYTES: Final = 65536
THREAD_READ_TIMEOUT_S: Final = 0.2  # also bounds how long a stopping reader thread lingers
THREAD_STOP_TIMEOUT_S: Final = 1.0
URL_WRITE_TIMEOUT_S: Final = 0.5
MAX_PENDING_WRITE_BYTES: Final = 65536
OVERLONG_REASON: Final = "overlong"
NOISE_REASON: Final = "noise"
NEWLINES: Final = ("lf", "crlf", "cr", "any")
GLOB_CHARS: Final = frozenset("*?[")
MAX_MATCHES_SHOWN: Final = 4
# pyserial's rfc2217 client refuses any write_timeout (NotImplementedError at open).
_NO_WRITE_TIMEOUT_SCHEMES: Final = frozenset({"rfc2217"})
_SET_CONTROL_TIMEOUT: Final = "waiting for option 'control'"  # pyserial's rfc2217 message
_SET_CONTROL_HINT: Final = " (if the server's device has no modem-control lines, add ?ign_set_control to the URL)"

# Bytes never found in a UTF-8 text line (tab, LF and CR excepted).
_NOISE_RE: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\xc0\xc1\xf5-\xff]")
_SEPARATORS: Final = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r", "any": b"\n"}


log = structlog.get_logger(__name__)

_T = TypeVar("_T")

# Classes whose fileno() is the payload stream itself; anything else is read in a thread.
_FD_CLASSES: Final[tuple[type, ...]] = (serial.Serial, SocketSerial)


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
    last_error: str | None = None  # kept after recovery: the most recent trouble, not the current one

    def count_ok(self) -> None:
        """Count one accepted line."""
        self.lines_ok += 1

    def count_bad(self, reason: str) -> None:
        """Count one rejected line under its reason."""
        self.lines_bad += 1
        self.bad_reasons[reason] = self.bad_reasons.get(reason, 0) + 1

    def count_ignored(self, reason: str) -> None:
        """Count one line that was deliberately ignored, under its reason."""
        self.lines_ignored += 1
        self.ignored_reasons[reason] = self.ignored_reasons.get(reason, 0) + 1


LineHandler = Callable[[bytes, int, bool], None]
"""(line without \\n or \\r\\n, received epoch ms, first).

``first`` is True only for the line framed first after an open: it began before the
port was opened, so it may be the tail of a line. If that first frame was empty or
overlong, no line of this open carries ``first``.
"""


class SerialSourceError(EdgeforwardError):
    """Root of the errors of this module."""


class PortGone(SerialSourceError):
    """The device stopped answering (end of file on the port)."""


class NoMatch(SerialSourceError):
    """A glob path matched no device, or more than one."""


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


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _close_quietly(port: serial.Serial) -> None:
    try:
        port.close()
    except (OSError, ValueError) as exc:
        log.debug("closing serial port failed", error=str(exc))


def _resolve(fut: asyncio.Future[_T], value: _T) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: asyncio.Future[Any], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _in_daemon_thread(
    fn: Callable[[], _T], name: str, orphan: Callable[[_T], None] | None = None
) -> asyncio.Future[_T]:
    """Run a blocking call in its own daemon thread; orphan(result) runs if the loop is gone by then."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()

    def target() -> None:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - handed over to the awaiting task
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_reject, fut, exc)
            return
        try:
            loop.call_soon_threadsafe(_resolve, fut, value)
        except RuntimeError:  # the loop is closed
            if orphan is not None:
                orphan(value)

    threading.Thread(target=target, name=name, daemon=True).start()
    return fut


def _close_opened(opened: tuple[serial.Serial, str | None]) -> None:
    _close_quietly(opened[0])


def _close_late_open(fut: asyncio.Future[tuple[serial.Serial, str | None]]) -> None:
    """Close a port whose opening finished after its opener was cancelled."""
    if fut.cancelled() or fut.exception() is not None:
        return
    threading.Thread(target=_close_opened, args=(fut.result(),), daemon=True).start()


def _keep_input() -> None:
    """Stands in for pyserial's input flush while a port is opened."""


def _is_url(path: str) -> bool:
    return "://" in path


def _match_one(path: str) -> str:
    """Return the one device a glob path matches (a plain path as it is); raise NoMatch otherwise."""
    if GLOB_CHARS.isdisjoint(path):
        return path
    matches = sorted(glob.glob(path))
    if not matches:
        raise NoMatch(f"no device matches {path}")
    if len(matches) > 1:
        shown = ", ".join(matches[:MAX_MATCHES_SHOWN]) + (", ..." if len(matches) > MAX_MATCHES_SHOWN else "")
        raise NoMatch(f"{len(matches)} devices match {path} ({shown}); the pattern must match one")
    return matches[0]


def describe_error(exc: BaseException) -> str:
    """A port failure in one plain sentence: pyserial's "[Errno 2] ...: [Errno 2] ..." with the errno told once."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, serial.SerialException) and isinstance(cause, OSError) and cause.strerror and exc.strerror:
        text = exc.strerror.replace(str(cause), cause.strerror)
        if cause.errno == errno.EAGAIN:
            text += " (another program has the port open)"
        elif cause.errno == errno.EACCES:
            text += " (a manual run needs the dialout group: sudo usermod -aG dialout $USER, then log in again)"
        return text
    return str(exc) or type(exc).__name__


class _Link(abc.ABC):
    """One open port: feeds its chunks to a framer until the device goes away."""

    def __init__(self, port: serial.Serial, framer: LineFramer) -> None:
        self.port = port
        self._framer = framer
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[BaseException] = self._loop.create_future()
        self.device: str | None = None  # what the configured path resolved to at open

    @abc.abstractmethod
    def start(self) -> None:
        """Begin reading."""

    @abc.abstractmethod
    def write(self, data: bytes) -> bool:
        """Write without blocking the loop for long; False if the data was not taken."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop reading and close the port."""

    def _fail(self, exc: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    async def _close_port(self) -> None:
        # Shielded: a second cancellation must not leave the port open.
        port = self.port
        await asyncio.shield(_in_daemon_thread(lambda: _close_quietly(port), name="serial-close"))


class _FdLink(_Link):
    """A port read through loop.add_reader on its file descriptor."""

    def __init__(self, port: serial.Serial, framer: LineFramer, fd: int) -> None:
        super().__init__(port, framer)
        self._fd = fd
        self._reading = False
        self._out = bytearray()

    def start(self) -> None:
        """Register the fd with the loop."""
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        # Exactly one read per readiness event: with VMIN=0 an empty read of a tty that
        # select reported readable means hang-up, while a second read would be ambiguous.
        try:
            data = os.read(self._fd, READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._stop_io()
            self._fail(exc)
            return
        if not data:
            self._stop_io()
            self._fail(PortGone("end of file: device disconnected"))
            return
        self._framer.feed(data, _now_ms())

    def write(self, data: bytes) -> bool:
        """Write to the fd; a short write is finished when the fd is writable again."""
        if not self._reading:
            return False
        if self._out:
            if len(self._out) + len(data) > MAX_PENDING_WRITE_BYTES:
                return False
            self._out += data
            return True
        try:
            written = os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as exc:
            log.debug("serial write failed", error=str(exc))
            return False
        if written < len(data):
            self._out += data[written:]
            self._loop.add_writer(self._fd, self._on_writable)
        return True

    def _on_writable(self) -> None:
        try:
            written = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("serial write failed", error=str(exc))
            written = len(self._out)
        del self._out[:written]
        if not self._out:
            self._loop.remove_writer(self._fd)

    def _stop_io(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            self._out.clear()

    async def close(self) -> None:
        """Unregister the fd, then close the port."""
        self._stop_io()
        self._fail(SerialSourceError("closed"))
        await self._close_port()


class _ThreadLink(_Link):
    """A port without a usable fd: a thread does blocking reads with a timeout, another the blocking writes."""

    def __init__(self, port: serial.Serial, framer: LineFramer, name: str) -> None:
        super().__init__(port, framer)
        self._stop = threading.Event()
        self._finished: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._read_loop, name=name, daemon=True)
        # pyserial's rfc2217 write is a blocking sendall (up to its 5 s socket timeout): never on the loop.
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self._out_ready = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name=f"{name} writer", daemon=True)

    def start(self) -> None:
        """Start the reader and writer threads."""
        self._thread.start()
        self._writer.start()

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(callback, *args)

    def _read_loop(self) -> None:
        port = self.port
        try:
            while not self._stop.is_set():
                data = port.read(max(1, port.in_waiting))
                if data:
                    self._post(self._on_data, data, _now_ms())
        except Exception as exc:  # noqa: BLE001 - any failure of a URL handler means the port is gone
            self._post(self._fail, exc)
        finally:
            self._post(self._set_finished)

    def _on_data(self, data: bytes, received_ms: int) -> None:
        if not self._stop.is_set():
            self._framer.feed(data, received_ms)

    def _set_finished(self) -> None:
        if not self._finished.done():
            self._finished.set_result(None)
        self._fail(PortGone("reader stopped"))

    def write(self, data: bytes) -> bool:
        """Hand data to the link's writer thread; False if the link is closing or too much is pending."""
        if self._stop.is_set() or self.lost.done():
            return False
        with self._out_ready:
            if self._out_bytes + len(data) > MAX_PENDING_WRITE_BYTES:
                return False
            self._out.append(data)
            self._out_bytes += len(data)
            self._out_ready.notify()
        return True

    def _write_loop(self) -> None:
        port = self.port
        while True:
            with self._out_ready:
                while not self._out and not self._stop.is_set():
                    self._out_ready.wait()
                if self._stop.is_set():
                    return
                data = self._out.popleft()
            try:
                port.write(data)
            except Exception as exc:  # noqa: BLE001 - a URL handler's failure: the reader notices the port is gone
                log.debug("serial write failed", error=str(exc))
            finally:
                with self._out_ready:
                    self._out_bytes -= len(data)

    async def close(self) -> None:
        """Stop the reader thread (waiting briefly) and the writer, then close the port."""
        self._stop.set()
        with self._out_ready:
            self._out_ready.notify()  # the writer drops what is still pending and ends
        cancel_read = getattr(self.port, "cancel_read", None)
        if cancel_read is not None:
            with contextlib.suppress(OSError, ValueError, NotImplementedError):
                cancel_read()
        if self._thread.is_alive():
            await asyncio.wait([self._finished], timeout=THREAD_STOP_TIMEOUT_S)
        self._fail(SerialSourceError("closed"))
        await self._close_port()


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
    ) -> None:
        self.path = path
        self.baud = baud
        self.stats = stats if stats is not None else PortStats(path=path)
        self.open_attempts = 0  # every try to open, successful or not
        self._framer = LineFramer(
            on_line, self._count_overlong, max_line_bytes, newline=newline, on_noise=self._count_noise
        )
        self._link: _Link | None = None
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
                    link = await self._open_link()
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
            self.stats.state = PortState.ABSENT

    async def _open_link(self) -> _Link:
        opening = _in_daemon_thread(self._open_port, name=f"serial-open {self.path}", orphan=_close_opened)
        try:
            port, device = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_late_open)
            raise
        fd = self._payload_fd(port)
        link: _Link
        if fd is None:
            link = _ThreadLink(port, self._framer, name=f"serial-read {self.path}")
        else:
            link = _FdLink(port, self._framer, fd)
        link.device = device
        return link

    def _open_port(self) -> tuple[serial.Serial, str | None]:
        """Open the port (blocking); also return the device a path resolved to, for the log."""
        # The path is opened anew each time, so a /dev/serial/by-id/ link or a glob is resolved again.
        path = self.path if _is_url(self.path) else _match_one(self.path)
        device = None if _is_url(path) else os.path.realpath(path)
        settings: dict[str, Any] = {"baudrate": self.baud, "timeout": THREAD_READ_TIMEOUT_S}
        if path.partition("://")[0].lower() not in _NO_WRITE_TIMEOUT_SCHEMES:
            settings["write_timeout"] = URL_WRITE_TIMEOUT_S
        try:
            port = serial.serial_for_url(path, exclusive=True, do_not_open=True, **settings)
        except TypeError:
            # A URL handler without the exclusive setting: open it shared.
            port = serial.serial_for_url(path, do_not_open=True, **settings)
        if device is not None:
            # pyserial flushes the input on open: lines the device wrote while the port was closed (a daemon
            # restart) would be lost. Keep them; a partial first line is handled by the parser's caller.
            port.__dict__["_reset_input_buffer"] = _keep_input
        try:
            port.open()
        finally:
            port.__dict__.pop("_reset_input_buffer", None)
        return port, device

    @staticmethod
    def _payload_fd(port: serial.Serial) -> int | None:
        if type(port) not in _FD_CLASSES:
            return None
        try:
            return port.fileno()
        except (OSError, io.UnsupportedOperation):
            return None

    async def _serve(self, link: _Link) -> BaseException:
        """Run one open link until the device goes away; always closes it."""
        self._framer.reset()
        try:
            try:
                link.start()
            except (OSError, ValueError, RuntimeError) as exc:
                return exc
            self._link = link
            self.stats.state = PortState.OPEN
            self._log.info(
                "serial port open",
                device=link.device,
                reconnects=self.stats.reconnects,
                recovered=self._warned,
            )
            return await link.lost
        finally:
            self._link = None
            self.stats.state = PortState.ABSENT
            await link.close()

    def _note_trouble(self, event: str, exc: BaseException) -> None:
        self.stats.state = PortState.ABSENT
        error = describe_error(exc)
        if _SET_CONTROL_TIMEOUT in error:
            error += _SET_CONTROL_HINT
        self.stats.last_error = error
        if self._warned:
            self._log.debug(event, error=self.stats.last_error)
        else:
            self._warned = True
            self._log.warning(event, error=self.stats.last_error)
