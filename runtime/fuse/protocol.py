"""The FUSE wire format, sans-IO: bytes -> typed requests, typed replies -> buffers.

Nothing here reads, writes or sleeps, so it is tested with plain bytes and
fuzzed. Layouts follow <linux/fuse.h> protocol 7.38, plus the 7.39/7.40
additions used for passthrough (written in by hand: the installed header is
7.38). Every struct layout is written once, in `LAYOUTS`, as data; request
message classes, decoders and encoders are all derived from that table.

- `decode(frame)` returns one request message (a slotted dataclass named after
  the opcode, fields named as in fuse.h) or raises `ProtocolError`, and nothing
  else, whatever the bytes.
- `reply_*` / `notify_*` return a list of buffers for writev: the
  fuse_out_header and the fixed part are packed together, bulk data (READ,
  READLINK, xattr values) is passed through without a copy.
"""

from __future__ import annotations

import errno as _errno
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, is_dataclass
from dataclasses import fields as _fields
from operator import attrgetter
from typing import Any, ClassVar, TypeAlias

from actorfs.runtime.core import abi as _abi
from actorfs.runtime.core.attrs import (
    Attr,
    DirEntry,
    DirEntryPlus,
    Entry,
    NegativeEntry,
    Opened,
    StatFs,
)

# -- versions and constants -------------------------------------------------

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 38  # what we speak without passthrough
FUSE_PASSTHROUGH_MINOR_VERSION = 40  # what we claim when passthrough is negotiated
FUSE_MIN_MINOR_VERSION = 31  # oldest kernel minor we accept (map_alignment, SETUPMAPPING)
FUSE_MIN_READ_BUFFER = 8192

# INIT flags (flags | flags2 << 32 once FUSE_INIT_EXT is set).
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_CREATE_SUPP_GROUP = 1 << 34  # 7.39
FUSE_HAS_EXPIRE_ONLY = 1 << 35
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36  # 7.39
FUSE_PASSTHROUGH = 1 << 37  # 7.40: flags2 bit 5
FUSE_NO_EXPORT_SUPPORT = 1 << 38  # 7.40
FUSE_HAS_RESEND = 1 << 39  # 7.40
FUSE_ALLOW_IDMAP = 1 << 40
FUSE_OVER_IO_URING = 1 << 41
FUSE_REQUEST_TIMEOUT = 1 << 42

# The kernel refuses a stack depth above FILESYSTEM_MAX_STACK_DEPTH.
FILESYSTEM_MAX_STACK_DEPTH = 2

# The ABI values other layers share are defined once, in actorfs.runtime.core.abi.
from actorfs.runtime.core.abi import (  # noqa: E402, I001 (re-exported: "X as X" says so to type checkers)
    FOPEN_CACHE_DIR as FOPEN_CACHE_DIR,
    FOPEN_DIRECT_IO as FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE as FOPEN_KEEP_CACHE,
    FOPEN_NOFLUSH as FOPEN_NOFLUSH,
    FOPEN_NONSEEKABLE as FOPEN_NONSEEKABLE,
    FOPEN_PARALLEL_DIRECT_WRITES as FOPEN_PARALLEL_DIRECT_WRITES,
    FOPEN_PASSTHROUGH as FOPEN_PASSTHROUGH,
    FOPEN_STREAM as FOPEN_STREAM,
    FUSE_OPEN_KILL_SUIDGID as FUSE_OPEN_KILL_SUIDGID,
    FUSE_ROOT_ID as FUSE_ROOT_ID,
    FUSE_SETUPMAPPING_FLAG_READ as FUSE_SETUPMAPPING_FLAG_READ,
    FUSE_SETUPMAPPING_FLAG_WRITE as FUSE_SETUPMAPPING_FLAG_WRITE,
    FUSE_WRITE_KILL_SUIDGID as FUSE_WRITE_KILL_SUIDGID,
    IN_HEADER_SIZE as IN_HEADER_SIZE,
    OUT_HEADER_SIZE as OUT_HEADER_SIZE,
    HeaderPeek as HeaderPeek,
    dirent_size as dirent_size,
    direntplus_size as direntplus_size,
    peek_header as peek_header,
)

FUSE_GETATTR_FH = 1 << 0
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_LK_FLOCK = 1 << 0
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_FSYNC_FDATASYNC = 1 << 0
FUSE_ATTR_SUBMOUNT = 1 << 0
FUSE_ATTR_DAX = 1 << 1
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0
FUSE_EXPIRE_ONLY = 1 << 0
FUSE_UNIQUE_RESEND = 1 << 63  # 7.40
# The kernel tags an INTERRUPT's own unique with this bit (the target's is even).
FUSE_INT_REQ_BIT = 1 << 0

# Opcodes (enum fuse_opcode). STATX is 7.39, COPY_FILE_RANGE_64 7.45.
FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_SETATTR = 4
FUSE_READLINK = 5
FUSE_SYMLINK = 6
FUSE_MKNOD = 8
FUSE_MKDIR = 9
FUSE_UNLINK = 10
FUSE_RMDIR = 11
FUSE_RENAME = 12
FUSE_LINK = 13
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FSYNC = 20
FUSE_SETXATTR = 21
FUSE_GETXATTR = 22
FUSE_LISTXATTR = 23
FUSE_REMOVEXATTR = 24
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_READDIR = 28
FUSE_RELEASEDIR = 29
FUSE_FSYNCDIR = 30
FUSE_GETLK = 31
FUSE_SETLK = 32
FUSE_SETLKW = 33
FUSE_ACCESS = 34
FUSE_CREATE = 35
FUSE_INTERRUPT = 36
FUSE_BMAP = 37
FUSE_DESTROY = 38
FUSE_IOCTL = 39
FUSE_POLL = 40
FUSE_NOTIFY_REPLY = 41
FUSE_BATCH_FORGET = 42
FUSE_FALLOCATE = 43
FUSE_READDIRPLUS = 44
FUSE_RENAME2 = 45
FUSE_LSEEK = 46
FUSE_COPY_FILE_RANGE = 47
FUSE_SETUPMAPPING = 48
FUSE_REMOVEMAPPING = 49
FUSE_SYNCFS = 50
FUSE_TMPFILE = 51
FUSE_STATX = 52

# Requests the kernel expects no reply to.
NO_REPLY_OPCODES = frozenset({FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT, FUSE_NOTIFY_REPLY})

# enum fuse_notify_code: carried in fuse_out_header.error with unique 0.
FUSE_NOTIFY_POLL = 1
FUSE_NOTIFY_INVAL_INODE = 2
FUSE_NOTIFY_INVAL_ENTRY = 3
FUSE_NOTIFY_STORE = 4
FUSE_NOTIFY_RETRIEVE = 5
FUSE_NOTIFY_DELETE = 6


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir(2) << 30 | size(14) << 16 | type(8) << 8 | nr(8)
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
FUSE_DEV_IOC_MAGIC = 229
FUSE_DEV_IOC_CLONE = _ioc(_IOC_READ, FUSE_DEV_IOC_MAGIC, 0, 4)
FUSE_DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, FUSE_DEV_IOC_MAGIC, 1, 16)  # struct fuse_backing_map
FUSE_DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, FUSE_DEV_IOC_MAGIC, 2, 4)  # uint32 backing_id

# -- struct layouts, written once ----------------------------------------------
#
# One entry per fuse.h struct: "type name" fields in order. Types: u8/u16/u32/
# u64, s32/s64, pad16/pad32/pad64 (padding, unnamed in the decoded values),
# `padN*K` for padding arrays, or another struct's name (inlined, its fields
# prefixed with "<name>_"). Times in fuse_attr are s64: the kernel reads them
# as signed time64_t, so pre-1970 files round-trip.

LAYOUTS: dict[str, str] = {
    "fuse_in_header": "u32 len, u32 opcode, u64 unique, u64 nodeid, u32 uid, u32 gid, u32 pid,"
    " u16 total_extlen, pad16 padding",
    "fuse_out_header": "u32 len, s32 error, u64 unique",
    "fuse_attr": "u64 ino, u64 size, u64 blocks, s64 atime, s64 mtime, s64 ctime,"
    " u32 atimensec, u32 mtimensec, u32 ctimensec, u32 mode, u32 nlink, u32 uid, u32 gid,"
    " u32 rdev, u32 blksize, u32 flags",
    "fuse_kstatfs": "u64 blocks, u64 bfree, u64 bavail, u64 files, u64 ffree, u32 bsize,"
    " u32 namelen, u32 frsize, pad32 padding, pad32*6 spare",
    "fuse_file_lock": "u64 start, u64 end, u32 type, u32 pid",
    "fuse_entry_out": "u64 nodeid, u64 generation, u64 entry_valid, u64 attr_valid,"
    " u32 entry_valid_nsec, u32 attr_valid_nsec, fuse_attr attr",
    "fuse_forget_in": "u64 nlookup",
    "fuse_forget_one": "u64 nodeid, u64 nlookup",
    "fuse_batch_forget_in": "u32 count, pad32 dummy",
    "fuse_getattr_in": "u32 getattr_flags, pad32 dummy, u64 fh",
    "fuse_attr_out": "u64 attr_valid, u32 attr_valid_nsec, pad32 dummy, fuse_attr attr",
    "fuse_mknod_in": "u32 mode, u32 rdev, u32 umask, pad32 padding",
    "fuse_mkdir_in": "u32 mode, u32 umask",
    "fuse_rename_in": "u64 newdir",
    "fuse_rename2_in": "u64 newdir, u32 flags, pad32 padding",
    "fuse_link_in": "u64 oldnodeid",
    "fuse_setattr_in": "u32 valid, pad32 padding, u64 fh, u64 size, u64 lock_owner,"
    " s64 atime, s64 mtime, s64 ctime, u32 atimensec, u32 mtimensec, u32 ctimensec,"
    " u32 mode, pad32 unused4, u32 uid, u32 gid, pad32 unused5",
    "fuse_open_in": "u32 flags, u32 open_flags",
    "fuse_create_in": "u32 flags, u32 mode, u32 umask, u32 open_flags",
    "fuse_open_out": "u64 fh, u32 open_flags, s32 backing_id",
    "fuse_release_in": "u64 fh, u32 flags, u32 release_flags, u64 lock_owner",
    "fuse_flush_in": "u64 fh, pad32 unused, pad32 padding, u64 lock_owner",
    "fuse_read_in": "u64 fh, u64 offset, u32 size, u32 read_flags, u64 lock_owner,"
    " u32 flags, pad32 padding",
    "fuse_write_in": "u64 fh, u64 offset, u32 size, u32 write_flags, u64 lock_owner,"
    " u32 flags, pad32 padding",
    "fuse_write_out": "u32 size, pad32 padding",
    "fuse_statfs_out": "fuse_kstatfs st",
    "fuse_fsync_in": "u64 fh, u32 fsync_flags, pad32 padding",
    # Without FUSE_SETXATTR_EXT the kernel sends only the first 8 bytes.
    "fuse_setxattr_in": "u32 size, u32 flags, u32 setxattr_flags, pad32 padding",
    "fuse_setxattr_in_compat": "u32 size, u32 flags",
    "fuse_getxattr_in": "u32 size, pad32 padding",
    "fuse_getxattr_out": "u32 size, pad32 padding",
    "fuse_lk_in": "u64 fh, u64 owner, fuse_file_lock lk, u32 lk_flags, pad32 padding",
    "fuse_lk_out": "fuse_file_lock lk",
    "fuse_access_in": "u32 mask, pad32 padding",
    # Kernels before 7.36 send only major..flags (16 bytes).
    "fuse_init_in": "u32 major, u32 minor, u32 max_readahead, u32 flags, u32 flags2,"
    " pad32*11 unused",
    # max_stack_depth is 7.40, request_timeout 7.43 (we leave it 0).
    "fuse_init_out": "u32 major, u32 minor, u32 max_readahead, u32 flags,"
    " u16 max_background, u16 congestion_threshold, u32 max_write, u32 time_gran,"
    " u16 max_pages, u16 map_alignment, u32 flags2, u32 max_stack_depth,"
    " u16 request_timeout, pad16*11 unused",
    "fuse_interrupt_in": "u64 unique",
    "fuse_bmap_in": "u64 block, u32 blocksize, pad32 padding",
    "fuse_bmap_out": "u64 block",
    "fuse_ioctl_in": "u64 fh, u32 flags, u32 cmd, u64 arg, u32 in_size, u32 out_size",
    "fuse_ioctl_out": "s32 result, u32 flags, u32 in_iovs, u32 out_iovs",
    "fuse_poll_in": "u64 fh, u64 kh, u32 flags, u32 events",
    "fuse_poll_out": "u32 revents, pad32 padding",
    "fuse_fallocate_in": "u64 fh, u64 offset, u64 length, u32 mode, pad32 padding",
    "fuse_dirent": "u64 ino, u64 off, u32 namelen, u32 type",
    "fuse_notify_inval_inode_out": "u64 ino, s64 off, s64 len",
    "fuse_notify_inval_entry_out": "u64 parent, u32 namelen, u32 flags",
    "fuse_notify_delete_out": "u64 parent, u64 child, u32 namelen, pad32 padding",
    "fuse_notify_store_out": "u64 nodeid, u64 offset, u32 size, pad32 padding",
    "fuse_notify_retrieve_out": "u64 notify_unique, u64 nodeid, u64 offset, u32 size,"
    " pad32 padding",
    "fuse_notify_retrieve_in": "pad64 dummy1, u64 offset, u32 size, pad32 dummy2,"
    " pad64 dummy3, pad64 dummy4",
    "fuse_lseek_in": "u64 fh, u64 offset, u32 whence, pad32 padding",
    "fuse_lseek_out": "u64 offset",
    "fuse_copy_file_range_in": "u64 fh_in, u64 off_in, u64 nodeid_out, u64 fh_out,"
    " u64 off_out, u64 len, u64 flags",
    "fuse_setupmapping_in": "u64 fh, u64 foffset, u64 len, u64 flags, u64 moffset",
    "fuse_removemapping_in": "u32 count",
    "fuse_removemapping_one": "u64 moffset, u64 len",
    "fuse_syncfs_in": "pad64 padding",
    "fuse_statx_in": "u32 getattr_flags, pad32 reserved, u64 fh, u32 sx_flags, u32 sx_mask",
    "fuse_backing_map": "s32 fd, u32 flags, pad64 padding",
}

_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "s32": "i", "s64": "q"}
_PADS = {"pad16": 2, "pad32": 4, "pad64": 8}


class Layout:
    """One struct: its precompiled little-endian Struct and the names of its values."""

    __slots__ = ("name", "fmt", "fields", "offsets", "struct", "size")

    def __init__(self, name: str, fmt: str, fields: tuple[str, ...], offsets: tuple[int, ...]):
        self.name = name
        self.fmt = fmt
        self.fields = fields
        self.offsets = offsets  # byte offset of each field (checked against fuse.h)
        self.struct = struct.Struct("<" + fmt)
        self.size = self.struct.size


def _compile(spec: dict[str, str]) -> dict[str, Layout]:
    out: dict[str, Layout] = {}
    for name, text in spec.items():
        fmt: list[str] = []
        fields: list[str] = []
        offsets: list[int] = []
        for item in text.split(","):
            type_, fname = item.split()
            base, _, count = type_.partition("*")
            n = int(count) if count else 1
            here = struct.calcsize("<" + "".join(fmt))
            if base in _CODES:
                fmt.append(_CODES[base])
                fields.append(fname)
                offsets.append(here)
            elif base in _PADS:
                fmt.append(f"{_PADS[base] * n}x")
            else:  # an inner struct, already compiled above
                inner = out[base]
                fmt.append(inner.fmt)
                fields.extend(f"{fname}_{f}" for f in inner.fields)
                offsets.extend(here + o for o in inner.offsets)
        out[name] = Layout(name, "".join(fmt), tuple(fields), tuple(offsets))
    return out


LAYOUT = _compile(LAYOUTS)

_IN_HEADER = LAYOUT["fuse_in_header"].struct
_OUT_HEADER = LAYOUT["fuse_out_header"].struct

# -- errors ---------------------------------------------------------------------


class ProtocolError(Exception):
    """A frame that cannot be decoded. The only exception `decode` raises.

    `errno` is what to reply (EINVAL malformed, ENOSYS unknown opcode, EIO when
    even the header is unreadable); `unique` is None when no reply can be formed;
    `no_reply` is True when the opcode is one the kernel expects no reply to.
    """

    def __init__(self, err: int, reason: str, unique: int | None = None, opcode: int | None = None):
        super().__init__(f"{_errno.errorcode.get(err, err)}: {reason}")
        self.errno = err
        self.reason = reason
        self.unique = unique
        self.opcode = opcode

    @property
    def no_reply(self) -> bool:
        return self.unique is None or self.opcode in NO_REPLY_OPCODES


# -- request messages -------------------------------------------------------------
#
# opcode -> (message class name, fixed struct or None, trailing part). The
# trailing kinds: "name" (one NUL-terminated name), "names" (two, the second
# field name given), "xattr" (name then `size` bytes of value), "data:<field>"
# (that many payload bytes, as a memoryview), "forgets", "mappings".

REQUESTS: dict[int, tuple[str, str | None, str]] = {
    FUSE_LOOKUP: ("Lookup", None, "name"),
    FUSE_FORGET: ("Forget", "fuse_forget_in", ""),
    FUSE_GETATTR: ("Getattr", "fuse_getattr_in", ""),
    FUSE_SETATTR: ("Setattr", "fuse_setattr_in", ""),
    FUSE_READLINK: ("Readlink", None, ""),
    FUSE_SYMLINK: ("Symlink", None, "names:target"),
    FUSE_MKNOD: ("Mknod", "fuse_mknod_in", "name"),
    FUSE_MKDIR: ("Mkdir", "fuse_mkdir_in", "name"),
    FUSE_UNLINK: ("Unlink", None, "name"),
    FUSE_RMDIR: ("Rmdir", None, "name"),
    FUSE_RENAME: ("Rename", "fuse_rename_in", "names:newname"),
    FUSE_LINK: ("Link", "fuse_link_in", "name"),
    FUSE_OPEN: ("Open", "fuse_open_in", ""),
    FUSE_READ: ("Read", "fuse_read_in", ""),
    FUSE_WRITE: ("Write", "fuse_write_in", "data:size"),
    FUSE_STATFS: ("Statfs", None, ""),
    FUSE_RELEASE: ("Release", "fuse_release_in", ""),
    FUSE_FSYNC: ("Fsync", "fuse_fsync_in", ""),
    FUSE_SETXATTR: ("Setxattr", "fuse_setxattr_in", "xattr"),
    FUSE_GETXATTR: ("Getxattr", "fuse_getxattr_in", "name"),
    FUSE_LISTXATTR: ("Listxattr", "fuse_getxattr_in", ""),
    FUSE_REMOVEXATTR: ("Removexattr", None, "name"),
    FUSE_FLUSH: ("Flush", "fuse_flush_in", ""),
    FUSE_INIT: ("Init", "fuse_init_in", ""),
    FUSE_OPENDIR: ("Opendir", "fuse_open_in", ""),
    FUSE_READDIR: ("Readdir", "fuse_read_in", ""),
    FUSE_RELEASEDIR: ("Releasedir", "fuse_release_in", ""),
    FUSE_FSYNCDIR: ("Fsyncdir", "fuse_fsync_in", ""),
    FUSE_GETLK: ("Getlk", "fuse_lk_in", ""),
    FUSE_SETLK: ("Setlk", "fuse_lk_in", ""),
    FUSE_SETLKW: ("Setlkw", "fuse_lk_in", ""),
    FUSE_ACCESS: ("Access", "fuse_access_in", ""),
    FUSE_CREATE: ("Create", "fuse_create_in", "name"),
    FUSE_INTERRUPT: ("Interrupt", "fuse_interrupt_in", ""),
    FUSE_BMAP: ("Bmap", "fuse_bmap_in", ""),
    FUSE_DESTROY: ("Destroy", None, ""),
    FUSE_IOCTL: ("Ioctl", "fuse_ioctl_in", "data:in_size"),
    FUSE_POLL: ("Poll", "fuse_poll_in", ""),
    FUSE_NOTIFY_REPLY: ("NotifyReply", "fuse_notify_retrieve_in", "data:size"),
    FUSE_BATCH_FORGET: ("BatchForget", "fuse_batch_forget_in", "forgets"),
    FUSE_FALLOCATE: ("Fallocate", "fuse_fallocate_in", ""),
    FUSE_READDIRPLUS: ("Readdirplus", "fuse_read_in", ""),
    FUSE_RENAME2: ("Rename2", "fuse_rename2_in", "names:newname"),
    FUSE_LSEEK: ("Lseek", "fuse_lseek_in", ""),
    FUSE_COPY_FILE_RANGE: ("CopyFileRange", "fuse_copy_file_range_in", ""),
    FUSE_SETUPMAPPING: ("Setupmapping", "fuse_setupmapping_in", ""),
    FUSE_REMOVEMAPPING: ("Removemapping", "fuse_removemapping_in", "mappings"),
    FUSE_SYNCFS: ("Syncfs", "fuse_syncfs_in", ""),
    FUSE_TMPFILE: ("Tmpfile", "fuse_create_in", "name"),
    FUSE_STATX: ("Statx", "fuse_statx_in", ""),
}

# "CopyFileRange" -> "FUSE_COPY_FILE_RANGE", as in enum fuse_opcode.
OPCODE_NAMES: dict[int, str] = {
    op: "FUSE_" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()
    for op, (name, _, _) in REQUESTS.items()
}

# The longest name we look for a NUL in (PATH_MAX, for symlink targets): bounds
# the copy made to search, whatever the frame size.
_NAME_MAX_SCAN = 4096 + 1

# The default of a memoryview field (tests and clients build messages by keyword).
_EMPTY = memoryview(b"")


@dataclass(slots=True)
class InHeader:
    """struct fuse_in_header (padding dropped).

    A separate object because op structs reuse its names (fuse_setattr_in.uid,
    fuse_interrupt_in.unique): `req.h.unique`, `req.h.nodeid`, `req.h.uid`...
    """

    len: int = 0
    opcode: int = 0
    unique: int = 0
    nodeid: int = 0
    uid: int = 0
    gid: int = 0
    pid: int = 0
    total_extlen: int = 0


class Request:
    """Base of every request message: `h` is its fuse_in_header, `opcode` its class's
    opcode, then the op's struct fields and trailing names/data by fuse.h name."""

    __slots__ = ()
    opcode: ClassVar[int] = 0
    h: InHeader


# One slotted dataclass per opcode, written out so that type checkers and IDEs
# see them. Fields are in wire order: `decode` builds a message positionally
# from (header, the fixed struct's values, the trailing part) as REQUESTS and
# LAYOUTS describe it, and `message_mismatches` (run at import) checks that
# every class agrees with them. Every field defaults to zero/empty.


@dataclass(slots=True)
class Lookup(Request):
    """FUSE_LOOKUP (1): the name."""

    opcode = FUSE_LOOKUP
    h: InHeader = field(default_factory=InHeader)
    name: bytes = b""


@dataclass(slots=True)
class Forget(Request):
    """FUSE_FORGET (2): fuse_forget_in."""

    opcode = FUSE_FORGET
    h: InHeader = field(default_factory=InHeader)
    nlookup: int = 0


@dataclass(slots=True)
class Getattr(Request):
    """FUSE_GETATTR (3): fuse_getattr_in."""

    opcode = FUSE_GETATTR
    h: InHeader = field(default_factory=InHeader)
    getattr_flags: int = 0
    fh: int = 0


@dataclass(slots=True)
class Setattr(Request):
    """FUSE_SETATTR (4): fuse_setattr_in."""

    opcode = FUSE_SETATTR
    h: InHeader = field(default_factory=InHeader)
    valid: int = 0
    fh: int = 0
    size: int = 0
    lock_owner: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    atimensec: int = 0
    mtimensec: int = 0
    ctimensec: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0


@dataclass(slots=True)
class Readlink(Request):
    """FUSE_READLINK (5)."""

    opcode = FUSE_READLINK
    h: InHeader = field(default_factory=InHeader)


@dataclass(slots=True)
class Symlink(Request):
    """FUSE_SYMLINK (6): the name and the target."""

    opcode = FUSE_SYMLINK
    h: InHeader = field(default_factory=InHeader)
    name: bytes = b""
    target: bytes = b""


@dataclass(slots=True)
class Mknod(Request):
    """FUSE_MKNOD (8): fuse_mknod_in, then the name."""

    opcode = FUSE_MKNOD
    h: InHeader = field(default_factory=InHeader)
    mode: int = 0
    rdev: int = 0
    umask: int = 0
    name: bytes = b""


@dataclass(slots=True)
class Mkdir(Request):
    """FUSE_MKDIR (9): fuse_mkdir_in, then the name."""

    opcode = FUSE_MKDIR
    h: InHeader = field(default_factory=InHeader)
    mode: int = 0
    umask: int = 0
    name: bytes = b""


@dataclass(slots=True)
class Unlink(Request):
    """FUSE_UNLINK (10): the name."""

    opcode = FUSE_UNLINK
    h: InHeader = field(default_factory=InHeader)
    name: bytes = b""


@dataclass(slots=True)
class Rmdir(Request):
    """FUSE_RMDIR (11): the name."""

    opcode = FUSE_RMDIR
    h: InHeader = field(default_factory=InHeader)
    name: bytes = b""


@dataclass(slots=True)
class Rename(Request):
    """FUSE_RENAME (12): fuse_rename_in, then the name and the newname."""

    opcode = FUSE_RENAME
    h: InHeader = field(default_factory=InHeader)
    newdir: int = 0
    name: bytes = b""
    newname: bytes = b""


@dataclass(slots=True)
class Link(Request):
    """FUSE_LINK (13): fuse_link_in, then the name."""

    opcode = FUSE_LINK
    h: InHeader = field(default_factory=InHeader)
    oldnodeid: int = 0
    name: bytes = b""


@dataclass(slots=True)
class Open(Request):
    """FUSE_OPEN (14): fuse_open_in."""

    opcode = FUSE_OPEN
    h: InHeader = field(default_factory=InHeader)
    flags: int = 0
    open_flags: int = 0


@dataclass(slots=True)
class Read(Request):
    """FUSE_READ (15): fuse_read_in."""

    opcode = FUSE_READ
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    offset: int = 0
    size: int = 0
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0


@dataclass(slots=True)
class Write(Request):
    """FUSE_WRITE (16): fuse_write_in, then size bytes of data."""

    opcode = FUSE_WRITE
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    offset: int = 0
    size: int = 0
    write_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    data: memoryview = _EMPTY


@dataclass(slots=True)
class Statfs(Request):
    """FUSE_STATFS (17)."""

    opcode = FUSE_STATFS
    h: InHeader = field(default_factory=InHeader)


@dataclass(slots=True)
class Release(Request):
    """FUSE_RELEASE (18): fuse_release_in."""

    opcode = FUSE_RELEASE
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    flags: int = 0
    release_flags: int = 0
    lock_owner: int = 0


@dataclass(slots=True)
class Fsync(Request):
    """FUSE_FSYNC (20): fuse_fsync_in."""

    opcode = FUSE_FSYNC
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    fsync_flags: int = 0


@dataclass(slots=True)
class Setxattr(Request):
    """FUSE_SETXATTR (21): fuse_setxattr_in, then the name and the value."""

    opcode = FUSE_SETXATTR
    h: InHeader = field(default_factory=InHeader)
    size: int = 0
    flags: int = 0
    setxattr_flags: int = 0
    name: bytes = b""
    value: memoryview = _EMPTY


@dataclass(slots=True)
class Getxattr(Request):
    """FUSE_GETXATTR (22): fuse_getxattr_in, then the name."""

    opcode = FUSE_GETXATTR
    h: InHeader = field(default_factory=InHeader)
    size: int = 0
    name: bytes = b""


@dataclass(slots=True)
class Listxattr(Request):
    """FUSE_LISTXATTR (23): fuse_getxattr_in."""

    opcode = FUSE_LISTXATTR
    h: InHeader = field(default_factory=InHeader)
    size: int = 0


@dataclass(slots=True)
class Removexattr(Request):
    """FUSE_REMOVEXATTR (24): the name."""

    opcode = FUSE_REMOVEXATTR
    h: InHeader = field(default_factory=InHeader)
    name: bytes = b""


@dataclass(slots=True)
class Flush(Request):
    """FUSE_FLUSH (25): fuse_flush_in."""

    opcode = FUSE_FLUSH
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    lock_owner: int = 0


@dataclass(slots=True)
class Init(Request):
    """FUSE_INIT (26): fuse_init_in."""

    opcode = FUSE_INIT
    h: InHeader = field(default_factory=InHeader)
    major: int = 0
    minor: int = 0
    max_readahead: int = 0
    flags: int = 0
    flags2: int = 0


@dataclass(slots=True)
class Opendir(Request):
    """FUSE_OPENDIR (27): fuse_open_in."""

    opcode = FUSE_OPENDIR
    h: InHeader = field(default_factory=InHeader)
    flags: int = 0
    open_flags: int = 0


@dataclass(slots=True)
class Readdir(Request):
    """FUSE_READDIR (28): fuse_read_in."""

    opcode = FUSE_READDIR
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    offset: int = 0
    size: int = 0
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0


@dataclass(slots=True)
class Releasedir(Request):
    """FUSE_RELEASEDIR (29): fuse_release_in."""

    opcode = FUSE_RELEASEDIR
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    flags: int = 0
    release_flags: int = 0
    lock_owner: int = 0


@dataclass(slots=True)
class Fsyncdir(Request):
    """FUSE_FSYNCDIR (30): fuse_fsync_in."""

    opcode = FUSE_FSYNCDIR
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    fsync_flags: int = 0


@dataclass(slots=True)
class Getlk(Request):
    """FUSE_GETLK (31): fuse_lk_in."""

    opcode = FUSE_GETLK
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    owner: int = 0
    lk_start: int = 0
    lk_end: int = 0
    lk_type: int = 0
    lk_pid: int = 0
    lk_flags: int = 0


@dataclass(slots=True)
class Setlk(Request):
    """FUSE_SETLK (32): fuse_lk_in."""

    opcode = FUSE_SETLK
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    owner: int = 0
    lk_start: int = 0
    lk_end: int = 0
    lk_type: int = 0
    lk_pid: int = 0
    lk_flags: int = 0


@dataclass(slots=True)
class Setlkw(Request):
    """FUSE_SETLKW (33): fuse_lk_in."""

    opcode = FUSE_SETLKW
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    owner: int = 0
    lk_start: int = 0
    lk_end: int = 0
    lk_type: int = 0
    lk_pid: int = 0
    lk_flags: int = 0


@dataclass(slots=True)
class Access(Request):
    """FUSE_ACCESS (34): fuse_access_in."""

    opcode = FUSE_ACCESS
    h: InHeader = field(default_factory=InHeader)
    mask: int = 0


@dataclass(slots=True)
class Create(Request):
    """FUSE_CREATE (35): fuse_create_in, then the name."""

    opcode = FUSE_CREATE
    h: InHeader = field(default_factory=InHeader)
    flags: int = 0
    mode: int = 0
    umask: int = 0
    open_flags: int = 0
    name: bytes = b""


@dataclass(slots=True)
class Interrupt(Request):
    """FUSE_INTERRUPT (36): fuse_interrupt_in."""

    opcode = FUSE_INTERRUPT
    h: InHeader = field(default_factory=InHeader)
    unique: int = 0


@dataclass(slots=True)
class Bmap(Request):
    """FUSE_BMAP (37): fuse_bmap_in."""

    opcode = FUSE_BMAP
    h: InHeader = field(default_factory=InHeader)
    block: int = 0
    blocksize: int = 0


@dataclass(slots=True)
class Destroy(Request):
    """FUSE_DESTROY (38)."""

    opcode = FUSE_DESTROY
    h: InHeader = field(default_factory=InHeader)


@dataclass(slots=True)
class Ioctl(Request):
    """FUSE_IOCTL (39): fuse_ioctl_in, then in_size bytes of data."""

    opcode = FUSE_IOCTL
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    flags: int = 0
    cmd: int = 0
    arg: int = 0
    in_size: int = 0
    out_size: int = 0
    data: memoryview = _EMPTY


@dataclass(slots=True)
class Poll(Request):
    """FUSE_POLL (40): fuse_poll_in."""

    opcode = FUSE_POLL
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    kh: int = 0
    flags: int = 0
    events: int = 0


@dataclass(slots=True)
class NotifyReply(Request):
    """FUSE_NOTIFY_REPLY (41): fuse_notify_retrieve_in, then size bytes of data."""

    opcode = FUSE_NOTIFY_REPLY
    h: InHeader = field(default_factory=InHeader)
    offset: int = 0
    size: int = 0
    data: memoryview = _EMPTY


@dataclass(slots=True)
class BatchForget(Request):
    """FUSE_BATCH_FORGET (42): fuse_batch_forget_in, then (nodeid, nlookup) pairs."""

    opcode = FUSE_BATCH_FORGET
    h: InHeader = field(default_factory=InHeader)
    count: int = 0
    forgets: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class Fallocate(Request):
    """FUSE_FALLOCATE (43): fuse_fallocate_in."""

    opcode = FUSE_FALLOCATE
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    offset: int = 0
    length: int = 0
    mode: int = 0


@dataclass(slots=True)
class Readdirplus(Request):
    """FUSE_READDIRPLUS (44): fuse_read_in."""

    opcode = FUSE_READDIRPLUS
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    offset: int = 0
    size: int = 0
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0


@dataclass(slots=True)
class Rename2(Request):
    """FUSE_RENAME2 (45): fuse_rename2_in, then the name and the newname."""

    opcode = FUSE_RENAME2
    h: InHeader = field(default_factory=InHeader)
    newdir: int = 0
    flags: int = 0
    name: bytes = b""
    newname: bytes = b""


@dataclass(slots=True)
class Lseek(Request):
    """FUSE_LSEEK (46): fuse_lseek_in."""

    opcode = FUSE_LSEEK
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    offset: int = 0
    whence: int = 0


@dataclass(slots=True)
class CopyFileRange(Request):
    """FUSE_COPY_FILE_RANGE (47): fuse_copy_file_range_in."""

    opcode = FUSE_COPY_FILE_RANGE
    h: InHeader = field(default_factory=InHeader)
    fh_in: int = 0
    off_in: int = 0
    nodeid_out: int = 0
    fh_out: int = 0
    off_out: int = 0
    len: int = 0
    flags: int = 0


@dataclass(slots=True)
class Setupmapping(Request):
    """FUSE_SETUPMAPPING (48): fuse_setupmapping_in."""

    opcode = FUSE_SETUPMAPPING
    h: InHeader = field(default_factory=InHeader)
    fh: int = 0
    foffset: int = 0
    len: int = 0
    flags: int = 0
    moffset: int = 0


@dataclass(slots=True)
class Removemapping(Request):
    """FUSE_REMOVEMAPPING (49): fuse_removemapping_in, then (moffset, len) ranges."""

    opcode = FUSE_REMOVEMAPPING
    h: InHeader = field(default_factory=InHeader)
    count: int = 0
    mappings: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class Syncfs(Request):
    """FUSE_SYNCFS (50): fuse_syncfs_in."""

    opcode = FUSE_SYNCFS
    h: InHeader = field(default_factory=InHeader)


@dataclass(slots=True)
class Tmpfile(Request):
    """FUSE_TMPFILE (51): fuse_create_in, then the name."""

    opcode = FUSE_TMPFILE
    h: InHeader = field(default_factory=InHeader)
    flags: int = 0
    mode: int = 0
    umask: int = 0
    open_flags: int = 0
    name: bytes = b""


@dataclass(slots=True)
class Statx(Request):
    """FUSE_STATX (52): fuse_statx_in."""

    opcode = FUSE_STATX
    h: InHeader = field(default_factory=InHeader)
    getattr_flags: int = 0
    fh: int = 0
    sx_flags: int = 0
    sx_mask: int = 0


MESSAGES: dict[int, type[Request]] = {
    cls.opcode: cls
    for cls in (
        Lookup, Forget, Getattr, Setattr, Readlink, Symlink, Mknod, Mkdir, Unlink, Rmdir,
        Rename, Link, Open, Read, Write, Statfs, Release, Fsync, Setxattr, Getxattr, Listxattr,
        Removexattr, Flush, Init, Opendir, Readdir, Releasedir, Fsyncdir, Getlk, Setlk, Setlkw,
        Access, Create, Interrupt, Bmap, Destroy, Ioctl, Poll, NotifyReply, BatchForget,
        Fallocate, Readdirplus, Rename2, Lseek, CopyFileRange, Setupmapping, Removemapping,
        Syncfs, Tmpfile, Statx,
    )
}  # fmt: skip


def _tail_fields(tail: str) -> list[tuple[str, str]]:
    """(name, annotation) of the fields a trailing part decodes into."""
    if tail == "name":
        return [("name", "bytes")]
    if tail.startswith("names:"):
        return [("name", "bytes"), (tail.split(":")[1], "bytes")]
    if tail == "xattr":
        return [("name", "bytes"), ("value", "memoryview")]
    if tail.startswith("data:"):
        return [("data", "memoryview")]
    if tail in ("forgets", "mappings"):
        return [(tail, "list[tuple[int, int]]")]
    return []


def message_mismatches() -> list[str]:
    """Where the written-out message classes disagree with REQUESTS and LAYOUTS
    (empty when they agree): each opcode needs its class, named as in REQUESTS,
    with the fields decode fills, in wire order and of the right type."""
    bad = []
    if set(MESSAGES) != set(REQUESTS):
        bad.append(f"opcodes without a class: {sorted(set(REQUESTS) ^ set(MESSAGES))}")
    for op, (name, layout, tail) in REQUESTS.items():
        cls = MESSAGES.get(op)
        if cls is None:
            continue
        want = [("h", "InHeader")]
        want += [(f, "int") for f in LAYOUT[layout].fields] if layout else []
        want += _tail_fields(tail)
        got: list[tuple[str, str]] = []
        if is_dataclass(cls):
            got = [(f.name, str(f.type)) for f in _fields(cls)]
        if cls.__name__ != name or got != want:
            bad.append(f"{OPCODE_NAMES[op]}: {cls.__name__} {got}, want {name} {want}")
    want_h = [(f, "int") for f in LAYOUT["fuse_in_header"].fields]
    if [(f.name, str(f.type)) for f in _fields(InHeader)] != want_h:
        bad.append("InHeader does not match fuse_in_header")
    return bad


if message_mismatches():
    raise ImportError("FUSE message classes disagree with the layouts: "
                      + "; ".join(message_mismatches()))  # fmt: skip


class _Decoder:
    """The precompiled decode step for one opcode."""

    __slots__ = ("opcode", "cls", "unpack", "size", "min_size", "tail", "count_at", "zeros")

    def __init__(
        self, opcode: int, cls: type[Request], layout: str | None, tail: str, zeros: int = 0
    ):
        self.opcode = opcode
        # Called positionally with the header, the struct's values and the tail
        # (message_mismatches checks the classes' field order).
        self.cls: Callable[..., Request] = cls
        # A compat struct with fewer fields than the message: the rest are 0.
        self.zeros: tuple[int, ...] = (0,) * zeros
        lay = LAYOUT[layout] if layout else None
        self.unpack: Callable[..., tuple[Any, ...]] | None = (
            lay.struct.unpack_from if lay else None
        )
        self.size = lay.size if lay else 0
        # INIT from kernels < 7.36 carries only the first four words.
        self.min_size = 16 if opcode == FUSE_INIT else self.size
        self.tail = tail
        # Index of the value giving the trailing length (size / in_size / count).
        self.count_at = -1
        if lay is not None:
            key = {"xattr": "size", "forgets": "count", "mappings": "count"}.get(tail)
            if tail.startswith("data:"):
                key = tail.split(":")[1]
            if key is not None:
                self.count_at = lay.fields.index(key)


_DECODERS = {op: _Decoder(op, MESSAGES[op], lay, tail) for op, (_, lay, tail) in REQUESTS.items()}
_SETXATTR_COMPAT = _Decoder(
    FUSE_SETXATTR, MESSAGES[FUSE_SETXATTR], "fuse_setxattr_in_compat", "xattr", zeros=1
)
_FORGET_ONE = LAYOUT["fuse_forget_one"].struct
_MAPPING_ONE = LAYOUT["fuse_removemapping_one"].struct


def _cstring(mv: memoryview, start: int, end: int, unique: int, opcode: int) -> tuple[bytes, int]:
    """The NUL-terminated name at mv[start:end] and the offset just past its NUL."""
    window = bytes(mv[start : min(end, start + _NAME_MAX_SCAN)])
    nul = window.find(b"\0")
    if nul < 0:
        raise ProtocolError(_errno.EINVAL, "name without its NUL", unique, opcode)
    return window[:nul], start + nul + 1


def decode(frame: bytes | bytearray | memoryview, *, setxattr_ext: bool = False) -> Request:
    """One request frame (exactly fuse_in_header.len bytes) -> its message.

    `setxattr_ext`: FUSE_SETXATTR_EXT was negotiated (16-byte fuse_setxattr_in).
    WRITE / NOTIFY_REPLY / IOCTL payloads and SETXATTR values are memoryviews
    into `frame`: the caller must not reuse the buffer until the request is done.
    Raises ProtocolError and nothing else.
    """
    try:
        mv = frame if isinstance(frame, memoryview) else memoryview(frame)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(_errno.EIO, f"not a byte buffer: {exc}") from None
    n = len(mv)
    if n < IN_HEADER_SIZE:
        # unique sits at bytes 8..16: readable even in a short header.
        unique = int.from_bytes(mv[8:16], "little") if n >= 16 else None
        opcode = int.from_bytes(mv[4:8], "little") if n >= 8 else None
        err = _errno.EINVAL if unique is not None else _errno.EIO
        raise ProtocolError(err, f"short header ({n} bytes)", unique, opcode)
    hv = _IN_HEADER.unpack_from(mv)
    length, opcode, unique, extlen = hv[0], hv[1], hv[2], hv[7]
    if length != n:
        raise ProtocolError(_errno.EINVAL, f"len {length} != frame size {n}", unique, opcode)
    dec = _DECODERS.get(opcode)
    if dec is None:
        raise ProtocolError(_errno.ENOSYS, f"unknown opcode {opcode}", unique, opcode)
    if opcode == FUSE_SETXATTR and not setxattr_ext:
        dec = _SETXATTR_COMPAT
    # Extensions (security context, supplementary groups) trail the op's
    # arguments; we negotiate none of them, so they are skipped.
    end = n - extlen * 8
    pos = IN_HEADER_SIZE
    if end < pos:
        raise ProtocolError(_errno.EINVAL, "extensions longer than the frame", unique, opcode)
    h = InHeader(*hv)
    values: tuple[Any, ...] = ()
    if dec.unpack is not None:
        have = end - pos
        if have < dec.min_size:
            raise ProtocolError(_errno.EINVAL, f"body {have} < {dec.size} bytes", unique, opcode)
        if have < dec.size:  # a shorter compat struct: zero-fill the newer fields
            values = dec.unpack(bytes(mv[pos:end]) + bytes(dec.size - have))
        else:
            values = dec.unpack(mv, pos)
        pos += min(dec.size, have)
        if dec.zeros:
            values += dec.zeros
    tail = dec.tail
    if not tail:
        return dec.cls(h, *values)
    if tail == "name":
        name, _ = _cstring(mv, pos, end, unique, opcode)
        return dec.cls(h, *values, name)
    if tail[0] == "n":  # names:<second>
        name, pos = _cstring(mv, pos, end, unique, opcode)
        second, _ = _cstring(mv, pos, end, unique, opcode)
        return dec.cls(h, *values, name, second)
    count = values[dec.count_at]
    if tail == "xattr":
        name, pos = _cstring(mv, pos, end, unique, opcode)
        if end - pos < count:
            raise ProtocolError(_errno.EINVAL, "xattr value past the end", unique, opcode)
        return dec.cls(h, *values, name, mv[pos : pos + count])
    if tail[0] == "d":  # data:<field>
        if end - pos < count:
            raise ProtocolError(_errno.EINVAL, "payload past the end", unique, opcode)
        return dec.cls(h, *values, mv[pos : pos + count])
    one = _FORGET_ONE if tail == "forgets" else _MAPPING_ONE
    if (end - pos) // one.size < count:
        raise ProtocolError(_errno.EINVAL, f"{tail} count past the end", unique, opcode)
    items = [one.unpack_from(mv, pos + i * one.size) for i in range(count)]
    return dec.cls(h, *values, items)


# The trailing part's field names, by kind (as REQUESTS gives them).
_TAIL_NAMES: dict[str, tuple[str, ...]] = {
    tail: tuple(f for f, _ in _tail_fields(tail)) for _, _, tail in REQUESTS.values()
}


def _encode_tail(tail: str, values: list[Any]) -> list[bytes]:
    """An xattr's name and value, a payload, or the forget / mapping records."""
    if tail == "xattr":
        return [values[0] + b"\0", bytes(values[1])]
    if tail.startswith("data:"):
        return [bytes(values[0])]
    one = _FORGET_ONE if tail == "forgets" else _MAPPING_ONE
    return [one.pack(*item) for item in values[0]]


def encode_request(msg: Request, *, setxattr_ext: bool = False, extlen: int = 0) -> bytes:
    """The frame the kernel would send for `msg` (inverse of `decode`).

    For tests, fuzzing and any in-process client. `extlen` appends that many
    8-byte units of (zero) extension.
    """
    _, layout, tail = REQUESTS[msg.opcode]
    if msg.opcode == FUSE_SETXATTR and not setxattr_ext:
        layout = "fuse_setxattr_in_compat"
    parts: list[bytes] = []
    if layout is not None:
        lay = LAYOUT[layout]
        parts.append(lay.struct.pack(*(getattr(msg, f) for f in lay.fields)))
        if isinstance(msg, Init) and msg.minor < 36:
            parts[-1] = parts[-1][:16]
    if not tail:
        pass
    elif tail == "name":
        parts.append(getattr(msg, _TAIL_NAMES[tail][0]) + b"\0")
    elif tail.startswith("names:"):
        parts += [getattr(msg, f) + b"\0" for f in _TAIL_NAMES[tail]]
    else:
        values = [getattr(msg, f) for f in _TAIL_NAMES[tail]]
        parts += _encode_tail(tail, values)
    parts.append(bytes(8 * extlen))
    body = b"".join(parts)
    h = msg.h
    header = _IN_HEADER.pack(
        IN_HEADER_SIZE + len(body), msg.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid, extlen,
    )  # fmt: skip
    return header + body


# -- replies ----------------------------------------------------------------------
#
# A reply is a list of buffers for writev: the fuse_out_header packed together
# with the fixed-size part, then bulk data as given.

Buffer: TypeAlias = bytes | bytearray | memoryview
Iov: TypeAlias = list[Buffer]  # the buffers of one reply or notification, for writev


def _out_struct(*layouts: str) -> struct.Struct:
    """fuse_out_header followed by these structs, as one precompiled Struct."""
    return struct.Struct("<" + "".join(LAYOUT[n].fmt for n in ("fuse_out_header", *layouts)))


_R_ENTRY = _out_struct("fuse_entry_out")
_R_ATTR = _out_struct("fuse_attr_out")
_R_OPEN = _out_struct("fuse_open_out")
_R_CREATE = _out_struct("fuse_entry_out", "fuse_open_out")
_R_WRITE = _out_struct("fuse_write_out")
_R_STATFS = _out_struct("fuse_statfs_out")
_R_XATTR = _out_struct("fuse_getxattr_out")
_R_LSEEK = _out_struct("fuse_lseek_out")
_R_INIT = _out_struct("fuse_init_out")
_DIRENT = LAYOUT["fuse_dirent"].struct
_ENTRY_DIRENT = struct.Struct("<" + LAYOUT["fuse_entry_out"].fmt + LAYOUT["fuse_dirent"].fmt)

# The sizes core.abi states by hand must be the layouts' own (checked at import,
# so a layout change cannot leave the op layer filling replies to a stale size).
if (LAYOUT["fuse_in_header"].size, LAYOUT["fuse_out_header"].size, _DIRENT.size,
        LAYOUT["fuse_entry_out"].size) != (_abi.IN_HEADER_SIZE, _abi.OUT_HEADER_SIZE,
                                           _abi.FUSE_NAME_OFFSET, _abi.FUSE_ENTRY_OUT_SIZE):
    raise ImportError("actorfs.runtime.core.abi disagrees with the FUSE layouts")

_attr_values = attrgetter(*LAYOUT["fuse_attr"].fields)
_statfs_values = attrgetter(*(f.removeprefix("st_") for f in LAYOUT["fuse_statfs_out"].fields))
_INIT_OUT_FIELDS = LAYOUT["fuse_init_out"].fields

_NSEC = 1_000_000_000
_U64 = (1 << 64) - 1


_TIMEOUTS: dict[float, tuple[int, int]] = {}  # the few distinct timeouts a config uses


def split_timeout(seconds: float) -> tuple[int, int]:
    """A timeout in seconds -> (sec, nsec) for entry_valid/attr_valid."""
    got = _TIMEOUTS.get(seconds)
    if got is not None:
        return got
    if not seconds > 0:  # also catches NaN
        got = (0, 0)
    elif seconds >= _U64:
        got = (_U64, 0)
    else:
        sec = int(seconds)
        got = (sec, min(int((seconds - sec) * _NSEC), _NSEC - 1))
    if len(_TIMEOUTS) < 64:
        _TIMEOUTS[seconds] = got
    return got


_NO_ATTR_VALUES: tuple[int, ...] = (0,) * len(LAYOUT["fuse_attr"].fields)  # a zeroed fuse_attr


def _entry_values(e: Entry) -> tuple[int, ...]:
    ev, evn = split_timeout(e.entry_valid)
    av, avn = split_timeout(e.attr_valid)
    return (e.nodeid, e.generation, ev, av, evn, avn) + _attr_values(e.attr)


def reply_error(unique: int, err: int) -> Iov:
    """fuse_out_header with -err. The kernel refuses errors outside 1..511: EIO then."""
    if not 0 < err < 512:
        err = _errno.EIO
    return [_OUT_HEADER.pack(OUT_HEADER_SIZE, -err, unique)]


def reply_empty(unique: int) -> Iov:
    return [_OUT_HEADER.pack(OUT_HEADER_SIZE, 0, unique)]


def reply_data(unique: int, data: bytes | bytearray | memoryview) -> Iov:
    """READ, READLINK, GETXATTR/LISTXATTR values: data passed through uncopied."""
    n = len(data) if not isinstance(data, memoryview) else data.nbytes
    if not n:
        return [_OUT_HEADER.pack(OUT_HEADER_SIZE, 0, unique)]
    return [_OUT_HEADER.pack(OUT_HEADER_SIZE + n, 0, unique), data]


def reply_entry(unique: int, entry: Entry | NegativeEntry) -> Iov:
    if isinstance(entry, NegativeEntry):
        # nodeid 0: the kernel keeps a negative dentry for entry_valid.
        ev, evn = split_timeout(entry.entry_valid)
        return [_R_ENTRY.pack(_R_ENTRY.size, 0, unique, 0, 0, ev, 0, evn, 0, *_NO_ATTR_VALUES)]
    return [_R_ENTRY.pack(_R_ENTRY.size, 0, unique, *_entry_values(entry))]


def reply_attr(unique: int, attr: Attr, attr_valid: float) -> Iov:
    sec, nsec = split_timeout(attr_valid)
    return [_R_ATTR.pack(_R_ATTR.size, 0, unique, sec, nsec, *_attr_values(attr))]


def reply_open(unique: int, opened: Opened) -> Iov:
    return [_R_OPEN.pack(_R_OPEN.size, 0, unique, opened.fh, opened.open_flags, opened.backing_id)]


def reply_create(unique: int, entry: Entry, opened: Opened) -> Iov:
    return [
        _R_CREATE.pack(
            _R_CREATE.size, 0, unique, *_entry_values(entry),
            opened.fh, opened.open_flags, opened.backing_id,
        )
    ]  # fmt: skip


def reply_write(unique: int, size: int) -> Iov:
    return [_R_WRITE.pack(_R_WRITE.size, 0, unique, size)]


def reply_statfs(unique: int, st: StatFs) -> Iov:
    return [_R_STATFS.pack(_R_STATFS.size, 0, unique, *_statfs_values(st))]


def reply_xattr_size(unique: int, size: int) -> Iov:
    """GETXATTR/LISTXATTR with size 0: the length the value would need."""
    return [_R_XATTR.pack(_R_XATTR.size, 0, unique, size)]


def reply_lseek(unique: int, offset: int) -> Iov:
    return [_R_LSEEK.pack(_R_LSEEK.size, 0, unique, offset)]


def reply_init(unique: int, **fields: int) -> Iov:
    """fuse_init_out from keyword fields named as in fuse.h; missing ones are 0."""
    unknown = set(fields) - set(_INIT_OUT_FIELDS)
    if unknown:
        raise TypeError(f"not fuse_init_out fields: {sorted(unknown)}")
    values = [fields.get(f, 0) for f in _INIT_OUT_FIELDS]
    return [_R_INIT.pack(_R_INIT.size, 0, unique, *values)]


def encode_dirents(entries: Iterable[DirEntry]) -> bytearray:
    """fuse_dirent records, each padded to 8 bytes."""
    entries = list(entries)
    buf = bytearray(sum(dirent_size(len(e.name)) for e in entries))
    pos = 0
    pack_into = _DIRENT.pack_into
    for e in entries:
        name = e.name
        pack_into(buf, pos, e.ino, e.off, len(name), e.type)
        start = pos + _DIRENT.size
        buf[start : start + len(name)] = name
        pos += dirent_size(len(name))
    return buf


def encode_direntplus(entries: Iterable[DirEntryPlus]) -> bytearray:
    """fuse_direntplus records (fuse_entry_out + fuse_dirent + name), 8-byte aligned."""
    entries = list(entries)
    buf = bytearray(sum(direntplus_size(len(p.dirent.name)) for p in entries))
    pos = 0
    pack_into = _ENTRY_DIRENT.pack_into
    for p in entries:
        d = p.dirent
        name = d.name
        pack_into(buf, pos, *_entry_values(p.entry), d.ino, d.off, len(name), d.type)
        start = pos + _ENTRY_DIRENT.size
        buf[start : start + len(name)] = name
        pos += direntplus_size(len(name))
    return buf


def reply_readdir(unique: int, entries: Iterable[DirEntry]) -> Iov:
    return reply_data(unique, encode_dirents(entries))


def reply_readdirplus(unique: int, entries: Iterable[DirEntryPlus]) -> Iov:
    return reply_data(unique, encode_direntplus(entries))


# -- notifications (server -> kernel, unique 0, error = notify code) -----------------

_N_INVAL_INODE = _out_struct("fuse_notify_inval_inode_out")
_N_INVAL_ENTRY = _out_struct("fuse_notify_inval_entry_out")
_N_DELETE = _out_struct("fuse_notify_delete_out")
_N_STORE = _out_struct("fuse_notify_store_out")
_N_RETRIEVE = _out_struct("fuse_notify_retrieve_out")


def notify_inval_inode(nodeid: int, off: int = 0, length: int = 0) -> Iov:
    """Drop cached data of `nodeid` in [off, off+length) (length 0: to the end; off < 0: attrs only)."""
    return [
        _N_INVAL_INODE.pack(_N_INVAL_INODE.size, FUSE_NOTIFY_INVAL_INODE, 0, nodeid, off, length)
    ]


def notify_inval_entry(parent: int, name: bytes, flags: int = 0) -> Iov:
    size = _N_INVAL_ENTRY.size + len(name) + 1
    head = _N_INVAL_ENTRY.pack(size, FUSE_NOTIFY_INVAL_ENTRY, 0, parent, len(name), flags)
    return [head, bytes(name) + b"\0"]


def notify_delete(parent: int, child: int, name: bytes) -> Iov:
    size = _N_DELETE.size + len(name) + 1
    head = _N_DELETE.pack(size, FUSE_NOTIFY_DELETE, 0, parent, child, len(name))
    return [head, bytes(name) + b"\0"]


def notify_store(nodeid: int, offset: int, data: bytes | memoryview) -> Iov:
    n = len(data) if not isinstance(data, memoryview) else data.nbytes
    head = _N_STORE.pack(_N_STORE.size + n, FUSE_NOTIFY_STORE, 0, nodeid, offset, n)
    return [head, data]


def notify_retrieve(notify_unique: int, nodeid: int, offset: int, size: int) -> Iov:
    return [
        _N_RETRIEVE.pack(
            _N_RETRIEVE.size, FUSE_NOTIFY_RETRIEVE, 0, notify_unique, nodeid, offset, size
        )
    ]


# -- passthrough ioctl argument -------------------------------------------------------

_BACKING_MAP = LAYOUT["fuse_backing_map"].struct


def backing_map(fd: int, flags: int = 0) -> bytes:
    """struct fuse_backing_map for FUSE_DEV_IOC_BACKING_OPEN."""
    return _BACKING_MAP.pack(fd, flags)


def iov_bytes(iov: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """Join a reply's buffers (for tests and transports that cannot writev)."""
    return b"".join(bytes(b) for b in iov)


def parse_out_header(buf: Buffer) -> tuple[int, int, int]:
    """(len, error, unique) of a reply or notification."""
    return _OUT_HEADER.unpack_from(buf)
