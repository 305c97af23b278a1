"""FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING: the op layer over the DAX actor (actors/dax.py).

The op finds an fd for the file (the client's open handle, or the inode
itself when the kernel sends no handle), and hands it to the DAX window,
which maps it and records it in its table.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
from collections.abc import Iterable
from typing import Any

from actorfs.actors.inode_table import KIND_DIR, KIND_FILE
from actorfs.runtime.core.abi import (  # noqa: F401 (FUSE_SETUPMAPPING_FLAG_READ: for callers)
    FUSE_SETUPMAPPING_FLAG_READ,
    FUSE_SETUPMAPPING_FLAG_WRITE,
    NO_FH,
)
from actorfs.runtime.core.attrs import RequestContext
from actorfs.runtime.core.errno_map import FsError

log = logging.getLogger("actorfs.ops_dax")

# NO_FH: the fh of a SETUPMAPPING from the kernel's iomap path, with no open handle.


def _reopen(opath_fd: int, writable: bool) -> int:
    """A real fd on the file an O_PATH fd names (via /proc/self/fd, so no path walk).

    A write mapping needs O_RDWR; if the host refuses that, fall back to
    read-only and let mmap say EACCES. A read mapping opens read-only, so it
    neither needs nor reports write access.
    """
    path = f"/proc/self/fd/{opath_fd}"
    if writable:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
                raise
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)


# `fs` is the op layer's Filesystem (actorfs.runtime.ops), which sits above this
# package: it is typed Any here so that imports keep pointing one way.
async def setupmapping(
    fs: Any,
    ctx: RequestContext,
    nodeid: int,
    fh: int,
    foffset: int,
    length: int,
    flags: int,
    moffset: int,
) -> None:
    dax = getattr(fs, "dax", None)
    if dax is None:
        raise FsError(errno.ENOSYS, "no DAX window is configured")
    writable = bool(flags & FUSE_SETUPMAPPING_FLAG_WRITE)
    if writable and getattr(fs.config, "read_only", False):
        raise FsError(errno.EROFS)
    dax.check_range(moffset, length)  # EINVAL before any fd is touched
    if fh == NO_FH:
        opath, kind = await fs.inodes.dup_fd(nodeid)
        if kind != KIND_FILE:
            os.close(opath)
            # Only regular files are reopened: opening a device or FIFO has side effects.
            raise FsError(errno.EISDIR if kind == KIND_DIR else errno.ENODEV)
        fd = await fs.pool.run_owning([opath], _reopen, opath, writable)
    else:
        # A directory handle is refused with EISDIR by the window's own checks.
        fd = await fs.handles.dup_fd(fh)
    await dax.map_file(fd, foffset, length, moffset, writable, fs.pool.run)
    await _tell_watcher(fs, nodeid)


async def removemapping(
    fs: Any, ctx: RequestContext, ranges: Iterable[tuple[int, int]]
) -> None:
    dax = getattr(fs, "dax", None)
    if dax is None:
        raise FsError(errno.ENOSYS, "no DAX window is configured")
    await dax.unmap(ranges)


async def _tell_watcher(fs: Any, nodeid: int) -> None:
    """Mapped files change under the guest without WRITE requests: let the watcher know."""
    watch = getattr(getattr(fs, "watcher", None), "watch_file", None)
    if watch is None:
        return
    try:
        result = watch(nodeid)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # optional: the mapping itself succeeded
        log.debug("watcher could not watch nodeid %d: %r", nodeid, exc)
