"""The embedding API (actorfs.runtime.devfuse.server): mount from inside an asyncio program.

Programs using the mount run as subprocesses: this process serves it on its
event loop, so it must never touch the mount itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from actorfs.runtime.devfuse.mounting import MountError
from actorfs.runtime.devfuse.server import MountedServer, mount
from actorfs.runtime.ops.filesystem import FsConfig
from tests.support.mount_util import env, is_mounted, needs_mount

pytestmark = [needs_mount, pytest.mark.mount, pytest.mark.timeout(120)]


async def run(*argv: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env()
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode()


def fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd") if _alive(n)}


def _alive(n: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        return False
    return True


async def test_mount_serve_stop_leaves_nothing_behind(dirs):
    src, mnt = dirs
    threads = set(threading.enumerate())
    before = fds()
    async with mount(FsConfig(root=str(src)), str(mnt)) as server:
        assert server.ready and is_mounted(mnt)
        rc, out = await run(
            "sh", "-ec", f"cat '{mnt}/hello'; cp -a /etc/hostname '{mnt}/copy'; ls '{mnt}'"
        )
        assert rc == 0, out
        assert out.split() == ["hi", "copy", "hello"]
        st = server.stats()
        assert st["requests"]["total"] > 5 and st["transport"]["frames"] == st["requests"]["total"]
        assert st["requests"]["ops"]["LOOKUP"]["count"] >= 1
    assert not is_mounted(mnt)
    assert (src / "copy").read_bytes() == open("/etc/hostname", "rb").read()
    assert server.reason == "stopped"
    # No fd (/dev/fuse, O_PATH fds of inodes), thread or task left over.
    assert "/dev/fuse" not in fds()
    assert fds() <= before | {"/dev/null"}
    for _ in range(50):
        if set(threading.enumerate()) <= threads:
            break
        await asyncio.sleep(0.05)
    assert set(threading.enumerate()) <= threads
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_wait_returns_unmounted_after_external_umount(dirs):
    src, mnt = dirs
    server = await mount(FsConfig(root=str(src)), str(mnt))
    waiter = asyncio.create_task(server.wait())
    rc, out = await run("umount", str(mnt))
    assert rc == 0, out
    assert await asyncio.wait_for(waiter, 30) == "unmounted"
    await server.stop()  # idempotent after the end
    assert not is_mounted(mnt)


async def test_cancelling_a_waiter_does_not_stop_the_server(dirs):
    src, mnt = dirs
    async with mount(FsConfig(root=str(src)), str(mnt)) as server:
        waiter = asyncio.create_task(server.wait())
        await asyncio.sleep(0.05)
        waiter.cancel()
        await asyncio.sleep(0.05)
        assert server.ready
        rc, out = await run("cat", f"{mnt}/hello")
        assert (rc, out) == (0, "hi\n")


async def test_unprivileged_path_through_fusermount3(dirs):
    src, mnt = dirs
    async with mount(FsConfig(root=str(src)), str(mnt), use_fusermount=True) as server:
        assert server.mount_info.by_fusermount
        rc, out = await run("sh", "-ec", f"echo data > '{mnt}/f'; cat '{mnt}/f'")
        assert (rc, out) == (0, "data\n")
    assert not is_mounted(mnt)
    assert (src / "f").read_text() == "data\n"


async def test_queues_and_passthrough(dirs):
    src, mnt = dirs
    config = FsConfig(root=str(src), passthrough=True)
    async with mount(config, str(mnt), queues=3) as server:
        script = f"dd if=/dev/urandom of='{mnt}/big' bs=1M count=4 status=none; cmp '{mnt}/big' '{src}/big'"
        rc, out = await run("sh", "-ec", script)
        assert rc == 0, out
        st = server.stats()["transport"]
        assert st["queues"] == 3
        if server.dispatcher.passthrough:
            assert st["backing"]["opened"] >= 1
            # Writes went straight to the backing file, not through us.
            assert st["bytes_in"] < 1 << 20
    assert server.transport.backing.live == 0


async def test_mount_errors_are_mount_errors(dirs, tmp_path):
    src, mnt = dirs
    threads = set(threading.enumerate())
    with pytest.raises(MountError, match="does not exist"):
        await mount(FsConfig(root=str(src)), str(tmp_path / "nope"))
    # A mount that failed leaves no pool thread behind.
    assert not [t for t in set(threading.enumerate()) - threads if t.name.startswith("actorfs-pool")]
    with pytest.raises(MountError, match="does not exist"):
        await mount(FsConfig(root=str(tmp_path / "nosrc")), str(mnt))
    async with mount(FsConfig(root=str(src)), str(mnt)):
        with pytest.raises(MountError, match="already a mount point"):
            await mount(FsConfig(root=str(src)), str(mnt))
    assert not is_mounted(mnt)


async def test_stop_before_start_and_twice(dirs):
    src, mnt = dirs
    server = MountedServer(FsConfig(root=str(src)), str(mnt))
    await server.stop()
    await server.start()
    await server.stop()
    await server.stop()
    assert not is_mounted(mnt)


def test_loop_shutdown_without_stop_still_unmounts(dirs):
    """An embedding program that forgets stop(): asyncio.run's cleanup unmounts."""
    src, mnt = dirs
    code = textwrap.dedent(
        f"""
        import asyncio
        from actorfs.runtime.ops.filesystem import FsConfig
        from actorfs.runtime.devfuse.server import mount
        async def main():
            server = await mount(FsConfig(root={str(src)!r}), {str(mnt)!r})
            print("mounted", flush=True)
        asyncio.run(main())
        print("done", flush=True)
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env()
    )
    assert p.stdout.split() == ["mounted", "done"], p.stderr
    assert not is_mounted(mnt)


async def test_a_fatal_actor_crash_unmounts_and_nothing_hangs(dirs):
    from actorfs.runtime.devfuse.server import ServerFailed

    src, mnt = dirs
    server = await mount(FsConfig(root=str(src)), str(mnt))
    try:
        server.fs.supervisor.policy = "stop"  # no restart: the crash is fatal
        server.fs.inodes.inject_crash = RuntimeError("injected")
        # The next request that reaches the inode table kills it; the program
        # gets an error (EIO, then ENOTCONN once the connection is aborted),
        # never a hang.
        rc, out = await run("cat", f"{mnt}/hello", timeout=30)
        assert rc != 0 and "hi" not in out, out
        with pytest.raises(ServerFailed, match="actor inode_table failed"):
            await asyncio.wait_for(server.wait(), 30)
        assert not is_mounted(mnt)
        assert isinstance(server.failure, RuntimeError)
    finally:
        await server.stop()


async def test_stop_requested_while_mounting(dirs):
    src, mnt = dirs
    server = MountedServer(FsConfig(root=str(src)), str(mnt))
    starting = asyncio.create_task(server.start())
    await asyncio.sleep(0)
    server.request_stop()  # e.g. SIGTERM during start-up
    await asyncio.wait_for(starting, 30)  # returns, does not raise
    await server.stop()
    assert not server.ready and server.reason == "stopped"
    assert not is_mounted(mnt)


# -- the structured form: `async with actorfs.mount(...)` --------------------------------


def _others() -> set[asyncio.Task]:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def test_async_with_mounts_and_unmounts_leaving_no_task(dirs):
    import actorfs

    src, mnt = dirs
    before = _others()
    async with actorfs.mount(str(src), str(mnt)) as server:
        assert server.ready and is_mounted(mnt)
        rc, out = await run("cat", f"{mnt}/hello")
        assert rc == 0 and out.strip() == "hi", out
    assert not is_mounted(mnt)
    assert server.reason == "stopped" and server.done
    assert _others() == before


async def test_an_exception_in_the_block_unmounts_and_propagates(dirs):
    import actorfs

    src, mnt = dirs
    before = _others()
    with pytest.raises(KeyError, match="boom"):
        async with actorfs.mount(FsConfig(root=str(src)), str(mnt)) as server:
            assert is_mounted(mnt)
            raise KeyError("boom")
    assert not is_mounted(mnt) and server.done
    assert _others() == before


async def test_cancelling_the_enclosing_task_unmounts(dirs):
    import actorfs

    src, mnt = dirs
    before = _others()
    inside = asyncio.Event()
    servers = []

    async def body():
        async with actorfs.mount(str(src), str(mnt)) as server:
            servers.append(server)
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await asyncio.wait_for(inside.wait(), 60)
    assert is_mounted(mnt)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not is_mounted(mnt) and servers[0].done
    assert _others() == before


async def test_cancelled_while_mounting_unmounts(dirs):
    import actorfs

    src, mnt = dirs
    before = _others()

    async def body():
        async with actorfs.mount(str(src), str(mnt)):
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not is_mounted(mnt)
    assert _others() == before


async def test_a_failure_inside_the_block_propagates_out_of_it(dirs):
    import actorfs

    src, mnt = dirs
    before = _others()
    with pytest.raises(actorfs.ServerFailed, match="actor inode_table failed") as info:
        async with actorfs.mount(str(src), str(mnt)) as server:
            server.fs.supervisor.policy = "stop"  # no restart: the crash is fatal
            server.fs.inodes.inject_crash = RuntimeError("injected")
            await run("cat", f"{mnt}/hello", timeout=30)
            with contextlib.suppress(actorfs.ServerFailed):
                await asyncio.wait_for(server.wait(), 30)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not is_mounted(mnt)
    assert _others() == before


async def test_the_callers_config_is_not_changed(dirs, tmp_path):
    import actorfs

    src, mnt = dirs
    link = tmp_path / "link-to-src"
    link.symlink_to(src)
    config = FsConfig(root=str(link) + "/")
    snapshot = dataclasses.asdict(config)
    async with actorfs.mount(config, str(mnt)) as server:
        assert server.fs.root_path == os.path.realpath(src)
    assert dataclasses.asdict(config) == snapshot


async def test_mount_takes_typed_keywords_only(dirs):
    import actorfs

    src, mnt = dirs
    with pytest.raises(TypeError):
        actorfs.mount(str(src), str(mnt), extra={"x": 1})  # no catch-all
    with pytest.raises(TypeError):
        actorfs.mount(str(src), str(mnt), False)  # keywords only
