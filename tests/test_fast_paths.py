"""Speed changes keep behaviour: each is checked on a real mount through the kernel.

The programs using the mount run as subprocesses (this process serves it);
the server's own request counts show which round trips the kernel skipped.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from mount_util import env, force_unmount, make_dirs, needs_mount

from runtime.filesystem import FsConfig
from runtime.server import mount

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


@pytest.mark.parametrize("cache", ["never", "auto", "always"])
async def test_close_sends_no_flush_and_data_lands(dirs, cache):
    src, mnt = dirs
    async with await mount(FsConfig(root=str(src), cache=cache), str(mnt)) as server:
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
    async with await mount(config, str(mnt)) as server:
        await run(f"open('{mnt}/w', 'w').write('written back')")
        assert (src / "w").read_text() == "written back"
        assert server.stats()["requests"]["ops"]["FLUSH"]["count"] >= 1
