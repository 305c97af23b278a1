"""runtime/core/waits.py: the first of several events, and no task left behind."""

from __future__ import annotations

import asyncio

from actorfs.runtime.core.waits import first_of


async def test_returns_at_the_first_and_reaps_the_tasks_it_made():
    fast, slow = asyncio.Event(), asyncio.Event()
    before = asyncio.all_tasks()
    asyncio.get_running_loop().call_later(0.01, fast.set)
    await asyncio.wait_for(first_of(fast.wait(), slow.wait()), 5)
    assert fast.is_set() and not slow.is_set()
    assert asyncio.all_tasks() == before  # the task waiting on `slow` is gone


async def test_a_future_owned_elsewhere_is_left_alone():
    ours = asyncio.get_running_loop().create_future()
    done = asyncio.Event()
    done.set()
    await first_of(ours, done.wait())
    assert not ours.done()  # not cancelled: its owner decides
    ours.set_result(None)


async def test_a_failing_coroutine_ends_the_wait_without_raising():
    async def boom() -> None:
        raise RuntimeError("read the state it waited for instead")

    await asyncio.wait_for(first_of(boom(), asyncio.Event().wait()), 5)
