"""The MCU clock: fresh lines, replays, wraps, reboots, a slow crystal."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeforward.ingest.mcu_clock import (
    MCU_COUNTER_SPAN,
    MCU_DRIFT_PPM,
    MCU_MAX_AHEAD_MS,
    MCU_RESUME_MAX_MS,
    McuClock,
)
from edgeforward.ingest.parsers.common import (
    MIN_TS_MS,
    MS_PER_DAY,
)

from .parsers.cases import (
    FAST,
    NOW,
)

# ---------------------------------------------------------------- MCU clock


def test_clock_first_line_is_stamped_on_arrival() -> None:
    assert McuClock().to_wall(5_000, NOW) == NOW


def test_clock_replayed_lines_get_their_true_time() -> None:
    clock = McuClock()
    boot = NOW - 10_000_000
    for second in range(60):  # fresh lines, 3 ms on the wire
        mcu = 1_000_000 + second * 1000
        assert clock.to_wall(mcu, boot + mcu + 3) == boot + mcu + 3
    # the gateway missed 10 minutes; the MCU replays its buffer in one burst, then goes on
    gap_start = 1_060_000
    last_fresh = boot + gap_start - 1000 + 3
    arrival = boot + gap_start + 600_000
    for index in range(600):
        mcu = gap_start + index * 1000
        error = clock.to_wall(mcu, arrival + index) - (boot + mcu)
        aging = (arrival + index - last_fresh) * MCU_DRIFT_PPM // 1_000_000
        assert 0 <= error <= 3 + aging <= 3 + 602
    mcu = gap_start + 600_000
    assert clock.to_wall(mcu, boot + mcu + 2) == boot + mcu + 2


def test_clock_wrap_around() -> None:
    clock = McuClock()
    boot = NOW - MCU_COUNTER_SPAN
    last = MCU_COUNTER_SPAN - 500
    assert clock.to_wall(last, boot + last) == boot + last
    # 1000 ms later the 32-bit counter reads 500; this line arrived 40 ms late
    late = clock.to_wall(500, boot + MCU_COUNTER_SPAN + 500 + 40) - (boot + MCU_COUNTER_SPAN + 500)
    assert 0 <= late <= 1  # the anchor aged 1 ms in that second
    # a fresh line anchors the new epoch; a replayed one still maps onto it
    assert clock.to_wall(600, boot + MCU_COUNTER_SPAN + 600) == boot + MCU_COUNTER_SPAN + 600
    assert clock.to_wall(700, boot + MCU_COUNTER_SPAN + 60_000) - (boot + MCU_COUNTER_SPAN + 700) <= 60


def test_clock_reboot_reanchors() -> None:
    clock = McuClock()
    clock.to_wall(50_000, NOW)
    clock.to_wall(51_000, NOW + 1_000)
    # the MCU rebooted two minutes later: millis() starts again near 0
    assert clock.to_wall(800, NOW + 121_000) == NOW + 121_000
    assert clock.to_wall(1_800, NOW + 122_005) - (NOW + 122_000) <= 1
    assert clock.to_wall(2_800, NOW + 123_000) == NOW + 123_000


def test_clock_backwards_near_wrap_but_too_early_is_no_wrap() -> None:
    last = MCU_COUNTER_SPAN - 10_000
    # had it wrapped, 10 s + 15 s would have to have passed; only 20 s did: the MCU rebooted (15 s ago)
    clock = McuClock()
    clock.to_wall(last, NOW)
    assert clock.to_wall(15_000, NOW + 20_000) == NOW + 20_000
    # 49.7 days of uptime less 83 minutes cannot have begun after the line 20 s ago: a replay
    clock = McuClock()
    clock.to_wall(last, NOW)
    assert clock.to_wall(last - 5_000_000, NOW + 20_000) == NOW - 5_000_000 + 20


def test_clock_follows_a_slow_crystal() -> None:
    clock = McuClock()
    boot = NOW - 30 * MS_PER_DAY
    ratio = 1 - 500e-6  # the MCU's millis() runs 0.05 % slow
    worst = 0
    for minute in range(10 * 24 * 60):
        true = boot + minute * 60_000
        mcu = round(minute * 60_000 * ratio) % MCU_COUNTER_SPAN
        worst = max(worst, abs(clock.to_wall(mcu, true + 2) - true))
    assert worst <= 100


def test_clock_reset() -> None:
    clock = McuClock()
    clock.to_wall(1_000, NOW)
    clock.reset()
    assert clock.to_wall(1_000, NOW + 50_000) == NOW + 50_000


@FAST
@given(st.lists(st.tuples(st.integers(0, 2 * MCU_COUNTER_SPAN), st.integers(-(10**7), 10**7)), min_size=1, max_size=40))
def test_clock_is_never_ahead_of_arrival(lines: list[tuple[int, int]]) -> None:
    clock = McuClock()
    received = NOW
    for mcu, step in lines:
        received += step
        assert clock.to_wall(mcu, received) <= received + MCU_MAX_AHEAD_MS


@FAST
@given(
    st.integers(MIN_TS_MS, NOW),
    st.integers(0, MCU_COUNTER_SPAN - 1),
    st.lists(st.tuples(st.integers(1, 10**7), st.integers(0, 5_000)), min_size=1, max_size=60),
)
def test_clock_one_boot_with_wraps(boot: int, uptime: int, steps: list[tuple[int, int]]) -> None:
    clock = McuClock()
    true = boot + uptime
    for gap, delay in steps:
        true += gap
        wall = clock.to_wall((true - boot) % MCU_COUNTER_SPAN, true + delay)
        assert true <= wall <= true + delay


boot_segments = st.lists(
    st.tuples(
        st.integers(0, 10**9),  # off time before this boot
        st.integers(0, 1_000),  # uptime of its first line
        st.lists(st.tuples(st.integers(1_001, 10**7), st.integers(0, 5_000)), min_size=1, max_size=15),
    ),
    min_size=1,
    max_size=6,
)


@FAST
@given(st.integers(MIN_TS_MS, NOW), boot_segments)
def test_clock_reboots(start: int, segments: list[tuple[int, int, list[tuple[int, int]]]]) -> None:
    clock = McuClock()
    true = start
    for off, first_uptime, steps in segments:
        boot = true + off
        uptime = first_uptime
        for gap, delay in [(0, 0), *steps]:
            uptime += gap
            true = boot + uptime
            wall = clock.to_wall(uptime, true + delay)
            assert true <= wall <= true + delay


def test_clock_resends_after_newer_lines_keep_their_time() -> None:
    # The README sketch: one reading a second, each resent after newer ones until acknowledged.
    clock = McuClock()
    boot = NOW - 3_600_000
    for second in range(3_590, 3_600):
        assert clock.to_wall(second * 1000, boot + second * 1000 + 2) == boot + second * 1000 + 2
    # 20 s away: the readings of 3600..3619 s were sent into the void; back, the fresh one comes first ...
    back = boot + 3_620_000
    assert clock.to_wall(3_620_000, back + 3) == back + 3
    # ... then the resends, oldest first: ms= goes back 20 s, more than could have passed since a reboot
    for index, second in enumerate(range(3_600, 3_620)):
        wall = clock.to_wall(second * 1000, back + 10 + index)
        assert 0 <= wall - (boot + second * 1000) <= 3, second
    # and a reboot still is one: millis() starts again
    assert clock.to_wall(300, back + 5_000) == back + 5_000


def test_clock_resend_soon_after_boot_is_taken_for_a_reboot() -> None:
    # The limit: a resend of a reading the MCU took less than the time since its newest line after its boot.
    clock = McuClock()
    clock.to_wall(3_000, NOW)
    assert clock.to_wall(1_000, NOW + 2_500) == NOW + 2_500  # taken for a reboot: stamped on arrival


def test_clock_state_is_taken_up_after_a_restart() -> None:
    clock = McuClock()
    boot = NOW - 50_000
    for ms in (40_000, 41_000, 42_000):
        clock.to_wall(ms, boot + ms + 1)
    state = clock.state()
    assert state is not None
    assert (state.anchor, state.newest, state.newest_at) == (boot + 1, 42_000, boot + 42_001)
    # a new daemon: the lines the MCU sent meanwhile arrive in one burst at reopen, 8 s late
    resumed = McuClock()
    assert resumed.resume(state, boot + 50_000)
    assert resumed.to_wall(43_000, boot + 51_000) == boot + 1 + 43_000 + 8  # aged 8 ms in the 9 s since
    fresh = McuClock()  # without the saved state the burst would anchor on itself
    assert fresh.to_wall(43_000, boot + 51_000) == boot + 51_000
    # a state older than MCU_RESUME_MAX_MS is not taken up (the MCU may have rebooted and run on)
    stale = McuClock()
    assert not stale.resume(state, state.newest_at + MCU_RESUME_MAX_MS + 1)
    assert stale.state() is None
    assert McuClock().state() is None
