"""Where a device stands: its contract state, why it waits and until when, and the snapshot observers read.

The forwarder is the only writer of a device's state. `notify` (the watchdog), `metrics` (/healthz),
`status` and the demo read the `DeviceSnapshot` it publishes; none of them recomputes a budget.
"""

from __future__ import annotations

import collections
import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..timebase import Clock

META_KEY_PREFIX: Final = "forward:"  # meta table: one JSON document per device, read by `status`
PERSIST_MIN_INTERVAL_S: Final = 30.0  # a moved next attempt alone is stored at most this often (SD wear)


class DeviceState(enum.StrEnum):
    """Where a device stands with the cloud (the contract's `state`)."""

    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"
    PARKED = "parked"


class WaitReason(enum.StrEnum):
    """Why queued points are not being sent right now."""

    PACING = "pacing"  # the next live tick or history round, by the interval in effect
    POINTS_BUDGET = "points_budget"  # today's timestamped points are spent (history waits for the UTC day)
    MESSAGES_BUDGET = "messages_budget"  # this month's messages are spent (for this path)
    QUOTA = "quota"  # the cloud answered that a quota is reached
    RETRY_AFTER = "retry_after"  # the cloud asked us to come back later (429 Retry-After)
    BACKOFF = "backoff"  # the cloud could not be reached: retrying with backoff
    REFUSED = "refused"  # the cloud refused a request for an unknown reason: retrying slowly
    PARKED = "parked"  # the token was refused: rechecked now and then
    STORE = "store"  # the buffer could not record what a request would spend: retrying


# Waits the plan or the cloud imposes: a device in one of them is behaving as designed, not stalled.
BY_DESIGN: Final = frozenset(
    {WaitReason.PACING, WaitReason.POINTS_BUDGET, WaitReason.MESSAGES_BUDGET, WaitReason.QUOTA}
)
# Waits that a success of another device on the same server ends at once (the network path is back).
ENDED_BY_PEER_SUCCESS: Final = frozenset({WaitReason.BACKOFF})


class Activity(enum.StrEnum):
    """What the forwarder's loop is doing."""

    STARTING = "starting"
    WORKING = "working"  # deciding, reading the buffer or waiting for the cloud's answer
    SLEEPING = "sleeping"  # until `next_check_mono`, or earlier when woken


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """One device as its forwarder sees it at one moment."""

    name: str
    state: DeviceState
    reason: str | None
    activity: Activity
    waiting: WaitReason | None  # why points wait (None: nothing queued for the cloud, or sending)
    next_check_mono: float | None  # when the loop looks again (monotonic), None while working
    next_attempt_wall: float | None  # when the next request is planned (Unix time), None: none planned
    working_since_mono: float  # when the current step (or the sleep) began
    live_interval_s: float | None  # the live interval in effect (None: live path off or unaffordable)
    history_interval_s: float  # the pause between history rounds in effect
    last_attempt_wall: float | None
    last_success_wall: float | None
    outcomes: Mapping[str, int]
    parked_pins: Mapping[int, str] = field(default_factory=dict)

    @property
    def by_design(self) -> bool:
        """True when the device waits because the plan or the cloud says so."""
        return self.waiting in BY_DESIGN

    def overdue_s(self, now_mono: float) -> float:
        """How far past its own deadline the loop is (0 while on time); a working step counts from its start."""
        if self.activity is Activity.SLEEPING and self.next_check_mono is not None:
            return max(0.0, now_mono - self.next_check_mono)
        return max(0.0, now_mono - self.working_since_mono)

    def as_status(self) -> dict[str, Any]:
        """The fields `status` shows (stored in the buffer's meta table as JSON)."""
        return {
            "waiting_reason": None if self.waiting is None else str(self.waiting),
            "next_attempt_ts": None if self.next_attempt_wall is None else int(self.next_attempt_wall * 1000),
            "live_interval_s": _rounded(self.live_interval_s),
            "history_interval_s": _rounded(self.history_interval_s),
            "parked_pins": {f"v{pin}": reason for pin, reason in sorted(self.parked_pins.items())},
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else round(value, 1)


def status_meta_key(device: str) -> str:
    """The meta key under which a device's published status fields are stored."""
    return META_KEY_PREFIX + device


def parse_status_meta(text: str | None) -> dict[str, Any]:
    """Read back what `DeviceSnapshot.as_status` stored (empty when nothing or garbage is stored)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class DeviceTracker:
    """The state machine of one device: contract state, activity, the wait and its deadline."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.name = name
        self._clock = clock
        self.state = DeviceState.UNKNOWN
        self.reason: str | None = None
        self.activity = Activity.STARTING
        self.waiting: WaitReason | None = None
        self.next_check_mono: float | None = None
        self.next_attempt_wall: float | None = None
        self.working_since_mono = clock.monotonic()
        self.live_interval_s: float | None = None
        self.history_interval_s = 0.0
        self.last_attempt_wall: float | None = None
        self.last_success_wall: float | None = None
        self.last_success_mono: float | None = None
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.parked_pins: dict[int, str] = {}
        self._persisted: dict[str, Any] | None = None
        self._persisted_mono = -math.inf

    def set_state(self, state: DeviceState, reason: str | None) -> bool:
        """Change the contract state; True if it changed."""
        if state is self.state and reason == self.reason:
            return False
        self.state, self.reason = state, reason
        return True

    def working(self) -> None:
        """The loop woke and works (decides, reads, sends)."""
        self.activity = Activity.WORKING
        self.next_check_mono = None
        self.working_since_mono = self._clock.monotonic()

    def progressed(self) -> None:
        """A step of work finished (a request answered, a batch read): the working clock restarts."""
        self.working_since_mono = self._clock.monotonic()

    def sleeping(self, until_mono: float, waiting: WaitReason | None, attempt_mono: float | None) -> None:
        """The loop sleeps until `until_mono`; points wait for `waiting`; the next request is due at `attempt_mono`."""
        now_mono = self._clock.monotonic()
        self.activity = Activity.SLEEPING
        self.next_check_mono = until_mono
        self.working_since_mono = now_mono
        self.waiting = waiting
        if attempt_mono is None or math.isinf(attempt_mono):
            self.next_attempt_wall = None
        else:
            self.next_attempt_wall = self._clock.wall() + max(0.0, attempt_mono - now_mono)

    def snapshot(self) -> DeviceSnapshot:
        """Return the device as it stands now."""
        return DeviceSnapshot(
            name=self.name,
            state=self.state,
            reason=self.reason,
            activity=self.activity,
            waiting=self.waiting,
            next_check_mono=self.next_check_mono,
            next_attempt_wall=self.next_attempt_wall,
            working_since_mono=self.working_since_mono,
            live_interval_s=self.live_interval_s,
            history_interval_s=self.history_interval_s,
            last_attempt_wall=self.last_attempt_wall,
            last_success_wall=self.last_success_wall,
            outcomes=dict(self.outcomes),
            parked_pins=dict(self.parked_pins),
        )

    def forget_persisted(self) -> None:
        """The last status fields could not be stored: store them again next time."""
        self._persisted = None

    def status_to_persist(self) -> dict[str, Any] | None:
        """The status fields when they changed enough to be written again, else None."""
        current = self.snapshot().as_status()
        previous = self._persisted
        now_mono = self._clock.monotonic()
        if previous is not None:
            shape = {k: v for k, v in current.items() if k != "next_attempt_ts"}
            if shape == {k: v for k, v in previous.items() if k != "next_attempt_ts"} and (
                current["next_attempt_ts"] == previous["next_attempt_ts"]
                or now_mono - self._persisted_mono < PERSIST_MIN_INTERVAL_S
            ):
                return None
        self._persisted = current
        self._persisted_mono = now_mono
        return current
