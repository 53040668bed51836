"""The one redaction and the one server rule: pure functions, every form a secret or a bad URL can take."""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edgeforward import blynk, cloudsim, config, logs, store
from edgeforward.config import ConfigError, load_config
from edgeforward.errors import EdgeforwardError, redacted_cause
from edgeforward.ingest import links
from edgeforward.redact import REDACTED, add_secrets, clear_secrets, redact, redact_value
from edgeforward.servers import ServerError, redirect_target, remembered_target, server_origin

from .conftest import write_config

SECRET = "s3cr3t-T0ken_value.0123456789"


@pytest.fixture(autouse=True)
def no_registered_secrets() -> Iterator[None]:
    clear_secrets()
    yield
    clear_secrets()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /external/api/get?token=abc123&v1", f"GET /external/api/get?token={REDACTED}&v1"),
        ("u?Token=abc", f"u?Token={REDACTED}"),
        ("u?token%3Dabc%26v1", f"u?token%3D{REDACTED}"),
        ("http://edge:pa55@127.0.0.1:80/x", f"http://{REDACTED}@127.0.0.1:80/x"),
        ("https://user@host/", f"https://{REDACTED}@host/"),
        ("http://a:b@c@host/x", f"http://{REDACTED}@host/x"),
        ("mail a@b.c from http://host/x?e=a@b", "mail a@b.c from http://host/x?e=a@b"),
        ("no secret here", "no secret here"),
    ],
)
def test_redact_query_tokens_and_url_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_known_secrets_in_every_form() -> None:
    weird = 'tok/with "quotes" & spaces'
    add_secrets([SECRET, weird, "ab"])  # too short to be a secret: never blanks out ordinary text
    for form in (SECRET, quote(weird, safe=""), quote(weird), json.dumps(weird)[1:-1]):
        assert REDACTED in redact(f"found {form} here")
        assert form not in redact(f"found {form} here")
    assert redact("about") == "about"
    other = "another-secret-0123"
    assert redact(f"x {other} y", [other]) == f"x {REDACTED} y"
    assert redact_value({"k": [SECRET, (SECRET, 1)], SECRET: None, "n": 1.5}) == {
        "k": [REDACTED, (REDACTED, 1)],
        REDACTED: None,
        "n": 1.5,
    }


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=4, max_size=40), st.text(max_size=30))
def test_a_registered_secret_never_survives(secret: str, around: str) -> None:
    assume("*" not in secret)  # a secret made of the marker itself could be re-formed by the marker
    clear_secrets()
    add_secrets([secret])
    assert secret not in redact(around + secret + around)


def test_one_redaction_everywhere() -> None:
    # logs and cloudsim use the one redaction; no module keeps its own.
    assert logs.redact is redact and vars(cloudsim)["redact"] is redact
    assert not hasattr(cloudsim, "_TOKEN_RE") and not hasattr(logs, "_TOKEN_IN_TEXT")


def test_one_exception_root() -> None:
    roots = [
        blynk.CloudError,
        store.StoreError,
        config.ConfigError,
        cloudsim.SimError,
        ServerError,
        links.SerialSourceError,
    ]
    assert all(issubclass(root, EdgeforwardError) for root in roots)


def test_a_redacted_cause_keeps_type_traceback_and_chain_but_no_secret() -> None:
    try:
        try:
            raise OSError(f"below: token={SECRET}")
        except OSError as inner:
            raise ValueError(f"http://u:{SECRET}@h/?token={SECRET}") from inner
    except ValueError as exc:
        cause = redacted_cause(exc, [SECRET])
    assert cause.kind == "ValueError" and cause.__traceback__ is not None
    assert cause.__cause__ is not None and str(cause.__cause__).startswith("OSError: below: token=")
    text = "".join(traceback.format_exception(cause))
    assert SECRET not in text and "ValueError" in text and "OSError" in text


# --- servers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:99999", "port is not a number"),
        ("http://127.0.0.1:0", "port 0"),
        ("http://h:abc", "port is not a number"),
        ("http://[::1", "IPv6"),
        ("http://[zz::1]", "IPv6"),
        ("http://:0", "no host"),
        ("http://u:p@127.0.0.1:8080", "credentials"),
        ("http://host_name", "host name"),
        ("http://999.1.1.1", "IPv4"),
        ("ftp://host", "absolute http"),
        ("/external/api", "absolute http"),
        ("//host/x", "absolute http"),
        ("http://h h", "white space"),
        ("", "empty"),
        ("https://blynk.cloud/external", "scheme://host[:port] only"),
        ("https://blynk.cloud?x=1", "scheme://host[:port] only"),
    ],
)
def test_what_is_not_a_server(url: str, why: str) -> None:
    with pytest.raises(ServerError, match=why.replace("[", r"\[").replace("]", r"\]")) as caught:
        server_origin(url)
    assert "p@" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Blynk.Cloud", "https://blynk.cloud"),
        ("https://blynk.cloud/", "https://blynk.cloud"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:9", "http://[::1]:9"),
        ("https://fra1.blynk.cloud.", "https://fra1.blynk.cloud."),
    ],
)
def test_what_is_a_server(url: str, origin: str) -> None:
    assert server_origin(url) == origin


def test_redirect_and_remembered_targets() -> None:
    location = f"https://fra1.blynk.cloud/external/api/update?token={SECRET}&v1=1"
    assert redirect_target(location, "https://blynk.cloud") == "https://fra1.blynk.cloud"
    with pytest.raises(ServerError, match="downgrade"):
        redirect_target("http://fra1.blynk.cloud/x", "https://blynk.cloud")
    assert redirect_target("http://10.0.0.2:8080/x", "http://10.0.0.1:8080") == "http://10.0.0.2:8080"
    assert redirect_target("https://10.0.0.2/x", "http://10.0.0.1") == "https://10.0.0.2"
    assert remembered_target("http://10.0.0.2") == "http://10.0.0.2"
    with pytest.raises(ServerError, match="downgrade"):
        remembered_target("http://10.0.0.2", "https://blynk.cloud")
    with pytest.raises(ServerError):
        remembered_target("https://h/path")


@pytest.mark.parametrize("server", ["http://127.0.0.1:99999", "http://u:secretpass@127.0.0.1:8080", "http://[::1"])
def test_config_refuses_a_server_the_client_could_not_use(tmp_path: Path, server: str) -> None:
    path = write_config(tmp_path, server, [], [{"name": "pump", "token": SECRET, "pins": {"v1": "double"}}])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[0].startswith('cloud.server: expected "https://host[:port]"')
    assert "secretpass" not in caught.value.problems[0]
