"""`edgeforward ports` and `init` on real pseudo-terminals fed with kv, json, csv and real NMEA logs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import serial

from edgeforward.ingest.links import explain
from edgeforward.ports import detect

from .conftest import edgeforward

DATA = Path(__file__).resolve().parent / "data"
SNIFF_S = "1.5"
LINE_INTERVAL_S = 0.01
NOW_MS = 1_764_000_000_000
NMEA_LOGS = ("gpsd-bu353s4.log", "gpsd-bu353-glonass.log", "gpsd-gpslim236.log", "gpsd-bt451.log")


def kv_lines(i: int) -> list[str]:
    return [f'v1={20 + i / 10:.2f} v2={i} v3="door {i % 2}" v5={"true" if i % 2 else "false"}']


def json_lines(i: int) -> list[str]:
    return [json.dumps({"v1": 20.5 + i, "v2": i, "v4": [24.1052, 56.9496]})]


def csv_lines(i: int) -> list[str]:
    row = f"{int(time.time() * 1000)},{20 + i / 10:.2f},{i}"
    return ["ts,v1,v2", row] if i % 20 == 0 else [row]


def nmea_feed(name: str) -> Callable[[int], list[str]]:
    lines = (DATA / name).read_text(errors="replace").splitlines()
    return lambda i: [lines[i % len(lines)]]


class FedPty:
    """A pseudo-terminal whose master side a thread writes lines to, as a microcontroller would."""

    def __init__(self, produce: Callable[[int], list[str]]) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self._produce = produce
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)

    def _feed(self) -> None:
        os.write(self.master, b"tail of a line printed before the port was opened\n")
        i = 0
        while not self._stop.is_set():
            data = "".join(f"{line}\r\n" for line in self._produce(i)).encode()
            with contextlib.suppress(BlockingIOError):  # nobody reads yet and the buffer is full: lost, as on a UART
                os.write(self.master, data)
            i += 1
            time.sleep(LINE_INTERVAL_S)

    def start(self) -> FedPty:
        os.set_blocking(self.master, False)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.master)
        os.close(self.slave)


@contextlib.contextmanager
def fed(*producers: Callable[[int], list[str]]) -> Iterator[list[FedPty]]:
    ptys = [FedPty(produce).start() for produce in producers]
    try:
        yield ptys
    finally:
        for pty in ptys:
            pty.close()


def test_sniff_recognises_kv_json_csv_and_nmea_with_pin_types() -> None:
    producers = [kv_lines, json_lines, csv_lines, *(nmea_feed(name) for name in NMEA_LOGS)]
    with fed(*producers) as ptys:
        result = edgeforward("ports", *(p.path for p in ptys), "--sniff", SNIFF_S, "--json", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = {entry["path"]: entry["sniff"] for entry in json.loads(result.stdout)}
    kv, js, csv, *nmea = (reports[p.path] for p in ptys)
    assert kv["format"] == "kv"
    assert kv["devices"] == {"sniffed": {"v1": "double", "v2": "integer", "v3": "string", "v5": "boolean"}}
    assert js["format"] == "json"
    assert js["devices"] == {"sniffed": {"v1": "double", "v2": "integer", "v4": "location"}}
    assert csv["format"] == "csv"
    assert csv["devices"] == {"sniffed": {"v1": "double", "v2": "integer"}}
    for report in (kv, js, csv, *nmea):
        assert report["lines_per_second"] > 10 and report["sample"], report
        assert "tail of a line" not in " ".join(report["sample"])  # the first, maybe partial, line is left out
    for name, report in zip(NMEA_LOGS, nmea, strict=True):
        assert report["format"] == "nmea", name
        assert "location" in report["nmea"], name
    # A person reads the same at 80 columns: labels first, the format and the pins in words.
    with fed(kv_lines) as (pty,):
        human = edgeforward("ports", pty.path, "--sniff", SNIFF_S, env={"COLUMNS": "80"})
    assert human.returncode == 0, human.stderr
    assert "  format      kv (" in human.stdout
    assert "  pins        v1 double, v2 integer, v3 string, v5 boolean" in human.stdout
    assert "  may open    yes" in human.stdout


def test_ports_describes_links_globs_urls_and_missing_paths(tmp_path: Path) -> None:
    with fed(kv_lines) as (pty,):
        link = tmp_path / "usb-Arduino_Uno_1234-if00"
        link.symlink_to(pty.path)
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []

        def serve() -> None:
            conn, _ = server.accept()
            accepted.append(conn)
            for i in range(400):
                try:
                    conn.sendall(f"v1={i}.5\n".encode())
                except OSError:
                    return
                time.sleep(LINE_INTERVAL_S)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        url = f"socket://127.0.0.1:{port}"
        result = edgeforward(
            "ports", str(link), str(tmp_path / "usb-Arduino*"), url, "/dev/ttyNONE", "--sniff", "1", timeout=60
        )
        thread.join(10)
        for conn in accepted:
            conn.close()
        server.close()
    assert result.returncode == 1  # /dev/ttyNONE
    blocks = result.stdout.split("\n\n")
    assert blocks[0].startswith(f"{link}\n  device      {pty.path}\n")
    assert blocks[1].startswith(f"{tmp_path / 'usb-Arduino*'}\n  device      {pty.path}\n")
    assert "  format      kv (" in blocks[0] and "  format      kv (" in blocks[1]
    assert blocks[2].startswith(url) and "  format      kv (" in blocks[2] and "  pins        v1 double" in blocks[2]
    assert blocks[3].rstrip() == "/dev/ttyNONE\n  may open    no: no device found"


def test_init_writes_a_config_check_config_accepts(tmp_path: Path) -> None:
    output = tmp_path / "edgeforward.toml"
    with fed(kv_lines, nmea_feed("gpsd-bu353s4.log")) as (kv, gps):
        args = ["--port", kv.path, "--port", gps.path, "--device", "pump", "--device", "truck"]
        result = edgeforward("init", *args, "--output", str(output), "--seconds", SNIFF_S, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        again = edgeforward("init", *args, "--output", str(output), "--seconds", SNIFF_S)
    assert again.returncode == 2 and "exists (--force replaces it)" in again.stderr
    text = output.read_text()
    assert 'token_credential = "pump"' in text and "LoadCredential=pump:/etc/edgeforward/pump.token" in text
    assert 'format = "nmea"' in text and 'location = "v1"' in text
    assert 'v1 = "double"' in text and 'v5 = "boolean"' in text
    check = edgeforward("check-config", "--config", str(output))
    assert check.returncode == 0, check.stderr
    assert "ok (2 devices, 2 ports)" in check.stdout


def test_init_writes_nothing_when_a_port_prints_nothing_known(tmp_path: Path) -> None:
    output = tmp_path / "edgeforward.toml"
    with fed(lambda i: ["hello world, I am not a sensor"]) as (pty,):
        result = edgeforward("init", "--port", pty.path, "--output", str(output), "--seconds", "1")
    assert result.returncode == 1 and "nothing written" in result.stdout
    assert "format      unknown: no format understands these lines" in result.stdout
    assert not output.exists()


def test_detection_widens_types_only_as_far_as_the_values_need() -> None:
    lines = [b"v1=1 v2=1 v3=true", b"v1=2.5 v2=2 v3=false", b'v1=3 v2=3 v3="x y"', b"dev=fan v9=24.1,56.9"]
    found = detect(lines, NOW_MS)
    assert found is not None and found.format == "kv" and found.readings == 4
    shown = {name: {pin: kind.value for pin, kind in pins.items()} for name, pins in found.devices.items()}
    assert shown == {"sniffed": {1: "double", 2: "integer", 3: "string"}, "fan": {9: "location"}}
    assert detect([b"\x00\x01 not text", b"hello"], NOW_MS) is None


def test_a_missing_port_is_named_in_one_plain_sentence() -> None:
    try:
        serial.Serial("/dev/ttyUSB-edgeforward-none")
    except serial.SerialException as exc:
        assert explain(exc) == "could not open port /dev/ttyUSB-edgeforward-none: No such file or directory"
    else:
        raise AssertionError("the port opened")
