"""The wear floor: append lines to a file at a pace, with one fdatasync per line or per interval.

Usage: python -m tests.bench.floor FILE LINES_PER_S SECONDS SYNC_EVERY_S (0: after every line).
Prints one JSON object: the bytes this process wrote (/proc/self/io write_bytes) and the lines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .common import io_counters, kv_lines


def main(argv: list[str]) -> int:
    """Append `rate * seconds` lines at `rate` lines/s; fdatasync each line, or every `sync_every` seconds."""
    path, rate, seconds, sync_every = Path(argv[0]), float(argv[1]), float(argv[2]), float(argv[3])
    count = round(rate * seconds)
    lines = [line + b"\n" for line in kv_lines(count)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    before = io_counters()["write_bytes"]
    started = time.monotonic()
    next_sync = started + sync_every
    try:
        for number, line in enumerate(lines):
            time.sleep(max(0.0, started + number / rate - time.monotonic()))
            os.write(fd, line)
            if sync_every <= 0 or time.monotonic() >= next_sync:
                os.fdatasync(fd)
                next_sync += sync_every
        os.fdatasync(fd)
    finally:
        os.close(fd)
    print(json.dumps({"bytes": io_counters()["write_bytes"] - before, "lines": count}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
