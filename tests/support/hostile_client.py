"""A hostile FUSE client, sans-IO: builds request frames and drives a Dispatcher.

No kernel is in the way, so nothing filters what reaches the server: random
bytes, every opcode with random fields, nodeids and fhs never issued or
already forgotten, FORGET of more than was looked up, huge sizes and offsets,
names with "/", NUL, "." and "..".

The client keeps the books a kernel would keep, so tests can check the
server's side of the contract afterwards:

- every frame sent gets exactly one reply, or none for the documented drops
  (FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY, and frames too short to
  carry a unique): `check_replies()`;
- every entry handed out (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK, CREATE,
  READDIRPLUS) is one lookup the client owes a FORGET for: `forget_all()`
  gives them all back, after which the inode table must be down to the root;
- every fh handed out (OPEN, CREATE, OPENDIR) is released by `release_all()`.

Reply payloads are not kept (only their length and a prefix), so a flood of
huge READs measures the server's memory, not the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import re
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass, field

from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.fuse.dispatcher import Dispatcher
from actorfs.runtime.ops.filesystem import Filesystem, FsConfig

ROOT = 1
U64 = 2**64 - 1
KERNEL_FLAGS = (1 << 32) - 1
ENTRY_OPCODES = frozenset(
    {P.FUSE_LOOKUP, P.FUSE_MKNOD, P.FUSE_MKDIR, P.FUSE_SYMLINK, P.FUSE_LINK, P.FUSE_CREATE}
)
FH_OPCODES = {P.FUSE_OPEN: False, P.FUSE_CREATE: False, P.FUSE_OPENDIR: True}
ENTRY_OUT_SIZE = P.LAYOUT["fuse_entry_out"].size  # 128
DIRENT_SIZE = P.LAYOUT["fuse_dirent"].size  # 24
_OUT = struct.Struct("<IiQ")

# Names a kernel would never send; the server must answer each with an errno.
HOSTILE_NAMES = [
    b".", b"..", b"", b"/", b"a/b", b"../x", b"/etc/passwd", b"x" * 255, b"x" * 256,
    b"y" * 4096, b"..\xff", b"\xff\xfe", b"name\0hidden", b"\0", b"-", b"..."
]  # fmt: skip
INTERESTING_U64 = [0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, U64]
INTERESTING_SIZES = [0, 1, 4095, 4096, 4097, 1 << 17, 1 << 20, (1 << 20) + 1, 2**31, 2**32 - 1]


@dataclass
class Reply:
    opcode: int
    error: int  # negative errno or 0
    length: int
    head: bytes  # the payload's first bytes (entry_out / open_out / write_out...)


@dataclass
class Books:
    """What the client was told: lookups owed, fhs held, replies per unique."""

    lookups: Counter = field(default_factory=Counter)
    files: set = field(default_factory=set)
    dirs: set = field(default_factory=set)
    forgotten: set = field(default_factory=set)
    released: set = field(default_factory=set)
    expected: dict = field(default_factory=dict)  # unique -> (opcode, replies expected)
    replies: dict = field(default_factory=dict)  # unique -> [Reply]
    stray: list = field(default_factory=list)  # replies to uniques we never sent
    errors: Counter = field(default_factory=Counter)  # errno name -> count
    sent: int = 0


def _codes(layout: P.Layout) -> list[str]:
    return [c for c in re.findall(r"\d*([a-zA-Z])", layout.fmt) if c != "x"]


def _bounds(code: str) -> tuple[int, int]:
    bits = struct.calcsize(code) * 8
    if code.islower():
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def expected_replies(frame: bytes) -> tuple[int | None, int]:
    """(opcode or None, how many replies the dispatcher owes for this frame)."""
    try:
        msg = P.decode(frame)
    except P.ProtocolError as e:
        return e.opcode, 0 if e.no_reply else 1
    return msg.opcode, 0 if msg.opcode in P.NO_REPLY_OPCODES else 1


def parse_direntplus(payload: bytes) -> list[tuple[int, bytes]]:
    """(nodeid, name) of each fuse_direntplus record in a READDIRPLUS reply."""
    out, pos = [], 0
    while pos + ENTRY_OUT_SIZE + DIRENT_SIZE <= len(payload):
        nodeid = struct.unpack_from("<Q", payload, pos)[0]
        namelen = struct.unpack_from("<I", payload, pos + ENTRY_OUT_SIZE + 16)[0]
        start = pos + ENTRY_OUT_SIZE + DIRENT_SIZE
        out.append((nodeid, payload[start : start + namelen]))
        pos += P.direntplus_size(namelen)
    return out


class HostileClient:
    """Drives one Dispatcher with frames; keeps a kernel's books about the replies."""

    def __init__(self, dispatcher: Dispatcher, *, uid: int | None = None, gid: int | None = None):
        self.d = dispatcher
        self.books = Books()
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self._unique = 0x1000
        self._done: dict[int, asyncio.Event] = {}
        self.keep_payload: set[int] = set()  # uniques whose whole payload is kept
        self.payloads: dict[int, bytes] = {}

    # -- sending ------------------------------------------------------------------

    def next_unique(self) -> int:
        self._unique += 2  # even, as the kernel's (INTERRUPT sets the low bit)
        return self._unique

    def _send_cb(self, unique: int):
        def send(iov) -> None:
            data = P.iov_bytes(iov)
            length, error, u = _OUT.unpack_from(data)
            assert length == len(data), f"reply length {length} != {len(data)} bytes"
            assert u == unique, f"reply for unique {u} through the sender of {unique}"
            opcode = self.books.expected.get(unique, (None, 0))[0]
            payload = data[P.OUT_HEADER_SIZE :]
            self.books.replies.setdefault(unique, []).append(
                Reply(opcode, error, len(payload), payload[: ENTRY_OUT_SIZE + 24])
            )
            if error:
                self.books.errors[_errname(-error)] += 1
            elif opcode is not None:
                self._account(opcode, payload)
            if unique in self.keep_payload:
                self.payloads[unique] = payload
            ev = self._done.get(unique)
            if ev is not None:
                ev.set()

        return send

    def _account(self, opcode: int, payload: bytes) -> None:
        b = self.books
        if opcode in ENTRY_OPCODES and len(payload) >= 8:
            nodeid = struct.unpack_from("<Q", payload)[0]
            if nodeid:
                b.lookups[nodeid] += 1
        if opcode in FH_OPCODES:
            off = ENTRY_OUT_SIZE if opcode == P.FUSE_CREATE else 0
            if len(payload) >= off + 8:
                fh = struct.unpack_from("<Q", payload, off)[0]
                (b.dirs if FH_OPCODES[opcode] else b.files).add(fh)
        if opcode == P.FUSE_READDIRPLUS:
            for nodeid, _name in parse_direntplus(payload):
                if nodeid:
                    b.lookups[nodeid] += 1

    async def send_frame(self, frame: bytes | bytearray, keep: bool = False) -> int | None:
        """Send one frame as is, except that a fresh unique is written in when it fits.

        keep: hold on to the reply's payload (the reply may come before submit returns).
        """
        frame = bytearray(frame)
        unique = None
        if len(frame) >= 16:
            unique = self.next_unique()
            struct.pack_into("<Q", frame, 8, unique)
        opcode, want = expected_replies(bytes(frame))
        if unique is not None:
            self.books.expected[unique] = (opcode, want)
            self._done[unique] = asyncio.Event()
            if keep:
                self.keep_payload.add(unique)
            send = self._send_cb(unique)
        else:
            send = self._stray
        self.books.sent += 1
        await self.d.submit(bytes(frame), send)
        return unique

    def _stray(self, iov) -> None:
        self.books.stray.append(P.iov_bytes(iov))

    async def send(self, msg: P.Request, keep: bool = False) -> int:
        msg.h.uid, msg.h.gid, msg.h.pid = self.uid, self.gid, msg.h.pid or os.getpid()
        unique = await self.send_frame(P.encode_request(msg), keep)
        assert unique is not None
        return unique

    async def call(self, msg: P.Request, timeout: float = 60) -> tuple[int, bytes]:
        """Send, wait for its reply, return (error, payload head)."""
        unique = await self.send(msg, keep=True)
        await asyncio.wait_for(self._done[unique].wait(), timeout)
        r = self.books.replies[unique][0]
        self.keep_payload.discard(unique)
        return r.error, self.payloads.pop(unique, b"")

    async def ok(self, msg: P.Request) -> bytes:
        error, payload = await self.call(msg)
        assert error == 0, f"{type(msg).__name__} failed: {_errname(-error)}"
        return payload

    # -- a kernel's vocabulary -------------------------------------------------------

    async def init(self, flags: int = KERNEL_FLAGS, flags2: int = 0) -> None:
        await self.ok(P.Init(major=7, minor=38, max_readahead=1 << 17, flags=flags, flags2=flags2))

    async def lookup(self, parent: int, name: bytes) -> tuple[int, int]:
        """(error, nodeid). A negative entry (nodeid 0, cached ENOENT) counts as ENOENT."""
        err, payload = await self.call(P.Lookup(h=P.InHeader(nodeid=parent), name=name))
        nodeid = struct.unpack_from("<Q", payload)[0] if not err else 0
        if not err and not nodeid:
            return -errno.ENOENT, 0
        return err, nodeid

    async def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> tuple[int, int]:
        err, payload = await self.call(P.Mkdir(h=P.InHeader(nodeid=parent), mode=mode, name=name))
        return err, (struct.unpack_from("<Q", payload)[0] if not err else 0)

    async def create(self, parent: int, name: bytes, flags: int = os.O_RDWR, mode=0o644):
        """(error, nodeid, fh)."""
        err, payload = await self.call(
            P.Create(h=P.InHeader(nodeid=parent), flags=flags, mode=mode, name=name)
        )
        if err:
            return err, 0, 0
        return err, struct.unpack_from("<Q", payload)[0], struct.unpack_from("<Q", payload, 128)[0]

    async def open(self, nodeid: int, flags: int = os.O_RDWR) -> tuple[int, int]:
        err, payload = await self.call(P.Open(h=P.InHeader(nodeid=nodeid), flags=flags))
        return err, (struct.unpack_from("<Q", payload)[0] if not err else 0)

    async def opendir(self, nodeid: int) -> tuple[int, int]:
        err, payload = await self.call(P.Opendir(h=P.InHeader(nodeid=nodeid)))
        return err, (struct.unpack_from("<Q", payload)[0] if not err else 0)

    async def read(self, nodeid: int, fh: int, offset: int, size: int) -> tuple[int, bytes]:
        return await self.call(P.Read(h=P.InHeader(nodeid=nodeid), fh=fh, offset=offset, size=size))

    async def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> tuple[int, int]:
        err, payload = await self.call(
            P.Write(h=P.InHeader(nodeid=nodeid), fh=fh, offset=offset, size=len(data),
                    data=memoryview(data))
        )  # fmt: skip
        return err, (struct.unpack_from("<I", payload)[0] if not err else 0)

    async def readdirplus(self, nodeid: int, fh: int, size: int = 1 << 16):
        err, payload = await self.call(
            P.Readdirplus(h=P.InHeader(nodeid=nodeid), fh=fh, offset=0, size=size)
        )
        return err, (parse_direntplus(payload) if not err else [])

    async def forget(self, nodeid: int, nlookup: int) -> None:
        await self.send(P.Forget(h=P.InHeader(nodeid=nodeid), nlookup=nlookup))
        self._owe(nodeid, nlookup)

    def _owe(self, nodeid: int, n: int) -> None:
        b = self.books
        b.lookups[nodeid] -= n
        if b.lookups[nodeid] <= 0:
            del b.lookups[nodeid]
            b.forgotten.add(nodeid)

    async def forget_all(self) -> None:
        """Give back every lookup the client was handed (one BATCH_FORGET per 500)."""
        items = [(n, c) for n, c in self.books.lookups.items() if c > 0 and n != ROOT]
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            await self.send(P.BatchForget(count=len(chunk), forgets=chunk))
            for n, c in chunk:
                self._owe(n, c)
        self.books.lookups.clear()

    async def release_all(self) -> None:
        b = self.books
        for fh in sorted(b.files - b.released):
            await self.call(P.Release(h=P.InHeader(nodeid=ROOT), fh=fh))
            b.released.add(fh)
        for fh in sorted(b.dirs - b.released):
            await self.call(P.Releasedir(h=P.InHeader(nodeid=ROOT), fh=fh))
            b.released.add(fh)

    # -- checks ---------------------------------------------------------------------------

    async def settle(self, timeout: float = 60) -> None:
        """Wait until nothing is in flight (a hang fails here, not in pytest's timeout)."""
        await asyncio.wait_for(self.d.drain(), timeout)

    def check_replies(self) -> None:
        """Every frame got exactly the replies it was owed, and nothing else came."""
        b = self.books
        assert not b.stray, f"{len(b.stray)} replies to frames without a unique"
        bad = []
        for unique, (opcode, want) in b.expected.items():
            got = len(b.replies.get(unique, ()))
            if got != want:
                bad.append((unique, P.OPCODE_NAMES.get(opcode, opcode), want, got))
        assert not bad, f"{len(bad)} frames with the wrong number of replies: {bad[:10]}"
        unknown = set(b.replies) - set(b.expected)
        assert not unknown, f"replies to uniques never sent: {sorted(unknown)[:10]}"


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


# -- the canary beside the root ---------------------------------------------------------------


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)  # fmt: skip


class Canary:
    """A directory beside the root that no request may read, write, create or list.

    Checked three ways: an inotify watch on every directory in it (any open,
    read, write, attribute change, create or delete shows up; O_PATH opens and
    stat do not, so path resolution by the server's containment check is not
    counted), lstat of every object (atime too, on a strictatime mount), and
    the listing and content at the end.
    """

    FILES = {b"secret": b"canary-secret", b"sub/inner": b"inner-secret"}

    def __init__(self, path: str):
        from actorfs.runtime.host.inotify import Inotify

        self.path = os.fsencode(path)
        os.makedirs(os.path.join(self.path, b"sub"), exist_ok=True)
        for rel, data in self.FILES.items():
            with open(os.path.join(self.path, rel), "wb") as f:
                f.write(data)
        os.symlink(b"/etc/hostname", os.path.join(self.path, b"link"))
        self.paths = self._paths()
        self.before = self._stats(self.paths)  # after the listing: it sets the dirs' atime
        self.watch = Inotify()
        for d in (self.path, os.path.join(self.path, b"sub")):
            self.watch.add_watch(d, 0xFFF)  # IN_ALL_EVENTS

    def _paths(self) -> list[bytes]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            out += [dirpath] + [os.path.join(dirpath, n) for n in (*dirnames, *filenames)]
        return sorted(out)

    def _stats(self, paths: list[bytes]) -> dict:
        return {p: _stat_key(os.lstat(p)) for p in paths}

    def check(self) -> None:
        events = self.watch.read_events()
        assert not events, f"host objects beside the root were touched: {events[:10]}"
        after = self._stats(self.paths)  # before listing again
        changed = [p for p in self.paths if after[p] != self.before[p]]
        assert not changed, f"canary objects changed (times, size, mode): {changed}"
        assert self._paths() == self.paths, "the canary's listing changed"
        self.watch.close()
        for rel, data in self.FILES.items():
            with open(os.path.join(self.path, rel), "rb") as f:
                assert f.read() == data


@contextlib.contextmanager
def scratch_tmpfs(base: str, size: str = "64m"):
    """A small strictatime tmpfs at `base` (root only), or `base` as is.

    Small, so that a client asking for terabytes of fallocate gets ENOSPC and
    not a full host disk; strictatime, so that a read of the canary shows.
    """
    os.makedirs(base, exist_ok=True)
    mounted = False
    if os.geteuid() == 0:
        rc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},strictatime,mode=0755", "tmpfs", base],
            capture_output=True,
        ).returncode
        mounted = rc == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", base], capture_output=True)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- random requests ------------------------------------------------------------------------


class RandomRequests:
    """Every opcode with random fields, biased towards what the client holds.

    nodeids and fhs come from what the books say (live, forgotten, released),
    from boundary values, or from nowhere; sizes and offsets from boundary
    values; names from HOSTILE_NAMES and a small pool of real ones.
    """

    def __init__(self, rng: random.Random, books: Books, names: list[bytes] | None = None):
        self.rng = rng
        self.books = books
        self.names = names or [b"d", b"f", b"g", b"s", b"sub", b"hard", b"fifo", b"up", b"abs",
                                b"broken", b"n1", b"n2", b"n3"]  # fmt: skip

    def nodeid(self) -> int:
        r, b = self.rng, self.books
        k = r.random()
        if k < 0.45 and b.lookups:
            return r.choice(list(b.lookups))
        if k < 0.6:
            return ROOT
        if k < 0.7 and b.forgotten:
            return r.choice(list(b.forgotten))
        if k < 0.85:
            return r.choice(INTERESTING_U64)
        return r.getrandbits(64)

    def fh(self) -> int:
        r, b = self.rng, self.books
        k = r.random()
        live = list((b.files | b.dirs) - b.released)
        if k < 0.6 and live:
            return r.choice(live)
        if k < 0.7 and b.released:
            return r.choice(list(b.released))
        if k < 0.9:
            return r.choice(INTERESTING_U64)
        return r.getrandbits(64)

    def name(self) -> bytes:
        r = self.rng
        k = r.random()
        if k < 0.6:
            return r.choice(self.names)
        if k < 0.9:
            return r.choice(HOSTILE_NAMES)
        return bytes(r.getrandbits(8) for _ in range(r.randrange(1, 40)))

    def int_for(self, fname: str, code: str) -> int:
        r = self.rng
        lo, hi = _bounds(code)
        if fname in ("fh", "fh_in", "fh_out"):
            return self.fh()
        if fname in ("nodeid_out", "oldnodeid", "newdir"):
            return self.nodeid()
        if fname in ("size", "len", "length", "nlookup"):
            v = r.choice(INTERESTING_SIZES + INTERESTING_U64)
        elif "off" in fname or fname in ("offset", "moffset", "foffset"):
            v = r.choice(INTERESTING_U64 + [4096, 1 << 30])
        elif fname in ("mode",):
            v = r.choice([0o100644, 0o40755, 0o120777, 0o20666, 0o60666, 0o10644, 0o140755,
                          0o4755, 0o7777, 0, r.getrandbits(32)])  # fmt: skip
        elif fname in ("flags", "open_flags", "valid", "write_flags", "fsync_flags", "whence"):
            v = r.choice([0, 1, 2, 3, 4, os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
                          os.O_DIRECTORY, os.O_PATH, os.O_NOFOLLOW, r.getrandbits(32)])  # fmt: skip
        elif fname in ("uid", "gid"):
            v = r.choice([0, 1, 65534, os.geteuid(), 2**32 - 1])
        else:
            v = r.choice([0, 1, r.getrandbits(64)])
        return min(max(v, lo), hi) if r.random() < 0.95 else r.randint(lo, hi)

    def message(self, opcode: int | None = None) -> P.Request:
        r = self.rng
        if opcode is None:
            opcode = r.choice(sorted(P.REQUESTS))
            if opcode == P.FUSE_DESTROY and r.random() < 0.9:
                opcode = P.FUSE_LOOKUP  # DESTROY ends the session: rarely, or little else runs
        _, layout, tail = P.REQUESTS[opcode]
        h = P.InHeader(nodeid=self.nodeid(), uid=os.geteuid(), gid=os.getegid(), pid=1)
        kw: dict = {}
        if layout is not None:
            lay = P.LAYOUT[layout]
            for fname, code in zip(lay.fields, _codes(lay), strict=True):
                kw[fname] = self.int_for(fname, code)
        if opcode == P.FUSE_SETXATTR:
            kw["setxattr_flags"] = 0
        if opcode == P.FUSE_INIT:
            kw.update(major=r.choice([7, 7, 8, 6]), minor=r.choice([31, 36, 38, 40, 45]))
        if opcode == P.FUSE_INTERRUPT:
            kw["unique"] = self.rng.randrange(0x1000, 0x1000 + 2 * (self.books.sent + 2))
        if tail == "name":
            kw["name"] = self.name()
        elif tail.startswith("names:"):
            second = tail.split(":")[1]
            kw["name"] = self.name()
            if second == "target":
                kw[second] = r.choice([b"/", b"..", b"../..", b"../../canary", b"/etc",
                                       b"a", b"x" * 5000, b"sub/../.."])  # fmt: skip
            else:
                kw[second] = self.name()
        elif tail == "xattr":
            value = bytes(r.randrange(0, 64))
            kw.update(name=r.choice([b"user.x", b"trusted.y", b"security.z", b"", b"u" * 300]),
                      size=len(value), value=memoryview(value))  # fmt: skip
        elif tail.startswith("data:"):
            data = bytes(r.choice([0, 1, 100, 4096, 70000]))
            if r.random() < 0.85:
                kw[tail.split(":")[1]] = len(data)
            kw["data"] = memoryview(data)
        elif tail in ("forgets", "mappings"):
            items = [(self.nodeid(), r.choice(INTERESTING_U64)) for _ in range(r.randrange(0, 8))]
            kw.update(count=len(items), **{tail: items})
        if opcode in (P.FUSE_GETXATTR, P.FUSE_REMOVEXATTR):
            kw["name"] = r.choice([b"user.x", b"", b"u" * 300, b"trusted.y"])
        msg = P.MESSAGES[opcode](h=h, **kw)
        return msg

    def frame(self) -> bytes:
        """A valid-looking frame (70%), a mutated one (20%) or random bytes (10%)."""
        r = self.rng
        k = r.random()
        if k < 0.1:
            return bytes(r.getrandbits(8) for _ in range(r.randrange(0, 200)))
        frame = bytearray(P.encode_request(self.message(), extlen=r.choice([0, 0, 0, 1])))
        if k < 0.3:
            for _ in range(r.randrange(1, 5)):
                frame[r.randrange(len(frame))] = r.getrandbits(8)
            if r.random() < 0.5:
                del frame[r.randrange(len(frame) + 1) :]
        return bytes(frame)


@contextlib.asynccontextmanager
async def session(root, max_in_flight: int = 64, **cfg):
    """A running Filesystem over `root` and an initialised client of its dispatcher."""
    async with Filesystem.running(FsConfig(root=str(root), **cfg)) as fs:
        client = HostileClient(Dispatcher(fs, max_in_flight=max_in_flight))
        await client.init()
        yield fs, client
