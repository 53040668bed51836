"""`edgeforward import`: backfill data logger CSV files (plain CSV with a header, or Campbell TOA5) into the buffer."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .config import Config
from .errors import EdgeforwardError
from .ingest.parsers import CsvParser
from .ingest.parsers.common import MIN_TS_MS, MS_PER_DAY, Reading, Rejected
from .ingest.pipeline import parse_context
from .points import Point, parse_pin_name
from .store import Buffer, StoreError

Layout = Literal["auto", "csv", "toa5"]

CHUNK_ROWS = 500  # rows per transaction: short enough not to hold the daemon's writer up
TOA5_MARK = "TOA5"
TOA5_FILE_FIELDS = 8  # "TOA5", station, model, serial, OS, program, signature, table
TOA5_TIME_COLUMN = "TIMESTAMP"
CSV_TIME_COLUMNS = ("ts", "timestamp", "time", "datetime", "date_time")
MISSING_VALUES = frozenset({"", "nan", "-nan", "null", "none", "na"})
EPOCH_MS_THRESHOLD = 100_000_000_000  # digits above this are milliseconds (after 1973-03-03 as ms)
MAX_ERRORS_SHOWN_PER_FILE = 1000


class BackfillError(EdgeforwardError):
    """Root of the importer's errors: a file that cannot be imported at all, or bad options."""


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """How to read the files."""

    device: str
    layout: Layout = "auto"
    time_column: str | None = None
    time_format: str = "auto"  # auto | epoch_ms | epoch_s | iso | a strftime pattern
    timezone: str = "UTC"  # for timestamps that carry no offset
    mapping: Mapping[str, str] = field(default_factory=dict)  # column -> pin name
    delimiter: str = ","


@dataclass(frozen=True, slots=True)
class RowError:
    """A refused row: where and why."""

    file: str
    row: int
    reason: str


@dataclass
class FileResult:
    """What the import did with one file."""

    file: str
    rows: int = 0
    imported_rows: int = 0
    points: int = 0
    duplicate_points: int = 0
    empty_rows: int = 0
    errors: list[RowError] = field(default_factory=list)
    failure: str | None = None  # the file as a whole could not be read

    @property
    def refused(self) -> int:
        """Rows refused (or 1 when the whole file was)."""
        return len(self.errors) + (1 if self.failure else 0)


@dataclass(frozen=True, slots=True)
class _Table:
    """A file's columns, after its header lines."""

    time_index: int
    pins: tuple[tuple[int, str], ...]  # (column index, pin name)
    width: int
    first_row: int  # line number of the first data row


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    points: tuple[Point, ...]


OnLine = Callable[[int], None]


def time_parser(time_format: str, zone: tzinfo) -> Callable[[str], int]:
    """Return a function turning a timestamp field into epoch milliseconds (ValueError when it cannot)."""

    def aware(moment: datetime) -> int:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
        return round(moment.timestamp() * 1000)

    def epoch_ms(text: str) -> int:
        return int(text)

    def epoch_s(text: str) -> int:
        return round(float(text) * 1000)

    def iso(text: str) -> int:
        return aware(datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text))

    def pattern(text: str) -> int:
        return aware(datetime.strptime(text, time_format))

    def auto(text: str) -> int:
        if text.isdigit():
            number = int(text)
            return number if number >= EPOCH_MS_THRESHOLD else number * 1000
        try:
            return epoch_s(text)
        except ValueError:
            return iso(text)

    known: dict[str, Callable[[str], int]] = {"epoch_ms": epoch_ms, "epoch_s": epoch_s, "iso": iso, "auto": auto}
    if time_format in known:
        return known[time_format]
    if "%" not in time_format:
        raise BackfillError(
            f"--time-format: expected auto, epoch_ms, epoch_s, iso or a strftime pattern, got {time_format!r}"
        )
    return pattern


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise BackfillError(f"--tz: unknown time zone {name!r}") from exc


class FileReader:
    """Reads one file into points, row by row, refusing bad rows with a reason."""

    def __init__(self, config: Config, options: ImportOptions, now_ms: int) -> None:
        device = config.device(options.device)
        if device is None:
            raise BackfillError(f"--device: no [[device]] is named {options.device!r}")
        for column, pin in options.mapping.items():
            number = parse_pin_name(pin)
            if number is None:
                raise BackfillError(f"--map {column}={pin}: expected a pin name v0..v255")
            if number not in device.pins:
                raise BackfillError(f"--map {column}={pin}: {pin} is not declared for device {device.name!r}")
        self._options = options
        limits = config.limits_of(device.name)
        self._parse_time = time_parser(options.time_format, _zone(options.timezone))
        self._context = parse_context(config, device.name)
        self._now_ms = now_ms
        self._oldest_ms = now_ms - round(limits.max_age_days * MS_PER_DAY)

    def rows(self, text: Iterable[str], result: FileResult, progress: OnLine) -> Iterator[_Row]:
        """Yield the good rows of a file; record the bad ones in `result`."""
        reader = csv.reader(text, delimiter=self._options.delimiter, strict=True)
        table = self._header(reader)
        parser = CsvParser(["ts", *(pin for _, pin in table.pins)], header=False)
        line = table.first_row - 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                result.rows += 1
                result.errors.append(RowError(result.file, reader.line_num, f"csv: {exc}"))
                continue
            line = reader.line_num
            progress(line)
            if not fields or fields == [""]:
                continue
            result.rows += 1
            row = self._row(fields, table, parser, line, result)
            if row is not None:
                yield row

    def _row(self, fields: list[str], table: _Table, parser: CsvParser, line: int, result: FileResult) -> _Row | None:
        if len(fields) != table.width:
            result.errors.append(RowError(result.file, line, f"{len(fields)} fields, the header has {table.width}"))
            return None
        stamp = fields[table.time_index].strip()
        try:
            ts_ms = self._parse_time(stamp)
        except (ValueError, OverflowError):
            result.errors.append(RowError(result.file, line, f"timestamp: cannot read {stamp!r}"))
            return None
        if ts_ms < max(self._oldest_ms, MIN_TS_MS):
            result.errors.append(
                RowError(
                    result.file, line, f"timestamp: {stamp} is older than max_age_days (the cloud would not take it)"
                )
            )
            return None
        values = ["" if fields[index].strip().lower() in MISSING_VALUES else fields[index] for index, _ in table.pins]
        if all(value == "" for value in values):
            result.empty_rows += 1
            return None
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow([str(ts_ms), *values])
        parsed = parser.parse(buffer.getvalue(), self._context, self._now_ms)
        if isinstance(parsed, Rejected):
            result.errors.append(RowError(result.file, line, f"{parsed.reason}: {parsed.detail}"))
            return None
        if not isinstance(parsed, Reading) or parsed.ts_ms is None:
            result.errors.append(RowError(result.file, line, "not a data row"))
            return None
        return _Row(line, tuple(parsed.points(parsed.ts_ms)))

    def _header(self, reader: Iterator[list[str]]) -> _Table:
        try:
            first = next(reader)
        except StopIteration:
            raise BackfillError("empty file") from None
        except csv.Error as exc:
            raise BackfillError(f"line 1: {exc}") from exc
        layout = self._options.layout
        is_toa5 = bool(first) and first[0] == TOA5_MARK
        if layout == "auto":
            layout = "toa5" if is_toa5 else "csv"
        if layout == "toa5":
            return self._toa5_header(first, reader)
        return self._csv_header(first)

    def _toa5_header(self, first: list[str], reader: Iterator[list[str]]) -> _Table:
        if not first or first[0] != TOA5_MARK:
            raise BackfillError(f"line 1: not a TOA5 file (first field {first[0] if first else ''!r})")
        if len(first) != TOA5_FILE_FIELDS:
            raise BackfillError(f"line 1: the TOA5 file line has {len(first)} fields, expected {TOA5_FILE_FIELDS}")
        header: list[list[str]] = []
        for number, what in ((2, "field names"), (3, "units"), (4, "processing")):
            try:
                header.append(next(reader))
            except StopIteration:
                raise BackfillError(f"line {number}: missing TOA5 {what} line") from None
            except csv.Error as exc:
                raise BackfillError(f"line {number}: {exc}") from exc
        names, units, processing = header
        for number, line in ((3, units), (4, processing)):
            if len(line) != len(names):
                raise BackfillError(f"line {number}: {len(line)} fields, the field names line has {len(names)}")
        column = self._options.time_column or TOA5_TIME_COLUMN
        return self._table(names, column, names_line=2, first_row=5, named_pins=False)

    def _csv_header(self, names: list[str]) -> _Table:
        names = [name.lstrip("\ufeff") for name in names]
        column = self._options.time_column
        if column is None:
            folded = [name.strip().lower() for name in names]
            column = next((names[folded.index(c)] for c in CSV_TIME_COLUMNS if c in folded), None)
            if column is None:
                raise BackfillError(
                    f"line 1: no timestamp column (one of {', '.join(CSV_TIME_COLUMNS)}; or --time-column)"
                )
        return self._table(names, column, names_line=1, first_row=2, named_pins=True)

    def _table(
        self, names: list[str], time_column: str, *, names_line: int, first_row: int, named_pins: bool
    ) -> _Table:
        stripped = [name.strip() for name in names]
        if any(not name for name in stripped):
            raise BackfillError(f"line {names_line}: an empty column name")
        duplicates = sorted({name for name in stripped if stripped.count(name) > 1})
        if duplicates:
            raise BackfillError(f"line {names_line}: column {duplicates[0]!r} is named twice")
        if time_column not in stripped:
            raise BackfillError(f"line {names_line}: no column {time_column!r} (the timestamp)")
        pins: dict[int, str] = {}
        for column, pin in self._options.mapping.items():
            if column not in stripped:
                raise BackfillError(f"--map {column}={pin}: the file has no column {column!r}")
            pins[stripped.index(column)] = pin.lower()
        if named_pins:
            for index, name in enumerate(stripped):
                if index not in pins and name != time_column and parse_pin_name(name) is not None:
                    pins[index] = name.lower()
        chosen = list(pins.values())
        twice = sorted({pin for pin in chosen if chosen.count(pin) > 1})
        if twice:
            raise BackfillError(f"two columns map to pin {twice[0]}")
        if not pins:
            hint = "name columns v0..v255 or give --map COLUMN=vN" if named_pins else "give --map COLUMN=vN"
            raise BackfillError(f"line {names_line}: no column maps to a pin ({hint})")
        return _Table(stripped.index(time_column), tuple(sorted(pins.items())), len(names), first_row)


class SeenLedger:
    """Which (device, pin, ts) an earlier import already queued: the store remembers them with the points."""

    def __init__(self, buffer: Buffer) -> None:
        self._buffer = buffer

    async def commit(self, points: Sequence[Point]) -> int:
        """Queue the points no earlier import queued, and remember them, in one transaction; return how many."""
        return await self._buffer.import_points(points)


async def import_files(
    config: Config,
    options: ImportOptions,
    files: Sequence[Path],
    *,
    on_file: Callable[[Path, int], OnLine] | None = None,
    now_ms: int | None = None,
) -> list[FileResult]:
    """Import every file into the buffer; return what happened to each."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    reader = FileReader(config, options, now)
    buffer_config = config.buffer
    buffer = Buffer(
        Path(buffer_config.path),
        synchronous=buffer_config.synchronous,
        max_points=buffer_config.max_points,
        full_policy=buffer_config.full_policy,
        commit_interval_ms=0,
    )
    await buffer.open()
    writer = asyncio.create_task(buffer.run_writer(), name="import-writer")
    results: list[FileResult] = []
    try:
        seen = SeenLedger(buffer)
        for path in files:
            progress = on_file(path, _line_count(path)) if on_file is not None else _no_progress
            results.append(await _import_file(reader, seen, path, progress))
    finally:
        buffer.stop_writer()
        await writer
        await buffer.close()
    return results


async def _import_file(reader: FileReader, seen: SeenLedger, path: Path, progress: OnLine) -> FileResult:
    result = FileResult(str(path))
    try:
        with path.open(encoding="utf-8-sig", newline="") as text:
            chunk: list[_Row] = []
            for row in reader.rows(text, result, progress):
                chunk.append(row)
                if len(chunk) >= CHUNK_ROWS:
                    await _commit_chunk(seen, chunk, result)
                    chunk = []
            await _commit_chunk(seen, chunk, result)
    except BackfillError as exc:
        result.failure = str(exc)
    except UnicodeDecodeError as exc:
        result.failure = f"not UTF-8 text: {exc.reason} at byte {exc.start}"
    except OSError as exc:
        result.failure = f"cannot read: {exc.strerror or exc}"
    return result


async def _commit_chunk(seen: SeenLedger, chunk: list[_Row], result: FileResult) -> None:
    if not chunk:
        return
    points = [point for row in chunk for point in row.points]
    try:
        fresh = await seen.commit(points)
    except StoreError as exc:
        raise BackfillError(f"the buffer refused the rows (nothing of this chunk was queued): {exc}") from exc
    result.imported_rows += len(chunk)
    result.points += fresh
    result.duplicate_points += len(points) - fresh


def _line_count(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def _no_progress(_line: int) -> None:
    return None


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """Parse `--map COLUMN=vN` arguments."""
    mapping: dict[str, str] = {}
    for item in items:
        column, sep, pin = item.rpartition("=")
        if not sep or not column or not pin:
            raise BackfillError(f"--map {item}: expected COLUMN=vN")
        if column in mapping:
            raise BackfillError(f"--map {item}: column {column!r} is mapped twice")
        mapping[column] = pin.strip()
    return mapping


def run_import(config: Config, options: ImportOptions, files: Sequence[Path]) -> int:
    """The `import` command: a progress bar, one line per refused row, a summary; 0 all taken, 1 some refused."""
    errors = Console(stderr=True)
    out = Console()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("lines"),
        TimeRemainingColumn(),
        console=errors,
        disable=not errors.is_terminal,
        transient=True,
    )

    def on_file(path: Path, lines: int) -> OnLine:
        task = bar.add_task(path.name, total=lines)
        return lambda line: bar.update(task, completed=line)

    with bar:
        results = asyncio.run(import_files(config, options, files, on_file=on_file))
    for result in results:
        if result.failure is not None:
            errors.print(f"{result.file}: refused: {result.failure}", markup=False, highlight=False, soft_wrap=True)
        for error in result.errors[:MAX_ERRORS_SHOWN_PER_FILE]:
            errors.print(f"{error.file}:{error.row}: {error.reason}", markup=False, highlight=False, soft_wrap=True)
        if len(result.errors) > MAX_ERRORS_SHOWN_PER_FILE:
            errors.print(f"{result.file}: ... and {len(result.errors) - MAX_ERRORS_SHOWN_PER_FILE} more refused rows")
        out.print(
            f"{result.file}: {result.rows} rows, {result.points} points queued, "
            f"{result.duplicate_points} already imported, {result.empty_rows} empty, {result.refused} refused",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return 1 if any(result.refused for result in results) else 0
