"""Logs: JSON lines, tokens redacted from every field, exception texts included."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from edgeforward.logs import JOURNAL_STREAM_ENV, REDACTED, Throttle, configure_logging, redact, writes_to_journal

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


def test_lines_to_the_journal_lead_with_their_priority_and_json_is_unchanged(tmp_path: Path) -> None:
    with (tmp_path / "journal").open("w+") as journal, (tmp_path / "file").open("w+") as plain:
        stat = os.fstat(journal.fileno())
        environ = {JOURNAL_STREAM_ENV: f"{stat.st_dev}:{stat.st_ino}"}
        assert writes_to_journal(journal, environ) and not writes_to_journal(plain, environ)
        assert not writes_to_journal(journal, {}) and not writes_to_journal(io.StringIO(), environ)
        lines: dict[str, list[str]] = {}
        for name, stream in (("journal", journal), ("plain", plain)):
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv(JOURNAL_STREAM_ENV, environ[JOURNAL_STREAM_ENV])
                configure_logging("debug", "json", secrets=[TOKEN], stream=stream)
            log = structlog.get_logger("edgeforward.test")
            log.debug("d")
            log.info("i")
            log.warning("w", url=f"https://h/?token={TOKEN}")
            log.error("e")
            logging.getLogger("aiohttp.client").critical("c")
            stream.seek(0)
            lines[name] = stream.read().splitlines()
    assert [line[:3] for line in lines["journal"]] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    # Behind the prefix, the same JSON line as anywhere else (only the time differs).
    events = [{**json.loads(line[3:]), "timestamp": None} for line in lines["journal"]]
    assert events == [{**json.loads(line), "timestamp": None} for line in lines["plain"]]
    assert [event["event"] for event in events] == ["d", "i", "w", "e", "c"]
    assert TOKEN not in "".join(lines["journal"])


def test_throttle_lets_the_first_of_each_kind_through_a_burst() -> None:
    throttle = Throttle(2)
    burst = [throttle.allow(0.0, kind="unknown_pin") for _ in range(5)]
    assert burst == [True, True, True, False, False]  # the first of its kind, then 2 a minute
    assert throttle.allow(1.0, kind="bad_ts") and throttle.allow(1.0, kind="syntax")
    assert not throttle.allow(1.0, kind="bad_ts")
    assert throttle.take_suppressed() == 3
