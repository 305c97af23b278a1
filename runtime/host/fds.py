"""OwnedFd: one fd and the duty to close it, in one place.

An op opens or dups an fd, does some checks or syscalls with it, and then
either hands it on (to the inode table, the handle table, the watcher, a pool
job, or its own caller) or, on any failure, closes it. Written out, that is
`fd = ...; try: ...; except BaseException: os.close(fd); raise` at every site.
Here it is a `with` block instead:

    with OwnedFd(os.open(name, flags, dir_fd=pfd)) as fd:
        st = os.fstat(fd.fd)  # any exception here closes the fd
        return fd.release(), st  # ownership goes to the caller

The block closes the fd however it ends (an exception, CancelledError and
KeyboardInterrupt included, or a normal exit) unless `release()` handed the fd
on first; `release()` is the one point where ownership moves. -1 means "no
fd" (an optional dup not taken): nothing is closed.

It costs a few Python calls (~0.3-0.4 us a use): the hottest pool jobs
(ops._job_lookup, ops._job_reopen_stat) keep a written-out try/except.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self


class OwnedFd:
    """One fd owned by the code holding this object (see the module doc)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd  # -1: nothing held (released, closed, or never taken)

    def release(self) -> int:
        """Hand the fd on: whoever gets it now closes it. Nothing is closed here."""
        fd, self.fd = self.fd, -1
        return fd

    def replace(self, fd: int) -> None:
        """Own `fd` instead of the fd held now, which is closed (a walk one step on)."""
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        """Close the fd if one is still held (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd = self.fd
        if fd >= 0:
            self.fd = -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"OwnedFd({self.fd})"


__all__ = ["OwnedFd"]
