"""Inside a booted Debian (systemd as PID 1): install edgeforward as the README says and check the unit for real.

Run by tests/test_systemd_boot.py as root in the container, with the system Python (standard library only).
argv: SOURCE (a copy of the checkout, read-only) WHEELS (a directory of wheels for pip). Prints one JSON
object per check ({"check": ..., "ok": ..., ...}) and exits 1 if any check failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tty
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

UNIT = "edgeforward"
CLONE = Path("/root/edgeforward")
CONFIG = Path("/etc/edgeforward/edgeforward.toml")
DROP_IN = Path("/etc/systemd/system/edgeforward.service.d/ci.conf")
VENV_PYTHON = "/opt/edgeforward/bin/python"
CLOUD = "127.0.0.1:8080"
TOKEN = "ci-device-token-0123456789"
INSTALL_HEADING = "## Install on a gateway"
USB_NODE = "/dev/ttyUSB0"  # major 188: admitted by number though usbserial is not loaded here
OTHER_NODE = "/dev/ttyCI9"  # major 189 (usb_device), which the unit does not admit: the control
MAX_EXPOSURE = 2.0
STOP_WITHIN_S = 2.0
BUFFER = Path("/var/lib/edgeforward/buffer.db")  # config/edgeforward.toml's [buffer] path
TIMEOUT_DROP_IN = Path("/etc/systemd/system/edgeforward.service.d/ci-timeout.conf")
SHORT_START_TIMEOUT_S = 3
# A recovery of several seconds, well past SHORT_START_TIMEOUT_S, on a fast machine (2 M points once took 2.7 s).
RECOVERY_POINTS = 4_000_000
# Queues that many points of "pump" in the daemon's buffer in bulk (argv: path, points): new rows are counted by
# the ledger's tail (store/counting.py), so no ledger row is touched.
FILL_BUFFER = (
    "import sqlite3, sys, time\n"
    "path, count = sys.argv[1], int(sys.argv[2])\n"
    "db = sqlite3.connect(path, isolation_level=None)\n"
    "device = db.execute(\"SELECT id FROM devices WHERE name = 'pump'\").fetchone()[0]\n"
    "db.execute('WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < ?) '\n"
    "    'INSERT INTO points (device_id, pin, ts, value) SELECT ?, 1, ? + x, x FROM c',\n"
    "    (count, device, time.time_ns() // 1_000_000 - count))\n"
    "db.close()\n"
)
WATCHDOG_WAIT_S = 75.0  # WatchdogSec=30, then SIGABRT (with SIGCONT) and RestartSec=5
NO_RESTART_WAIT_S = 13.0  # more than two RestartSec=5 periods
WAIT_S = 30.0
HISTORY_INTERVAL_S = 2
PROBE_PREFIX = "clock-probe "
# Run by the unit itself (ExecStartPost= shares every sandbox setting of ExecStart=): what the daemon's clock
# code reads there.
CLOCK_PROBE = (
    "from edgeforward.clock import read_adjtimex, read_boot_id; "
    f"import json; k = read_adjtimex(); print({PROBE_PREFIX!r} + json.dumps("
    "{'adjtimex': None if k is None else k.state, 'boot_id': read_boot_id()}))"
)

failures: list[str] = []


def report(check: str, ok: bool, **facts: Any) -> None:
    print(json.dumps({"check": check, "ok": ok, **facts}), flush=True)
    if not ok:
        failures.append(check)


def sh(*args: str, check: bool = True, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}")
    return result


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_until(what: str, condition: Callable[[], bool], within_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    print(json.dumps({"waited_for": what, "s": within_s}), flush=True)
    return False


def readme_blocks() -> list[str]:
    """The shell blocks of the README's install section, in order."""
    text = (CLONE / "README.md").read_text()
    section = text.split(INSTALL_HEADING, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def run_block(block: str, stdin: str = "") -> None:
    """Run a README block as pasted into bash (stopping at the first failing command)."""
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=CLONE,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report(
        "readme_block",
        result.returncode == 0,
        block=block.splitlines()[0],
        rc=result.returncode,
        output=(result.stdout + result.stderr)[-3000:] if result.returncode else "",
    )
    if result.returncode != 0:
        raise SystemExit(finish())


def cloud_values() -> list[float]:
    with urllib.request.urlopen(f"http://{CLOUD}/_sim/points?pin=v1", timeout=5) as response:
        return [point["value"] for point in json.loads(response.read())]


def journal(*args: str) -> list[str]:
    return sh("journalctl", "--no-pager", "-o", "cat", "-u", UNIT, *args).stdout.splitlines()


def events(lines: list[str]) -> list[dict[str, Any]]:
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                found.append(event)
    return found


@contextlib.contextmanager
def dialout_pty() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal whose device is owned by group dialout, as a USB adapter's is."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.chown(path, 0, int(sh("getent", "group", "dialout").stdout.split(":")[2]))
    os.chmod(path, 0o660)
    os.close(slave)
    try:
        yield master, path
    finally:
        os.close(master)


def write_config(port_paths: list[str], *, level: str = "info", extra: str = "") -> None:
    text = (CLONE / "config" / "edgeforward.toml").read_text()
    text = re.sub(r"^server = .*$", f'server = "http://{CLOUD}"', text, count=1, flags=re.M)
    text = re.sub(r"^level = .*$", f'level = "{level}"', text, count=1, flags=re.M)
    # A history round every 2 s, not every minute or the pace that spreads the month's messages to its end
    # (which depends on the date): the checks need not wait for readings the live path skips.
    text = re.sub(r"^history_interval_s = .*$", f"history_interval_s = {HISTORY_INTERVAL_S}", text, count=1, flags=re.M)
    text = re.sub(r"^messages_per_month = .*$", "messages_per_month = 0", text, count=1, flags=re.M)
    first, rest = text.split("[[port]]", 1)
    port_table, after = rest.split("[[device]]", 1)
    ports = "".join(
        "[[port]]" + re.sub(r"^path = .*$", f'path = "{path}"', port_table, count=1, flags=re.M) for path in port_paths
    )
    CONFIG.write_text(first + ports + "[[device]]" + after + extra)


def kernel_boot_id() -> str:
    """The kernel's boot id, from a procfs of our own: nspawn covers the container's /proc copy with one it
    made up, which the unit (ProtectProc= mounts a procfs of its own, as here) does not see."""
    mountpoint = Path("/run/edgeforward-ci-proc")
    mountpoint.mkdir(exist_ok=True)
    sh("mount", "-t", "proc", "proc", str(mountpoint))
    try:
        return (mountpoint / "sys/kernel/random/boot_id").read_text().strip()
    finally:
        sh("umount", str(mountpoint))


def write_lines(master: int, values: range) -> None:
    now_ms = time.time_ns() // 1_000_000
    os.write(master, b"".join(b"v1=%d v2=%d ts=%d\n" % (v, v % 100, now_ms + v) for v in values))


def main() -> int:
    source, wheels = sys.argv[1], sys.argv[2]
    shutil.copytree(source, CLONE, symlinks=True)
    # pip's machine-wide configuration (sudo clears the environment), as Raspberry Pi OS's names piwheels.
    Path("/etc/pip.conf").write_text(
        f"[global]\nno-index = true\nfind-links = {wheels}\ndisable-pip-version-check = true\n"
    )
    blocks = readme_blocks()
    report("readme_has_install_blocks", len(blocks) == 2, blocks=len(blocks))
    run_block(blocks[0])

    cloudsim = subprocess.Popen(
        ["/opt/edgeforward/bin/edgeforward", "cloudsim", "--listen", CLOUD, "--any-token"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(CLOUD)  # the README's check-config --online asks it at once
        with dialout_pty() as (master, pty_path):
            return checks(blocks, master, pty_path)
    finally:
        cloudsim.terminate()
        cloudsim.wait(10)


def wait_listening(listen: str, within_s: float = 60.0) -> None:
    """Wait until HOST:PORT accepts connections (a Python program takes seconds to start on a loaded machine)."""
    host, port = listen.rsplit(":", 1)
    deadline = time.monotonic() + within_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def checks(blocks: list[str], master: int, pty_path: str) -> int:
    # The user's edit between the two blocks: this gateway's port, a local cloud. A pseudo-terminal stands in
    # for the USB adapter (pts is not a serial major: the test admits it; the clock probe runs under the unit).
    write_config([pty_path])
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text(f'[Service]\nDeviceAllow=char-pts rw\nExecStartPost={VENV_PYTHON} -c "{CLOCK_PROBE}"\n')
    mode = CONFIG.stat().st_mode & 0o777
    report("config_readable_not_writable_by_others", mode & 0o004 != 0 and mode & 0o022 == 0, mode=oct(mode))
    run_block(blocks[1], stdin=TOKEN + "\n")
    state = show("ActiveState", "SubState", "StatusText", "NRestarts", "Type")
    times = show("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    ready_s = (int(times["ActiveEnterTimestampMonotonic"]) - int(times["ExecMainStartTimestampMonotonic"])) / 1e6
    report(
        "ready_and_status",
        state["ActiveState"] == "active" and state["Type"] == "notify" and state["StatusText"].startswith("queued "),
        ready_s=round(ready_s, 2),  # READY=1 after the main process started, the ExecStartPost= probe included
        **state,
    )

    write_lines(master, range(1, 21))
    delivered = wait_until("20 readings at the cloud", lambda: sorted(cloud_values()) == list(range(1, 21)))
    report("delivery_from_a_dialout_pty", delivered, values=len(cloud_values()))

    os.write(master, b"v1=not-a-number\n")
    warned = wait_until(
        "line_rejected in journalctl -p warning",
        lambda: any(e.get("event") == "line_rejected" for e in events(journal("-p", "warning"))),
    )
    warnings = events(journal("-p", "warning"))
    report(
        "journal_priorities",
        warned and not any(e.get("event") == "daemon_started" for e in warnings),
        warning_events=sorted({str(e.get("event")) for e in warnings}),
    )

    probe = [json.loads(line[len(PROBE_PREFIX) :]) for line in journal() if line.startswith(PROBE_PREFIX)]
    boot_id = kernel_boot_id()
    status = json.loads(sh("edgeforward", "status", "--json", "--config", str(CONFIG)).stdout)
    report(
        "clock_read_under_the_unit",
        bool(probe)
        and probe[-1]["adjtimex"] is not None
        and probe[-1]["boot_id"] == boot_id
        and (status.get("clock") or {}).get("boot_id") == boot_id,
        kernel_boot_id=boot_id,
        probe=probe[-1:],
        daemon_clock=status.get("clock"),
    )

    watchdog_restart(master)
    device_admitted_after_start()

    began = time.monotonic()
    stopped = sh("systemctl", "stop", UNIT, check=False)
    took = time.monotonic() - began
    state = show("ActiveState", "Result", "ExecMainStatus")
    report(
        "stop_exits_0_quickly",
        stopped.returncode == 0
        and took <= STOP_WITHIN_S
        and state["Result"] == "success"
        and state["ExecMainStatus"] == "0",
        seconds=round(took, 2),
        **state,
    )

    long_recovery()
    bad_config()
    security = sh("systemd-analyze", "security", "--no-pager", UNIT, check=False).stdout
    match = re.search(r"Overall exposure level for edgeforward\.service: ([0-9.]+)", security)
    report(
        "exposure",
        match is not None and float(match.group(1)) <= MAX_EXPOSURE,
        exposure=match.group(1) if match else security[-500:],
    )
    return finish()


def watchdog_restart(master: int) -> None:
    """SIGSTOP: the pings stop, systemd restarts the daemon, and nothing it had committed is lost."""
    write_lines(master, range(21, 41))
    status_cmd = ("edgeforward", "status", "--json", "--config", str(CONFIG))

    def received() -> int:
        return int(json.loads(sh(*status_cmd).stdout)["devices"]["pump"]["received"])

    wait_until("40 readings committed", lambda: received() >= 80)  # 2 pins a line
    before = show("MainPID", "NRestarts")
    os.kill(int(before["MainPID"]), signal.SIGSTOP)
    began = time.monotonic()
    restarted = wait_until(
        "a watchdog restart",
        lambda: (
            (s := show("MainPID", "NRestarts", "ActiveState"))["NRestarts"] != before["NRestarts"]
            and s["ActiveState"] == "active"
        ),
        WATCHDOG_WAIT_S,
    )
    took = time.monotonic() - began
    all_there = wait_until("every committed reading at the cloud", lambda: set(range(1, 41)) <= set(cloud_values()))
    values = cloud_values()
    # The restarted daemon knows it is the same boot (held readings keep their boot).
    boot_ids = {str((json.loads(sh(*status_cmd).stdout).get("clock") or {}).get("boot_id")), kernel_boot_id()}
    report(
        "watchdog_restart_loses_nothing",
        restarted and all_there and len(boot_ids) == 1,
        boot_ids=sorted(boot_ids),
        seconds=round(took, 1),
        missing=sorted(set(range(1, 41)) - set(values)),
        duplicates=len(values) - len(set(values)),
        result=show("NRestarts", "Result", "ExecMainStatus"),
    )


def device_admitted_after_start() -> None:
    """A USB serial node made after the unit started is admitted (by major 188); another major is not."""
    write_config([USB_NODE, OTHER_NODE], level="debug")
    sh("systemctl", "restart", UNIT)
    since = time.time()
    dialout = sh("getent", "group", "dialout").stdout.split(":")[2]
    for path, major in ((USB_NODE, 188), (OTHER_NODE, 189)):
        sh("mknod", "-m", "660", path, "c", str(major), "0")
        os.chown(path, 0, int(dialout))

    def errors(path: str) -> list[str]:
        found = []
        for event in events(journal("--since", f"@{since:.0f}")):
            error = str(event.get("error", ""))
            if event.get("event") == "serial port absent" and path in error:
                found.append(error)
        return found

    admitted = wait_until(
        "ENXIO on the 188 node", lambda: any("No such device or address" in e for e in errors(USB_NODE))
    )
    refused = wait_until(
        "EPERM on the 189 node", lambda: any("Operation not permitted" in e for e in errors(OTHER_NODE))
    )
    report(
        "device_major_188_admitted_after_start",
        admitted and refused,
        usb=errors(USB_NODE)[-1:],
        control=errors(OTHER_NODE)[-1:],
    )


def crashed_writer(db: Path) -> str:
    """A program that commits a row to buffer `db` and dies without closing it: its WAL is left behind, as after a
    crash, so the next start checks every page before READY. (Also used by tests/test_notify.py.)"""
    return (
        f"import os, sqlite3; c = sqlite3.connect({str(db)!r}); "
        "c.execute(\"INSERT OR REPLACE INTO meta VALUES ('crashed', '1')\"); c.commit(); os._exit(0)"
    )


def long_recovery() -> None:
    """A damaged buffer whose recovery outlasts TimeoutStartSec: the daemon asks for more time while it works
    (EXTEND_TIMEOUT_USEC) and comes up once, not killed at the timeout and begun again forever."""
    sh(VENV_PYTHON, "-c", FILL_BUFFER, str(BUFFER), str(RECOVERY_POINTS), timeout=600)
    with BUFFER.open("r+b") as file:
        file.seek(BUFFER.stat().st_size // 2)
        file.write(os.urandom(65536))
    # ... and the last writer crashed (a WAL left behind): the start reads every page before READY.
    sh(VENV_PYTHON, "-c", crashed_writer(BUFFER))
    owner = BUFFER.parent.stat()
    for path in BUFFER.parent.glob(BUFFER.name + "*"):
        os.chown(path, owner.st_uid, owner.st_gid)
    TIMEOUT_DROP_IN.write_text(f"[Service]\nTimeoutStartSec={SHORT_START_TIMEOUT_S}\n")
    sh("systemctl", "daemon-reload")
    try:
        before = show("NRestarts")
        since = time.time()
        started = sh("systemctl", "start", UNIT, check=False, timeout=600)
        state = show("ActiveState", "NRestarts", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        ready_s = (int(state["ActiveEnterTimestampMonotonic"]) - int(state["ExecMainStartTimestampMonotonic"])) / 1e6
        recovered = [e for e in events(journal("--since", f"@{since:.0f}")) if e.get("event") == "buffer_recovered"]
        report(
            "long_recovery_extends_the_start_timeout",
            started.returncode == 0
            and state["ActiveState"] == "active"
            and state["NRestarts"] == before["NRestarts"]
            and len(recovered) == 1
            and ready_s > SHORT_START_TIMEOUT_S,
            ready_s=round(ready_s, 1),
            timeout_start_s=SHORT_START_TIMEOUT_S,
            recoveries=len(recovered),
            lost_points=recovered[0].get("lost_points") if recovered else None,
            **state,
        )
    finally:
        sh("systemctl", "stop", UNIT, check=False)
        TIMEOUT_DROP_IN.unlink()
        sh("systemctl", "daemon-reload")


def bad_config() -> None:
    """A bad config ends the unit failed (exit 2), not restarted, its problem logged as an error."""
    good = CONFIG.read_text()
    CONFIG.write_text(good + "\n[nonsense]\n")
    sh("systemctl", "reset-failed", UNIT, check=False)
    started = sh("systemctl", "start", UNIT, check=False)
    time.sleep(NO_RESTART_WAIT_S)
    state = show("ActiveState", "Result", "NRestarts", "ExecMainStatus")
    errors = journal("-p", "err", "-n", "20")
    report(
        "bad_config_fails_without_restarts",
        started.returncode != 0
        and state["ActiveState"] == "failed"
        and state["NRestarts"] == "0"
        and state["ExecMainStatus"] == "2"
        and "nonsense: unknown key" in errors,
        **state,
    )
    CONFIG.write_text(good)


def finish() -> int:
    print(json.dumps({"failed": failures}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
