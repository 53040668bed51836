"""The one jittered, capped exponential backoff (serial reopen, cloud retries)."""

from __future__ import annotations

import random
from typing import Final

MAX_EXPONENT: Final = 64  # keeps factor ** attempt finite
DEFAULT_FACTOR: Final = 2.0
DEFAULT_JITTER: Final = 0.5  # each delay is drawn from [(1 - jitter) * base, base]


class Backoff:
    """Capped exponential backoff with jitter."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        factor: float = DEFAULT_FACTOR,
        jitter: float = DEFAULT_JITTER,
    ) -> None:
        self._initial = initial
        self._maximum = maximum
        self._factor = factor
        self._jitter = jitter
        self.attempt = 0

    def next_delay(self) -> float:
        """Return the next delay in seconds and advance."""
        base = min(self._maximum, self._initial * self._factor**self.attempt)
        self.attempt = min(self.attempt + 1, MAX_EXPONENT)
        return base * random.uniform(1.0 - self._jitter, 1.0)

    @property
    def longest_s(self) -> float:
        """The longest delay this backoff ever returns."""
        return self._maximum

    def reset(self) -> None:
        """Start again from the initial delay."""
        self.attempt = 0
