"""The inode table actor: nodeid <-> host object, lookup counts, FORGET, rename.

Each live inode holds an O_PATH fd on its host object; that fd, not a path, is
how every op reaches the object (with *at() syscalls and one validated name).
Identity is (st_dev, st_ino): a second hard link looked up under another name
gets the same nodeid. Holding the O_PATH fd pins the host inode, so its
(st_dev, st_ino) cannot be reused by another object while the nodeid lives.

nodeids start at FUSE_ROOT_ID + 1 and are never reused while the server runs.
The root (nodeid 1) is never freed. Every Entry handed to the client adds one
lookup; FORGET subtracts; at zero the inode is dropped and its fd closed.

The (parent, name) -> nodeid map and the per-inode host path are kept true
across unlink, rmdir and rename; they serve snapshots and messages, never
access.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass, field

from runtime.actor import Actor
from runtime.attrs import FUSE_ROOT_ID
from runtime.errno_map import FsError

KIND_FILE, KIND_DIR, KIND_SYMLINK, KIND_OTHER = 0, 1, 2, 3


def kind_of_mode(mode: int) -> int:
    if stat.S_ISREG(mode):
        return KIND_FILE
    if stat.S_ISDIR(mode):
        return KIND_DIR
    if stat.S_ISLNK(mode):
        return KIND_SYMLINK
    return KIND_OTHER


@dataclass(slots=True)
class Inode:
    nodeid: int
    fd: int  # O_PATH fd owned by the table
    key: tuple[int, int]  # (st_dev, st_ino)
    kind: int
    path: bytes  # best-effort host path, for snapshots and messages only
    nlookup: int = 0
    # (parent nodeid, name) pairs under which the client knows this inode.
    names: set[tuple[int, bytes]] = field(default_factory=set)


class SnapshotError(ValueError):
    """A snapshot blob that cannot be restored; the message says why."""


class SnapshotTruncated(SnapshotError):
    pass


SNAPSHOT_MAGIC = b"PFSS"
SNAPSHOT_VERSION = 1
_KIND_NAMES = {KIND_FILE: "file", KIND_DIR: "dir", KIND_SYMLINK: "symlink", KIND_OTHER: "other"}


class InodeTable(Actor):
    name = "inode_table"

    def __init__(self, root: str, max_inodes: int = 1 << 20):
        super().__init__()
        self.root = os.fsencode(root)
        self.max_inodes = max_inodes
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

    # ------------------------------------------------------------------
    # async API used by op handlers
    async def dup_fd(self, nodeid: int) -> tuple[int, int]:
        """(dup of the inode's O_PATH fd, kind). The caller owns (and closes) the dup."""
        return await self.ask(self._dup_fd, nodeid, orphan=_close_first)

    async def dup_two(self, a: int, b: int) -> tuple[int, int]:
        """Dups of two inodes' O_PATH fds in one round trip (rename, link)."""
        return await self.ask(self._dup_two, a, b, orphan=_close_pair)

    async def info(self, nodeid: int) -> tuple[int, bytes, tuple[int, bytes] | None]:
        """(kind, host path, one (parent, name) or None) — no fd."""
        return await self.ask(self._info, nodeid)

    async def register(self, parent: int, name: bytes, fd: int, st: os.stat_result) -> int:
        """Adopt `fd` (an O_PATH fd on parent/name) and count one lookup; returns nodeid."""
        return await self.ask(self._register, parent, name, fd, st)

    async def register_many(self, parent: int, items: list) -> list[int]:
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

    async def counts(self) -> dict:
        return await self.ask(self._counts)

    async def snapshot(self) -> bytes:
        return await self.ask(self._snapshot)

    async def restore_plan(self, blob: bytes) -> tuple[int, list, list]:
        """Parse and validate a blob (errors raise SnapshotError); no state change."""
        return self._parse_snapshot(blob)

    async def install_restored(self, next_nodeid: int, inodes: list, children: list) -> None:
        await self.ask(self._install_restored, next_nodeid, inodes, children)

    # ------------------------------------------------------------------
    # handlers (run in the actor's task; never block)
    def _get(self, nodeid: int) -> Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:
            raise FsError(errno.ENOENT, f"unknown nodeid {nodeid}")
        return ino

    def _dup_fd(self, nodeid: int) -> tuple[int, int]:
        ino = self._get(nodeid)
        return os.dup(ino.fd), ino.kind

    def _dup_two(self, a: int, b: int) -> tuple[int, int]:
        ia, ib = self._get(a), self._get(b)
        fa = os.dup(ia.fd)
        try:
            fb = os.dup(ib.fd)
        except OSError:
            os.close(fa)
            raise
        return fa, fb

    def _info(self, nodeid: int):
        ino = self._get(nodeid)
        name = next(iter(ino.names), None)
        return ino.kind, ino.path, name

    def _path_under(self, parent: int, name: bytes) -> bytes:
        p = self._inodes.get(parent)
        base = p.path if p is not None else b"?"
        return base.rstrip(b"/") + b"/" + name

    def _register(self, parent: int, name: bytes, fd: int, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        nodeid = self._by_key.get(key)
        if nodeid is not None:
            os.close(fd)  # we already hold an fd on this object
            ino = self._inodes[nodeid]
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
        ino.nlookup += 1
        if parent in self._inodes and nodeid != FUSE_ROOT_ID:
            self._bind(parent, name, nodeid)
        return nodeid

    def _register_many(self, parent: int, items: list) -> list[int]:
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
        os.close(ino.fd)

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

    def _renamed(self, parent, name, newparent, newname, exchange) -> None:
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

    def _counts(self) -> dict:
        return {
            "inodes": len(self._inodes),
            "names": sum(len(k) for k in self._kids.values()),
            "next_nodeid": self._next_nodeid,
            "lookups": sum(i.nlookup for i in self._inodes.values()),
            "refused": self.refused,
        }

    def close(self) -> None:
        for ino in list(self._inodes.values()):
            try:
                os.close(ino.fd)
            except OSError:
                pass
        self._inodes.clear()
        self._by_key.clear()
        self._kids.clear()

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

    def _parse_snapshot(self, blob: bytes) -> tuple[int, list, list]:
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
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

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

    def _install_restored(self, next_nodeid: int, inodes: list, children: list) -> None:
        """inodes: [(nodeid, kind, path, fd, stat)] already reopened beneath the root."""
        for nodeid, _kind, path, fd, st in inodes:
            if nodeid == FUSE_ROOT_ID:
                continue
            key = (st.st_dev, st.st_ino)
            old = self._inodes.pop(nodeid, None)
            if old is not None:
                self._by_key.pop(old.key, None)
                os.close(old.fd)
            if key in self._by_key:  # two nodeids for one object: keep the first
                os.close(fd)
                continue
            # A restored inode is one the client already knows: one lookup.
            self._inodes[nodeid] = Inode(nodeid, fd, key, kind_of_mode(st.st_mode), path, 1)
            self._by_key[key] = nodeid
        for parent, name, child in children:
            if parent in self._inodes and child in self._inodes:
                kids = self._kids.setdefault(parent, {})
                kids[name] = child
                self._inodes[child].names.add((parent, name))
        self._next_nodeid = max(self._next_nodeid, next_nodeid)


def _close_first(result: tuple[int, int]) -> None:
    os.close(result[0])


def _close_pair(result: tuple[int, int]) -> None:
    os.close(result[0])
    os.close(result[1])
