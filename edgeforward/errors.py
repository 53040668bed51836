"""The package's one exception root, and the redacted stand-in that keeps a library exception as a cause."""

from __future__ import annotations

from collections.abc import Iterable

from .redact import redact

MAX_CAUSE_DEPTH = 8  # a cause chain longer than this is cut (never seen; bounds a hostile cycle)


class EdgeforwardError(Exception):
    """Root of every error edgeforward raises on purpose."""


class RedactedCause(EdgeforwardError):
    """A library exception kept as a cause: its type name and redacted text, its traceback, its own causes."""

    def __init__(self, exc: BaseException, secrets: Iterable[str] = (), *, _depth: int = 0) -> None:
        secrets = tuple(secrets)
        super().__init__(f"{type(exc).__name__}: {redact(str(exc), secrets)}")
        self.kind = type(exc).__name__
        self.__traceback__ = exc.__traceback__
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is not None and _depth < MAX_CAUSE_DEPTH:
            self.__cause__ = RedactedCause(inner, secrets, _depth=_depth + 1)
        self.__suppress_context__ = True


def redacted_cause(exc: BaseException, secrets: Iterable[str] = ()) -> RedactedCause:
    """Return exc as a cause safe to keep: same type name and traceback, no secret in any text."""
    return RedactedCause(exc, secrets)
