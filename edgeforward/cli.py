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

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        description, exit_codes = COMMAND_HELP[name]
        return commands.add_parser(
            name,
            help=help_text,
            description=description,
            epilog="exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in exit_codes),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = command(name, help_text)
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

    cloudsim = command("cloudsim", "a local Blynk-compatible device API server")
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

    demo = command("demo", "a self-contained demonstration on this machine (no hardware)")
    demo.add_argument(
        "--duration",
        "--seconds",
        dest="duration",
        type=float,
        default=20.0,
        help="how long the simulated MCU prints readings (default 20 s; the drain follows)",
    )
    demo.add_argument("--headless", action="store_true", help="plain lines instead of the live view (for CI)")

    ports = command("ports", "list the serial ports, or look at the given ones; --sniff reads what they print")
    ports.add_argument("paths", nargs="*", metavar="PATH", help="a device, /dev/serial/by-id link, glob or URL")
    ports.add_argument(
        "--sniff", type=float, metavar="SECONDS", help="read each port this long (never writing) and detect its lines"
    )
    ports.add_argument("--baud", type=int, default=DEFAULT_BAUD, help=f"when sniffing (default {DEFAULT_BAUD})")
    ports.add_argument("--json", action="store_true", help="machine-readable output")

    init = command("init", "sniff ports and write a commented config for them (tokens left to credentials)")
    init.add_argument("--port", action="append", required=True, metavar="PATH", help="a port to sniff (repeatable)")
    init.add_argument(
        "--device", action="append", default=[], metavar="NAME", help="the device of each --port, in order"
    )
    init.add_argument("--output", type=Path, default=Path("edgeforward.toml"), help="default ./edgeforward.toml")
    init.add_argument("--seconds", type=float, default=5.0, help="how long each port is read (default 5)")
    init.add_argument("--baud", type=int, default=DEFAULT_BAUD, help=f"of every port (default {DEFAULT_BAUD})")
    init.add_argument("--buffer", default=DEFAULT_BUFFER_PATH, help=f"[buffer] path (default {DEFAULT_BUFFER_PATH})")
    init.add_argument("--force", action="store_true", help="replace an existing --output file")
    return parser


DEFAULT_BAUD = 115_200
DEFAULT_BUFFER_PATH = "/var/lib/edgeforward/buffer.db"
_CONFIG_EXIT = (EXIT_CONFIG, "bad config: one line per problem on stderr, naming the key path")
COMMAND_HELP: dict[str, tuple[str, tuple[tuple[int, str], ...]]] = {
    "run": (
        "Run the daemon in the foreground: read every port, commit each reading to the buffer, forward it to the "
        "cloud. SIGTERM or SIGINT stops it within a few seconds: what was read is committed, in-flight requests "
        "are abandoned (their points stay queued).",
        ((EXIT_OK, "clean stop"), _CONFIG_EXIT, (EXIT_FATAL, "another fatal error, logged on its own `fatal` line")),
    ),
    "check-config": (
        "Validate the config file without touching ports or network (tokens are checked for form only). "
        "With --online also check that each port exists and that the cloud accepts each token (one "
        "GET isHardwareConnected per device, no data sent).",
        (
            (EXIT_OK, "valid"),
            (EXIT_CONFIG, "invalid: one line per problem on stderr"),
            (EXIT_FATAL, "--online: a port or a token failed"),
        ),
    ),
    "status": (
        "Print the ledger, budgets and port counters from the buffer database, while the daemon runs or not: "
        "tables where they fit the width, one block per device and port where not (80 columns, piped).",
        ((EXIT_OK, "printed (also when the buffer does not exist yet: it says so)"), _CONFIG_EXIT),
    ),
    "deadletter": (
        "List, requeue (retry) or delete (purge) the points the cloud refused for good; the ledger stays exact.",
        ((EXIT_OK, "done"), _CONFIG_EXIT),
    ),
    "import": (
        "Backfill data logger CSV files (a header row naming pins, or Campbell Scientific TOA5) into the buffer. "
        "Idempotent: importing a file again queues nothing twice.",
        (
            (EXIT_OK, "all rows taken"),
            (EXIT_FATAL, "some rows refused (each named by file, line and reason)"),
            (EXIT_CONFIG, "bad config or options"),
        ),
    ),
    "cloudsim": (
        "A local Blynk-compatible device API server, for bench-testing firmware and the daemon without spending "
        "real messages; strict like the real API, with outages and faults on demand.",
        ((EXIT_OK, "interrupted"), (EXIT_CONFIG, "bad options: one line on stderr")),
    ),
    "demo": (
        "A self-contained demonstration: a simulated microcontroller on a pseudo-terminal, a local cloud, the "
        "real daemon, an outage and its recovery. A live view on a terminal, plain lines otherwise; ends by itself.",
        ((EXIT_OK, "every reading reached the cloud exactly once"), (EXIT_FATAL, "a reading was lost or duplicated")),
    ),
    "ports": (
        "List the serial ports (device node, /dev/serial/by-id names, USB vendor and product, whether you may "
        "open them), or describe the PATHs given: any port path the config accepts. With --sniff, read each for "
        "that many seconds without writing to it and report the line format (kv, json, csv, nmea), the pins "
        "seen with their types, lines per second and sample lines.",
        (
            (EXIT_OK, "every port found (and, sniffing, printed lines of a known format)"),
            (EXIT_FATAL, "a port was not found, or printed nothing recognisable"),
            (EXIT_CONFIG, "bad options"),
        ),
    ),
    "init": (
        "Sniff each --port and write a commented config for what they print: ports, formats, devices and pin "
        "types. Tokens are not asked for: each device names a systemd credential, explained in the file.",
        (
            (EXIT_OK, "written (check-config accepts it)"),
            (EXIT_FATAL, "a port printed nothing recognisable: nothing written"),
            (EXIT_CONFIG, "bad options, or the output file exists (--force)"),
        ),
    ),
}


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
        "ports": _ports,
        "init": _init,
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
    from .store import StoreLockedError

    try:
        asyncio.run(run_daemon(config))
    except StoreLockedError as exc:
        print(f"edgeforward: {redact(str(exc))}", file=sys.stderr)
        log.error("already_running", error=redact(str(exc)), pid=exc.pid)
        return EXIT_FATAL
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


def _ports(args: argparse.Namespace) -> int:
    from .ports import run_ports

    configure_logging("error", "auto")  # the port's trouble is in the report; the log stays off stdout
    if args.sniff is not None and args.sniff <= 0:
        print("ports: --sniff needs a number of seconds above 0", file=sys.stderr)
        return EXIT_CONFIG
    return run_ports(args.paths, args.sniff, args.baud, as_json_output=args.json)


def _init(args: argparse.Namespace) -> int:
    from .ports import InitError, run_init

    configure_logging("error", "auto")
    try:
        return run_init(
            args.port,
            args.device,
            args.output,
            seconds=args.seconds,
            baud=args.baud,
            buffer_path=args.buffer,
            force=args.force,
        )
    except InitError as exc:
        print(f"init: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
