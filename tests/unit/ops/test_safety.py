"""No sequence of valid requests reaches a host object outside the root.

A canary directory sits beside the root; every test checks that nothing in it
was created, changed or served, whatever the client or the host does.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from actorfs.runtime.core.attrs import NegativeEntry
from tests.support.helpers_fs import CTX, ROOT, errno_of, ops, running

# Each test runs with syscalls in the pool and inline, and with every inode's
# fd held or eviction forced (a one-fd cache; tests/conftest.py).
pytestmark = pytest.mark.usefixtures("syscall_mode", "fd_cache_mode")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    canary = tmp_path / "canary"
    root.mkdir()
    canary.mkdir()
    (canary / "secret").write_text("canary-secret")
    (canary / "sub").mkdir()
    yield root, canary
    # the canary is exactly as it was
    assert sorted(os.listdir(canary)) == ["secret", "sub"]
    assert (canary / "secret").read_text() == "canary-secret"
    assert os.listdir(canary / "sub") == []


def _snapshot_outside(tmp_path):
    return sorted(os.listdir(tmp_path))


async def test_client_renames_symlink_over_held_directory(tree):
    root, canary = tree
    (root / "d").mkdir()
    async with running(root) as fs:
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        # the client plants a symlink to the canary and moves it where "d" was
        await ops.symlink(fs, CTX, ROOT, b"s", os.fsencode(str(canary)))
        await ops.rename(fs, CTX, ROOT, b"d", ROOT, b"d-old")
        await ops.rename(fs, CTX, ROOT, b"s", ROOT, b"d")
        # the held nodeid still means the real directory, now named d-old
        e, o = await ops.create(fs, CTX, d.nodeid, b"secret", 0o644, os.O_RDWR)
        await ops.write(fs, CTX, e.nodeid, o.fh, 0, b"mine")
        # "d" is now the link itself (opaque: served, never followed)
        assert stat.S_ISLNK((await ops.lookup(fs, CTX, ROOT, b"d")).attr.mode)
        await ops.mkdir(fs, CTX, d.nodeid, b"sub2", 0o755)
    assert (root / "d-old" / "secret").read_text() == "mine"


async def test_host_swaps_directory_for_symlink_while_nodeid_held(tree, fd_cache_mode):
    root, canary = tree
    (root / "d").mkdir()
    (root / "d" / "inside").write_text("inside")
    async with running(root) as fs:
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        os.rename(root / "d", root / "d-moved")
        os.symlink(canary, root / "d")
        # lookups under the held nodeid see the original directory, not the canary
        assert await ops.lookup(fs, CTX, d.nodeid, b"secret") == NegativeEntry(1.0)  # a miss
        assert (await ops.lookup(fs, CTX, d.nodeid, b"inside")).attr.size == 6
        if fd_cache_mode == "evict-name":
            # d's fd was evicted and its name now leads to the symlink: ESTALE,
            # never the canary; found under its new name it is the same nodeid.
            assert await errno_of(ops.opendir(fs, CTX, d.nodeid)) == errno.ESTALE
            assert await errno_of(ops.lookup(fs, CTX, d.nodeid, b"secret")) == errno.ESTALE
            assert (await ops.lookup(fs, CTX, ROOT, b"d-moved")).nodeid == d.nodeid
        od = await ops.opendir(fs, CTX, d.nodeid)
        names = {x.name for x in await ops.readdir(fs, CTX, d.nodeid, od.fh, 0, 1 << 16)}
        assert b"secret" not in names and b"inside" in names
        await ops.create(fs, CTX, d.nodeid, b"new", 0o644, os.O_RDWR)
        link = await ops.lookup(fs, CTX, ROOT, b"d")
        assert stat.S_ISLNK(link.attr.mode)
        assert await errno_of(ops.open(fs, CTX, link.nodeid, os.O_RDONLY)) == errno.ELOOP
    assert (root / "d-moved" / "new").exists()


async def test_host_swaps_file_for_symlink_between_lookup_and_open(tree):
    root, canary = tree
    (root / "f").write_text("root data")
    async with running(root) as fs:
        f = await ops.lookup(fs, CTX, ROOT, b"f")
        os.unlink(root / "f")
        os.symlink(canary / "secret", root / "f")
        o = await ops.open(fs, CTX, f.nodeid, os.O_RDWR)
        assert await ops.read(fs, CTX, f.nodeid, o.fh, 0, 100) == b"root data"
        await ops.write(fs, CTX, f.nodeid, o.fh, 0, b"ROOT")


async def test_symlink_chains_and_dotdot_targets_under_opaque_and_deny(tree):
    root, canary = tree
    (root / "a").mkdir()
    os.symlink("../../canary/secret", root / "a" / "up")
    os.symlink("up", root / "a" / "chain")
    os.symlink("../a", root / "a" / "inner")
    os.symlink("/", root / "abs")
    for policy in ("opaque", "deny"):
        async with running(root, symlinks=policy) as fs:
            a = await ops.lookup(fs, CTX, ROOT, b"a")
            # "chain" reads as a/up, inside: served; the client resolving it
            # looks "up" up next, which deny refuses.
            chain = await ops.lookup(fs, CTX, a.nodeid, b"chain")
            assert stat.S_ISLNK(chain.attr.mode)
            if policy == "deny":
                assert await errno_of(ops.lookup(fs, CTX, a.nodeid, b"up")) == errno.EACCES
                assert await errno_of(ops.lookup(fs, CTX, ROOT, b"abs")) == errno.EACCES
            else:  # opaque: links are objects, whatever the text says
                up = await ops.lookup(fs, CTX, a.nodeid, b"up")
                assert await ops.readlink(fs, CTX, up.nodeid) == b"../../canary/secret"
                assert await errno_of(ops.open(fs, CTX, up.nodeid, os.O_RDONLY)) == errno.ELOOP
                assert stat.S_ISLNK((await ops.lookup(fs, CTX, ROOT, b"abs")).attr.mode)
            inner = await ops.lookup(fs, CTX, a.nodeid, b"inner")  # stays inside: allowed
            assert await ops.readlink(fs, CTX, inner.nodeid) == b"../a"
            # opening a symlink nodeid never follows it
            assert await errno_of(ops.open(fs, CTX, inner.nodeid, os.O_RDONLY)) == errno.ELOOP
            # readdirplus hands out entries for escaping links under opaque only
            od = await ops.opendir(fs, CTX, a.nodeid)
            plus = await ops.readdirplus(fs, CTX, a.nodeid, od.fh, 0, 1 << 16)
            by = {p.dirent.name: p.entry.nodeid for p in plus}
            assert (by[b"up"] == 0) == (policy == "deny")
            assert by[b"chain"] != 0 and by[b"inner"] != 0


async def test_dotdot_never_walks_out(tree):
    root, canary = tree
    async with running(root) as fs:
        for name in (b"..", b"../canary", b"../canary/secret", b"/etc/passwd"):
            assert await errno_of(ops.lookup(fs, CTX, ROOT, name)) == errno.EINVAL
        od = await ops.opendir(fs, CTX, ROOT)
        names = [x.name for x in await ops.readdir(fs, CTX, ROOT, od.fh, 0, 1 << 16)]
        assert names == [b".", b".."]
        assert await errno_of(ops.rename(fs, CTX, ROOT, b"..", ROOT, b"x")) == errno.EINVAL


async def test_snapshot_paths_cannot_lead_outside(tree):
    root, canary = tree
    (root / "d").mkdir()
    (root / "d" / "f").write_text("x")
    async with running(root) as fs:
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        f = await ops.lookup(fs, CTX, d.nodeid, b"f")
        from actorfs.runtime.ops.snapshot import restore, snapshot

        blob = await snapshot(fs)
    # rewrite the file's path to escape via "..", and swap "d" for a symlink on the host
    rootb = os.fsencode(os.path.realpath(root))
    evil = _pfss(blob, {rootb + b"/d/f": rootb + b"/../canary/secret"})
    os.rename(root / "d", root / "d2")
    os.symlink(canary, root / "d")
    async with running(root) as fs2:
        dropped = await restore(fs2, evil)
        assert dropped == 2  # "d" is now a symlink (not a dir) and the evil path is refused
        assert await errno_of(ops.getattr(fs2, CTX, f.nodeid)) == errno.ENOENT
        assert await errno_of(ops.getattr(fs2, CTX, d.nodeid)) == errno.ENOENT


def _pfss(blob: bytes, rewrite: dict) -> bytes:
    """Re-encode a PFSS v1 blob with some inode paths rewritten."""
    import struct

    pos = 4 + 4 + 8
    (n,) = struct.unpack_from("<Q", blob, pos)
    out = bytearray(blob[: pos + 8])
    pos += 8
    for _ in range(n):
        nodeid, kind, ln = struct.unpack_from("<QBI", blob, pos)
        pos += 13
        path = blob[pos : pos + ln]
        pos += ln
        path = rewrite.get(path, path)
        out += struct.pack("<QBI", nodeid, kind, len(path)) + path
    return bytes(out + blob[pos:])
