"""The pipeline: the one parse-context builder, the port parser, the resend window, the saved MCU clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeforward.config import parse_config
from edgeforward.ingest.parsers.common import (
    MS_PER_DAY,
    Ignored,
    Reading,
)
from edgeforward.ingest.parsers.nmea import KNOTS_TO_KMH
from edgeforward.ingest.pipeline import PortParser

from .parsers.cases import (
    BU353_GSV,
    BU353_RMC,
    NOW,
    NZ,
    assert_reading,
    assert_rejected,
)


def test_port_parser_of_each_format(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "device": [
            {"name": "truck", "token": "t" * 32, "pins": {"v10": "location", "v11": "double"}},
            {"name": "pump", "token": "p" * 32, "pins": {"v1": "double", "v2": "integer"}},
        ],
        "port": [
            {
                "path": "/dev/ttyGPS",
                "format": "nmea",
                "device": "truck",
                "nmea": {"location": "v10", "speed_kmh": "v11"},
            },
            {"path": "/dev/ttyLOG", "format": "csv", "device": "pump", "header": True},
            {"path": "/dev/ttyACM0", "format": "kv", "device": "pump"},
        ],
    }
    config = parse_config(raw, tmp_path / "edgeforward.toml")
    gps, logger, mcu = (PortParser(config, port) for port in config.ports)
    assert gps.context.max_future_ms == round(config.cloud.limits.max_future_days * MS_PER_DAY)
    assert_reading(
        gps.parse(BU353_RMC.encode() + b"\r\n", NOW), Reading("truck", ((10, NZ), (11, 0.69 * KNOTS_TO_KMH)))
    )
    assert gps.parse(BU353_GSV.encode(), NOW) == Ignored("sentence")
    assert logger.parse(b"v2,v1", NOW) == Ignored("header")
    assert_reading(logger.parse(b"3,4", NOW), Reading("pump", ((2, 3), (1, 4.0))))
    assert_reading(mcu.parse(b"v2=5 v1=6", NOW), Reading("pump", ((2, 5), (1, 6.0))))
    assert_rejected(mcu.parse(b"v10=1", NOW), "unknown_pin")
