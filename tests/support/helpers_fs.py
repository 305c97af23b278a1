"""Shared helpers for op-layer tests: a running Filesystem over a tmp dir."""

from __future__ import annotations

import contextlib
import os

from actorfs.runtime.core.attrs import RequestContext
from actorfs.runtime.ops import ops
from actorfs.runtime.ops.filesystem import Filesystem, FsConfig

CTX = RequestContext(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid())
ROOT = 1


# Where op syscalls run in `running()`: "never" (the blocking pool) or
# "always" (inline on the loop); the `syscall_mode` fixture sets it.
INLINE = {"mode": "never"}
# Extra FsConfig defaults for `running()`; the `fd_cache_mode` fixture forces
# eviction with them (fd_cache=1, and file_handles=False for reopening by name).
DEFAULTS: dict = {}


@contextlib.asynccontextmanager
async def running(root, **kw):
    kw.setdefault("inline", INLINE["mode"])
    for k, v in DEFAULTS.items():
        kw.setdefault(k, v)
    async with Filesystem.running(FsConfig(root=str(root), **kw)) as fs:
        yield fs


async def errno_of(coro) -> int:
    """Await an op that must fail; its Linux errno."""
    from actorfs.runtime.core.errno_map import linux_errno_of

    try:
        await coro
    except Exception as exc:  # noqa: BLE001
        return linux_errno_of(exc)
    raise AssertionError("op succeeded but an error was expected")


__all__ = ["CTX", "ROOT", "errno_of", "ops", "running"]
