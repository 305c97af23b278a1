"""Directory streams (runtime/ops/dirstream.py): host cookies as READDIR offsets,
no per-handle copy of the listing, stable under concurrent create/unlink."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import tracemalloc

import pytest

from actorfs.runtime.ops import dirstream
from tests.support.helpers_fs import CTX, ROOT, ops, running

pytestmark = pytest.mark.usefixtures("syscall_mode")

DOTS = (b".", b"..")


@pytest.fixture(params=["disk", "tmpfs"])
def root(request, tmp_path):
    """A directory on the test disk, or on tmpfs (/dev/shm) when there is one."""
    if request.param == "disk":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(prefix="actorfs-dirstream-", dir="/dev/shm")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _fill(root, n: int, prefix: str = "s") -> set[bytes]:
    names = set()
    for i in range(n):
        name = f"{prefix}{i:05}"
        os.close(os.open(os.path.join(root, name), os.O_CREAT | os.O_WRONLY, 0o644))
        names.add(name.encode())
    return names


async def _list_all(fs, fh: int, size: int = 4096) -> list:
    out, off = [], 0
    while True:
        batch = await ops.readdir(fs, CTX, ROOT, fh, off, size)
        if not batch:
            return out
        out += batch
        off = batch[-1].off


@pytest.fixture
def shm_or_tmp(tmp_path):
    """tmpfs when there is one (fast to fill under load), else the test disk."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="actorfs-dirstream-", dir="/dev/shm")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_handles_hold_no_copy_of_the_listing(shm_or_tmp):
    """100 handles on a 5,000-entry directory, each read once: the server keeps
    nothing per handle (the old per-handle copy held ~0.7 MiB each)."""
    root = shm_or_tmp
    _fill(root, 5000)
    async with running(root) as fs:
        warm = await ops.opendir(fs, CTX, ROOT)
        await ops.readdir(fs, CTX, ROOT, warm.fh, 0, 4096)
        await ops.releasedir(fs, CTX, ROOT, warm.fh)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            fhs = []
            for _ in range(100):
                d = await ops.opendir(fs, CTX, ROOT)
                fhs.append(d.fh)
                assert await ops.readdir(fs, CTX, ROOT, d.fh, 0, 4096)
            held = tracemalloc.get_traced_memory()[0] - base
            for fh in fhs:
                await ops.releasedir(fs, CTX, ROOT, fh)
        finally:
            tracemalloc.stop()
    assert held < 2 << 20, f"{held} bytes held by 100 directory handles"


async def test_offsets_are_host_cookies_seekable_anywhere(root):
    names = _fill(root, 1500)
    async with running(root) as fs:
        d = await ops.opendir(fs, CTX, ROOT)
        every = await _list_all(fs, d.fh, 1000)
        got = [e.name for e in every]
        assert sorted(got) == sorted(names | set(DOTS))
        # seekdir to any telldir position: the listing goes on from there
        for i in (1, 2, 3, 50, 333, 1499, len(every) - 1):
            again = await ops.readdir(fs, CTX, ROOT, d.fh, every[i - 1].off, 4096)
            assert [e.name for e in again] == got[i : i + len(again)]
        assert await ops.readdir(fs, CTX, ROOT, d.fh, every[-1].off, 4096) == []
        # offset 0 starts again; a batch never exceeds the reply size
        first = await ops.readdir(fs, CTX, ROOT, d.fh, 0, 4096)
        assert [e.name for e in first] == got[: len(first)]
        assert sum((24 + len(e.name) + 7) & ~7 for e in first) <= 4096
        # a huge request still reads a bounded batch
        big = await ops.readdir(fs, CTX, ROOT, d.fh, 0, 1 << 20)
        assert len(big) < len(every)
        assert sum(24 + len(e.name) for e in big) <= 2 * dirstream.BUF_MAX
        await ops.releasedir(fs, CTX, ROOT, d.fh)


async def test_concurrent_readdirs_on_one_handle(root):
    _fill(root, 600)
    async with running(root) as fs:
        d = await ops.opendir(fs, CTX, ROOT)
        every = await _list_all(fs, d.fh, 2048)
        got = [e.name for e in every]
        starts = list(range(1, len(every), 37))

        async def at(i):
            batch = await ops.readdir(fs, CTX, ROOT, d.fh, every[i - 1].off, 2048)
            return i, [e.name for e in batch]

        for i, batch in await asyncio.gather(*(at(i) for i in starts)):
            assert batch and batch == got[i : i + len(batch)]
        await ops.releasedir(fs, CTX, ROOT, d.fh)


async def test_listing_during_create_and_unlink_keeps_stable_entries(root):
    stable = _fill(root, 1500)
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            p = os.path.join(root, f"t{i % 300:05}")
            with contextlib.suppress(OSError):
                if i // 300 % 2 == 0:
                    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
                else:
                    os.unlink(p)
            i += 1

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        async with running(root) as fs:
            for _ in range(5):
                d = await ops.opendir(fs, CTX, ROOT)
                names = [e.name for e in await _list_all(fs, d.fh, 512)]
                await ops.releasedir(fs, CTX, ROOT, d.fh)
                assert len(names) == len(set(names)), "an entry was repeated"
                missing = stable - set(names)
                assert not missing, f"{len(missing)} stable entries lost"
                assert names.count(b".") == names.count(b"..") == 1
    finally:
        stop.set()
        t.join(30)


async def test_any_offset_a_client_sends_gets_entries_or_an_errno(root):
    _fill(root, 50)
    async with running(root) as fs:
        d = await ops.opendir(fs, CTX, ROOT)
        for off in (1, 3, 12345, 2**31, 2**32 + 7, 2**63 - 1, 2**63, 2**64 - 1):
            try:
                batch = await ops.readdir(fs, CTX, ROOT, d.fh, off, 4096)
            except Exception as e:  # noqa: BLE001
                assert isinstance(e, OSError | ops.FsError), repr(e)
            else:
                assert all(0 <= e.off < 2**64 for e in batch)
        await ops.releasedir(fs, CTX, ROOT, d.fh)
