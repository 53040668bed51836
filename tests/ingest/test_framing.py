"""The framer: line ends, noise, overlong lines, independent of how the stream is chunked."""

from __future__ import annotations

import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from edgeforward.ingest.framing import NEWLINES, LineFramer

WAIT_TIMEOUT_S = 5.0
POLL_S = 0.01
CANCEL_DEADLINE_S = 1.0
IDLE_WINDOW_S = 1.0
IDLE_CPU_BOUND_S = 0.25  # generous: an idle reader should use close to nothing
MAX_ATTEMPTS_PER_IDLE_WINDOW = 10
NOISE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\xc0\xc1\xf5-\xff]")  # as documented
SEPARATORS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r", "any": b"\n"}


class Received:
    """A line handler that records what it is given."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, int, bool]] = []

    def __call__(self, line: bytes, received_ms: int, first: bool) -> None:
        self.items.append((line, received_ms, first))

    @property
    def lines(self) -> list[bytes]:
        return [line for line, _, _ in self.items]

    @property
    def firsts(self) -> list[bool]:
        return [first for _, _, first in self.items]


def reference_frames(
    stream: bytes, max_line_bytes: int, newline: str = "lf"
) -> tuple[list[tuple[bytes, bool]], int, int]:
    """What a framer must deliver for a whole terminated stream: lines, overlong and noise counts."""
    delivered: list[tuple[bytes, bool]] = []
    overlong = noise = 0
    if newline == "any":
        stream = stream.replace(b"\r", b"\n")
    for index, raw in enumerate(stream.split(SEPARATORS[newline])[:-1]):
        line = raw
        if newline == "lf" and line.endswith(b"\r"):
            line = line[:-1]
        elif newline == "cr" and line.startswith(b"\n"):
            line = line[1:]
        noisy = [m.end() for m in NOISE.finditer(line)]
        if noisy:
            noise += 1
            line = line[noisy[-1] :]
        if len(line) > max_line_bytes:
            overlong += 1
        elif line and not (noisy and line.isspace()):
            delivered.append((line, index == 0))
    return delivered, overlong, noise


@given(
    lines=st.lists(st.binary(max_size=12), max_size=30),
    ends=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r", b""]), min_size=30, max_size=30),
    newline=st.sampled_from(NEWLINES),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
)
def test_framer_is_independent_of_how_the_stream_is_chunked(
    lines: list[bytes], ends: list[bytes], newline: str, cuts: list[int]
) -> None:
    max_line_bytes = 8
    stream = b"".join(line + ends[i] for i, line in enumerate(lines)) + SEPARATORS[newline]
    got = Received()
    overlong: list[None] = []
    noise: list[None] = []
    framer = LineFramer(
        got, lambda: overlong.append(None), max_line_bytes, newline=newline, on_noise=lambda: noise.append(None)
    )
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    for start, end in itertools.pairwise(points):
        framer.feed(stream[start:end], 7)
    expected, expected_overlong, expected_noise = reference_frames(stream, max_line_bytes, newline)
    assert [(line, first) for line, _, first in got.items] == expected
    assert len(overlong) == expected_overlong
    assert len(noise) == expected_noise
    assert all(ms == 7 for _, ms, _ in got.items)


def test_framer_skips_overlong_without_holding_it() -> None:
    got = Received()
    overlong: list[None] = []
    framer = LineFramer(got, lambda: overlong.append(None), 16)
    for _ in range(1000):
        framer.feed(b"q" * 1000, 1)
        assert len(framer._partial) <= 17
    framer.feed(b"q\nnext\n", 2)
    assert overlong == [None]
    assert got.items == [(b"next", 2, False)]


def test_framer_reset_drops_partial_and_marks_first() -> None:
    got = Received()
    framer = LineFramer(got, lambda: None, 64)
    framer.feed(b"a\nhalf-a-li", 1)
    framer.reset()
    framer.feed(b"ne\nb\n", 2)
    assert got.items == [(b"a", 1, True), (b"ne", 2, True), (b"b", 2, False)]


def test_framer_survives_a_failing_handler() -> None:
    seen: list[bytes] = []

    def handler(line: bytes, received_ms: int, first: bool) -> None:
        seen.append(line)
        if line == b"boom":
            raise RuntimeError("handler bug")

    framer = LineFramer(handler, lambda: None, 64)
    framer.feed(b"a\nboom\nb\n", 1)
    assert seen == [b"a", b"boom", b"b"]
