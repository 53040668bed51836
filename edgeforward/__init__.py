"""edgeforward: store-and-forward from serial sensors to the Blynk cloud."""

import sys


def _import_structlog_without_rich() -> None:
    """Import structlog before anything else does, with rich hidden from it.

    structlog.dev imports rich, when installed, for tracebacks edgeforward never renders with it (logs.py
    gives plain ones): about 6 MB and 100 modules in the daemon, which uses rich nowhere. The commands that
    draw with rich (status, import, demo) import it themselves afterwards, as usual.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` raise ImportError
    try:
        import structlog  # noqa: F401, PLC0415
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()

__version__ = "0.1.0"
