"""The csv format: RFC 4180 fields, columns from the port's `columns` or from a header line."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from typing import Final

from ...points import KeyProblem, PinType, line_columns
from .common import TEXT_DECODER, Decoder, Ignored, ParseContext, Reading, Rejected, assemble, int_or_none, stripped

# csv data loggers often pad with blanks: tolerate them around everything but strings.
_CSV: Final = Decoder(
    pins={
        ptype: convert if ptype is PinType.STRING else stripped(convert) for ptype, convert in TEXT_DECODER.pins.items()
    },
    integer=lambda text: int_or_none(text.strip()),
    name=lambda text: text.strip(),
)


def _csv_fields(line: str) -> list[str] | Rejected:
    if '"' not in line:
        return line.split(",")
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error as exc:
        return Rejected("syntax", f"csv: {exc}")
    if len(rows) != 1:
        return Rejected("syntax", "csv: expected one record on the line")
    return rows[0]


def _csv_columns(names: Sequence[str]) -> tuple[str, ...] | Rejected:
    """Normalize column names to kv keys ("v7", "ts", ...), or reject them (the rule is points.line_columns)."""
    checked = line_columns(names)
    return Rejected(checked.reason, checked.detail) if isinstance(checked, KeyProblem) else checked


class CsvParser:
    """One csv port's state: its columns, from `columns` or from a header line.

    Any line whose fields are all distinct kv key names (with at least one pin) is a header:
    it is Ignored("header"), and with `header=True` and no `columns` it sets the columns
    (a microcontroller that reboots may print its header again). Configured `columns` win.
    """

    __slots__ = ("_columns", "_header", "_problem", "_seen_line")

    def __init__(self, columns: Sequence[str] | None, header: bool) -> None:
        self._header = header
        self._columns: tuple[str, ...] | None = None
        self._problem: Rejected | None = None
        self._seen_line = False
        if columns is not None:
            checked = _csv_columns(columns)
            if isinstance(checked, Rejected):
                self._problem = Rejected(checked.reason, f"port columns: {checked.detail}")
            else:
                self._columns = checked

    @property
    def columns(self) -> tuple[str, ...] | None:
        """The current columns as kv keys, or None while no header was seen."""
        return self._columns

    def parse(self, line: str, ctx: ParseContext, now_ms: int) -> Reading | Rejected | Ignored:
        """Parse one csv line (a header line or a record)."""
        fields = _csv_fields(line)
        if isinstance(fields, Rejected):
            return fields
        first = not self._seen_line
        self._seen_line = True
        header = _csv_columns(fields)
        if not isinstance(header, Rejected):
            if self._header and self._columns is None and self._problem is None:
                self._columns = header
            return Ignored("header")
        if self._problem is not None:
            return self._problem
        columns = self._columns
        if columns is None:
            if first:
                return Rejected(header.reason, f"header line: {header.detail}")
            return Rejected("no_header", "no valid header line has been seen on this port yet")
        if len(fields) != len(columns):
            return Rejected("syntax", f"csv: {len(fields)} fields, expected {len(columns)} ({','.join(columns)})")
        pairs = [(column, field) for column, field in zip(columns, fields, strict=True) if field != ""]
        return assemble(pairs, ctx, now_ms, _CSV)
