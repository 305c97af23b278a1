"""The bounded blocking pool: every syscall that can block runs here.

The event loop thread never touches the disk. The pool has a fixed number of
threads and a bound on queued work: when the bound is reached, callers wait
(backpressure) instead of growing an unbounded queue.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class BlockingPool:
    def __init__(self, workers: int | None = None, max_queued: int | None = None):
        self.workers = workers or min(32, (os.cpu_count() or 2) * 4)
        self.max_queued = max_queued or self.workers * 8
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="actorfs-pool")
        self._slots = asyncio.Semaphore(self.max_queued)
        self.submitted = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._slots:
            self.submitted += 1
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        """Wait for running work and join every thread (no thread left behind)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
