"""The `edgeforward` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from . import __version__
from .config import Config, ConfigError, config_path, load_config
from .errors import EdgeforwardError
from .logs import configure_logging, journal_priority, writes_to_journal
from .redact import add_secrets, redact, redact_value

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2
WATCH_INTERVAL_S = 2.0

log = structlog.get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="edgeforward", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgeforward {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", help="config file (default: $EDGEFORWARD_CONFIG)")
        return sub

    with_config("run", "run the daemon in the foreground until SIGTERM/SIGINT")
    check = with_config("check-config", "validate the config without touching ports or network")
    check.add_argument(
        "--online", action="store_true", help="also check that each port exists and each token is accepted"
    )
    status = with_config("status", "print the ledger, budgets and ports (works while the daemon runs)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch", action="store_true", help=f"redraw every {WATCH_INTERVAL_S:g} s until interrupted (Ctrl-C)"
    )

    deadletter = with_config("deadletter", "list, requeue or delete points the cloud refused for good")
    deadletter.add_argument("action", choices=("list", "retry", "purge"))
    deadletter.add_argument("--device", help="only this device")
    deadletter.add_argument("--pin", help="only this pin (vN)")
    deadletter.add_argument("--json", action="store_true", help="machine-readable output (list)")

    backfill = with_config("import", "backfill data logger CSV files (header row or Campbell TOA5) into the buffer")
    backfill.add_argument("--device", required=True, help="the [[device]] the rows belong to")
    backfill.add_argument("files", nargs="+", type=Path, metavar="FILE")
    backfill.add_argument("--layout", choices=("auto", "csv", "toa5"), default="auto", help="default: auto-detect")
    backfill.add_argument("--time-column", help="timestamp column (default: ts/timestamp/time; TIMESTAMP in TOA5)")
    backfill.add_argument(
        "--time-format", default="auto", help="auto (default), epoch_ms, epoch_s, iso, or a strftime pattern"
    )
    backfill.add_argument("--tz", default="UTC", help="time zone of timestamps without an offset (default UTC)")
    backfill.add_argument(
        "--map", action="append", default=[], metavar="COLUMN=vN", help="take a column into a pin (repeatable)"
    )
    backfill.add_argument("--delimiter", default=",", help="field separator (default ,)")

    cloudsim = commands.add_parser("cloudsim", help="a local Blynk-compatible device API server")
    cloudsim.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="where to listen (default 127.0.0.1:8080)"
    )
    cloudsim.add_argument(
        "--devices",
        type=Path,
        metavar="FILE",
        help='devices file: JSON {"TOKEN": {"name": "pump", "pins": {"v1": "double"}}} or an edgeforward config',
    )
    cloudsim.add_argument("--any-token", action="store_true", help="accept every token (pins of any type)")
    cloudsim.add_argument(
        "--record", type=Path, metavar="FILE", help="append every accepted point to this JSON-lines file"
    )
    cloudsim.add_argument("--batch-max-points", type=int, default=10_000)
    cloudsim.add_argument("--max-request-bytes", type=int, default=2_000_000)
    cloudsim.add_argument("--points-per-day", type=int, default=0, help="0 = unlimited")
    cloudsim.add_argument("--messages-per-month", type=int, default=0, help="0 = unlimited")
    cloudsim.add_argument("--requests-per-second", type=float, default=0, help="0 = unlimited")
    cloudsim.add_argument("--fault", default="", help="random faults per request, e.g. 500:0.1,429:0.05,reset:0.02")
    cloudsim.add_argument("--seed", type=int, help="seed of the random faults")
    cloudsim.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of 429 answers, seconds")
    cloudsim.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve https with this certificate (PEM)")
    cloudsim.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key, if not in the certificate file")
    cloudsim.add_argument("--max-age-days", type=float, default=0, help="0 = no check")

    demo = commands.add_parser("demo", help="a self-contained demonstration on this machine (no hardware)")
    demo.add_argument(
        "--duration",
        "--seconds",
        dest="duration",
        type=float,
        default=20.0,
        help="how long the simulated MCU prints readings (default 20 s; the drain follows)",
    )
    demo.add_argument("--headless", action="store_true", help="plain lines instead of the live view (for CI)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    handler = {
        "run": _run,
        "check-config": _check_config,
        "status": _status,
        "deadletter": _deadletter,
        "import": _import,
        "cloudsim": _cloudsim,
        "demo": _demo,
    }[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        prefix = f"<{journal_priority(logging.ERROR)}>" if writes_to_journal(sys.stderr) else ""
        for problem in exc.problems:
            print(f"{prefix}{problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


def _load(args: argparse.Namespace, *, read_tokens: bool = True) -> Config:
    return load_config(config_path(args.config), read_tokens=read_tokens)


def _run(args: argparse.Namespace) -> int:
    # Until the daemon's own handler is installed, a SIGTERM (nothing is open yet) is a clean stop, like SIGINT.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = _load(args)
    configure_logging(config.log.level, config.log.format, secrets=config.tokens, stream=sys.stdout)
    from .daemon import run_daemon

    try:
        asyncio.run(run_daemon(config))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 (every fatal error is logged, redacted; never a raw traceback)
        log_fatal(exc)
        return EXIT_FATAL
    return EXIT_OK


def log_fatal(exc: BaseException) -> None:
    """Log a fatal error through the redacting logger: each error of an ExceptionGroup on its own line."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            log_fatal(inner)
        return
    error = redact(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, EdgeforwardError | OSError):
        log.error("fatal", error=error)  # an expected kind of failure: its text says it all
    else:
        log.error("fatal", error=error, exc_info=exc)


def _check_config(args: argparse.Namespace) -> int:
    # Offline, tokens are checked for form only: their files and credentials may exist only for the service.
    config = _load(args, read_tokens=args.online)
    add_secrets(config.tokens)
    print(redact(f"{config.path}: ok ({len(config.devices)} devices, {len(config.ports)} ports)"))
    if not args.online:
        print("tokens were not read: check-config --online reads them and asks the cloud whether it accepts each")
        return EXIT_OK
    from .online import check_online

    try:
        problems = asyncio.run(check_online(config))
    except (EdgeforwardError, OSError) as exc:
        problems = [f"cannot check online: {type(exc).__name__}: {exc}"]
    for problem in problems:
        print(redact(problem), file=sys.stderr)
    return EXIT_FATAL if problems else EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from .status import read_status, render_status, status_view

    config = _load(args, read_tokens=False)
    add_secrets(config.tokens)

    def current() -> dict[str, Any]:
        status: dict[str, Any] = redact_value(read_status(config))
        return status

    if args.json:
        print(json.dumps(current(), indent=2))
        return EXIT_OK
    console = Console()
    if not args.watch:
        render_status(current(), console)
        return EXIT_OK
    with Live(status_view(current()), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            live.update(status_view(current()), refresh=True)


def _deadletter(args: argparse.Namespace) -> int:
    from .deadletter import run_deadletter

    config = _load(args, read_tokens=False)
    return run_deadletter(config, args.action, device=args.device, pin=args.pin, as_json=args.json)


def _import(args: argparse.Namespace) -> int:
    from .importer import BackfillError, ImportOptions, parse_mapping, run_import

    config = _load(args, read_tokens=False)
    configure_logging("warning", "auto", secrets=config.tokens)
    try:
        options = ImportOptions(
            device=args.device,
            layout=args.layout,
            time_column=args.time_column,
            time_format=args.time_format,
            timezone=args.tz,
            mapping=parse_mapping(args.map),
            delimiter=args.delimiter,
        )
        return run_import(config, options, args.files)
    except BackfillError as exc:
        print(f"import: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _cloudsim(args: argparse.Namespace) -> int:
    from .cloudsim import (
        SimError,
        SimLimits,
        devices_from_file,
        parse_fault_rates,
        serve,
        server_ssl_context,
        split_listen,
    )

    configure_logging("info", "auto")
    try:
        devices = devices_from_file(args.devices) if args.devices else []
        faults = parse_fault_rates(args.fault) if args.fault else {}
        tls = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        limits = SimLimits(
            batch_max_points=args.batch_max_points,
            max_request_bytes=args.max_request_bytes,
            points_per_day=args.points_per_day,
            messages_per_month=args.messages_per_month,
            requests_per_second=args.requests_per_second,
            max_age_days=args.max_age_days,
        )
        split_listen(args.listen)  # a bad --listen is one line before anything starts
    except SimError as exc:
        print(f"cloudsim: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    accept_any = args.any_token or not devices
    try:
        asyncio.run(
            serve(
                args.listen,
                devices,
                limits,
                accept_any,
                args.record,
                fault_rates=faults,
                seed=args.seed,
                retry_after_s=args.retry_after,
                ssl_context=tls,
            )
        )
    except SimError as exc:
        print(f"cloudsim: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(seconds=args.duration, headless=args.headless)


if __name__ == "__main__":
    sys.exit(main())
