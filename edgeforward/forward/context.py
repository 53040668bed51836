"""What the live and history paths of one device share: its buffer, client, budget guard and state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..blynk import BlynkClient
from ..config import Device, ForwardConfig
from ..store import Buffer
from ..timebase import Clock
from .budget import BudgetGuard
from .state import DeviceTracker


@dataclass(slots=True)
class DeviceContext:
    """One device's collaborators, handed to each path by the forwarder."""

    device: Device
    buffer: Buffer
    client: BlynkClient
    guard: BudgetGuard
    tracker: DeviceTracker
    clock: Clock
    forward: ForwardConfig
    succeeded: Callable[[], Awaitable[None]]  # the forwarder's bookkeeping after a 200
    log: Any  # structlog BoundLogger bound to the device

    @property
    def name(self) -> str:
        """The device's name."""
        return self.device.name

    def count(self, outcome: str) -> None:
        """Count one request outcome (for metrics and the watchdog)."""
        self.tracker.outcomes[outcome] += 1
