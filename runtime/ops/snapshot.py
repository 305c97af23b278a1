"""Snapshot/restore of the inode table in the "PFSS" v1 format of the reference
backend (docs/DESIGN.md says which backend that is).

Restore validates the whole blob first (errors name the problem: bad magic,
truncated, version, kind, missing root, root mismatch, trailing bytes), then
reopens each inode beneath the root one component at a time with O_NOFOLLOW
from the root's fd, so a path in the blob can never lead outside the root.
Inodes whose object is gone (or is now a different kind) are dropped, with
the names that pointed at them; the client gets ENOENT/ESTALE for them later.
"""

from __future__ import annotations

import os

from actorfs.actors.inode_table import SnapshotError, SnapshotTruncated, kind_of_mode
from actorfs.runtime.core.abi import FUSE_ROOT_ID
from actorfs.runtime.host.fds import OwnedFd
from actorfs.runtime.ops.filesystem import Filesystem

__all__ = ["SnapshotError", "SnapshotTruncated", "restore", "snapshot"]


async def snapshot(fs: Filesystem) -> bytes:
    return await fs.inodes.snapshot()


def _reopen_beneath(root_fd: int, root: bytes, path: bytes) -> tuple[int, os.stat_result] | None:
    """O_PATH fd + stat for `path` (absolute, under root), never following a symlink."""
    if path == root:
        return None
    prefix = root.rstrip(b"/") + b"/"
    if not path.startswith(prefix):
        return None
    parts = path[len(prefix) :].split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        return None
    with OwnedFd(os.dup(root_fd)) as fd:
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
                fd.replace(os.open(part, flags, dir_fd=fd.fd))
            st = os.fstat(fd.fd)
        except OSError:
            return None
        return fd.release(), st


def _reopen_all(
    root_fd: int, root: bytes, inodes: list[tuple[int, int, bytes]]
) -> tuple[list[tuple[int, int, bytes, int, os.stat_result]], int]:
    out: list[tuple[int, int, bytes, int, os.stat_result]] = []
    dropped = 0
    for nodeid, kind, path in inodes:
        if nodeid == FUSE_ROOT_ID:
            continue
        r = _reopen_beneath(root_fd, root, path)
        if r is None:
            dropped += 1
            continue
        fd, st = r
        if kind_of_mode(st.st_mode) != kind:  # replaced by another kind of object
            os.close(fd)
            dropped += 1
            continue
        out.append((nodeid, kind, path, fd, st))
    return out, dropped


async def restore(fs: Filesystem, blob: bytes) -> int:
    """Restore a snapshot; returns how many inodes were dropped because they are gone.

    Raises SnapshotError (with a clear message) for a malformed blob.
    """
    next_nodeid, inodes, children = await fs.inodes.restore_plan(bytes(blob))
    root_fd, _ = await fs.inodes.dup_fd(FUSE_ROOT_ID)
    reopened, dropped = await fs.pool.run_owning(
        (root_fd,), _reopen_all, root_fd, fs.inodes.root, inodes
    )
    # Nodeids that now reach an object another (name-bound) nodeid has are dropped too.
    return dropped + await fs.inodes.install_restored(next_nodeid, reopened, children)
