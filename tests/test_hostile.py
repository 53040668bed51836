"""Hostile answers: bad redirects, echoed tokens, resets, TLS failures; nothing crashes, no token escapes.

Real parts only: aiohttp servers on 127.0.0.1 answering hostile things (tests/hostile.py), the real client,
real buffer files and the real daemon as a subprocess, its CLI, its /metrics and its log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import ssl
import string
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import trustme
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from edgeforward import cli
from edgeforward.blynk import (
    RETRY_AFTER_MAX_S,
    BlynkClient,
    RateLimiter,
    RedirectError,
    TransientError,
    open_session,
)
from edgeforward.cloudsim import CloudSim, SimDevice
from edgeforward.errors import EdgeforwardError, RedactedCause
from edgeforward.points import PinType
from edgeforward.redact import clear_secrets
from edgeforward.store import token_hash

from .conftest import TOKEN, DaemonProcess, Pty, edgeforward, write_config
from .hostile import MODES, REDIRECTS, HostileServer

TIMEOUT_S = 2.0
FLOW_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 10.0
PUMP = {"name": "pump", "token": TOKEN, "pins": {"v1": "double"}}


@pytest.fixture(autouse=True)
def no_registered_secrets() -> Iterator[None]:
    """Each test proves its own redaction: no token registered by an earlier test may hide a leak."""
    clear_secrets()
    yield
    clear_secrets()


@pytest.fixture
async def hostile() -> AsyncIterator[HostileServer]:
    server = await HostileServer().start()
    yield server
    await server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_client(session: aiohttp.ClientSession, server: str, token: str = TOKEN, **kwargs: Any) -> BlynkClient:
    return BlynkClient(session, server, token, timeout_s=TIMEOUT_S, limiter=RateLimiter(50), **kwargs)


# --- redirects, in the client ------------------------------------------------------------------


# The two https targets are valid: followed, then the TLS handshake fails (the secret-grep test drives them).
@pytest.mark.parametrize("mode", [m for m in REDIRECTS if "tls" not in m])
async def test_a_bad_redirect_is_refused_and_the_device_keeps_its_server(hostile: HostileServer, mode: str) -> None:
    hostile.modes[TOKEN] = mode
    followed: list[str] = []
    spent: list[int] = []

    async def on_redirect(server: str) -> None:
        followed.append(server)

    async def on_attempt(points: int) -> None:
        spent.append(points)

    async def on_refund(points: int) -> None:
        spent.append(-points)

    async with aiohttp.ClientSession() as session:
        api = make_client(session, hostile.url, on_redirect=on_redirect, on_attempt=on_attempt, on_refund=on_refund)
        with pytest.raises(RedirectError) as caught:
            await api.history(1, b"[[1764000000000,1.5]]", 1)
    assert str(caught.value).startswith("refused a redirect (308): ")
    assert isinstance(caught.value, TransientError)  # points stay queued, the device goes offline with this reason
    assert TOKEN not in str(caught.value)
    assert api.server == hostile.url and followed == []
    assert sum(spent) == 0  # a redirect imports nothing: the point is given back
    assert hostile.seen == [mode]  # never followed anywhere


@pytest.mark.parametrize(("configured", "allowed"), [("https://blynk.cloud", False), ("http://blynk.local", True)])
async def test_https_is_never_downgraded_unless_the_configured_server_is_http(configured: str, allowed: bool) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", {1: PinType.DOUBLE})])
    plain = await cloud.start()
    redirector = CloudSim(redirects={TOKEN: plain}, accept_any_token=True)
    start = await redirector.start()
    try:
        async with aiohttp.ClientSession() as session:
            api = make_client(session, start, configured_server=configured)
            if allowed:
                await api.live([(1, 2.5)])
                assert api.server == plain and len(cloud.points(TOKEN)) == 1
            else:
                with pytest.raises(RedirectError, match="would downgrade https to plain http"):
                    await api.live([(1, 2.5)])
                assert api.server == start and cloud.points(TOKEN) == []
    finally:
        await redirector.stop()
        await cloud.stop()


async def test_a_failure_keeps_its_cause_redacted(hostile: HostileServer) -> None:
    hostile.modes[TOKEN] = "reset"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TransientError) as caught:
            await make_client(session, hostile.url).live([(1, 1.0)])
        refused = make_client(session, f"http://127.0.0.1:{free_port()}")
        with pytest.raises(TransientError) as refused_caught:
            await refused.live([(1, 1.0)])
    for error in (caught.value, refused_caught.value):
        assert isinstance(error, EdgeforwardError)
        cause = error.__cause__
        assert isinstance(cause, RedactedCause) and cause.kind.endswith(("Error", "Disconnected"))
        assert cause.__traceback__ is not None  # where aiohttp failed is kept
        text = "".join(traceback.format_exception(error))
        assert TOKEN not in text and cause.kind in text
    assert isinstance(refused_caught.value.__cause__, RedactedCause)
    assert refused_caught.value.__cause__.__cause__ is not None  # the OSError below aiohttp's error, too


@pytest.mark.parametrize(("header", "expected"), [("1e12", RETRY_AFTER_MAX_S), ("inf", None), ("nan", None)])
async def test_retry_after_is_bounded(header: str, expected: float | None) -> None:
    async def too_many(_request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(status=429, text="slow down", headers={"Retry-After": header})

    app = aiohttp.web.Application()
    app.router.add_get("/{tail:.*}", too_many)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TransientError) as caught:
                await make_client(session, f"http://127.0.0.1:{runner.addresses[0][1]}").live([(1, 1.0)])
    finally:
        await runner.cleanup()
    assert caught.value.retry_after_s == expected


# --- aiohttp's silent resend --------------------------------------------------------------------


class KeepAliveThenReset:
    """Raw HTTP/1.1 on loopback: answers the first request of a connection (kept alive), drops the second."""

    def __init__(self) -> None:
        self.arrived = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self.arrived += 1
                served += 1
                if served > 1:
                    writer.transport.abort()  # read the GET, then reset: the cloud may have taken it
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nOK")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.mark.parametrize("daemon_session", [False, True], ids=["plain aiohttp", "open_session"])
async def test_a_reset_get_is_never_resent(daemon_session: bool) -> None:
    server = KeepAliveThenReset()
    url = await server.start()
    try:
        session = open_session(None) if daemon_session else aiohttp.ClientSession()
        async with session:
            api = make_client(session, url)
            await api.live([(1, 1.0)])
            assert server.arrived == 1
            if daemon_session:
                with pytest.raises(TransientError):
                    await api.live([(1, 2.0)])
            else:
                await api.live([(1, 2.0)])  # aiohttp resent it on a new connection: the cloud got it twice
    finally:
        await server.stop()
    # With the daemon's session exactly one request arrives for the reset GET; plain aiohttp sends it again.
    assert server.arrived == (2 if daemon_session else 3)


# --- the daemon ---------------------------------------------------------------------------------


async def test_the_daemon_survives_a_bad_redirect_and_keeps_its_points(
    tmp_path: Path, hostile: HostileServer, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    hostile.modes[TOKEN] = "redirect_port_out_of_range"
    config = write_config(tmp_path, hostile.url, [{"path": pty_port.path, "device": "pump"}], [PUMP])
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    pty_port.write("v1=1.5\nv1=2.5\n")

    def refused() -> bool:
        entry = daemon.status()["devices"]["pump"]
        return entry["queued"] == 2 and "refused a redirect (308)" in (entry["reason"] or "")

    await wait_until(refused)
    entry = daemon.status()["devices"]["pump"]
    assert entry["state"] == "offline" and "port is not a number" in entry["reason"]
    assert daemon.process is not None and daemon.process.poll() is None  # still running
    assert await asyncio.to_thread(daemon.stop) == 0
    with sqlite3.connect(tmp_path / "buffer.db") as db:
        assert db.execute("SELECT COUNT(*) FROM servers").fetchone() == (0,)  # never remembered
    assert "Traceback" not in daemon.log()


async def test_a_remembered_server_that_no_longer_parses_is_forgotten(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [PUMP])
    first = daemon_factory(config)
    first.start()
    await first.wait_started()
    assert await asyncio.to_thread(first.stop) == 0
    with sqlite3.connect(tmp_path / "buffer.db") as db:  # what an older release stored after a bad redirect
        db.execute("INSERT INTO servers (token_hash, server) VALUES (?, ?)", (token_hash(TOKEN), "http://[::1"))
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    pty_port.write("v1=1.5\n")
    await cloud.wait_points(1, TOKEN, within_s=FLOW_TIMEOUT_S)  # the configured server again
    assert await asyncio.to_thread(daemon.stop) == 0
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    forgotten = [line for line in lines if line["event"] == "remembered_server_forgotten"]
    assert len(forgotten) == 1 and forgotten[0]["level"] == "warning" and "IPv6" in forgotten[0]["reason"]
    with sqlite3.connect(tmp_path / "buffer.db") as db:
        assert db.execute("SELECT COUNT(*) FROM servers").fetchone() == (0,)


def test_a_fatal_exception_group_is_logged_each_redacted_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No real failure is left that stops the daemon, so two are planted inside its TaskGroup."""
    from edgeforward import clock
    from edgeforward.forward import forwarder

    async def forwarder_fails(_self: object) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # the clock's failure stops the group: this one fails while stopping
            raise ValueError(f"bad answer from http://h/?token={TOKEN} for {TOKEN}") from None

    async def clock_fails(_self: object, *_args: object) -> None:
        raise RuntimeError(f"clock broke near {TOKEN}")

    monkeypatch.setattr(forwarder.Forwarder, "run", forwarder_fails)
    monkeypatch.setattr(clock.ClockWatcher, "run", clock_fails)
    config = write_config(tmp_path, "http://127.0.0.1:9", [], [PUMP])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert cli.main(["run", "--config", str(config)]) == cli.EXIT_FATAL
    finally:  # the daemon's logging wrote to this test's captured stdout: give later tests theirs back
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()
    out, err = capsys.readouterr()
    assert err == "" and TOKEN not in out
    fatal = [json.loads(line) for line in out.splitlines() if '"fatal"' in line]
    assert sorted(line["error"].split(":")[0] for line in fatal) == ["RuntimeError", "ValueError"]
    assert all("Traceback" in line["exception"] for line in fatal)  # through the redacting logger


# --- the secret grep ----------------------------------------------------------------------------

TOKEN_ALPHABET = string.ascii_letters + string.digits + "-_.~"
# Hypothesis also tries string literals it finds in the code ("points_downsampled"), which the program prints
# by design: a fixed frame makes every generated token a string the program cannot print on its own.
tokens = (
    st.text(alphabet=TOKEN_ALPHABET, min_size=16, max_size=40)
    .filter(lambda t: len(set(t)) >= 8)
    .map(lambda body: f"Zq7{body}x9K")
)


async def wait_until(condition: Callable[[], bool], within_s: float = FLOW_TIMEOUT_S) -> None:
    """Poll a condition that runs the CLI: in a thread, so the hostile servers in this loop keep answering."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not await asyncio.to_thread(condition):
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.2)


async def http_text(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as response:
        return await response.text()


def untrusted_tls() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    return context


async def leak_everywhere(tmp_path: Path, secrets: list[str]) -> dict[str, str | bytes]:
    """Run the daemon against a server answering each device's token with another hostile thing.

    Return every place a token could leak to: the buffer files, status, status --json, deadletter list,
    /metrics, /healthz, check-config --online and the daemon's log.
    """
    modes = dict(zip(secrets, MODES, strict=True))
    server = await HostileServer(modes=modes, tls_context=untrusted_tls()).start()
    master, slave = os.openpty()
    pty = Pty(master, slave, os.ttyname(slave))
    names = [f"d{index}" for index in range(len(secrets))]
    devices = [
        {"name": name, "token": token, "pins": {"v1": "double"}} for name, token in zip(names, secrets, strict=True)
    ]
    config = write_config(tmp_path, server.url, [{"path": pty.path, "device": "d0"}], devices)
    listen = f"127.0.0.1:{free_port()}"
    config.write_text(config.read_text() + f'\n[metrics]\nlisten = "{listen}"\n')
    daemon = DaemonProcess(config)
    try:
        daemon.start()
        await daemon.wait_started()
        pty.write("".join(f"dev={name} v1=1.5\ndev={name} v1=2.5\n" for name in names))
        rejecter = names[MODES.index("echo_unknown_400")]

        def every_device_failed() -> bool:
            document = daemon.status()["devices"]
            return all(document[name]["reason"] for name in names) and document[rejecter]["rejected"] >= 1

        await wait_until(every_device_failed, 60.0)
        found: dict[str, str | bytes] = {
            "/metrics": await http_text(f"http://{listen}/metrics"),
            "/healthz": await http_text(f"http://{listen}/healthz"),
        }
        for label, args in {
            "status": ("status",),
            "status --json": ("status", "--json"),
            "deadletter list": ("deadletter", "list"),
            "check-config --online": ("check-config", "--online"),
        }.items():
            result = await asyncio.to_thread(edgeforward, *args, "--config", str(config))
            found[label] = result.stdout + result.stderr
        assert json.loads(str(found["status --json"]))["devices"]["d0"]["queued"] >= 1
        assert await asyncio.to_thread(daemon.stop) == 0
        assert set(server.seen) == set(MODES)  # every hostile answer was given
    finally:
        daemon.cleanup()
        pty.close()
        await server.stop()
    return found


# No shrinking: each example runs a daemon for seconds, and the failing tokens are printed as they are.
@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
@given(secrets=st.lists(tokens, min_size=len(MODES), max_size=len(MODES), unique=True))
def test_no_token_leaves_through_any_failure_path(tmp_path_factory: pytest.TempPathFactory, secrets: list[str]) -> None:
    tmp_path = tmp_path_factory.mktemp("leak")
    found = asyncio.run(leak_everywhere(tmp_path, secrets))
    found["log"] = (tmp_path / "daemon.log").read_text()
    for path in tmp_path.glob("buffer.db*"):
        found[path.name] = path.read_bytes()
    assert "buffer.db" in found
    for secret in secrets:
        for where, content in found.items():
            haystack = content if isinstance(content, bytes) else content.encode()
            assert secret.encode() not in haystack, f"the token of {MODES[secrets.index(secret)]} leaked to {where}"
    assert "refused a redirect (308)" in str(found["status"]) + str(found["check-config --online"])
    assert "Traceback" not in str(found["check-config --online"]) + str(found["log"])
