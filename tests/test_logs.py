"""Logs: JSON lines, tokens redacted from every field, exception texts included."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from edgeforward.logs import REDACTED, Throttle, configure_logging, redact

TOKEN = "tok-secret-0123456789abcdef"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    handlers = logging.getLogger().handlers[:]
    level = logging.getLogger().level
    yield
    logging.getLogger().handlers[:] = handlers
    logging.getLogger().setLevel(level)
    structlog.reset_defaults()


def test_redact_known_tokens_and_any_token_query() -> None:
    configure_logging("info", "json", secrets=[TOKEN], stream=io.StringIO())
    assert redact(f"GET /external/api/update?token={TOKEN}&v1=1") == f"GET /external/api/update?token={REDACTED}&v1=1"
    assert redact("https://x/?token=unknown-token&pin=v1") == f"https://x/?token={REDACTED}&pin=v1"
    assert TOKEN not in redact(f"path {TOKEN} in text")


def test_every_log_line_is_json_and_holds_no_token() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", secrets=[TOKEN], stream=out)
    log = structlog.get_logger("edgeforward.test")
    log.warning("cloud_unreachable", url=f"https://blynk.cloud/external/api/get?token={TOKEN}", nested={"t": [TOKEN]})
    try:
        raise ValueError(f"request to https://blynk.cloud/external/api/batch/update?token={TOKEN} failed")
    except ValueError:
        log.exception("request_failed")
    logging.getLogger("aiohttp.client").error("connection to %s failed", f"https://h/?token={TOKEN}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for line in lines:
        event = json.loads(line)
        assert "timestamp" in event and "level" in event
    assert TOKEN not in out.getvalue()
    assert "ValueError" in out.getvalue()


def test_throttle_counts_what_it_holds_back() -> None:
    throttle = Throttle(2)
    assert [throttle.allow(0.0), throttle.allow(1.0), throttle.allow(2.0)] == [True, True, False]
    assert throttle.take_suppressed() == 1
    assert throttle.allow(61.0)
