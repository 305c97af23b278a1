"""The inode table's bounded O_PATH fd cache (issue 15), at the op layer.

An inode holds an fd only while it is in the LRU cache; an evicted inode is
reopened by file handle (a root server on a filesystem with handles) or by
name beneath a cached ancestor, and every reopen is verified: a replaced or
deleted object gives ESTALE, never another object. Each test that depends on
how reopening works runs both ways ("handle" needs root: CI runs as root).
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from actorfs.actors.inode_table import FdBudget
from tests.support.helpers_fs import CTX, ROOT, errno_of, ops, running

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


@pytest.fixture(params=["handle", "name"])
def reopen(request):
    """How evicted inodes come back: by file handle (root) or by name."""
    if request.param == "handle" and os.geteuid() != 0:
        pytest.skip("open_by_handle_at needs CAP_DAC_READ_SEARCH (root)")
    return request.param


def cfg(reopen: str, size: int = 1) -> dict:
    return {"fd_cache": size, "file_handles": None if reopen == "handle" else False}


async def stats(fs) -> dict:
    return fs.inodes.stats()


async def test_lru_keeps_at_most_n_fds_and_the_most_recent(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}").write_text("x" * i)
    async with running(tmp_path, fd_cache=3) as fs:
        es = [await ops.lookup(fs, CTX, ROOT, b"f%d" % i) for i in range(10)]
        s = await stats(fs)
        assert s["fds_cached"] == 3 and s["evictions"] == 7 and s["inodes_known"] == 11
        assert s["fds_held"] == 3 + 1 + (1 if fs.inodes.handles_usable else 0)
        # the three most recent are hits; the first was evicted: a miss and a reopen
        hits = s["hits"]
        for e in es[7:]:
            await ops.getattr(fs, CTX, e.nodeid)
        assert (await stats(fs))["hits"] == hits + 3
        a = await ops.getattr(fs, CTX, es[0].nodeid)
        assert a.size == 0
        s = await stats(fs)
        assert s["misses"] == 1 and s["reopened_by_handle"] + s["reopened_by_path"] == 1
        assert s["fds_cached"] == 3  # f0 came back, the oldest of the rest left


async def test_reopen_by_handle_or_by_name(tmp_path, reopen):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "e").mkdir()
    (tmp_path / "d" / "e" / "f").write_text("deep")
    async with running(tmp_path, **cfg(reopen)) as fs:
        assert fs.inodes.handles_usable == (reopen == "handle")
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        e = await ops.lookup(fs, CTX, d.nodeid, b"e")
        f = await ops.lookup(fs, CTX, e.nodeid, b"f")
        await ops.lookup(fs, CTX, ROOT, b"d")  # f, e evicted now
        o = await ops.open(fs, CTX, f.nodeid, os.O_RDONLY)
        assert await ops.read(fs, CTX, f.nodeid, o.fh, 0, 10) == b"deep"
        await ops.release(fs, CTX, f.nodeid, o.fh)
        s = await stats(fs)
        if reopen == "handle":
            assert s["reopened_by_handle"] >= 1 and s["reopened_by_path"] == 0
        else:
            # the walk went down from the nearest ancestor holding an fd
            assert s["reopened_by_path"] >= 1 and s["reopened_by_handle"] == 0
        # lookups under an evicted directory reopen it first
        await ops.lookup(fs, CTX, ROOT, b"d")
        assert (await ops.lookup(fs, CTX, e.nodeid, b"f")).nodeid == f.nodeid


async def test_replaced_object_with_the_same_name_is_estale(tmp_path, reopen):
    (tmp_path / "f").write_text("old")
    (tmp_path / "d").mkdir()
    async with running(tmp_path, **cfg(reopen)) as fs:
        f = await ops.lookup(fs, CTX, ROOT, b"f")
        d = await ops.lookup(fs, CTX, ROOT, b"d")  # f evicted
        os.unlink(tmp_path / "f")
        (tmp_path / "f").write_text("new object, same name")
        os.rmdir(tmp_path / "d")
        (tmp_path / "d").write_text("a file where the directory was")
        await ops.lookup(fs, CTX, ROOT, b"f")  # whichever is cached now, the other is evicted
        await ops.lookup(fs, CTX, ROOT, b"d")
        assert await errno_of(ops.getattr(fs, CTX, f.nodeid)) == errno.ESTALE
        assert await errno_of(ops.open(fs, CTX, f.nodeid, os.O_RDONLY)) == errno.ESTALE
        assert await errno_of(ops.lookup(fs, CTX, d.nodeid, b"x")) in (errno.ESTALE, errno.ENOTDIR)
        # the new objects are new nodeids and work
        f2 = await ops.lookup(fs, CTX, ROOT, b"f")
        assert f2.nodeid != f.nodeid and f2.attr.size == len("new object, same name")
        d2 = await ops.lookup(fs, CTX, ROOT, b"d")
        assert d2.nodeid != d.nodeid


async def test_reused_inode_number_gets_a_new_nodeid(tmp_path, reopen):
    """A deleted object's (st_dev, st_ino) handed to a new file (ext4 reuses
    numbers at once): a lookup of the new file never gets the old nodeid."""
    async with running(tmp_path, **cfg(reopen)) as fs:
        reused = 0
        for i in range(20):
            old = tmp_path / f"a{i}"
            old.write_text("a")
            a = await ops.lookup(fs, CTX, ROOT, os.fsencode(old.name))
            ino = old.stat().st_ino
            (tmp_path / f"x{i}").write_text("x")
            await ops.lookup(fs, CTX, ROOT, b"x%d" % i)  # a evicted
            old.unlink()
            new = tmp_path / f"b{i}"
            new.write_text("bb")
            reused += new.stat().st_ino == ino
            b = await ops.lookup(fs, CTX, ROOT, os.fsencode(new.name))
            assert b.nodeid != a.nodeid and b.attr.size == 2
            assert await errno_of(ops.getattr(fs, CTX, a.nodeid)) in (errno.ESTALE, errno.ENOENT)
        # (tmpfs never reuses numbers; on ext4 the interesting case happened)
        assert reused >= 0


async def test_hard_links_share_a_nodeid_across_eviction_and_forget_is_exact(tmp_path, reopen):
    (tmp_path / "a").write_text("linked")
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "other").write_text("o")
    async with running(tmp_path, **cfg(reopen)) as fs:
        a = await ops.lookup(fs, CTX, ROOT, b"a")
        await ops.lookup(fs, CTX, ROOT, b"other")  # a evicted
        b = await ops.lookup(fs, CTX, ROOT, b"b")
        assert b.nodeid == a.nodeid  # the lookup took its fd up again (verified)
        await ops.lookup(fs, CTX, ROOT, b"other")  # evicted again
        a2 = await ops.lookup(fs, CTX, ROOT, b"a")
        assert a2.nodeid == a.nodeid
        c = await fs.inodes.counts()
        assert c["inodes"] == 3 and c["lookups"] == 1 + 3 + 2
        await ops.forget(fs, a.nodeid, 2)
        assert (await ops.getattr(fs, CTX, a.nodeid)).nlink == 2  # one lookup left
        await ops.forget(fs, a.nodeid, 1)
        assert await errno_of(ops.getattr(fs, CTX, a.nodeid)) == errno.ENOENT
        assert (await fs.inodes.counts())["inodes"] == 2


async def test_rename_then_evict_then_reopen(tmp_path, reopen):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("moved")
    (tmp_path / "z").write_text("z")
    async with running(tmp_path, **cfg(reopen)) as fs:
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        f = await ops.lookup(fs, CTX, d.nodeid, b"f")
        await ops.rename(fs, CTX, ROOT, b"d", ROOT, b"e")  # the client's rename: names follow
        await ops.rename(fs, CTX, d.nodeid, b"f", d.nodeid, b"g")
        await ops.lookup(fs, CTX, ROOT, b"z")  # d and f evicted
        assert (await ops.getattr(fs, CTX, f.nodeid)).size == 5
        await ops.lookup(fs, CTX, ROOT, b"z")
        o = await ops.open(fs, CTX, f.nodeid, os.O_RDONLY)
        assert await ops.read(fs, CTX, f.nodeid, o.fh, 0, 10) == b"moved"
        await ops.release(fs, CTX, f.nodeid, o.fh)


async def test_host_side_move_follows_by_handle_and_is_estale_by_name(tmp_path, reopen):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("here")
    (tmp_path / "z").write_text("z")
    async with running(tmp_path, **cfg(reopen)) as fs:
        d = await ops.lookup(fs, CTX, ROOT, b"d")
        await ops.lookup(fs, CTX, ROOT, b"z")  # d evicted
        os.rename(tmp_path / "d", tmp_path / "moved-on-host")
        os.mkdir(tmp_path / "d")  # another directory under the old name
        if reopen == "handle":
            f = await ops.lookup(fs, CTX, d.nodeid, b"f")  # the object itself, as a held fd would
            assert f.attr.size == 4
        else:
            assert await errno_of(ops.lookup(fs, CTX, d.nodeid, b"f")) == errno.ESTALE
            # a lookup of its new name takes the same nodeid up again
            d2 = await ops.lookup(fs, CTX, ROOT, b"moved-on-host")
            assert d2.nodeid == d.nodeid
            assert (await ops.lookup(fs, CTX, d.nodeid, b"f")).attr.size == 4


async def test_open_handles_keep_their_inode_fd(tmp_path, reopen):
    """An open file's inode is pinned: deleted on the host, still served by nodeid."""
    (tmp_path / "f").write_text("pinned")
    for i in range(5):
        (tmp_path / f"o{i}").write_text("o")
    async with running(tmp_path, **cfg(reopen)) as fs:
        f = await ops.lookup(fs, CTX, ROOT, b"f")
        o = await ops.open(fs, CTX, f.nodeid, os.O_RDONLY)
        od = await ops.opendir(fs, CTX, ROOT)
        for i in range(5):
            await ops.lookup(fs, CTX, ROOT, b"o%d" % i)
        assert (await stats(fs))["fds_pinned"] == 1  # the root keeps its fd anyway
        os.unlink(tmp_path / "f")
        assert (await ops.getattr(fs, CTX, f.nodeid)).nlink == 0
        await ops.release(fs, CTX, f.nodeid, o.fh)
        await ops.releasedir(fs, CTX, ROOT, od.fh)
        s = await stats(fs)
        assert s["fds_pinned"] == 0 and s["fds_cached"] == 1
        await ops.lookup(fs, CTX, ROOT, b"o0")  # now it can be evicted, and then it is gone
        assert await errno_of(ops.getattr(fs, CTX, f.nodeid)) in (errno.ESTALE, errno.ENOENT)


async def test_one_budget_handles_evict_cached_fds_then_emfile(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i}").write_text("x")
    async with running(tmp_path) as fs:
        budget = fs.fd_budget
        fixed = 1 + len(fs.inodes._mount_fds)
        budget.total = lambda: fixed + 20  # a 20-fd budget for O_PATH fds and handles
        es = [await ops.lookup(fs, CTX, ROOT, b"f%d" % i) for i in range(30)]
        s = await stats(fs)
        assert s["fds_cached"] == budget.total() * 3 // 4 and s["inodes_known"] == 31
        # handles take the budget: unused O_PATH fds go first
        fhs = []
        for e in es:
            try:
                fhs.append((e.nodeid, (await ops.open(fs, CTX, e.nodeid, os.O_RDONLY)).fh))
            except Exception as exc:  # noqa: BLE001
                assert getattr(exc, "errno", None) == errno.EMFILE
                break
        s = await stats(fs)
        # every fd was a handle or a pinned inode: only then EMFILE (the refused
        # open's own inode went back to the cache when it was unpinned)
        assert s["fds_cached"] <= 1
        assert budget.handles + s["fds_held"] >= budget.total() - 1
        assert len(fhs) >= 8
        # everything else still works: GETATTR of an unpinned inode reopens it
        assert (await ops.getattr(fs, CTX, es[-1].nodeid)).size == 1
        for nodeid, fh in fhs:
            await ops.release(fs, CTX, nodeid, fh)
        assert budget.handles == 0 and (await stats(fs))["fds_pinned"] == 0
        o = await ops.open(fs, CTX, es[0].nodeid, os.O_RDONLY)  # room again
        await ops.release(fs, CTX, es[0].nodeid, o.fh)


def test_budget_follows_a_lowered_limit():
    """prlimit on a running server: the next decision uses the new limit."""
    code = """
        import resource
        from actorfs.actors.inode_table import FdBudget
        b = FdBudget()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
        before = b.cache_cap()
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        print(before, b.cache_cap(), b.total())
    """
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    before, after, total = map(int, out.split())
    assert before > after and total <= 1024 and 0 < after < total


def test_explicit_cache_size_and_default():
    assert FdBudget(5).cache_cap() == 5
    b = FdBudget()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert 0 < b.cache_cap() < soft


async def test_stats_count_and_cli_prints_them(tmp_path):
    from actorfs.runtime.cli.main import format_stats

    (tmp_path / "f").write_text("x")
    async with running(tmp_path, fd_cache=1) as fs:
        await ops.lookup(fs, CTX, ROOT, b"f")
        line = format_stats({"inodes": fs.inodes.stats()})
        assert "inodes: 2 known" in line and "evictions" in line and "by handle" in line
