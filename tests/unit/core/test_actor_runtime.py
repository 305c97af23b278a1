"""The actor base, the supervisor and the blocking pool."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time

import pytest

from actorfs.runtime.core.actor import Actor, ActorStopped, stepped
from actorfs.runtime.core.blocking_pool import BlockingPool
from actorfs.runtime.core.errno_map import FsError
from actorfs.runtime.core.supervisor import Supervisor
from tests.support.helpers_fs import CTX, ROOT, ops, running


class Counter(Actor):
    name = "counter"

    def __init__(self):
        super().__init__(mailbox_size=8)
        self.n = 0
        self.closed = False

    def _add(self, k):
        if k < 0:
            raise FsError(errno.EINVAL, "negative")
        self.n += k
        return self.n

    async def add(self, k):
        return await self.ask(self._add, k)

    def close(self):
        self.closed = True


async def test_ask_replies_in_order_and_propagates_errors():
    c = Counter()
    sup = Supervisor()
    async with sup.started([c]):
        results = await asyncio.gather(*(c.add(1) for _ in range(100)))
        assert sorted(results) == list(range(1, 101))
        with pytest.raises(FsError) as ei:
            await c.add(-1)
        assert ei.value.errno == errno.EINVAL
        assert await c.add(0) == 100  # the actor survives a handler error
    assert c.closed
    with pytest.raises(ActorStopped):
        await c.add(1)


async def test_crash_is_reported_and_restarted_with_in_flight_requests_failing_eio():
    c = Counter()
    sup = Supervisor(policy="restart", max_restarts=1)
    async with sup.started([c]):
        await c.add(5)
        c.inject_crash = RuntimeError("injected")
        with pytest.raises(ActorStopped) as ei:
            await c.add(1)
        assert ei.value.errno == errno.EIO
        await asyncio.sleep(0)
        assert sup.crashes and isinstance(sup.crashes[0][1], RuntimeError)
        assert "injected" in str(sup.crashes[0][1])
        assert await c.add(1) == 6  # restarted with its state


async def test_crash_beyond_restarts_stops_everything_cleanly():
    a, b = Counter(), Counter()
    sup = Supervisor(policy="stop")
    async with sup.started([a, b]):
        a.inject_crash = RuntimeError("boom")
        with pytest.raises(ActorStopped):
            await a.add(1)
        await asyncio.wait_for(sup.failed.wait(), 5)
        with pytest.raises(ActorStopped):
            await b.add(1)
    assert a.closed and b.closed


async def test_filesystem_survives_inode_actor_crash_with_eio(tmp_path):
    (tmp_path / "f").write_text("x")
    async with running(tmp_path) as fs:
        fs.inodes.inject_crash = RuntimeError("inode table bug")
        with pytest.raises(FsError) as ei:
            await ops.lookup(fs, CTX, ROOT, b"f")
        assert ei.value.errno == errno.EIO
        # the supervisor restarted it: the next request works
        for _ in range(50):
            await asyncio.sleep(0)
        assert (await ops.lookup(fs, CTX, ROOT, b"f")).attr.size == 1


async def test_pool_is_bounded_and_leaves_no_thread():
    pool = BlockingPool(workers=2, max_queued=4)
    gate = threading.Event()
    running_now = 0
    peak = 0
    lock = threading.Lock()

    def job():
        nonlocal running_now, peak
        with lock:
            running_now += 1
            peak = max(peak, running_now)
        gate.wait(5)
        with lock:
            running_now -= 1
        return 1

    tasks = [asyncio.create_task(pool.run(job)) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert pool.submitted <= 4  # backpressure: the rest wait for a slot
    gate.set()
    assert sum(await asyncio.gather(*tasks)) == 20
    assert peak <= 2
    pool.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("actorfs-pool")]


async def test_cancelled_request_never_closes_an_fd_a_thread_still_uses(tmp_path):
    pool = BlockingPool(workers=1)
    r, w = os.pipe()
    gate = threading.Event()

    def job(fd):
        gate.wait(5)
        return os.fstat(fd).st_mode  # the fd must still be ours here

    t = asyncio.create_task(pool.run_owning((r,), job, r))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    fd_reuse = os.open(tmp_path, os.O_RDONLY)  # would take r's number if it were closed
    try:
        assert fd_reuse != r
    finally:
        gate.set()
        await asyncio.sleep(0.05)
        os.close(fd_reuse)
    os.close(w)
    pool.shutdown()
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the job when it finished


async def test_stop_before_the_actor_task_starts_does_not_hang():
    c = Counter()
    sup = Supervisor()
    async with sup.started([c]):
        pass  # stopped before its task ran a single step
    assert c.closed


async def test_requests_queued_on_a_crashed_actor_get_eio_when_the_server_stops():
    c = Counter()
    sup = Supervisor(policy="stop")
    async with sup.started([c]):
        c.inject_crash = RuntimeError("boom")
        first = asyncio.create_task(c.add(1))
        await asyncio.sleep(0)
        with pytest.raises(ActorStopped):
            await first
        # queued after the crash, before the supervisor stopped everything
        late = asyncio.create_task(c.ask(c._add, 1))
        await asyncio.wait_for(sup.failed.wait(), 5)
        with pytest.raises(ActorStopped):
            await asyncio.wait_for(late, 5)


class Log(Actor):
    """Records which task ran each handler, in order."""

    name = "log"

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, asyncio.Task | None]] = []

    def _note(self, what):
        self.seen.append((what, asyncio.current_task()))
        return what


async def test_an_idle_actor_answers_in_the_asking_task_and_a_busy_one_keeps_order():
    a = Log()
    async with Supervisor().started([a]):
        await asyncio.sleep(0)  # the actor's task is parked on its empty mailbox
        me = asyncio.current_task()
        assert await a.ask(a._note, "direct") == "direct"
        assert a.seen[-1] == ("direct", me)  # no trip through the mailbox
        # Messages already queued go first: this ask waits its turn in the mailbox.
        assert a.tell(a._note, "queued first")
        assert await a.ask(a._note, "after") == "after"
        assert [w for w, _ in a.seen[-2:]] == ["queued first", "after"]
        assert a.seen[-1][1] is not me  # ran in the actor's own task
        # With direct calls off, every handler runs in the actor's task.
        a.direct = False
        await a.ask(a._note, "mailbox")
        assert a.seen[-1][1] is not me


async def test_a_direct_handler_error_reaches_the_caller_and_the_actor_lives_on():
    c = Counter()
    async with Supervisor().started([c]):
        await asyncio.sleep(0)
        with pytest.raises(FsError):
            await c.add(-1)
        assert await c.add(2) == 2
        c.inject_crash = RuntimeError("injected")  # a crash hook is never bypassed
        with pytest.raises(ActorStopped):
            await c.add(1)


class Steps(Actor):
    """A stepped handler that takes `n` steps of `each` seconds of busy work."""

    name = "steps"

    def __init__(self):
        super().__init__()
        self.order: list[str] = []
        self.closed_early = False

    @stepped
    def _long(self, tag, n, each):
        clock = getattr(self, "clock", [0])
        self.clock_seen = [clock[0], clock[0]]
        try:
            for _ in range(n):
                self.clock_seen[1] = clock[0]
                end = time.monotonic() + each
                while time.monotonic() < end:
                    pass
                yield
        except GeneratorExit:
            self.closed_early = True
            raise
        self.order.append(tag)
        return tag

    @stepped
    def _fails(self):
        yield
        raise FsError(errno.EINVAL, "stepped error")

    def _note(self, tag):
        self.order.append(tag)
        return tag


async def test_a_stepped_handler_gives_the_loop_back_and_keeps_the_actors_order():
    a = Steps()
    async with Supervisor().started([a]):
        await asyncio.sleep(0)
        # A short one finishes in its first slice, in the asking task.
        assert await a.ask(a._long, "short", 1, 0) == "short"
        # A long one (0.3 s of work) runs in slices: other tasks run between
        # them (counted by the ticker while the handler works: without steps,
        # none would), and a message sent behind it waits for it.
        ticks, stop = [0], asyncio.Event()

        async def ticker():
            while not stop.is_set():
                await asyncio.sleep(0)
                ticks[0] += 1

        tick = asyncio.create_task(ticker())
        a.clock = ticks
        long = asyncio.create_task(a.ask(a._long, "long", 300, 0.001))
        behind = asyncio.create_task(a.ask(a._note, "behind"))
        assert await long == "long"
        assert await behind == "behind"
        stop.set()
        await tick
        assert a.order[-2:] == ["long", "behind"]
        first, last = a.clock_seen
        # ~150 slices of 2 ms; counted in slices, not time, so load cannot break it.
        assert last - first > 10, (first, last)
        with pytest.raises(FsError) as ei:
            await a.ask(a._fails)
        assert ei.value.errno == errno.EINVAL
        assert await a.ask(a._note, "alive") == "alive"

    # The actor's task cancelled mid-way (a shutdown that cannot wait): the
    # handler is closed at a step, and its caller gets EIO instead of waiting.
    b = Steps()
    b.direct = False
    run = asyncio.create_task(b.run())
    pending = asyncio.create_task(b.ask(b._long, "never", 10**6, 0.0001))
    await asyncio.sleep(0.05)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert b.closed_early and not b.running
    with pytest.raises(ActorStopped):
        await asyncio.wait_for(pending, 5)
