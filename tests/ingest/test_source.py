"""The reopen loop against real ptys, real sockets and pyserial's loop:// URL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import threading
import time
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import serial
import structlog

from edgeforward.backoff import Backoff
from edgeforward.ingest.framing import LineFramer
from edgeforward.ingest.source import RECONNECT_INITIAL_S, RECONNECT_MAX_S, PortState, PortStats, SerialSource

from .test_framing import (
    CANCEL_DEADLINE_S,
    IDLE_CPU_BOUND_S,
    IDLE_WINDOW_S,
    MAX_ATTEMPTS_PER_IDLE_WINDOW,
    NOISE,
    POLL_S,
    WAIT_TIMEOUT_S,
    Received,
)


async def wait_for(cond: Callable[[], bool], within: float = WAIT_TIMEOUT_S) -> None:
    """Poll cond until it holds, failing after within seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(POLL_S)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_until(fd: int, size: int, timeout: float) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            got += os.read(fd, size - len(got))
    return got


class Pty:
    """A pseudo-terminal standing in for a USB serial device; the source opens the slave."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.name = os.ttyname(self.slave)
        self._fds = {self.master, self.slave}

    async def send(self, data: bytes) -> None:
        """Write to the device side (in a thread: a full pty buffer must not block the loop)."""
        await asyncio.to_thread(_write_all, self.master, data)

    async def receive(self, size: int) -> bytes:
        """Read what the source wrote to the port."""
        return await asyncio.to_thread(_read_until, self.master, size, WAIT_TIMEOUT_S)

    def unplug(self) -> None:
        """Close the master: the slave hangs up, as when a USB device is pulled."""
        self._close(self.master)

    def _close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            os.close(fd)

    def close(self) -> None:
        """Close every fd still open."""
        for fd in list(self._fds):
            self._close(fd)


def fds_open_on(path: str) -> int:
    """Count this process's fds that refer to path."""
    count = 0
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{entry}") == path:
                count += 1
    return count


@pytest.fixture
def pty() -> Iterator[Pty]:
    device = Pty()
    yield device
    device.close()


@contextlib.asynccontextmanager
async def running(source: SerialSource) -> AsyncIterator[asyncio.Task[None]]:
    """Run source.run() as a task; cancel it and check it ended by cancellation on exit."""
    task = asyncio.create_task(source.run(), name=f"serial {source.path}")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def repoint(link: Path, target: str) -> None:
    """Atomically point the symlink link at target."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


# --- framing through a real pty ---------------------------------------------------------


async def test_pty_lines_exact_order_crlf_and_splits(pty: Pty) -> None:
    got = Received()
    source = SerialSource(pty.name, 115_200, got)
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        before_ms = time.time_ns() // 1_000_000
        await pty.send(b"v1=1\n")
        await pty.send(b"v2=2\r\n")
        await pty.send(b"v3=par")
        await wait_for(lambda: len(got.items) == 2)
        await pty.send(b"tial\r")
        await pty.send(b"\n\n\r\nv4=4\n")
        many = [f"seq={i} v1={i * 0.5}".encode() for i in range(2000)]
        await pty.send(b"".join(line + b"\r\n" for line in many))
        expected = [b"v1=1", b"v2=2", b"v3=partial", b"v4=4", *many]
        await wait_for(lambda: len(got.items) >= len(expected))
        after_ms = time.time_ns() // 1_000_000
    assert got.lines == expected
    assert got.firsts == [True] + [False] * (len(expected) - 1)
    assert all(before_ms <= ms <= after_ms for _, ms, _ in got.items)
    assert source.stats.lines_bad == 0
    assert source.stats.state is PortState.ABSENT


async def test_lines_written_before_the_port_opens_are_kept(pty: Pty) -> None:
    # A daemon restart: the device went on printing into the kernel's buffer; pyserial would flush it on open.
    tty.setraw(pty.slave)
    await pty.send(b"v1=1\nv1=2\n")
    got = Received()
    source = SerialSource(pty.name, 115_200, got)
    async with running(source):
        await wait_for(lambda: len(got.items) == 2)
    assert got.lines == [b"v1=1", b"v1=2"]


async def test_pty_overlong_line_discarded_counted_and_next_line_fine(pty: Pty) -> None:
    got = Received()
    source = SerialSource(pty.name, 115_200, got, max_line_bytes=64)
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        await pty.send(b"ok0\n")
        # An overlong line arriving in many writes, none of which holds its end.
        for _ in range(50):
            await pty.send(b"x" * 100)
        await pty.send(b"xx\nok1\n")
        # An overlong line complete in one write, then lines exactly at the limit.
        await pty.send(b"y" * 65 + b"\nok2\n" + b"z" * 64 + b"\n" + b"w" * 64 + b"\r\n")
        await wait_for(lambda: len(got.items) == 5)
    assert got.lines == [b"ok0", b"ok1", b"ok2", b"z" * 64, b"w" * 64]
    assert source.stats.lines_bad == 2
    assert source.stats.bad_reasons == {"overlong": 2}


async def test_pty_passes_text_bytes_through_and_cuts_noise(pty: Pty) -> None:
    got = Received()
    source = SerialSource(pty.name, 115_200, got)
    text_bytes = bytes(b for b in range(256) if not NOISE.search(bytes([b])) and b != ord("\n"))
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        await pty.send(b"name=\xc3(\xbf\n" + text_bytes + b"\n" + b"\x00\x00\xffv1=2\n" + b"\x1b\x07\r\n")
        await wait_for(lambda: len(got.items) == 3 and source.stats.lines_bad == 2)
    # Invalid UTF-8 that is not noise is left to the parser; a \r mid-line is kept.
    assert got.lines == [b"name=\xc3(\xbf", text_bytes, b"v1=2"]
    assert source.stats.bad_reasons == {"noise": 2}


async def test_pty_binary_burst_at_full_speed_loses_no_good_line(pty: Pty) -> None:
    rng = random.Random(6)
    got = Received()
    source = SerialSource(pty.name, 115_200, got, max_line_bytes=256)
    good = [b"v1=%d v2=%d" % (i, i * 7) for i in range(200)]
    stream = bytearray(b"boot\n")
    for i, line in enumerate(good):
        if i % 20 == 0:
            # Junk with its own newlines, ending in a NUL as a transceiver's idle line does.
            stream += rng.randbytes(rng.randrange(100, 5000)) + b"\x00"
        stream += line + b"\r\n"
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        await pty.send(bytes(stream))
        await wait_for(lambda: got.lines[-1:] == [good[-1]])
    assert [line for line in got.lines if line in set(good)] == good
    assert source.stats.bad_reasons.get("noise", 0) >= 10
    assert source.stats.state is PortState.ABSENT


@pytest.mark.parametrize(
    ("newline", "stream", "expected"),
    [
        ("lf", b"a\rb\nc\r\nd\r\r\n", [b"a\rb", b"c", b"d\r"]),
        ("crlf", b"a\nb\r\nc\rd\r\n\r\n", [b"a\nb", b"c\rd"]),
        ("cr", b"a\rb\r\nc\r\rd\ne\r", [b"a", b"b", b"c", b"d\ne"]),
        ("any", b"a\rb\r\nc\n\n\rd\n", [b"a", b"b", b"c", b"d"]),
    ],
)
async def test_pty_newline_modes(pty: Pty, newline: str, stream: bytes, expected: list[bytes]) -> None:
    got = Received()
    source = SerialSource(pty.name, 115_200, got, newline=newline)
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        for byte in stream:  # one byte per write: every split point is crossed
            await pty.send(bytes([byte]))
        await pty.send(b"end" + {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r", "any": b"\r"}[newline])
        await wait_for(lambda: got.lines[-1:] == [b"end"])
    assert got.lines == [*expected, b"end"]


def test_framer_refuses_an_unknown_newline() -> None:
    with pytest.raises(ValueError, match="newline"):
        LineFramer(Received(), lambda: None, 64, newline="lfcr")


# --- going away and coming back ---------------------------------------------------------


async def test_symlinked_device_unplugged_and_replugged(tmp_path: Path, pty: Pty) -> None:
    link = tmp_path / "usb-Acme_Sensor-if00"
    repoint(link, pty.name)
    got = Received()
    source = SerialSource(str(link), 115_200, got)
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        await pty.send(b"before=1\n")
        await wait_for(lambda: got.lines == [b"before=1"])

        pty.unplug()
        await wait_for(lambda: source.stats.state is PortState.ABSENT)
        assert source.stats.last_error is not None
        assert source.write(b"ACK 1\n") is False
        attempts = source.open_attempts
        await asyncio.sleep(0.5)
        assert source.open_attempts - attempts <= MAX_ATTEMPTS_PER_IDLE_WINDOW

        replugged = Pty()
        try:
            repoint(link, replugged.name)
            await wait_for(lambda: source.stats.state is PortState.OPEN)
            assert source.stats.reconnects == 1
            await replugged.send(b"after=2\n")
            await wait_for(lambda: len(got.items) == 2)
        finally:
            replugged.close()
    assert got.lines == [b"before=1", b"after=2"]
    assert got.firsts == [True, True]


async def test_glob_path_opens_the_one_match_and_refuses_several(tmp_path: Path, pty: Pty) -> None:
    pattern = str(tmp_path / "usb-Arduino*-if00")
    got = Received()
    source = SerialSource(pattern, 115_200, got)
    async with running(source):
        await wait_for(lambda: source.open_attempts >= 2)
        assert source.stats.state is PortState.ABSENT
        assert source.stats.last_error == f"no device matches {pattern}"

        repoint(tmp_path / "usb-Arduino_Uno_1234-if00", pty.name)
        await wait_for(lambda: source.stats.state is PortState.OPEN, RECONNECT_MAX_S + WAIT_TIMEOUT_S)
        await pty.send(b"v1=1\n")
        await wait_for(lambda: got.lines == [b"v1=1"])

        # A second board appears, then the first one drops off the bus: which one to read?
        second = Pty()
        try:
            repoint(tmp_path / "usb-Arduino_Nano_5678-if00", second.name)
            pty.unplug()
            await wait_for(lambda: source.stats.last_error is not None and "2 devices match" in source.stats.last_error)
            assert source.stats.state is PortState.ABSENT
            assert "usb-Arduino_Nano_5678-if00" in source.stats.last_error
            assert "usb-Arduino_Uno_1234-if00" in source.stats.last_error

            (tmp_path / "usb-Arduino_Uno_1234-if00").unlink()
            await wait_for(lambda: source.stats.state is PortState.OPEN, RECONNECT_MAX_S + WAIT_TIMEOUT_S)
            await second.send(b"v1=2\n")
            await wait_for(lambda: len(got.lines) == 2)
        finally:
            second.close()
    assert got.lines == [b"v1=1", b"v1=2"]
    assert source.stats.reconnects == 1


async def test_missing_path_absent_without_spinning_then_opens(tmp_path: Path, pty: Pty) -> None:
    link = tmp_path / "ttyACM0"
    got = Received()
    with structlog.testing.capture_logs() as logs:
        source = SerialSource(str(link), 115_200, got)
        async with running(source):
            await wait_for(lambda: source.open_attempts >= 2)
            assert source.stats.state is PortState.ABSENT
            assert source.stats.last_error is not None
            assert "No such file" in source.stats.last_error

            attempts = source.open_attempts
            cpu = time.process_time()
            await asyncio.sleep(IDLE_WINDOW_S)
            assert time.process_time() - cpu < IDLE_CPU_BOUND_S
            assert source.open_attempts - attempts <= MAX_ATTEMPTS_PER_IDLE_WINDOW

            repoint(link, pty.name)
            await wait_for(lambda: source.stats.state is PortState.OPEN, RECONNECT_MAX_S + WAIT_TIMEOUT_S)
            await pty.send(b"v1=1\n")
            await wait_for(lambda: got.lines == [b"v1=1"])
    assert source.stats.reconnects == 0  # the first successful open is not a reconnect
    absent = [entry for entry in logs if entry["event"] == "serial port absent"]
    assert len(absent) >= 2
    assert [entry["log_level"] for entry in absent].count("warning") == 1
    assert absent[0]["log_level"] == "warning"
    opened = [entry for entry in logs if entry["event"] == "serial port open"]
    assert len(opened) == 1
    assert opened[0]["log_level"] == "info"
    assert opened[0]["recovered"] is True
    assert opened[0]["port"] == str(link)
    assert opened[0]["device"] == pty.name  # the symlink resolved


async def test_idle_open_port_uses_no_cpu(pty: Pty) -> None:
    source = SerialSource(pty.name, 115_200, Received())
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        cpu = time.process_time()
        await asyncio.sleep(IDLE_WINDOW_S)
        assert time.process_time() - cpu < IDLE_CPU_BOUND_S


async def test_second_reader_is_locked_out(pty: Pty) -> None:
    first = SerialSource(pty.name, 115_200, Received())
    second = SerialSource(pty.name, 115_200, Received())
    async with running(first):
        await wait_for(lambda: first.stats.state is PortState.OPEN)
        async with running(second):
            await wait_for(lambda: second.open_attempts >= 2)
            assert second.stats.state is PortState.ABSENT
            assert second.stats.last_error is not None
            assert "lock" in second.stats.last_error


# --- socket:// ----------------------------------------------------------------------------


class LineServer:
    """A TCP server on 127.0.0.1 standing in for a serial-to-network bridge."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.append((reader, writer))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every client."""
        assert self.server is not None
        self.server.close()
        for _, writer in self.clients:
            writer.close()
        self.clients.clear()
        await self.server.wait_closed()


async def test_socket_url_lines_disconnect_and_reconnect() -> None:
    server = LineServer()
    await server.start()
    got = Received()
    source = SerialSource(f"socket://127.0.0.1:{server.port}", 115_200, got)
    try:
        async with running(source):
            await wait_for(lambda: source.stats.state is PortState.OPEN and len(server.clients) == 1)
            reader, writer = server.clients[0]
            writer.write(b"v1=1\r\nv2=")
            await writer.drain()
            writer.write(b"2\n")
            await writer.drain()
            await wait_for(lambda: len(got.items) == 2)
            assert source.write(b"ACK 2\n") is True
            assert await asyncio.wait_for(reader.readexactly(6), WAIT_TIMEOUT_S) == b"ACK 2\n"

            await server.stop()
            await wait_for(lambda: source.stats.state is PortState.ABSENT)
            await wait_for(lambda: source.open_attempts >= 2)  # refused while the server is away
            assert source.stats.state is PortState.ABSENT

            await server.start()
            await wait_for(lambda: source.stats.state is PortState.OPEN and len(server.clients) == 1)
            assert source.stats.reconnects == 1
            _, writer = server.clients[0]
            writer.write(b"v3=3\n")
            await writer.drain()
            await wait_for(lambda: len(got.items) == 3)
    finally:
        await server.stop()
    assert got.lines == [b"v1=1", b"v2=2", b"v3=3"]
    assert got.firsts == [True, False, True]


# --- writing and cancelling ---------------------------------------------------------------


async def test_write_reaches_the_device(pty: Pty) -> None:
    source = SerialSource(pty.name, 115_200, Received())
    assert source.write(b"ACK 1\n") is False  # not open yet
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        assert source.write(b"ACK 7\n") is True
        assert source.write(b"ACK 8\n") is True
        assert await pty.receive(12) == b"ACK 7\nACK 8\n"
    assert source.write(b"ACK 9\n") is False


async def test_cancel_is_prompt_and_closes_the_port(pty: Pty) -> None:
    source = SerialSource(pty.name, 115_200, Received())
    assert fds_open_on(pty.name) == 1  # the test's own slave fd
    task = asyncio.create_task(source.run())
    await wait_for(lambda: source.stats.state is PortState.OPEN)
    assert fds_open_on(pty.name) == 2
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=CANCEL_DEADLINE_S)
    assert task in done
    assert task.cancelled()
    assert fds_open_on(pty.name) == 1
    assert source.stats.state is PortState.ABSENT
    # The exclusive lock went with the fd.
    serial.Serial(pty.name, exclusive=True).close()


async def test_cancel_while_absent_is_prompt(tmp_path: Path) -> None:
    source = SerialSource(str(tmp_path / "nothing"), 115_200, Received())
    task = asyncio.create_task(source.run())
    await wait_for(lambda: source.open_attempts >= 1)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=CANCEL_DEADLINE_S)
    assert task in done
    assert task.cancelled()


async def test_url_without_fd_is_read_by_a_thread_and_cancels_promptly() -> None:
    got = Received()
    source = SerialSource("loop://", 115_200, got)
    task = asyncio.create_task(source.run())
    await wait_for(lambda: source.stats.state is PortState.OPEN)
    assert source.write(b"hello\r\nwor") is True
    assert source.write(b"ld\n") is True
    await wait_for(lambda: len(got.items) == 2)
    assert got.lines == [b"hello", b"world"]
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=CANCEL_DEADLINE_S)
    assert task in done
    assert task.cancelled()
    assert source.write(b"x\n") is False


def test_backoff_grows_is_capped_jittered_and_resets() -> None:
    backoff = Backoff(RECONNECT_INITIAL_S, RECONNECT_MAX_S)
    delays = [backoff.next_delay() for _ in range(12)]
    assert RECONNECT_INITIAL_S / 2 <= delays[0] <= RECONNECT_INITIAL_S
    assert all(0 < delay <= RECONNECT_MAX_S for delay in delays)
    assert all(delay >= RECONNECT_MAX_S / 2 for delay in delays[6:])
    assert len(set(delays)) > 1
    backoff.reset()
    assert backoff.next_delay() <= RECONNECT_INITIAL_S


def test_port_stats_counts_by_reason() -> None:
    stats = PortStats(path="/dev/ttyACM0")
    stats.count_ok()
    stats.count_bad("overlong")
    stats.count_bad("overlong")
    stats.count_bad("syntax")
    stats.count_ignored("nmea_type")
    assert (stats.lines_ok, stats.lines_bad, stats.lines_ignored) == (1, 3, 1)
    assert stats.bad_reasons == {"overlong": 2, "syntax": 1}
    assert stats.ignored_reasons == {"nmea_type": 1}
    assert stats.state is PortState.ABSENT


async def test_a_thread_link_writes_from_its_own_thread_never_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # pyserial's rfc2217 write is a blocking sendall of up to 5 s; loop:// is the same kind of link (no fd).
    from serial.urlhandler import protocol_loop

    writers: list[threading.Thread] = []
    release = threading.Event()
    original = protocol_loop.Serial.write

    def blocking_write(port: protocol_loop.Serial, data: bytes) -> int | None:
        writers.append(threading.current_thread())
        if threading.current_thread() is not threading.main_thread():
            release.wait(WAIT_TIMEOUT_S)  # a server that does not read: the write blocks
        return original(port, data)

    monkeypatch.setattr(protocol_loop.Serial, "write", blocking_write)
    got = Received()
    source = SerialSource("loop://", 115_200, got)
    async with running(source):
        await wait_for(lambda: source.stats.state is PortState.OPEN)
        assert source.write(b"ACK 1\n") is True  # returns at once although the port write blocks
        assert source.write(b"ACK 2\n") is True
        await wait_for(lambda: bool(writers))
        assert got.lines == []
        release.set()
        await wait_for(lambda: len(got.items) == 2)  # loop:// reads back what was written
    assert got.lines == [b"ACK 1", b"ACK 2"]
    assert {thread.name for thread in writers} == {"serial-read loop:// writer"}
