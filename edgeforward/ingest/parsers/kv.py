"""The kv format: whitespace-separated key=value tokens, strings with spaces double-quoted."""

from __future__ import annotations

import re
from typing import Final

from ...points import Value
from .common import TEXT_DECODER, ParseContext, Reading, Rejected, assemble, show

# One character per step: "(?:[^"\\]+|\\.)*" backtracks exponentially on an unterminated quote (a hung loop).
_QUOTED_RE: Final = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_BARE_RE: Final = re.compile(r"\S*")
_UNESCAPE_RE: Final = re.compile(r'\\(["\\])')


def parse_kv(line: str, ctx: ParseContext, now_ms: int) -> Reading | Rejected:
    """Parse one `key=value ...` line."""
    if '"' in line:
        pairs = _quoted_pairs(line)
        if isinstance(pairs, Rejected):
            return pairs
        return assemble(pairs, ctx, now_ms, TEXT_DECODER)
    plain: list[tuple[str, str]] = []
    for token in line.split():
        key, equals, value = token.partition("=")
        if not equals:
            return Rejected("syntax", f"expected key=value, got {show(token)}")
        plain.append((key, value))
    return assemble(plain, ctx, now_ms, TEXT_DECODER)


def _quoted_pairs(line: str) -> list[tuple[str, str]] | Rejected:
    """Tokenize a kv line that contains double quotes (the slow path)."""
    pairs: list[tuple[str, str]] = []
    size = len(line)
    pos = 0
    while True:
        while pos < size and line[pos].isspace():
            pos += 1
        if pos >= size:
            return pairs
        start = pos
        while pos < size and line[pos] != "=" and not line[pos].isspace():
            pos += 1
        key = line[start:pos]
        if pos >= size or line[pos] != "=":
            return Rejected("syntax", f"expected key=value, got {show(key)}")
        if '"' in key:
            return Rejected("syntax", f"a quote in the key {show(key)}")
        pos += 1
        if line.startswith('"', pos):
            quoted = _QUOTED_RE.match(line, pos)
            if quoted is None:
                return Rejected("syntax", f"unterminated quote in the value of {show(key)}")
            value = _UNESCAPE_RE.sub(r"\1", quoted.group(1))
            pos = quoted.end()
            if pos < size and not line[pos].isspace():
                return Rejected("syntax", f"text right after the closing quote of {show(key)}")
        else:
            bare = _BARE_RE.match(line, pos)
            end = bare.end() if bare is not None else pos
            value = line[pos:end]
            pos = end
            if '"' in value:
                return Rejected("syntax", f"a stray quote in the value of {show(key)}: {show(value)}")
        pairs.append((key, value))


def format_kv(reading: Reading, *, dev: bool = True) -> str:
    """Render a reading as a kv line that parse_kv reads back to the same reading."""
    parts = [f"v{pin}={_kv_value(value)}" for pin, value in reading.values]
    if reading.ts_ms is not None:
        parts.append(f"ts={reading.ts_ms}")
    if reading.mcu_ms is not None:
        parts.append(f"ms={reading.mcu_ms}")
    if reading.seq is not None:
        parts.append(f"seq={reading.seq}")
    if dev:
        parts.append(f"dev={_kv_text(reading.device)}")
    return " ".join(parts)


def _kv_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return f"{value[0]!r},{value[1]!r}"
    return _kv_text(value)


def _kv_text(text: str) -> str:
    if text and '"' not in text and not any(char.isspace() for char in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
