"""Run a cleanup to its end even if the task awaiting it is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` in its own task; a cancel of the caller waits for it to finish.

    The asyncio form of a shielded cancel scope: the cleanup runs to its end,
    then the cancel (if one came) is raised in the caller.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                result = task.result()  # the cleanup itself was cancelled: raise that
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
