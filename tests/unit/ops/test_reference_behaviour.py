"""The reference backend's test module (docs/DESIGN.md: the Rust passthrough backend
of virtiofsd), re-expressed against actorfs's op layer."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from actorfs.runtime.core.abi import FATTR_FH, FATTR_MODE, FATTR_MTIME, FATTR_SIZE
from actorfs.runtime.core.attrs import DT_DIR, DT_REG, SetattrArgs
from actorfs.runtime.core.errno_map import FsError, linux_errno_of
from actorfs.runtime.ops.snapshot import SnapshotError, SnapshotTruncated, restore, snapshot
from tests.support.helpers_fs import CTX, ROOT, errno_of, ops, running

# Each test runs with syscalls in the pool and inline (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("syscall_mode")


async def test_lookup_and_read_real_file(tmp_path):
    (tmp_path / "hello.txt").write_bytes(b"hi from posix")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"hello.txt")
        assert e.attr.size == 13
        o = await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
        assert await ops.read(fs, CTX, e.nodeid, o.fh, 0, 64) == b"hi from posix"


async def test_readdir_lists_real_entries_with_types(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a")
    (tmp_path / "sub").mkdir()
    async with running(tmp_path) as fs:
        d = await ops.opendir(fs, CTX, ROOT)
        by_name = {x.name: x.type for x in await ops.readdir(fs, CTX, ROOT, d.fh, 0, 4096)}
        assert by_name[b"a.txt"] == DT_REG
        assert by_name[b"sub"] == DT_DIR


@pytest.mark.parametrize("name", [b"..", b".", b"a/b", b"a\0b", b""])
async def test_lookup_rejects_bad_names(tmp_path, name):
    async with running(tmp_path) as fs:
        assert await errno_of(ops.lookup(fs, CTX, ROOT, name)) == errno.EINVAL


async def test_lookup_serves_external_symlink_as_a_link_by_default(tmp_path):
    """Departs from the reference backend on purpose (docs/ARCHITECTURE.md): under opaque
    a link leading out of the root is served as the link itself, never followed."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", root / "escape")
    os.symlink("../secret", root / "up")
    async with running(root) as fs:
        for name in (b"escape", b"up"):
            e = await ops.lookup(fs, CTX, ROOT, name)
            assert stat.S_ISLNK(e.attr.mode)
            assert await ops.readlink(fs, CTX, e.nodeid) == os.fsencode(os.readlink(root / os.fsdecode(name)))
            assert await errno_of(ops.open(fs, CTX, e.nodeid, os.O_RDONLY)) == errno.ELOOP
            await ops.unlink(fs, CTX, ROOT, name)
    assert os.listdir(root) == []


async def test_lookup_blocks_external_symlink_under_deny(tmp_path):
    root = tmp_path / "root"
    (root / "d" / "e").mkdir(parents=True)
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", root / "escape")
    os.symlink("../secret", root / "up")
    os.symlink("../../../secret", root / "d" / "e" / "up3")
    os.symlink("../../x", root / "d" / "e" / "in2")
    os.symlink(str(root / "d"), root / "abs_in")
    os.symlink("/", root / "slash")
    async with running(root, symlinks="deny") as fs:
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        e = await ops.lookup(fs, CTX, d.nodeid, b"e")
        for parent, name in ((ROOT, b"escape"), (ROOT, b"up"), (e.nodeid, b"up3"), (ROOT, b"slash")):
            assert await errno_of(ops.lookup(fs, CTX, parent, name)) == errno.EACCES, name
        for parent, name in ((e.nodeid, b"in2"), (ROOT, b"abs_in")):
            assert stat.S_ISLNK((await ops.lookup(fs, CTX, parent, name)).attr.mode)


async def test_lookup_allows_internal_symlink_by_default(tmp_path):
    (tmp_path / "real.txt").write_text("content")
    os.symlink("real.txt", tmp_path / "link")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"link")
        assert e.attr.size > 0


async def test_lookup_succeeds_on_broken_symlink(tmp_path):
    os.symlink("does-not-exist", tmp_path / "dangling")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"dangling")
        assert stat.S_ISLNK(e.attr.mode)


async def test_lookup_returns_symlink_attrs_not_target_attrs(tmp_path):
    (tmp_path / "real.txt").write_bytes(b"x" * 1000)
    os.symlink("real.txt", tmp_path / "link")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"link")
        assert stat.S_ISLNK(e.attr.mode)
        assert e.attr.size == len("real.txt")


async def test_getattr_returns_symlink_attrs_not_target_attrs(tmp_path):
    (tmp_path / "target.bin").write_bytes(b"y" * 4096)
    os.symlink("target.bin", tmp_path / "l")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"l")
        attr = await ops.getattr(fs, CTX, e.nodeid)
        assert stat.S_ISLNK(attr.mode)
        assert attr.size == len("target.bin")


async def test_lookup_succeeds_on_recently_created_symlink(tmp_path):
    (tmp_path / "bin").mkdir()
    async with running(tmp_path) as fs:
        b = await ops.lookup(fs, CTX, ROOT, b"bin")
        s = await ops.symlink(fs, CTX, b.nodeid, b"tool", b"../lib/tool.js")
        assert stat.S_ISLNK(s.attr.mode)
        e = await ops.lookup(fs, CTX, b.nodeid, b"tool")
        assert stat.S_ISLNK(e.attr.mode)
        assert stat.S_ISLNK((await ops.getattr(fs, CTX, e.nodeid)).mode)


async def test_lookup_allows_external_symlink_when_follow(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").write_text("data")
    os.symlink(tmp_path / "outside", root / "out")
    async with running(root, symlinks="follow") as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"out")
        assert stat.S_ISREG(e.attr.mode) and e.attr.size == 4


async def test_read_eof_returns_empty(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        o = await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
        assert await ops.read(fs, CTX, e.nodeid, o.fh, 3, 10) == b""
        assert await ops.read(fs, CTX, e.nodeid, o.fh, 1000, 10) == b""


async def test_open_directory_returns_eisdir(tmp_path):
    (tmp_path / "d").mkdir()
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"d")
        assert await errno_of(ops.open(fs, CTX, e.nodeid, os.O_RDONLY)) == errno.EISDIR


async def test_symlink_create_inside_mount(tmp_path):
    async with running(tmp_path) as fs:
        e = await ops.symlink(fs, CTX, ROOT, b"link", b"target")
        assert stat.S_ISLNK(e.attr.mode)
        assert await ops.readlink(fs, CTX, e.nodeid) == b"target"
    assert os.readlink(tmp_path / "link") == "target"


async def test_symlink_external_target_stored_verbatim_and_served_as_a_link(tmp_path):
    async with running(tmp_path) as fs:
        e = await ops.symlink(fs, CTX, ROOT, b"pw", b"/etc/passwd")
        assert await ops.readlink(fs, CTX, e.nodeid) == b"/etc/passwd"
        assert os.readlink(tmp_path / "pw") == "/etc/passwd"
        e2 = await ops.lookup(fs, CTX, ROOT, b"pw")
        assert e2.nodeid == e.nodeid and stat.S_ISLNK(e2.attr.mode) and e2.attr.size == 11


async def test_symlink_and_link_blocked_by_deny(tmp_path):
    (tmp_path / "f").write_text("hello")
    async with running(tmp_path, symlinks="deny") as fs:
        assert await errno_of(ops.symlink(fs, CTX, ROOT, b"link", b"f")) == errno.EPERM
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        assert await errno_of(ops.link(fs, CTX, e.nodeid, ROOT, b"alias")) == errno.EPERM
    assert not os.path.lexists(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "alias")


async def test_link_create_inside_mount(tmp_path):
    (tmp_path / "orig").write_bytes(b"hello")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"orig")
        n = await ops.link(fs, CTX, e.nodeid, ROOT, b"alias")
        assert n.attr.nlink == 2
        assert n.nodeid == e.nodeid  # one live inode per host object
        o = await ops.open(fs, CTX, n.nodeid, os.O_RDONLY)
        assert await ops.read(fs, CTX, n.nodeid, o.fh, 0, 10) == b"hello"


async def test_rmdir_nonempty_returns_linux_enotempty(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    async with running(tmp_path) as fs:
        assert await errno_of(ops.rmdir(fs, CTX, ROOT, b"d")) == 39


async def test_rmdir_empty_succeeds(tmp_path):
    (tmp_path / "sub").mkdir()
    async with running(tmp_path) as fs:
        await ops.rmdir(fs, CTX, ROOT, b"sub")
    assert not (tmp_path / "sub").exists()


def test_linux_errno_of_an_op_error():
    for e in (1, 2, 4, 5, 22, 34, 39, 61, 95, 110, 125):  # a Linux host's errno is the reply's
        assert linux_errno_of(OSError(e, "x")) == e
        assert linux_errno_of(FsError(e)) == e
    assert linux_errno_of(OSError()) == errno.EIO
    assert linux_errno_of(ValueError("x")) == errno.EIO


async def test_setattr_chmod(tmp_path):
    (tmp_path / "f").write_text("x")
    os.chmod(tmp_path / "f", 0o644)
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        a = await ops.setattr(fs, CTX, e.nodeid, SetattrArgs(FATTR_MODE, mode=0o600))
        assert a.mode & 0o7777 == 0o600
    assert os.stat(tmp_path / "f").st_mode & 0o7777 == 0o600


async def test_setattr_truncate(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        a = await ops.setattr(fs, CTX, e.nodeid, SetattrArgs(FATTR_SIZE, size=10))
        assert a.size == 10
    assert os.path.getsize(tmp_path / "f") == 10


async def test_setattr_truncate_via_fh(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        o = await ops.open(fs, CTX, e.nodeid, os.O_RDWR)
        a = await ops.setattr(fs, CTX, e.nodeid, SetattrArgs(FATTR_SIZE | FATTR_FH, size=64, fh=o.fh))
        assert a.size == 64
        bad = SetattrArgs(FATTR_SIZE | FATTR_FH, size=1, fh=999_999)
        assert await errno_of(ops.setattr(fs, CTX, e.nodeid, bad)) == errno.EBADF
    assert os.path.getsize(tmp_path / "f") == 64


async def test_setattr_utimens(tmp_path):
    (tmp_path / "f").write_text("x")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        a = await ops.setattr(fs, CTX, e.nodeid, SetattrArgs(FATTR_MTIME, mtime=1_600_000_000))
        assert a.mtime == 1_600_000_000
    assert int(os.stat(tmp_path / "f").st_mtime) == 1_600_000_000


async def test_rename_within_dir(tmp_path):
    (tmp_path / "from").write_bytes(b"payload")
    async with running(tmp_path) as fs:
        await ops.rename(fs, CTX, ROOT, b"from", ROOT, b"to")
        assert (await ops.lookup(fs, CTX, ROOT, b"to")).attr.size == 7
    assert not (tmp_path / "from").exists()
    assert (tmp_path / "to").read_bytes() == b"payload"


async def test_rename_across_dirs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "file").write_bytes(b"cross-dir")
    async with running(tmp_path) as fs:
        a = await ops.lookup(fs, CTX, ROOT, b"a")
        b = await ops.lookup(fs, CTX, ROOT, b"b")
        await ops.rename(fs, CTX, a.nodeid, b"file", b.nodeid, b"file")
        assert (await ops.lookup(fs, CTX, b.nodeid, b"file")).attr.size == 9
    assert (tmp_path / "b" / "file").read_bytes() == b"cross-dir"


async def test_rename_atomic_write_pattern(tmp_path):
    (tmp_path / "file").write_bytes(b"old")
    async with running(tmp_path) as fs:
        e, o = await ops.create(fs, CTX, ROOT, b"file.tmp", 0o644, os.O_WRONLY, 0)
        await ops.write(fs, CTX, e.nodeid, o.fh, 0, b"new contents")
        await ops.release(fs, CTX, e.nodeid, o.fh)
        await ops.rename(fs, CTX, ROOT, b"file.tmp", ROOT, b"file")
    assert not (tmp_path / "file.tmp").exists()
    assert (tmp_path / "file").read_bytes() == b"new contents"


async def test_rename_rejects_unknown_flags(tmp_path):
    (tmp_path / "a").write_text("x")
    async with running(tmp_path) as fs:
        assert await errno_of(ops.rename(fs, CTX, ROOT, b"a", ROOT, b"b", 4)) == errno.EINVAL
        assert await errno_of(ops.rename(fs, CTX, ROOT, b"a", ROOT, b"b", 3)) == errno.EINVAL
    assert (tmp_path / "a").exists()


async def test_flush_and_fsyncdir(tmp_path):
    (tmp_path / "f").write_text("x")
    async with running(tmp_path) as fs:
        e = await ops.lookup(fs, CTX, ROOT, b"f")
        o = await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
        await ops.flush(fs, CTX, e.nodeid, o.fh)
        await ops.release(fs, CTX, e.nodeid, o.fh)
        assert await errno_of(ops.flush(fs, CTX, ROOT, 999_999)) == errno.EBADF
        d = await ops.opendir(fs, CTX, ROOT)
        await ops.fsyncdir(fs, CTX, ROOT, d.fh, False)
        await ops.fsyncdir(fs, CTX, ROOT, d.fh, True)
        await ops.releasedir(fs, CTX, ROOT, d.fh)


async def test_snapshot_round_trip_preserves_tables(tmp_path):
    (tmp_path / "dist" / "scripts").mkdir(parents=True)
    (tmp_path / "dist" / "cli.js").write_text("#!/usr/bin/env node\n")
    (tmp_path / "dist" / "scripts" / "probe.js").write_text("// probe\n")
    async with running(tmp_path) as fs1:
        dist = await ops.lookup(fs1, CTX, ROOT, b"dist")
        await ops.lookup(fs1, CTX, dist.nodeid, b"cli.js")
        scripts = await ops.lookup(fs1, CTX, dist.nodeid, b"scripts")
        probe = await ops.lookup(fs1, CTX, scripts.nodeid, b"probe.js")
        blob = await snapshot(fs1)
    async with running(tmp_path) as fs2:
        assert await restore(fs2, blob) == 0
        root = os.fsencode(os.path.realpath(tmp_path))
        assert (await fs2.inodes.info(dist.nodeid))[1] == root + b"/dist"
        assert (await fs2.inodes.info(probe.nodeid))[1] == root + b"/dist/scripts/probe.js"
        assert await fs2.inodes.child(dist.nodeid, b"scripts") == scripts.nodeid
        assert await fs2.inodes.child(scripts.nodeid, b"probe.js") == probe.nodeid
        assert (await fs2.inodes.counts())["next_nodeid"] > probe.nodeid
        # The restored nodeids are live: the ops work on them.
        o = await ops.open(fs2, CTX, probe.nodeid, os.O_RDONLY)
        assert await ops.read(fs2, CTX, probe.nodeid, o.fh, 0, 100) == b"// probe\n"
        # A new lookup never reuses a restored nodeid.
        new = await ops.lookup(fs2, CTX, ROOT, b"dist")
        assert new.nodeid == dist.nodeid


async def test_restore_rejects_root_mismatch(tmp_path):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    async with running(tmp_path / "r1") as fs1:
        blob = await snapshot(fs1)
    async with running(tmp_path / "r2") as fs2:
        with pytest.raises(SnapshotError, match="root mismatch") as ei:
            await restore(fs2, blob)
        assert "r1" in str(ei.value) and "r2" in str(ei.value)


async def test_restore_rejects_malformed_blobs(tmp_path):
    async with running(tmp_path) as fs:
        good = await snapshot(fs)
        with pytest.raises(SnapshotError, match="bad magic"):
            await restore(fs, b"XXXX" + (1).to_bytes(4, "little"))
        with pytest.raises(SnapshotTruncated, match="truncated"):
            await restore(fs, b"PFSS")
        with pytest.raises(SnapshotError, match="version 99"):
            await restore(fs, b"PFSS" + (99).to_bytes(4, "little"))
        with pytest.raises(SnapshotError, match="trailing"):
            await restore(fs, good + b"\0")
        with pytest.raises(SnapshotTruncated):
            await restore(fs, good[:-3])
        bad_kind = bytearray(good)
        bad_kind[4 + 4 + 8 + 8 + 8] = 7  # the root entry's kind byte
        with pytest.raises(SnapshotError, match="bad kind 7"):
            await restore(fs, bytes(bad_kind))
        no_root = b"PFSS" + (1).to_bytes(4, "little") + (5).to_bytes(8, "little") + bytes(16)
        with pytest.raises(SnapshotError, match="missing root"):
            await restore(fs, no_root)
