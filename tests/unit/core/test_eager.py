"""runtime/core/eager.py: a coroutine's first step runs now; a task only if it waits."""

from __future__ import annotations

import asyncio

import pytest

from actorfs.runtime.core import eager


async def test_a_coroutine_that_never_waits_needs_no_task():
    ran = []

    async def quick():
        ran.append(asyncio.current_task())
        return 1

    assert eager.start(quick(), asyncio.get_running_loop()) is None
    assert ran == [asyncio.current_task()]  # ran in the caller, before start returned


async def test_a_waiting_coroutine_is_finished_by_a_task_with_its_result():
    fut = asyncio.get_running_loop().create_future()
    steps = []

    async def waits():
        steps.append("first")
        value = await fut
        steps.append("after")
        await asyncio.sleep(0)  # a bare yield is handled too
        return value * 2

    task = eager.start(waits(), asyncio.get_running_loop())
    assert task is not None and steps == ["first"]
    fut.set_result(21)
    assert await task == 42
    assert steps == ["first", "after"]


async def test_an_exception_of_the_awaited_future_reaches_the_coroutine():
    fut = asyncio.get_running_loop().create_future()

    async def waits():
        try:
            await fut
        except OSError as e:
            return f"caught {e.errno}"

    task = eager.start(waits(), asyncio.get_running_loop())
    fut.set_exception(OSError(5, "EIO"))
    assert await task == "caught 5"


async def test_an_error_in_the_first_step_goes_to_the_caller():
    async def fails():
        raise ValueError("now")

    with pytest.raises(ValueError, match="now"):
        eager.start(fails(), asyncio.get_running_loop())


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits():
    fut = asyncio.get_running_loop().create_future()
    seen = []

    async def waits():
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            asyncio.current_task().uncancel()  # as the dispatcher does for FUSE_INTERRUPT
            return "EINTR"

    task = eager.start(waits(), asyncio.get_running_loop())
    await asyncio.sleep(0)
    task.cancel()
    assert await task == "EINTR"
    assert seen == ["cancelled inside"]


async def test_a_cancellation_the_coroutine_does_not_catch_cancels_the_task():
    async def waits():
        await asyncio.sleep(10)

    task = eager.start(waits(), asyncio.get_running_loop())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
