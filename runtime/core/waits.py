"""Wait for the first of several events, and leave no task behind.

`asyncio.wait(..., FIRST_COMPLETED)` over coroutines needs tasks made for them,
and each caller then has to cancel and reap the ones still pending (a task
left behind is reported as "destroyed but it is pending", or waits forever on
an event nobody sets). `first_of` does that once for every caller: the server
waiting for ready-or-stop, the command line waiting for end-or-signal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def first_of(*aws: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> None:
    """Wait until one of `aws` (coroutines, or tasks owned elsewhere) is done.

    The tasks made here for the coroutines are cancelled and awaited before
    returning (their results and errors are dropped: read the state they
    waited for instead); futures owned elsewhere are left as they are.
    """
    owned: list[asyncio.Future[Any]] = []  # the tasks made here for the coroutines
    futs: list[asyncio.Future[Any]] = []
    for a in aws:
        if asyncio.iscoroutine(a):
            a = asyncio.ensure_future(a)
            owned.append(a)
        futs.append(a)
    try:
        await asyncio.wait(futs, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for m in owned:
            m.cancel()
        await asyncio.gather(*owned, return_exceptions=True)


__all__ = ["first_of"]
