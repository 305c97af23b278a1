"""Linux inotify through libc: the three syscalls and the event record format. No asyncio.

A small binding of our own rather than a wrapper library, because the watcher
needs raw watch descriptors, names as bytes, a truly non-blocking fd it can
hand to the event loop, and whole batches of events per read (to coalesce).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_CREATE = 0x10000000
IN_ISDIR = 0x40000000

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# struct inotify_event { int wd; uint32_t mask, cookie, len; char name[]; }
_HEADER = struct.Struct("iIII")
# Room for many events per read(2); one record is at most 16 + NAME_MAX + 1 bytes.
READ_SIZE = 64 * 1024

MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


def _check(rc: int) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def max_user_watches(default: int = 8192) -> int:
    """The kernel's per-user watch limit (shared by every inotify user of this uid)."""
    try:
        with open(MAX_USER_WATCHES) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


def parse_events(buf: bytes) -> list[tuple[int, int, int, bytes | None]]:
    """Split a read(2) result into (wd, mask, cookie, name or None) records."""
    out = []
    pos, end = 0, len(buf)
    size = _HEADER.size
    while pos + size <= end:
        wd, mask, cookie, length = _HEADER.unpack_from(buf, pos)
        pos += size
        name = None
        if length:
            raw = buf[pos : pos + length]
            pos += length
            raw = raw.split(b"\0", 1)[0]  # the name is NUL-padded
            name = raw or None
        out.append((wd, mask, cookie, name))
    return out


class Inotify:
    """One inotify instance: a non-blocking, close-on-exec fd."""

    def __init__(self) -> None:
        self.fd = _check(_lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC))

    def add_watch(self, path: bytes, mask: int) -> int:
        """The watch descriptor; an inode already watched gets its existing wd back."""
        return _check(_lib().inotify_add_watch(self.fd, path, mask))

    def rm_watch(self, wd: int) -> None:
        _check(_lib().inotify_rm_watch(self.fd, wd))

    def read_events(self, budget: int = 16 * READ_SIZE) -> list[tuple[int, int, int, bytes | None]]:
        """Every event queued now (up to ~budget bytes); [] if none. Never blocks."""
        events = []
        got = 0
        while got < budget:
            try:
                buf = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not buf:
                break
            got += len(buf)
            events.extend(parse_events(buf))
        return events

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0
