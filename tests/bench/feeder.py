"""The simulated MCUs: write one file's bytes to each given pty master at full speed, one thread per pty.

Usage: python -m tests.bench.feeder FILE FD [FD...]; prints "ready", starts on a line on stdin.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

WRITE_CHUNK_BYTES = 65536


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:WRITE_CHUNK_BYTES])
        view = view[written:]


def main(argv: list[str]) -> int:
    """Write the file to every fd once told to go."""
    data = Path(argv[0]).read_bytes()
    fds = [int(arg) for arg in argv[1:]]
    for fd in fds:
        os.set_blocking(fd, True)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    threads = [threading.Thread(target=_write_all, args=(fd, data)) for fd in fds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
