"""Process limits: RLIMIT_NOFILE, and glibc's buffer thresholds.

`raise_nofile_limit()` lifts RLIMIT_NOFILE's soft limit to the hard limit at
start (the usual soft limit, 1024, is far below what a busy client needs).
Inodes no longer hold an fd each: the inode table keeps O_PATH fds in a
bounded cache that shares one budget with open handles (actors/inode_table.py,
FdBudget, which re-reads the limit as it goes). `fd_caps()` is the static
split of that budget (with the same reserve for transient dups, two per
request in flight, the transport and the pool); `apply_fd_caps()` caps
open handles by it, so a client that opens everything gets EMFILE from the
cap while the server itself can still open what it needs to answer.
"""

from __future__ import annotations

import ctypes
import resource
from typing import Protocol

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_buffers(mmap_threshold: int = 4 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Let glibc serve 1 MiB READ/WRITE buffers from its heap and keep them.

    By default an allocation of 1 MiB is a fresh mmap (256 page faults to fill)
    and is unmapped when freed, so a stream of 1 MiB READs page-faults all the
    time: the first cold read after a write ran at a fifth of later ones. With
    these thresholds freed buffers stay in the heap (up to trim_threshold
    bytes beyond what is in use) for the next request. Process-wide, so the
    CLI calls it, not the library. False where mallopt is not available.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def raise_nofile_limit() -> tuple[int, int]:
    """Set the soft RLIMIT_NOFILE to the hard limit; returns (old soft, new soft).

    RLIM_INFINITY as a hard limit is not a number the kernel accepts for a
    soft limit on fds (nr_open is the real ceiling): we then keep the soft
    limit as it is.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_caps(
    nofile: int | None = None, max_in_flight: int = 256, fds_per_inode: int = 1
) -> tuple[int, int]:
    """(max_inodes, max_handles) that fit in `nofile` fds with a reserve kept free.

    The reserve covers two dups per request in flight plus a fixed 64 for the
    transport, the pool and the interpreter; it never takes more than half the
    limit. The rest is split 3:1 between inodes and handles; `fds_per_inode`
    is 2 when the watcher keeps its own dup of each watched inode's fd.
    """
    n = nofile_limit() if nofile is None else nofile
    reserve = min(2 * max_in_flight + 64, n // 2)
    budget = max(n - reserve, 2)
    inodes = max(budget * 3 // 4 // max(fds_per_inode, 1), 1)
    return inodes, max(budget - inodes * max(fds_per_inode, 1), 1)


class _HandleCapped(Protocol):
    """What apply_fd_caps needs of a configuration (FsConfig has it)."""

    max_handles: int


def apply_fd_caps(config: _HandleCapped, max_in_flight: int = 256) -> None:
    """Lower config.max_handles to the fd budget RLIMIT_NOFILE allows now (never
    raise it). Inodes are not capped by fds any more: evicted ones are reopened."""
    inodes, handles = fd_caps(None, max_in_flight, 1)
    config.max_handles = min(config.max_handles, inodes + handles - 8)
