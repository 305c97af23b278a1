"""runtime/ops/follow.py at op level: links are walked component by component and a
walk into a mount this process serves fails with ELOOP.

A tmpfs directory (/dev/shm) stands in for "our own mount": its device is
registered as one we serve, exactly as the server registers its FUSE mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile

import pytest

from actorfs.runtime.ops import follow
from tests.support.helpers_fs import CTX, ROOT, errno_of, ops, running

pytestmark = pytest.mark.usefixtures("syscall_mode")


@pytest.fixture
def own(tmp_path):
    """A directory on another mount, registered as one this process serves."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on its own mount")
    d = tempfile.mkdtemp(prefix="actorfs-follow-", dir="/dev/shm")
    with open(os.path.join(d, "f"), "w") as f:
        f.write("own")
    st = os.stat(d)
    conn = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    follow.register_own(conn)
    try:
        yield d
    finally:
        follow.unregister_own(conn)
        shutil.rmtree(d, ignore_errors=True)


async def test_links_into_our_own_mount_are_eloop(tmp_path, own):
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_text("x")
    os.symlink(own, root / "abs")  # the mount itself
    os.symlink(os.path.join(own, "f"), root / "absf")  # a file in it
    depth = len(str(root).strip("/").split("/"))
    os.symlink("../" * depth + own.lstrip("/") + "/f", root / "rel")  # by ".."
    os.symlink("abs", root / "chain")  # a link to such a link
    os.symlink("file", root / "ok")
    async with running(root, symlinks="follow") as fs:
        for name in (b"abs", b"absf", b"rel", b"chain"):
            assert await errno_of(ops.lookup(fs, CTX, ROOT, name)) == errno.ELOOP, name
        e = await ops.lookup(fs, CTX, ROOT, b"ok")
        assert stat.S_ISREG(e.attr.mode)
        # READDIRPLUS hands out no entry for them, and lists them all
        d = await ops.opendir(fs, CTX, ROOT)
        plus = {p.dirent.name: p.entry.nodeid for p in await ops.readdirplus(fs, CTX, ROOT, d.fh, 0, 1 << 16)}
        await ops.releasedir(fs, CTX, ROOT, d.fh)
        assert all(plus[n] == 0 for n in (b"abs", b"absf", b"rel", b"chain"))
        assert plus[b"ok"] and plus[b"file"]


async def test_follow_still_follows_what_it_may(tmp_path):
    root, out = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    out.mkdir()
    (out / "t").write_text("target")
    (root / "d").mkdir()
    (root / "d" / "inner").write_text("inner")
    os.symlink(out / "t", root / "abs")  # outside the root: follow exposes it
    os.symlink("d/../d/./inner", root / "dots")
    os.symlink("dots", root / "two")
    os.symlink("d/", root / "slash")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("missing", root / "broken")
    prev = "d/inner"
    for i in range(45):  # a chain longer than the kernel's 40
        os.symlink(prev, root / f"c{i}")
        prev = f"c{i}"
    async with running(root, symlinks="follow") as fs:
        async def kind(name):
            return stat.S_IFMT((await ops.lookup(fs, CTX, ROOT, name)).attr.mode)

        assert await kind(b"abs") == stat.S_IFREG
        assert await kind(b"dots") == stat.S_IFREG
        assert await kind(b"two") == stat.S_IFREG
        assert await kind(b"slash") == stat.S_IFDIR
        assert await kind(b"c30") == stat.S_IFREG
        # broken, looping and over-long chains are served as the link itself
        for name in (b"loop1", b"broken", b"c44"):
            assert await kind(name) == stat.S_IFLNK, name
        e = await ops.lookup(fs, CTX, ROOT, b"abs")
        o = await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)
        assert await ops.read(fs, CTX, e.nodeid, o.fh, 0, 64) == b"target"
        await ops.release(fs, CTX, e.nodeid, o.fh)


def test_mount_table_helpers():
    fd = os.open("/", os.O_PATH)
    try:
        mid = follow.mnt_id(fd)
        dev, fstype = follow.mount_of(mid)
        st = os.stat("/")
        assert dev == (os.major(st.st_dev), os.minor(st.st_dev)) or fstype in ("btrfs", "overlay")
        assert follow.check_mount(fd, None) == mid
    finally:
        os.close(fd)
    assert follow.mount_of(2**31 - 1) is None
