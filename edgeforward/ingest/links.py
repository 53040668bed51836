"""Port links: opening a port (a device path, a glob or a pyserial URL) and reading and writing it while it is open.

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

A ``path`` with glob characters (``*?[``) must match exactly one device at each open; none
or several is the same as an absent device (retried with backoff, named in ``last_error``).

``rfc2217://`` to a server whose device has no modem-control lines (a pty, ser2net's
``local`` option) needs ``?ign_set_control`` on the URL: without it pyserial waits for the
answer to SET_CONTROL and gives up after 3 s; ``explain`` then says so.

``reset_on_open=False`` (device paths only) clears HUPCL on the tty, so that closing the port (a daemon stop, a
kill, a reopen) leaves DTR and RTS asserted and the next open does not pulse them: boards that reset on that pulse
(Arduino Uno, Nano, Mega) keep running, and keep the readings they hold.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import errno
import glob
import io
import os
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import serial
import structlog
from serial.urlhandler.protocol_socket import Serial as SocketSerial

from ..errors import EdgeforwardError
from .framing import LineFramer

READ_CHUNK_BYTES: Final = 65536
THREAD_READ_TIMEOUT_S: Final = 0.2  # also bounds how long a stopping reader thread lingers
THREAD_STOP_TIMEOUT_S: Final = 1.0
URL_WRITE_TIMEOUT_S: Final = 0.5
MAX_PENDING_WRITE_BYTES: Final = 65536
GLOB_CHARS: Final = frozenset("*?[")
MAX_MATCHES_SHOWN: Final = 4
# pyserial's rfc2217 client refuses any write_timeout (NotImplementedError at open).
_NO_WRITE_TIMEOUT_SCHEMES: Final = frozenset({"rfc2217"})
SET_CONTROL_TIMEOUT: Final = "waiting for option 'control'"  # pyserial's rfc2217 message
SET_CONTROL_HINT: Final = " (if the server's device has no modem-control lines, add ?ign_set_control to the URL)"

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

# Classes whose fileno() is the payload stream itself; anything else is read in a thread.
_FD_CLASSES: Final[tuple[type, ...]] = (serial.Serial, SocketSerial)


class SerialSourceError(EdgeforwardError):
    """Root of the errors of this module."""


class PortGone(SerialSourceError):
    """The device stopped answering (end of file on the port)."""


class NoMatch(SerialSourceError):
    """A glob path matched no device, or more than one."""


def now_ms() -> int:
    """The wall-clock time a chunk read from a port is stamped with (ms)."""
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


class Link(abc.ABC):
    """One open port: feeds its chunks to a framer until the device goes away."""

    def __init__(self, port: serial.Serial, framer: LineFramer) -> None:
        self.port = port
        self._framer = framer
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[BaseException] = self._loop.create_future()
        self.device: str | None = None  # what the configured path resolved to at open

    def waiting(self) -> bool:
        """Whether bytes are already waiting to be read, before `start` (never blocks; False if it cannot say)."""
        try:
            return bool(self.port.in_waiting)
        except Exception:  # noqa: BLE001 - a URL handler may raise anything; not knowing is the answer then
            return False

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


class FdLink(Link):
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
        self._framer.feed(data, now_ms())

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


class ThreadLink(Link):
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
                    self._post(self._on_data, data, now_ms())
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


def explain(exc: BaseException) -> str:
    """Return the text of a port's trouble for `last_error`, with a hint where pyserial's own is cryptic."""
    error = _one_sentence(exc)
    if SET_CONTROL_TIMEOUT in error:
        error += SET_CONTROL_HINT
    return error


def _one_sentence(exc: BaseException) -> str:
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


async def open_link(path: str, baud: int, framer: LineFramer, *, reset_on_open: bool = True) -> Link:
    """Open a port in a daemon thread and return its (not yet started) link; nothing is left open on failure."""
    opening = _in_daemon_thread(
        lambda: open_port(path, baud, reset_on_open=reset_on_open), name=f"serial-open {path}", orphan=_close_opened
    )
    try:
        port, device = await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_late_open)
        raise
    fd = _payload_fd(port)
    link: Link = ThreadLink(port, framer, name=f"serial-read {path}") if fd is None else FdLink(port, framer, fd)
    link.device = device
    return link


def open_port(path: str, baud: int, *, reset_on_open: bool = True) -> tuple[serial.Serial, str | None]:
    """Open the port (blocking); also return the device a path resolved to, for the log."""
    # The path is opened anew each time, so a /dev/serial/by-id/ link or a glob is resolved again.
    resolved = path if _is_url(path) else _match_one(path)
    device = None if _is_url(resolved) else os.path.realpath(resolved)
    settings: dict[str, Any] = {"baudrate": baud, "timeout": THREAD_READ_TIMEOUT_S}
    if resolved.partition("://")[0].lower() not in _NO_WRITE_TIMEOUT_SCHEMES:
        settings["write_timeout"] = URL_WRITE_TIMEOUT_S
    try:
        port = serial.serial_for_url(resolved, exclusive=True, do_not_open=True, **settings)
    except TypeError:
        # A URL handler without the exclusive setting: open it shared.
        port = serial.serial_for_url(resolved, do_not_open=True, **settings)
    if device is not None:
        # pyserial flushes the input on open: lines the device wrote while the port was closed (a daemon
        # restart) would be lost. Keep them; a partial first line is handled by the parser's caller.
        port.__dict__["_reset_input_buffer"] = _keep_input
    try:
        port.open()
    finally:
        port.__dict__.pop("_reset_input_buffer", None)
    if not reset_on_open and device is not None:
        try:
            keep_lines_on_close(port.fileno())
        except (OSError, termios.error):
            _close_quietly(port)
            raise
    return port, device


def keep_lines_on_close(fd: int) -> None:
    """Clear HUPCL, so that closing the tty leaves DTR and RTS asserted and the next open does not pulse them."""
    attributes = termios.tcgetattr(fd)
    if attributes[2] & termios.HUPCL:
        attributes[2] &= ~termios.HUPCL
        termios.tcsetattr(fd, termios.TCSANOW, attributes)


def _payload_fd(port: serial.Serial) -> int | None:
    if type(port) not in _FD_CLASSES:
        return None
    try:
        return port.fileno()
    except (OSError, io.UnsupportedOperation):
        return None
