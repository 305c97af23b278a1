"""What kind of filesystem holds the root, and whether its syscalls can block.

docs/DESIGN.md keeps every syscall that can block (anything that touches a disk)
off the event loop. On a memory-backed root (tmpfs, ramfs) no syscall of an op
ever waits for a device: the page cache *is* the storage. There the thread
hop of the blocking pool (20-40 us on a 2-core machine, more than the syscall
itself) buys nothing, and ops run their syscalls inline on the loop. This
module decides that once per filesystem (`inline_syscalls`).

On a local disk filesystem (ext4, xfs, btrfs, f2fs) only fstat(2) of an fd
we hold runs inline (`inline_fstat`): it reads the in-memory inode. Network
and FUSE filesystems may go out for attributes, so they keep the pool.

Inline stays off, whatever the root, when a syscall of an op could wait for
this very server: with `--symlinks follow` (a lookup walks a link's target
anywhere on the host; runtime/ops/follow.py refuses our own mount, but other
network or FUSE mounts on the way may still wait), and when our mountpoint lies
beneath the root (a lookup of its name would stat our own mount root).
"""

from __future__ import annotations

import ctypes
import os
from typing import Literal, get_args

InlineMode = Literal["auto", "always", "never"]
INLINE_MODES: tuple[InlineMode, ...] = get_args(InlineMode)

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
# Filesystems whose data lives in memory only.
MEMORY_BACKED = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}

# Local disk filesystems: their getattr reads the in-memory inode (which an fd
# we hold keeps in memory) and never waits for the disk.
LOCAL_DISK = {0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0xF2F52010: "f2fs"}

# Stacking filesystems: a backing file on them sits one level deeper, and
# FUSE passthrough needs max_stack_depth above it.
STACKING = {0x794C7630: 1, 0xF15F: 1}  # overlayfs, ecryptfs


def fs_type(path: str) -> int | None:
    """statfs(2) f_type of the filesystem holding `path` (None if unknown)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
        if libc.statfs(os.fsencode(path), buf) != 0:
            return None
        f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little", signed=True)
    except (OSError, AttributeError):
        return None
    return f_type & 0xFFFFFFFF


def memory_backed(path: str) -> bool:
    return fs_type(path) in MEMORY_BACKED


def fstat_never_blocks(path: str) -> bool:
    """Whether fstat(2) of an fd beneath `path` is served from memory alone."""
    t = fs_type(path)
    return t in MEMORY_BACKED or t in LOCAL_DISK


def stack_depth(path: str) -> int:
    """s_stack_depth of the filesystem holding `path` (0, or 1 on overlayfs)."""
    t = fs_type(path)
    return 0 if t is None else STACKING.get(t, 0)


def beneath(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies beneath it (both canonical)."""
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def inline_syscalls(mode: str, root: str, symlinks: str) -> bool:
    """Run op syscalls on the loop? `mode`: auto (memory-backed root), always, never."""
    if mode not in INLINE_MODES:
        raise ValueError(f"unknown inline mode {mode!r}: use one of {', '.join(INLINE_MODES)}")
    if mode == "never" or symlinks == "follow":
        return False
    return mode == "always" or memory_backed(root)
