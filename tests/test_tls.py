"""TLS: an https cloudsim with a real local CA (trustme), trusted, untrusted and with the wrong host name."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme

from edgeforward.blynk import BlynkClient, RateLimiter, TransientError, ssl_context
from edgeforward.cloudsim import CloudSim, SimDevice, SimError, SimLimits, serve, server_ssl_context
from edgeforward.points import PinType

TOKEN = "tlsTokenDDDDDDDDDDDDDDDDDDDDDDDD"
DEVICES = (SimDevice(TOKEN, "meter", {1: PinType.DOUBLE}),)
HOST = "127.0.0.1"
TIMEOUT_S = 5.0

StartHttps = Callable[[trustme.LeafCert], Awaitable[CloudSim]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def start_https() -> AsyncIterator[StartHttps]:
    sims: list[CloudSim] = []

    async def start(cert: trustme.LeafCert) -> CloudSim:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        sim = CloudSim(DEVICES)
        await sim.start(HOST, 0, ssl_context=context)
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        await sim.stop()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts only this CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def get_update(sim: CloudSim, client_context: ssl.SSLContext) -> int:
    connector = aiohttp.TCPConnector(ssl=client_context)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    url = f"{sim.url}/external/api/update?token={TOKEN}&v1=2.5"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http, http.get(url) as response:
        return response.status


async def test_trusted_ca_succeeds(ca: trustme.CA, start_https: StartHttps) -> None:
    sim = await start_https(ca.issue_cert(HOST, "localhost"))
    assert sim.url is not None and sim.url.startswith(f"https://{HOST}:")
    assert await get_update(sim, trusting(ca)) == 200
    assert [(p.pin, p.value) for p in sim.received] == [(1, 2.5)]


async def test_wrong_host_name_is_a_certificate_error(ca: trustme.CA, start_https: StartHttps) -> None:
    sim = await start_https(ca.issue_cert("blynk.example.com"))
    with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
        await get_update(sim, trusting(ca))
    assert isinstance(caught.value.certificate_error, ssl.SSLCertVerificationError)
    assert "mismatch" in str(caught.value.certificate_error)
    assert not sim.requests


async def test_untrusted_ca_is_a_certificate_error(ca: trustme.CA, start_https: StartHttps) -> None:
    sim = await start_https(ca.issue_cert(HOST))
    with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
        await get_update(sim, trusting(trustme.CA()))
    assert isinstance(caught.value.certificate_error, ssl.SSLCertVerificationError)
    assert not sim.requests


async def blynk_live(sim: CloudSim, ca_file: Path) -> None:
    """Send one live value through the real client, with the daemon's TLS context."""
    assert sim.url is not None
    connector = aiohttp.TCPConnector(ssl=ssl_context(str(ca_file)))
    async with aiohttp.ClientSession(connector=connector) as session:
        client = BlynkClient(session, sim.url, TOKEN, timeout_s=TIMEOUT_S, limiter=RateLimiter(50))
        await client.live([(1, 7.5)])
        await client.history(1, b"[[1000,8.5]]", 1)


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


async def test_blynk_client_reaches_https_cloudsim_with_ca_file(
    ca: trustme.CA, start_https: StartHttps, tmp_path: Path
) -> None:
    sim = await start_https(ca.issue_cert(HOST))
    await blynk_live(sim, write_ca(ca, tmp_path / "ca.pem"))
    assert [(p.value, p.path) for p in sim.received] == [(7.5, "live"), (8.5, "history")]


@pytest.mark.parametrize("problem", ["untrusted CA", "wrong host name"])
async def test_blynk_client_certificate_problems_are_transient(
    ca: trustme.CA, start_https: StartHttps, tmp_path: Path, problem: str
) -> None:
    if problem == "untrusted CA":
        sim = await start_https(ca.issue_cert(HOST))
        ca_file = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
    else:
        sim = await start_https(ca.issue_cert("blynk.example.com"))
        ca_file = write_ca(ca, tmp_path / "ca.pem")
    with pytest.raises(TransientError) as caught:
        await blynk_live(sim, ca_file)
    assert "certificate" in str(caught.value).lower()
    assert TOKEN not in str(caught.value) and TOKEN not in repr(caught.value)
    assert not sim.requests


async def test_serve_over_tls(ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert(HOST)
    cert_file = tmp_path / "cert.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(
            f"{HOST}:0",
            list(DEVICES),
            SimLimits(),
            False,
            None,
            on_ready=ready.set_result,
            ssl_context=server_ssl_context(cert_file),
        )
    )
    try:
        url = await asyncio.wait_for(ready, TIMEOUT_S)
        assert url.startswith("https://")
        connector = aiohttp.TCPConnector(ssl=trusting(ca))
        async with aiohttp.ClientSession(connector=connector) as http, http.get(f"{url}/_sim/stats") as response:
            assert response.status == 200
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_server_ssl_context_refuses_a_missing_certificate(tmp_path: Path) -> None:
    with pytest.raises(SimError, match="certificate"):
        server_ssl_context(tmp_path / "missing.pem")


async def test_reset_and_hang_over_tls(ca: trustme.CA, start_https: StartHttps) -> None:
    sim = await start_https(ca.issue_cert(HOST))
    sim.outage = "reset"
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_update(sim, trusting(ca))
    sim.outage = "hang"
    pending = asyncio.create_task(get_update(sim, trusting(ca)))
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            if sim.requests and sim.requests[-1].error == "fault hang":
                break
            await asyncio.sleep(0.01)
    await sim.stop()  # releases the hung request
    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(pending, TIMEOUT_S)
