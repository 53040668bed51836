"""What the parser tests share: devices, contexts, the checks every parse result must pass."""

from __future__ import annotations

from functools import reduce
from typing import Any

from hypothesis import HealthCheck, settings

from edgeforward.ingest.parsers.common import (
    IGNORE_REASONS,
    INT64_MAX,
    INT64_MIN,
    MS_PER_DAY,
    REJECT_REASONS,
    Ignored,
    ParseContext,
    Reading,
    Rejected,
)
from edgeforward.points import STRING_MAX_BYTES, PinType, Value

NOW = 1_764_000_000_000
FUTURE_MS = 30 * MS_PER_DAY
PUMP = {
    0: PinType.INTEGER,
    1: PinType.DOUBLE,
    2: PinType.INTEGER,
    3: PinType.STRING,
    4: PinType.LOCATION,
    5: PinType.BOOLEAN,
    6: PinType.ENUM,
}
TRUCK = {10: PinType.LOCATION, 11: PinType.DOUBLE, 12: PinType.INTEGER, 13: PinType.INTEGER, 14: PinType.STRING}
DEVICES = {"pump": PUMP, "tank": {1: PinType.DOUBLE}, "truck": TRUCK}
CTX = ParseContext(DEVICES, "pump", FUTURE_MS)
NO_DEFAULT = ParseContext(DEVICES, None, FUTURE_MS)
NMEA = dict(location="v10", altitude_m="v11", speed_kmh="v11", satellites="v12")
GGA_PINS = dict(location="v10", altitude_m="v11", satellites="v12")
RMC_PINS = dict(location="v10", speed_kmh="v11")
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def typed(value: Any) -> Any:
    """A value with its exact type, so that 1 == 1.0 == True do not pass for each other."""
    if isinstance(value, tuple):
        return ("tuple", tuple(typed(item) for item in value))
    return (type(value).__name__, value)


def assert_reading(result: object, expected: Reading) -> None:
    assert isinstance(result, Reading), result
    assert result == expected
    assert [typed(value) for _, value in result.values] == [typed(value) for _, value in expected.values]


def assert_rejected(result: object, reason: str, *fragments: str) -> None:
    assert isinstance(result, Rejected), result
    assert result.reason == reason, result
    for fragment in fragments:
        assert fragment in result.detail, result


def check_invariants(result: object, ctx: ParseContext = CTX) -> None:
    """What every parse result must satisfy, whatever the input."""
    assert result is None or isinstance(result, Reading | Rejected | Ignored)
    if isinstance(result, Rejected):
        assert result.reason in REJECT_REASONS
        assert len(result.detail) < 400
    elif isinstance(result, Ignored):
        assert result.reason in IGNORE_REASONS
    elif isinstance(result, Reading):
        declared = ctx.devices[result.device]
        assert result.values
        assert len({pin for pin, _ in result.values}) == len(result.values)
        for pin, value in result.values:
            assert value_fits(declared[pin], value), (pin, value)
        assert result.ts_ms is None or result.mcu_ms is None


def value_fits(pin_type: PinType, value: Value) -> bool:
    if pin_type in (PinType.INTEGER, PinType.ENUM):
        return type(value) is int and INT64_MIN <= value <= INT64_MAX
    if pin_type is PinType.DOUBLE:
        return type(value) is float
    if pin_type is PinType.BOOLEAN:
        return type(value) is bool
    if pin_type is PinType.STRING:
        return type(value) is str and len(value.encode()) <= STRING_MAX_BYTES
    return (
        isinstance(value, tuple)
        and all(type(part) is float for part in value)
        and -180 <= value[0] <= 180
        and -90 <= value[1] <= 90
    )


def nmea(body: str) -> str:
    """Wrap a sentence body as $body*hh with its checksum."""
    return f"${body}*{reduce(lambda acc, char: acc ^ ord(char), body, 0):02X}"


# Real receiver output: GlobalSat BU-353-S4 near Hamilton NZ, from gpsd's test/daemon/bu353s4.log (BSD-2-Clause).
BU353_GGA = "$GPGGA,030719.000,3747.0873,S,17518.8938,E,1,08,1.1,59.9,M,23.7,M,,0000*7D"
BU353_RMC = "$GPRMC,030719.000,A,3747.0873,S,17518.8938,E,0.69,181.39,311214,,,A*7D"
BU353_GSA = "$GPGSA,A,3,17,28,06,01,30,20,26,13,,,,,1.8,1.1,1.5*33"
BU353_GSV = "$GPGSV,3,1,12,17,72,207,32,28,59,095,31,06,35,347,25,01,29,132,23*7B"
NZ = (175 + 18.8938 / 60, -(37 + 47.0873 / 60))
