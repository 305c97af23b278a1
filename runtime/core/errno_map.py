"""The op layer's error type, and the Linux errno of any exception an op raises.

FUSE replies carry Linux errnos; the server runs on Linux, so a host errno is
the errno a client decodes.
"""

from __future__ import annotations

import errno


class FsError(Exception):
    """An op failed with a (positive, Linux) errno. The dispatcher replies -errno."""

    __slots__ = ("errno",)

    def __init__(self, err: int, msg: str | None = None):
        super().__init__(err, msg or errno.errorcode.get(err, str(err)))
        self.errno = err


def linux_errno_of(exc: BaseException) -> int:
    """The positive Linux errno for an exception raised by an op (EIO if none)."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
