"""Tests for the Blynk-compatible cloud simulator, through a real aiohttp client on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from edgeforward.cloudsim import (
    DAY_MS,
    MSG_CONTENT_TYPE,
    MSG_DAILY,
    MSG_INTERNAL,
    MSG_INVALID_TOKEN,
    MSG_MONTHLY,
    MSG_NO_DATASTREAM,
    MSG_RATE,
    MSG_UNAVAILABLE,
    MSG_VALUE,
    MSG_WRONG_ID,
    MSG_WRONG_PIN,
    CloudSim,
    SimDevice,
    SimError,
    SimLimits,
    clamp,
    devices_from_file,
    limits_from_config,
    now_ms,
    parse_fault_rates,
    parse_json_value,
    parse_text_value,
    serve,
    split_listen,
)
from edgeforward.config import Limits
from edgeforward.points import PinType, Value
from edgeforward.redact import REDACTED, redact

PUMP = "pumpTokenAAAAAAAAAAAAAAAAAAAAAAA"
LOOSE = "looseTokenBBBBBBBBBBBBBBBBBBBBBB"
PUMP_PINS = {
    1: PinType.DOUBLE,
    2: PinType.INTEGER,
    3: PinType.STRING,
    4: PinType.LOCATION,
    5: PinType.BOOLEAN,
    6: PinType.ENUM,
    7: PinType.INTEGER,
    8: PinType.DOUBLE,
}
DEVICES = (
    SimDevice(PUMP, "pump", PUMP_PINS, ranges={7: (0, 100), 8: (-1.5, None)}),
    SimDevice(LOOSE, "loose"),
)
JSON = {"Content-Type": "application/json"}
SHORT_WAIT_S = 5.0


class Clock:
    """A settable epoch-milliseconds clock so quota windows are deterministic."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


MakeSim = Callable[..., Awaitable[CloudSim]]


@pytest.fixture
def clock() -> Clock:
    return Clock(now_ms())


@pytest.fixture
async def make_sim(clock: Clock) -> AsyncIterator[MakeSim]:
    sims: list[CloudSim] = []

    async def make(**kwargs: Any) -> CloudSim:
        kwargs.setdefault("clock", clock)
        devices = kwargs.pop("devices", DEVICES)
        sim = CloudSim(devices, **kwargs)
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def sim(make_sim: MakeSim) -> CloudSim:
    return await make_sim()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SHORT_WAIT_S)) as session:
        yield session


async def call(
    http: aiohttp.ClientSession, sim: CloudSim, method: str, path_query: str, **kwargs: Any
) -> tuple[int, str]:
    """One request to the sim; return status and body text."""
    async with http.request(method, f"{sim.url}{path_query}", **kwargs) as response:
        return response.status, await response.text()


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition with a short timeout."""
    async with asyncio.timeout(SHORT_WAIT_S):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def error_of(body: str) -> str:
    decoded = json.loads(body)
    message = decoded["error"]["message"]
    assert isinstance(message, str)
    return message


async def post_history(
    http: aiohttp.ClientSession, sim: CloudSim, body: Any, pin: str = "v1", token: str = PUMP
) -> tuple[int, str]:
    return await call(http, sim, "POST", f"/external/api/batch/update?token={token}&pin={pin}", json=body)


# --- GET batch/update (live) -----------------------------------------------------------------


async def test_live_batch_accepts_every_pin_typed(sim: CloudSim, http: aiohttp.ClientSession, clock: Clock) -> None:
    query = "v1=33.5&v2=44&v3=door%20open&v5=true&v6=2&v7=-5&v8=-7"
    status, body = await call(http, sim, "GET", f"/external/api/batch/update?token={PUMP}&{query}")
    assert (status, body) == (200, "OK")
    got = {(p.pin, p.value, p.path, p.ts_ms, p.arrived_ms) for p in sim.points(PUMP)}
    t = clock.ms
    assert got == {
        (1, 33.5, "live", t, t),
        (2, 44, "live", t, t),
        (3, "door open", "live", t, t),
        (5, True, "live", t, t),
        (6, 2, "live", t, t),
        (7, 0, "live", t, t),  # clamped to the datastream's min
        (8, -1.5, "live", t, t),
    }
    assert isinstance(sim.points(PUMP, 2)[0].value, int)
    assert isinstance(sim.points(PUMP, 1)[0].value, float)


async def test_live_batch_percent_decodes_values(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    status, _ = await call(http, sim, "GET", f"/external/api/batch/update?token={PUMP}&v3=a%26b%2Bc+d%3D")
    assert status == 200
    assert sim.points(PUMP, 3)[0].value == "a&b+c d="


@pytest.mark.parametrize(
    "query",
    [
        "v1=1.5&v2=12.5",  # integer pin given a fraction
        "v1=abc",
        "v1=nan",
        "v5=yes",
        "v4=32.1",  # a location has no single-value form here
        "v4=32.1&v4=49.1",
        "v1=1&v1=2",
        "v3=" + "x" * 1025,
    ],
)
async def test_live_batch_refuses_whole_request_on_a_bad_value(
    sim: CloudSim, http: aiohttp.ClientSession, query: str
) -> None:
    status, body = await call(http, sim, "GET", f"/external/api/batch/update?token={PUMP}&v2=1&{query}")
    assert status == 400
    assert error_of(body) == MSG_VALUE
    assert sim.received == []


async def test_untyped_device_accepts_any_scalar(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    query = "v0=7&v10=2.5&v11=true&v12=hello&v255=-3"
    status, _ = await call(http, sim, "GET", f"/external/api/batch/update?token={LOOSE}&{query}")
    assert status == 200
    assert {(p.pin, p.value) for p in sim.points(LOOSE)} == {(0, 7), (10, 2.5), (11, True), (12, "hello"), (255, -3)}


# --- GET update ------------------------------------------------------------------------------


async def test_update_one_pin(sim: CloudSim, http: aiohttp.ClientSession, clock: Clock) -> None:
    status, body = await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v2=100")
    assert (status, body) == (200, "")
    [point] = sim.points(PUMP)
    assert (point.pin, point.value, point.path, point.ts_ms) == (2, 100, "update", clock.ms)


async def test_update_location_and_pin_value_forms(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    location = "/external/api/update?token={}&pin=v4&value=32.12396&value=49.109466"
    assert (await call(http, sim, "GET", location.format(PUMP)))[0] == 200
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&pin=v1&value=2.5"))[0] == 200
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&dataStreamId=2&value=9"))[0] == 200
    assert [(p.pin, p.value) for p in sim.points(PUMP)] == [(4, (32.12396, 49.109466)), (1, 2.5), (2, 9)]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("pin=v4&value=32.1", MSG_VALUE),
        ("pin=v4&value=32.1,49.1", MSG_VALUE),
        ("pin=v4&value=a&value=1", MSG_VALUE),
        ("v4=32.1", MSG_VALUE),
        ("pin=v1", MSG_VALUE),
        ("dataStreamId=abc&value=1", MSG_WRONG_ID),
        ("dataStreamId=256&value=1", MSG_WRONG_ID),
        ("v1=1&v2=2", MSG_WRONG_PIN),
        ("pin=x1&value=1", MSG_WRONG_PIN),
    ],
)
async def test_update_refusals(sim: CloudSim, http: aiohttp.ClientSession, query: str, message: str) -> None:
    status, body = await call(http, sim, "GET", f"/external/api/update?token={PUMP}&{query}")
    assert status == 400
    assert error_of(body) == message
    assert sim.received == []


# --- POST batch/update (history) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("pin", "raw", "expected"),
    [
        ("v1", [1.5, 2], [1.5, 2.0]),
        ("v2", [1, -2], [1, -2]),
        ("v3", ["Some value", "é" * 512], ["Some value", "é" * 512]),
        ("v4", [[32.12396, 49.109466]], [(32.12396, 49.109466)]),
        ("v5", [True, False], [True, False]),
        ("v6", [0, 3], [0, 3]),
        ("v7", [150], [100]),  # clamped to max
    ],
)
async def test_history_accepts_typed_json(
    sim: CloudSim, http: aiohttp.ClientSession, clock: Clock, pin: str, raw: list[Any], expected: list[Value]
) -> None:
    base = clock.ms - 60_000
    status, body = await post_history(http, sim, [[base + i, value] for i, value in enumerate(raw)], pin)
    assert (status, body) == (200, "OK")
    points = sim.points(PUMP)
    assert [p.value for p in points] == expected
    assert [p.ts_ms for p in points] == [base + i for i in range(len(raw))]
    assert {(p.path, p.arrived_ms) for p in points} == {("history", clock.ms)}


@pytest.mark.parametrize(
    ("pin", "body"),
    [
        ("v2", [[1, 1], [2, 1.0]]),  # float for an integer
        ("v2", [[1, True]]),
        ("v6", [[1, "1"]]),
        ("v1", [[1, False]]),
        ("v1", [[1, "1.5"]]),
        ("v3", [[1, 5]]),
        ("v3", [[1, "x" * 1025]]),
        ("v5", [[1, 1]]),
        ("v4", [[1, [1.0]]]),
        ("v4", [[1, "1,2"]]),
        ("v1", [[1.5, 1.0]]),  # a non-integer timestamp
        ("v1", [["1", 1.0]]),
        ("v1", [[1, 1.0, 2]]),
        ("v1", [1, 1.0]),
        ("v1", {"ts": 1}),
        ("v1", [[-1, 1.0]]),
    ],
)
async def test_history_bad_entry_refuses_whole_batch(
    sim: CloudSim, http: aiohttp.ClientSession, pin: str, body: Any
) -> None:
    status, text = await post_history(http, sim, [[1, 1], *body] if pin == "v2" else body, pin)
    assert status == 400
    assert error_of(text) == MSG_VALUE
    assert sim.received == []


@pytest.mark.parametrize(
    ("pin", "body"),
    [
        ("v1", b"[[1,"),
        ("v1", b"[[1,NaN]]"),
        ("v1", b"[[1,-Infinity]]"),
        ("v1", b"[[1,1e999]]"),
        ("v1", b"\xef\xbb\xbf[[1,1.0]]"),  # a UTF-8 BOM
        ("v1", "[[1,1.0]]".encode("utf-16")),
        ("v3", b'[[1,"\xff"]]'),
        ("v3", b'[[1,"\\ud800"]]'),  # a lone surrogate
        ("v1", b"[" * 100_000 + b"]" * 100_000),
    ],
)
async def test_history_refuses_malformed_json(
    sim: CloudSim, http: aiohttp.ClientSession, pin: str, body: bytes
) -> None:
    status, text = await call(
        http, sim, "POST", f"/external/api/batch/update?token={PUMP}&pin={pin}", data=body, headers=JSON
    )
    assert (status, error_of(text)) == (400, MSG_VALUE)
    assert sim.received == []


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/plain"}])
async def test_history_needs_json_content_type(
    sim: CloudSim, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, text = await call(
        http, sim, "POST", f"/external/api/batch/update?token={PUMP}&pin=v1", data=b"[[1,1.0]]", headers=headers
    )
    assert (status, error_of(text)) == (400, MSG_CONTENT_TYPE)
    charset = {"Content-Type": "application/json; charset=utf-8"}
    status, _ = await call(
        http, sim, "POST", f"/external/api/batch/update?token={PUMP}&pin=v1", data=b"[[1,1.0]]", headers=charset
    )
    assert status == 200


async def test_history_batch_size_limit(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(limits=SimLimits(batch_max_points=3))
    status, text = await post_history(http, sim, [[i, 1.0] for i in range(4)])
    assert (status, error_of(text)) == (400, "Too much data in batch. Maximum batch size is 3 points.")
    assert (await post_history(http, sim, [[i, 1.0] for i in range(3)]))[0] == 200


async def test_history_request_size_limit(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(limits=SimLimits(max_request_bytes=1000))
    body = json.dumps([[i, 1.5] for i in range(200)]).encode()
    assert len(body) > 1000
    url = f"/external/api/batch/update?token={PUMP}&pin=v1"
    status, text = await call(http, sim, "POST", url, data=body, headers=JSON)
    assert status == 413
    assert "1000 bytes" in error_of(text)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the actual size is checked
        for start in range(0, len(body), 300):
            yield body[start : start + 300]

    status, _ = await call(http, sim, "POST", url, data=chunked(), headers=JSON)
    assert status == 413
    assert sim.received == []
    small = json.dumps([[i, 1.5] for i in range(50)]).encode()
    assert len(small) <= 1000
    assert (await call(http, sim, "POST", url, data=small, headers=JSON))[0] == 200


async def test_history_timestamp_window(make_sim: MakeSim, http: aiohttp.ClientSession, clock: Clock) -> None:
    sim = await make_sim(limits=SimLimits(max_age_days=30, max_future_days=1))
    old = clock.ms - 31 * DAY_MS
    status, text = await post_history(http, sim, [[clock.ms, 1.0], [old, 2.0]])
    assert status == 400
    assert error_of(text) == f"Timestamp {old} is too old. Maximum age is 30 days."
    ahead = clock.ms + 2 * DAY_MS
    status, text = await post_history(http, sim, [[ahead, 1.0]])
    assert status == 400
    assert error_of(text) == f"Timestamp {ahead} is too far in the future. Maximum is 1 days ahead."
    assert sim.received == []
    assert sim.requests[-1].error == error_of(text)
    ok = [[clock.ms - 29 * DAY_MS, 1.0], [clock.ms + DAY_MS // 2, 2.0]]
    assert (await post_history(http, sim, ok))[0] == 200


# --- limits ----------------------------------------------------------------------------------


async def test_daily_points_quota(make_sim: MakeSim, http: aiohttp.ClientSession, clock: Clock) -> None:
    clock.ms = (clock.ms // DAY_MS) * DAY_MS + DAY_MS - 1000  # one second before UTC midnight
    sim = await make_sim(limits=SimLimits(points_per_day=5))
    assert (await post_history(http, sim, [[clock.ms, 1.0]] * 3))[0] == 200
    status, text = await post_history(http, sim, [[clock.ms, 1.0]] * 3)  # would cross: refused whole
    assert (status, error_of(text)) == (400, MSG_DAILY)
    assert len(sim.points()) == 3
    assert (await post_history(http, sim, [[clock.ms, 1.0]] * 2))[0] == 200
    # live values do not count against the history quota
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1"))[0] == 200
    status, text = await post_history(http, sim, [[clock.ms, 1.0]])
    assert (status, error_of(text)) == (400, MSG_DAILY)
    assert sim.usage(PUMP).points_today == 5
    clock.ms += 1000  # the next UTC day
    assert (await post_history(http, sim, [[clock.ms, 1.0]] * 5))[0] == 200


async def test_monthly_messages_count_every_request(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: Clock
) -> None:
    clock.ms = 1_767_225_600_000 - 1000  # one second before 2026-01-01T00:00:00Z
    sim = await make_sim(limits=SimLimits(messages_per_month=3))
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1"))[0] == 200
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=x"))[0] == 400  # counts too
    assert (await call(http, sim, "GET", f"/external/api/get?token={PUMP}&v1"))[0] == 200
    status, text = await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=2")
    assert (status, error_of(text)) == (400, MSG_MONTHLY)
    assert (await call(http, sim, "GET", f"/external/api/update?token={LOOSE}&v1=2"))[0] == 200  # per token
    clock.ms += 1000
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=3"))[0] == 200
    assert sim.usage(PUMP).messages_this_month == 1


async def test_requests_per_second_answers_429(make_sim: MakeSim, http: aiohttp.ClientSession, clock: Clock) -> None:
    sim = await make_sim(limits=SimLimits(requests_per_second=2))
    url = f"{sim.url}/external/api/update?token={PUMP}&v1=1"
    for _ in range(2):
        async with http.get(url) as response:
            assert response.status == 200
    async with http.get(url) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
    async with http.get(f"{sim.url}/external/api/update?token={LOOSE}&v1=1") as response:
        assert response.status == 200  # the window is per token
    clock.ms += 999
    async with http.get(url) as response:
        assert response.status == 429
    clock.ms += 1
    async with http.get(url) as response:
        assert response.status == 200
    assert len(sim.points(PUMP)) == 3


# --- reading back ----------------------------------------------------------------------------


async def test_get_one_and_several_values(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    query = "v1=1.0&v2=7&v3=a%20b&v5=false"
    assert (await call(http, sim, "GET", f"/external/api/batch/update?token={PUMP}&{query}"))[0] == 200
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&pin=v4&value=1.5&value=2.5"))[0] == 200
    assert await call(http, sim, "GET", f"/external/api/get?token={PUMP}&v2") == (200, "7")
    assert await call(http, sim, "GET", f"/external/api/get?token={PUMP}&v3") == (200, "a b")
    status, body = await call(http, sim, "GET", f"/external/api/get?token={PUMP}&v1&v3&v4&v5")
    assert status == 200
    assert json.loads(body) == {"v1": 1.0, "v3": "a b", "v4": [1.5, 2.5], "v5": False}
    status, body = await call(http, sim, "GET", f"/external/api/get?token={PUMP}&v6")
    assert status == 400
    status, body = await call(http, sim, "GET", f"/external/api/get?token={PUMP}&v99")
    assert (status, error_of(body)) == (400, MSG_NO_DATASTREAM)


async def test_history_updates_latest_value_only_when_newer(
    sim: CloudSim, http: aiohttp.ClientSession, clock: Clock
) -> None:
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=5"))[0] == 200
    assert (await post_history(http, sim, [[clock.ms - 10, 1.0]]))[0] == 200
    assert await call(http, sim, "GET", f"/external/api/get?token={PUMP}&v1") == (200, "5.0")
    assert (await post_history(http, sim, [[clock.ms + 10, 2.0]]))[0] == 200
    assert await call(http, sim, "GET", f"/external/api/get?token={PUMP}&v1") == (200, "2.0")


async def test_is_hardware_connected(sim: CloudSim, http: aiohttp.ClientSession, clock: Clock) -> None:
    url = f"/external/api/isHardwareConnected?token={PUMP}"
    assert await call(http, sim, "GET", url) == (200, "false")
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=5"))[0] == 200
    assert await call(http, sim, "GET", url) == (200, "true")
    clock.ms += 60_000
    assert await call(http, sim, "GET", url) == (200, "false")


# --- documented errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path_query", "message"),
    [
        ("GET", "/external/api/batch/update?token=nope&v1=1", MSG_INVALID_TOKEN),
        ("GET", "/external/api/update?v1=1", MSG_INVALID_TOKEN),
        ("GET", "/external/api/isHardwareConnected?token=nope", MSG_INVALID_TOKEN),
        ("GET", f"/external/api/batch/update?token={PUMP}&v256=1", MSG_WRONG_PIN),
        ("GET", f"/external/api/batch/update?token={PUMP}&d1=1", MSG_WRONG_PIN),
        ("GET", f"/external/api/batch/update?token={PUMP}&v01=1", MSG_WRONG_PIN),
        ("GET", f"/external/api/batch/update?token={PUMP}", MSG_WRONG_PIN),
        ("GET", f"/external/api/get?token={PUMP}&x", MSG_WRONG_PIN),
        ("POST", f"/external/api/batch/update?token={PUMP}", MSG_WRONG_PIN),
        ("POST", f"/external/api/batch/update?token={PUMP}&pin=1", MSG_WRONG_PIN),
        ("GET", f"/external/api/batch/update?token={PUMP}&v1=1&v9=1", MSG_NO_DATASTREAM),
        ("POST", f"/external/api/batch/update?token={PUMP}&pin=v9", MSG_NO_DATASTREAM),
    ],
)
async def test_documented_error_messages(
    sim: CloudSim, http: aiohttp.ClientSession, method: str, path_query: str, message: str
) -> None:
    status, body = await call(http, sim, method, path_query, json=[[1, 1.0]] if method == "POST" else None)
    assert status == 400
    assert body == json.dumps({"error": {"message": message}}, separators=(",", ":"))
    assert sim.received == []
    assert sim.requests[-1].error == message


async def test_unknown_endpoint_and_method(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    assert (await call(http, sim, "GET", f"/external/api/nope?token={PUMP}"))[0] == 404
    assert (await call(http, sim, "POST", f"/external/api/update?token={PUMP}&v1=1"))[0] == 405


async def test_accept_any_token(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(accept_any_token=True)
    assert (await call(http, sim, "GET", "/external/api/batch/update?token=fresh&v3=x&v4=1.5"))[0] == 200
    assert [(p.pin, p.value) for p in sim.points("fresh")] == [(3, "x"), (4, 1.5)]
    status, body = await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v9=1")
    assert (status, error_of(body)) == (400, MSG_NO_DATASTREAM)  # known devices keep their pins
    status, body = await call(http, sim, "GET", "/external/api/update?token=&v9=1")
    assert (status, error_of(body)) == (400, MSG_INVALID_TOKEN)


# --- redirects -------------------------------------------------------------------------------


async def test_redirect_308_to_the_right_region(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    right = await make_sim()
    assert right.url is not None
    wrong = await make_sim(devices=(), redirects={PUMP: right.url + "/"})
    query = f"token={PUMP}&v3=door%20open"
    async with http.get(f"{wrong.url}/external/api/batch/update?{query}", allow_redirects=False) as response:
        assert response.status == 308
        assert response.headers["Location"] == f"{right.url}/external/api/batch/update?{query}"
    async with http.get(f"{wrong.url}/external/api/batch/update?{query}") as response:
        assert (response.status, await response.text()) == (200, "OK")
    async with http.post(f"{wrong.url}/external/api/batch/update?token={PUMP}&pin=v1", json=[[1, 2.5]]) as response:
        assert response.status == 200
    assert [(p.pin, p.value, p.path) for p in right.points(PUMP)] == [(3, "door open", "live"), (1, 2.5, "history")]
    assert wrong.received == []
    assert [r.status for r in wrong.requests] == [308, 308, 308]


# --- outages ---------------------------------------------------------------------------------


async def test_outage_503_then_recovery(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    sim.outage = "503"
    status, _ = await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1")
    assert status == 503
    sim.outage = None
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1"))[0] == 200
    with pytest.raises(SimError):
        sim.outage = "flood"


async def test_outage_reset_closes_the_connection(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    sim.outage = "reset"
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1")
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_history(http, sim, [[1, 1.0]])
    assert sim.received == []
    sim.outage = "off"
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1"))[0] == 200


async def test_outage_hang_times_the_client_out(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    sim.outage = "hang"
    with pytest.raises(asyncio.TimeoutError):
        await call(
            http,
            sim,
            "GET",
            f"/external/api/update?token={PUMP}&v1=1",
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    assert sim.received == []
    sim.outage = None
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1"))[0] == 200


async def test_stop_releases_hung_requests(make_sim: MakeSim) -> None:
    sim = await make_sim()
    sim.outage = "hang"
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.get(f"{sim.url}/external/api/update?token={PUMP}&v1=1"))
        await until(lambda: bool(sim.requests))
        await sim.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await asyncio.wait_for(pending, SHORT_WAIT_S)


# --- fault modes, random faults -----------------------------------------------------------------

QUOTA_MESSAGE = "Monthly messages limit reached (quota)."


@pytest.mark.parametrize(
    ("mode", "status", "message"),
    [
        ("503", 503, MSG_UNAVAILABLE),
        ("500", 500, MSG_INTERNAL),
        ("429", 429, MSG_RATE),
        ("invalid_token", 400, MSG_INVALID_TOKEN),
        ("error:" + QUOTA_MESSAGE, 400, QUOTA_MESSAGE),
        ("error:Something: new & odd", 400, "Something: new & odd"),
    ],
)
async def test_fault_modes_answer_every_api_request(
    sim: CloudSim, http: aiohttp.ClientSession, mode: str, status: int, message: str
) -> None:
    sim.outage = mode
    for method, path_query, body in (
        ("GET", f"/external/api/batch/update?token={PUMP}&v1=1", None),
        ("GET", f"/external/api/update?token={LOOSE}&v1=1", None),
        ("POST", f"/external/api/batch/update?token={PUMP}&pin=v1", [[1, 2.0]]),
        ("GET", "/external/api/isHardwareConnected?token=unknownToken", None),
    ):
        async with http.request(method, f"{sim.url}{path_query}", json=body) as response:
            assert (response.status, error_of(await response.text())) == (status, message)
            assert response.headers.get("Retry-After") == ("1" if mode == "429" else None)
    assert sim.received == []
    assert sim.usage(PUMP).messages_this_month == 0  # a fault is not a counted message
    assert [r.device for r in list(sim.requests)[:2]] == ["pump", "loose"]
    assert {r.status for r in sim.requests} == {status}
    assert (await call(http, sim, "GET", "/_sim/stats"))[0] == 200  # never for control endpoints
    sim.outage = None
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1"))[0] == 200


async def test_fault_429_uses_retry_after_s(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(retry_after_s=0.25)
    status, _ = await call(http, sim, "POST", "/_sim/outage?mode=429")
    assert status == 200
    async with http.get(f"{sim.url}/external/api/update?token={PUMP}&v1=1") as response:
        assert (response.status, response.headers["Retry-After"]) == (429, "0.25")
    sim.retry_after_s = 30
    async with http.get(f"{sim.url}/external/api/update?token={PUMP}&v1=1") as response:
        assert (response.status, response.headers["Retry-After"]) == (429, "30")


async def test_outage_control_takes_every_mode(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    for mode in ("500", "429", "invalid_token", "reset", "hang", "error:Daily data points limit reached."):
        status, body = await call(http, sim, "POST", f"/_sim/outage?mode={mode.replace(' ', '%20')}")
        assert (status, json.loads(body)) == (200, {"outage": mode})
        assert sim.outage == mode
    for bad in ("error:", "error:%20", "404", "Invalid_token"):
        assert (await call(http, sim, "POST", f"/_sim/outage?mode={bad}"))[0] == 400
    assert sim.outage == "error:Daily data points limit reached."


async def statuses(sim: CloudSim, count: int) -> list[int]:
    """Send count updates, one at a time; 0 stands for a reset connection."""
    found = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SHORT_WAIT_S)) as http:
        for index in range(count):
            try:
                found.append((await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v2={index}"))[0])
            except aiohttp.ClientConnectionError:
                found.append(0)
    return found


async def test_random_faults_follow_the_seed(make_sim: MakeSim) -> None:
    rates = {"500": 0.3, "429": 0.2, "reset": 0.1}
    first = await make_sim(fault_rates=rates, seed=7)
    second = await make_sim(fault_rates=rates, seed=7)
    seen = await statuses(first, 60)
    assert seen == await statuses(second, 60)
    assert set(seen) == {200, 500, 429, 0}
    assert 10 <= seen.count(200) <= 40  # 40% expected; bounds far from chance for this fixed seed
    delivered = [point.value for point in first.points(PUMP)]
    assert delivered == [index for index, status in enumerate(seen) if status == 200]
    # aiohttp resends a GET once after a reset, so the server sees more requests than the client.
    server_seen = [r.status for r in first.requests]
    assert server_seen == [r.status for r in second.requests]
    assert [status for status in server_seen if status] == [status for status in seen if status]
    assert first.fault_rates == rates
    with pytest.raises(TypeError):
        first.fault_rates["hang"] = 0.5  # type: ignore[index]
    first.fault_rates = {}
    assert await statuses(first, 5) == [200] * 5
    first.outage = "503"  # an outage wins over random faults
    second.outage = "503"
    assert await statuses(second, 3) == [503] * 3


async def test_random_faults_control_endpoint(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, sim, "POST", "/_sim/faults?rates=invalid_token:1&seed=3")
    assert (status, json.loads(body)) == (200, {"fault_rates": {"invalid_token": 1.0}})
    status, body = await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1")
    assert (status, error_of(body)) == (400, MSG_INVALID_TOKEN)
    status, body = await call(http, sim, "GET", "/_sim/stats")
    assert json.loads(body)["fault_rates"] == {"invalid_token": 1.0}
    assert (await call(http, sim, "POST", "/_sim/faults?rates=500:2"))[0] == 400
    assert (await call(http, sim, "POST", "/_sim/faults?rates=500:0.5&seed=x"))[0] == 400
    status, body = await call(http, sim, "POST", "/_sim/faults")
    assert (status, json.loads(body)) == (200, {"fault_rates": {}})
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1"))[0] == 200


def test_parse_fault_rates() -> None:
    assert parse_fault_rates("500:0.1, 429:0.05,reset:0.02,hang:0.01") == {
        "500": 0.1,
        "429": 0.05,
        "reset": 0.02,
        "hang": 0.01,
    }
    assert parse_fault_rates("error:Daily data points limit reached.:0.5") == {
        "error:Daily data points limit reached.": 0.5
    }
    assert parse_fault_rates("") == {}
    for bad in ("500", "500:x", "500:-0.1", "500:1.5", "500:0.6,429:0.6", "404:0.1", "500:0.1,500:0.2", "500:nan"):
        with pytest.raises(SimError):
            parse_fault_rates(bad)
    with pytest.raises(SimError):
        CloudSim(fault_rates={"500": 1.1})
    with pytest.raises(SimError):
        CloudSim(retry_after_s=-1)


# --- per-pin refused values ----------------------------------------------------------------------


REFUSING = SimDevice(
    "refuseTokenCCCCCCCCCCCCCCCCCCCCC",
    "refusing",
    {1: PinType.DOUBLE, 2: PinType.INTEGER, 3: PinType.STRING, 4: PinType.LOCATION},
    refuse={2: "-?999", 3: "^bad.*", 4: r"\[0,.*\]"},
)


async def test_refused_values_refuse_the_whole_request(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(devices=(REFUSING,))
    token = REFUSING.token
    refused = [
        ("GET", "batch/update?v1=1.5&v2=-999", None),
        ("GET", "update?v2=999", None),
        ("GET", "update?pin=v3&value=bad%20value", None),
        ("GET", "update?pin=v4&value=0&value=51.5", None),
        ("POST", "batch/update?pin=v2", [[1, 5], [2, -999], [3, 6]]),
        ("POST", "batch/update?pin=v3", [[1, "ok"], [2, "badly"]]),
        ("POST", "batch/update?pin=v4", [[1, [0, 1.5]]]),
    ]
    for method, path_query, body in refused:
        status, text = await call(http, sim, method, f"/external/api/{path_query}&token={token}", json=body)
        assert (status, error_of(text)) == (400, MSG_VALUE), path_query
    assert sim.received == []
    accepted = [
        ("GET", "batch/update?v1=-999&v2=9990", None),  # v1 has no pattern; fullmatch only
        ("GET", "update?pin=v3&value=not%20bad", None),
        ("POST", "batch/update?pin=v2", [[1, 5], [2, 1999]]),
        ("POST", "batch/update?pin=v4", [[1, [1, 0]]]),
    ]
    for method, path_query, body in accepted:
        status, _ = await call(http, sim, method, f"/external/api/{path_query}&token={token}", json=body)
        assert status == 200, path_query
    assert [(p.pin, p.value) for p in sim.received] == [
        (1, -999.0),
        (2, 9990),
        (3, "not bad"),
        (2, 5),
        (2, 1999),
        (4, (1.0, 0.0)),
    ]


def test_refuse_patterns_are_checked() -> None:
    with pytest.raises(SimError, match="refuse"):
        CloudSim([SimDevice("a", refuse={1: "(unclosed"})])
    with pytest.raises(SimError):
        CloudSim([SimDevice("a", refuse={256: "1"})])


# --- control endpoints, record, logs ----------------------------------------------------------


async def test_control_endpoints(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    assert (await call(http, sim, "GET", f"/external/api/batch/update?token={PUMP}&v1=1.5&v3=x"))[0] == 200
    assert (await call(http, sim, "GET", f"/external/api/update?token={LOOSE}&pin=v4&value=1&value=2"))[0] == 200
    assert (await call(http, sim, "GET", "/external/api/update?token=bad&v1=1"))[0] == 400

    status, body = await call(http, sim, "POST", "/_sim/outage?mode=503")
    assert (status, json.loads(body)) == (200, {"outage": "503"})
    assert sim.outage == "503"
    assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1"))[0] == 503

    status, body = await call(http, sim, "GET", "/_sim/points")  # control endpoints ignore the outage
    assert status == 200
    assert PUMP not in body and LOOSE not in body
    assert json.loads(body) == [
        {"device": "pump", "pin": 1, "ts_ms": sim.received[0].ts_ms, "value": 1.5, "path": "live",
         "arrived_ms": sim.received[0].arrived_ms},
        {"device": "pump", "pin": 3, "ts_ms": sim.received[1].ts_ms, "value": "x", "path": "live",
         "arrived_ms": sim.received[1].arrived_ms},
        {"device": "loose", "pin": 4, "ts_ms": sim.received[2].ts_ms, "value": [1.0, 2.0], "path": "update",
         "arrived_ms": sim.received[2].arrived_ms},
    ]  # fmt: skip
    status, body = await call(http, sim, "GET", "/_sim/points?device=pump&pin=v3")
    assert [p["value"] for p in json.loads(body)] == ["x"]

    status, body = await call(http, sim, "GET", "/_sim/stats")
    stats = json.loads(body)
    assert stats["requests"] == 4
    assert stats["by_status"] == {"200": 2, "400": 1, "503": 1}
    assert stats["by_endpoint"]["GET update"] == {"200": 1, "400": 1, "503": 1}
    assert stats["points"] == {"live": 2, "update": 1, "history": 0}
    assert stats["devices"]["pump"] == {"messages_this_month": 1, "points_today": 0}
    assert stats["outage"] == "503"

    assert (await call(http, sim, "POST", "/_sim/outage?mode=sideways"))[0] == 400
    assert (await call(http, sim, "POST", "/_sim/outage?mode=off"))[0] == 200
    assert sim.outage is None
    assert all(f"token={REDACTED}" in r.query for r in sim.requests)


async def test_record_file_survives_the_server(
    make_sim: MakeSim, http: aiohttp.ClientSession, tmp_path: Path, clock: Clock
) -> None:
    record = tmp_path / "record.jsonl"
    sim = await make_sim(record_path=record)
    assert (await call(http, sim, "GET", f"/external/api/batch/update?token={PUMP}&v2=4"))[0] == 200
    assert (await post_history(http, sim, [[5, [1.0, 2.0]]], pin="v4"))[0] == 200
    assert (await post_history(http, sim, [[6, "x"]], pin="v4"))[0] == 400
    await sim.stop()
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert lines == [
        {"device": "pump", "pin": 2, "ts_ms": clock.ms, "value": 4, "path": "live", "arrived_ms": clock.ms},
        {"device": "pump", "pin": 4, "ts_ms": 5, "value": [1.0, 2.0], "path": "history", "arrived_ms": clock.ms},
    ]
    assert PUMP not in record.read_text()


async def test_logs_never_show_tokens(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(accept_any_token=True)
    with structlog.testing.capture_logs() as logs:
        await call(http, sim, "GET", f"/external/api/batch/update?token={PUMP}&v1=1")
        await call(http, sim, "GET", "/external/api/update?token=secretAnyToken&v1=1")
        await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=bad")
        sim.outage = "503"
        await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1=1")
    assert len([entry for entry in logs if entry["event"] == "cloudsim request"]) == 4
    text = repr(logs)
    assert PUMP not in text and "secretAnyToken" not in text
    assert "pump" in text


def test_redact() -> None:
    assert redact("GET /x?token=abc&v1=1 Token=def") == f"GET /x?token={REDACTED}&v1=1 Token={REDACTED}"


def test_aiohttp_server_log_records_are_redacted() -> None:
    logger = logging.getLogger("edgeforward.cloudsim.http")
    try:
        raise ValueError("bad line /x?token=abc")
    except ValueError:
        record = logger.makeRecord(logger.name, logging.ERROR, "f", 1, "from %s", ("/y?token=def",), sys.exc_info())
    assert logger.filter(record)
    text = logging.Formatter().format(record)
    assert "abc" not in text and "def" not in text
    assert f"token={REDACTED}" in text


# --- pure value parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        (PinType.INTEGER, "+5", 5),
        (PinType.INTEGER, "-12", -12),
        (PinType.DOUBLE, "1", 1.0),
        (PinType.DOUBLE, "1e3", 1000.0),
        (PinType.DOUBLE, ".5", 0.5),
        (PinType.BOOLEAN, "1", True),
        (PinType.BOOLEAN, "FALSE", False),
        (PinType.STRING, "", ""),
        (None, "3", 3),
        (None, "3.0", 3.0),
        (None, "true", True),
        (None, "door open", "door open"),
    ],
)
def test_parse_text_value(kind: PinType | None, text: str, expected: Value) -> None:
    value = parse_text_value(kind, text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (PinType.INTEGER, "1.0"),
        (PinType.INTEGER, "1_000"),
        (PinType.INTEGER, " 1"),
        (PinType.INTEGER, str(2**63)),
        (PinType.ENUM, "a"),
        (PinType.DOUBLE, "inf"),
        (PinType.DOUBLE, "1e999"),
        (PinType.DOUBLE, ""),
        (PinType.BOOLEAN, "2"),
        (PinType.LOCATION, "1,2"),
    ],
)
def test_parse_text_value_refuses(kind: PinType, text: str) -> None:
    with pytest.raises(ValueError):
        parse_text_value(kind, text)


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        (PinType.INTEGER, 2**63),
        (PinType.DOUBLE, 10**400),
        (PinType.LOCATION, [True, 1.0]),
        (PinType.LOCATION, [1.0, 2.0, 3.0]),
        (None, None),
        (None, {"a": 1}),
        (None, [1, 2, 3]),
    ],
)
def test_parse_json_value_refuses(kind: PinType | None, raw: object) -> None:
    with pytest.raises(ValueError):
        parse_json_value(kind, raw)


def test_clamp() -> None:
    assert clamp(PinType.INTEGER, 150, (0.5, 99.5)) == 99
    assert clamp(PinType.INTEGER, -3, (0.5, 99.5)) == 1
    assert clamp(PinType.DOUBLE, 3.5, (None, 2.0)) == 2.0
    assert clamp(PinType.ENUM, 9, (0, 1)) == 9
    assert clamp(PinType.DOUBLE, 3.5, None) == 3.5


# --- devices files, settings, serve ------------------------------------------------------------


def test_devices_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "devices.json"
    path.write_text(
        json.dumps(
            {
                "tokA": {
                    "name": "pump",
                    "pins": {"v1": "double", "v2": {"type": "integer", "min": 0, "max": 9}},
                    "refuse": {"v2": "^-?999$"},
                },
                "tokB": {},
            }
        )
    )
    pump, other = devices_from_file(path)
    assert (pump.token, pump.name, dict(pump.pins), dict(pump.ranges)) == (
        "tokA",
        "pump",
        {1: PinType.DOUBLE, 2: PinType.INTEGER},
        {2: (0, 9)},
    )
    assert dict(pump.refuse) == {2: "^-?999$"}
    assert (other.token, other.name, dict(other.pins), dict(other.refuse)) == ("tokB", "", {}, {})


@pytest.mark.parametrize(
    "content",
    [
        "[1, 2]",
        '{"tok": {"pins": {"x1": "double"}}}',
        '{"tok": {"pins": {"v1": "float"}}}',
        '{"tok": {"color": "red"}}',
        '{"bad token": {}}',
        '{"tok": {"pins": {"v1": {"type": "double", "min": "0"}}}}',
        '{"tok": {"refuse": {"v1": "(unclosed"}}}',
        '{"tok": {"refuse": {"x1": "1"}}}',
        '{"tok": {"refuse": {"v1": 1}}}',
        '{"tok": {"refuse": ["v1"]}}',
        "{not json",
    ],
)
def test_devices_from_json_file_refuses(tmp_path: Path, content: str) -> None:
    path = tmp_path / "devices.json"
    path.write_text(content)
    with pytest.raises(SimError):
        devices_from_file(path)


def test_devices_from_config_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pump.token").write_text("tokFromFile\n")
    monkeypatch.setenv("EF_TEST_TOKEN", "tokFromEnv")
    path = tmp_path / "edgeforward.toml"
    path.write_text(
        """
[[device]]
name = "pump"
token_file = "pump.token"
[device.pins]
v1 = "double"
v2 = { type = "integer", min = 0, max = 100 }

[[device]]
name = "truck"
token_env = "EF_TEST_TOKEN"
[device.pins]
v10 = "location"
"""
    )
    pump, truck = devices_from_file(path)
    assert (pump.token, pump.name, dict(pump.pins), dict(pump.ranges)) == (
        "tokFromFile",
        "pump",
        {1: PinType.DOUBLE, 2: PinType.INTEGER},
        {2: (0.0, 100.0)},
    )
    assert (truck.token, truck.name, dict(truck.pins)) == ("tokFromEnv", "truck", {10: PinType.LOCATION})
    path.write_text('[[device]]\nname = "pump"\n')
    with pytest.raises(SimError, match="token"):
        devices_from_file(path)
    with pytest.raises(SimError):
        devices_from_file(tmp_path / "missing.toml")


def test_limits_from_config() -> None:
    limits = limits_from_config(Limits(points_per_day=7, requests_per_second=3.0))
    assert (limits.points_per_day, limits.requests_per_second, limits.messages_per_month) == (7, 3.0, 100_000)
    assert (limits.max_age_days, limits.batch_max_points) == (30.0, 10_000)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(SimError):
        SimLimits(batch_max_points=0)
    with pytest.raises(SimError):
        SimLimits(requests_per_second=-1)
    with pytest.raises(SimError):
        CloudSim([SimDevice("a"), SimDevice("a")])
    with pytest.raises(SimError):
        CloudSim([SimDevice("a", pins={300: PinType.DOUBLE})])
    with pytest.raises(SimError):
        CloudSim(redirects={"a": "ftp://x"})
    with pytest.raises(SimError):
        split_listen("nohost")
    assert split_listen("[::1]:0") == ("::1", 0)


async def test_serve_until_cancelled(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    record = tmp_path / "r.jsonl"
    task = asyncio.create_task(
        serve("127.0.0.1:0", list(DEVICES), SimLimits(), False, record, on_ready=ready.set_result)
    )
    url = await asyncio.wait_for(ready, SHORT_WAIT_S)
    async with http.get(f"{url}/external/api/update?token={PUMP}&v1=2") as response:
        assert response.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert json.loads(record.read_text())["value"] == 2.0
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{url}/_sim/stats"):
            pass


async def test_wait_points(sim: CloudSim, http: aiohttp.ClientSession) -> None:
    waiter = asyncio.create_task(sim.wait_points(2, PUMP, within_s=SHORT_WAIT_S))
    assert (await call(http, sim, "GET", f"/external/api/batch/update?token={PUMP}&v1=1&v2=2"))[0] == 200
    assert len(await waiter) == 2
    with pytest.raises(TimeoutError):
        await sim.wait_points(3, within_s=0.05)


# --- long runs and the command line ------------------------------------------------------------


async def test_the_request_log_is_bounded_and_stats_count_every_request(http: aiohttp.ClientSession) -> None:
    sim = CloudSim(accept_any_token=True, request_log_max=3)
    await sim.start()
    try:
        for value in range(5):
            assert (await call(http, sim, "GET", f"/external/api/update?token={PUMP}&v1={value}"))[0] == 200
        status, body = await call(http, sim, "GET", "/_sim/stats")
    finally:
        await sim.stop()
    assert [record.query.rsplit("=", 1)[1] for record in sim.requests] == ["2", "3", "4"]  # the newest kept
    stats = json.loads(body)
    assert (status, stats["requests"], stats["by_status"]) == (200, 5, {"200": 5})
    assert len(sim.points()) == 5  # accepted points are what tests read: all kept
    with pytest.raises(SimError):
        CloudSim(request_log_max=0)


@pytest.mark.parametrize("listen", ["8080", "127.0.0.1:99999", "localhost:abc", "in use"])
def test_cloudsim_bad_listen_is_one_line_and_exit_2(listen: str) -> None:
    from .conftest import edgeforward

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if listen == "in use":
            listen = f"127.0.0.1:{taken.getsockname()[1]}"
        result = edgeforward("cloudsim", "--listen", listen)
    assert result.returncode == 2
    assert result.stderr.startswith("cloudsim: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_cloudsim_devices_help_shows_a_shape_it_accepts(tmp_path: Path) -> None:
    from .conftest import edgeforward

    result = edgeforward("cloudsim", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    start = text.rindex("--devices FILE") + len("--devices FILE")  # its help, after the usage line
    shape = re.search(r"\{.*?\}\s*\}\s*\}", text[start:])
    assert shape is not None, text
    path = tmp_path / "devices.json"
    path.write_text(shape.group(0))
    devices = devices_from_file(path)
    assert [(d.name, dict(d.pins)) for d in devices] == [("pump", {1: PinType.DOUBLE})]
