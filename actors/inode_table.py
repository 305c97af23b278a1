"""The inode table actor: nodeid <-> host object, lookup counts, FORGET, rename,
and the bounded cache of O_PATH fds through which every op reaches an object.

Identity is (st_dev, st_ino): a second hard link looked up under another name
gets the same nodeid. nodeids start at FUSE_ROOT_ID + 1 and are never reused
while the server runs. The root (nodeid 1) is never freed. Every Entry handed
to the client adds one lookup; FORGET subtracts; at zero the inode is dropped.

The fd cache (docs/ARCHITECTURE.md, "Huge trees"). An inode holds an O_PATH
fd only while it is in a bounded LRU cache; the root and inodes with open
file or directory handles (pinned) always keep theirs. The cache's size is
`--fd-cache N`, else derived from RLIMIT_NOFILE (re-read on every decision, so
a limit lowered on the running server with prlimit is obeyed) with headroom
for open files and directories: both draw on one `FdBudget`. When the budget
is full, a new handle first evicts an unused O_PATH fd; only when every fd is
a handle does the client get EMFILE.

When an fd is evicted the inode keeps what it takes to find the very same
object again: its file handle (name_to_handle_at, with the mount id) where the
filesystem has handles, its birth time (statx) where it reports one, and its
(parent nodeid, name) bindings, kept true across the client's renames. The
next use reopens it:
- by handle (open_by_handle_at), when the server may (CAP_DAC_READ_SEARCH,
  i.e. root) and the filesystem has handles: the object itself, wherever the
  host moved it, as the held fd would have followed it;
- else by name: from the nearest ancestor that still holds an fd (the root at
  worst) one component at a time with openat2 RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS, each step verified as below and cached.
Every reopened fd is checked against the inode's (st_dev, st_ino), kind,
handle or birth time: a mismatch (the host replaced the object under the same
name, or deleted it) gives ESTALE, never another object. A lookup that meets
an evicted inode's (st_dev, st_ino) is checked the same way; a different
object (the number was reused) gets a new nodeid and the old one goes stale.

Reopens run in the actor, on the event loop, as the dup of a held fd did:
a handful of syscalls on in-memory inodes. On a cold disk root a name walk can
wait for the disk (docs/ARCHITECTURE.md weighs this).

The (parent, name) -> nodeid map and the per-inode host path are kept true
across unlink, rmdir and rename; the map also serves reopening by name; the
path serves snapshots and messages, never access.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

from actorfs.runtime.core.abi import FUSE_ROOT_ID
from actorfs.runtime.core.actor import Actor
from actorfs.runtime.core.errno_map import FsError
from actorfs.runtime.host import syscalls
from actorfs.runtime.host.fds import OwnedFd

KIND_FILE, KIND_DIR, KIND_SYMLINK, KIND_OTHER = 0, 1, 2, 3

_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_RESOLVE_ONE = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


def kind_of_mode(mode: int) -> int:
    if stat.S_ISREG(mode):
        return KIND_FILE
    if stat.S_ISDIR(mode):
        return KIND_DIR
    if stat.S_ISLNK(mode):
        return KIND_SYMLINK
    return KIND_OTHER


# (handle | None, mount id, birth time | None): what identifies an object once its fd is gone
Ident = tuple[bytes | None, int, tuple[int, int] | None]
SnapshotInode = tuple[int, int, bytes]  # (nodeid, kind, host path)
SnapshotChild = tuple[int, bytes, int]  # (parent, name, child)
SnapshotPlan = tuple[int, list[SnapshotInode], list[SnapshotChild]]  # (next nodeid, inodes, children)
RestoredInode = tuple[int, int, bytes, int, os.stat_result]  # (nodeid, kind, path, fd, stat)


class FdCacheStats(TypedDict):
    """InodeTable.stats(): the fd cache's figures (JSON-ready: the stats socket)."""

    inodes_known: int
    fds_held: int
    fds_cached: int
    fds_pinned: int
    cache_cap: int
    hits: int
    misses: int
    evictions: int
    reopened_by_handle: int
    reopened_by_path: int
    stale: int
    file_handles: bool


class InodeCounts(FdCacheStats):
    """InodeTable.counts(): the table's sizes and the fd cache's figures."""

    inodes: int
    names: int
    next_nodeid: int
    lookups: int
    refused: int


@dataclass(slots=True)
class Inode:
    nodeid: int
    fd: int  # O_PATH fd owned by the table; -1 while evicted from the fd cache
    key: tuple[int, int]  # (st_dev, st_ino)
    kind: int
    path: bytes  # best-effort host path, for snapshots and messages only
    nlookup: int = 0
    # (parent nodeid, name) pairs under which the client knows this inode.
    names: set[tuple[int, bytes]] = field(default_factory=set)
    pins: int = 0  # open file/dir handles on it: its fd is never evicted
    # (handle | None, mount id, birth time | None): taken at the first eviction,
    # while the held fd still pins the object.
    ident: Ident | None = None
    stale: bool = False  # its (st_dev, st_ino) now names another object


class FdBudget:
    """One fd budget for the inode table's O_PATH fds and the handle table's fds.

    total() is RLIMIT_NOFILE's soft limit (read each time: cheap, and a limit
    lowered on the running server is obeyed) less a reserve for transient dups
    (two per request in flight), the transport, the pool and the interpreter.
    The fd cache gets `fd_cache` fds (else 3/4 of the total), never more than
    what open handles leave; handles may take all but a few.
    """

    MIN_CACHE = 8  # O_PATH fds kept for lookups even when handles fill the budget

    def __init__(self, fd_cache: int | None = None, max_in_flight: int = 256):
        self.fd_cache = fd_cache
        self.max_in_flight = max_in_flight
        self.handles = 0  # open handle fds (kept by the handle table)
        self._fixed: Callable[[], int] = _zero  # the inode table: fds it never evicts (root, pinned, mounts)
        self._cached: Callable[[], int] = _zero  # the inode table: evictable fds it holds
        self._evict: Callable[[int], int] = _evict_none  # the inode table: evict n cached fds, return how many

    def total(self) -> int:
        n = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if n == resource.RLIM_INFINITY:
            n = 1 << 20
        return max(n - min(2 * self.max_in_flight + 64, n // 2), 2 * self.MIN_CACHE)

    def cache_cap(self) -> int:
        total = self.total()
        want = self.fd_cache if self.fd_cache else total * 3 // 4
        return max(1, min(want, total - self.handles - self._fixed()))

    def room_for_handle(self) -> bool:
        """Whether one more handle fits; evicts an unused O_PATH fd to make room."""
        total = self.total()
        if self.handles + self._fixed() + self._cached() < total:
            return True
        return self._evict(1) > 0  # else every fd is a handle, the root or pinned

    def attach(
        self,
        fixed: Callable[[], int],
        cached: Callable[[], int],
        evict: Callable[[int], int],
    ) -> None:
        self._fixed, self._cached, self._evict = fixed, cached, evict


def _zero() -> int:
    return 0


def _evict_none(n: int) -> int:
    return 0


class SnapshotError(ValueError):
    """A snapshot blob that cannot be restored; the message says why."""


class SnapshotTruncated(SnapshotError):
    pass


SNAPSHOT_MAGIC = b"PFSS"
SNAPSHOT_VERSION = 1
_KIND_NAMES = {KIND_FILE: "file", KIND_DIR: "dir", KIND_SYMLINK: "symlink", KIND_OTHER: "other"}


class InodeTable(Actor):
    name = "inode_table"

    def __init__(
        self, root: str, max_inodes: int = 1 << 20, budget: FdBudget | None = None,
        file_handles: bool | None = None, follow: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.root = os.fsencode(root)
        self.max_inodes = max_inodes
        self.budget = budget if budget is not None else FdBudget()
        self.follow = follow  # --symlinks follow: a name may lead through its final symlink
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self._inodes: dict[int, Inode] = {}
        self._by_key: dict[tuple[int, int], int] = {}
        self._kids: dict[int, dict[bytes, int]] = {}
        self._next_nodeid = FUSE_ROOT_ID + 1
        self.refused = 0  # lookups refused because the inode cap was reached
        root_inode = Inode(FUSE_ROOT_ID, fd, (st.st_dev, st.st_ino), KIND_DIR, self.root, 1)
        self._inodes[FUSE_ROOT_ID] = root_inode
        self._by_key[root_inode.key] = FUSE_ROOT_ID
        self.root_fd = fd
        # The fd cache: nodeids holding an evictable fd, least recently used first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._pinned_fds = 0  # inodes with open handles that hold their fd
        self._mount_fds: dict[int, int] = {}  # mount id -> a plain (not O_PATH) fd on it
        self.hits = self.misses = self.evictions = 0
        self.reopened_by_handle = self.reopened_by_path = self.stale = 0
        self.handles_usable = False
        self._root_mnt = -1
        if file_handles is not False:
            self.handles_usable = self._probe_handles(fd)
        self.budget.attach(self._fixed_fds, self._lru.__len__, self._evict_some)

    def _probe_handles(self, root_fd: int) -> bool:
        """Whether open_by_handle_at works here (root, a filesystem with handles).
        The plain fd it needs on each mount is opened at the first eviction."""
        try:
            handle, mnt = syscalls.name_to_handle(root_fd)
            mfd = os.open(syscalls.proc_self_fd(root_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            os.close(syscalls.open_by_handle(mfd, handle, _O_PATH_NOFOLLOW))
        except OSError:
            return False
        finally:
            os.close(mfd)
        self._root_mnt = mnt
        return True

    # ------------------------------------------------------------------
    # async API used by op handlers
    async def dup_fd(self, nodeid: int, pin: bool = False) -> tuple[int, int]:
        """(dup of the inode's O_PATH fd, kind). The caller owns (and closes) the dup.

        pin=True: an open file or directory handle is being made on it; its fd
        stays until unpin() (RELEASE, or the open failing).
        """
        return await self.ask(self._dup_fd, nodeid, pin, orphan=_close_first)

    async def dup_two(self, a: int, b: int) -> tuple[int, int]:
        """Dups of two inodes' O_PATH fds in one round trip (rename, link)."""
        return await self.ask(self._dup_two, a, b, orphan=_close_pair)

    async def unpin(self, nodeid: int) -> None:
        """A handle made with dup_fd(pin=True) is gone (or was never made)."""
        await self.ask(self._unpin, nodeid)

    async def make_room(self) -> int:
        """Out of fds (EMFILE): evict unused cached fds; how many were closed."""
        return await self.ask(self._make_room)

    async def info(self, nodeid: int) -> tuple[int, bytes, tuple[int, bytes] | None]:
        """(kind, host path, one (parent, name) or None) — no fd."""
        return await self.ask(self._info, nodeid)

    async def register(
        self, parent: int, name: bytes, fd: int, st: os.stat_result, pin: bool = False
    ) -> int:
        """Adopt `fd` (an O_PATH fd on parent/name) and count one lookup; returns nodeid.
        pin=True: a handle is opened on it at once (CREATE)."""
        return await self.ask(self._register, parent, name, fd, st, pin)

    async def register_many(
        self, parent: int, items: list[tuple[bytes, int, os.stat_result]]
    ) -> list[int]:
        """register() for a batch of (name, fd, stat) from one directory (READDIRPLUS)."""
        return await self.ask(self._register_many, parent, items)

    async def forget(self, nodeid: int, nlookup: int) -> bool:
        """Subtract lookups; True if the inode was dropped (fd closed)."""
        return await self.ask(self._forget, nodeid, nlookup)

    async def batch_forget(self, items: list[tuple[int, int]]) -> list[int]:
        """FORGET for many; returns the nodeids that were dropped."""
        return await self.ask(self._batch_forget, items)

    async def reset(self) -> list[int]:
        """A new session (after DESTROY): forget every inode but the root."""
        return await self.ask(self._reset)

    async def unlinked(self, parent: int, name: bytes) -> int | None:
        """The name was removed on the host: drop the map entry; returns the nodeid it had."""
        return await self.ask(self._unlinked, parent, name)

    async def renamed(
        self, parent: int, name: bytes, newparent: int, newname: bytes, exchange: bool = False
    ) -> None:
        await self.ask(self._renamed, parent, name, newparent, newname, exchange)

    async def child(self, parent: int, name: bytes) -> int | None:
        return await self.ask(self._child, parent, name)

    async def children(self, parent: int) -> list[tuple[bytes, int]]:
        """The (name, nodeid) pairs the client knows in directory `parent`."""
        return await self.ask(lambda: list(self._kids.get(parent, {}).items()))

    async def counts(self) -> InodeCounts:
        return await self.ask(self._counts)

    async def snapshot(self) -> bytes:
        return await self.ask(self._snapshot)

    async def restore_plan(self, blob: bytes) -> SnapshotPlan:
        """Parse and validate a blob (errors raise SnapshotError); no state change."""
        return self._parse_snapshot(blob)

    async def install_restored(
        self, next_nodeid: int, inodes: list[RestoredInode], children: list[SnapshotChild]
    ) -> int:
        """Install reopened inodes; returns how many were dropped as duplicates."""
        return await self.ask(self._install_restored, next_nodeid, inodes, children)

    # ------------------------------------------------------------------
    # handlers (run in the actor's task; never block)
    def _get(self, nodeid: int) -> Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:
            raise FsError(errno.ENOENT, f"unknown nodeid {nodeid}")
        return ino

    def _dup_fd(self, nodeid: int, pin: bool = False) -> tuple[int, int]:
        ino = self._get(nodeid)
        fd = self._dup(ino)
        if pin:
            self._pin(ino)
        return fd, ino.kind

    def _dup_two(self, a: int, b: int) -> tuple[int, int]:
        ia, ib = self._get(a), self._get(b)
        with OwnedFd(self._dup(ia)) as fa:
            fb = self._dup(ib)
            return fa.release(), fb

    def _dup(self, ino: Inode) -> int:
        """A dup of the inode's fd (reopened if evicted), owned by the caller."""
        fd = self._fd_of(ino)
        try:
            return os.dup(fd)
        except OSError as e:
            if e.errno not in _OUT_OF_FDS or not self._make_room({ino.nodeid}):
                raise
        return os.dup(ino.fd)

    def _info(self, nodeid: int) -> tuple[int, bytes, tuple[int, bytes] | None]:
        ino = self._get(nodeid)
        name = next(iter(ino.names), None)
        return ino.kind, ino.path, name

    def _path_under(self, parent: int, name: bytes) -> bytes:
        p = self._inodes.get(parent)
        base = p.path if p is not None else b"?"
        return base.rstrip(b"/") + b"/" + name

    def _register(self, parent: int, name: bytes, fd: int, st: os.stat_result, pin: bool = False) -> int:
        key = (st.st_dev, st.st_ino)
        nodeid = self._by_key.get(key)
        ino = self._inodes[nodeid] if nodeid is not None else None
        if ino is not None and ino.fd < 0 and not self._adopt(ino, fd, st):
            # The evicted inode's (st_dev, st_ino) now names another object:
            # that one was deleted. Its nodeid goes stale; this one is new.
            ino.stale = True
            self.stale += 1
            del self._by_key[key]
            ino = None
        if ino is not None:
            if ino.fd != fd:
                os.close(fd)  # we already hold an fd on this object
            else:
                self._touch(ino)
        else:
            if len(self._inodes) >= self.max_inodes:
                os.close(fd)
                self.refused += 1
                raise FsError(errno.EMFILE, "inode table is full")
            nodeid = self._next_nodeid
            self._next_nodeid += 1
            ino = Inode(nodeid, fd, key, kind_of_mode(st.st_mode), b"")
            self._inodes[nodeid] = ino
            self._by_key[key] = nodeid
            self._lru[nodeid] = None
        ino.nlookup += 1
        if pin:
            self._pin(ino)
        if parent in self._inodes and ino.nodeid != FUSE_ROOT_ID:
            self._bind(parent, name, ino.nodeid)
        self._trim(ino)
        return ino.nodeid

    def _register_many(
        self, parent: int, items: list[tuple[bytes, int, os.stat_result]]
    ) -> list[int]:
        out = []
        for name, fd, st in items:
            try:
                out.append(self._register(parent, name, fd, st))
            except FsError:
                out.append(0)
        return out

    def _bind(self, parent: int, name: bytes, nodeid: int) -> None:
        kids = self._kids.setdefault(parent, {})
        old = kids.get(name)
        if old is not None and old != nodeid:
            self._unbind(parent, name)
        kids[name] = nodeid
        ino = self._inodes[nodeid]
        ino.names.add((parent, name))
        ino.path = self._path_under(parent, name)

    def _unbind(self, parent: int, name: bytes) -> int | None:
        kids = self._kids.get(parent)
        if not kids:
            return None
        nodeid = kids.pop(name, None)
        if not kids:
            del self._kids[parent]
        if nodeid is not None:
            ino = self._inodes.get(nodeid)
            if ino is not None:
                ino.names.discard((parent, name))
        return nodeid

    def _forget(self, nodeid: int, nlookup: int) -> bool:
        ino = self._inodes.get(nodeid)
        if ino is None or nodeid == FUSE_ROOT_ID:
            return False  # forgetting the root or an unknown nodeid is a no-op
        ino.nlookup -= nlookup
        if ino.nlookup <= 0:
            self._drop(ino)
            return True
        return False

    def _batch_forget(self, items: list[tuple[int, int]]) -> list[int]:
        return [nodeid for nodeid, n in items if self._forget(nodeid, n)]

    def _drop(self, ino: Inode) -> None:
        for parent, name in list(ino.names):
            self._unbind(parent, name)
        # Children of a forgotten directory lose their name binding (they keep
        # their own lookup counts and stay reachable by nodeid).
        for name, child in self._kids.pop(ino.nodeid, {}).items():
            c = self._inodes.get(child)
            if c is not None:
                c.names.discard((ino.nodeid, name))
        del self._inodes[ino.nodeid]
        if self._by_key.get(ino.key) == ino.nodeid:
            del self._by_key[ino.key]
        self._release_fd(ino)

    def _reset(self) -> list[int]:
        dropped = [n for n in self._inodes if n != FUSE_ROOT_ID]
        for nodeid in dropped:
            ino = self._inodes.get(nodeid)
            if ino is not None:
                self._drop(ino)
        self._kids.clear()
        return dropped

    def _unlinked(self, parent: int, name: bytes) -> int | None:
        return self._unbind(parent, name)

    def _renamed(
        self, parent: int, name: bytes, newparent: int, newname: bytes, exchange: bool
    ) -> None:
        src = self._unbind(parent, name)
        dst = self._unbind(newparent, newname)
        if src is not None and src in self._inodes:
            self._bind(newparent, newname, src)
            self._repath(src)
        if exchange and dst is not None and dst in self._inodes:
            self._bind(parent, name, dst)
            self._repath(dst)

    def _repath(self, nodeid: int) -> None:
        """Recompute best-effort paths of a renamed directory's known descendants."""
        stack = [nodeid]
        seen = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for name, child in self._kids.get(n, {}).items():
                c = self._inodes.get(child)
                if c is not None:
                    c.path = self._path_under(n, name)
                    stack.append(child)

    def _child(self, parent: int, name: bytes) -> int | None:
        return self._kids.get(parent, {}).get(name)

    def _counts(self) -> InodeCounts:
        return {
            "inodes": len(self._inodes),
            "names": sum(len(k) for k in self._kids.values()),
            "next_nodeid": self._next_nodeid,
            "lookups": sum(i.nlookup for i in self._inodes.values()),
            "refused": self.refused,
            **self.stats(),
        }

    def stats(self) -> FdCacheStats:
        """The fd cache's figures (plain attribute reads: safe from any task)."""
        return {
            "inodes_known": len(self._inodes),
            "fds_held": self._fixed_fds() + len(self._lru),
            "fds_cached": len(self._lru),
            "fds_pinned": self._pinned_fds,
            "cache_cap": self.budget.cache_cap(),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "reopened_by_handle": self.reopened_by_handle,
            "reopened_by_path": self.reopened_by_path,
            "stale": self.stale,
            "file_handles": self.handles_usable,
        }

    def close(self) -> None:
        for ino in list(self._inodes.values()):
            if ino.fd >= 0:
                try:
                    os.close(ino.fd)
                except OSError:
                    pass
        for mfd in self._mount_fds.values():
            try:
                os.close(mfd)
            except OSError:
                pass
        self._mount_fds.clear()
        self._inodes.clear()
        self._by_key.clear()
        self._kids.clear()
        self._lru.clear()
        self._pinned_fds = 0

    # ------------------------------------------------------------------
    # the fd cache
    def _fixed_fds(self) -> int:
        """fds never evicted: the root, pinned inodes' fds, the mount fds."""
        return 1 + self._pinned_fds + len(self._mount_fds)

    def _touch(self, ino: Inode) -> None:
        if ino.nodeid in self._lru:
            self._lru.move_to_end(ino.nodeid)

    def _fd_of(self, ino: Inode) -> int:
        """The inode's O_PATH fd, reopened (and verified) if it was evicted."""
        if ino.fd >= 0:
            self.hits += 1
            if ino.nodeid in self._lru:
                self._lru.move_to_end(ino.nodeid)
            return ino.fd
        self.misses += 1
        if ino.stale:
            raise FsError(errno.ESTALE, f"nodeid {ino.nodeid}: the object is gone")
        fd = self._reopen_by_handle(ino)
        if fd < 0:
            self._reopen_by_name(ino)
        else:
            self._hold(ino, fd)
        self._trim(ino)
        return ino.fd

    def _hold(self, ino: Inode, fd: int) -> None:
        ino.fd = fd
        if ino.pins:
            self._pinned_fds += 1
        elif ino.nodeid != FUSE_ROOT_ID:
            self._lru[ino.nodeid] = None

    def _release_fd(self, ino: Inode) -> None:
        if ino.fd < 0:
            return
        if ino.nodeid in self._lru:
            del self._lru[ino.nodeid]
        elif ino.pins:
            self._pinned_fds -= 1
        os.close(ino.fd)
        ino.fd = -1

    def _pin(self, ino: Inode) -> None:
        if ino.nodeid == FUSE_ROOT_ID:
            return
        if not ino.pins and ino.fd >= 0:
            self._lru.pop(ino.nodeid, None)
            self._pinned_fds += 1
        ino.pins += 1

    def _unpin(self, nodeid: int) -> None:
        ino = self._inodes.get(nodeid)
        if ino is None or ino.pins <= 0:
            return
        ino.pins -= 1
        if not ino.pins and ino.fd >= 0:
            self._pinned_fds -= 1
            self._lru[nodeid] = None
            self._trim(ino)

    def _trim(self, keep: Inode | None = None) -> None:
        """Evict least recently used fds beyond the cache's size (never `keep`'s)."""
        lru = self._lru
        if len(lru) <= 1:
            return
        cap = self.budget.cache_cap()
        while len(lru) > cap:
            nodeid = next(iter(lru))
            if keep is not None and nodeid == keep.nodeid:
                lru.move_to_end(nodeid)
                if len(lru) == 1:
                    return
                continue
            self._evict(self._inodes[nodeid])

    def _make_room(self, keep: set[int] | frozenset[int] = frozenset()) -> int:
        """Out of fds: evict a quarter of the cache (at least 16), never `keep`."""
        return self._evict_some(max(16, len(self._lru) // 4), keep)

    def _evict_some(self, n: int, keep: set[int] | frozenset[int] = frozenset()) -> int:
        victims: list[int] = []
        for nodeid in self._lru:
            if len(victims) >= n:
                break
            if nodeid not in keep:
                victims.append(nodeid)
        for nodeid in victims:
            self._evict(self._inodes[nodeid])
        return len(victims)

    def _evict(self, ino: Inode) -> None:
        del self._lru[ino.nodeid]
        fd, ino.fd = ino.fd, -1
        self.evictions += 1
        if ino.ident is None:
            ino.ident = self._identify(fd, ino.kind)
        handle, mnt, _ = ino.ident
        if handle is not None and self.handles_usable and mnt not in self._mount_fds:
            # A plain fd on the mount (the root, or the first directory seen on
            # another mount) lets its handles be opened: an O_PATH fd is refused.
            src = self.root_fd if mnt == self._root_mnt else fd if ino.kind == KIND_DIR else -1
            if src >= 0:
                try:
                    self._mount_fds[mnt] = os.open(
                        syscalls.proc_self_fd(src), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                    )
                except OSError:
                    pass
        os.close(fd)

    @staticmethod
    def _identify(fd: int, kind: int) -> Ident:
        """(handle | None, mount id, birth time | None) of the object behind fd."""
        handle: bytes | None
        try:
            handle, mnt = syscalls.name_to_handle(fd)
        except OSError:
            handle, mnt = None, -1
        return handle, mnt, syscalls.birth_time(fd)

    def _same(self, ino: Inode, fd: int, st: os.stat_result | None = None, by_handle: bool = False) -> bool:
        """Whether fd is ino's very object: (st_dev, st_ino), kind, handle, birth time.
        by_handle: fd came from the inode's own handle, which names one object
        (generation included): the handle and birth time need no second look."""
        if st is None:
            st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ino.key or kind_of_mode(st.st_mode) != ino.kind:
            return False
        if ino.ident is None or by_handle:
            return True  # never evicted: the held fd pinned the number to this object
        handle, _mnt, btime = ino.ident
        now = self._identify(fd, ino.kind)
        if handle is not None:
            return now[0] == handle
        return btime is None or now[2] == btime

    def _adopt(self, ino: Inode, fd: int, st: os.stat_result) -> bool:
        """A lookup found an evicted inode's (st_dev, st_ino): take its fd if it is
        the same object (a free reopen); False if the number was reused."""
        try:
            same = self._same(ino, fd, st)
        except OSError:
            same = False
        if same:
            self._hold(ino, fd)
        return same

    def _reopen_by_handle(self, ino: Inode) -> int:
        """A verified O_PATH fd from the inode's handle; -1 to try by name instead."""
        if not self.handles_usable or ino.ident is None:
            return -1
        handle, mnt, _ = ino.ident
        if handle is None:
            return -1
        mfd = self._mount_fds.get(mnt)
        if mfd is None:
            return -1
        try:
            fd = syscalls.open_by_handle(mfd, handle, _O_PATH_NOFOLLOW)
        except OSError as e:
            if e.errno in _OUT_OF_FDS and self._make_room():
                return self._reopen_by_handle(ino)
            if e.errno in (errno.ESTALE, errno.ENOENT):
                self._gone(ino)  # the handle no longer resolves: deleted on the host
            return -1
        self._verified(ino, fd, gone=True)
        self.reopened_by_handle += 1
        return fd

    def _verified(self, ino: Inode, fd: int, gone: bool) -> None:
        """ESTALE (fd closed) unless fd is ino's object. gone=True (fd came from
        the inode's handle): a mismatch means the object is dead; else only
        this name moved on, and a later lookup that finds the object takes it
        up again."""
        try:
            same = self._same(ino, fd, by_handle=gone)
        except OSError:
            same = False
        if not same:
            os.close(fd)
            if gone:
                self._gone(ino)
            raise FsError(errno.ESTALE, f"nodeid {ino.nodeid}: the name leads to another object")

    def _gone(self, ino: Inode) -> None:
        ino.stale = True
        self.stale += 1
        if self._by_key.get(ino.key) == ino.nodeid:
            del self._by_key[ino.key]
        raise FsError(errno.ESTALE, f"nodeid {ino.nodeid}: the object is gone or was replaced")

    def _reopen_by_name(self, ino: Inode) -> None:
        """Walk down from the nearest ancestor holding an fd, verifying and caching
        each inode on the way; ESTALE when a name no longer leads to its object."""
        chain: list[tuple[Inode, bytes]] = []
        seen: set[int] = set()
        cur = ino
        while cur.fd < 0:
            seen.add(cur.nodeid)
            up = None
            for parent, name in cur.names:
                p = self._inodes.get(parent)
                if p is not None and parent not in seen and not p.stale:
                    up = (p, name)
                    if p.fd >= 0:
                        break
            if up is None:
                raise FsError(errno.ESTALE, f"nodeid {ino.nodeid}: no known name leads to it")
            chain.append((cur, up[1]))
            cur = up[0]
        if cur.nodeid in self._lru:
            self._lru.move_to_end(cur.nodeid)
        pfd = cur.fd
        for node, name in reversed(chain):
            fd = self._open_one(pfd, name, node)
            self._verified(node, fd, gone=False)
            self._hold(node, fd)
            self.reopened_by_path += 1
            pfd = fd

    def _open_one(self, pfd: int, name: bytes, node: Inode) -> int:
        """One name beneath pfd, never through a symlink (EMFILE is raised as
        it is: the dispatcher makes room and retries; evicting here could close
        the fds of the walk itself)."""
        try:
            with OwnedFd(syscalls.openat2(pfd, name, _O_PATH_NOFOLLOW, _RESOLVE_ONE)) as fd:
                if self.follow and node.kind != KIND_SYMLINK and stat.S_ISLNK(os.fstat(fd.fd).st_mode):
                    # --symlinks follow served the link's target under this name
                    # (the link's fd closed first: one fd fewer under fd pressure).
                    fd.close()
                    fd.replace(os.open(name, os.O_PATH | os.O_CLOEXEC, dir_fd=pfd))
                return fd.release()
        except OSError as e:
            if e.errno in _OUT_OF_FDS:
                raise
            raise FsError(errno.ESTALE, f"nodeid {node.nodeid}: {name!r} is gone") from None

    # ------------------------------------------------------------------
    # snapshot / restore in the reference's "PFSS" v1 format:
    #   "PFSS" u32 version, u64 next_nodeid, u64 n, n x (u64 nodeid, u8 kind,
    #   u32 len, path), u64 m, m x (u64 parent, u32 len, name, u64 child);
    #   little endian, inodes and children in ascending key order.
    def _snapshot(self) -> bytes:
        out = bytearray(SNAPSHOT_MAGIC)
        out += struct.pack("<IQQ", SNAPSHOT_VERSION, self._next_nodeid, len(self._inodes))
        for nodeid in sorted(self._inodes):
            ino = self._inodes[nodeid]
            out += struct.pack("<QBI", nodeid, ino.kind, len(ino.path)) + ino.path
        children = sorted((p, n, c) for p, kids in self._kids.items() for n, c in kids.items())
        out += struct.pack("<Q", len(children))
        for parent, name, child in children:
            out += struct.pack("<QI", parent, len(name)) + name + struct.pack("<Q", child)
        return bytes(out)

    def _parse_snapshot(self, blob: bytes) -> SnapshotPlan:
        view = memoryview(blob)
        pos = 0

        def take(n: int) -> memoryview:
            nonlocal pos
            if pos + n > len(view):
                raise SnapshotTruncated(
                    f"snapshot truncated: needs {pos + n} bytes, blob has {len(view)}"
                )
            s = view[pos : pos + n]
            pos += n
            return s

        def u(fmt: str) -> int:
            value: int = struct.unpack(fmt, take(struct.calcsize(fmt)))[0]
            return value

        if bytes(take(4)) != SNAPSHOT_MAGIC:
            raise SnapshotError("snapshot bad magic (expected b'PFSS')")
        version = u("<I")
        if version != SNAPSHOT_VERSION:
            raise SnapshotError(f"snapshot version {version} unsupported (this server reads 1)")
        next_nodeid = u("<Q")
        n = u("<Q")
        inodes = []
        root_seen = False
        for _ in range(n):
            nodeid = u("<Q")
            kind = u("<B")
            if kind not in _KIND_NAMES:
                raise SnapshotError(f"snapshot bad kind {kind} for nodeid {nodeid}")
            path = bytes(take(u("<I")))
            if nodeid == FUSE_ROOT_ID:
                if path != self.root:
                    raise SnapshotError(
                        f"snapshot root mismatch: snapshot={os.fsdecode(path)} "
                        f"mount={os.fsdecode(self.root)}"
                    )
                root_seen = True
            inodes.append((nodeid, kind, path))
        if not root_seen:
            raise SnapshotError("snapshot missing root entry (nodeid 1)")
        m = u("<Q")
        children = []
        for _ in range(m):
            parent = u("<Q")
            name = bytes(take(u("<I")))
            child = u("<Q")
            children.append((parent, name, child))
        if pos != len(view):
            raise SnapshotError(f"snapshot has {len(view) - pos} trailing bytes")
        return next_nodeid, inodes, children

    def _install_restored(
        self, next_nodeid: int, inodes: list[RestoredInode], children: list[SnapshotChild]
    ) -> int:
        """inodes: [(nodeid, kind, path, fd, stat)] already reopened beneath the root.

        Several nodeids can reach one object now: a held file was unlinked and
        its name reused, so the stale nodeid's path names the new object. The
        nodeid a name binds keeps it (bound ones go first), the others are
        dropped; returns how many.
        """
        bound = {child for _parent, _name, child in children}
        duplicates = 0
        for nodeid, _kind, path, fd, st in sorted(inodes, key=lambda i: i[0] not in bound):
            if nodeid == FUSE_ROOT_ID:
                continue
            key = (st.st_dev, st.st_ino)
            old = self._inodes.pop(nodeid, None)
            if old is not None:
                self._by_key.pop(old.key, None)
                self._release_fd(old)
            if key in self._by_key:  # two nodeids for one object: keep the first
                os.close(fd)
                duplicates += 1
                continue
            # A restored inode is one the client already knows: one lookup.
            self._inodes[nodeid] = Inode(nodeid, fd, key, kind_of_mode(st.st_mode), path, 1)
            self._by_key[key] = nodeid
            self._lru[nodeid] = None
        for parent, name, child in children:
            if parent in self._inodes and child in self._inodes:
                kids = self._kids.setdefault(parent, {})
                kids[name] = child
                self._inodes[child].names.add((parent, name))
        self._next_nodeid = max(self._next_nodeid, next_nodeid)
        self._trim()
        return duplicates


def _close_first(result: tuple[int, int]) -> None:
    os.close(result[0])


def _close_pair(result: tuple[int, int]) -> None:
    os.close(result[0])
    os.close(result[1])
