"""The FUSE kernel ABI that more than one layer needs, written once.

<linux/fuse.h> values and sizes used by the op layer, the actors and the two
transports: the root nodeid, the setattr and open bits, the readdir record
sizes (the op layer fills a reply buffer exactly, the encoder writes it), the
largest transfer, and a peek at fuse_in_header that the /dev/fuse reader and
the virtqueue runner both use before a frame is decoded. The full wire layouts
live in actorfs.runtime.fuse.protocol, which imports these rather than
redefining them. Nothing here does I/O.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

FUSE_ROOT_ID = 1
NO_FH = (1 << 64) - 1  # fh of a request that comes with no open handle (DAX's iomap path)

# The largest READ or WRITE: INIT's max_write and max_pages say this much, so a
# kernel never asks for more, and a READ reply buffer is never bigger.
MAX_TRANSFER = 1 << 20

# fuse_setattr_in.valid bits (FATTR_*).
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags bits (FOPEN_PASSTHROUGH is 7.40).
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# HANDLE_KILLPRIV_V2: fuse_write_in.write_flags and fuse_open_in.open_flags.
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_OPEN_KILL_SUIDGID = 1 << 0

# fuse_setupmapping_in.flags (DAX).
FUSE_SETUPMAPPING_FLAG_WRITE = 1 << 0
FUSE_SETUPMAPPING_FLAG_READ = 1 << 1

# Readdir record sizes: a READDIR(PLUS) reply must fit the kernel's buffer, and
# an entry that does not fit must not count as a lookup.
FUSE_NAME_OFFSET = 24  # sizeof(struct fuse_dirent) without the name
FUSE_ENTRY_OUT_SIZE = 128  # sizeof(struct fuse_entry_out)


def dirent_size(namelen: int) -> int:
    """One fuse_dirent record with a name of `namelen` bytes, padded to 8."""
    return (FUSE_NAME_OFFSET + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    """One fuse_direntplus record (fuse_entry_out + fuse_dirent), padded to 8."""
    return (FUSE_ENTRY_OUT_SIZE + FUSE_NAME_OFFSET + namelen + 7) & ~7


# fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen + padding.
IN_HEADER_SIZE = 40
OUT_HEADER_SIZE = 16
_PEEK = struct.Struct("<IIQ")  # len, opcode, unique: the first 16 bytes


class HeaderPeek(NamedTuple):
    """The first fields of a fuse_in_header, read before the frame is decoded."""

    length: int
    opcode: int
    unique: int


def peek_header(frame: bytes | bytearray | memoryview) -> HeaderPeek | None:
    """len, opcode and unique of a frame; None when it is too short to hold them.

    A transport needs these before decoding: to answer a short frame by its
    unique, to trim a frame to its declared length, and to tell the requests
    that never get a reply (FORGET) from the rest.
    """
    if len(frame) < _PEEK.size:
        return None
    return HeaderPeek(*_PEEK.unpack_from(frame, 0))
