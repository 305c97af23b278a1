"""systemd's readiness protocol (sd_notify), without libsystemd.

When systemd starts a unit with Type=notify it sets NOTIFY_SOCKET to a unix
datagram socket (a path, or "@name" for the abstract namespace); the service
sends newline-separated KEY=VALUE assignments to it: READY=1 once it serves,
STATUS=... a one-line summary, STOPPING=1 when it begins to shut down. Without
NOTIFY_SOCKET every call is a no-op, so the server can call these always.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("actorfs.sd_notify")


def _address() -> str | bytes | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):  # abstract namespace
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    return None  # vsock and other forms: not ours to speak


def notify(*assignments: str) -> bool:
    """Send the assignments (e.g. "READY=1") in one datagram; True if sent."""
    addr = _address()
    if addr is None:
        return False
    msg = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(msg, addr)
    except OSError as exc:
        log.warning("cannot notify systemd on %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status: str) -> bool:
    """The service is ready: READY=1, its main pid and a one-line STATUS."""
    return notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={_one_line(status)}")


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def stopping(text: str = "stopping") -> bool:
    return notify("STOPPING=1", f"STATUS={_one_line(text)}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- logging to the journal ---------------------------------------------------------

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}  # fmt: skip


class _JournalFormatter(logging.Formatter):
    """`<N>name: message`: the journal reads <N> as the line's syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def journal_formatter() -> logging.Formatter | None:
    """A formatter with syslog priorities when stderr is systemd's journal, else None."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return None
    try:
        st = os.fstat(2)
    except OSError:
        return None
    if (st.st_dev, st.st_ino) != (int(dev), int(ino)):
        return None
    return _JournalFormatter("%(levelname)s %(name)s: %(message)s")
