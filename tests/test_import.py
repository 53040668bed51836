"""`edgeforward import` on real-layout files: Campbell TOA5 (tests/data/toa5/) and header-row CSV."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from edgeforward.cloudsim import CloudSim

from .conftest import TOKEN, DaemonProcess, Pty, edgeforward, ledger_adds_up, wait_for, write_config

DATA = Path(__file__).parent / "data" / "toa5"
WEIR = {
    "name": "weir",
    "token": TOKEN,
    "pins": {"v1": "double", "v2": "integer", "v3": "integer", "v4": "double"},
}
TOA5_MAP = ("--map", "AirTC_Avg=v1", "--map", "RH=v2", "--map", "WindDir=v3", "--map", "BattV_Min=v4")
OLD_DATA_LIMITS = {"max_age_days": 36500}  # the example files are from 2024
DRAIN_TIMEOUT_S = 30.0


def weir_config(tmp_path: Path, server: str = "http://127.0.0.1:9", ports: list[dict[str, Any]] | None = None) -> Path:
    return write_config(tmp_path, server, ports or [], [WEIR], limits=OLD_DATA_LIMITS)


def run_import(config: Path, *args: str) -> tuple[int, str, str]:
    result = edgeforward("import", "--config", str(config), "--device", "weir", *args)
    return result.returncode, result.stdout, result.stderr


def ledger(config: Path) -> dict[str, Any]:
    result = edgeforward("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)["devices"]["weir"]
    return document


def stored(config: Path) -> list[tuple[int, int, str]]:
    with contextlib.closing(sqlite3.connect(config.parent / "buffer.db")) as db:
        return [tuple(row) for row in db.execute("SELECT pin, ts, value FROM points ORDER BY pin, ts")]


def utc_ms(text: str, zone: str = "UTC") -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def test_toa5_file_is_imported_once_and_a_second_import_queues_nothing(tmp_path: Path) -> None:
    config = weir_config(tmp_path)
    code, out, err = run_import(config, *TOA5_MAP, str(DATA / "Weir3_Hourly.dat"))
    assert code == 0, err
    assert "24 rows, 96 points queued, 0 already imported, 0 empty, 0 refused" in out
    points = stored(config)
    assert len(points) == 96
    assert (1, utc_ms("2024-03-10 00:00:00"), "3.5") in points  # AirTC_Avg -> v1, double
    assert (3, utc_ms("2024-03-10 01:00:00"), "37") in points  # WindDir -> v3, integer
    assert ledger(config)["received"] == ledger(config)["queued"] == 96

    code, out, err = run_import(config, *TOA5_MAP, str(DATA / "Weir3_Hourly.dat"))
    assert code == 0, err
    assert "24 rows, 0 points queued, 96 already imported" in out
    entry = ledger(config)
    assert entry["received"] == entry["queued"] == 96 and ledger_adds_up(entry)
    assert len(stored(config)) == 96


def test_toa5_logger_local_time_zone(tmp_path: Path) -> None:
    config = weir_config(tmp_path)
    code, _, err = run_import(config, "--tz", "America/Denver", "--map", "BattV_Min=v4", str(DATA / "Weir3_Daily.dat"))
    assert code == 0, err
    times = sorted(ts for pin, ts, _ in stored(config) if pin == 4)
    assert times[0] == utc_ms("2024-03-02 00:00:00", "America/Denver")
    assert len(times) == 7


def test_bad_rows_are_named_by_row_and_reason_and_the_rest_is_taken(tmp_path: Path) -> None:
    config = weir_config(tmp_path)
    code, out, err = run_import(config, *TOA5_MAP, str(DATA / "Weir3_Hourly_BadRows.dat"))
    assert code == 1
    refused = {int(line.split(":")[1]): line for line in err.splitlines() if line.startswith(str(DATA))}
    assert sorted(refused) == [7, 8, 9, 12], err
    assert "bad_value" in refused[7] and "abc" in refused[7]
    assert "4 fields, the header has 8" in refused[8]
    assert "timestamp: cannot read '2024-03-11 24:70:00'" in refused[9]
    assert "bad_value" in refused[12] and "3.5" in refused[12]
    assert "9 rows, 16 points queued, 0 already imported, 1 empty, 4 refused" in out
    # NAN in a mapped column is a missing value, not an error; out-of-range numbers are passed on.
    assert (2, utc_ms("2024-03-11 06:00:00"), "150") in stored(config)
    # A second import refuses the same rows again and queues nothing twice.
    code, out, _ = run_import(config, *TOA5_MAP, str(DATA / "Weir3_Hourly_BadRows.dat"))
    assert code == 1 and "0 points queued, 16 already imported" in out
    assert ledger(config)["received"] == 16


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Bad_Empty.dat", "empty file"),
        ("Bad_Truncated.dat", "line 1: unexpected end of data"),
        ("Bad_NotToa5.dat", "line 1: not a TOA5 file (first field 'TOA6')"),
        ("Bad_FileLineFields.dat", "line 1: the TOA5 file line has 9 fields, expected 8"),
        ("Bad_HeaderOnly.dat", "line 3: missing TOA5 units line"),
        ("Bad_UnitsCount.dat", "line 3: 7 fields, the field names line has 8"),
        ("Bad_DuplicateNames.dat", "line 2: column 'AirTC_Avg' is named twice"),
    ],
)
def test_malformed_toa5_files_are_refused_whole(tmp_path: Path, name: str, reason: str) -> None:
    config = weir_config(tmp_path)
    code, out, err = run_import(config, "--layout", "toa5", *TOA5_MAP[:2], str(DATA / name))
    assert code == 1
    assert f"{DATA / name}: refused: {reason}" in err
    assert "0 points queued" in out


def test_csv_formats_time_zones_and_overlapping_files(tmp_path: Path) -> None:
    config = weir_config(tmp_path)
    now_s = int(time.time()) - 3600
    first = tmp_path / "first.csv"
    first.write_text("ts,v1,v2\n" + "".join(f"{(now_s + i) * 1000},{i}.25,{i}\n" for i in range(10)))
    code, out, err = run_import(config, str(first))
    assert code == 0 and "10 rows, 20 points queued" in out, err
    # The logger's next file repeats the last five rows and adds five.
    second = tmp_path / "second.csv"
    second.write_text("ts,v1,v2\n" + "".join(f"{(now_s + i) * 1000},{i}.25,{i}\n" for i in range(5, 15)))
    code, out, _ = run_import(config, str(second))
    assert code == 0 and "10 rows, 10 points queued, 10 already imported" in out
    assert ledger(config)["queued"] == 30

    local = datetime.fromtimestamp(now_s, ZoneInfo("Europe/Riga"))
    iso = tmp_path / "iso.csv"
    iso.write_text(f"Date_Time;Temp\n{local.strftime('%d.%m.%Y %H:%M:%S')};21,5\n")
    code, _, err = run_import(
        config, "--delimiter", ";", "--time-column", "Date_Time", "--time-format", "%d.%m.%Y %H:%M:%S",
        "--tz", "Europe/Riga", "--map", "Temp=v4", str(iso),
    )  # fmt: skip
    # A decimal comma is not a number: the row is refused with its reason.
    assert code == 1 and f"{iso}:2: bad_value" in err
    iso.write_text(f"Date_Time;Temp\n{local.strftime('%d.%m.%Y %H:%M:%S')};21.5\n")
    code, _, err = run_import(
        config, "--delimiter", ";", "--time-column", "Date_Time", "--time-format", "%d.%m.%Y %H:%M:%S",
        "--tz", "Europe/Riga", "--map", "Temp=v4", str(iso),
    )  # fmt: skip
    assert code == 0, err
    assert (4, now_s * 1000, "21.5") in stored(config)

    offsets = tmp_path / "offsets.csv"
    offsets.write_text(f"timestamp,v1\n{datetime.fromtimestamp(now_s + 100, UTC).isoformat()},1.5\nyesterday,2\n")
    code, out, err = run_import(config, str(offsets))
    assert code == 1 and f"{offsets}:3: timestamp: cannot read 'yesterday'" in err
    assert (1, (now_s + 100) * 1000, "1.5") in stored(config)


def test_bad_options_exit_2_and_name_the_problem(tmp_path: Path) -> None:
    config = weir_config(tmp_path)
    result = edgeforward("import", "--config", str(config), "--device", "nobody", str(DATA / "Weir3_Hourly.dat"))
    assert result.returncode == 2 and "--device: no [[device]] is named 'nobody'" in result.stderr
    code, _, err = run_import(config, "--map", "AirTC_Avg=v9", str(DATA / "Weir3_Hourly.dat"))
    assert code == 2 and "v9 is not declared" in err
    code, _, err = run_import(config, "--tz", "Mars/Olympus", str(DATA / "Weir3_Hourly.dat"))
    assert code == 2 and "unknown time zone" in err


async def test_import_while_the_daemon_runs_reaches_the_cloud_once(
    tmp_path: Path, cloud: CloudSim, pty_port: Pty, daemon_factory: Callable[[Path], DaemonProcess]
) -> None:
    pump = {"name": "pump", "token": TOKEN, "pins": {"v1": "double", "v2": "integer"}}
    config = write_config(tmp_path, str(cloud.url), [{"path": pty_port.path, "device": "pump"}], [pump])
    daemon = daemon_factory(config)
    daemon.start()
    await daemon.wait_started()
    now_s = int(time.time()) - 7200
    backlog = tmp_path / "backlog.csv"
    backlog.write_text("ts,v1,v2\n" + "".join(f"{(now_s + 60 * i) * 1000},{i}.5,{i}\n" for i in range(50)))
    result = edgeforward("import", "--config", str(config), "--device", "pump", str(backlog))
    assert result.returncode == 0, result.stderr
    pty_port.write("v2=1000\n")  # live data goes on arriving

    def drained() -> bool:
        entry = daemon.status()["devices"]["pump"]
        return bool(entry["received"] >= 100 and entry["queued"] == 0)

    await wait_for(drained, DRAIN_TIMEOUT_S, interval=0.3)
    history = {p.value: p.ts_ms for p in cloud.points(TOKEN, 2) if p.path == "history"}
    assert all(history[i] == (now_s + 60 * i) * 1000 for i in range(50))
    assert len([p for p in cloud.points(TOKEN, 2) if p.value != 1000]) == 50
    assert daemon.stop() == 0


def test_the_device_plan_decides_how_old_a_row_may_be(tmp_path: Path) -> None:
    """[device.limits] max_age_days is the device's own: import takes rows the cloud plan alone would refuse."""
    device = {**WEIR, "limits": OLD_DATA_LIMITS}
    config = write_config(tmp_path, "http://127.0.0.1:9", [], [device], limits={"max_age_days": 30})
    code, _, err = run_import(config, *TOA5_MAP, str(DATA / "Weir3_Hourly.dat"))
    assert code == 0, err
    assert ledger(config)["queued"] > 0
