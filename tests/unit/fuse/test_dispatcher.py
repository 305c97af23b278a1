"""The dispatcher with plain bytes in and bytes out, over a real Filesystem.

Frames are built with protocol.encode_request (checked against fuse.h in
test_protocol.py); replies are parsed with struct at fuse.h offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
import time
import types

import pytest

from actorfs.runtime.core.attrs import Attr, DirEntry, DirEntryPlus, Entry, Opened, StatFs
from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.fuse.dispatcher import BASE_INIT_FLAGS, INTERRUPT_GRACE, MAX_WRITE, Dispatcher
from actorfs.runtime.ops import ops as real_ops
from actorfs.runtime.ops.filesystem import ConfigError, Filesystem, FsConfig

ROOT = 1
KERNEL_FLAGS = (1 << 32) - 1  # a kernel offering every low flag
ALL_FLAGS2 = (1 << 32) - 1


class Wire:
    """A dispatcher and the replies it sends, frame by frame."""

    def __init__(self, d: Dispatcher):
        self.d = d
        self.replies: list[bytes] = []
        self._unique = 100

    def send(self, iov) -> None:
        self.replies.append(P.iov_bytes(iov))

    def next_unique(self) -> int:
        self._unique += 2
        return self._unique

    async def submit(self, msg: P.Request) -> int:
        if not msg.h.unique:
            msg.h.unique = self.next_unique()
        if not msg.h.uid and not msg.h.gid:
            msg.h.uid, msg.h.gid, msg.h.pid = os.geteuid(), os.getegid(), os.getpid()
        await self.d.submit(P.encode_request(msg), self.send)
        return msg.h.unique

    async def call(self, msg: P.Request) -> tuple[int, bytes]:
        """Submit, wait, and return (error, payload) of the one reply for it."""
        unique = await self.submit(msg)
        await self.d.drain()
        mine = [r for r in self.replies if struct.unpack_from("<Q", r, 8)[0] == unique]
        assert len(mine) == 1, f"{len(mine)} replies for unique {unique}"
        self.replies.remove(mine[0])
        length, error, _ = struct.unpack_from("<IiQ", mine[0])
        assert length == len(mine[0])
        return error, mine[0][16:]

    async def ok(self, msg: P.Request) -> bytes:
        error, payload = await self.call(msg)
        assert error == 0, f"{type(msg).__name__} failed: {errno.errorcode.get(-error, error)}"
        return payload

    async def init(self, minor=38, flags=KERNEL_FLAGS, flags2=ALL_FLAGS2, major=7) -> tuple:
        error, payload = await self.call(
            P.Init(major=major, minor=minor, max_readahead=1 << 17, flags=flags, flags2=flags2)
        )
        if error:
            return error, None
        return error, struct.unpack_from("<IIIIHHIIHHII", payload)


def H(nodeid=ROOT) -> P.InHeader:
    return P.InHeader(nodeid=nodeid)


# The Filesystem's supervisor is an asyncio task group: it must be entered and
# left in the same task, so tests use these context managers, not fixtures.


@contextlib.asynccontextmanager
async def running(tmp_path, **kw):
    # Passthrough off unless a test asks: the fake kernel offers it, and the
    # auto mode has tests of its own (test_init_passthrough_auto_*).
    kw.setdefault("passthrough", "off")
    async with Filesystem.running(FsConfig(root=str(tmp_path), **kw)) as fs:
        yield fs


@contextlib.asynccontextmanager
async def session(tmp_path, **kw):
    async with running(tmp_path) as fs:
        w = Wire(Dispatcher(fs, **kw))
        error, _ = await w.init()
        assert error == 0
        yield w


def entry_nodeid(payload: bytes) -> int:
    return struct.unpack_from("<Q", payload)[0]


def entry_attr(payload: bytes) -> tuple:
    # fuse_attr inside fuse_entry_out at offset 40: ino, size, ..., mode at 60 from there
    return struct.unpack_from("<QQQqqqIIIIIIIIII", payload, 40)


# -- INIT -------------------------------------------------------------------------------


async def test_init_minor_38(tmp_path):
    async with running(tmp_path) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init(minor=38)
        (
            major,
            minor,
            readahead,
            flags,
            bg,
            cong,
            max_write,
            gran,
            max_pages,
            align,
            flags2,
            depth,
        ) = out
        assert (major, minor) == (7, 38)
        assert flags & BASE_INIT_FLAGS == BASE_INIT_FLAGS & 0xFFFFFFFF
        assert flags & P.FUSE_INIT_EXT
        assert flags & P.FUSE_HANDLE_KILLPRIV_V2  # the ops drop set-ID bits themselves
        for never in (
            P.FUSE_POSIX_LOCKS, P.FUSE_FLOCK_LOCKS, P.FUSE_DONT_MASK, P.FUSE_SPLICE_READ,
            P.FUSE_SPLICE_WRITE, P.FUSE_SPLICE_MOVE, P.FUSE_HANDLE_KILLPRIV,
            P.FUSE_WRITEBACK_CACHE, P.FUSE_MAP_ALIGNMENT, P.FUSE_POSIX_ACL, P.FUSE_SETXATTR_EXT,
        ):  # fmt: skip
            assert not flags & never
        exported = bool(getattr(real_ops, "LOOKUP_DOT_DOTDOT", False))
        assert bool(flags & P.FUSE_EXPORT_SUPPORT) == exported
        assert flags2 == 0  # no passthrough unless configured
        assert (max_write, max_pages, gran) == (
            MAX_WRITE,
            MAX_WRITE // os.sysconf("SC_PAGE_SIZE"),
            1,
        )
        assert readahead == 1 << 17
        assert 0 < cong <= bg
        assert (align, depth) == (0, 0)
        assert w.d.init.minor == 38 and w.d.init.kernel_minor == 38
        assert not w.d.passthrough and not w.d.writeback


async def test_init_minor_31_without_init_ext(tmp_path):
    async with running(tmp_path) as fs:
        w = Wire(Dispatcher(fs))
        low = P.FUSE_ASYNC_READ | P.FUSE_BIG_WRITES | P.FUSE_MAX_PAGES
        _, out = await w.init(minor=31, flags=low, flags2=0)
        assert out[:2] == (7, 31)
        assert out[3] == low  # only what the kernel offered
        assert out[10] == 0 and not out[3] & P.FUSE_INIT_EXT
        assert w.d.init.minor == 31


async def test_init_newer_kernel_without_passthrough_configured(tmp_path):
    async with running(tmp_path) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init(minor=44)
        assert out[1] == 38  # we only claim what we implement
        assert out[10] == 0


async def test_init_passthrough_negotiated(tmp_path):
    async with Filesystem.running(FsConfig(root=str(tmp_path), passthrough=True)) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init(minor=44)
        assert out[1] == 40
        assert out[10] & (P.FUSE_PASSTHROUGH >> 32)
        assert 1 <= out[11] <= P.FILESYSTEM_MAX_STACK_DEPTH  # max_stack_depth
        assert w.d.passthrough and w.d.init.max_stack_depth == out[11]


@pytest.mark.parametrize(
    ("kw", "on", "why"),
    [
        ({}, True, "auto"),
        ({"writeback": True}, False, "--writeback"),
        ({"cache": "never"}, False, "--cache never"),
        ({"read_only": True}, True, "auto"),
        ({"cache": "always"}, True, "auto"),
        ({"passthrough": "off"}, False, "--no-passthrough"),
        ({"passthrough": "on", "writeback": True}, True, "--passthrough"),
    ],
)
async def test_init_passthrough_auto_by_default(tmp_path, monkeypatch, kw, on, why):
    from actorfs.runtime.ops import filesystem

    monkeypatch.setattr(filesystem, "may_register_backing", lambda: True)
    async with Filesystem.running(FsConfig(root=str(tmp_path), **kw)) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init(minor=44)
        assert bool(out[10] & (P.FUSE_PASSTHROUGH >> 32)) == on == w.d.passthrough
        reason = w.d.stats()["init"]["passthrough_reason"]
        assert reason.startswith("on" if on else "off") and why in reason
        # Not offered by the kernel: off, whatever was asked, and said so.
        w = Wire(Dispatcher(fs))
        _, out = await w.init(minor=38, flags2=ALL_FLAGS2 & ~(P.FUSE_PASSTHROUGH >> 32))
        assert not w.d.passthrough and w.d.passthrough_reason.startswith("off")


async def test_init_passthrough_auto_needs_cap_sys_admin(tmp_path, monkeypatch):
    from actorfs.runtime.ops import filesystem

    monkeypatch.setattr(filesystem, "may_register_backing", lambda: False)
    async with Filesystem.running(FsConfig(root=str(tmp_path))) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init(minor=44)
        assert out[10] == 0 and "CAP_SYS_ADMIN" in w.d.passthrough_reason
        w = Wire(Dispatcher(fs, transport="virtiofs"))
        _, out = await w.init(minor=44)
        assert out[10] == 0 and "virtio-fs" in w.d.passthrough_reason


def test_passthrough_modes_in_config(tmp_path):
    assert FsConfig(root=str(tmp_path)).passthrough == "auto"
    assert FsConfig(root=str(tmp_path), passthrough=True).passthrough == "on"
    assert FsConfig(root=str(tmp_path), passthrough=False).passthrough == "off"
    with pytest.raises(ConfigError):
        FsConfig(root=str(tmp_path), passthrough="sometimes")


@pytest.mark.parametrize("field, value", [("symlinks", "maybe"), ("cache", "sometimes"),
                                          ("inline", "often"), ("dax_mapper", "elsewhere")])
def test_every_policy_is_checked_against_its_literal(tmp_path, field, value):
    """Each FsConfig policy is a Literal; a value outside it is a ConfigError naming
    the allowed ones (dax_mapper used to accept anything)."""
    with pytest.raises(ConfigError, match="use one of"):
        FsConfig(root=str(tmp_path), **{field: value})  # type: ignore[arg-type]


async def test_init_passthrough_configured_but_not_offered(tmp_path):
    async with Filesystem.running(FsConfig(root=str(tmp_path), passthrough=True)) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init(minor=40, flags2=ALL_FLAGS2 & ~(P.FUSE_PASSTHROUGH >> 32))
        assert out[1] == 38 and out[10] == 0 and out[11] == 0
        assert not w.d.passthrough


async def test_init_passthrough_not_on_virtiofs(tmp_path):
    async with Filesystem.running(FsConfig(root=str(tmp_path), passthrough=True)) as fs:
        w = Wire(Dispatcher(fs, transport="virtiofs"))
        _, out = await w.init(minor=44)
        assert out[10] == 0 and out[1] == 38


async def test_init_writeback_and_its_exclusion_with_passthrough(tmp_path):
    async with Filesystem.running(FsConfig(root=str(tmp_path), writeback=True)) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init()
        assert out[3] & P.FUSE_WRITEBACK_CACHE and w.d.writeback
        w = Wire(Dispatcher(fs))
        _, out = await w.init(flags=KERNEL_FLAGS & ~P.FUSE_WRITEBACK_CACHE)
        assert not out[3] & P.FUSE_WRITEBACK_CACHE  # not offered: not taken
    cfg = FsConfig(root=str(tmp_path), writeback=True, passthrough=True)
    async with Filesystem.running(cfg) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init(minor=40)
        assert not out[3] & P.FUSE_WRITEBACK_CACHE and out[10] & (P.FUSE_PASSTHROUGH >> 32)


async def test_init_map_alignment_for_virtiofs_dax(tmp_path):
    async with running(tmp_path) as fs:
        fs.dax = types.SimpleNamespace()  # a window exists
        try:
            w = Wire(Dispatcher(fs, transport="virtiofs"))
            _, out = await w.init()
            assert out[3] & P.FUSE_MAP_ALIGNMENT
            assert 1 << out[9] == os.sysconf("SC_PAGE_SIZE")
            w = Wire(Dispatcher(fs, transport="fuse"))
            _, out = await w.init()
            assert not out[3] & P.FUSE_MAP_ALIGNMENT
        finally:
            fs.dax = None


async def test_init_major_8_gets_our_major_and_no_session(tmp_path):
    async with running(tmp_path) as fs:
        w = Wire(Dispatcher(fs))
        _, out = await w.init(major=8)
        assert out[0] == 7
        assert w.d.init is None
        error, _ = await w.call(P.Getattr(h=H()))
        assert error == -errno.EIO


async def test_init_too_old_is_eproto(tmp_path):
    async with running(tmp_path) as fs:
        w = Wire(Dispatcher(fs))
        error, _ = await w.init(minor=30)
        assert error == -errno.EPROTO and w.d.init is None


async def test_requests_before_init_and_second_init(tmp_path):
    async with running(tmp_path) as fs:
        w = Wire(Dispatcher(fs))
        error, _ = await w.call(P.Getattr(h=H()))
        assert error == -errno.EIO
        await w.submit(P.Forget(h=H(5), nlookup=1))
        await w.d.drain()
        assert w.replies == []  # FORGET never gets a reply, not even an error
        assert (await w.init())[0] == 0
        assert (await w.init())[0] == -errno.EIO


# -- ops end to end --------------------------------------------------------------------------


async def test_lookup_getattr_read(tmp_path):
    async with session(tmp_path) as wire:
        (tmp_path / "f").write_bytes(b"hello world")
        e = await wire.ok(P.Lookup(h=H(), name=b"f"))
        nodeid = entry_nodeid(e)
        assert nodeid > 1
        assert entry_attr(e)[1] == 11
        a = await wire.ok(P.Getattr(h=H(nodeid)))
        assert struct.unpack_from("<Q", a, 16 + 8)[0] == 11  # fuse_attr_out.attr.size
        o = await wire.ok(P.Open(h=H(nodeid), flags=os.O_RDONLY))
        fh = struct.unpack_from("<Q", o)[0]
        assert await wire.ok(P.Read(h=H(nodeid), fh=fh, offset=6, size=100)) == b"world"
        assert await wire.ok(P.Read(h=H(nodeid), fh=fh, offset=0, size=5)) == b"hello"
        await wire.ok(P.Flush(h=H(nodeid), fh=fh))
        await wire.ok(P.Release(h=H(nodeid), fh=fh))
        # With entry caching (cache auto), a miss is a negative entry: nodeid 0,
        # cached for the entry timeout.
        error, neg = await wire.call(P.Lookup(h=H(), name=b"missing"))
        assert error == 0
        nodeid0, _gen, entry_valid = struct.unpack_from("<QQQ", neg)
        assert nodeid0 == 0 and entry_valid == 1


async def test_create_write_fsync_and_readdir(tmp_path):
    async with session(tmp_path) as wire:
        payload = await wire.ok(
            P.Create(h=H(), name=b"new", flags=os.O_RDWR, mode=0o100644, umask=0o022)
        )
        nodeid = entry_nodeid(payload)
        fh = struct.unpack_from("<Q", payload, 128)[0]
        out = await wire.ok(
            P.Write(h=H(nodeid), fh=fh, offset=0, size=5, data=memoryview(b"abcde"))
        )
        assert struct.unpack_from("<I", out)[0] == 5
        await wire.ok(P.Fsync(h=H(nodeid), fh=fh, fsync_flags=P.FUSE_FSYNC_FDATASYNC))
        await wire.ok(P.Release(h=H(nodeid), fh=fh))
        assert (tmp_path / "new").read_bytes() == b"abcde"
        await wire.ok(P.Mkdir(h=H(), name=b"sub", mode=0o755, umask=0o022))
        assert (tmp_path / "sub").is_dir()

        d = await wire.ok(P.Opendir(h=H()))
        dfh = struct.unpack_from("<Q", d)[0]
        buf = await wire.ok(P.Readdir(h=H(), fh=dfh, offset=0, size=4096))
        names, pos = set(), 0
        while pos < len(buf):
            _ino, _off, namelen, _type = struct.unpack_from("<QQII", buf, pos)
            names.add(buf[pos + 24 : pos + 24 + namelen])
            pos += P.dirent_size(namelen)
        assert {b"new", b"sub"} <= names
        # A tiny buffer: whole records only, never more than asked.
        buf = await wire.ok(P.Readdir(h=H(), fh=dfh, offset=0, size=40))
        assert len(buf) <= 40
        plus = await wire.ok(P.Readdirplus(h=H(), fh=dfh, offset=0, size=4096))
        assert len(plus) % 8 == 0 and len(plus) >= 2 * 160
        await wire.ok(P.Releasedir(h=H(), fh=dfh))


async def test_namespace_ops(tmp_path):
    async with session(tmp_path) as wire:
        (tmp_path / "a").write_bytes(b"x")
        await wire.ok(P.Symlink(h=H(), name=b"ln", target=b"a"))
        n = entry_nodeid(await wire.ok(P.Lookup(h=H(), name=b"ln")))
        assert await wire.ok(P.Readlink(h=H(n))) == b"a"
        await wire.ok(P.Rename(h=H(), newdir=ROOT, name=b"a", newname=b"b"))
        assert (tmp_path / "b").exists() and not (tmp_path / "a").exists()
        (tmp_path / "c").write_bytes(b"")
        error, _ = await wire.call(
            P.Rename2(h=H(), newdir=ROOT, flags=1, name=b"b", newname=b"c")  # RENAME_NOREPLACE
        )
        assert error == -errno.EEXIST
        b = entry_nodeid(await wire.ok(P.Lookup(h=H(), name=b"b")))
        await wire.ok(P.Link(h=H(), oldnodeid=b, name=b"b2"))
        assert os.path.samefile(tmp_path / "b", tmp_path / "b2")
        await wire.ok(P.Unlink(h=H(), name=b"b2"))
        (tmp_path / "d").mkdir()
        await wire.ok(P.Rmdir(h=H(), name=b"d"))
        assert not (tmp_path / "d").exists()
        await wire.ok(P.Access(h=H(b), mask=os.R_OK))
        st = await wire.ok(P.Statfs(h=H()))
        assert len(st) == 80 and struct.unpack_from("<I", st, 44)[0] > 0  # namelen
        await wire.submit(P.Forget(h=H(n), nlookup=1))
        await wire.submit(P.BatchForget(h=H(0), count=1, forgets=[(b, 1)]))
        await wire.d.drain()
        assert wire.replies == []


async def test_setattr_truncate(tmp_path):
    async with session(tmp_path) as wire:
        (tmp_path / "t").write_bytes(b"0123456789")
        n = entry_nodeid(await wire.ok(P.Lookup(h=H(), name=b"t")))
        out = await wire.ok(P.Setattr(h=H(n), valid=1 << 3, size=4))  # FATTR_SIZE
        assert struct.unpack_from("<Q", out, 16 + 8)[0] == 4
        assert (tmp_path / "t").read_bytes() == b"0123"


async def test_xattrs(tmp_path):
    async with session(tmp_path) as wire:
        (tmp_path / "x").write_bytes(b"")
        try:
            os.setxattr(tmp_path / "x", "user.probe", b"1")
        except OSError:
            pytest.skip("no user xattrs on this filesystem")
        n = entry_nodeid(await wire.ok(P.Lookup(h=H(), name=b"x")))
        await wire.ok(P.Setxattr(h=H(n), size=3, name=b"user.k", value=memoryview(b"val")))
        size = await wire.ok(P.Getxattr(h=H(n), size=0, name=b"user.k"))
        assert struct.unpack_from("<I", size)[0] == 3
        assert await wire.ok(P.Getxattr(h=H(n), size=100, name=b"user.k")) == b"val"
        error, _ = await wire.call(P.Getxattr(h=H(n), size=1, name=b"user.k"))
        assert error == -errno.ERANGE
        names = await wire.ok(P.Listxattr(h=H(n), size=4096))
        assert b"user.k\0" in names
        await wire.ok(P.Removexattr(h=H(n), name=b"user.k"))


async def test_lseek_fallocate_copy_file_range(tmp_path):
    async with session(tmp_path) as wire:
        (tmp_path / "src").write_bytes(b"s" * 8192)
        (tmp_path / "dst").write_bytes(b"")
        s = entry_nodeid(await wire.ok(P.Lookup(h=H(), name=b"src")))
        t = entry_nodeid(await wire.ok(P.Lookup(h=H(), name=b"dst")))
        sfh = struct.unpack_from("<Q", await wire.ok(P.Open(h=H(s), flags=os.O_RDONLY)))[0]
        tfh = struct.unpack_from("<Q", await wire.ok(P.Open(h=H(t), flags=os.O_RDWR)))[0]
        off = await wire.ok(P.Lseek(h=H(s), fh=sfh, offset=0, whence=os.SEEK_END))
        assert struct.unpack_from("<Q", off)[0] == 8192
        await wire.ok(P.Fallocate(h=H(t), fh=tfh, offset=0, length=4096, mode=0))
        out = await wire.ok(
            P.CopyFileRange(
                h=H(s), fh_in=sfh, off_in=0, nodeid_out=t, fh_out=tfh, off_out=0, len=100
            )
        )
        assert struct.unpack_from("<I", out)[0] == 100
        assert (tmp_path / "dst").read_bytes()[:100] == b"s" * 100


@pytest.mark.parametrize(
    "msg",
    [
        P.Getlk(), P.Setlk(), P.Setlkw(), P.Bmap(), P.Poll(), P.Syncfs(),
        P.Tmpfile(name=b"t"), P.Statx(), P.Setupmapping(), P.Removemapping(),
    ],
    ids=lambda m: type(m).__name__,
)  # fmt: skip
async def test_unimplemented_ops_are_enosys(tmp_path, msg):
    async with session(tmp_path) as wire:
        msg.h.nodeid = ROOT
        error, _ = await wire.call(msg)
        assert error == -errno.ENOSYS


async def test_ioctl_is_enotty(tmp_path):
    async with session(tmp_path) as wire:
        error, _ = await wire.call(P.Ioctl(h=H()))
        assert error == -errno.ENOTTY


async def test_unknown_opcode_and_malformed_frames(tmp_path):
    async with session(tmp_path) as wire:
        await wire.d.submit(struct.pack("<IIQQIIIHH", 40, 4242, 77, 1, 0, 0, 0, 0, 0), wire.send)
        await wire.d.submit(
            struct.pack("<IIQQIIIHH", 45, P.FUSE_LOOKUP, 78, 1, 0, 0, 0, 0, 0) + b"ab", wire.send
        )
        await wire.d.submit(
            struct.pack("<IIQQIIIHH", 43, P.FUSE_LOOKUP, 79, 1, 0, 0, 0, 0, 0) + b"abc", wire.send
        )
        await wire.d.submit(b"\x00" * 10, wire.send)  # no unique: nothing can be replied
        await wire.d.drain()
        got = {
            struct.unpack_from("<Q", r, 8)[0]: struct.unpack_from("<i", r, 4)[0]
            for r in wire.replies
        }
        assert got == {77: -errno.ENOSYS, 78: -errno.EINVAL, 79: -errno.EINVAL}
        assert wire.d.stats()["protocol_errors"] == 4


async def test_destroy_replies_and_ends_the_session(tmp_path):
    async with session(tmp_path) as wire:
        assert not wire.d.destroyed.is_set()
        assert await wire.ok(P.Destroy(h=H())) == b""
        assert wire.d.destroyed.is_set()
        error, _ = await wire.call(P.Getattr(h=H()))
        assert error == -errno.EIO
        assert (await wire.init())[0] == 0  # a guest may mount again


async def test_stats(tmp_path):
    async with session(tmp_path) as wire:
        (tmp_path / "s").write_bytes(b"")
        for _ in range(3):
            await wire.ok(P.Lookup(h=H(), name=b"s"))
        await wire.call(P.Lookup(h=H(), name=b"no/pe"))
        s = wire.d.stats()
        lk = s["ops"]["LOOKUP"]
        assert lk["count"] == 4 and lk["errors"] == 1
        assert 0 < lk["p50_us"] <= lk["p99_us"]
        assert sum(lk["histogram_us"].values()) == 4
        assert s["in_flight"] == 0 and s["total"] >= 5
        assert s["init"]["minor"] == 38 and s["init"]["passthrough"] is False


# -- concurrency: INTERRUPT and backpressure -----------------------------------------------


def slow_ops(gate: asyncio.Event, started: asyncio.Event):
    """The real op layer, with read and lookup waiting on `gate`."""

    async def read(fs, ctx, nodeid, fh, offset, size):
        started.set()
        await gate.wait()
        return b"late"

    async def lookup(fs, ctx, parent, name):
        started.set()
        await gate.wait()
        return await real_ops.lookup(fs, ctx, parent, name)

    ns = types.SimpleNamespace(
        **{k: getattr(real_ops, k) for k in dir(real_ops) if not k.startswith("__")}
    )
    ns.read, ns.lookup = read, lookup
    return ns


async def _one_reply(wire, unique) -> int:
    mine = [r for r in wire.replies if struct.unpack_from("<Q", r, 8)[0] == unique]
    assert len(mine) == 1
    return struct.unpack_from("<i", mine[0], 4)[0]


async def test_interrupt_cancels_a_blocked_read(tmp_path):
    async with running(tmp_path) as fs:
        gate, started = asyncio.Event(), asyncio.Event()
        w = Wire(Dispatcher(fs, ops=slow_ops(gate, started)))
        await w.init()
        target = await w.submit(P.Read(h=H(), fh=1, size=10))
        await started.wait()
        await w.submit(P.Interrupt(h=P.InHeader(unique=target | 1), unique=target))
        await w.d.drain()
        assert await _one_reply(w, target) == -errno.EINTR
        assert len(w.replies) == 1  # INTERRUPT itself has no reply
        assert w.d.stats()["interrupts"] == 1


async def test_interrupt_past_the_grace_before_the_request_task_first_ran(tmp_path):
    """The reader reads a READ (its first step runs at once, eagerly, and it waits),
    then is descheduled (load) past the grace period before it reads the INTERRUPT,
    all without a turn of the loop: the task that finishes the READ has not run
    yet. Cancelling that task then killed it before it could resume the request:
    no reply ever, and the caller hung in D state for good (stress-ng's dir
    stressor in a statfs, about 1 run in 8 under load)."""
    async with running(tmp_path) as fs:
        gate, started = asyncio.Event(), asyncio.Event()
        w = Wire(Dispatcher(fs, ops=slow_ops(gate, started)))
        await w.init()
        target = await w.submit(P.Read(h=H(), fh=1, size=10))
        assert started.is_set()  # its first step ran inside submit
        time.sleep(INTERRUPT_GRACE + 0.05)  # no loop turn: the reader was not scheduled
        await w.submit(P.Interrupt(h=P.InHeader(unique=target | 1), unique=target))
        await asyncio.wait_for(w.d.drain(), 10)
        assert await _one_reply(w, target) == -errno.EINTR


async def test_an_interrupt_read_late_does_not_abandon_a_request_that_then_finishes(tmp_path):
    """The server is descheduled (load) for longer than the grace between reading
    a request and reading its INTERRUPT; the request then finishes at once. It is
    not stuck, so it must not be answered EINTR (stat(2) never fails so on a
    kernel filesystem): the grace counts from the INTERRUPT, not the request."""
    async with running(tmp_path) as fs:
        gate, started = asyncio.Event(), asyncio.Event()
        w = Wire(Dispatcher(fs, ops=slow_ops(gate, started)))
        await w.init()
        target = await w.submit(P.Read(h=H(), fh=1, size=10))
        time.sleep(INTERRUPT_GRACE + 0.05)  # the server was not scheduled meanwhile
        await w.submit(P.Interrupt(h=P.InHeader(unique=target | 1), unique=target))
        await asyncio.sleep(0)
        gate.set()  # the request goes on as soon as the server runs again
        await asyncio.wait_for(w.d.drain(), 10)
        assert await _one_reply(w, target) == 0


async def test_interrupt_before_the_request_arrives(tmp_path):
    async with running(tmp_path) as fs:
        gate, started = asyncio.Event(), asyncio.Event()
        w = Wire(Dispatcher(fs, ops=slow_ops(gate, started)))
        await w.init()
        target = w.next_unique()
        await w.submit(P.Interrupt(h=P.InHeader(unique=target | 1), unique=target))
        await w.submit(P.Read(h=P.InHeader(unique=target, nodeid=ROOT), fh=1, size=10))
        await w.d.drain()
        # The READ stayed stuck past the grace period: abandoned with EINTR.
        assert await _one_reply(w, target) == -errno.EINTR


async def test_interrupt_of_a_quick_request_lets_it_finish(tmp_path):
    # A signal to the caller (SIGCHLD...) must not turn a quick read into EINTR.
    async with running(tmp_path) as fs:
        gate, started = asyncio.Event(), asyncio.Event()
        w = Wire(Dispatcher(fs, ops=slow_ops(gate, started)))
        await w.init()
        target = w.next_unique()
        await w.submit(P.Interrupt(h=P.InHeader(unique=target | 1), unique=target))
        await w.submit(P.Read(h=P.InHeader(unique=target, nodeid=ROOT), fh=1, size=10))
        await started.wait()
        gate.set()  # finishes well within the grace period
        await w.d.drain()
        assert await _one_reply(w, target) != -errno.EINTR


async def test_interrupt_does_not_abandon_a_lookup(tmp_path):
    async with running(tmp_path) as fs:
        (tmp_path / "f").write_bytes(b"")
        gate, started = asyncio.Event(), asyncio.Event()
        w = Wire(Dispatcher(fs, ops=slow_ops(gate, started)))
        await w.init()
        target = await w.submit(P.Lookup(h=H(), name=b"f"))
        await started.wait()
        await w.submit(P.Interrupt(h=P.InHeader(unique=target | 1), unique=target))
        gate.set()
        await w.d.drain()
        # It ran to the end: the kernel gets the entry (and its lookup count) after all.
        assert await _one_reply(w, target) == 0


async def test_interrupt_of_a_finished_request_is_ignored(tmp_path):
    async with session(tmp_path) as wire:
        target = await wire.submit(P.Getattr(h=H()))
        await wire.d.drain()
        await wire.submit(P.Interrupt(h=P.InHeader(unique=target | 1), unique=target))
        await wire.d.drain()
        assert await _one_reply(wire, target) == 0
        assert len(wire.replies) == 1


async def test_backpressure_max_in_flight(tmp_path):
    async with running(tmp_path) as fs:
        gate, started = asyncio.Event(), asyncio.Event()
        w = Wire(Dispatcher(fs, max_in_flight=2, ops=slow_ops(gate, started)))
        await w.init()
        u1 = await w.submit(P.Read(h=H(), fh=1, size=10))
        u2 = await w.submit(P.Read(h=H(), fh=1, size=10))
        assert w.d.in_flight == 2
        third = asyncio.ensure_future(w.submit(P.Getattr(h=H())))
        for _ in range(20):  # let the loop run: the third submit must stay parked
            await asyncio.sleep(0)
        assert not third.done()
        assert w.d.in_flight == 2
        # An INTERRUPT still gets through while every slot is taken.
        await w.submit(P.Interrupt(h=P.InHeader(unique=u1 | 1), unique=u1))
        u3 = await third
        gate.set()
        await w.d.drain()
        assert await _one_reply(w, u1) == -errno.EINTR
        assert await _one_reply(w, u2) == 0
        assert await _one_reply(w, u3) == 0
        assert w.d.in_flight == 0


async def test_cancel_all_leaves_nothing_in_flight(tmp_path):
    async with running(tmp_path) as fs:
        gate, started = asyncio.Event(), asyncio.Event()
        w = Wire(Dispatcher(fs, ops=slow_ops(gate, started)))
        await w.init()
        for _ in range(5):
            await w.submit(P.Read(h=H(), fh=1, size=10))
        await w.d.cancel_all()  # some never started: their slots come back all the same
        assert w.d.in_flight == 0
        assert w.replies == []


async def test_async_send_and_failing_send(tmp_path):
    async with session(tmp_path) as wire:
        sent = []

        async def asend(iov):
            await asyncio.sleep(0)
            sent.append(P.iov_bytes(iov))

        def broken(iov):
            raise OSError(errno.ENOENT, "request gone")

        await wire.d.submit(
            P.encode_request(P.Getattr(h=P.InHeader(unique=900, nodeid=ROOT))), asend
        )
        await wire.d.submit(
            P.encode_request(P.Getattr(h=P.InHeader(unique=902, nodeid=ROOT))), broken
        )
        await wire.d.drain()
        assert len(sent) == 1 and struct.unpack_from("<Q", sent[0], 8)[0] == 900
        assert wire.d.stats()["send_errors"] == 1


# -- fuzz: random frames, exactly one well-formed reply each (none for no-reply ops) ------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from actorfs.runtime.core.errno_map import FsError  # noqa: E402
from tests.unit.fuse.test_protocol_fuzz import valid_messages  # noqa: E402

_ATTR = Attr(2, 10, 1, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096)
_ENTRY = Entry(2, 0, _ATTR, 1.0, 1.0)


def _stub_ops():
    """Every op, answering by nodeid: a value, an FsError, an OSError or a bug."""

    def op(value):
        async def run(fs, *args):
            key = next((a for a in args if isinstance(a, int)), 0)
            await asyncio.sleep(0)
            kind = key % 4
            if kind == 1:
                raise FsError(errno.ENOENT)
            if kind == 2:
                raise OSError(errno.EACCES, "no")
            if kind == 3:
                raise RuntimeError("a bug in an op")
            return value() if callable(value) else value

        return run

    names = {
        "lookup": _ENTRY, "forget": None, "batch_forget": None, "getattr": _ATTR,
        "setattr": _ATTR, "readlink": b"target", "symlink": _ENTRY, "mknod": _ENTRY,
        "mkdir": _ENTRY, "unlink": None, "rmdir": None, "rename": None, "link": _ENTRY,
        "open": Opened(5, P.FOPEN_PASSTHROUGH, 3), "read": b"data" * 100, "write": 7,
        "statfs": StatFs(1, 2, 3, 4, 5, 6, 7, 8), "release": None, "fsync": None,
        "setxattr": None, "getxattr": b"v" * 10, "listxattr": 12, "removexattr": None,
        "flush": None, "opendir": Opened(6), "releasedir": None, "fsyncdir": None,
        "access": None, "create": (_ENTRY, Opened(7)), "fallocate": None, "lseek": 99,
        "copy_file_range": 1 << 40,
        "readdir": [DirEntry(3, i + 1, 8, b"n%d" % i) for i in range(50)],
        "readdirplus": [DirEntryPlus(_ENTRY, DirEntry(3, i + 1, 8, b"n%d" % i)) for i in range(50)],
    }  # fmt: skip
    return types.SimpleNamespace(**{k: op(v) for k, v in names.items()})


class _Cfg:
    attr_timeout = entry_timeout = 1.0
    writeback = passthrough = False
    max_stack_depth = None


_STUB_FS = types.SimpleNamespace(config=_Cfg(), dax=None, root_path="/")


@st.composite
def frames(draw):
    out = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["valid", "valid", "mutated", "random"]))
        if kind == "random":
            out.append(draw(st.binary(max_size=120)))
            continue
        frame = bytearray(P.encode_request(draw(valid_messages())))
        if kind == "mutated":
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(frame) - 1))
                frame[i] = draw(st.integers(0, 255))
            if draw(st.booleans()):
                del frame[draw(st.integers(0, len(frame))) :]
        out.append(bytes(frame))
    return out


def _expected_replies(frame: bytes) -> int:
    try:
        msg = P.decode(frame)
    except P.ProtocolError as e:
        return 0 if e.no_reply else 1
    return 0 if msg.opcode in P.NO_REPLY_OPCODES else 1


async def _run_frames(frames_: list[bytes]) -> list[tuple[bytes, list[bytes]]]:
    d = Dispatcher(_STUB_FS, max_in_flight=4, ops=_stub_ops(), ops_dax=types.SimpleNamespace())
    init = P.Init(h=P.InHeader(unique=1), major=7, minor=38, flags=KERNEL_FLAGS, flags2=ALL_FLAGS2)
    sent: dict[int, list[bytes]] = {}

    def sender(i):
        def send(iov):
            sent.setdefault(i, []).append(P.iov_bytes(iov))

        return send

    await d.submit(P.encode_request(init), sender(-1))
    for i, f in enumerate(frames_):
        await d.submit(f, sender(i))
    await d.drain()
    assert d.in_flight == 0
    return [(f, sent.get(i, [])) for i, f in enumerate(frames_)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_fuzz_dispatcher_one_reply_per_request(frames_):
    # Distinct uniques, so every reply can be told apart.
    fixed = []
    for i, f in enumerate(frames_):
        f = bytearray(f)
        if len(f) >= 16:
            struct.pack_into("<Q", f, 8, 1000 + 2 * i)
        fixed.append(bytes(f))
    for frame, replies in asyncio.run(_run_frames(fixed)):
        want = _expected_replies(frame)
        # An INIT/DESTROY among the frames changes the session state, not the count.
        assert len(replies) == want, (frame[:48], replies)
        for r in replies:
            length, error, unique = struct.unpack_from("<IiQ", r)
            assert length == len(r) >= 16
            assert -512 < error <= 0
            assert unique == struct.unpack_from("<Q", frame, 8)[0]


# -- DAX mapping routes, passthrough open flags, notifications -------------------------------


async def test_setupmapping_and_removemapping_reach_ops_dax(tmp_path):
    calls = []

    async def setupmapping(fs, ctx, nodeid, fh, foffset, length, flags, moffset):
        calls.append(("setup", nodeid, fh, foffset, length, flags, moffset, ctx.uid))

    async def removemapping(fs, ctx, ranges):
        calls.append(("remove", ranges))

    dax_ops = types.SimpleNamespace(setupmapping=setupmapping, removemapping=removemapping)
    async with running(tmp_path) as fs:
        fs.dax = types.SimpleNamespace(map_alignment=12)
        try:
            w = Wire(Dispatcher(fs, transport="virtiofs", ops_dax=dax_ops))
            _, out = await w.init()
            assert out[3] & P.FUSE_MAP_ALIGNMENT and out[9] == 12
            msg = P.Setupmapping(h=P.InHeader(nodeid=5, uid=7, gid=7), fh=3, foffset=4096,
                                 len=1 << 21, flags=P.FUSE_SETUPMAPPING_FLAG_READ, moffset=1 << 21)  # fmt: skip
            await w.ok(msg)
            await w.ok(P.Removemapping(h=H(), count=2, mappings=[(0, 4096), (8192, 4096)]))
        finally:
            fs.dax = None
        assert calls == [
            ("setup", 5, 3, 4096, 1 << 21, P.FUSE_SETUPMAPPING_FLAG_READ, 1 << 21, 7),
            ("remove", [(0, 4096), (8192, 4096)]),
        ]
        # Without a window: ENOSYS, whatever the op layer offers.
        error, _ = await w.call(P.Removemapping(h=H(), count=0))
        assert error == -errno.ENOSYS


async def test_passthrough_open_flags_only_when_negotiated(tmp_path):
    async def open_(fs, ctx, nodeid, flags):
        return Opened(fh=9, open_flags=P.FOPEN_PASSTHROUGH | P.FOPEN_KEEP_CACHE, backing_id=4)

    ops = types.SimpleNamespace(open=open_)
    cfg = {"passthrough": True}
    async with running(tmp_path, **cfg) as fs:
        w = Wire(Dispatcher(fs, ops=ops))
        await w.init(minor=38, flags2=0)  # the kernel does not offer passthrough
        out = await w.ok(P.Open(h=H(2)))
        assert struct.unpack_from("<QIi", out) == (9, P.FOPEN_KEEP_CACHE, 0)
        w = Wire(Dispatcher(fs, ops=ops))
        await w.init(minor=40)
        out = await w.ok(P.Open(h=H(2)))
        assert struct.unpack_from("<QIi", out) == (9, P.FOPEN_PASSTHROUGH | P.FOPEN_KEEP_CACHE, 4)


async def test_notifiers():
    from actorfs.runtime.fuse.notify import Notifier, NullNotifier, WriterNotifier

    null = NullNotifier()
    assert isinstance(null, Notifier)
    assert await null.inval_inode(5) is False
    assert await null.delete(1, 5, b"x") is False
    assert null.undelivered == 2

    written, live = [], [False]

    async def write(iov):
        written.append(P.iov_bytes(iov))
        return True

    n = WriterNotifier(write, enabled=lambda: live[0])
    assert isinstance(n, Notifier)
    assert await n.inval_entry(1, b"a") is False  # before INIT: held back
    live[0] = True
    assert await n.inval_entry(1, b"a") is True
    assert await n.inval_inode(7, -1, 0) is True
    assert await n.delete(1, 7, b"gone") is True
    assert written == [
        P.iov_bytes(P.notify_inval_entry(1, b"a")),
        P.iov_bytes(P.notify_inval_inode(7, -1, 0)),
        P.iov_bytes(P.notify_delete(1, 7, b"gone")),
    ]
    assert (n.delivered, n.undelivered) == (3, 1)

    def refused(iov):
        raise OSError(errno.ENOENT, "no such entry")

    n = WriterNotifier(refused)
    assert await n.inval_entry(1, b"a") is False and n.undelivered == 1


# -- fuzz against the real op layer over a tmp directory --------------------------------------

# MKNOD is left out: a FIFO it makes would be opened by a later random OPEN, and
# open(2) of a FIFO waits for a writer (reported to the op layer's owner).
REAL_FUZZ_OPCODES = [op for op in sorted(P.REQUESTS) if op not in (P.FUSE_MKNOD,)]
SMALL = st.integers(0, 8)
NAMES = st.sampled_from([b"a", b"b", b"d", b"f", b".", b"..", b"", b"x/y", b"n" * 300, b"user.k"])


@pytest.fixture(scope="module")
def live_fs(tmp_path_factory):
    """One Filesystem for every example, hosted by a task that outlives each run."""
    outer = tmp_path_factory.mktemp("fuzz")
    (outer / "outside").write_bytes(b"untouched")
    root = outer / "root"
    root.mkdir()
    (root / "f").write_bytes(b"0123456789" * 100)
    (root / "d").mkdir()
    (root / "d" / "inner").write_bytes(b"x")
    os.symlink("f", root / "ln")
    runner = asyncio.Runner()
    stop = asyncio.Event()
    ready: list = []

    async def host():
        async with Filesystem.running(FsConfig(root=str(root))) as fs:
            ready.append(fs)
            await stop.wait()

    async def start():
        task = asyncio.create_task(host())
        while not ready:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        return task

    task = runner.run(start())
    yield runner, ready[0], root

    async def finish():
        stop.set()
        await task

    runner.run(finish())
    runner.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(valid_messages(REAL_FUZZ_OPCODES, SMALL, NAMES), min_size=1, max_size=10))
def test_fuzz_dispatcher_real_filesystem(live_fs, msgs):
    runner, fs, root = live_fs

    async def run():
        d = Dispatcher(fs, max_in_flight=8)
        sent: dict[int, list[bytes]] = {}
        init = P.Init(h=P.InHeader(unique=1), major=7, minor=38, flags=KERNEL_FLAGS)
        await d.submit(P.encode_request(init), lambda iov: None)
        frames = []
        for i, m in enumerate(msgs):
            m.h.unique = 1000 + 2 * i
            if m.opcode == P.FUSE_INTERRUPT:
                m.unique = 1000 + 2 * (m.unique % len(msgs))  # aim at a neighbour
            frames.append(P.encode_request(m))
        for i, f in enumerate(frames):
            await d.submit(f, lambda iov, i=i: sent.setdefault(i, []).append(P.iov_bytes(iov)))
        await d.drain()
        return [(f, sent.get(i, [])) for i, f in enumerate(frames)]

    for frame, replies in runner.run(run()):
        assert len(replies) == _expected_replies(frame)
        for r in replies:
            length, error, unique = struct.unpack_from("<IiQ", r)
            assert length == len(r) and -512 < error <= 0
            assert unique == struct.unpack_from("<Q", frame, 8)[0]
    # Whatever the client sent, nothing beside the root changed.
    assert sorted(os.listdir(root.parent)) == ["outside", "root"]
    assert (root.parent / "outside").read_bytes() == b"untouched"


# -- a real kernel: mount /dev/fuse and serve it with the dispatcher -------------------------


class _Backing:
    """fs.backing for passthrough: register a host fd with the kernel (root only)."""

    def __init__(self, devfd: int):
        self.devfd = devfd
        self.opened = 0

    def open(self, fd: int) -> int:
        import fcntl

        backing_id = fcntl.ioctl(
            self.devfd, P.FUSE_DEV_IOC_BACKING_OPEN, bytearray(P.backing_map(fd)), True
        )
        self.opened += 1
        return backing_id

    def close(self, backing_id: int) -> None:
        import fcntl

        fcntl.ioctl(
            self.devfd, P.FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("<I", backing_id)), True
        )


async def _serve_device(fd: int, d: Dispatcher) -> None:
    """The smallest /dev/fuse transport: read frames when readable, writev replies."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            while True:
                try:
                    frame = os.read(fd, MAX_WRITE + 4096)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENODEV:  # unmounted
                        return
                    if exc.errno == errno.ENOENT:  # an interrupted request vanished
                        continue
                    raise
                await d.submit(frame, lambda iov: os.writev(fd, iov))
    finally:
        loop.remove_reader(fd)


def _client_work(mnt: str) -> dict:
    """Plain syscalls on the mount, as any program would make them."""
    out = {}
    with open(os.path.join(mnt, "hello"), "wb") as f:
        f.write(b"x" * 300_000)
    with open(os.path.join(mnt, "hello"), "rb") as f:
        out["read"] = f.read()
    os.mkdir(os.path.join(mnt, "dir"))
    os.rename(os.path.join(mnt, "hello"), os.path.join(mnt, "dir", "moved"))
    out["listing"] = sorted(os.listdir(os.path.join(mnt, "dir")))
    out["size"] = os.stat(os.path.join(mnt, "dir", "moved")).st_size
    os.unlink(os.path.join(mnt, "dir", "moved"))
    os.rmdir(os.path.join(mnt, "dir"))
    out["after"] = os.listdir(mnt)
    return out


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.parametrize("passthrough", [False, True], ids=["plain", "passthrough"])
async def test_real_kernel_mount(tmp_path, passthrough):
    from actorfs.runtime.devfuse import mounting as fuse_mount

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    async with running(src, passthrough=passthrough) as fs:
        m = fuse_mount.mount(str(src), str(mnt))
        d = Dispatcher(fs)
        if passthrough:
            fs.backing = _Backing(m.fd)
        os.set_blocking(m.fd, False)
        server = asyncio.ensure_future(_serve_device(m.fd, d))
        try:
            loop = asyncio.get_running_loop()
            out = await asyncio.wait_for(loop.run_in_executor(None, _client_work, str(mnt)), 60)
        finally:
            fuse_mount.unmount(str(mnt))
            fuse_mount.abort_connection(m.conn)
            with contextlib.suppress(asyncio.TimeoutError, OSError):
                await asyncio.wait_for(server, 10)
            server.cancel()
            await d.drain()
            os.close(m.fd)
    assert out == {"read": b"x" * 300_000, "listing": ["moved"], "size": 300_000, "after": []}
    assert d.init is not None and d.init.kernel_minor >= 38
    ops = d.stats()["ops"]
    if passthrough and d.init.kernel_flags & P.FUSE_PASSTHROUGH:
        assert d.init.minor == 40 and d.passthrough and fs.backing.opened >= 1
        assert "READ" not in ops and "WRITE" not in ops  # the kernel did the I/O itself
    else:
        assert d.init.minor == 38 and not d.passthrough
        assert ops["WRITE"]["count"] >= 1 and ops["READ"]["count"] >= 1
    assert d.stats()["protocol_errors"] == 0


async def test_missing_ops_and_broken_config_never_raise():
    # An op layer without forget: FORGET is still never answered; GETATTR is ENOSYS.
    sent = []
    d = Dispatcher(_STUB_FS, ops=types.SimpleNamespace(), ops_dax=types.SimpleNamespace())
    init = P.Init(h=P.InHeader(unique=1), major=7, minor=38, flags=KERNEL_FLAGS)
    await d.submit(P.encode_request(init), lambda iov: sent.append(P.iov_bytes(iov)))
    await d.submit(
        P.encode_request(P.Forget(h=P.InHeader(unique=3, nodeid=5), nlookup=1)), sent.append
    )
    await d.submit(
        P.encode_request(P.Getattr(h=P.InHeader(unique=5, nodeid=1))),
        lambda iov: sent.append(P.iov_bytes(iov)),
    )
    await d.drain()
    assert [struct.unpack_from("<iQ", r, 4) for r in sent] == [(0, 1), (-errno.ENOSYS, 5)]
    # READDIRPLUS is not offered when the op layer cannot do it.
    assert not d.init.flags & P.FUSE_DO_READDIRPLUS

    # A filesystem whose config breaks INIT: an EIO reply, no exception, no session.
    class BadConfig:
        @property
        def writeback(self):
            raise RuntimeError("broken config")

    broken = types.SimpleNamespace(config=BadConfig(), dax=None)
    d = Dispatcher(broken, ops=types.SimpleNamespace(), ops_dax=types.SimpleNamespace())
    sent.clear()
    await d.submit(P.encode_request(init), lambda iov: sent.append(P.iov_bytes(iov)))
    assert struct.unpack_from("<i", sent[0], 4)[0] == -errno.EIO and d.init is None


def test_stats_buckets_and_percentiles():
    from actorfs.runtime.fuse.stats import NBUCKETS, Stats

    s = Stats()
    for _ in range(98):
        s.record(P.FUSE_READ, 3_000, False)  # 3 us -> bucket (2, 4]
    s.record(P.FUSE_READ, 900_000, True)  # 900 us -> bucket (512, 1024]
    s.record(P.FUSE_READ, 10**18, True)  # absurd: clamped into the last bucket
    snap = s.snapshot(lambda op: P.OPCODE_NAMES[op])
    r = snap["ops"]["FUSE_READ"]
    assert (r["count"], r["errors"]) == (100, 2)
    assert r["p50_us"] == 4
    assert r["p99_us"] == 1024
    assert r["histogram_us"] == {4: 98, 1024: 1, 1 << (NBUCKETS - 1): 1}
    assert snap["total"] == 100 and snap["errors"] == 2


async def test_interrupt_never_lies_about_a_write(tmp_path):
    gate, started = asyncio.Event(), asyncio.Event()
    ops = slow_ops(gate, started)

    async def write(fs, ctx, nodeid, fh, offset, data, write_flags=0):
        started.set()
        await gate.wait()  # the host write happens whatever the client does
        return len(data)

    ops.write = write
    async with running(tmp_path) as fs:
        w = Wire(Dispatcher(fs, ops=ops))
        await w.init()
        target = await w.submit(P.Write(h=H(2), fh=1, size=3, data=memoryview(b"abc")))
        await started.wait()
        await w.submit(P.Interrupt(h=P.InHeader(unique=target | 1), unique=target))
        gate.set()
        await w.d.drain()
        assert await _one_reply(w, target) == 0  # the write landed: say so


async def test_lookup_miss_without_entry_cache_is_enoent(tmp_path):
    async with running(tmp_path, cache="never") as fs:
        w = Wire(Dispatcher(fs))
        await w.init()
        error, _ = await w.call(P.Lookup(h=H(), name=b"missing"))
        assert error == -errno.ENOENT
