"""The pipeline: a port's framed line -> parsed reading -> stamped points, submitted, counted, acknowledged.

This is the only place a parse context is built (`parse_context`), for ports and for the importer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from ..clock import UNKNOWN_FUTURE_MS
from ..config import Config, NmeaPins, PortConfig
from ..logs import Throttle
from ..points import Point
from ..store.schema import RESEND_WINDOW_PER_PORT
from .mcu_clock import McuClock, McuClockState
from .parsers import CsvParser, parse_line
from .parsers.common import MS_PER_DAY, Ignored, ParseContext, Reading, Rejected
from .parsers.nmea import NMEA_FIELDS, NmeaPinMap
from .source import PortStats, SerialSource

if TYPE_CHECKING:
    from ..clock import ClockWatcher
    from ..store import ResendKey

log = structlog.get_logger(__name__)

BAD_LINES_LOGGED_PER_MINUTE: Final = 5
# Two copies with the same seq= and ms= are one reading when their times agree this closely: an MCU that reboots
# starts seq= and ms= again, but its readings then lie at least one uptime apart on the wall clock.
RESEND_TS_TOLERANCE_MS: Final = 1_000
# Lines of the opening burst are held at most this long, or this many (see PortPipeline._held_back).
BURST_HOLD_S: Final = 5.0
# A first line read within this of the open was already on its way when the port opened: it may be the tail of
# a line (a line that begins later, e.g. after the MCU's reset on open, is whole).
TORN_TAIL_MS: Final = 100
BURST_HOLD_LINES: Final = 1024
BURST_AGREE_MS: Final = 50  # two fresh lines whose anchors agree this closely end the hold
WALL_DOMAIN: Final = "wall"  # the domain of a saved MCU clock stamped on the trusted wall clock


class Submit(Protocol):
    """Buffer.submit: commit points (and remember the reading in the resend window); resolved once committed."""

    def __call__(self, points: Sequence[Point], *, resend: ResendKey | None = None) -> asyncio.Future[None]: ...


class Hold(Protocol):
    """Buffer.hold: commit points stamped on the boot's monotonic clock, held until the wall clock is trusted."""

    def __call__(
        self, points: Sequence[Point], boot_id: str, *, resend: ResendKey | None = None
    ) -> asyncio.Future[None]: ...


def parse_context(config: Config, device: str | None, *, max_future_ms: int | None = None) -> ParseContext:
    """Build the context lines are checked against: the declared devices, a default device, the future bound."""
    devices = {entry.name: {pin: spec.type for pin, spec in entry.pins.items()} for entry in config.devices}
    if max_future_ms is None:
        max_future_ms = round(config.limits_of(device).max_future_days * MS_PER_DAY)
    return ParseContext(devices, device, max_future_ms)


def nmea_pin_map(pins: NmeaPins | None) -> NmeaPinMap | None:
    """Return a port's [port.nmea] table as the nmea parser takes it."""
    if pins is None:
        return None
    return {name: pin for name in NMEA_FIELDS if (pin := getattr(pins, name)) is not None}


class PortParser:
    """One port's parser: its format, its contexts and its per-port state (csv header)."""

    __slots__ = ("_csv", "_nmea", "context", "format", "untrusted")

    def __init__(self, config: Config, port: PortConfig) -> None:
        self.format = port.format
        self.context = parse_context(config, port.device)
        # An untrusted gateway clock cannot tell whether an MCU's own ts= lies in the future.
        self.untrusted = dataclasses.replace(self.context, max_future_ms=UNKNOWN_FUTURE_MS)
        self._csv = CsvParser(port.columns, port.header) if port.format == "csv" else None
        self._nmea = nmea_pin_map(port.nmea)

    @property
    def positional(self) -> bool:
        """Whether values are known by their place in the line (csv), not by a name next to them."""
        return self._csv is not None

    def parse(self, raw: bytes, now_ms: int, *, trusted: bool = True) -> Reading | Rejected | Ignored | None:
        """Parse one raw line (None for a blank one); never raises."""
        context = self.context if trusted else self.untrusted
        return parse_line(raw, self.format, context, now_ms, csv_parser=self._csv, nmea_pins=self._nmea)


@dataclasses.dataclass(frozen=True, slots=True)
class _Held:
    """An ms= line of the opening burst, held until a fresh line fixes the clock's anchor."""

    reading: Reading
    ts: int  # as mapped on arrival
    boot_id: str | None
    counted: int  # its ms= with wraps counted
    anchorings: int  # the clock's anchorings when it was mapped (another value: the MCU rebooted since)


@dataclasses.dataclass(slots=True)
class _Seen:
    """A reading of the resend window: its time (None: held, not yet on the wall clock) and its commit."""

    ts: int | None
    committed: asyncio.Future[None] | None  # None: committed in an earlier run


class PortPipeline:
    """One port's lines: parse, stamp, submit to the buffer, count, acknowledge."""

    def __init__(
        self,
        port: PortConfig,
        config: Config,
        submit: Submit,
        *,
        clock: ClockWatcher | None = None,
        hold: Hold | None = None,
    ):
        self.port = port
        self.stats = PortStats(path=port.path)
        self.source = SerialSource(
            port.path,
            port.baud,
            self.on_line,
            stats=self.stats,
            max_line_bytes=port.max_line_bytes,
            newline=port.newline,
            reset_on_open=port.reset_on_open,
        )
        self._submit = submit
        self._wall = clock
        self._hold = hold
        self._parser = PortParser(config, port)
        self._clock = McuClock()
        self._clock_domain: str | None = None
        self._seen: collections.OrderedDict[tuple[int, int | None], _Seen] = collections.OrderedDict()
        self._burst_ms: int | None = None  # when the first read after the current open arrived
        self._anchorings_at_open = -1  # the clock's anchorings then (-1: it had no anchor)
        self._burst_held: list[_Held] = []
        self._burst_timer: asyncio.TimerHandle | None = None
        self._fresh_implied: int | None = None  # the anchor the last fresh line of a held burst implied
        self._throttle = Throttle(BAD_LINES_LOGGED_PER_MINUTE)
        self._log = log.bind(port=port.path)
        self._before = _PortTotals()

    def on_line(self, raw: bytes, received_ms: int, first: bool) -> None:
        """Handle one framed line from the serial source."""
        if first:
            # A new open: its first read holds what the port buffered while nobody read it.
            self._burst_ms = received_ms
            self._anchorings_at_open = self._clock.anchorings if self._clock.state() is not None else -1
        result = self._parser.parse(raw, received_ms, trusted=self._wall is None or self._wall.trusted)
        if result is None:
            return
        if first and self._may_be_a_tail(result, received_ms):
            self.stats.count_ignored("partial")
            return
        if isinstance(result, Rejected):
            self.stats.count_bad(result.reason)
            if self._throttle.allow(kind=result.reason):
                self._log.warning(
                    "line_rejected",
                    reason=result.reason,
                    detail=result.detail,
                    suppressed=self._throttle.take_suppressed(),
                )
            return
        if isinstance(result, Ignored):
            self.stats.count_ignored(result.reason)
            return
        self._accept(result, received_ms)

    def _may_be_a_tail(self, result: Reading | Rejected | Ignored, received_ms: int) -> bool:
        """Whether the first line of an open may be the tail of a line the MCU was already printing."""
        if isinstance(result, Rejected):
            return True  # the usual tail: it does not parse
        if not isinstance(result, Reading) or not self._parser.positional:
            return False  # named values never parse when cut
        # A csv record knows its fields only by their place: a tail has the right number of fields and a cut
        # first value ("3.5,1017" of "23.5,1017"). It can only be one if it was on its way at the open.
        opened_ms = self.stats.opened_ms
        return self.stats.waiting_at_open or (opened_ms is not None and received_ms - opened_ms < TORN_TAIL_MS)

    def _accept(self, reading: Reading, received_ms: int) -> None:
        wall = self._wall
        boot_id: str | None = None
        if reading.ts_ms is not None or wall is None or self._hold is None or wall.trusted:
            if reading.ts_ms is not None:
                ts = reading.ts_ms
            elif reading.mcu_ms is not None:
                ts = self._mcu_time(reading.mcu_ms, received_ms, WALL_DOMAIN)
            else:
                ts = received_ms
        else:
            # The wall clock is untrusted: stamp on the boot's monotonic clock and hold until it is.
            boot_id = wall.boot_id
            ts = wall.mono_of(received_ms)
            if reading.mcu_ms is not None:
                ts = self._mcu_time(reading.mcu_ms, ts, boot_id)
        if reading.mcu_ms is not None and reading.ts_ms is None and self._held_back(reading, ts, boot_id, received_ms):
            return
        self._commit(reading, ts, boot_id)

    def _held_back(self, reading: Reading, ts: int, boot_id: str | None, received_ms: int) -> bool:
        """Hold ms= lines of the opening burst while the clock was anchored on them; True if this one is held.

        The lines a port buffered while the daemon was away all arrive in the first read after the open, each
        late by an unknown time. When the clock had no anchor to map them with (the first start, an MCU reboot
        among them), they are held until fresh lines (later reads, each with the largest ms= so far, two in a
        row agreeing on the anchor) fix it, at most BURST_HOLD_S or BURST_HOLD_LINES, then mapped with it.
        """
        clock = self._clock
        held = _Held(reading, ts, boot_id, clock.last_counted, clock.anchorings)
        if self._burst_held:
            if received_ms != self._burst_ms and clock.last_was_newest:
                # A fresh reading (a later read, the largest ms= so far); two in a row that agree fix the anchor
                # (one alone may still be late: an MCU catching up, a busy host).
                implied = received_ms - clock.last_counted
                if self._fresh_implied is not None and abs(implied - self._fresh_implied) <= BURST_AGREE_MS:
                    self._release_burst()
                    return False
                self._fresh_implied = implied
            self._burst_held.append(held)
            if len(self._burst_held) >= BURST_HOLD_LINES:
                self._release_burst()
            return True
        if received_ms != self._burst_ms or clock.anchorings == self._anchorings_at_open:
            return False
        self._burst_held.append(held)
        self._burst_timer = asyncio.get_running_loop().call_later(BURST_HOLD_S, self._release_burst)
        return True

    def _release_burst(self) -> None:
        """Map the held lines of the opening burst with the clock's anchor as it is now, and commit them."""
        if self._burst_timer is not None:
            self._burst_timer.cancel()
            self._burst_timer = None
        held, self._burst_held = self._burst_held, []
        self._fresh_implied = None
        clock = self._clock
        for item in held:
            ts = clock.wall_of(item.counted) if item.anchorings == clock.anchorings else item.ts
            self._commit(item.reading, ts, item.boot_id)

    def release_held(self) -> None:
        """Commit what the pipeline still holds back (the daemon is stopping)."""
        if self._burst_held:
            self._release_burst()

    def _commit(self, reading: Reading, ts: int, boot_id: str | None) -> None:
        points = [Point(reading.device, pin, ts, value) for pin, value in reading.values]
        if reading.seq is None:
            committed = self._store(points, boot_id, None)
        else:
            key = (reading.seq, reading.mcu_ms if reading.ts_ms is None else None)
            window_ts = None if boot_id is not None else ts
            earlier = self._resent(key, window_ts)
            if earlier is not None:
                self.stats.count_resent()
                if self.port.ack:
                    self._acknowledge_after(earlier.committed, reading.seq)
                return
            committed = self._store(points, boot_id, (self.port.path, key[0], key[1], window_ts))
            self._remember(key, _Seen(window_ts, committed))
            if self.port.ack:
                self._acknowledge_after(committed, reading.seq)
        self.stats.count_ok()

    def _store(self, points: list[Point], boot_id: str | None, resend: ResendKey | None) -> asyncio.Future[None]:
        if boot_id is None:
            return self._submit(points, resend=resend)
        hold = self._hold
        if hold is None:
            raise RuntimeError("a held reading needs the buffer's hold")
        return hold(points, boot_id, resend=resend)

    def _mcu_time(self, mcu_ms: int, received_ms: int, domain: str) -> int:
        clock = self._clock
        if domain != self._clock_domain:
            clock.reset()
            self._clock_domain = domain
        anchorings = clock.anchorings
        wall = clock.to_wall(mcu_ms, received_ms)
        if clock.anchorings != anchorings:
            self._log.info("mcu_clock_anchored", ms=mcu_ms, first=anchorings == 0, domain=domain)
        return wall

    def _resent(self, key: tuple[int, int | None], ts: int | None) -> _Seen | None:
        """Return the earlier copy of this reading, if the window holds one."""
        seen = self._seen.get(key)
        if seen is None:
            return None
        tolerance = RESEND_TS_TOLERANCE_MS if key[1] is not None else 0
        if seen.ts is not None and ts is not None and abs(seen.ts - ts) > tolerance:
            return None  # same seq= and ms=, another reading (the MCU rebooted)
        return seen

    def _remember(self, key: tuple[int, int | None], seen: _Seen) -> None:
        self._seen[key] = seen
        self._seen.move_to_end(key)
        while len(self._seen) > RESEND_WINDOW_PER_PORT:
            self._seen.popitem(last=False)
        if seen.committed is not None:
            seen.committed.add_done_callback(lambda future: self._forget_failed(key, seen, future))

    def _forget_failed(self, key: tuple[int, int | None], seen: _Seen, future: asyncio.Future[None]) -> None:
        # Not committed (disk full, closing): the next copy is stored, not taken for a resend.
        if (future.cancelled() or future.exception() is not None) and self._seen.get(key) is seen:
            del self._seen[key]

    def _acknowledge_after(self, committed: asyncio.Future[None] | None, seq: int) -> None:
        if committed is None or committed.done():
            if committed is None or (not committed.cancelled() and committed.exception() is None):
                self.source.write(b"ACK %d\n" % seq)
            return
        committed.add_done_callback(lambda future: self._acknowledge(future, seq))

    def reset_clock(self) -> None:
        """Forget the MCU clock anchor (the gateway's clock jumped or changed domain)."""
        self._clock.reset()

    def _acknowledge(self, future: asyncio.Future[None], seq: int) -> None:
        if not future.cancelled() and future.exception() is None:
            self.source.write(b"ACK %d\n" % seq)

    def restore_window(self, rows: Sequence[tuple[int, int | None, int | None]]) -> None:
        """Take up the resend window of earlier runs: (seq, ms, ts) rows, oldest first."""
        for seq, mcu_ms, ts in rows[-RESEND_WINDOW_PER_PORT:]:
            self._remember((seq, mcu_ms), _Seen(ts, None))

    def restore(self, saved: tuple[int, int, int, int, str] | None, now_ms: int) -> None:
        """Start `status`'s counters from what earlier runs counted (they are lifetime; metrics stay per process).

        The saved MCU clock is taken up too (see McuClock.resume), so that readings the MCU sent while the
        daemon was away, and resends of them, keep their true time.
        """
        if saved is None:
            return
        ok, bad, ignored, reconnects, detail = saved
        extra = _json_object(detail)
        self._before = _PortTotals(
            ok,
            bad,
            ignored,
            reconnects,
            _counts(extra.get("bad_reasons")),
            _counts(extra.get("ignored_reasons")),
            _count(extra.get("resent")),
        )
        clock = extra.get("mcu_clock")
        if isinstance(clock, dict):
            domain = clock.get("domain")
            state = _clock_state(clock)
            wall = self._wall
            if wall is None or wall.trusted:
                current, now = WALL_DOMAIN, now_ms
            else:
                current, now = wall.boot_id, wall.mono_of(now_ms)
            if state is not None and domain == current and self._clock.resume(state, now):
                self._clock_domain = domain
                self._log.info("mcu_clock_resumed", since_newest_ms=now - state.newest_at)
            else:
                self._log.info("mcu_clock_not_resumed", saved_domain=domain, domain=current, state=state is not None)

    def snapshot(self) -> tuple[str, str, int, int, int, int, str]:
        """Return the row `status` reads for this port: lifetime counters (and the MCU clock, for a restart)."""
        stats, before = self.stats, self._before
        extra: dict[str, Any] = {
            "bad_reasons": _added(before.bad_reasons, stats.bad_reasons),
            "ignored_reasons": _added(before.ignored_reasons, stats.ignored_reasons),
            "last_error": stats.last_error,
            "resent": before.resent + stats.resent,
        }
        state = self._clock.state()
        if state is not None and self._clock_domain is not None:
            extra["mcu_clock"] = {"domain": self._clock_domain, **dataclasses.asdict(state)}
        return (
            stats.path,
            str(stats.state),
            before.lines_ok + stats.lines_ok,
            before.lines_bad + stats.lines_bad,
            before.lines_ignored + stats.lines_ignored,
            before.reconnects + stats.reconnects,
            json.dumps(extra),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _PortTotals:
    """A port's counters from earlier runs of the daemon."""

    lines_ok: int = 0
    lines_bad: int = 0
    lines_ignored: int = 0
    reconnects: int = 0
    bad_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    ignored_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    resent: int = 0


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int)}


def _clock_state(saved: dict[str, Any]) -> McuClockState | None:
    values: list[int] = []
    for field in dataclasses.fields(McuClockState):
        value = saved.get(field.name)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        values.append(value)
    return McuClockState(*values)


def _added(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    return {key: before.get(key, 0) + now.get(key, 0) for key in sorted(before.keys() | now.keys())}
