"""Shared parts of the benchmarks: results, machine facts, /proc readers, backlogs, configs and processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeforward.points import PinType
from edgeforward.store import Buffer, counting, filing, queries
from tests.conftest import Pty, toml_value

TOKEN = "tok-bench-0123456789abcdef0123456"
DEVICE = "pump"
PINS = (1, 2, 3, 4)
PIN_TYPES = {1: PinType.DOUBLE, 2: PinType.INTEGER, 3: PinType.DOUBLE, 4: PinType.DOUBLE}
POINTS_PER_LINE = len(PINS)
BACKLOG_AGE_S = 86_400.0  # a backlog spans the last day: inside max_age_days, so nothing expires
CLOSED_SERVER = "http://127.0.0.1:9"  # the discard port: connection refused at once
PROCESS_START_TIMEOUT_S = 60.0
PROCESS_STOP_TIMEOUT_S = 15.0
POLL_S = 0.005
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Result:
    """One measured figure beside its same-run baseline."""

    bench: str
    name: str
    value: float
    unit: str
    baseline: float | None
    baseline_name: str
    target: str
    met: bool | None  # None: no target for this figure
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """The figure divided by its baseline."""
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    def as_json(self) -> dict[str, Any]:
        """The result as a JSON-ready mapping."""
        return {
            "bench": self.bench,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "notes": self.notes,
        }


def machine() -> dict[str, Any]:
    """Facts about the machine the figures were taken on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "filesystem_of_workdir": "see --workdir (default: the system temp dir)",
    }


def fmt(value: float) -> str:
    """Format a figure compactly with thousands separators."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def now_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def kv_lines(count: int, *, offset: int = 0) -> list[bytes]:
    """`count` distinct kv lines with one value for each of PINS (no ts: stamped on receipt)."""
    return [
        b"v1=%d.%d v2=%d v3=1013.%02d v4=%d.5" % (i % 40, i % 10, i % 1000, i % 100, i % 7)
        for i in range(offset, offset + count)
    ]


def open_pty() -> Pty:
    """A raw pseudo-terminal; the reader opens `path`, the feeder writes to `master`."""
    master, slave = os.openpty()
    tty.setraw(slave)
    return Pty(master, slave, os.ttyname(slave))


# /proc ---------------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def io_counters(pid: int | str = "self") -> dict[str, int]:
    """The /proc/PID/io counters of a process (write_bytes: what reached the block layer)."""
    counters: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, value = line.split(":", 1)
        counters[key] = int(value)
    return counters


# backlogs ------------------------------------------------------------------------------------------


async def _create_schema(path: Path) -> None:
    buffer = Buffer(path)
    await buffer.open()
    await buffer.close()


def create_buffer_file(path: Path) -> None:
    """Create an empty buffer database with edgeforward's own schema."""
    asyncio.run(_create_schema(path))


def build_backlog(path: Path, points: int) -> None:
    """Create a buffer database holding `points` queued points of DEVICE, ledger included (bulk insert)."""
    create_buffer_file(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO devices (id, name) VALUES (1, ?)", (DEVICE,))
        span_ms = int(BACKLOG_AGE_S * 1000)
        start_ms = now_ms() - span_ms
        conn.execute(
            "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < ?) "
            "INSERT INTO points (device_id, pin, ts, value) "
            "SELECT 1, 1 + x % ?, ? + x * ? / ?, printf('%.1f', (x % 997) / 10.0) FROM c",
            (points, len(PINS), start_ms, span_ms, max(points, 1)),
        )
        conn.execute("INSERT INTO ledger (device_id, received, queued) VALUES (1, ?, ?)", (points, points))
        # Every point is filed (in the pin index), as in a file the daemon wrote them into in bulk.
        newest = conn.execute("SELECT COALESCE(MAX(id), 0) FROM points").fetchone()[0]
        conn.execute(filing.SET_MARK, (str(newest + 1),))
        conn.execute(counting.PASS_TAIL)  # ... and counted in the ledger above (store/counting.py)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()


def backlog_copy(work: Path, points: int, dest: Path) -> float:
    """Copy a backlog of `points` to `dest`, building its template once per run; return build seconds."""
    template = work / f"backlog-{points}.db"
    took = 0.0
    if not template.exists():
        started = time.perf_counter()
        build_backlog(template, points)
        took = time.perf_counter() - started
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, dest)
    return took


def ledger(path: Path) -> dict[str, int]:
    """The summed ledger of a buffer file, as `status` reads it (the tail of uncounted points included)."""
    conn = sqlite3.connect(path)
    try:
        total = queries.ledger_total(conn)
        queued_rows = conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]
    finally:
        conn.close()
    counts = {("downs" if name == "downsampled" else name): value for name, value in total.items()}
    counts["rows"] = int(queued_rows)
    return counts


def adds_up(counts: dict[str, int]) -> bool:
    """received = delivered + queued + expired + dropped + rejected + downsampled, and queued = rows."""
    out = sum(counts[k] for k in ("delivered_live", "delivered_history", "queued", "expired", "dropped", "rejected"))
    return counts["received"] == out + counts["downs"] and counts["queued"] == counts["rows"]


# configs and processes -----------------------------------------------------------------------------


def write_config(
    directory: Path,
    *,
    server: str,
    ports: list[dict[str, Any]],
    forward: dict[str, Any] | None = None,
    buffer: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    log_level: str = "info",
) -> Path:
    """Write an edgeforward config for DEVICE (pins v1..v4) with the daemon's defaults unless given."""
    sections: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        sections.append(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))

    table("cloud", {"server": server})
    if limits:
        table("cloud.limits", limits)
    table("buffer", {"path": "buffer.db", **(buffer or {})})
    if forward:
        table("forward", forward)
    table("log", {"level": log_level, "format": "json"})
    for port in ports:
        sections.append("[[port]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in port.items()))
    sections.append(
        f'[[device]]\nname = "{DEVICE}"\ntoken = "{TOKEN}"\n[device.pins]\n'
        'v1 = "double"\nv2 = "integer"\nv3 = "double"\nv4 = "double"\n'
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "edgeforward.toml"
    path.write_text("\n".join(sections))
    return path


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Any, within_s: float, what: str, interval: float = POLL_S) -> None:
    """Poll `condition()` until it is true; raise after `within_s`."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within_s} s")
        time.sleep(interval)


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class CloudSimProcess:
    """`edgeforward cloudsim --any-token` (default limits) in its own process, so it has its own core."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = directory / f"cloudsim-{self.port}.log"
        self._extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The cloudsim's process id."""
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> CloudSimProcess:
        self._log.parent.mkdir(parents=True, exist_ok=True)
        with self._log.open("ab") as log:
            argv = [sys.executable, "-m", "edgeforward", "cloudsim", "--listen", f"127.0.0.1:{self.port}"]
            self.process = subprocess.Popen(
                [*argv, "--any-token", *self._extra],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: _connectable(self.port), PROCESS_START_TIMEOUT_S, "cloudsim listening", 0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(PROCESS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PROCESS_STOP_TIMEOUT_S)


class Daemon:
    """`edgeforward run` in a subprocess, its JSON log in a file."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, *, cwd: Path | None = None) -> None:
        self.config = config
        self.log_path = config.parent / "daemon.log"
        self._env = env
        self._cwd = cwd  # `python -m` imports edgeforward from here first (another tree of the code)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start the daemon (stamping the moment in `started_at`)."""
        with self.log_path.open("wb") as log:  # a fresh log per start: wait_started must not see the last one
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgeforward", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self._env or {})},
                cwd=self._cwd,
            )

    def log(self) -> str:
        """The daemon's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_started(self) -> float:
        """Wait for the daemon_started line; return seconds since start()."""

        def started() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()[-2000:]}")
            return '"daemon_started"' in self.log()

        wait_until(started, PROCESS_START_TIMEOUT_S, "daemon_started")
        return time.monotonic() - self.started_at

    def stop(self) -> int:
        """SIGTERM and wait."""
        assert self.process is not None
        self.process.terminate()
        try:
            return self.process.wait(PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(PROCESS_STOP_TIMEOUT_S)

    def stop_counting_writes(self) -> tuple[int, int]:
        """SIGTERM, wait for the exit; return (exit code, write_bytes of its whole life, final checkpoint included)."""
        assert self.process is not None
        self.process.terminate()
        # Not reaped yet (WNOWAIT): /proc/PID/io of the exited process still holds its counters.
        deadline = time.monotonic() + PROCESS_STOP_TIMEOUT_S
        while os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
            if time.monotonic() > deadline:
                self.process.kill()
            time.sleep(POLL_S)
        written = io_counters(self.process.pid)["write_bytes"]
        return self.process.wait(PROCESS_STOP_TIMEOUT_S), written

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()


class Feeder:
    """`python -m tests.bench.feeder`: writes a file to pty masters at full speed, one thread per pty."""

    def __init__(self, data: Path, masters: list[int]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.feeder", str(data), *map(str, masters)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=masters,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            raise RuntimeError("feeder did not start")

    def go(self) -> float:
        """Start writing; return the perf_counter at the moment it was told to."""
        assert self.process.stdin is not None
        started = time.perf_counter()
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()
        return started

    def wait(self) -> None:
        """Wait for every byte to be written."""
        self.process.wait(PROCESS_STOP_TIMEOUT_S * 4)

    def close(self) -> None:
        """Stop the feeder if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(PROCESS_STOP_TIMEOUT_S)


@contextlib.contextmanager
def ptys(count: int) -> Iterator[list[Pty]]:
    """`count` raw pseudo-terminals, closed afterwards."""
    opened = [open_pty() for _ in range(count)]
    try:
        yield opened
    finally:
        for pty in opened:
            pty.close()
