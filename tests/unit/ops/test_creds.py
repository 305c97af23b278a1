"""Per-thread credentials (runtime/ops/creds.py) and the ops that run with them.

The units check that a switch takes, is verified, is restored (also on an
error), stays on its own thread, and carries the requester's supplementary
groups. The op-level tests check that a root server makes a requester's new
objects *as* the requester (owned by them without any chown) and leaves
permission decisions on changes to the host kernel.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from actorfs.runtime.core.abi import FATTR_MODE
from actorfs.runtime.core.attrs import RequestContext, SetattrArgs
from actorfs.runtime.core.errno_map import FsError
from actorfs.runtime.ops import creds
from tests.support.helpers_fs import CTX, ROOT, errno_of, ops, running
from tests.support.mount_util import env

pytestmark = pytest.mark.skipif(
    not creds.available(), reason="switching credentials needs root on Linux x86_64/aarch64"
)

NOBODY = 65534


def _now() -> tuple:
    return creds.getfsuid(), creds.getfsgid(), creds.getgroups()


def test_switch_takes_and_is_restored():
    before = _now()
    inside = creds.run_as(creds.Creds(NOBODY, NOBODY), _now)
    assert inside == (NOBODY, NOBODY, ())
    assert _now() == before
    # Only the filesystem ids: the real and effective ids never change.
    assert creds.run_as(creds.Creds(NOBODY, NOBODY), lambda: (os.getuid(), os.geteuid())) == (0, 0)


def test_restored_after_an_error():
    before = _now()

    def boom():
        assert _now()[:2] == (1234, 5678)
        raise OSError(errno.EACCES, "no")

    with pytest.raises(OSError) as ei:
        creds.run_as(creds.Creds(1234, 5678), boom)
    assert ei.value.errno == errno.EACCES
    assert _now() == before


def test_a_switch_that_does_not_take_fails_with_eperm(monkeypatch):
    real = creds.setfsuid
    # An id the kernel refuses (unmapped in a user namespace) leaves fsuid as it was.
    monkeypatch.setattr(creds, "setfsuid", lambda uid: real(0xFFFFFFFF) if uid else real(uid))
    ran = []
    with pytest.raises(FsError) as ei:
        creds.run_as(creds.Creds(NOBODY, NOBODY), ran.append, 1)
    assert ei.value.errno == errno.EPERM
    assert ran == []  # the op never ran with the server's rights
    assert _now()[:2] == (0, 0)


def test_a_restore_that_does_not_take_aborts_the_process():
    code = textwrap.dedent(
        """
        from actorfs.runtime.ops import creds
        real = creds.setfsuid
        creds.setfsuid = lambda uid: real(uid) if uid else real(0xFFFFFFFF)  # restore to 0 fails
        creds.run_as(creds.Creds(65534, 65534), lambda: None)
        print("survived")
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60
    )
    assert p.returncode == -signal.SIGABRT, (p.returncode, p.stdout, p.stderr)
    assert "survived" not in p.stdout
    assert "restore" in p.stderr


def test_credentials_are_per_thread():
    """Two threads with different fsuid/fsgid at the same moment; the main thread stays root."""
    both = threading.Barrier(3, timeout=60)
    seen = {}

    def job(uid):
        def inside():
            both.wait()  # all three threads are here at once
            seen[uid] = _now()[:2]
            both.wait()

        creds.run_as(creds.Creds(uid, uid + 1), inside)
        seen[-uid] = _now()[:2]

    threads = [threading.Thread(target=job, args=(u,)) for u in (1111, 2222)]
    for t in threads:
        t.start()
    both.wait()
    main_during = _now()[:2]
    both.wait()
    for t in threads:
        t.join(60)
    assert main_during == (0, 0)
    assert seen[1111] == (1111, 1112) and seen[2222] == (2222, 2223)
    assert seen[-1111] == seen[-2222] == (0, 0)


@pytest.fixture
def grouped_process():
    """A process running as nobody with supplementary groups 4242 and 4343."""
    p = subprocess.Popen(
        ["sleep", "60"], user=NOBODY, group=NOBODY, extra_groups=[4242, 4343],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield p
    finally:
        p.kill()
        p.wait(30)


def test_supplementary_groups_of_the_requester(grouped_process):
    pid = grouped_process.pid
    assert creds.groups_of(pid, NOBODY, NOBODY) == (4242, 4343)
    # Only while that process has the request's ids; no pid, no groups.
    assert creds.groups_of(pid, 1000, NOBODY) == ()
    assert creds.groups_of(pid, NOBODY, 1000) == ()
    assert creds.groups_of(0, NOBODY, NOBODY) == ()
    before = _now()
    other_groups = []
    go, done = threading.Event(), threading.Event()

    def other():  # a thread that exists before the switch (a new one would inherit it)
        go.wait(60)
        other_groups.append(creds.getgroups())
        done.set()

    t = threading.Thread(target=other)
    t.start()

    def inside():
        go.set()
        done.wait(60)
        return _now()

    assert creds.run_as(creds.Creds(NOBODY, NOBODY, pid), inside) == (NOBODY, NOBODY, (4242, 4343))
    t.join(60)
    assert other_groups == [before[2]]  # setgroups(2) reached this thread only
    assert _now() == before
    # Another requester with that pid (a reused pid): no supplementary groups.
    assert creds.run_as(creds.Creds(1000, 1000, pid), _now) == (1000, 1000, ())


def test_groups_decide_on_the_host(tmp_path, grouped_process):
    """A directory writable by group 4343 only: the requester creates there
    through that supplementary group."""
    d = tmp_path / "g"
    d.mkdir()
    os.chown(d, 0, 4343)
    os.chmod(d, 0o770)
    dfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        mk = lambda name: os.mkdir(name, 0o700, dir_fd=dfd)  # noqa: E731
        creds.run_as(creds.Creds(NOBODY, NOBODY, grouped_process.pid), mk, "yes")
        with pytest.raises(PermissionError):
            creds.run_as(creds.Creds(NOBODY, NOBODY), mk, "no")
    finally:
        os.close(dfd)
    st = os.stat(d / "yes")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert not (d / "no").exists()


# -- op level ---------------------------------------------------------------

WHO = RequestContext(uid=NOBODY, gid=NOBODY, pid=0)


@pytest.fixture
def no_chown(monkeypatch):
    """Any chown during the test fails it: new objects must be born owned."""

    def refuse(*a, **k):
        raise AssertionError(f"chown called: {a}")

    from actorfs.runtime.host import syscalls

    for mod, name in ((os, "chown"), (os, "fchown"), (os, "lchown"), (syscalls, "fchownat")):
        monkeypatch.setattr(mod, name, refuse)


@pytest.mark.usefixtures("syscall_mode")
async def test_creates_are_made_as_the_requester_without_chown(tmp_path, no_chown):
    os.chmod(tmp_path, 0o777)
    (tmp_path / "host").write_text("h")
    async with running(tmp_path) as fs:
        f, o = await ops.create(fs, WHO, ROOT, b"f", 0o644, os.O_RDWR)
        d = await ops.mkdir(fs, WHO, ROOT, b"d", 0o755)
        n = await ops.mknod(fs, WHO, ROOT, b"p", stat.S_IFIFO | 0o644)
        r = await ops.mknod(fs, WHO, ROOT, b"r", stat.S_IFREG | 0o600)
        s = await ops.symlink(fs, WHO, ROOT, b"s", b"f")
        ln = await ops.link(fs, WHO, f.nodeid, ROOT, b"f2")
        for e in (f, d, n, r, s, ln):
            assert (e.attr.uid, e.attr.gid) == (NOBODY, NOBODY)
        await ops.release(fs, WHO, f.nodeid, o.fh)
        # The host kernel decides, as the requester: root's 0700 directory is closed to them.
        os.mkdir(tmp_path / "closed", 0o700)
        c = await ops.lookup(fs, CTX, ROOT, b"closed")
        assert await errno_of(ops.mkdir(fs, WHO, c.nodeid, b"x", 0o755)) == errno.EACCES
        assert await errno_of(ops.create(fs, WHO, c.nodeid, b"x", 0o644, os.O_RDWR)) == errno.EACCES
        # Not a single thread kept the requester's credentials.
        assert _now()[:2] == (0, 0)
        assert await fs.pool.run(lambda: _now()[:2]) == (0, 0)
    for name in ("f", "d", "p", "r", "f2"):
        st = os.lstat(tmp_path / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    st = os.lstat(tmp_path / "s")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert not (tmp_path / "closed" / "x").exists()


@pytest.mark.usefixtures("syscall_mode")
async def test_changes_by_a_host_user_are_decided_by_the_host_kernel(tmp_path):
    """Over /dev/fuse, unlink, rename, setattr, open and xattr writes run as the
    requester: root's file in a sticky world-writable directory stays root's."""
    os.chmod(tmp_path, 0o1777)
    (tmp_path / "secret").write_text("s")
    os.chmod(tmp_path / "secret", 0o600)
    async with running(tmp_path) as fs:
        assert fs.host_callers
        e = await ops.lookup(fs, CTX, ROOT, b"secret")
        assert await errno_of(ops.unlink(fs, WHO, ROOT, b"secret")) == errno.EPERM
        assert await errno_of(ops.rename(fs, WHO, ROOT, b"secret", ROOT, b"mine")) == errno.EPERM
        assert (
            await errno_of(ops.setattr(fs, WHO, e.nodeid, SetattrArgs(FATTR_MODE, mode=0o666)))
            == errno.EPERM
        )
        assert await errno_of(ops.open(fs, WHO, e.nodeid, os.O_RDONLY)) == errno.EACCES
        assert await errno_of(ops.setxattr(fs, WHO, e.nodeid, b"user.x", b"1")) in (
            errno.EPERM,
            errno.EACCES,
        )
        # The same requester on its own file: allowed.
        f, o = await ops.create(fs, WHO, ROOT, b"own", 0o600, os.O_RDWR)
        await ops.release(fs, WHO, f.nodeid, o.fh)
        a = await ops.setattr(fs, WHO, f.nodeid, SetattrArgs(FATTR_MODE, mode=0o640))
        assert stat.S_IMODE(a.mode) == 0o640
        await ops.rename(fs, WHO, ROOT, b"own", ROOT, b"own2")
        await ops.unlink(fs, WHO, ROOT, b"own2")
        assert _now()[:2] == (0, 0)
    st = os.stat(tmp_path / "secret")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


async def test_virtiofs_requests_change_names_as_the_server(tmp_path):
    """A guest's requests carry no host process: only creates run as the guest's
    uid/gid (without groups); the guest kernel checked the rest."""
    from actorfs.runtime.fuse.dispatcher import Dispatcher

    os.chmod(tmp_path, 0o1777)
    (tmp_path / "rootfile").write_text("r")
    async with running(tmp_path) as fs:
        Dispatcher(fs, transport="virtiofs")
        assert not fs.host_callers
        d = await ops.mkdir(fs, RequestContext(NOBODY, NOBODY, os.getpid()), ROOT, b"d", 0o755)
        assert (d.attr.uid, d.attr.gid) == (NOBODY, NOBODY)
        await ops.unlink(fs, WHO, ROOT, b"rootfile")
    assert not (tmp_path / "rootfile").exists()
