"""Each op beneath a root, with the errnos a Linux client expects."""

from __future__ import annotations

import errno
import os
import stat
import sys

import pytest

from actorfs.runtime.core.abi import (
    FATTR_ATIME_NOW,
    FATTR_GID,
    FATTR_MTIME_NOW,
    FATTR_UID,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    direntplus_size,
)
from actorfs.runtime.core.attrs import Entry, NegativeEntry, RequestContext, SetattrArgs, XattrReply
from actorfs.runtime.host.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE
from tests.support.helpers_fs import CTX, ROOT, errno_of, ops, running

# Each test runs with syscalls in the pool and inline (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("syscall_mode")


async def test_name_too_long_and_bad_names_everywhere(tmp_path):
    async with running(tmp_path) as fs:
        long = b"x" * 256
        assert await errno_of(ops.lookup(fs, CTX, ROOT, long)) == errno.ENAMETOOLONG
        assert await errno_of(ops.mkdir(fs, CTX, ROOT, long, 0o755)) == errno.ENAMETOOLONG
        for bad in (b"", b".", b"..", b"a/b", b"a\0"):
            assert await errno_of(ops.mkdir(fs, CTX, ROOT, bad, 0o755)) == errno.EINVAL
            assert await errno_of(ops.create(fs, CTX, ROOT, bad, 0o644, os.O_RDWR)) == errno.EINVAL
            assert await errno_of(ops.unlink(fs, CTX, ROOT, bad)) == errno.EINVAL
            assert await errno_of(ops.rename(fs, CTX, ROOT, bad, ROOT, b"ok")) == errno.EINVAL
        # a 255-byte name is fine
        await ops.mkdir(fs, CTX, ROOT, b"y" * 255, 0o755)
    assert (tmp_path / ("y" * 255)).is_dir()


async def test_unknown_nodeid_is_enoent_and_unknown_fh_is_ebadf(tmp_path):
    async with running(tmp_path) as fs:
        assert await errno_of(ops.getattr(fs, CTX, 12345)) == errno.ENOENT
        assert await errno_of(ops.lookup(fs, CTX, 12345, b"x")) == errno.ENOENT
        assert await errno_of(ops.open(fs, CTX, 12345, os.O_RDONLY)) == errno.ENOENT
        for coro in (
            ops.read(fs, CTX, ROOT, 777, 0, 10),
            ops.write(fs, CTX, ROOT, 777, 0, b"x"),
            ops.flush(fs, CTX, ROOT, 777),
            ops.fsync(fs, CTX, ROOT, 777, False),
            ops.release(fs, CTX, ROOT, 777),
            ops.releasedir(fs, CTX, ROOT, 777),
            ops.fsyncdir(fs, CTX, ROOT, 777, False),
            ops.readdir(fs, CTX, ROOT, 777, 0, 4096),
            ops.getattr(fs, CTX, ROOT, 777),
        ):
            assert await errno_of(coro) == errno.EBADF
        # a directory fh is not a file fh and vice versa
        d = await ops.opendir(fs, CTX, ROOT)
        assert await errno_of(ops.read(fs, CTX, ROOT, d.fh, 0, 1)) == errno.EBADF
        # a released fh is gone for good
        await ops.releasedir(fs, CTX, ROOT, d.fh)
        assert await errno_of(ops.releasedir(fs, CTX, ROOT, d.fh)) == errno.EBADF


async def test_create_is_exclusive_and_applies_mode_and_umask(tmp_path):
    async with running(tmp_path) as fs:
        e, o = await ops.create(fs, CTX, ROOT, b"f", 0o666, os.O_RDWR | os.O_EXCL, 0o027)
        assert e.attr.mode & 0o777 == 0o640
        assert stat.S_ISREG(e.attr.mode)
        assert await errno_of(
            ops.create(fs, CTX, ROOT, b"f", 0o644, os.O_RDWR | os.O_EXCL, 0)
        ) == errno.EEXIST
        await ops.write(fs, CTX, e.nodeid, o.fh, 0, b"abc")
    assert (tmp_path / "f").read_bytes() == b"abc"
    assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o640


async def test_open_honours_trunc_append_and_access_mode(tmp_path):
    (tmp_path / "f").write_bytes(b"0123456789")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        ro = await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
        assert await errno_of(ops.write(fs, CTX, e.nodeid, ro.fh, 0, b"x")) == errno.EBADF
        ap = await ops.open(fs, CTX, e.nodeid, os.O_WRONLY | os.O_APPEND)
        await ops.write(fs, CTX, e.nodeid, ap.fh, 0, b"AB")
        assert (tmp_path / "f").read_bytes() == b"0123456789AB"
        await ops.open(fs, CTX, e.nodeid, os.O_WRONLY | os.O_TRUNC)
        assert (tmp_path / "f").read_bytes() == b""
        # OPEN never creates, even when asked to
        await ops.open(fs, CTX, e.nodeid, os.O_RDWR | os.O_CREAT | os.O_EXCL)


async def test_cache_modes_set_open_flags(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    for cache, flag, timeout in (("never", FOPEN_DIRECT_IO, 0), ("always", FOPEN_KEEP_CACHE, 86400)):
        async with running(tmp_path, cache=cache) as fs:
            e = await ops.lookup(fs, CTX, ROOT, b"f")
            assert e.entry_valid == timeout and e.attr_valid == timeout
            o = await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
            assert o.open_flags & flag


async def test_mkdir_mknod_kinds(tmp_path):
    async with running(tmp_path) as fs:
        d = await ops.mkdir(fs, CTX, ROOT, b"d", 0o777, 0o022)
        assert stat.S_ISDIR(d.attr.mode) and d.attr.mode & 0o777 == 0o755
        f = await ops.mknod(fs, CTX, ROOT, b"fifo", stat.S_IFIFO | 0o644, 0, 0)
        assert stat.S_ISFIFO(f.attr.mode)
        s = await ops.mknod(fs, CTX, ROOT, b"sock", stat.S_IFSOCK | 0o644, 0, 0)
        assert stat.S_ISSOCK(s.attr.mode)
        r = await ops.mknod(fs, CTX, ROOT, b"reg", stat.S_IFREG | 0o600, 0, 0)
        assert stat.S_ISREG(r.attr.mode)
        assert await errno_of(ops.mkdir(fs, CTX, ROOT, b"d", 0o755)) == errno.EEXIST
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need CAP_MKNOD")
async def test_mknod_devices_and_no_devices(tmp_path):
    """Device nodes are made as the host would (root here); --no-devices refuses
    them but for the overlayfs whiteout c 0 0."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running(tmp_path / "a") as fs:
        c = await ops.mknod(fs, CTX, ROOT, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0)
        assert stat.S_ISCHR(c.attr.mode) and c.attr.rdev == os.makedev(1, 3)
        b = await ops.mknod(fs, CTX, ROOT, b"blk", stat.S_IFBLK | 0o600, os.makedev(7, 200), 0)
        assert stat.S_ISBLK(b.attr.mode)
        w = await ops.mknod(fs, CTX, ROOT, b"wh", stat.S_IFCHR, 0, 0)
        assert stat.S_ISCHR(w.attr.mode) and w.attr.rdev == 0
        # the server never opens a device node, even when a client asks
        assert await errno_of(ops.open(fs, CTX, c.nodeid, os.O_RDONLY)) == errno.ENXIO
    assert os.lstat(tmp_path / "a" / "null").st_rdev == os.makedev(1, 3)
    async with running(tmp_path / "b", devices=False) as fs:
        for name, mode, rdev in ((b"null", stat.S_IFCHR, os.makedev(1, 3)),
                                 (b"blk", stat.S_IFBLK, os.makedev(7, 200))):  # fmt: skip
            assert await errno_of(ops.mknod(fs, CTX, ROOT, name, mode | 0o600, rdev)) == errno.EPERM
        w = await ops.mknod(fs, CTX, ROOT, b"wh", stat.S_IFCHR, 0, 0)
        assert stat.S_ISCHR(w.attr.mode)
        await ops.mknod(fs, CTX, ROOT, b"p", stat.S_IFIFO | 0o600, 0, 0)
    assert sorted(os.listdir(tmp_path / "b")) == ["p", "wh"]


async def test_symlink_target_rules(tmp_path):
    async with running(tmp_path) as fs:
        assert await errno_of(ops.symlink(fs, CTX, ROOT, b"l", b"")) == errno.EINVAL
        assert await errno_of(ops.symlink(fs, CTX, ROOT, b"l", b"a\0b")) == errno.EINVAL
        e = await ops.symlink(fs, CTX, ROOT, b"l", b"../../x y/\xff")
        assert await ops.readlink(fs, CTX, e.nodeid) == b"../../x y/\xff"
        f, _ = await ops.create(fs, CTX, ROOT, b"f", 0o644, os.O_RDWR)
        assert await errno_of(ops.readlink(fs, CTX, f.nodeid)) == errno.EINVAL
    assert not os.path.lexists(tmp_path / "x y")


async def test_link_of_symlink_links_the_symlink_itself(tmp_path):
    (tmp_path / "target").write_text("t")
    os.symlink("target", tmp_path / "sym")
    async with running(tmp_path) as fs:
        s = await ops.lookup(fs, CTX, ROOT, b"sym")
        n = await ops.link(fs, CTX, s.nodeid, ROOT, b"sym2")
        assert stat.S_ISLNK(n.attr.mode)
        d = await ops.mkdir(fs, CTX, ROOT, b"dir", 0o755)
        assert await errno_of(ops.link(fs, CTX, d.nodeid, ROOT, b"dir2")) == errno.EPERM
    assert os.readlink(tmp_path / "sym2") == "target"
    assert os.lstat(tmp_path / "sym").st_ino == os.lstat(tmp_path / "sym2").st_ino


async def test_rename_noreplace_and_exchange(tmp_path):
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    async with running(tmp_path) as fs:
        a = await ops.lookup(fs, CTX, ROOT, b"a")
        b = await ops.lookup(fs, CTX, ROOT, b"b")
        assert await errno_of(ops.rename(fs, CTX, ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE)) == errno.EEXIST
        await ops.rename(fs, CTX, ROOT, b"a", ROOT, b"b", RENAME_EXCHANGE)
        assert await fs.inodes.child(ROOT, b"a") == b.nodeid
        assert await fs.inodes.child(ROOT, b"b") == a.nodeid
        await ops.rename(fs, CTX, ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE)
        # rename over an existing name drops the replaced name from the cache
        await ops.rename(fs, CTX, ROOT, b"c", ROOT, b"b")
        assert await fs.inodes.child(ROOT, b"b") == b.nodeid
        assert await fs.inodes.child(ROOT, b"c") is None
    assert (tmp_path / "b").read_text() == "B"
    assert sorted(os.listdir(tmp_path)) == ["b"]


async def test_rename_dir_updates_descendant_paths(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_text("x")
    async with running(tmp_path) as fs:
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        e = await ops.lookup(fs, CTX, d.nodeid, b"e")
        f = await ops.lookup(fs, CTX, e.nodeid, b"f")
        await ops.rename(fs, CTX, ROOT, b"d", ROOT, b"moved")
        root = os.fsencode(os.path.realpath(tmp_path))
        assert (await fs.inodes.info(f.nodeid))[1] == root + b"/moved/e/f"
        assert await fs.inodes.child(ROOT, b"moved") == d.nodeid
        assert await fs.inodes.child(ROOT, b"d") is None
        # the held nodeids still reach the moved objects
        assert (await ops.getattr(fs, CTX, f.nodeid)).size == 1


async def test_unlink_and_rmdir_update_the_name_cache(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    async with running(tmp_path) as fs:
        f = await ops.lookup(fs, CTX, ROOT, b"f")
        await ops.lookup(fs, CTX, ROOT, b"d")
        o = await ops.open(fs, CTX, f.nodeid, os.O_RDWR)
        await ops.unlink(fs, CTX, ROOT, b"f")
        await ops.rmdir(fs, CTX, ROOT, b"d")
        assert await fs.inodes.child(ROOT, b"f") is None
        assert await fs.inodes.child(ROOT, b"d") is None
        # an open unlinked file is still usable, as POSIX says
        await ops.write(fs, CTX, f.nodeid, o.fh, 0, b"still here")
        assert await ops.read(fs, CTX, f.nodeid, o.fh, 0, 100) == b"still here"
        assert (await ops.getattr(fs, CTX, f.nodeid)).nlink == 0
        assert await ops.lookup(fs, CTX, ROOT, b"f") == NegativeEntry(1.0)  # a miss
        assert await errno_of(ops.unlink(fs, CTX, ROOT, b"f")) == errno.ENOENT


async def test_hard_links_share_one_nodeid_and_lookup_counts(tmp_path):
    (tmp_path / "a").write_text("x")
    os.link(tmp_path / "a", tmp_path / "b")
    async with running(tmp_path) as fs:
        a = await ops.lookup(fs, CTX, ROOT, b"a")
        b = await ops.lookup(fs, CTX, ROOT, b"b")
        assert a.nodeid == b.nodeid
        assert a.nodeid > ROOT
        c = await fs.inodes.counts()
        assert c["inodes"] == 2 and c["lookups"] == 3  # root + 2 lookups
        await ops.forget(fs, a.nodeid, 1)
        assert (await fs.inodes.counts())["inodes"] == 2
        await ops.forget(fs, a.nodeid, 1)
        assert (await fs.inodes.counts())["inodes"] == 1
        # forgotten nodeids are never reused
        again = await ops.lookup(fs, CTX, ROOT, b"a")
        assert again.nodeid > a.nodeid
        # forgetting the root, unknown nodeids or too much is harmless
        await ops.forget(fs, ROOT, 100)
        await ops.forget(fs, 999_999, 1)
        await ops.batch_forget(fs, [(again.nodeid, 50), (424242, 1)])
        assert (await fs.inodes.counts())["inodes"] == 1
        assert (await ops.getattr(fs, CTX, ROOT)).mode & stat.S_IFDIR


async def test_forget_everything_leaves_only_root_and_no_fds(tmp_path):
    for i in range(20):
        (tmp_path / f"f{i}").write_text(str(i))
    (tmp_path / "sub").mkdir()
    before = set(os.listdir("/proc/self/fd"))
    async with running(tmp_path) as fs:
        d = await ops.opendir(fs, CTX, ROOT)
        plus = await ops.readdirplus(fs, CTX, ROOT, d.fh, 0, 1 << 20)
        await ops.releasedir(fs, CTX, ROOT, d.fh)
        counted = [(p.entry.nodeid, 1) for p in plus if p.entry.nodeid]
        assert len(counted) == 21
        await ops.batch_forget(fs, counted)
        assert (await fs.inodes.counts())["inodes"] == 1
        assert await fs.handles.count() == 0
    assert set(os.listdir("/proc/self/fd")) <= before  # no new fd


async def test_readdir_offsets_are_stable_while_the_directory_changes(tmp_path):
    names = {f"n{i:03}" for i in range(100)}
    for n in names:
        (tmp_path / n).write_text("")
    async with running(tmp_path) as fs:
        d = await ops.opendir(fs, CTX, ROOT)
        seen, off = [], 0
        while True:
            batch = await ops.readdir(fs, CTX, ROOT, d.fh, off, 200)  # a few entries per call
            if not batch:
                break
            seen += [x.name for x in batch]
            off = batch[-1].off
            # the host directory changes between calls
            (tmp_path / f"new{off}").write_text("")
            victim = tmp_path / f"n{off:03}"
            if victim.exists():
                victim.unlink()
        assert seen.count(b".") == seen.count(b"..") == 1  # in the host's order
        assert len(seen) == len(set(seen))  # nothing repeated
        assert {os.fsencode(n) for n in names} <= set(seen)  # nothing skipped
        # a rewind (offset 0) reads the directory afresh
        fresh = await ops.readdir(fs, CTX, ROOT, d.fh, 0, 1 << 20)
        assert any(x.name.startswith(b"new") for x in fresh)


async def test_readdirplus_counts_only_entries_that_fit(tmp_path):
    for i in range(10):
        (tmp_path / f"file{i}").write_text("x")
    async with running(tmp_path) as fs:
        d = await ops.opendir(fs, CTX, ROOT)
        size = 5 * direntplus_size(5)  # room for five entries at most (host order)
        first = await ops.readdirplus(fs, CTX, ROOT, d.fh, 0, size)
        assert 5 <= len(first) <= 7  # "." and ".." are smaller records
        dots = [p for p in first if p.dirent.name in (b".", b"..")]
        files = [p for p in first if p.dirent.name not in (b".", b"..")]
        assert all(p.entry.nodeid == 0 for p in dots)
        assert all(p.entry.nodeid > ROOT for p in files)
        assert (await fs.inodes.counts())["lookups"] == 1 + len(files)
        rest = await ops.readdirplus(fs, CTX, ROOT, d.fh, first[-1].dirent.off, 1 << 16)
        names = [p.dirent.name for p in first + rest]
        assert sorted(names) == sorted([b".", b".."] + [b"file%d" % i for i in range(10)])
        assert (await fs.inodes.counts())["lookups"] == 1 + 10


async def test_xattrs_like_linux(tmp_path):
    (tmp_path / "f").write_text("x")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        await ops.setxattr(fs, CTX, e.nodeid, b"user.k", b"value", 0)
        assert await ops.getxattr(fs, CTX, e.nodeid, b"user.k", 0) == XattrReply(5)  # size probe
        assert await ops.getxattr(fs, CTX, e.nodeid, b"user.k", 5) == XattrReply(5, b"value")
        assert await errno_of(ops.getxattr(fs, CTX, e.nodeid, b"user.k", 2)) == errno.ERANGE
        assert await errno_of(ops.getxattr(fs, CTX, e.nodeid, b"user.none", 10)) == errno.ENODATA
        names = (await ops.listxattr(fs, CTX, e.nodeid, 1024)).value
        assert b"user.k\0" in names
        assert await ops.listxattr(fs, CTX, e.nodeid, 0) == XattrReply(len(names))
        assert await errno_of(ops.listxattr(fs, CTX, e.nodeid, 1)) == errno.ERANGE
        assert await errno_of(ops.setxattr(fs, CTX, e.nodeid, b"user.k", b"v", 1)) == errno.EEXIST
        assert await errno_of(ops.setxattr(fs, CTX, e.nodeid, b"user.z", b"v", 2)) == errno.ENODATA
        await ops.removexattr(fs, CTX, e.nodeid, b"user.k")
        assert await errno_of(ops.removexattr(fs, CTX, e.nodeid, b"user.k")) == errno.ENODATA
    assert os.listxattr(tmp_path / "f") == []


async def test_fallocate_lseek_data_hole_and_copy_file_range(tmp_path):
    async with running(tmp_path) as fs:
        e, o = await ops.create(fs, CTX, ROOT, b"sparse", 0o644, os.O_RDWR)
        await ops.write(fs, CTX, e.nodeid, o.fh, 1 << 20, b"data")
        assert await ops.lseek(fs, CTX, e.nodeid, o.fh, 0, os.SEEK_DATA) == 1 << 20
        assert await ops.lseek(fs, CTX, e.nodeid, o.fh, 0, os.SEEK_HOLE) == 0
        assert await errno_of(ops.lseek(fs, CTX, e.nodeid, o.fh, 0, 99)) == errno.EINVAL
        await ops.fallocate(fs, CTX, e.nodeid, o.fh, 0, 8192, 0)
        assert (await ops.getattr(fs, CTX, e.nodeid)).blocks >= 16
        d, od = await ops.create(fs, CTX, ROOT, b"copy", 0o644, os.O_RDWR)
        n = await ops.copy_file_range(fs, CTX, e.nodeid, o.fh, 1 << 20, d.nodeid, od.fh, 0, 4)
        assert n == 4
    assert (tmp_path / "copy").read_bytes() == b"data"


async def test_fsync_statfs_access(tmp_path):
    (tmp_path / "f").write_text("x")
    os.chmod(tmp_path / "f", 0o640)
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        o = await ops.open(fs, CTX, e.nodeid, os.O_RDWR)
        await ops.fsync(fs, CTX, e.nodeid, o.fh, True)
        await ops.fsync(fs, CTX, e.nodeid, o.fh, False)
        s = await ops.statfs(fs, CTX, ROOT)
        assert s.bsize > 0 and s.namelen == 255 and s.blocks > 0
        other = RequestContext(uid=4242, gid=4242)
        await ops.access(fs, CTX, e.nodeid, os.R_OK | os.W_OK)
        assert await errno_of(ops.access(fs, other, e.nodeid, os.R_OK)) == errno.EACCES
        await ops.access(fs, other, e.nodeid, os.F_OK)


async def test_setattr_never_follows_symlinks_and_now_forms(tmp_path):
    (tmp_path / "target").write_text("t")
    os.chmod(tmp_path / "target", 0o644)
    os.utime(tmp_path / "target", (1000, 1000))
    os.symlink("target", tmp_path / "sym")
    async with running(tmp_path) as fs:
        s = await ops.lookup(fs, CTX, ROOT, b"sym")
        a = await ops.setattr(fs, CTX, s.nodeid, SetattrArgs(FATTR_ATIME_NOW | FATTR_MTIME_NOW))
        assert stat.S_ISLNK(a.mode) and a.mtime > 1000
        assert await errno_of(ops.setattr(fs, CTX, s.nodeid, SetattrArgs(1, mode=0o600))) == errno.EOPNOTSUPP
    assert os.stat(tmp_path / "target").st_mtime == 1000
    assert os.stat(tmp_path / "target").st_mode & 0o777 == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")
async def test_root_server_gives_new_objects_to_the_requester(tmp_path):
    os.chmod(tmp_path, 0o777)
    who = RequestContext(uid=1234, gid=2345)
    async with running(tmp_path) as fs:
        f, _ = await ops.create(fs, who, ROOT, b"f", 0o644, os.O_RDWR)
        d = await ops.mkdir(fs, who, ROOT, b"d", 0o755)
        n = await ops.mknod(fs, who, ROOT, b"p", stat.S_IFIFO | 0o644)
        s = await ops.symlink(fs, who, ROOT, b"s", b"f")
        for e in (f, d, n, s):
            assert (e.attr.uid, e.attr.gid) == (1234, 2345)
        # setgid directory: the group comes from the directory
        os.chown(tmp_path / "d", 1234, 777)
        os.chmod(tmp_path / "d", 0o2775)
        g = await ops.mkdir(fs, who, d.nodeid, b"g", 0o755)
        assert (g.attr.uid, g.attr.gid) == (1234, 777)
        a = await ops.setattr(fs, CTX, f.nodeid, SetattrArgs(FATTR_UID | FATTR_GID, uid=5, gid=6))
        assert (a.uid, a.gid) == (5, 6)
    st = os.lstat(tmp_path / "s")
    assert (st.st_uid, st.st_gid) == (1234, 2345)


async def test_read_only_config_refuses_changes(tmp_path):
    (tmp_path / "f").write_text("x")
    async with running(tmp_path, read_only=True) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        assert await errno_of(ops.open(fs, CTX, e.nodeid, os.O_RDWR)) == errno.EROFS
        assert await errno_of(ops.mkdir(fs, CTX, ROOT, b"d", 0o755)) == errno.EROFS
        assert await errno_of(ops.unlink(fs, CTX, ROOT, b"f")) == errno.EROFS
        o = await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
        assert await ops.read(fs, CTX, e.nodeid, o.fh, 0, 10) == b"x"
    assert (tmp_path / "f").exists()


async def test_hostile_sizes_and_offsets_get_errnos(tmp_path):
    (tmp_path / "f").write_text("x")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        o = await ops.open(fs, CTX, e.nodeid, os.O_RDWR)
        assert await ops.read(fs, CTX, e.nodeid, o.fh, 0, 2**32 - 1) == b"x"
        assert await errno_of(ops.read(fs, CTX, e.nodeid, o.fh, 2**64 - 1, 10)) == errno.EINVAL
        assert await errno_of(ops.write(fs, CTX, e.nodeid, o.fh, 2**63, b"x")) in (errno.EINVAL, errno.EFBIG)
        assert await errno_of(ops.fallocate(fs, CTX, e.nodeid, o.fh, 0, 2**63 - 1, 0)) in (
            errno.EFBIG, errno.ENOSPC, errno.EINVAL,
        )  # fmt: skip


@pytest.mark.timeout(20)
async def test_fifo_never_hangs_open_or_create(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"fifo")
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            assert await errno_of(ops.open(fs, CTX, e.nodeid, flags)) == errno.ENXIO
        # CREATE without O_EXCL meeting an existing FIFO (a stale negative dentry)
        assert await errno_of(ops.create(fs, CTX, ROOT, b"fifo", 0o644, os.O_WRONLY)) == errno.ENXIO
        assert await fs.handles.count() == 0


async def test_create_without_excl_opens_a_file_created_on_the_host(tmp_path):
    async with running(tmp_path) as fs:
        (tmp_path / "f").write_bytes(b"host")
        e, o = await ops.create(fs, CTX, ROOT, b"f", 0o600, os.O_RDWR, 0)
        assert await ops.read(fs, CTX, e.nodeid, o.fh, 0, 10) == b"host"
        assert e.attr.size == 4


async def test_destroy_resets_the_session(tmp_path):
    (tmp_path / "f").write_text("x")
    before = set(os.listdir("/proc/self/fd"))
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
        await ops.opendir(fs, CTX, ROOT)
        await fs.reset_session()
        assert (await fs.inodes.counts())["inodes"] == 1
        assert await fs.handles.count() == 0
        assert await errno_of(ops.getattr(fs, CTX, e.nodeid)) == errno.ENOENT
        again = await ops.lookup(fs, CTX, ROOT, b"f")
        assert again.nodeid > e.nodeid
        await ops.forget(fs, again.nodeid, 1)
    assert set(os.listdir("/proc/self/fd")) <= before  # no new fd


async def test_mkdir_refused_at_the_inode_cap_leaks_no_watcher_fd(tmp_path):
    # With the watcher on, mkdir dups the new directory's fd for it before the
    # inode table registers the directory; a refusal (the inode cap) must close
    # that dup too, as lookup does, not only the table's fd.
    async with running(tmp_path, watch=True, max_inodes=2) as fs:
        await ops.mkdir(fs, CTX, ROOT, b"a", 0o755)
        before = set(os.listdir("/proc/self/fd"))
        for name in (b"b", b"c", b"d"):
            assert await errno_of(ops.mkdir(fs, CTX, ROOT, name, 0o755)) == errno.EMFILE
        assert set(os.listdir("/proc/self/fd")) <= before  # no new fd


@pytest.mark.parametrize("op", ["open", "create", "mkdir"])
async def test_a_failed_watcher_dup_leaks_no_fd(tmp_path, monkeypatch, op):
    # Under fd pressure (EMFILE, which the dispatcher answers by evicting and
    # running the op again) the dup for the watcher can fail: the fd it dups,
    # not yet handed to a pool job or the inode table, must be closed.
    (tmp_path / "f").write_text("x")
    async with running(tmp_path, watch=True) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        real_dup = os.dup

        def dup(fd):
            if sys._getframe(1).f_globals.get("__name__") == ops.__name__:
                raise OSError(errno.EMFILE, "out of fds (test)")
            return real_dup(fd)

        before = set(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(os, "dup", dup)
        if op == "open":
            coro = ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
        elif op == "create":
            coro = ops.create(fs, CTX, ROOT, b"new", 0o644, os.O_RDWR)
        else:
            coro = ops.mkdir(fs, CTX, ROOT, b"dir", 0o755)
        assert await errno_of(coro) == errno.EMFILE
        monkeypatch.setattr(os, "dup", real_dup)
        assert set(os.listdir("/proc/self/fd")) <= before  # no new fd
        assert (await fs.inodes.counts())["fds_pinned"] == 0


@pytest.mark.parametrize("cache,timeout", [("auto", 1.0), ("always", 86400.0), ("never", 0.0)])
async def test_a_missing_name_is_a_negative_entry_for_the_entry_timeout(tmp_path, cache, timeout):
    # The op layer decides: a miss the client may cache is a NegativeEntry that
    # lasts the entry timeout; without entry caching, ENOENT.
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    async with running(tmp_path, cache=cache) as fs:
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        for parent, name in ((ROOT, b"missing"), (d.nodeid, b"nor-here")):
            if timeout:
                neg = await ops.lookup(fs, CTX, parent, name)
                assert neg == NegativeEntry(timeout) and neg.entry_valid == fs.config.entry_timeout
                assert not hasattr(neg, "nodeid")  # nothing to count or forget
            else:
                assert await errno_of(ops.lookup(fs, CTX, parent, name)) == errno.ENOENT
        # A miss adds no lookup and no inode; other errors stay errors.
        assert (await fs.inodes.counts())["lookups"] == 2  # the root's and d's
        assert await errno_of(ops.lookup(fs, CTX, 12345, b"x")) == errno.ENOENT  # unknown parent
        f = await ops.lookup(fs, CTX, ROOT, b"f")
        assert await errno_of(ops.lookup(fs, CTX, f.nodeid, b"x")) == errno.ENOTDIR
        assert await errno_of(ops.lookup(fs, CTX, ROOT, b"a/b")) == errno.EINVAL
        # READDIRPLUS never meets a miss as an entry: a name gone meanwhile is a plain dirent.
        h = await ops.opendir(fs, CTX, ROOT)
        plus = await ops.readdirplus(fs, CTX, ROOT, h.fh, 0, 1 << 16)
        await ops.releasedir(fs, CTX, ROOT, h.fh)
        assert plus and all(type(p.entry) is Entry for p in plus)
