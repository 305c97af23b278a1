"""FUSE passthrough on by default (`--passthrough auto`), and every guarantee
still holding with it on, on real mounts through the kernel.

With passthrough the kernel reads and writes an opened file's host file
itself: no READ or WRITE reaches the server. So each promise the server keeps
on the data path is checked here with passthrough on: read-only refuses
writes, the watcher still invalidates, set-ID bits fall on a write by an
unprivileged process exactly as on a native filesystem, and data written on
either side is what the other side reads.

Where the kernel does not offer passthrough (before Linux 6.9) the mounts run
without it, the default test checks that the reason says so, and the
guarantees are checked all the same.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from actorfs.runtime.devfuse.server import mount
from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.ops.filesystem import FsConfig
from tests.support.mount_util import env, force_unmount, needs_mount

pytestmark = [needs_mount, pytest.mark.mount, pytest.mark.timeout(180)]

SETPRIV = shutil.which("setpriv")


@pytest.fixture
def dirs():
    # Under /tmp with mode 755: reachable by nobody (pytest's tmp_path is not).
    base = tempfile.mkdtemp(prefix="actorfs-pt-")
    os.chmod(base, 0o755)
    src, mnt, native = (os.path.join(base, n) for n in ("src", "mnt", "native"))
    for d in (src, mnt, native):
        os.mkdir(d, 0o755)
    try:
        yield src, mnt, native
    finally:
        force_unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)


async def run(script: str, *args: str, user: str | None = None, check: bool = True) -> str:
    cmd = ["python3", "-c", script, *args]
    if user == "nobody":
        cmd = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env()
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    if check:
        assert proc.returncode == 0, out.decode()
    return out.decode()


def offered(server) -> bool:
    return bool(server.dispatcher.init.kernel_flags & P.FUSE_PASSTHROUGH)


def data_ops(server) -> int:
    ops = server.stats()["requests"]["ops"]
    return sum(ops.get(n, {}).get("count", 0) for n in ("READ", "WRITE"))


async def test_on_by_default_and_data_matches_the_host(dirs):
    src, mnt, _ = dirs
    with open(os.path.join(src, "host"), "wb") as f:
        f.write(os.urandom(3 << 20))
    async with mount(FsConfig(root=src), mnt) as server:
        st = server.stats()["passthrough"]
        if offered(server):  # root, a 6.9+ kernel, default options: on
            assert st["on"] and st["reason"].startswith("on (auto)"), st
        else:
            assert not st["on"] and "does not offer" in st["reason"], st
        await run(
            "import os, sys, hashlib\n"
            "m = sys.argv[1]\n"
            "data = bytes(range(256)) * 8192\n"  # 2 MiB
            "with open(m + '/new', 'wb') as f:\n"
            "    f.write(data)\n"
            "with open(m + '/new', 'r+b') as f:\n"  # a write in the middle, read back
            "    f.seek(4096); f.write(b'X' * 100); f.seek(0); got = f.read()\n"
            "want = data[:4096] + b'X' * 100 + data[4196:]\n"
            "assert got == want\n"
            "print(hashlib.sha256(open(m + '/host', 'rb').read()).hexdigest())\n",
            mnt,
        )
        with open(os.path.join(src, "new"), "rb") as f:
            host = f.read()
        assert host == (bytes(range(256)) * 8192)[:4096] + b"X" * 100 + (bytes(range(256)) * 8192)[4196:]
        # A host-side change of a file the mount has open is what it reads.
        out = await run(
            "import os, sys, time\n"
            "fd = os.open(sys.argv[1] + '/host', os.O_RDONLY)\n"
            "a = os.pread(fd, 5, 0)\n"
            "open(sys.argv[2] + '/host', 'r+b').write(b'HELLO')\n"
            "print(a != b'HELLO', os.pread(fd, 5, 0).decode())\n",
            mnt, src,
        )  # fmt: skip
        assert out.split() == ["True", "HELLO"]
        if st["on"]:
            assert data_ops(server) == 0  # the kernel did the I/O itself
            assert server.stats()["transport"]["backing"]["opened"] >= 2


async def test_read_only_refuses_writes_with_passthrough(dirs):
    src, mnt, _ = dirs
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"kept")
    async with mount(FsConfig(root=src, read_only=True), mnt) as server:
        on = server.stats()["passthrough"]["on"]
        assert on == offered(server)
        out = await run(
            "import errno, os, sys\n"
            "p = sys.argv[1] + '/f'\n"
            "assert open(p, 'rb').read() == b'kept'\n"
            "for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDONLY | os.O_TRUNC):\n"
            "    try:\n"
            "        os.close(os.open(p, flags))\n"
            "        print('opened', flags)\n"
            "    except OSError as e:\n"
            "        assert e.errno == errno.EROFS, e\n"
            "fd = os.open(p, os.O_RDONLY)\n"
            "try:\n"
            "    os.write(fd, b'x')\n"
            "    print('wrote')\n"
            "except OSError as e:\n"
            "    assert e.errno == errno.EBADF, e\n"
            "print('done')\n",
            mnt,
        )
        assert out.split() == ["done"], out
        if on:
            assert server.stats()["transport"]["backing"]["opened"] >= 1
    with open(os.path.join(src, "f"), "rb") as f:
        assert f.read() == b"kept"


async def test_watcher_still_invalidates_with_passthrough(dirs):
    # --cache always: day-long timeouts, so only the watcher can make a host
    # change visible; passthrough must not take that away.
    src, mnt, _ = dirs
    p = os.path.join(src, "w")
    with open(p, "wb") as f:
        f.write(b"one")
    async with mount(FsConfig(root=src, cache="always"), mnt) as server:
        assert server.stats()["passthrough"]["on"] == offered(server)
        assert server.fs.watcher is not None
        out = await run("import sys; print(open(sys.argv[1] + '/w').read())", mnt)
        assert out.strip() == "one"
        with open(p, "wb") as f:
            f.write(b"a longer content")
        # Poll with a generous deadline: the watcher's invalidation is asynchronous.
        check = (
            "import os, sys; p = sys.argv[1] + '/w'\n"
            "print(os.stat(p).st_size, open(p).read())\n"
        )
        deadline = time.monotonic() + 30
        while True:
            out = (await run(check, mnt)).strip()
            if out == "16 a longer content" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert out == "16 a longer content"


# (mode, file's group, action by nobody)
SETID_CASES = [
    (0o4777, 0, "write"),
    (0o2777, 0, "write"),
    (0o6777, 0, "rdwr_write"),
    (0o2767, 65534, "write"),  # sgid, no group x, writer in the group: kept
    (0o4777, 0, "write_while_read_open"),  # a passthrough reader holds the inode
    (0o4777, 0, "open_no_write"),  # opening alone drops nothing
]

SETID_ACTION = """
import os, sys
path, action = sys.argv[1], sys.argv[2]
if action == "write":
    fd = os.open(path, os.O_WRONLY); os.write(fd, b"x"); os.close(fd)
elif action == "rdwr_write":
    fd = os.open(path, os.O_RDWR); os.pwrite(fd, b"y", 3); os.close(fd)
elif action == "write_while_read_open":
    r = os.open(path, os.O_RDONLY)
    os.pread(r, 7, 0)
    fd = os.open(path, os.O_WRONLY); os.write(fd, b"z"); os.close(fd)
    assert os.pread(r, 7, 0) == b"zontent", os.pread(r, 7, 0)
    os.close(r)
elif action == "open_no_write":
    os.close(os.open(path, os.O_WRONLY))
"""


@pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is not installed")
async def test_set_id_bits_fall_on_write_as_on_a_native_fs(dirs):
    src, mnt, native = dirs
    config = FsConfig(root=src)
    async with mount(config, mnt, allow_other=True) as server:
        assert server.stats()["passthrough"]["on"] == offered(server)
        for i, (mode, gid, action) in enumerate(SETID_CASES):
            for where, host in ((native, native), (mnt, src)):
                p = os.path.join(host, f"f{i}")
                with open(p, "wb") as f:
                    f.write(b"content")
                os.chown(p, 0, gid)
                os.chmod(p, mode)
                await run(SETID_ACTION, os.path.join(where, f"f{i}"), action, user="nobody")
        # Files without set-ID bits still pass through on a writable open.
        with open(os.path.join(src, "plain"), "wb") as f:
            f.write(b"plain")
        os.chmod(os.path.join(src, "plain"), 0o666)
        before = server.stats()["transport"]["backing"]["opened"]
        await run(SETID_ACTION, os.path.join(mnt, "plain"), "write", user="nobody")
        if server.stats()["passthrough"]["on"]:
            assert server.stats()["transport"]["backing"]["opened"] > before
    dropped = kept = 0
    for i, (mode, _gid, action) in enumerate(SETID_CASES):
        want = os.stat(os.path.join(native, f"f{i}"))
        got = os.stat(os.path.join(src, f"f{i}"))
        assert stat.S_IMODE(got.st_mode) == stat.S_IMODE(want.st_mode), (
            f"{oct(mode)} {action}: {oct(stat.S_IMODE(got.st_mode))}, "
            f"native {oct(stat.S_IMODE(want.st_mode))}"
        )
        with open(os.path.join(native, f"f{i}"), "rb") as a, open(os.path.join(src, f"f{i}"), "rb") as b:
            assert a.read() == b.read()
        dropped += stat.S_IMODE(want.st_mode) != mode
        kept += stat.S_IMODE(want.st_mode) == mode
    assert dropped >= 3 and kept >= 2  # the table is not vacuous
