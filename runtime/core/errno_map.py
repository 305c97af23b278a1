"""Host errno -> Linux errno, in one place, and the op layer's error type.

FUSE replies carry Linux errnos. On a Linux host the map is the identity;
the macOS table (from the reference backend) is a pure function kept here so
it is tested on any host.
"""

from __future__ import annotations

import errno
import sys


class FsError(Exception):
    """An op failed with a (positive, Linux) errno. The dispatcher replies -errno."""

    __slots__ = ("errno",)

    def __init__(self, err: int, msg: str | None = None):
        super().__init__(err, msg or errno.errorcode.get(err, str(err)))
        self.errno = err


# macOS errno -> Linux errno where the numbers differ (1..34 agree).
_MACOS_TO_LINUX = {
    35: 11, 11: 35, 63: 36, 77: 37, 78: 38, 66: 39, 62: 40, 91: 42, 90: 43,
    93: 61, 96: 61, 84: 75, 94: 74, 92: 84, 38: 88, 39: 89, 40: 90, 41: 91,
    42: 92, 43: 93, 44: 94, 45: 95, 102: 95, 46: 96, 47: 97, 48: 98, 49: 99,
    50: 100, 51: 101, 52: 102, 53: 103, 54: 104, 55: 105, 56: 106, 57: 107,
    58: 108, 59: 109, 60: 110, 61: 111, 64: 112, 65: 113, 37: 114, 36: 115,
    70: 116, 69: 122, 71: 66, 68: 87, 95: 72, 97: 67, 98: 63, 99: 60,
    100: 71, 101: 62, 89: 125, 105: 130, 104: 131,
}  # fmt: skip


def macos_to_linux_errno(host: int) -> int:
    """Translate a macOS errno to the Linux number a FUSE client decodes."""
    return _MACOS_TO_LINUX.get(host, host)


def identity_errno(host: int) -> int:
    return host


host_to_linux_errno = macos_to_linux_errno if sys.platform == "darwin" else identity_errno


def linux_errno_of(exc: BaseException) -> int:
    """The positive Linux errno for an exception raised by an op (EIO if none)."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return host_to_linux_errno(exc.errno)
    return errno.EIO
