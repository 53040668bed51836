"""The unit under a real systemd: Debian bookworm booted in systemd-nspawn, installed as the README says.

The checks themselves run inside the container (tests/systemd_guest.py); this side builds what they need:
a root file system debootstrapped from the mirror this machine's apt uses (cached between runs), the wheels
pip will find there (no network inside but the container's own loopback), a copy of the checkout, and the
booted container (systemd as PID 1, cgroup v2 as on Raspberry Pi OS, a throwaway overlay over the cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEFORWARD_CI_CACHE", "/var/cache/edgeforward-ci"))
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3-venv", "sudo")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
DEBOOTSTRAP_TIMEOUT_S = 900
BOOT_TIMEOUT_S = 90
GUEST_TIMEOUT_S = 600
POWEROFF_TIMEOUT_S = 30
# nspawn's own seccomp filter keeps bpf() (systemd's DeviceAllow= is a BPF device program on cgroup v2) and
# clock_adjtime() (a container has no CAP_SYS_TIME) from the container: a Pi's PID 1 has both.
NSPAWN_SYSCALLS = "bpf adjtimex clock_adjtime"
GUEST_ARGS = ("/mnt/src/tests/systemd_guest.py", "/mnt/src", "/mnt/wheels")

pytestmark = pytest.mark.timeout(DEBOOTSTRAP_TIMEOUT_S + BOOT_TIMEOUT_S + GUEST_TIMEOUT_S + 120)


def _skip_unless_possible() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("systemd-nspawn needs Linux")
    if os.geteuid() != 0:
        pytest.skip("booting a container with systemd-nspawn needs root")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: apt-get install systemd-container debootstrap)")


def debian_mirror() -> str | None:
    """The Debian mirror this machine's apt takes bookworm's main component from."""
    files: list[Path] = []
    for source in APT_SOURCES:
        files += sorted(source.glob("*")) if source.is_dir() else [source] if source.exists() else []
    for file in files:
        text = file.read_text(errors="replace")
        if file.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if SUITE in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split():
                    return str(fields["URIs"]).split()[0]
        else:
            for line in text.splitlines():
                match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line.strip())
                if match and match.group(2) == SUITE and "main" in match.group(3).split():
                    return match.group(1)
    return None


def root_filesystem() -> Path:
    """Debian bookworm with systemd, cached under CACHE (built once per package list)."""
    key = hashlib.sha256(" ".join((SUITE, *PACKAGES)).encode()).hexdigest()[:12]
    root = CACHE / f"{SUITE}-{key}"
    if (root / "etc" / "machine-id").exists():
        return root
    mirror = debian_mirror()
    if mirror is None:
        pytest.skip(f"no Debian {SUITE} mirror in {', '.join(map(str, APT_SOURCES))} to debootstrap from")
    CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=CACHE))
    try:
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(building), mirror],
            capture_output=True,
            text=True,
            timeout=DEBOOTSTRAP_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"debootstrap from {mirror} failed: {(result.stdout + result.stderr)[-2000:]}")
        (building / "etc" / "hostname").write_text("edgeforward-ci\n")
        subprocess.run(["systemd-machine-id-setup", f"--root={building}"], capture_output=True, check=True)
        building.rename(root)
    finally:
        if building.exists():
            shutil.rmtree(building)
    return root


def wheelhouse() -> Path:
    """Every wheel `pip install .` needs in the container (this machine's Python has the same tags)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = sorted([*project["project"]["dependencies"], *project["build-system"]["requires"], "wheel"])
    key = hashlib.sha256(json.dumps([sys.version_info[:2], wanted]).encode()).hexdigest()[:12]
    wheels = CACHE / f"wheels-{key}"
    if not wheels.is_dir():
        building = Path(tempfile.mkdtemp(prefix=f"{wheels.name}.", dir=CACHE))
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(building)]
        result = subprocess.run([*command, *wanted], capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            shutil.rmtree(building)
            pytest.fail(f"pip download of {wanted} failed: {result.stderr[-2000:]}")
        building.rename(wheels)
    return wheels


def checkout_copy(into: Path) -> Path:
    """The checkout's files (tracked and new, not ignored), as a clone would have them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    copy = into / "edgeforward"
    for name in filter(None, (item.decode() for item in listed)):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def leader_of(nspawn: subprocess.Popen[bytes]) -> int | None:
    """PID (on this side) of the container's PID 1: nspawn's child."""
    for children in Path(f"/proc/{nspawn.pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                return int(pid)
    return None


@contextlib.contextmanager
def booted(root: Path, binds: dict[str, Path], log: Path) -> Iterator[int]:
    """Boot the container; yield the leader's PID; power it off."""
    command = [
        "systemd-nspawn",
        "--quiet",
        f"--directory={root}",
        "--volatile=overlay",
        f"--machine=edgeforward-ci-{os.getpid()}",
        "--register=no",
        "--keep-unit",
        "--private-network",
        f"--system-call-filter={NSPAWN_SYSCALLS}",
        "--console=pipe",
        *(f"--bind-ro={source}:{target}" for target, source in binds.items()),
        "--boot",
    ]
    env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
    with log.open("wb") as out:
        nspawn = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        leader = None
        state = ""
        while time.monotonic() < deadline and nspawn.poll() is None:
            leader = leader or leader_of(nspawn)
            if leader is not None:
                state = subprocess.run(
                    ["nsenter", "-t", str(leader), "-a", "systemctl", "is-system-running", "--wait"],
                    capture_output=True,
                    text=True,
                    timeout=BOOT_TIMEOUT_S,
                    check=False,
                ).stdout.strip()
                if state in ("running", "degraded"):
                    break
            time.sleep(0.2)
        if leader is None or state not in ("running", "degraded"):
            pytest.skip(
                f"systemd-nspawn could not boot {root} (state {state or 'none'}, nspawn "
                f"{'exited ' + str(nspawn.returncode) if nspawn.poll() is not None else 'running'}): "
                f"{log.read_text(errors='replace')[-1500:]}"
            )
        yield leader
    finally:
        if nspawn.poll() is None:
            nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                nspawn.wait(POWEROFF_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait()


def test_readme_install_under_systemd_as_pid_1(tmp_path: Path) -> None:
    _skip_unless_possible()
    began = time.monotonic()
    root = root_filesystem()
    wheels = wheelhouse()
    source = checkout_copy(tmp_path)
    prepared_s = time.monotonic() - began
    binds = {"/mnt/src": source, "/mnt/wheels": wheels}
    with booted(root, binds, tmp_path / "nspawn.log") as leader:
        booted_s = time.monotonic() - began
        guest = subprocess.run(
            ["nsenter", "-t", str(leader), "-a", "--wd=/", "/usr/bin/python3", *GUEST_ARGS],
            capture_output=True,
            text=True,
            timeout=GUEST_TIMEOUT_S,
            check=False,
        )
    print(f"prepared in {prepared_s:.1f} s, booted at {booted_s:.1f} s, done at {time.monotonic() - began:.1f} s")
    print(guest.stdout)
    checks = [json.loads(line) for line in guest.stdout.splitlines() if line.startswith('{"check"')]
    failed = [check for check in checks if not check["ok"]]
    assert guest.returncode == 0 and checks and not failed, f"{failed or guest.stdout[-3000:]}\n{guest.stderr[-3000:]}"
    names = {check["check"] for check in checks}
    assert {
        "ready_and_status",
        "delivery_from_a_dialout_pty",
        "device_major_188_admitted_after_start",
        "clock_read_under_the_unit",
        "watchdog_restart_loses_nothing",
        "stop_exits_0_quickly",
        "long_recovery_extends_the_start_timeout",
        "bad_config_fails_without_restarts",
        "journal_priorities",
        "exposure",
    } <= names
