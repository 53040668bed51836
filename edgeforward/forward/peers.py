"""Devices that share a server share a network path: when one gets through, the others waiting on backoff retry."""

from __future__ import annotations

from collections.abc import Callable

Poke = Callable[[], None]


class Peers:
    """Which forwarders currently talk to which server, so one's success can wake the others."""

    def __init__(self) -> None:
        self._members: dict[str, dict[str, Poke]] = {}

    def join(self, server: str, name: str, poke: Poke) -> None:
        """Register device `name` as talking to `server` (leaving any server it talked to before)."""
        self.leave(name)
        self._members.setdefault(server, {})[name] = poke

    def leave(self, name: str) -> None:
        """Forget device `name`."""
        for server, members in list(self._members.items()):
            members.pop(name, None)
            if not members:
                del self._members[server]

    def succeeded(self, server: str, name: str) -> None:
        """Device `name` got an answer from `server`: poke every other device on it."""
        for other, poke in list(self._members.get(server, {}).items()):
            if other != name:
                poke()
