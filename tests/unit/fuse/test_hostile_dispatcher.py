"""A hostile client against the real dispatcher and op layer, no kernel in between.

Invariants checked after every scenario: no exception escapes, nothing hangs
(every wait is bounded), every frame gets exactly one reply or a documented
drop, no host object beside the root is read, written, created or listed (the
canary), and once the client gives back every lookup and fh the inode table is
down to the root, no handle is left and the fd count is back where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import struct
import threading
from collections import Counter

import pytest

from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.fuse.dispatcher import MAX_WRITE
from actorfs.runtime.ops.filesystem import FsConfig
from tests.support.hostile_client import (
    HOSTILE_NAMES,
    ROOT,
    U64,
    Canary,
    HostileClient,
    RandomRequests,
    fd_count,
    scratch_tmpfs,
    session,
)

FRAMES = int(os.environ.get("ACTORFS_HOSTILE_FRAMES", "6000"))


@pytest.fixture
def area(tmp_path):
    """(root, canary): a root and a canary beside it on a small strictatime tmpfs."""
    base = tmp_path / "area"
    with scratch_tmpfs(str(base)):
        root = base / "root"
        root.mkdir()
        canary = Canary(str(base / "canary"))
        yield root, canary
        canary.check()


def plant(root, canary: Canary) -> None:
    """A tree with every kind of object, and symlinks aimed at the canary."""
    c = os.fsdecode(canary.path)
    (root / "d" / "sub").mkdir(parents=True)
    (root / "f").write_bytes(b"0123456789" * 100)
    (root / "d" / "g").write_bytes(b"g")
    os.mkfifo(root / "fifo")
    os.link(root / "f", root / "d" / "hard")
    os.symlink(c, root / "abs")
    os.symlink("../canary/secret", root / "up")
    os.symlink("../../canary", root / "d" / "upup")
    os.symlink("d/../../canary/sub", root / "mixed")
    os.symlink("d", root / "s")  # stays inside: allowed
    os.symlink("nowhere", root / "broken")



async def settle_and_check(fs, client: HostileClient, fds_before: int) -> None:
    """Replies accounted, every lookup and fh given back, nothing left behind."""
    await client.settle()
    client.check_replies()
    await client.release_all()
    await client.forget_all()
    await client.settle()
    counts = await fs.inodes.counts()
    assert counts["inodes"] == 1, f"inodes left after forgetting everything: {counts}"
    assert await fs.handles.count() == 0
    assert fd_count() <= fds_before, "fds leaked"


async def run_random(client: HostileClient, rng: random.Random, n: int, burst: int = 16) -> None:
    """n random frames, submitted in bursts that run concurrently."""
    gen = RandomRequests(rng, client.books)
    for i in range(n):
        frame = gen.frame()
        await client.send_frame(frame)
        opcode, _ = _opcode(frame)
        if opcode == P.FUSE_DESTROY and client.d.init is None:
            await client.settle()
            await client.init()  # a guest remounting: a fresh session on the same server
        if i % burst == burst - 1:
            await client.settle()


def _opcode(frame: bytes):
    from tests.support.hostile_client import expected_replies

    return expected_replies(frame)


# -- random and adversarial frames --------------------------------------------------------------


@pytest.mark.parametrize("policy", ["opaque", "deny"])
async def test_random_frames_against_a_real_tree(area, policy, caplog):
    root, canary = area
    plant(root, canary)
    async with session(root, symlinks=policy) as (fs, client):
        fds = fd_count()
        # hold a few nodeids and fhs first, as a kernel would have
        for name in (b"d", b"f", b"s", b"fifo"):
            await client.lookup(ROOT, name)
        _, d = await client.lookup(ROOT, b"d")
        await client.lookup(d, b"g")
        await client.open((await client.lookup(ROOT, b"f"))[1])
        await client.opendir(d)
        await run_random(client, random.Random(f"hostile-{policy}"), FRAMES)
        await settle_and_check(fs, client, fds)
        stats = client.d.stats()
        # the run really exercised the op layer, not only the decoder
        ok = [r.opcode for u in client.books.replies.values() for r in u if not r.error]
        print(f"{FRAMES} frames, {len(ok)} succeeded, errors: {dict(client.books.errors)}")
        eio = Counter(P.OPCODE_NAMES.get(r.opcode) for u in client.books.replies.values()
                      for r in u if r.error == -errno.EIO)  # fmt: skip
        print("EIO by opcode:", dict(eio))
        # the run really exercised the op layer, not only the decoder
        assert len(ok) > FRAMES // 50 and len(set(ok)) >= 15, sorted(set(ok))
        # no op failed with a bug (an exception that is not an errno)
        bugs = [r for r in caplog.records if r.name == "actorfs.dispatcher" and r.levelname == "ERROR"]
        assert not bugs, bugs[0].getMessage() + "\n" + (bugs[0].exc_text or "")
        assert stats["in_flight"] == 0


async def test_every_opcode_on_never_issued_and_forgotten_nodeids_and_fhs(area):
    root, canary = area
    plant(root, canary)
    async with session(root) as (fs, client):
        fds = fd_count()
        err, f = await client.lookup(ROOT, b"f")
        assert not err
        await client.forget(f, 1)
        await client.settle()
        gen = RandomRequests(random.Random(7), client.books)
        for opcode in sorted(P.REQUESTS):
            if opcode in (P.FUSE_INIT, P.FUSE_DESTROY, P.FUSE_INTERRUPT):
                continue
            for nodeid in (f, 0, 1 << 40, U64):
                msg = gen.message(opcode)
                msg.h.nodeid = nodeid
                for name in ("fh", "fh_in", "fh_out"):
                    if hasattr(msg, name):
                        setattr(msg, name, 1 << 40)
                for name in ("oldnodeid", "nodeid_out", "newdir"):
                    if hasattr(msg, name):
                        setattr(msg, name, nodeid)
                if opcode in P.NO_REPLY_OPCODES:
                    await client.send(msg)
                    continue
                err, payload = await client.call(msg)
                if opcode == P.FUSE_LOOKUP and not err:  # a negative entry is a miss too
                    assert struct.unpack_from("<Q", payload)[0] == 0
                    continue
                # unknown nodeid: ENOENT; unknown fh: EBADF; malformed: EINVAL...
                assert err < 0, f"{P.OPCODE_NAMES[opcode]} on nodeid {nodeid} succeeded"
        # the server is still fine
        err, g = await client.lookup(ROOT, b"f")
        assert not err and g != f  # nodeids are never reused
        await settle_and_check(fs, client, fds)


async def test_forget_more_than_looked_up(area):
    root, canary = area
    plant(root, canary)
    async with session(root) as (fs, client):
        fds = fd_count()
        _, a = await client.lookup(ROOT, b"f")
        _, a2 = await client.lookup(ROOT, b"f")
        assert a == a2
        # FORGET of 2**64-1 lookups, of the root, of unknown nodeids, twice
        for nodeid, n in ((a, U64), (a, 1), (ROOT, U64), (12345, 1), (0, 0)):
            await client.send(P.Forget(h=P.InHeader(nodeid=nodeid), nlookup=n))
        await client.send(P.BatchForget(count=3, forgets=[(a, 5), (a, 5), (ROOT, 9)]))
        await client.settle()
        client.books.lookups.clear()
        assert (await fs.inodes.counts())["inodes"] == 1
        # the root still answers and "f" is found again under a new nodeid
        err, _ = await client.call(P.Getattr(h=P.InHeader(nodeid=ROOT)))
        assert not err
        err, b = await client.lookup(ROOT, b"f")
        assert not err and b not in (a, 0)
        err, _ = await client.call(P.Getattr(h=P.InHeader(nodeid=a)))
        assert err == -errno.ENOENT
        # FORGET of 0 lookups does not drop a live inode
        await client.send(P.Forget(h=P.InHeader(nodeid=b), nlookup=0))
        await client.settle()
        assert (await client.call(P.Getattr(h=P.InHeader(nodeid=b))))[0] == 0
        await settle_and_check(fs, client, fds)


async def test_huge_sizes_and_offsets(area):
    root, canary = area
    plant(root, canary)
    big = [2**31, 2**32 - 1, 2**63 - 1, 2**63, U64]
    async with session(root) as (fs, client):
        fds = fd_count()
        _, f = await client.lookup(ROOT, b"f")
        _, fh = await client.open(f)
        for off in big:
            err, data = await client.read(f, fh, off, 2**32 - 1)
            assert err in (0, -errno.EINVAL, -errno.EOVERFLOW) and (err or data == b"")
            err, _ = await client.write(f, fh, off, b"x")
            if off >= 2**63 - 1:  # beyond what off_t holds: refused, never wrapped
                assert err in (-errno.EFBIG, -errno.EINVAL), err
            for msg in (
                P.Fallocate(fh=fh, offset=off, length=2**40),
                P.Fallocate(fh=fh, offset=0, length=off),
                P.Lseek(fh=fh, offset=off, whence=os.SEEK_DATA),
                P.CopyFileRange(fh_in=fh, off_in=off, nodeid_out=f, fh_out=fh, off_out=off,
                                len=U64),  # fmt: skip
                P.Setattr(valid=1 << 3, size=off),  # FATTR_SIZE
                P.Getxattr(size=2**32 - 1, name=b"user.none"),
                P.Listxattr(size=2**32 - 1),
                P.Readdir(fh=fh, offset=off, size=2**32 - 1),
            ):
                msg.h = P.InHeader(nodeid=f)
                err, _ = await client.call(msg)
                assert err <= 0
        # a READ of 4 GiB gets at most what INIT negotiated (max_pages pages): the
        # kernel never asks for more, and a hostile client must not make us allocate it
        err, data = await client.read(f, fh, 0, 2**32 - 1)
        assert not err and data[:1000] == b"0123456789" * 100
        assert len(data) <= MAX_WRITE, f"a READ reply of {len(data)} bytes"
        # the file is still whole and the tmpfs has room (no runaway allocation)
        st = os.statvfs(root)
        assert st.f_bavail * st.f_frsize > 16 << 20
        await settle_and_check(fs, client, fds)
    with open(root / "f", "rb") as f:  # sparse and huge now: read the head only
        assert f.read(1000) == b"0123456789" * 100


async def test_hostile_names_reach_nothing(area):
    root, canary = area
    plant(root, canary)
    before = sorted(os.listdir(root))
    async with session(root) as (fs, client):
        fds = fd_count()
        _, d = await client.lookup(ROOT, b"d")
        for name in HOSTILE_NAMES:
            for parent in (ROOT, d):
                h = P.InHeader(nodeid=parent)
                msgs = [
                    P.Lookup(h=h, name=name),
                    P.Mkdir(h=h, mode=0o755, name=name),
                    P.Mknod(h=h, mode=0o100644, name=name),
                    P.Create(h=h, flags=os.O_RDWR, mode=0o644, name=name),
                    P.Symlink(h=h, name=name, target=b"/"),
                    P.Unlink(h=h, name=name),
                    P.Rmdir(h=h, name=name),
                    P.Rename(h=h, newdir=ROOT, name=name, newname=b"moved"),
                    P.Rename(h=h, newdir=ROOT, name=b"f", newname=name),
                    P.Link(h=h, oldnodeid=d, name=name),
                ]
                for msg in msgs:
                    err, _ = await client.call(msg)
                    trimmed = name.split(b"\0")[0]  # a NUL ends the name on the wire
                    if trimmed in (b"-", b"...", b"x" * 255) or (
                        trimmed and trimmed not in (b".", b"..") and b"/" not in trimmed
                        and len(trimmed) <= 255 and trimmed in (b"name", b"..\xff", b"\xff\xfe")
                    ):  # fmt: skip
                        continue  # a legal name: whatever the op says is fine
                    assert err in (-errno.EINVAL, -errno.ENAMETOOLONG, -errno.ENOENT,
                                   -errno.EPERM, -errno.EACCES), (msg, err)  # fmt: skip
        await settle_and_check(fs, client, fds)
    # only legal names were created, and all of them inside the root
    created = set(os.listdir(root)) - set(before)
    for n in created:
        assert "/" not in n and n not in (".", "..")


async def test_write_read_through_replies_is_exact(area):
    """The reply to a READ is what was written, bytes for bytes (no stale or torn data)."""
    root, canary = area
    async with session(root) as (fs, client):
        fds = fd_count()
        err, f, fh = await client.create(ROOT, b"data")
        assert not err
        rng = random.Random(3)
        model = bytearray()
        for _ in range(200):
            off = rng.randrange(0, 70000)
            data = rng.randbytes(rng.randrange(1, 9000))
            err, n = await client.write(f, fh, off, data)
            assert not err and n == len(data)
            if len(model) < off:
                model += bytes(off - len(model))
            model[off : off + len(data)] = data
        err, got = await client.read(f, fh, 0, 1 << 20)
        assert not err and got == bytes(model)
        await settle_and_check(fs, client, fds)
    assert (root / "data").read_bytes() == bytes(model)


# -- races -----------------------------------------------------------------------------------------


async def test_rename_storm_racing_lookups(area):
    """Many tasks rename directories back and forth while others look up, list and create;
    the host swaps a directory for a symlink to the canary at the same time."""
    root, canary = area
    for i in range(4):
        (root / f"d{i}" / "inner").mkdir(parents=True)
        (root / f"d{i}" / "inner" / "file").write_text(str(i))
    (root / "hostdir").mkdir()
    (root / "hostdir" / "mine").write_text("mine")
    stop = threading.Event()

    def host_swapper():
        # the host replaces hostdir by a symlink to the canary and back, in a loop
        c = os.fsdecode(canary.path)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                os.rename(root / "hostdir", root / "hostdir.real")
                os.symlink(c, root / "hostdir")
                os.unlink(root / "hostdir")
                os.rename(root / "hostdir.real", root / "hostdir")

    async with session(root, max_in_flight=128) as (fs, client):
        fds = fd_count()
        _, held = await client.lookup(ROOT, b"hostdir")
        thread = threading.Thread(target=host_swapper, daemon=True)
        thread.start()
        rng = random.Random(11)
        names = [b"d0", b"d1", b"d2", b"d3", b"x", b"y", b"hostdir", b"hostdir.real"]

        async def renamer(k):
            for _ in range(150):
                a, b = rng.sample(names[:6], 2)
                flags = rng.choice([0, 0, 1, 2])  # RENAME_NOREPLACE, RENAME_EXCHANGE
                msg = P.Rename2(h=P.InHeader(nodeid=ROOT), newdir=ROOT, name=a, newname=b,
                                flags=flags)  # fmt: skip
                await client.call(msg)

        async def looker(k):
            for _ in range(150):
                name = rng.choice(names)
                err, nodeid = await client.lookup(ROOT, name)
                if err:
                    continue
                await client.lookup(nodeid, b"inner")
                await client.lookup(nodeid, b"secret")  # only the canary has one
                err, dfh = await client.opendir(nodeid)
                if not err:
                    err, entries = await client.readdirplus(nodeid, dfh)
                    assert b"secret" not in {n for _, n in entries}
                # lookups through the held nodeid see the real directory, never the canary
                err, _ = await client.lookup(held, b"secret")
                assert err == -errno.ENOENT
                err, _ = await client.lookup(held, b"mine")
                assert err == 0

        async def creator(k):
            for i in range(100):
                err, nodeid = await client.lookup(ROOT, rng.choice(names[:4]))
                if not err:
                    await client.create(nodeid, b"c%d-%d" % (k, i))
                    await client.mkdir(held, b"m%d-%d" % (k, i))

        try:
            await asyncio.wait_for(
                asyncio.gather(*(renamer(k) for k in range(6)), *(looker(k) for k in range(8)),
                               *(creator(k) for k in range(3))),
                timeout=240,
            )  # fmt: skip
        finally:
            stop.set()
            thread.join()
        await settle_and_check(fs, client, fds)
    # nothing the client made landed outside the root
    made = [p for p in root.rglob("*") if p.name.startswith(("c", "m")) and "-" in p.name]
    assert len(made) > 0


async def test_client_swaps_held_directory_for_symlink_to_canary(area):
    root, canary = area
    (root / "d").mkdir()
    (root / "d" / "own").write_text("own")
    for policy in ("opaque", "deny", "follow"):
        async with session(root, symlinks=policy) as (fs, client):
            fds = fd_count()
            _, d = await client.lookup(ROOT, b"d")
            err, _ = await client.call(
                P.Symlink(h=P.InHeader(nodeid=ROOT), name=b"s", target=canary.path)
            )
            if policy == "deny":
                assert err == -errno.EPERM
                os.symlink(canary.path, root / "s")  # the host plants it instead
            await client.call(P.Rename(h=P.InHeader(nodeid=ROOT), newdir=ROOT, name=b"d",
                                       newname=b"d-old"))  # fmt: skip
            err, _ = await client.call(P.Rename(h=P.InHeader(nodeid=ROOT), newdir=ROOT, name=b"s",
                                                newname=b"d"))  # fmt: skip
            assert not err
            # the held nodeid is still the real directory
            assert (await client.lookup(d, b"own"))[0] == 0
            assert (await client.lookup(d, b"secret"))[0] == -errno.ENOENT
            e2, _, fh = await client.create(d, b"made-" + policy.encode())
            assert e2 == 0
            err, _ = await client.lookup(ROOT, b"d")
            if policy == "deny":
                assert err == -errno.EACCES
            else:
                # opaque: served as the link itself, never followed by the server;
                # follow: the documented escape hatch for a trusted tenant
                assert not err
            await settle_and_check(fs, client, fds)
        os.unlink(root / "d")
        os.rename(root / "d-old", root / "d")
    assert sorted(p.name for p in (root / "d").iterdir()) == [
        "made-deny", "made-follow", "made-opaque", "own"
    ]  # fmt: skip


@pytest.mark.parametrize("policy", ["opaque", "deny", "follow"])
async def test_symlinks_to_absolute_and_dotdot_targets(area, policy):
    root, canary = area
    plant(root, canary)
    async with session(root, symlinks=policy) as (fs, client):
        fds = fd_count()
        _, d = await client.lookup(ROOT, b"d")
        escaping = [(ROOT, b"abs"), (ROOT, b"up"), (d, b"upup"), (ROOT, b"mixed")]
        for parent, name in escaping:
            err, nodeid = await client.lookup(parent, name)
            if policy == "follow":
                # followed by design (a trusted tenant); the canary fixture is told below
                continue
            if policy == "opaque":
                # the link itself: its text is the client's business, never followed here
                assert not err, (name, err)
                err, target = await client.call(P.Readlink(h=P.InHeader(nodeid=nodeid)))
                assert not err and target == os.readlink(root / os.fsdecode(name) if parent == ROOT
                                                         else root / "d" / os.fsdecode(name)).encode()  # fmt: skip
                err, _ = await client.open(nodeid, os.O_RDONLY)
                assert err == -errno.ELOOP
                continue
            assert err == -errno.EACCES, (name, err)
        err, s = await client.lookup(ROOT, b"s")
        assert not err
        # READLINK on an in-root link returns its text; OPEN never follows it
        if policy != "follow":
            err, target = await client.call(P.Readlink(h=P.InHeader(nodeid=s)))
            assert not err and target == b"d"
            err, _ = await client.open(s, os.O_RDONLY)
            assert err == -errno.ELOOP
        # READDIRPLUS lists the escaping names without handing out entries for them
        _, dfh = await client.opendir(ROOT)
        err, entries = await client.readdirplus(ROOT, dfh)
        by = dict((n, nid) for nid, n in entries)
        if policy == "deny":
            assert by[b"abs"] == 0 and by[b"up"] == 0 and by[b"mixed"] == 0
        elif policy == "opaque":
            assert by[b"abs"] and by[b"up"] and by[b"mixed"]
        # client-made symlinks with escaping targets
        for i, target in enumerate((canary.path, b"../canary", b"../../../../../..", b"/")):
            err, _ = await client.call(
                P.Symlink(h=P.InHeader(nodeid=ROOT), name=b"mine%d" % i, target=target)
            )
            if policy == "deny":
                assert err == -errno.EPERM
                continue
            assert not err
            err, _ = await client.lookup(ROOT, b"mine%d" % i)
            if policy == "opaque":
                assert not err
        await settle_and_check(fs, client, fds)
    if policy == "follow":
        # under "follow" the canary was looked up (O_PATH + stat): that is the policy.
        # Nothing was opened, read or listed, which the canary check still asserts.
        pass


async def test_interrupt_storm_keeps_one_reply_each(area):
    root, canary = area
    (root / "f").write_bytes(b"x" * 100000)
    async with session(root) as (fs, client):
        fds = fd_count()
        _, f = await client.lookup(ROOT, b"f")
        _, fh = await client.open(f)
        rng = random.Random(5)
        for _ in range(300):
            u = await client.send(P.Read(h=P.InHeader(nodeid=f), fh=fh, offset=rng.randrange(10**5),
                                         size=4096))  # fmt: skip
            await client.send(P.Interrupt(h=P.InHeader(), unique=rng.choice([u, u + 2, u - 2, 0])))
            if rng.random() < 0.2:
                await client.send(P.Lookup(h=P.InHeader(nodeid=ROOT), name=b"f"))
        await settle_and_check(fs, client, fds)


def test_frame_bytes_client_builds_agree_with_fuse_h():
    """The client's own reply parsing, checked once against known bytes."""
    from actorfs.runtime.core.attrs import Attr, DirEntry, DirEntryPlus, Entry

    attr = Attr(5, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 1, 0, 0, 0, 4096)
    plus = [DirEntryPlus(Entry(n, 0, attr, 0.0, 0.0), DirEntry(5, i + 1, 4, b"n" * (i + 1)))
            for i, n in enumerate((7, 0, 9))]  # fmt: skip
    from tests.support.hostile_client import parse_direntplus

    payload = bytes(P.encode_direntplus(plus))
    assert parse_direntplus(payload) == [(7, b"n"), (0, b"nn"), (9, b"nnn")]
    assert struct.calcsize("<Q") == 8


async def _unblock_fifo_after(path, task, timeout: float) -> bool:
    """Wait for `task`; if it is still blocked after `timeout`, open the FIFO's other
    ends so a pool thread stuck in open(2) on it returns. True if it had to."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done:
        return False
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
        with contextlib.suppress(OSError):
            os.close(os.open(path, flags))
    await asyncio.wait({task}, timeout=timeout)
    return True


@pytest.mark.parametrize("how", ["open-rdonly", "open-wronly", "create-existing"])
async def test_open_of_a_fifo_never_blocks_a_pool_thread(area, how):
    """A kernel never sends OPEN for a FIFO (it opens special files itself), a hostile
    client can: open(2) on a FIFO blocks until the other end opens, which would hold a
    pool thread forever (and, with enough of them, the whole server)."""
    root, canary = area
    os.mkfifo(root / "fifo")
    async with session(root) as (fs, client):
        fds = fd_count()
        _, fifo = await client.lookup(ROOT, b"fifo")
        if how == "create-existing":  # a stale negative dentry meets a FIFO made on the host
            task = asyncio.ensure_future(client.create(ROOT, b"fifo", os.O_WRONLY))
        else:
            flags = os.O_RDONLY if how == "open-rdonly" else os.O_WRONLY
            task = asyncio.ensure_future(client.open(fifo, flags))
        blocked = await _unblock_fifo_after(root / "fifo", task, 5)
        assert not blocked, "OPEN of a FIFO blocked a pool thread"
        err = task.result()[0]
        assert err < 0
        await settle_and_check(fs, client, fds)


# -- the same hostile guest over virtio-fs (vhost-user, the test frontend) -------------------------


def test_random_frames_from_a_guest_over_virtio_fs(area):
    """Random frames in well-formed descriptor chains through the vhost-user backend: every
    chain comes back in the used ring (a reply, or empty for FORGET & co.), replies carry the
    right unique and length, and the canary beside the root is untouched."""
    from actorfs.runtime.vhost.server import serve_vhost_user
    from tests.support.hostile_client import Books, expected_replies
    from tests.support.vhost_frontend import Frontend
    from tests.unit.vhost import test_vhost_user

    root, canary = area
    plant(root, canary)
    path = str(root.parent / "fs.sock")
    server = test_vhost_user.BackendThread(
        lambda: serve_vhost_user(FsConfig(root=str(root)), path)
    )
    test_vhost_user._wait_for(path)
    fe = Frontend(path, mem_size=32 << 20)
    books = Books()
    gen = RandomRequests(random.Random("virtio"), books)
    answered = returned_empty = 0
    try:
        fe.start(nqueues=2, size=128)
        q = fe.queues[1]
        test_vhost_user._init(q)
        for _ in (b"d", b"f", b"s"):
            error, reply = q.fuse(P.FUSE_LOOKUP, ROOT, _ + b"\0")
            if not error:
                books.lookups[struct.unpack_from("<Q", reply)[0]] += 1
        for i in range(int(os.environ.get("ACTORFS_HOSTILE_VIRTIO_FRAMES", "1500"))):
            frame = bytearray(gen.frame())
            unique = 0x40000 + 2 * i
            if len(frame) >= 16:
                struct.pack_into("<Q", frame, 8, unique)
            opcode, want = expected_replies(bytes(frame))
            if opcode == P.FUSE_DESTROY and want:
                continue  # a guest unmounting: covered by the vhost tests
            mark = fe.brk
            head, out = q.add_chain([bytes(frame) or b"\0"], [16, (1 << 20) + 4096])
            ((used_id, used_len),) = q.wait_used(timeout=30)
            assert used_id == head
            if used_len:
                data = b"".join(fe.read(gpa, n) for gpa, n in out)[:used_len]
                length, error, got = struct.unpack_from("<IiQ", data)
                assert length == used_len and -512 < error <= 0
                if len(frame) >= 16 and want:
                    assert got == unique
                answered += 1
                if not error and opcode == P.FUSE_LOOKUP:
                    books.lookups[struct.unpack_from("<Q", data, 16)[0]] += 1
            else:
                returned_empty += 1
            fe.brk = mark  # the chain is back: its guest memory can be reused
        # the guest is still served normally
        error, _ = q.fuse(P.FUSE_GETATTR, ROOT, struct.pack("<IIQ", 0, 0, 0))
        assert error == 0
    finally:
        fe.close()
        server.stop()
    assert answered > 100 and returned_empty > 0
