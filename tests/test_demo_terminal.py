"""`edgeforward demo` in a real terminal (tmux) at 80x24 and 200x50: the live view owns the screen."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

SIZES = ((80, 24), (200, 50))
DEMO_SECONDS = 6
RUN_TIMEOUT_S = 90.0
POLL_S = 0.25
DONE = "DEMO-EXIT="
# What a daemon log line carries, in any rendering (JSON, console, or the events panel's).
LOG_MARKERS = ("cloud_unreachable", "line_rejected", "warning ", "[warning", '"level"', "Traceback", "error=")
INTRO_TITLE = "╭─ edgeforward demo: what happens"


@dataclass
class Terminal:
    """One tmux session of its own server (its own socket: other tmux users are never touched)."""

    socket: Path
    width: int
    height: int
    screens: list[list[str]] = field(default_factory=list)

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, check=True, timeout=10
        )
        return result.stdout

    def start(self, command: str) -> None:
        self.tmux("new-session", "-d", "-s", "demo", "-x", str(self.width), "-y", str(self.height), command)

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "demo").splitlines()

    def everything(self) -> list[str]:
        """The scrollback and the screen: whatever was ever drawn and scrolled away stays here."""
        return self.tmux("capture-pane", "-p", "-S", "-", "-t", "demo").splitlines()

    def stop(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, check=False, timeout=10)


def outside_events_panels(lines: list[str]) -> list[str]:
    """The lines that are not inside a panel titled "events"."""
    outside: list[str] = []
    inside = False
    for line in lines:
        if line.startswith("╭─ events"):
            inside = True
        elif inside and line.startswith("╰"):
            inside = False
        elif not inside:
            outside.append(line)
    return outside


def leaked(lines: list[str]) -> list[str]:
    return [line for line in outside_events_panels(lines) if any(marker in line for marker in LOG_MARKERS)]


def test_demo_live_view_owns_the_terminal_at_80x24_and_200x50(tmp_path: Path) -> None:
    # Without COLUMNS and LINES (pytest may have set them), rich asks the terminal for its size.
    demo = f"env -u COLUMNS -u LINES {sys.executable} -m edgeforward demo --duration {DEMO_SECONDS}"
    command = f"{demo}; echo {DONE}$?; sleep 600"
    terminals = [Terminal(tmp_path / f"tmux-{w}x{h}", w, h) for w, h in SIZES]
    try:
        for terminal in terminals:
            terminal.start(command)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        running = list(terminals)
        while running:
            assert time.monotonic() < deadline, "the demo did not end in time"
            for terminal in list(running):
                screen = terminal.screen()
                terminal.screens.append(screen)
                if any(line.startswith(DONE) for line in screen):
                    running.remove(terminal)
            time.sleep(POLL_S)
        for terminal in terminals:
            size = f"{terminal.width}x{terminal.height}"
            history = terminal.everything()
            text = "\n".join(history)
            print(f"--- {size}\n{text}")
            assert f"{DONE}0" in text, size
            # Every screen drawn while the demo ran: one live view, the log only in its events panel.
            live_screens = [s for s in terminal.screens if any(line.startswith(INTRO_TITLE) for line in s)]
            assert live_screens, size
            for screen in live_screens:
                assert leaked(screen) == [], (size, screen)
                assert sum(line.startswith(INTRO_TITLE) for line in screen) <= 1, (size, screen)
                assert len(screen) <= terminal.height
            # Nothing scrolled away either: one view left behind, no stale copies, no log line outside a panel.
            assert leaked(history) == [], (size, leaked(history))
            assert sum(line.startswith(INTRO_TITLE) for line in history) == 1, size
            assert any("cloud outage begins" in line for line in history), size
            # The live view's last frame (left on the screen above the full event list) ends with the outcome.
            end = next(i for i, line in enumerate(history) if line.startswith(("╭─ events (all", "summary")))
            last_frame = history[:end]
            assert any("MCU stopped; queue empty" in line for line in last_frame), size
            assert "summary" in history and "nothing lost, nothing sent twice" in text, size
            # The plan is said up front, the outage window with it.
            first = live_screens[0]
            assert "the cloud is down (HTTP 503)" in " ".join(" ".join(first).split()), size
    finally:
        for terminal in terminals:
            terminal.stop()
