"""The bounded blocking pool: every syscall that can block runs here.

The event loop thread never touches the disk. The pool has a fixed number of
threads and a bound on queued work: when the bound is reached, callers wait
(backpressure) instead of growing an unbounded queue.

A job, once submitted, always runs to its end even if the awaiting request is
cancelled (FUSE_INTERRUPT): jobs own the fds they were given and close them
themselves, so a cancelled request can never close an fd a thread still uses.

This is on every request's path, so a job costs one queue put, one thread
wake-up and one call_soon_threadsafe back to the loop (which both frees the
slot and settles the caller's future): no concurrent.futures.Future, no
wrap_future chain, no shield.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from actorfs.runtime.core.errno_map import FsError

T = TypeVar("T")

_STOP = None


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _settle(
    slots: asyncio.Semaphore, fut: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    """In the loop: free the slot and hand the outcome to the caller (if still waiting)."""
    slots.release()
    if fut.cancelled():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _worker(jobs: queue.SimpleQueue[Any]) -> None:
    while True:
        item = jobs.get()
        if item is _STOP:
            return
        fn, args, fds, loop, fut, slots = item
        result = exc = None
        try:
            result = fn(*args)
        except BaseException as e:  # goes back to the caller
            exc = e
        finally:
            if fds:
                close_all(fds)
        try:
            loop.call_soon_threadsafe(_settle, slots, fut, result, exc)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more
        del item, fn, args, fut, result, exc


class BlockingPool:
    def __init__(self, workers: int | None = None, max_queued: int | None = None):
        self.workers = workers or min(32, (os.cpu_count() or 2) * 4)
        self.max_queued = max_queued or self.workers * 8
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._slots: asyncio.Semaphore | None = None
        self.submitted = 0
        self._closed = False
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run_owning((), fn, *args)

    async def run_owning(self, fds: Sequence[int], fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in a pool thread, then close `fds` in that thread."""
        loop = asyncio.get_running_loop()
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self.max_queued)
        try:
            await slots.acquire()
        except BaseException:
            close_all(fds)
            raise
        if self._closed:
            slots.release()
            close_all(fds)
            raise FsError(errno.EIO, "blocking pool is shut down")
        if len(self._threads) < self.workers:
            self._start_thread()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, args, fds, loop, fut, slots))
        self.submitted += 1
        return await fut

    def _start_thread(self) -> None:
        # One more thread per job until the pool is full, as ThreadPoolExecutor does.
        with self._lock:
            if self._closed or len(self._threads) >= self.workers:
                return
            t = threading.Thread(
                target=_worker, args=(self._jobs,), daemon=True,
                name=f"actorfs-pool_{len(self._threads)}",
            )  # fmt: skip
            t.start()
            self._threads.append(t)

    def shutdown(self) -> None:
        """Wait for running work and join every thread (no thread left behind)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(_STOP)
        for t in threads:
            t.join()
