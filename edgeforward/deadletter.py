"""`edgeforward deadletter`: list, requeue or purge points the cloud refused for good."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import Config, ConfigError
from .points import parse_pin_name
from .store import queries


def run_deadletter(config: Config, action: str, *, device: str | None, pin: str | None, as_json: bool) -> int:
    """Carry out one dead-letter action; the ledger stays exact (rejected <-> queued)."""
    pin_number = None
    if pin is not None:
        pin_number = parse_pin_name(pin)
        if pin_number is None:
            raise ConfigError([f'--pin: expected a virtual pin name v0..v255, got "{pin}"'])
    path = Path(config.buffer.path)
    if not path.exists():
        print(f"{path}: no buffer yet, nothing refused", file=sys.stderr)
        return 0
    with queries.connect(path, readonly=action == "list") as db:
        if action == "list":
            _list(queries.deadletter(db, device, pin_number), as_json)
        elif action == "retry":
            count = queries.requeue_deadletter(db, device, pin_number)
            print(f"requeued {count} points")
        else:
            count = queries.purge_deadletter(db, device, pin_number)
            print(f"purged {count} points (they stay counted as rejected)")
    return 0


def _list(rows: list[queries.Refused], as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "device": r.device,
                        "pin": f"v{r.pin}",
                        "ts": r.ts_ms,
                        "value": json.loads(r.value_json),
                        "reason": r.reason,
                        "at": r.at_ms,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    for r in rows:
        print(f"{r.device}\tv{r.pin}\t{r.ts_ms}\t{r.value_json}\t{r.reason}")
    print(f"{len(rows)} points")
