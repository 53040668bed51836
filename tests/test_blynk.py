"""The device API client against cloudsim on loopback: every answer mapped right, values sent exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeforward.blynk import BlynkClient, RateLimiter, RedirectError, Refusal, RefusedError, TransientError, classify
from edgeforward.cloudsim import CloudSim, SimDevice, SimLimits
from edgeforward.forward.history import build_history_batch
from edgeforward.points import STRING_MAX_BYTES, PinType, Value, value_json
from edgeforward.store import QueuedPoint

from .conftest import TOKEN
from .fakeclock import FakeClock
from .forward.rig import SIM_PINS

SAFE_TIMEOUT_S = 2.0


@pytest.mark.parametrize(
    ("status", "message", "refusal"),
    [
        (400, "Invalid token.", Refusal.INVALID_TOKEN),
        (400, "invalid TOKEN", Refusal.INVALID_TOKEN),
        (400, "Wrong pin format.", Refusal.PIN),
        (400, "No datastream setup for that pin.", Refusal.PIN),
        (400, "Value doesn't match the Datastream data type", Refusal.VALUE),
        (400, "Value doesn't match the Datastream data type.", Refusal.VALUE),
        (400, "Too much data in batch. Maximum batch size is 10000 points.", Refusal.TOO_LARGE),
        (413, "", Refusal.TOO_LARGE),
        (400, "Daily data points limit reached.", Refusal.QUOTA),
        (400, "Something new", Refusal.UNKNOWN),
    ],
)
def test_classify_table(status: int, message: str, refusal: Refusal) -> None:
    assert classify(status, message) is refusal


@pytest.fixture
async def sim() -> AsyncIterator[CloudSim]:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)], limits=SimLimits(batch_max_points=100))
    await cloud.start()
    yield cloud
    await cloud.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def client(
    session: aiohttp.ClientSession, server: str, token: str = TOKEN, timeout_s: float = SAFE_TIMEOUT_S
) -> BlynkClient:
    return BlynkClient(session, server, token, timeout_s=timeout_s, limiter=RateLimiter(50))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def body(values: list[object], start: int | None = None) -> bytes:
    base = start or now_ms() - 1000
    points = [QueuedPoint(i, 1, base + i, value_json(v)) for i, v in enumerate(values)]  # type: ignore[arg-type]
    return build_history_batch(points, 2_000_000).body


async def refusal_of(call: asyncio.Future[None] | object) -> RefusedError:
    with pytest.raises(RefusedError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_ok_rows(sim: CloudSim, session: aiohttp.ClientSession) -> None:
    api = client(session, str(sim.url))
    await api.live([(1, 21.5), (2, 7), (3, "door open")])
    await api.update_location(4, (24.1, 56.9))
    await api.history(2, body([1, 2, 3]), 3)
    assert [(p.pin, p.path) for p in sim.points(TOKEN)] == [
        (1, "live"),
        (2, "live"),
        (3, "live"),
        (4, "update"),
        (2, "history"),
        (2, "history"),
        (2, "history"),
    ]


async def test_refusal_rows(sim: CloudSim, session: aiohttp.ClientSession) -> None:
    api = client(session, str(sim.url))
    assert (await refusal_of(client(session, str(sim.url), "nope").live([(1, 1.0)]))).refusal is Refusal.INVALID_TOKEN
    assert (await refusal_of(api.history(9, body([1.0]), 1))).refusal is Refusal.PIN
    assert (await refusal_of(api.history(2, body([1.5]), 1))).refusal is Refusal.VALUE
    assert (await refusal_of(api.live([(2, "x")]))).refusal is Refusal.VALUE
    assert (await refusal_of(api.history(2, body(list(range(101))), 101))).refusal is Refusal.TOO_LARGE


async def test_transient_rows(sim: CloudSim, session: aiohttp.ClientSession) -> None:
    api = client(session, str(sim.url), timeout_s=0.3)
    for mode in ("503", "reset", "hang"):
        sim.outage = mode
        with pytest.raises(TransientError):
            await api.live([(1, 1.0)])
    sim.outage = None
    refused = client(session, "http://127.0.0.1:9")
    with pytest.raises(TransientError, match="cannot connect"):
        await refused.live([(1, 1.0)])
    dns = client(session, "http://no-such-host.invalid")
    with pytest.raises(TransientError):
        await dns.live([(1, 1.0)])


async def test_quota_refusal_is_quota(session: aiohttp.ClientSession) -> None:
    cloud = CloudSim([SimDevice(TOKEN, "pump", SIM_PINS)], limits=SimLimits(points_per_day=2))
    await cloud.start()
    refusal = await refusal_of(client(session, str(cloud.url)).history(2, body([1, 2, 3]), 3))
    await cloud.stop()
    assert refusal.refusal is Refusal.QUOTA


async def test_rate_limiter_sliding_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5, clock=clock)
    for _ in range(5):
        await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await clock.settle()
    await clock.advance(1.0)
    assert not waiter.done()  # five starts in the last second: the sixth waits
    await clock.advance(0.1)
    await asyncio.wait_for(waiter, 2)


async def test_redirect_to_plain_http_refused_for_https(session: aiohttp.ClientSession) -> None:
    home = CloudSim(redirects={TOKEN: "http://127.0.0.1:9"}, accept_any_token=True)
    url = await home.start()
    api = BlynkClient(
        session, url, TOKEN, timeout_s=SAFE_TIMEOUT_S, limiter=RateLimiter(50), configured_server="https://blynk.cloud"
    )
    with pytest.raises(RedirectError, match="downgrade"):
        await api.live([(1, 1.0)])
    assert api.server == url and [r.status for r in home.requests] == [308]  # never followed
    await home.stop()


printable_strings = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=60
).filter(lambda s: len(s.encode()) <= STRING_MAX_BYTES)


@settings(max_examples=25, deadline=None)
@given(st.lists(printable_strings, min_size=1, max_size=8))
def test_any_string_reaches_the_cloud_exactly(values: list[str]) -> None:
    async def roundtrip() -> tuple[list[Value], list[Value], int]:
        cloud = CloudSim([SimDevice(TOKEN, "pump", {3: PinType.STRING, 1: PinType.DOUBLE})])
        await cloud.start()
        async with aiohttp.ClientSession() as client_session:
            api = client(client_session, str(cloud.url))
            for value in values:
                await api.live([(3, value), (1, 1.0)])
            stamp = now_ms() - 1000
            points = [QueuedPoint(i, 3, stamp + i, value_json(v)) for i, v in enumerate(values)]
            await api.history(3, build_history_batch(points, 2_000_000).body, len(points))
        await cloud.stop()
        live = [p.value for p in cloud.points(TOKEN, 3) if p.path == "live"]
        history = [p.value for p in cloud.points(TOKEN, 3) if p.path == "history"]
        return live, history, len(cloud.points(TOKEN, 1))

    live, history, others = asyncio.run(roundtrip())
    assert live == values
    assert history == values
    assert others == len(values)  # a string can never add or change another query parameter


def test_longest_string_fits() -> None:
    long_value = "é" * (STRING_MAX_BYTES // 2)

    async def send() -> list[object]:
        cloud = CloudSim([SimDevice(TOKEN, "pump", {3: PinType.STRING})])
        await cloud.start()
        async with aiohttp.ClientSession() as client_session:
            await client(client_session, str(cloud.url)).live([(3, long_value)])
        await cloud.stop()
        return [p.value for p in cloud.points(TOKEN, 3)]

    assert asyncio.run(send()) == [long_value]
