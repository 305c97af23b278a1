"""Start a coroutine eagerly: run its first step now, make a task only if it waits.

Most requests finish without ever waiting (syscalls inline on a tmpfs root,
actors that are idle: runtime/core/actor.py), and for those a task per request
is pure cost: creating and scheduling one takes longer than the whole op.
This is what Python 3.12's eager tasks do, written for 3.11 as well.

The first step runs inside the caller's task (the transport's reader), so
it must not depend on `asyncio.current_task()`; what the dispatcher runs
this way does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start(
    coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop
) -> asyncio.Task[Any] | None:
    """Run `coro` up to its first wait. None if it finished; else the task finishing it.

    An exception from the first step propagates to the caller.
    """
    try:
        waiter = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_finish(coro, waiter))


async def _finish(coro: Coroutine[Any, Any, Any], waiter: Any) -> Any:
    """Drive `coro` on, as a task would: wait for what it waits on, resume it."""
    while True:
        throw = None
        try:
            if waiter is None:  # a bare yield: asyncio.sleep(0)
                await asyncio.sleep(0)
            else:
                waiter._asyncio_future_blocking = False
                await waiter
        except asyncio.CancelledError as exc:
            # Cancelling this task cancels the future it waits on, and the
            # coroutine then sees that when it reads the future; otherwise
            # the cancellation goes into the coroutine itself.
            if waiter is None or not waiter.cancelled():
                throw = exc
        except BaseException:  # noqa: BLE001 - the coroutine reads the outcome itself
            pass
        try:
            waiter = coro.send(None) if throw is None else coro.throw(throw)
        except StopIteration as stop:
            return stop.value
