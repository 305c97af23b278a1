"""Typed values the op layer hands back: attributes, entries, statfs, dirents.

These are what a protocol encoder turns into fuse_attr / fuse_entry_out /
fuse_kstatfs / fuse_dirent(plus) bytes. They carry no I/O.
"""

from __future__ import annotations

import os
import stat as st
from dataclasses import dataclass

# d_type values as in <dirent.h>; FUSE carries them in fuse_dirent.type.
DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 0, 1, 2, 4, 6, 8, 10, 12


def dtype_of_mode(mode: int) -> int:
    """d_type for an st_mode (the kernel wants the file type in readdir)."""
    return (mode & 0o170000) >> 12


@dataclass(slots=True)
class Attr:
    """struct fuse_attr. `ino` is the nodeid the client sees."""

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0

    @classmethod
    def from_stat(cls, nodeid: int, s: os.stat_result) -> Attr:
        return cls(
            ino=nodeid,
            size=s.st_size,
            blocks=s.st_blocks,
            atime=int(s.st_atime_ns // 1_000_000_000),
            mtime=int(s.st_mtime_ns // 1_000_000_000),
            ctime=int(s.st_ctime_ns // 1_000_000_000),
            atimensec=int(s.st_atime_ns % 1_000_000_000),
            mtimensec=int(s.st_mtime_ns % 1_000_000_000),
            ctimensec=int(s.st_ctime_ns % 1_000_000_000),
            mode=s.st_mode,
            nlink=min(s.st_nlink, 0xFFFFFFFF),
            uid=s.st_uid,
            gid=s.st_gid,
            # fuse_attr.rdev is 32 bits: new_encode_dev() form, as the kernel decodes it.
            rdev=_encode_dev(s.st_rdev),
            blksize=s.st_blksize,
        )

    @property
    def is_dir(self) -> bool:
        return st.S_ISDIR(self.mode)

    @property
    def is_lnk(self) -> bool:
        return st.S_ISLNK(self.mode)


def _encode_dev(dev: int) -> int:
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


@dataclass(slots=True)
class Entry:
    """struct fuse_entry_out. Every Entry handed to a client adds one lookup."""

    nodeid: int
    generation: int
    attr: Attr
    entry_valid: float  # seconds
    attr_valid: float  # seconds


@dataclass(frozen=True, slots=True)
class NegativeEntry:
    """LOOKUP's "no such name, and the client may cache that for `entry_valid`
    seconds" (on the wire a fuse_entry_out with nodeid 0). It adds no lookup
    and names no inode: there is deliberately no nodeid to use by mistake."""

    entry_valid: float  # seconds


@dataclass(slots=True)
class StatFs:
    """struct fuse_kstatfs."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


@dataclass(slots=True)
class DirEntry:
    """One fuse_dirent: `off` is the offset of the *next* entry (telldir cookie)."""

    ino: int
    off: int
    type: int
    name: bytes


@dataclass(slots=True)
class DirEntryPlus:
    """One fuse_direntplus: a dirent and the Entry for it (nodeid 0 = no entry)."""

    entry: Entry
    dirent: DirEntry


@dataclass(slots=True)
class Opened:
    """What OPEN / OPENDIR / CREATE return: the fh and fuse_open_out flags."""

    fh: int
    open_flags: int = 0  # FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_PASSTHROUGH ...
    backing_id: int = 0  # for FOPEN_PASSTHROUGH


@dataclass(slots=True, frozen=True)
class RequestContext:
    """Who asked: the fuse_in_header's uid, gid, pid (and CREATE/MKNOD's umask)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0


@dataclass(frozen=True, slots=True)
class SetattrArgs:
    """What a SETATTR may change (built from fuse_setattr_in by the dispatcher).

    `valid` holds the FATTR_* bits of core.abi: only the fields it names count
    (FATTR_FH: change through the open file `fh`; FATTR_ATIME_NOW /
    FATTR_MTIME_NOW: set that time to now; FATTR_KILL_SUIDGID: drop suid/sgid).
    Times are seconds and nanoseconds since the epoch.
    """

    valid: int
    fh: int = 0
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    atime: int = 0
    atimensec: int = 0
    mtime: int = 0
    mtimensec: int = 0


@dataclass(frozen=True, slots=True)
class XattrReply:
    """A GETXATTR or LISTXATTR answer.

    A caller that asks with size 0 wants only the size (`value` is None); one
    that gives a buffer gets the value, which the op layer has checked fits
    (ERANGE otherwise), as getxattr(2) and listxattr(2) do.
    """

    size: int
    value: bytes | None = None
