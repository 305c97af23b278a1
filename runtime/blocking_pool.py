"""The bounded blocking pool: every syscall that can block runs here.

The event loop thread never touches the disk. The pool has a fixed number of
threads and a bound on queued work: when the bound is reached, callers wait
(backpressure) instead of growing an unbounded queue.

A job, once submitted, always runs to its end even if the awaiting request is
cancelled (FUSE_INTERRUPT): jobs own the fds they were given and close them
themselves, so a cancelled request can never close an fd a thread still uses.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from runtime.errno_map import FsError

T = TypeVar("T")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class BlockingPool:
    def __init__(self, workers: int | None = None, max_queued: int | None = None):
        self.workers = workers or min(32, (os.cpu_count() or 2) * 4)
        self.max_queued = max_queued or self.workers * 8
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="actorfs-pool")
        self._slots: asyncio.Semaphore | None = None
        self.submitted = 0
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run_owning((), fn, *args)

    async def run_owning(self, fds: Sequence[int], fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in a pool thread, then close `fds` in that thread."""
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_queued)
        slots = self._slots
        try:
            await slots.acquire()
        except BaseException:
            _close_all(fds)
            raise
        if fds:

            def job() -> T:
                try:
                    return fn(*args)
                finally:
                    _close_all(fds)
        else:
            job = fn if not args else (lambda: fn(*args))  # noqa: E731
        try:
            cf = self._executor.submit(job)
        except RuntimeError:
            slots.release()
            _close_all(fds)
            raise FsError(errno.EIO, "blocking pool is shut down") from None
        self.submitted += 1
        cf.add_done_callback(lambda _f: loop.call_soon_threadsafe(slots.release))
        return await asyncio.shield(asyncio.wrap_future(cf, loop=loop))

    def shutdown(self) -> None:
        """Wait for running work and join every thread (no thread left behind)."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=False)
