"""Property test: random op sequences through actorfs and the same syscalls on a
plain directory give the same results and errnos, and the inode table ends
consistent (forget everything -> only the root is left, no fd left open)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actorfs.runtime.core.attrs import NegativeEntry
from actorfs.runtime.core.errno_map import linux_errno_of
from tests.support.helpers_fs import CTX, ROOT, ops, running

# Each test runs with syscalls in the pool and inline (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("syscall_mode")

NAMES = ["a", "b", "c"]
# mknod kinds: (file type, rdev); device nodes need CAP_MKNOD
NODES = [(stat.S_IFIFO, 0), (stat.S_IFSOCK, 0)]
if os.geteuid() == 0:
    NODES += [(stat.S_IFCHR, 0), (stat.S_IFCHR, os.makedev(1, 3)), (stat.S_IFBLK, os.makedev(7, 200))]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=2).map(tuple)
data = st.binary(min_size=1, max_size=64)
op = st.one_of(
    st.tuples(st.just("create"), paths, data),
    st.tuples(st.just("mkdir"), paths),
    st.tuples(st.just("unlink"), paths),
    st.tuples(st.just("rmdir"), paths),
    st.tuples(st.just("rename"), paths, paths),
    st.tuples(st.just("read"), paths),
    st.tuples(st.just("stat"), paths),
    # Any target: inside, absolute, leaving the root, dangling (opaque serves them all).
    st.tuples(st.just("symlink"), paths, st.sampled_from(NAMES + ["a/b", "/usr/bin/python3", "../../x", "nowhere"])),
    st.tuples(st.just("readlink"), paths),
    st.tuples(st.just("mknod"), paths, st.sampled_from(NODES)),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("list"), paths),
    st.tuples(st.just("append"), paths, data),
)


class Native:
    """The same operations with plain syscalls, resolving paths without following symlinks."""

    def __init__(self, root: str):
        self.root = root

    def parent_fd(self, path):
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
        try:
            for comp in path[:-1]:
                st_ = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st_.st_mode):
                    raise OSError(errno.ENOTDIR, "not a dir")
                nfd = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def run(self, o):
        kind, path = o[0], o[1]
        pfd = self.parent_fd(path)
        name = path[-1]
        try:
            if kind == "create":
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=pfd)
                os.write(fd, o[2])
                os.close(fd)
                return None
            if kind == "append":
                self.check_file(pfd, name)
                fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW, dir_fd=pfd)
                os.write(fd, o[2])
                os.close(fd)
                return None
            if kind == "mkdir":
                return os.mkdir(name, 0o755, dir_fd=pfd)
            if kind == "unlink":
                return os.unlink(name, dir_fd=pfd)
            if kind == "rmdir":
                return os.rmdir(name, dir_fd=pfd)
            if kind == "symlink":
                return os.symlink(o[2], name, dir_fd=pfd)
            if kind == "readlink":
                return os.fsencode(os.readlink(name, dir_fd=pfd))
            if kind == "mknod":
                return os.mknod(name, o[2][0] | 0o644, o[2][1], dir_fd=pfd)
            if kind in ("rename", "link"):
                if kind == "link":  # the client looks the source up first
                    st_ = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                qfd = self.parent_fd(o[2])
                try:
                    if kind == "rename":
                        return os.rename(name, o[2][-1], src_dir_fd=pfd, dst_dir_fd=qfd)
                    if stat.S_ISDIR(st_.st_mode):
                        raise OSError(errno.EPERM, "dir")
                    return os.link(name, o[2][-1], src_dir_fd=pfd, dst_dir_fd=qfd, follow_symlinks=False)
                finally:
                    os.close(qfd)
            if kind == "read":
                self.check_file(pfd, name)
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=pfd)
                try:
                    return os.read(fd, 1 << 16)
                finally:
                    os.close(fd)
            if kind == "stat":
                st_ = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                isdir = stat.S_ISDIR(st_.st_mode)
                return (stat.S_IFMT(st_.st_mode), 0 if isdir else st_.st_size, 0 if isdir else st_.st_nlink, st_.st_rdev)
            if kind == "list":
                st_ = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st_.st_mode):
                    raise OSError(errno.ENOTDIR, "not a dir")
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=pfd)
                try:
                    return sorted(os.fsencode(n) for n in os.listdir(fd))
                finally:
                    os.close(fd)
        finally:
            os.close(pfd)
        raise AssertionError(kind)

    @staticmethod
    def check_file(pfd, name):
        st_ = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st_.st_mode):
            raise OSError(errno.EISDIR, "dir")
        if stat.S_ISLNK(st_.st_mode):
            raise OSError(errno.ELOOP, "link")
        if not stat.S_ISREG(st_.st_mode):
            raise OSError(errno.ENXIO, "special file")  # the server never opens one


class Served:
    def __init__(self, fs):
        self.fs = fs
        self.lookups: dict[int, int] = {}

    def count(self, nodeid):
        self.lookups[nodeid] = self.lookups.get(nodeid, 0) + 1

    async def lookup(self, parent, name):
        e = await ops.lookup(self.fs, CTX, parent, os.fsencode(name))
        if isinstance(e, NegativeEntry):  # a miss the client may cache: what ENOENT is natively
            raise OSError(errno.ENOENT, "negative entry")
        self.count(e.nodeid)
        return e

    async def parent(self, path):
        nodeid = ROOT
        for comp in path[:-1]:
            e = await self.lookup(nodeid, comp)
            if not stat.S_ISDIR(e.attr.mode):
                raise OSError(errno.ENOTDIR, "not a dir")
            nodeid = e.nodeid
        return nodeid

    async def run(self, o):
        fs = self.fs
        kind, path = o[0], o[1]
        p = await self.parent(path)
        name = os.fsencode(path[-1])
        if kind == "create":
            e, h = await ops.create(fs, CTX, p, name, 0o644, os.O_RDWR | os.O_EXCL, 0)
            self.count(e.nodeid)
            await ops.write(fs, CTX, e.nodeid, h.fh, 0, o[2])
            await ops.release(fs, CTX, e.nodeid, h.fh)
            return None
        if kind == "mkdir":
            self.count((await ops.mkdir(fs, CTX, p, name, 0o755, 0)).nodeid)
            return None
        if kind == "unlink":
            return await ops.unlink(fs, CTX, p, name)
        if kind == "rmdir":
            return await ops.rmdir(fs, CTX, p, name)
        if kind == "symlink":
            self.count((await ops.symlink(fs, CTX, p, name, os.fsencode(o[2]))).nodeid)
            return None
        if kind == "mknod":
            self.count((await ops.mknod(fs, CTX, p, name, o[2][0] | 0o644, o[2][1], 0)).nodeid)
            return None
        if kind == "rename":
            q = await self.parent(o[2])
            return await ops.rename(fs, CTX, p, name, q, os.fsencode(o[2][-1]))
        if kind == "link":
            e = await self.lookup(p, path[-1])
            q = await self.parent(o[2])
            self.count((await ops.link(fs, CTX, e.nodeid, q, os.fsencode(o[2][-1]))).nodeid)
            return None
        e = await self.lookup(p, path[-1])
        if kind in ("read", "append"):
            if stat.S_ISDIR(e.attr.mode):
                raise OSError(errno.EISDIR, "dir")
            if stat.S_ISLNK(e.attr.mode):
                raise OSError(errno.ELOOP, "link")
            flags = os.O_RDONLY if kind == "read" else os.O_WRONLY | os.O_APPEND
            h = await ops.open(fs, CTX, e.nodeid, flags)
            try:
                if kind == "read":
                    return await ops.read(fs, CTX, e.nodeid, h.fh, 0, 1 << 16)
                await ops.write(fs, CTX, e.nodeid, h.fh, 0, o[2])
                return None
            finally:
                await ops.release(fs, CTX, e.nodeid, h.fh)
        if kind == "stat":
            a = await ops.getattr(fs, CTX, e.nodeid)
            isdir = stat.S_ISDIR(a.mode)
            return (stat.S_IFMT(a.mode), 0 if isdir else a.size, 0 if isdir else a.nlink, a.rdev)
        if kind == "readlink":
            return await ops.readlink(fs, CTX, e.nodeid)
        if kind == "list":
            if not stat.S_ISDIR(e.attr.mode):
                raise OSError(errno.ENOTDIR, "not a dir")
            h = await ops.opendir(fs, CTX, e.nodeid)
            try:
                ents = await ops.readdir(fs, CTX, e.nodeid, h.fh, 0, 1 << 20)
            finally:
                await ops.releasedir(fs, CTX, e.nodeid, h.fh)
            return sorted(x.name for x in ents if x.name not in (b".", b".."))
        raise AssertionError(kind)


async def _outcome(coro):
    try:
        return ("ok", await coro)
    except Exception as exc:  # noqa: BLE001
        return ("err", linux_errno_of(exc))


def _native_outcome(native, o):
    try:
        return ("ok", native.run(o))
    except OSError as exc:
        return ("err", exc.errno)


async def _check(sequence):
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        native = Native(b)
        fds_before = set(os.listdir("/proc/self/fd"))
        async with running(a) as fs:
            served = Served(fs)
            for o in sequence:
                want = _native_outcome(native, o)
                got = await _outcome(served.run(o))
                assert got == want, (o, got, want)
            await ops.batch_forget(fs, list(served.lookups.items()))
            counts = await fs.inodes.counts()
            assert counts["inodes"] == 1, counts
            assert await fs.handles.count() == 0
        # no new fd (an older one from another test may be collected meanwhile)
        assert set(os.listdir("/proc/self/fd")) <= fds_before


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=25))
def test_random_op_sequences_match_a_plain_directory(sequence):
    asyncio.run(_check(sequence))
