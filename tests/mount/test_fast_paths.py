"""Speed changes keep behaviour: each is checked on a real mount through the kernel.

The programs using the mount run as subprocesses (this process serves it);
the server's own request counts show which round trips the kernel skipped.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from actorfs.runtime.devfuse.server import mount
from actorfs.runtime.ops.filesystem import FsConfig
from tests.support.mount_util import env, force_unmount, make_dirs, needs_mount

pytestmark = [needs_mount, pytest.mark.mount, pytest.mark.timeout(120)]


@pytest.fixture
def dirs(tmp_path):
    src, mnt = make_dirs(tmp_path, hello=False)
    yield src, mnt
    force_unmount(mnt)


async def run(script: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "python3", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env()
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def ops_after(src, mnt, script: str) -> dict:
    """Per-op request stats of a `--cache auto` mount after `script` ran on it."""
    # Passthrough off: these count the READs and WRITEs the server itself serves.
    config = FsConfig(root=str(src), cache="auto", passthrough=False)
    async with mount(config, str(mnt)) as server:
        await run(script)
        return server.stats()["requests"]["ops"]


@pytest.mark.parametrize("cache", ["never", "auto", "always"])
async def test_close_sends_no_flush_and_data_lands(dirs, cache):
    src, mnt = dirs
    async with mount(FsConfig(root=str(src), cache=cache), str(mnt)) as server:
        await run(
            f"import os\n"
            f"for i in range(20):\n"
            f"    with open('{mnt}/f%d' % i, 'w') as f: f.write('data %d' % i)\n"
            f"for i in range(20):\n"
            f"    assert open('{mnt}/f%d' % i).read() == 'data %d' % i\n"
        )
        ops = server.stats()["requests"]["ops"]
    assert ops["CREATE"]["count"] == 20 and ops["OPEN"]["count"] >= 1
    assert "FLUSH" not in ops
    for i in range(20):
        assert (src / f"f{i}").read_text() == f"data {i}"


async def test_writeback_still_flushes_on_close(dirs):
    # Under the writeback cache FLUSH is what writes dirty pages back on close.
    src, mnt = dirs
    config = FsConfig(root=str(src), cache="auto", writeback=True)
    async with mount(config, str(mnt)) as server:
        await run(f"open('{mnt}/w', 'w').write('written back')")
        assert (src / "w").read_text() == "written back"
        assert server.stats()["requests"]["ops"]["FLUSH"]["count"] >= 1


async def test_metadata_changes_cost_no_getattr_of_the_directory(dirs):
    # Without default_permissions (no allow_other) the kernel need not re-read
    # a directory's mode after each change in it before the next permission check.
    src, mnt = dirs
    ops = await ops_after(
        src, mnt,
        f"import os\n"
        f"for i in range(50):\n"
        f"    open('{mnt}/f%d' % i, 'w').close()\n"
        f"    os.rename('{mnt}/f%d' % i, '{mnt}/g%d' % i)\n"
        f"    os.unlink('{mnt}/g%d' % i)\n",
    )  # fmt: skip
    assert ops["CREATE"]["count"] == 50 and ops["UNLINK"]["count"] == 50
    assert ops.get("GETATTR", {"count": 0})["count"] <= 5, ops.get("GETATTR")
    assert not list(src.iterdir())


async def test_writes_do_not_each_ask_for_security_capability(dirs):
    # HANDLE_KILLPRIV_V2: the kernel asks GETXATTR security.capability once per
    # file, not before every write(2).
    src, mnt = dirs
    ops = await ops_after(
        src, mnt,
        f"import os\n"
        f"fd = os.open('{mnt}/w', os.O_RDWR | os.O_CREAT)\n"
        f"for i in range(100):\n"
        f"    os.write(fd, b'x' * 4096)\n"
        f"os.close(fd)\n",
    )  # fmt: skip
    assert ops["WRITE"]["count"] == 100
    assert ops.get("GETXATTR", {"count": 0})["count"] <= 2, ops.get("GETXATTR")
    assert (src / "w").stat().st_size == 409600


@pytest.mark.parametrize("read_ahead_kb", [0, 1024])
async def test_the_readahead_window_makes_reads_large(dirs, read_ahead_kb):
    src, mnt = dirs
    (src / "big").write_bytes(bytes(range(256)) * 4096 * 8)  # 8 MiB
    config = FsConfig(root=str(src), cache="auto", passthrough=False)  # READs reach us
    async with mount(config, str(mnt), read_ahead_kb=read_ahead_kb) as server:
        conn = server.mount_info.conn
        with open(f"/sys/class/bdi/{conn >> 20}:{conn & 0xFFFFF}/read_ahead_kb") as f:
            window = int(f.read())
        await run(
            f"data = open('{mnt}/big', 'rb').read()\n"
            f"assert data == bytes(range(256)) * 4096 * 8\n"
        )
        reads = server.stats()["requests"]["ops"]["READ"]["count"]
    if read_ahead_kb:
        assert window == read_ahead_kb
        assert reads <= 24, reads  # 1 MiB READs, not 64 of 128 KiB
    else:
        assert window == 128  # the kernel's own
        assert reads >= 60, reads


@pytest.mark.parametrize("poll_us", [0, 200])
async def test_with_or_without_polling_every_request_is_answered(dirs, poll_us):
    # Polling only changes when the reader sleeps, never what it answers.
    src, mnt = dirs
    async with mount(FsConfig(root=str(src)), str(mnt), poll_us=poll_us) as server:
        assert server.transport.poll_seconds == poll_us / 1e6
        await run(
            f"import os, time\n"
            f"for i in range(30):\n"
            f"    open('{mnt}/p%d' % i, 'w').write('x' * i)\n"
            f"    time.sleep(0.001 if i % 3 else 0)  # idle gaps longer than the poll\n"
            f"assert sorted(os.listdir('{mnt}')) == sorted('p%d' % i for i in range(30))\n"
        )
    assert all((src / f"p{i}").read_text() == "x" * i for i in range(30))
