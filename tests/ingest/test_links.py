"""Opening a port: reset_on_open=False leaves DTR/RTS alone at close (HUPCL cleared), on a real pty."""

from __future__ import annotations

import os
import termios
import tty

from edgeforward.ingest.links import open_port


def hupcl(fd: int) -> bool:
    return bool(termios.tcgetattr(fd)[2] & termios.HUPCL)


def set_hupcl(fd: int) -> None:
    attributes = termios.tcgetattr(fd)
    attributes[2] |= termios.HUPCL
    termios.tcsetattr(fd, termios.TCSANOW, attributes)


def test_reset_on_open_false_clears_hupcl_and_the_default_leaves_it() -> None:
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        path = os.ttyname(slave)
        set_hupcl(slave)
        port, device = open_port(path, 115200)
        port.close()
        assert device == os.path.realpath(path)
        assert hupcl(slave)  # by default a close drops DTR/RTS, and the next open resets an Uno
        port, _ = open_port(path, 115200, reset_on_open=False)
        port.close()
        assert not hupcl(slave)  # closed, DTR/RTS stay as they are: no edge at the next open
    finally:
        os.close(master)
        os.close(slave)
