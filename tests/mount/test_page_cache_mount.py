"""The client's page cache kept across opens under `--cache auto`, on a real mount.

An OPEN is answered with FOPEN_KEEP_CACHE when the file's size and mtime are
those of the last cached open of the inode, so a warm re-read is served by the
kernel's page cache; a host-side change (even one keeping the size) shows in
the mtime, and is seen at the next open or, through a file held open, once the
attribute timeout lets a GETATTR show it (FUSE_AUTO_INVAL_DATA).

Passthrough is off here: with it the kernel reads the host file itself and no
page cache of ours is involved (tests/mount/test_passthrough_mount.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from actorfs.runtime.devfuse.server import mount
from actorfs.runtime.ops.filesystem import FsConfig
from tests.support.mount_util import env, force_unmount, make_dirs, needs_mount

pytestmark = [needs_mount, pytest.mark.mount, pytest.mark.timeout(120)]

SIZE = 1 << 20


@pytest.fixture
def dirs(tmp_path):
    src, mnt = make_dirs(tmp_path, hello=False)
    yield src, mnt
    force_unmount(mnt)


async def run(script: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "python3", "-c", script, *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env()
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def reads(server) -> int:
    return server.stats()["requests"]["ops"].get("READ", {}).get("count", 0)


READ_ALL = "import sys, hashlib; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def config(src) -> FsConfig:
    return FsConfig(root=str(src), cache="auto", passthrough=False)


async def test_warm_re_read_sends_no_read(dirs):
    src, mnt = dirs
    data = os.urandom(SIZE)
    (src / "f").write_bytes(data)
    async with mount(config(src), str(mnt)) as server:
        first = await run(READ_ALL, str(mnt / "f"))
        assert reads(server) > 0
        # Each run is a new process and a new open; the attribute timeout may
        # pass in between: the kernel then asks GETATTR, sees no change, keeps
        # its pages. A page cache dropped by someone else (drop_caches, memory
        # pressure) costs READs too, so one clean attempt in three is asked.
        for _attempt in range(3):
            cold = reads(server)
            for _ in range(3):
                assert await run(READ_ALL, str(mnt / "f")) == first
            if reads(server) == cold:
                break
        else:
            raise AssertionError("every warm re-read went to the server")
        # The client's own write changes the file: the next open starts afresh
        # and reads what was written.
        await run("import sys; f = open(sys.argv[1], 'r+b'); f.seek(10); f.write(b'W' * 10)", str(mnt / "f"))
        want = data[:10] + b"W" * 10 + data[20:]
        out = await run(
            "import sys; d = open(sys.argv[1], 'rb').read(); print(d[:30] == bytes.fromhex(sys.argv[2]))",
            str(mnt / "f"), want[:30].hex(),
        )  # fmt: skip
        assert out.strip() == "True"


async def test_host_overwrite_of_the_same_size_is_seen(dirs):
    src, mnt = dirs
    f = src / "f"
    f.write_bytes(b"a" * SIZE)
    async with mount(config(src), str(mnt)) as server:
        timeout = server.config.attr_timeout
        # A reader holding the file open across the change, and a reader that
        # opens it anew each time.
        script = (
            "import os, sys, time\n"
            "p, ready, done = sys.argv[1:4]\n"
            "fd = os.open(p, os.O_RDONLY)\n"
            "assert os.pread(fd, 8, 0) == b'aaaaaaaa'\n"
            "open(ready, 'w').close()\n"
            "while not os.path.exists(done):\n"
            "    time.sleep(0.02)\n"
            "t0 = time.monotonic()\n"
            "while os.pread(fd, 8, 0) != b'bbbbbbbb':\n"
            "    assert time.monotonic() - t0 < 30, 'held-open reader never saw the change'\n"
            "    time.sleep(0.05)\n"
            "t0 = time.monotonic()\n"
            "while open(p, 'rb').read(8) != b'bbbbbbbb':\n"
            "    assert time.monotonic() - t0 < 30, 'reopening reader never saw the change'\n"
            "    time.sleep(0.05)\n"
            "print('seen')\n"
        )
        ready, done = src.parent / "ready", src.parent / "done"
        reader = asyncio.create_task(run(script, str(mnt / "f"), str(ready), str(done)))
        for _ in range(600):
            if ready.exists() or reader.done():
                break
            await asyncio.sleep(0.05)
        assert ready.exists(), await reader
        before = os.stat(f)
        with open(f, "r+b") as w:  # same size, new content
            w.write(b"b" * SIZE)
        # A new mtime even on a coarse clock.
        os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        assert os.stat(f).st_size == before.st_size
        done.touch()
        assert (await reader).strip() == "seen"
        assert timeout > 0


async def test_host_overwrite_that_puts_the_mtime_back_is_seen(dirs):
    # cp -p, tar and rsync -t set the old mtime again: the ctime still moves.
    src, mnt = dirs
    f = src / "f"
    f.write_bytes(b"a" * SIZE)
    async with mount(config(src), str(mnt)):
        first = await run("import sys; print(open(sys.argv[1], 'rb').read(8))", str(mnt / "f"))
        assert first.strip() == "b'aaaaaaaa'"
        before = os.stat(f)
        with open(f, "r+b") as w:
            w.write(b"c" * SIZE)
        os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(f)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        # The very next open: the kernel would keep its pages for a day's
        # worth of reopens otherwise (it compares only size and mtime).
        out = await run("import sys; print(open(sys.argv[1], 'rb').read(8))", str(mnt / "f"))
        assert out.strip() == "b'cccccccc'", "a reopen kept the old pages"
