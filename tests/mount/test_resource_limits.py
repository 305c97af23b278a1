"""Resource limits: fds, inodes, handles, mailboxes, the pool and memory stay bounded.

A client that looks up or opens everything gets EMFILE from the caps, not a
crash, and the server keeps answering; FORGET and RELEASE give everything back;
a flood of requests waits (backpressure) instead of growing queues; a flood of
huge READs does not grow memory with the size asked.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import subprocess
import sys
import textwrap
import threading

import pytest

from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.host.limits import apply_fd_caps, fd_caps, raise_nofile_limit
from actorfs.runtime.ops.filesystem import FsConfig
from tests.support.hostile_client import ROOT, fd_count, session

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))



def run_py(code: str, timeout: float = 120) -> str:
    """Run a snippet in a fresh interpreter (process-wide limits, peak RSS); its stdout."""
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


# -- RLIMIT_NOFILE ------------------------------------------------------------------------


def test_raise_nofile_limit_lifts_soft_to_hard():
    out = run_py(
        """
        import resource
        from actorfs.runtime.host.limits import raise_nofile_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, hard), hard))
        old, new = raise_nofile_limit()
        print(old, new, hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    old, new, hard, now = map(int, out.split())
    assert old == min(64, hard) and new == hard == now


def test_raise_nofile_limit_is_idempotent_here():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    old, new = raise_nofile_limit()
    assert new == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == before[1]


def test_fd_caps_leave_a_reserve():
    for nofile in (64, 400, 1024, 20000, 1 << 20):
        for per_inode in (1, 2):
            inodes, handles = fd_caps(nofile, max_in_flight=256, fds_per_inode=per_inode)
            assert inodes >= 1 and handles >= 1
            assert inodes * per_inode + handles <= nofile - min(2 * 256 + 64, nofile // 2)
    cfg = FsConfig(root="/")
    inodes_before = cfg.max_inodes
    apply_fd_caps(cfg)
    assert cfg.max_handles < resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert cfg.max_inodes == inodes_before  # inodes cost no fd of their own (the fd cache)


# -- caps on O_PATH fds and handles -------------------------------------------------------------


async def test_inode_cap_gives_emfile_and_forget_frees(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i}").write_text("x")
    async with session(tmp_path, max_inodes=11) as (fs, client):
        fds = fd_count()
        got = [await client.lookup(ROOT, b"f%d" % i) for i in range(40)]
        ok = [n for e, n in got if not e]
        assert len(ok) == 10  # 10 + the root
        assert {e for e, _ in got if e} == {-errno.EMFILE}
        assert fs.inodes.refused == 30
        # the server still answers everything that needs no new inode
        assert (await client.call(P.Getattr(h=P.InHeader(nodeid=ROOT))))[0] == 0
        assert (await client.open(ok[0]))[0] == 0
        # a looked-up name is found again (same object, no new inode)
        assert (await client.lookup(ROOT, b"f0"))[0] == 0
        await client.release_all()
        await client.forget_all()
        await client.settle()
        assert (await fs.inodes.counts())["inodes"] == 1
        assert fd_count() <= fds  # the O_PATH fds are closed
        # freed inodes make room again
        again = [(await client.lookup(ROOT, b"f%d" % i))[0] for i in range(20, 30)]
        assert again == [0] * 10
        await client.forget_all()
        await client.settle()


async def test_handle_cap_gives_emfile_on_open_opendir_and_create(tmp_path):
    (tmp_path / "f").write_text("x")
    async with session(tmp_path, max_handles=5) as (fs, client):
        fds = fd_count()
        _, f = await client.lookup(ROOT, b"f")
        fhs = [await client.open(f) for _ in range(5)]
        assert all(not e for e, _ in fhs)
        assert (await client.open(f))[0] == -errno.EMFILE
        assert (await client.opendir(ROOT))[0] == -errno.EMFILE
        err, nodeid, fh = await client.create(ROOT, b"new")
        assert err == -errno.EMFILE
        assert fs.handles.refused == 3
        await client.release_all()
        # room again
        err, _nodeid, _fh = await client.create(ROOT, b"new2")
        assert err == 0
        await client.release_all()
        await client.forget_all()
        await client.settle()
        # a CREATE refused at the cap must not leave a lookup the client never saw
        counts = await fs.inodes.counts()
        assert counts["inodes"] == 1, f"inode leaked by a refused CREATE: {counts}"
        assert fd_count() <= fds


def _fd_exhaustion_script(apply_caps: bool) -> str:
    return f"""
        import asyncio, os, resource
        from tests.support.hostile_client import HostileClient, ROOT, fd_count
        from actorfs.runtime.fuse import protocol as P
        from actorfs.runtime.fuse.dispatcher import Dispatcher
        from actorfs.runtime.ops.filesystem import Filesystem, FsConfig
        from actorfs.runtime.host.limits import apply_fd_caps
        import tempfile
        root = tempfile.mkdtemp()
        for i in range(600):
            open(os.path.join(root, "f%d" % i), "w").close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_count() + 300, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))

        async def main():
            cfg = FsConfig(root=root)
            if {apply_caps}:
                apply_fd_caps(cfg, max_in_flight=16)
            async with Filesystem.running(cfg) as fs:
                c = HostileClient(Dispatcher(fs, max_in_flight=16))
                await c.init()
                errs = [(await c.lookup(ROOT, b"f%d" % i))[0] for i in range(600)]
                ok = sum(1 for e in errs if not e)
                emfile = sum(1 for e in errs if e == -22 - 2)
                g = (await c.call(P.Getattr(h=P.InHeader(nodeid=ROOT))))[0]
                o = (await c.opendir(ROOT))[0]
                await c.release_all()
                await c.forget_all()
                await c.settle()
                n = (await fs.inodes.counts())["inodes"]
                g2 = (await c.call(P.Getattr(h=P.InHeader(nodeid=ROOT))))[0]
                print(ok, emfile, g, o, n, g2)
        asyncio.run(main())
    """


def test_more_inodes_than_fds_under_a_low_limit():
    """Default config, RLIMIT_NOFILE 300 fds above what is open: 600 lookups all
    succeed (the fd cache evicts), the server keeps answering, FORGET frees all."""
    ok, emfile, getattr_root, opendir, inodes, after = map(
        int, run_py(_fd_exhaustion_script(False)).split()
    )
    assert ok == 600 and emfile == 0
    assert getattr_root == 0 and opendir == 0
    assert inodes == 1 and after == 0  # FORGET gave everything back: it works again


def test_fd_caps_keep_the_server_answering_at_the_limit():
    """With caps from the limit too: every lookup and the root's GETATTR and
    OPENDIR are answered: the reserve is the server's, not the client's."""
    ok, emfile, getattr_root, opendir, inodes, after = map(
        int, run_py(_fd_exhaustion_script(True)).split()
    )
    assert ok == 600 and emfile == 0
    assert getattr_root == 0 and opendir == 0
    assert inodes == 1 and after == 0


# -- backpressure ---------------------------------------------------------------------------------


async def test_flood_waits_for_slots_instead_of_queueing(tmp_path):
    """5000 GETATTRs against a stalled pool: at most max_in_flight run, the pool queue and
    the actors' mailboxes stay bounded, and every request is answered once the pool moves."""
    # inline="never": every GETATTR's fstat goes through the (stalled) pool.
    async with session(tmp_path, max_in_flight=32, pool_workers=2, inline="never") as (fs, client):
        gate = threading.Event()
        pool = fs.pool
        blockers = [asyncio.ensure_future(pool.run(gate.wait, 30)) for _ in range(pool.max_queued)]
        await asyncio.sleep(0.05)

        async def flood():
            for _ in range(5000):
                await client.send(P.Getattr(h=P.InHeader(nodeid=ROOT)))

        flooder = asyncio.ensure_future(flood())
        peak_in_flight = peak_mailbox = 0
        for _ in range(50):
            await asyncio.sleep(0.01)
            peak_in_flight = max(peak_in_flight, client.d.in_flight)
            peak_mailbox = max(peak_mailbox, fs.inodes._mailbox.qsize())
        assert not flooder.done()  # the sender is held back
        assert peak_in_flight <= 32
        assert pool.submitted <= pool.max_queued + 32
        assert peak_mailbox <= fs.inodes._mailbox.maxsize
        gate.set()
        await asyncio.wait_for(flooder, 60)
        await asyncio.gather(*blockers)
        await client.settle()
        client.check_replies()
        getattrs = [r[0] for r in client.books.replies.values() if r[0].opcode == P.FUSE_GETATTR]
        assert len(getattrs) == 5000 and not any(r.error for r in getattrs)


# -- memory -----------------------------------------------------------------------------------------


def test_flood_of_huge_reads_keeps_memory_bounded(tmp_path):
    """128 READs of 4 GiB each, held in flight by a transport that does not write yet:
    memory grows with what INIT allows per READ (1 MiB), not with what was asked."""
    with open(tmp_path / "big", "wb") as f:
        f.truncate(64 << 20)
    out = run_py(
        f"""
        import asyncio, resource
        from tests.support.hostile_client import HostileClient, ROOT
        from actorfs.runtime.fuse import protocol as P
        from actorfs.runtime.fuse.dispatcher import Dispatcher
        from actorfs.runtime.ops.filesystem import Filesystem, FsConfig

        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        async def main():
            async with Filesystem.running(FsConfig(root={str(tmp_path)!r})) as fs:
                d = Dispatcher(fs, max_in_flight=128)
                c = HostileClient(d)
                await c.init()
                _, f = await c.lookup(ROOT, b"big")
                _, fh = await c.open(f, 0)
                base = peak()
                gate = asyncio.Event()
                held = []
                async def slow_send(iov):  # a transport stuck on a full queue
                    held.append(sum(len(b) for b in iov))
                    await gate.wait()
                for i in range(128):
                    frame = P.encode_request(P.Read(h=P.InHeader(unique=1000 + 2 * i, nodeid=f),
                                                    fh=fh, offset=0, size=2**32 - 1))
                    await d.submit(frame, slow_send)
                while len(held) < 128:
                    await asyncio.sleep(0.01)
                grown = peak() - base
                gate.set()
                await d.drain()
                print(grown, max(held))
        asyncio.run(main())
        """
    )
    grown, biggest = map(int, out.split())
    assert biggest <= (1 << 20) + 16
    assert grown < 400 << 20, f"RSS grew {grown >> 20} MiB for 128 READs in flight"


async def test_inodes_freed_by_forget_after_a_big_walk(tmp_path):
    for i in range(50):
        d = tmp_path / f"d{i}"
        d.mkdir()
        for j in range(20):
            (d / f"f{j}").write_text("x")
    async with session(tmp_path) as (fs, client):
        fds = fd_count()
        for i in range(50):
            _, d = await client.lookup(ROOT, b"d%d" % i)
            _, dfh = await client.opendir(d)
            await client.readdirplus(d, dfh)
        await client.settle()
        assert (await fs.inodes.counts())["inodes"] == 1 + 50 + 50 * 20
        await client.release_all()
        await client.forget_all()
        await client.settle()
        assert (await fs.inodes.counts())["inodes"] == 1
        assert fd_count() <= fds
        client.check_replies()


@pytest.mark.parametrize("n", [1])
def test_limits_module_has_no_side_effect_on_import(n):
    out = run_py(
        """
        import resource
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        import actorfs.runtime.host.limits  # noqa: F401
        print(int(before == resource.getrlimit(resource.RLIMIT_NOFILE)))
        """
    )
    assert out.strip() == "1"
