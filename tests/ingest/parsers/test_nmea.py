"""The nmea format, on textbook sentences and on real receiver logs from gpsd (tests/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeforward.ingest.parsers import parse_line
from edgeforward.ingest.parsers.common import (
    Ignored,
    ParseContext,
    Reading,
    Rejected,
)
from edgeforward.ingest.parsers.nmea import KNOTS_TO_KMH, parse_nmea
from edgeforward.points import PinType

from .cases import (
    BU353_GGA,
    BU353_GSA,
    BU353_GSV,
    BU353_RMC,
    CTX,
    FUTURE_MS,
    GGA_PINS,
    NMEA,
    NOW,
    NZ,
    RMC_PINS,
    assert_reading,
    assert_rejected,
    nmea,
)

# ---------------------------------------------------------------- nmea


def test_nmea_gga_real_sentence() -> None:
    result = parse_nmea(BU353_GGA, GGA_PINS, "truck", CTX, NOW)
    assert_reading(result, Reading("truck", ((10, NZ), (11, 59.9), (12, 8))))
    assert isinstance(result, Reading)
    assert result.ts_ms is None


def test_nmea_rmc_real_sentence() -> None:
    result = parse_nmea(BU353_RMC, RMC_PINS, "truck", CTX, NOW)
    assert_reading(result, Reading("truck", ((10, NZ), (11, 0.69 * KNOTS_TO_KMH))))


def test_nmea_textbook_gga_and_gn_talker() -> None:
    textbook = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
    assert_reading(
        parse_nmea(textbook, GGA_PINS, "truck", CTX, NOW),
        Reading("truck", ((10, (11 + 31 / 60, 48 + 7.038 / 60)), (11, 545.4), (12, 8))),
    )
    gn_rmc = "$GNRMC,064607.000,A,4546.2282,N,00311.6590,E,0.76,0.00,230619,,,A*7D"
    assert_reading(
        parse_nmea(gn_rmc, RMC_PINS, "truck", CTX, NOW),
        Reading("truck", ((10, (3 + 11.6590 / 60, 45 + 46.2282 / 60)), (11, 0.76 * KNOTS_TO_KMH))),
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (BU353_GSA, Ignored("sentence")),
        (BU353_GSV, Ignored("sentence")),
        (nmea("PUBX,00,081350.00,4717.113210,N"), Ignored("sentence")),
        ("$GNRMC,,V,,,,,,,,,,N,V*37", Ignored("no_fix")),  # u-blox/Teseo before the first fix
        ("$GPGGA,,,,,,0,00,99.99,,,,,,*48", Ignored("no_fix")),
        (nmea("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W,N"), Ignored("no_fix")),
        (nmea("GPGGA,123519,,,,,1,00,,,M,,M,,"), Ignored("no_fix")),
        (nmea("GPRMC,123519,A,,,,,,,230394,,"), Ignored("no_fix")),
    ],
)
def test_nmea_ignored(line: str, expected: Ignored) -> None:
    assert parse_nmea(line, NMEA, "truck", CTX, NOW) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (BU353_GGA[:-2] + "7E", "checksum"),
        (BU353_GGA[:-3], "checksum"),
        (BU353_GGA[:-1], "checksum"),
        (BU353_GGA.replace("59.9", "59.8"), "checksum"),
        ("GPGGA,123519*47", "syntax"),
        ("$GPGGA,12,ü*47", "syntax"),
        (nmea("GPGGA,123519,4807.038"), "syntax"),
        (nmea("GPRMC,123519,A"), "syntax"),
        (nmea("GPGGA,123519,4807.038,X,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,4875.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,9107.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,4807.038,N,01131.000,E,x,08,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,high,M,46.9,M,,"), "bad_value"),
        (nmea("GPGGA,123519,4807.038,N,01131.000,E,1,-8,0.9,545.4,M,46.9,M,,"), "bad_value"),
        (nmea("GPRMC,123519,A,4807.038,N,01131.000,E,fast,084.4,230394,003.1,W"), "bad_value"),
    ],
)
def test_nmea_rejected(line: str, reason: str) -> None:
    assert_rejected(parse_nmea(line, NMEA, "truck", CTX, NOW), reason)


def test_nmea_garbage_before_the_sentence_and_lowercase_checksum() -> None:
    line = "\x00\x7f noise " + BU353_GGA[:-2] + BU353_GGA[-2:].lower()
    assert isinstance(parse_nmea(line, GGA_PINS, "truck", CTX, NOW), Reading)


def test_nmea_pins_must_fit() -> None:
    assert_rejected(parse_nmea(BU353_GGA, dict(location="v11"), "truck", CTX, NOW), "bad_value", "v11")
    assert_rejected(parse_nmea(BU353_GGA, dict(altitude_m="v10"), "truck", CTX, NOW), "bad_value", "v10")
    assert_rejected(parse_nmea(BU353_GGA, dict(location="v20"), "truck", CTX, NOW), "unknown_pin", "v20")
    assert_rejected(parse_nmea(BU353_GGA, dict(location="x"), "truck", CTX, NOW), "unknown_key")
    assert_rejected(parse_nmea(BU353_GGA, NMEA, "nobody", CTX, NOW), "unknown_device")
    # quantities adapt to numeric and string pins
    pins = dict(altitude_m="v13", satellites="v14")
    assert_reading(parse_nmea(BU353_GGA, pins, "truck", CTX, NOW), Reading("truck", ((13, 60), (14, "8"))))


def test_nmea_no_configured_pin_for_the_sentence() -> None:
    assert parse_nmea(BU353_GGA, dict(speed_kmh="v11"), "truck", CTX, NOW) == Ignored("no_values")


# ---------------------------------------------------------------- real receiver logs (tests/data)

DATA = Path(__file__).parents[2] / "data"
LOG_PINS = dict(location="v10", altitude_m="v11", speed_kmh="v13", satellites="v12")
GPS = {10: PinType.LOCATION, 11: PinType.DOUBLE, 12: PinType.INTEGER, 13: PinType.DOUBLE}
CTX_GPS = ParseContext({"truck": GPS}, "truck", FUTURE_MS)


def naive_fixes(lines: list[str]) -> int:
    """Count GGA/RMC sentences with a fix, the simplest possible way (an independent check)."""
    fixes = 0
    for line in lines:
        fields = line.split("*")[0].split(",")
        kind = fields[0][3:]
        gga_fix = kind == "GGA" and fields[6] not in ("", "0") and bool(fields[2])
        rmc_fix = kind == "RMC" and fields[2] == "A" and bool(fields[3])
        fixes += gga_fix or rmc_fix
    return fixes


@pytest.mark.parametrize(
    ("name", "fixes", "no_fix", "other", "box"),
    [
        # box: (lon_min, lon_max, lat_min, lat_max) from the place each log names or was taken at
        ("gpsd-bu353s4.log", 50, 0, 40, (175.2, 175.4, -37.9, -37.7)),  # Hamilton, NZ
        ("gpsd-bu353-glonass.log", 17, 20, 75, (37.5, 37.7, 55.6, 55.8)),  # Moscow, GN talker
        ("gpsd-bt451.log", 26, 8, 110, (23.5, 23.7, 55.7, 55.9)),  # Lithuania, starts indoors
        ("gpsd-gpslim236.log", 40, 0, 36, (2.2, 2.4, 48.8, 49.0)),  # near Paris
    ],
)
def test_nmea_real_receiver_logs(
    name: str, fixes: int, no_fix: int, other: int, box: tuple[float, float, float, float]
) -> None:
    raw_lines = [raw for raw in (DATA / name).read_bytes().splitlines() if raw.strip() and not raw.startswith(b"#")]
    results = [parse_line(raw, "nmea", CTX_GPS, NOW, nmea_pins=LOG_PINS) for raw in raw_lines]
    readings = [r for r in results if isinstance(r, Reading)]
    ignored = [r.reason for r in results if isinstance(r, Ignored)]
    assert not [r for r in results if isinstance(r, Rejected)]
    assert len(readings) == fixes == naive_fixes([raw.decode() for raw in raw_lines])
    assert ignored.count("no_fix") == no_fix and ignored.count("sentence") == other
    for reading in readings:
        values = dict(reading.values)
        location = values[10]
        assert isinstance(location, tuple)
        lon, lat = location
        assert box[0] <= lon <= box[1] and box[2] <= lat <= box[3]
        assert all(isinstance(values[pin], float) for pin in (11, 13) if pin in values)
        assert isinstance(values.get(12, 0), int)


def test_nmea_real_log_with_corrupted_sentences() -> None:
    lines = [raw.decode() for raw in (DATA / "gpsd-bu353s4.log").read_bytes().splitlines() if raw.startswith(b"$")]
    corrupted = [line.replace("3747", "3748", 1) if "GGA" in line else line for line in lines]
    results = [parse_nmea(line, LOG_PINS, "truck", CTX_GPS, NOW) for line in corrupted]
    bad = [r.reason for r in results if isinstance(r, Rejected)]
    assert bad == ["checksum"] * 25
    assert sum(isinstance(r, Reading) for r in results) == 25  # the RMC fixes
