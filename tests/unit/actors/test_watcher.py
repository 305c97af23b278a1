"""The watcher actor against real host files and real inotify, with a recording notifier.

The notifier here is the unit's edge (what a transport would write to the
kernel), so a plain recording class stands in for it; everything else is real:
the inode table, the supervisor, inotify, the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading

import pytest

from actorfs.actors.watcher import Watcher
from actorfs.runtime.core.abi import FUSE_ROOT_ID
from actorfs.runtime.ops.filesystem import Filesystem, FsConfig


class Recorder:
    """Implements the Notifier methods (coroutines, as runtime/fuse/notify.py declares them)."""

    def __init__(self, delete_ok: bool = True, on_inode=None):
        self.calls: list[tuple] = []
        self.delete_ok = delete_ok
        self.on_inode = on_inode

    def _record(self, call):
        self.calls.append(call)

    async def inval_inode(self, nodeid, off=0, length=0):
        extra = self.on_inode(nodeid) if self.on_inode else None
        self._record(("inval_inode", nodeid, off, length, extra))
        return True

    async def inval_entry(self, parent, name):
        self._record(("inval_entry", parent, name))
        return True

    async def delete(self, parent, child, name):
        self._record(("delete", parent, child, name))
        return self.delete_ok

    # views
    def inode(self, nodeid):
        return [c for c in self.calls if c[0] == "inval_inode" and c[1] == nodeid]

    def entries(self, parent=None):
        return [c for c in self.calls if c[0] != "inval_inode" and parent in (None, c[1])]

    def names(self):
        return {c[-1] for c in self.calls if c[0] != "inval_inode"}


class SyncRecorder(Recorder):
    """A synchronous notifier: the watcher calls it from its own thread."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def _record(self, call):
        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.calls.append(call)

    def inval_inode(self, nodeid, off=0, length=0):
        extra = self.on_inode(nodeid) if self.on_inode else None
        self._record(("inval_inode", nodeid, off, length, extra))
        return True

    def inval_entry(self, parent, name):
        self._record(("inval_entry", parent, name))
        return True

    def delete(self, parent, child, name):
        self._record(("delete", parent, child, name))
        return self.delete_ok


async def until(pred, what: str, timeout: float = 10.0):
    """Poll `pred` until true (not a timing assertion: the bound is only a hang guard)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def watched_fs(root, notifier, **kw):
    fs = Filesystem(FsConfig(root=str(root), watch=False))
    fs.watcher = Watcher(fs, notifier, window=0.01, **kw)
    try:
        async with fs.supervisor.started(fs.actors()):
            yield fs
    finally:
        fs.pool.shutdown()


async def lookup(fs, parent: int, name: bytes, watch: bool | None = None) -> int:
    """Register parent/name in the inode table as a LOOKUP would; optionally watch it."""
    pfd, _ = await fs.inodes.dup_fd(parent)
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    finally:
        os.close(pfd)
    st = os.fstat(fd)
    nodeid = await fs.inodes.register(parent, name, fd, st)
    if watch:
        wfd, kind = await fs.inodes.dup_fd(nodeid)
        assert fs.watcher.watch(nodeid, wfd, os.path.isdir(f"/proc/self/fd/{wfd}"), parent, name)
    return nodeid


async def sentinel(fs, rec, directory, parent: int, tag: str):
    """Create a name in a watched directory and wait for its notice: every earlier
    event was handled by then (inotify events are ordered)."""
    name = f".sentinel-{tag}".encode()
    open(os.path.join(directory, os.fsdecode(name)), "w").close()
    await until(lambda: (parent, name) in {(c[1], c[-1]) for c in rec.entries()}, f"sentinel {tag}")


def watcher_fds() -> set[str]:
    """This process's open fds (without the one the listing itself used)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.readlink(f"/proc/self/fd/{fd}")
            out.add(fd)
    return out


def inotify_watch_count(w: Watcher) -> int:
    with open(f"/proc/self/fdinfo/{w._ino.fd}") as f:
        return sum(1 for line in f if line.startswith("inotify wd:"))


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Recorder, SyncRecorder])
async def test_content_change_invalidates_data_and_attrs(tmp_path, kind):
    (tmp_path / "f").write_bytes(b"old")
    rec = kind()
    async with watched_fs(tmp_path, rec) as fs:
        f = await lookup(fs, FUSE_ROOT_ID, b"f", watch=True)
        with open(tmp_path / "f", "r+b") as fh:
            fh.write(b"new")
        await until(lambda: any(c[2:4] == (0, 0) for c in rec.inode(f)), "data notice")
        await sentinel(fs, rec, tmp_path, FUSE_ROOT_ID, "a")
        assert rec.names() == {b".sentinel-a"}, rec.calls  # no entry notice for a write
        st = fs.watcher.stats()
        assert st["sent"]["inval_inode"] >= 1 and st["events"] >= 2
    if kind is SyncRecorder:
        assert rec.threads == {t for t in rec.threads if t.startswith("actorfs-notify")}


async def test_attribute_change_is_attrs_only_and_never_an_entry_notice(tmp_path):
    (tmp_path / "opened").write_bytes(b"x")
    (tmp_path / "looked_up").write_bytes(b"y")
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        opened = await lookup(fs, FUSE_ROOT_ID, b"opened", watch=True)
        looked = await lookup(fs, FUSE_ROOT_ID, b"looked_up")  # seen via the directory watch
        os.chmod(tmp_path / "opened", 0o600)
        os.utime(tmp_path / "opened", (1, 2))
        os.chmod(tmp_path / "looked_up", 0o640)
        os.utime(tmp_path / "looked_up", (3, 4))
        await until(lambda: rec.inode(opened) and rec.inode(looked), "attr notices")
        await sentinel(fs, rec, tmp_path, FUSE_ROOT_ID, "b")
        for nodeid in (opened, looked):
            # off -1: attributes only, the cached pages stay
            assert {c[2] for c in rec.inode(nodeid)} == {-1}, rec.calls
        assert rec.names() == {b".sentinel-b"}, rec.calls


async def test_truncate_of_a_looked_up_child_invalidates_its_data(tmp_path):
    (tmp_path / "t").write_bytes(b"0123456789")
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        t = await lookup(fs, FUSE_ROOT_ID, b"t")
        os.truncate(tmp_path / "t", 3)
        await until(lambda: any(c[2] == 0 for c in rec.inode(t)), "data notice for the child")
        await sentinel(fs, rec, tmp_path, FUSE_ROOT_ID, "c")
        assert rec.names() == {b".sentinel-c"}


async def test_names_in_a_watched_directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "gone").write_bytes(b"g")
    (d / "moved").write_bytes(b"m")
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        dn = await lookup(fs, FUSE_ROOT_ID, b"d", watch=True)
        gone = await lookup(fs, dn, b"gone")
        await lookup(fs, dn, b"moved")
        (d / "new").write_bytes(b"n")  # IN_CREATE: a negative dentry may exist
        os.unlink(d / "gone")
        os.rename(d / "moved", d / "renamed")
        os.rename(d / "renamed", tmp_path / "out")  # out of the directory
        await sentinel(fs, rec, d, dn, "d")
        entries = set(rec.entries(dn))
        assert ("delete", dn, gone, b"gone") in entries  # child known: DELETE
        for name in (b"new", b"moved", b"renamed"):
            assert ("inval_entry", dn, name) in entries, rec.calls
        # the directory's own attributes and readdir cache
        assert any(c[2:4] == (0, 0) for c in rec.inode(dn))
        # the root saw "out" arrive
        await until(lambda: ("inval_entry", FUSE_ROOT_ID, b"out") in rec.calls, "root entry")


async def test_refused_delete_falls_back_to_inval_entry(tmp_path):
    (tmp_path / "x").write_bytes(b"x")
    rec = Recorder(delete_ok=False)
    async with watched_fs(tmp_path, rec) as fs:
        x = await lookup(fs, FUSE_ROOT_ID, b"x")
        os.unlink(tmp_path / "x")
        await until(lambda: ("inval_entry", FUSE_ROOT_ID, b"x") in rec.calls, "fallback")
        assert ("delete", FUSE_ROOT_ID, x, b"x") in rec.calls
        assert fs.watcher.stats()["undelivered"]["delete"] == 1


async def test_watch_follows_the_inode_across_a_host_rename(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "a").write_bytes(b"a")
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        sn = await lookup(fs, FUSE_ROOT_ID, b"sub")  # not watched: only the file's own watch
        a = await lookup(fs, sn, b"a", watch=True)
        os.rename(sub / "a", sub / "b")
        await until(lambda: ("inval_entry", sn, b"a") in rec.calls, "old name dropped")
        n = len(rec.inode(a))
        with open(sub / "b", "ab") as fh:  # still the client's nodeid a
            fh.write(b"more")
        await until(lambda: any(c[2] == 0 for c in rec.inode(a)[n:]), "data notice after rename")
        assert a in await fs.watcher.watched()


@pytest.mark.parametrize("kind", [Recorder, SyncRecorder])
async def test_burst_is_coalesced_and_the_last_notice_sees_the_final_state(tmp_path, kind):
    path = tmp_path / "burst"
    path.write_bytes(b"")
    writes = 10_000

    def size_now(nodeid):  # what a client re-reading after this notice would see
        return os.stat(path).st_size

    rec = kind(on_inode=size_now)
    async with watched_fs(tmp_path, rec) as fs:
        b = await lookup(fs, FUSE_ROOT_ID, b"burst", watch=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(writes):
                os.write(fd, b"x")
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let the watcher read as events come
        finally:
            os.close(fd)
        await until(
            lambda: any(c[4] == writes for c in rec.inode(b)), "a notice after the last write"
        )
        st = fs.watcher.stats()
        notices = len(rec.inode(b))
        assert notices * 10 < writes, (notices, st)
        assert st["coalesced"] > 0
        assert rec.inode(b)[-1][4] == writes
        assert rec.names() == set()  # content only: no entry notices


async def test_queue_overflow_invalidates_everything_known(tmp_path):
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        limit = int(f.read())
    sub = tmp_path / "s"
    sub.mkdir()
    for n in ("a", "b", "c"):
        (sub / n).write_bytes(b"")
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        sn = await lookup(fs, FUSE_ROOT_ID, b"s", watch=True)
        a = await lookup(fs, sn, b"a", watch=True)
        b = await lookup(fs, sn, b"b", watch=True)
        c = await lookup(fs, sn, b"c", watch=True)
        await fs.watcher.watched()  # the watches are in place
        fa = os.open(sub / "a", os.O_WRONLY | os.O_APPEND)
        fb = os.open(sub / "b", os.O_WRONLY | os.O_APPEND)
        try:
            # Alternating files: no two consecutive events are equal, so the
            # kernel cannot merge them; the loop is blocked, nobody reads.
            for _ in range(limit // 2 + 100):
                os.write(fa, b"1")
                os.write(fb, b"2")
            # c is replaced while events are being lost
            (sub / "c.tmp").write_bytes(b"new c")
            os.rename(sub / "c.tmp", sub / "c")
        finally:
            os.close(fa)
            os.close(fb)
        await until(lambda: fs.watcher.stats()["overflows"] >= 1, "overflow counted")
        for nodeid in (FUSE_ROOT_ID, sn, a, b, c):
            await until(lambda n=nodeid: any(c[2] == 0 for c in rec.inode(n)), f"{nodeid} data")
        # c's name now leads to another inode: its entry goes; a and b still
        # lead where the client thinks, so their dentries are left alone.
        await until(lambda: ("inval_entry", sn, b"c") in rec.calls, "entry c")
        assert ("inval_entry", sn, b"a") not in rec.calls
        assert ("inval_entry", sn, b"b") not in rec.calls
        assert fs.watcher.stats()["entries_unchanged"] >= 2


async def test_the_clients_own_create_is_not_echoed_as_an_entry_notice(tmp_path):
    """A name created through the server (registered in the inode table, as the
    create/mkdir ops do) still leads to that inode: no entry notice, which would
    drop the client's fresh dentry (and unhash a new directory used as a cwd)."""
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        await fs.watcher.watched()
        os.mkdir(tmp_path / "made_by_client")
        await lookup(fs, FUSE_ROOT_ID, b"made_by_client")
        (tmp_path / "made_on_host").write_bytes(b"")  # nobody registered it
        await until(lambda: ("inval_entry", FUSE_ROOT_ID, b"made_on_host") in rec.calls, "host")
        await until(lambda: fs.watcher.stats()["entries_unchanged"] >= 1, "echo skipped")
        assert ("inval_entry", FUSE_ROOT_ID, b"made_by_client") not in rec.calls


async def test_unwatch_stops_notices_and_removes_the_kernel_watch(tmp_path):
    sub = tmp_path / "u"
    sub.mkdir()
    (sub / "f").write_bytes(b"")
    (sub / "g").write_bytes(b"")
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        un = await lookup(fs, FUSE_ROOT_ID, b"u")  # the directory itself is not watched
        f = await lookup(fs, un, b"f", watch=True)
        g = await lookup(fs, un, b"g", watch=True)
        await fs.watcher.watched()
        before = inotify_watch_count(fs.watcher)
        assert fs.watcher.unwatch(f)
        assert f not in await fs.watcher.watched()
        assert inotify_watch_count(fs.watcher) == before - 1
        (sub / "f").write_bytes(b"changed")
        (sub / "g").write_bytes(b"changed")  # ordered after f's change
        await until(lambda: rec.inode(g), "g's notice")
        assert rec.inode(f) == []
        assert fs.watcher.stats()["watches_removed"] == 1


async def test_watch_is_idempotent_and_bounded(tmp_path):
    for n in ("a", "b", "c"):
        (tmp_path / n).write_bytes(b"")
    rec = Recorder()
    async with watched_fs(tmp_path, rec, max_watches=3) as fs:  # the root takes one
        a, b, c = [await lookup(fs, FUSE_ROOT_ID, n) for n in (b"a", b"b", b"c")]
        fds = watcher_fds()
        for nodeid in (a, a, b, c):  # a twice: the second fd is closed, nothing added
            wfd, _ = await fs.inodes.dup_fd(nodeid)
            fs.watcher.watch(nodeid, wfd, False)
        assert set(await fs.watcher.watched()) == {FUSE_ROOT_ID, a, b}  # c: over the bound
        st = fs.watcher.stats()
        assert st["watches_added"] == 3 and st["watches_refused"] == 1
        assert st["watches_active"] == 3
        assert inotify_watch_count(fs.watcher) == 3
        assert watcher_fds() == fds  # every handed-over fd was closed


async def test_notifier_swap_and_no_notifier(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    first, second = Recorder(), Recorder()
    async with watched_fs(tmp_path, first) as fs:
        f = await lookup(fs, FUSE_ROOT_ID, b"f", watch=True)
        (tmp_path / "f").write_bytes(b"1")
        await until(lambda: first.inode(f), "first notifier")
        fs.watcher.set_notifier(second)
        await fs.watcher.watched()  # the swap went through the mailbox
        n = len(first.calls)
        (tmp_path / "f").write_bytes(b"2")
        await until(lambda: second.inode(f), "second notifier")
        assert len(first.calls) == n
        fs.watcher.set_notifier(None)
        await fs.watcher.watched()
        (tmp_path / "f").write_bytes(b"3")
        await until(lambda: fs.watcher.stats()["undelivered"]["inval_inode"] >= 1, "counted")


async def test_clean_stop_leaves_no_fd_and_no_thread(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "d").mkdir()
    before = watcher_fds()
    rec = SyncRecorder()
    async with watched_fs(tmp_path, rec) as fs:
        f = await lookup(fs, FUSE_ROOT_ID, b"f", watch=True)
        await lookup(fs, FUSE_ROOT_ID, b"d", watch=True)
        (tmp_path / "f").write_bytes(b"x")
        await until(lambda: rec.inode(f), "a notice (the notify thread ran)")
        w = fs.watcher
        assert w.running
    assert not w.running
    assert w._ino.closed
    # the pool's threads may take a moment to exit; the notify thread must be gone
    await until(lambda: not any(t.name.startswith("actorfs-notify") for t in threading.enumerate()),
                "notify thread exit")  # fmt: skip
    assert watcher_fds() == before
    assert w.watch(99, os.dup(0), False) is False  # stopped: refused, fd closed
    assert watcher_fds() == before


async def test_restart_after_a_crash_keeps_watching(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        f = await lookup(fs, FUSE_ROOT_ID, b"f", watch=True)
        fs.watcher.inject_crash = RuntimeError("injected")
        fs.watcher.unwatch(12345)  # the message that trips it
        await until(lambda: fs.supervisor.crashes, "crash seen")
        await until(lambda: fs.watcher.running, "restarted")
        (tmp_path / "f").write_bytes(b"after")
        await until(lambda: rec.inode(f), "notice after restart")


async def test_watch_file_by_nodeid_for_a_dax_mapping(tmp_path):
    sub = tmp_path / "m"
    sub.mkdir()
    (sub / "mapped").write_bytes(b"\0" * 4096)
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        mn = await lookup(fs, FUSE_ROOT_ID, b"m")  # directory not watched
        f = await lookup(fs, mn, b"mapped")
        assert await fs.watcher.watch_file(f)
        assert f in await fs.watcher.watched()
        os.truncate(sub / "mapped", 8192)
        await until(lambda: any(c[2] == 0 for c in rec.inode(f)), "size change notice")


async def test_a_watcher_that_never_ran_holds_nothing(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    before = watcher_fds()
    fs = Filesystem(FsConfig(root=str(tmp_path), watch=False))
    w = Watcher(fs, Recorder())
    assert watcher_fds() - before == {str(fs.inodes.root_fd)}  # only the table's root fd
    fd = os.open(tmp_path / "f", os.O_PATH)
    assert w.watch(5, fd, False)  # queued until run()
    w.close()
    fs.inodes.close()
    fs.pool.shutdown()
    assert watcher_fds() == before


async def test_stop_with_queued_watches_closes_their_fds(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    rec = Recorder()
    async with watched_fs(tmp_path, rec) as fs:
        await fs.watcher.watched()
        fds = watcher_fds()
        fs.watcher.stop()  # the stop marker goes first: later messages are never handled
        fd = os.open(tmp_path / "f", os.O_PATH)
        fs.watcher.watch(7, fd, False)  # stopped: refused here, fd closed
        await until(lambda: not fs.watcher.running, "stopped")
        assert watcher_fds() <= fds


async def test_a_failing_notifier_is_counted_and_does_not_stop_the_notices(tmp_path):
    (tmp_path / "f").write_bytes(b"")

    class Broken(Recorder):
        async def inval_inode(self, nodeid, off=0, length=0):
            await super().inval_inode(nodeid, off, length)
            raise OSError(5, "transport gone")

    rec = Broken()
    async with watched_fs(tmp_path, rec) as fs:
        f = await lookup(fs, FUSE_ROOT_ID, b"f", watch=True)
        (tmp_path / "f").write_bytes(b"1")
        await until(lambda: fs.watcher.stats()["undelivered"]["inval_inode"] >= 1, "counted")
        (tmp_path / "new").write_bytes(b"")  # later notices still go out
        await until(lambda: ("inval_entry", FUSE_ROOT_ID, b"new") in rec.calls, "next notice")
        assert rec.inode(f)


async def test_the_kernel_dropping_a_watch_drops_ours(tmp_path):
    """A deleted inode nobody pins: IN_DELETE_SELF then IN_IGNORED end the watch."""
    (tmp_path / "doomed").write_bytes(b"")
    rec = Recorder()
    w = Watcher(None, rec, window=0.01)  # no inode table: nothing pins the file
    task = asyncio.create_task(w.run())
    try:
        assert w.watch(42, os.open(tmp_path / "doomed", os.O_PATH), False, 7, b"doomed")
        assert 42 in await w.watched()
        os.unlink(tmp_path / "doomed")
        await until(lambda: w.stats()["watches_active"] == 0, "watch dropped")
        await until(lambda: ("inval_entry", 7, b"doomed") in rec.calls, "its name dropped")
        assert w.stats()["watches_removed"] == 1
    finally:
        w.stop()
        await task
        w.close()
