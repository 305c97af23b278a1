"""The handle actor: fh -> open host fd, for files and directories.

A distinct fh per OPEN/OPENDIR/CREATE; RELEASE/RELEASEDIR close. fhs are never
reused while the server runs, so a stale fh from a confused or hostile client
gets EBADF instead of someone else's file.

A directory handle holds only its fd: READDIR reads from the host at the
host's own offsets each time (runtime/ops/dirstream.py), so a handle costs no
memory beyond the fd however large the directory.

Handle fds count against the fd budget they share with the inode table's
O_PATH fd cache (actors/inode_table.py, FdBudget): when it is full, a new
handle evicts an unused cached O_PATH fd; only when every fd is a handle (or
the root, or an inode with open handles) is the new open refused with EMFILE.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from actorfs.runtime.core.actor import Actor
from actorfs.runtime.core.errno_map import FsError

if TYPE_CHECKING:
    from actorfs.actors.inode_table import FdBudget


@dataclass(slots=True)
class Handle:
    fh: int
    fd: int
    nodeid: int
    is_dir: bool
    backing_id: int = 0  # FUSE passthrough backing id, closed on release


class HandleTable(Actor):
    name = "handles"

    def __init__(self, max_handles: int = 1 << 18, budget: FdBudget | None = None):
        super().__init__()
        self.max_handles = max_handles
        self.budget = budget  # an inode_table.FdBudget, or None (no shared budget)
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.refused = 0

    # -- async API ----------------------------------------------------------
    async def add(self, fd: int, nodeid: int, is_dir: bool, backing_id: int = 0) -> int:
        """Adopt an open fd; returns its new fh (EMFILE if the cap is reached: fd closed)."""
        return await self.ask(self._add, fd, nodeid, is_dir, backing_id)

    async def dup_fd(self, fh: int, want_dir: bool | None = None) -> int:
        """A dup of the fh's fd, owned by the caller. EBADF if unknown."""
        return await self.ask(self._dup_fd, fh, want_dir, orphan=os.close)

    async def check(self, fh: int, want_dir: bool | None = None) -> int:
        """The nodeid of a live fh (EBADF if unknown)."""
        return await self.ask(self._check, fh, want_dir)

    async def remove(self, fh: int, want_dir: bool | None = None) -> Handle:
        """Forget the fh; the caller closes Handle.fd (in the pool) and its backing id."""
        return await self.ask(self._remove, fh, want_dir)

    async def reset(self) -> list[Handle]:
        """A new session (after DESTROY): forget every handle; the caller closes the fds."""
        return await self.ask(self._reset)

    async def count(self) -> int:
        return await self.ask(lambda: len(self._handles))

    # -- handlers -------------------------------------------------------------
    def _lookup(self, fh: int, want_dir: bool | None) -> Handle:
        h = self._handles.get(fh)
        if h is None or (want_dir is not None and h.is_dir != want_dir):
            raise FsError(errno.EBADF, f"unknown fh {fh}")
        return h

    def _add(self, fd: int, nodeid: int, is_dir: bool, backing_id: int) -> int:
        budget = self.budget
        if len(self._handles) >= self.max_handles or (
            budget is not None and not budget.room_for_handle()
        ):
            os.close(fd)
            self.refused += 1
            raise FsError(errno.EMFILE, "too many open handles")
        if budget is not None:
            budget.handles += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(fh, fd, nodeid, is_dir, backing_id=backing_id)
        return fh

    def _dup_fd(self, fh: int, want_dir: bool | None) -> int:
        return os.dup(self._lookup(fh, want_dir).fd)

    def _check(self, fh: int, want_dir: bool | None) -> int:
        return self._lookup(fh, want_dir).nodeid

    def _remove(self, fh: int, want_dir: bool | None) -> Handle:
        h = self._lookup(fh, want_dir)
        del self._handles[fh]
        if self.budget is not None:
            self.budget.handles -= 1
        return h

    def _reset(self) -> list[Handle]:
        gone = list(self._handles.values())
        self._handles.clear()
        if self.budget is not None:
            self.budget.handles = 0
        return gone

    def close(self) -> None:
        for h in self._handles.values():
            try:
                os.close(h.fd)
            except OSError:
                pass
        self._handles.clear()
        if self.budget is not None:
            self.budget.handles = 0

