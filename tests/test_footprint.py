"""Pi footprint: what the daemon imports, and binary wheels for every dependency on 64- and 32-bit ARM."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 300
# The Raspberry Pi OS bookworm Python. manylinux_2_17 is the oldest glibc tag these wheels use (bookworm: 2.36).
PYTHON_VERSION = "3.11"
PLATFORMS = {
    "aarch64": ["manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64", "linux_aarch64"],
    "armv7l": ["manylinux_2_17_armv7l", "manylinux2014_armv7l", "manylinux_2_31_armv7l", "linux_armv7l"],
}
# Dependencies known to ship no wheel for a platform on PyPI, with what that costs. The test fails when one
# gains a wheel (drop it here) or another dependency loses one.
NO_WHEEL: dict[str, dict[str, str]] = {}
CLI_ONLY_MODULES = ("rich", "aiohttp.web", "prometheus_client", "edgeforward.metrics", "edgeforward.status")


def test_the_daemon_imports_nothing_only_other_commands_need() -> None:
    code = (
        "import sys; import edgeforward.cli, edgeforward.daemon; "
        f"print(' '.join(m for m in {CLI_ONLY_MODULES!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == []


def test_rich_still_imports_for_the_commands_that_draw() -> None:
    code = "import edgeforward.cli; import rich.console, structlog; print(rich.console.Console.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "Console"


def _download(machine: str, requirements: list[str], dest: Path) -> subprocess.CompletedProcess[str]:
    platforms = [arg for tag in PLATFORMS[machine] for arg in ("--platform", tag)]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(dest)]
    target = [*platforms, "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    return subprocess.run(
        [*pip, *target, *requirements],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
        check=False,
    )


@pytest.mark.timeout(PIP_TIMEOUT_S * 3)
@pytest.mark.parametrize("machine", sorted(PLATFORMS))
def test_every_dependency_installs_from_binary_wheels_on_arm(machine: str, tmp_path: Path) -> None:
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    probe = _download(machine, ["pyserial"], tmp_path / "probe")
    if probe.returncode != 0:
        pytest.skip(f"pip cannot download from its index here: {probe.stderr.strip()[-300:]}")
    exempt = NO_WHEEL.get(machine, {})
    wheeled = [r for r in requirements if _name(r) not in exempt]
    result = _download(machine, wheeled, tmp_path / "wheels")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list((tmp_path / "wheels").glob("*.tar.gz"))
    for name in exempt:
        still_missing = _download(machine, [name], tmp_path / name)
        assert still_missing.returncode != 0, f"{name} now has a {machine} wheel: drop it from NO_WHEEL"


def _name(requirement: str) -> str:
    for separator in "<>=!~;[ ":
        requirement = requirement.split(separator, 1)[0]
    return requirement.lower()
