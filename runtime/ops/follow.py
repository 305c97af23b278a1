"""`--symlinks follow`: resolve a link ourselves, one component at a time,
never entering a mount this server answers for.

Under follow a lookup of a symlink hands the client the link's target, which
may be any host path the server can reach (that is what follow means: it
exposes every such path). Letting the kernel follow the link (a plain open)
would also walk into this server's own mount when the target leads there
(`a -> MNT/b`, `b -> MNT/a`, or just `x -> MNT`): the pool thread doing the
lookup would then wait for a request to ourselves, which needs another pool
thread, and a few such links stalled every thread for good.

So the server walks the target itself: openat(O_PATH | O_NOFOLLOW) per
component, readlink for links (at most MAXSYMLINKS, then ELOOP), "/" for
absolute targets, ".." as the kernel resolves it from the directory we are
in. Before going on from any component it checks which mount the new fd is
on without asking any filesystem: the `mnt_id:` line of
/proc/self/fdinfo/<fd>, and, when that differs from the directory's, the
mount's device and type from a fresh /proc/self/mountinfo. A component on a
mount this process serves (its device is registered here once mounted: the
mountpoint itself, any bind mount of it, reached by name, by ".." or by an
absolute path) or on any other actorfs FUSE mount (two servers following
links into each other would wait on each other) ends the lookup with ELOOP
at once. Nothing inside such a mount is ever stat'ed: an O_PATH open of a
mount's root sends its server no request.

An fd pins its mount, so a mount id seen on an fd we hold cannot be reused
by another mount meanwhile; that is why only crossings (a new mount id)
need the mount table, and why it is read afresh there.

virtio-fs has no mount on this host: nothing is registered, and only the
actorfs check applies.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from actorfs.runtime.core.errno_map import FsError
from actorfs.runtime.host.fds import OwnedFd

MAXSYMLINKS = 40  # as the kernel's path walk
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
ACTORFS_FSTYPE = "fuse.actorfs"

# Devices (major, minor) of the FUSE mounts this process serves.
_own: set[tuple[int, int]] = set()
_own_lock = threading.Lock()


def _dev(conn: int | None) -> tuple[int, int] | None:
    # A fusectl connection number is the mount's dev_t in the kernel's encoding.
    return None if conn is None else (conn >> 20, conn & 0xFFFFF)


def register_own(conn: int | None) -> None:
    """A mount this process serves (its fusectl connection number, as
    fuse_mount.find_connection gives it): never enter it while following links."""
    dev = _dev(conn)
    if dev is not None:
        with _own_lock:
            _own.add(dev)


def unregister_own(conn: int | None) -> None:
    with _own_lock:
        _own.discard(_dev(conn))


def own_devices() -> frozenset[tuple[int, int]]:
    with _own_lock:
        return frozenset(_own)


class OwnMount(FsError):
    """The walk would enter a mount served by this (or another actorfs) server."""

    def __init__(self, what: str):
        super().__init__(errno.ELOOP, f"link leads into {what}")


def mnt_id(fd: int) -> int:
    """The id of the mount `fd` is on (from /proc/self/fdinfo: no filesystem asked)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo")


def mount_of(mid: int, path: str = "/proc/self/mountinfo") -> tuple[tuple[int, int], str] | None:
    """((major, minor), fstype) of mount `mid`, read afresh; None if not listed."""
    key = b"%d " % mid
    with open(path, "rb") as f:
        for line in f:
            if not line.startswith(key):
                continue
            left, _, right = line.partition(b" - ")
            fields = left.split(b" ")
            major, _, minor = fields[2].partition(b":")
            return (int(major), int(minor)), right.split(b" ", 1)[0].decode("ascii", "replace")
    return None


def check_mount(fd: int, from_mid: int | None) -> int:
    """The mount id of `fd`; OwnMount when it is a mount we must not enter."""
    mid = mnt_id(fd)
    if mid == from_mid:
        return mid  # same mount as the directory we came from (already checked)
    info = mount_of(mid)
    if info is None:
        raise OwnMount("a mount not in this namespace's table")
    dev, fstype = info
    if dev in own_devices():
        raise OwnMount("this server's own mount")
    if fstype == ACTORFS_FSTYPE:
        raise OwnMount("an actorfs mount")
    return mid


def open_target(pfd: int, name: bytes) -> int:
    """O_PATH fd of what the link pfd/name finally names, walked component by
    component beneath the host's "/" (see the module doc). OwnMount (ELOOP)
    when it leads into a mount we must not enter; OSError for an ordinary
    failure (broken, looping, not permitted)."""
    comps = [name]
    links = 0
    with OwnedFd(os.dup(pfd)) as cur:  # the directory the walk is in
        cur_mid = mnt_id(cur.fd)
        while comps:
            c = comps.pop(0)
            if c in (b"", b"."):
                if not comps:  # the walk ended on a directory ("x/" or "x/.")
                    return cur.release()
                continue
            with OwnedFd(os.open(c, O_PATH_NOFOLLOW, dir_fd=cur.fd)) as fd:
                mid = check_mount(fd.fd, cur_mid)
                st = os.fstat(fd.fd)  # safe: not one of our mounts
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAXSYMLINKS:
                        raise OSError(errno.ELOOP, "too many levels of symbolic links")
                    target = os.fsencode(os.readlink("", dir_fd=fd.fd))
                    if not target:
                        raise OSError(errno.ENOENT, "empty symlink")
                    if target.startswith(b"/"):
                        with OwnedFd(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) as top:
                            cur_mid = check_mount(top.fd, None)
                            cur.replace(top.release())
                    comps = target.split(b"/") + comps
                    continue  # (the link's fd is closed on the way out)
                if not comps:
                    return fd.release()
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, "not a directory")
                cur.replace(fd.release())
                cur_mid = mid
        return cur.release()  # (not reached: the last component returns above)
