"""Is the wall clock right? Kernel sync state, timesyncd's flag, clock jumps, and readings held until it is.

A board without a real-time clock (a Raspberry Pi) starts at the time it last saved (or 1970) and only
learns the real time from NTP. Until then the gateway does not stamp readings with its wall clock: it
stamps them with CLOCK_BOOTTIME and the boot id, holds them, and gives them their wall time
(wall_now - (boottime_now - boottime_then)) once the clock is trusted.

The trust rule (`[clock] require_sync`):
- `false`: the wall clock is always trusted (the behaviour before this module).
- `true`: trusted once the kernel reports NTP synchronization (adjtimex: neither TIME_ERROR nor
  STA_UNSYNC) or systemd-timesyncd has written /run/systemd/timesync/synchronized.
- `"auto"` (default): as `true`, and also when the clock did not come from an unsynchronized guess:
  the kernel set it from a hardware RTC at boot (/sys/class/rtc/rtc*/hctosys), or this is a virtual
  machine (its clock is its host's), or adjtimex cannot be called at all (nothing to wait for). These
  weaker signals are vetoed when the wall clock reads earlier than this release's date or than the
  last time the clock was trusted (stored in the buffer): an RTC with a flat battery says 2000.
  A wall clock that merely looks plausible is never proof: a Pi restores the time it shut down at.
Trust is sticky for the rest of the boot (stored in the buffer, so a restart keeps it): the kernel
marks a synced clock unsynchronized again after hours without NTP, while the clock is still good.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import glob
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog

if TYPE_CHECKING:
    from .store import Buffer

log = structlog.get_logger(__name__)

TIME_ERROR: Final = 5  # adjtimex return value: the clock is not synchronized
STA_UNSYNC: Final = 0x0040  # adjtimex status bit: the clock is not synchronized
TIMESYNC_FLAG: Final = Path("/run/systemd/timesync/synchronized")
BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")
RTC_HCTOSYS_GLOB: Final = "/sys/class/rtc/rtc*/hctosys"
CPUINFO_PATH: Final = Path("/proc/cpuinfo")
CLOCKSOURCES_PATH: Final = Path("/sys/devices/system/clocksource/clocksource0/available_clocksource")
PARAVIRT_CLOCKSOURCES: Final = frozenset({"kvm-clock", "xen", "hyperv_clocksource_tsc_page", "hyperv_clocksource_msr"})
# 2026-11-01T00:00:00Z: no wall clock reading earlier than this release is right.
RELEASE_FLOOR_MS: Final = 1_793_491_200_000
JUMP_THRESHOLD_MS: Final = 2_000
CHECK_INTERVAL_S: Final = 1.0
# While the clock is untrusted an MCU's own ts= cannot be judged "too far ahead": accept any.
UNKNOWN_FUTURE_MS: Final = 2**62
TRUSTED_MARK_INTERVAL_S: Final = 60.0

META_CLOCK: Final = "clock"  # JSON: trusted, reason, boot_id, since (ms), jumps, last_jump_ms
META_CLOCK_TRUSTED_MS: Final = "clock_trusted_ms"  # the latest wall time seen while trusted
META_CLOCK_TRUSTED_BOOT: Final = "clock_trusted_boot"  # the boot id in which the clock was trusted

RequireSync = Literal["auto"] | bool
PreviousBoots = Literal["hold", "stamp"]


@dataclass(frozen=True, slots=True)
class KernelSync:
    """What adjtimex(2) says about the system clock."""

    state: int  # TIME_OK .. TIME_ERROR
    status: int  # STA_* bits
    maxerror_us: int

    @property
    def synchronized(self) -> bool:
        """True when the kernel's clock is disciplined by an NTP client."""
        return self.state != TIME_ERROR and not self.status & STA_UNSYNC


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    """struct timex of <sys/timex.h> (Linux), with the trailing padding the kernel writes."""

    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    )


@functools.cache
def _adjtimex() -> Callable[[Any], int] | None:
    """libc's adjtimex, loaded once: the process's own symbols (no find_library, which spawns ldconfig)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function: Callable[[Any], int] = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    return function


def read_adjtimex() -> KernelSync | None:
    """Ask the kernel (read-only, modes=0) whether the clock is synchronized; None where it cannot be asked."""
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    timex = _Timex()
    timex.modes = 0
    state = int(adjtimex(ctypes.byref(timex)))
    if state < 0:
        return None
    return KernelSync(state=state, status=int(timex.status), maxerror_us=int(timex.maxerror))


def timesyncd_synchronized(flag: Path = TIMESYNC_FLAG) -> bool:
    """Return whether systemd-timesyncd has marked the clock synchronized since boot."""
    return flag.exists()


def timesyncd_present(flag: Path = TIMESYNC_FLAG) -> bool:
    """Return whether systemd-timesyncd runs here (its flag file will tell when the clock is synced)."""
    return flag.parent.is_dir()


def hardware_clock() -> str | None:
    """Return where the clock came from when it was not a guess: "rtc", "vm", or None."""
    for path in glob.glob(RTC_HCTOSYS_GLOB):
        with contextlib.suppress(OSError):
            if Path(path).read_text().strip() == "1":
                return "rtc"
    with contextlib.suppress(OSError):
        if PARAVIRT_CLOCKSOURCES & set(CLOCKSOURCES_PATH.read_text().split()):
            return "vm"
    with contextlib.suppress(OSError):
        for line in CPUINFO_PATH.read_text().splitlines():
            if line.startswith("flags") and "hypervisor" in line.split():
                return "vm"
    return None


def read_boot_id() -> str:
    """Return this boot's id (a fresh id per process where the kernel does not tell it)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return f"process-{uuid.uuid4()}"


def wall_ms() -> int:
    """Return the wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def boot_ms() -> int:
    """Return CLOCK_BOOTTIME in milliseconds (monotonic, counts suspend; 0 at boot)."""
    clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return time.clock_gettime_ns(clock) // 1_000_000


@dataclass(frozen=True, slots=True)
class ClockSources:
    """Where the watcher reads time and sync state; tests replace any of them."""

    wall_ms: Callable[[], int] = wall_ms
    mono_ms: Callable[[], int] = boot_ms
    kernel_sync: Callable[[], KernelSync | None] = read_adjtimex
    timesync_flag: Callable[[], bool] = timesyncd_synchronized
    timesync_present: Callable[[], bool] = timesyncd_present
    hardware_clock: Callable[[], str | None] = hardware_clock
    boot_id: Callable[[], str] = read_boot_id


@dataclass(frozen=True, slots=True)
class Trust:
    """Whether the wall clock may stamp readings, and why."""

    trusted: bool
    reason: str


def assess(require_sync: RequireSync, sources: ClockSources, floor_ms: int = RELEASE_FLOOR_MS) -> Trust:
    """Apply the trust rule of the module docstring once."""
    if require_sync is False:
        return Trust(True, "config")
    kernel = sources.kernel_sync()
    if kernel is not None and kernel.synchronized:
        return Trust(True, "adjtimex")
    if sources.timesync_flag():
        return Trust(True, "timesyncd")
    if require_sync is True:
        return Trust(False, "unsynchronized")
    # adjtimex may be filtered (systemd's ProtectClock=): then only a machine without timesyncd is given the benefit.
    blind = kernel is None and not sources.timesync_present()
    origin = sources.hardware_clock() or ("no_adjtimex" if blind else None)
    if origin is None:
        return Trust(False, "unsynchronized")
    if sources.wall_ms() < floor_ms:
        return Trust(False, f"{origin}_before_floor")
    return Trust(True, origin)


@dataclass(frozen=True, slots=True)
class Check:
    """What one look at the clock found."""

    jump_ms: int | None  # the step of wall - monotonic since the previous look, when beyond the threshold
    became_trusted: bool


class ClockWatcher:
    """Decides whether gateway stamps use the wall clock, notices jumps, and settles held readings."""

    def __init__(
        self,
        require_sync: RequireSync = "auto",
        previous_boots: PreviousBoots = "hold",
        *,
        sources: ClockSources | None = None,
        jump_threshold_ms: int = JUMP_THRESHOLD_MS,
        check_interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        self.sources = sources or ClockSources()
        self.require_sync = require_sync
        self.previous_boots = previous_boots
        self.boot_id = self.sources.boot_id()
        self.jump_threshold_ms = jump_threshold_ms
        self.check_interval_s = check_interval_s
        self.floor_ms = RELEASE_FLOOR_MS
        self.trust = Trust(False, "not_checked")
        self.trusted_since_ms: int | None = None
        self.jumps = 0
        self.last_jump_ms = 0
        self._offset_ms = self.sources.wall_ms() - self.sources.mono_ms()
        self._settled = False

    @property
    def trusted(self) -> bool:
        """Whether readings are stamped with the wall clock now."""
        return self.trust.trusted

    def mono_of(self, received_ms: int) -> int:
        """Return the monotonic time of a wall-clock receipt time taken moments ago."""
        return self.sources.mono_ms() - max(0, self.sources.wall_ms() - received_ms)

    async def load(self, buffer: Buffer) -> None:
        """Take what the buffer remembers (trusted earlier this boot, the last trusted time), then look."""
        with contextlib.suppress(ValueError, TypeError):
            self.floor_ms = max(RELEASE_FLOOR_MS, int(await buffer.meta(META_CLOCK_TRUSTED_MS) or 0))
        if self.require_sync is not False and await buffer.meta(META_CLOCK_TRUSTED_BOOT) == self.boot_id:
            self.trust = Trust(True, "earlier_this_boot")
            self.trusted_since_ms = self.sources.wall_ms()
        self.check()

    def check(self) -> Check:
        """Look at the clock once: detect a jump, and whether it has become trusted."""
        offset = self.sources.wall_ms() - self.sources.mono_ms()
        step = offset - self._offset_ms
        self._offset_ms = offset
        jump = step if abs(step) > self.jump_threshold_ms else None
        if jump is not None:
            self.jumps += 1
            self.last_jump_ms = jump
        if self.trust.trusted:
            return Check(jump, False)
        self.trust = assess(self.require_sync, self.sources, self.floor_ms)
        if self.trust.trusted:
            self.trusted_since_ms = self.sources.wall_ms()
        return Check(jump, self.trust.trusted)

    async def run(self, buffer: Buffer, reset_clocks: Callable[[], None]) -> None:
        """Watch the clock until cancelled; `reset_clocks` forgets every port's MCU clock anchor."""
        if self.trusted:
            await self.settle(buffer)
        else:
            log.warning(
                "clock_untrusted",
                reason=self.trust.reason,
                boot_id=self.boot_id,
                detail="readings stamped by the gateway are held until the clock is synchronized",
            )
            await self._mark(buffer)
        marked = time.monotonic()
        while True:
            await asyncio.sleep(self.check_interval_s)
            was_trusted = self.trusted
            check = self.check()
            if check.jump_ms is not None and was_trusted:
                # Anchors taken on the wall clock before the jump would place every ms= reading wrongly.
                reset_clocks()
                log.warning("clock_jumped", jump_ms=check.jump_ms, jumps=self.jumps)
            elif check.jump_ms is not None:
                log.info("clock_stepped_while_untrusted", jump_ms=check.jump_ms)
            if check.became_trusted:
                # MCU anchors were taken on the monotonic clock: take them afresh on the wall clock.
                reset_clocks()
                await self.settle(buffer)
                marked = time.monotonic()
            elif check.jump_ms is not None or (self.trusted and time.monotonic() - marked >= TRUSTED_MARK_INTERVAL_S):
                await self._mark(buffer)
                marked = time.monotonic()

    async def settle(self, buffer: Buffer) -> None:
        """Give this boot's held readings their wall time (once), deal with earlier boots', record trust."""
        if self._settled:
            return
        self._settled = True
        settled = await buffer.settle_held(
            self.boot_id,
            self.sources.wall_ms(),
            self.sources.mono_ms(),
            stamp_previous_boots=self.previous_boots == "stamp",
        )
        await self._mark(buffer)
        log.info(
            "clock_trusted",
            reason=self.trust.reason,
            rebased=settled.rebased,
            stamped_previous_boots=settled.stamped,
        )
        if settled.unstamped:
            log.warning(
                "clock_held_unstamped",
                held_unstamped=settled.unstamped,
                detail="readings held in an earlier boot that never synced its clock; "
                'set [clock] previous_boots = "stamp" to send them at their latest possible time',
            )

    async def _mark(self, buffer: Buffer) -> None:
        """Store the clock state for `status`, and the last trusted time and boot for the next start."""
        items = {META_CLOCK: _clock_json(self)}
        if self.trusted:
            items[META_CLOCK_TRUSTED_MS] = str(self.sources.wall_ms())
            items[META_CLOCK_TRUSTED_BOOT] = self.boot_id
        await buffer.set_meta(items)


def _clock_json(watcher: ClockWatcher) -> str:
    return json.dumps(
        {
            "trusted": watcher.trusted,
            "reason": watcher.trust.reason,
            "boot_id": watcher.boot_id,
            "since": watcher.trusted_since_ms,
            "jumps": watcher.jumps,
            "last_jump_ms": watcher.last_jump_ms,
        },
        sort_keys=True,
    )
