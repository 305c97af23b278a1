"""A small actor base: one task owns the state, others talk to it by mailbox.

An actor's handler methods are plain (non-async) methods that run inside the
actor's own task, one message at a time, so they never race on its state and
need no locks. They must not block: anything that touches a disk is done by the
caller in the blocking pool before or after asking the actor.

`ask()` is request/reply: the handler's return value (or exception) comes back
to the caller. When the actor is idle (its mailbox empty, its task parked on
it) the handler runs at once in the asking task: the same one-at-a-time
order, without two trips through the event loop (docs/ARCHITECTURE.md).
`tell()` is fire-and-forget for messages whose reply nobody waits for (FORGET).

A *stepped* handler (decorated with `@stepped`) is a generator for work that
can be long (a REMOVEMAPPING of thousands of ranges): it yields between steps,
each step leaving the actor's state consistent. The actor runs it for at most
`STEP_BUDGET` seconds at a time, then lets the event loop serve everything
else before going on. Its own later messages wait until it has returned, so
the one-at-a-time rule holds; other actors and requests do not wait. Run
direct, its first slice runs in the asking task and only the remainder (if
any) goes to the actor's task, so a short one costs no more than a plain one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar, cast

from actorfs.runtime.core.errno_map import FsError

log = logging.getLogger("actorfs.actor")

_STOP = object()

# The longest a stepped handler runs before the actor gives the loop back.
T = TypeVar("T")

STEP_BUDGET = 0.002


def stepped(handler: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    """Mark a generator handler as stepped (see the module doc)."""
    handler.stepped = True  # type: ignore[attr-defined]
    return handler


def _resume(gen: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """The mailbox message that carries on a stepped handler begun in the asking task."""
    return gen


_resume.stepped = True  # type: ignore[attr-defined]


class _Cancelled(Exception):
    """Carries the actor task's own cancellation past the handler-error path."""


def _run_slice(gen: Generator[Any, Any, Any]) -> tuple[bool, Any]:
    """Advance `gen` for up to STEP_BUDGET; (True, its return value) once it is done."""
    deadline = time.monotonic() + STEP_BUDGET
    try:
        while True:
            next(gen)
            if time.monotonic() >= deadline:
                return False, None
    except StopIteration as stop:
        return True, stop.value


class ActorStopped(FsError):
    """The actor is not running: in-flight and later requests get EIO."""

    def __init__(self, name: str):
        super().__init__(errno.EIO, f"actor {name} is not running")


class Actor:
    """Mailbox + a run loop. Subclasses add handler methods and `close()`."""

    name = "actor"

    def __init__(self, mailbox_size: int = 4096):
        self._mailbox: asyncio.Queue[Any] = asyncio.Queue(mailbox_size)
        self._running = False
        self._stopped = False
        self.crash_cause: BaseException | None = None
        # Test hook: set to an exception to make the run loop itself fail.
        self.inject_crash: BaseException | None = None
        # Let an idle actor's handler run in the asking task (see ask()).
        self.direct = True
        # A stepped handler is between two of its steps (the loop serves others).
        self._busy = False

    # -- client side -------------------------------------------------------
    async def ask(
        self, handler: Callable[..., T], *args: Any, orphan: Callable[[Any], None] | None = None
    ) -> T:
        """Run `handler(*args)` in the actor's task and return its result.

        `orphan` is called with the result if the caller was cancelled before the
        reply arrived, so results that own resources (a dup'ed fd) are not leaked.
        """
        if self._stopped:
            raise ActorStopped(self.name)
        if (
            self.direct
            and self._running
            and not self._busy
            and self.inject_crash is None
            and not self._mailbox._queue  # type: ignore[attr-defined]  # CPython Queue internals: emptiness without a method call
        ):
            # Idle: the actor's task is parked on an empty mailbox. Running the
            # handler here gives the very outcome the mailbox would (handlers
            # are synchronous, so nothing runs between them, and no message is
            # queued ahead of this one) without two trips through the loop.
            if not getattr(handler, "stepped", False):
                return handler(*args)
            # A stepped handler is a generator function: ask() returns what it returns.
            gen = cast("Generator[Any, Any, Any]", handler(*args))
            done, result = _run_slice(gen)
            if done:
                return cast(T, result)
            # Not done in one slice: the actor's task goes on with it. The
            # mailbox is empty, so nothing can come in between.
            handler, args = cast("Callable[..., T]", _resume), (gen,)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if orphan is not None:
            fut.orphan = orphan  # type: ignore[attr-defined]
        await self._mailbox.put((handler, args, fut))
        return await fut

    def tell(self, handler: Callable[..., Any], *args: Any) -> bool:
        """Queue a message without waiting; False if the mailbox is full or stopped."""
        if self._stopped:
            return False
        try:
            self._mailbox.put_nowait((handler, args, None))
        except asyncio.QueueFull:
            return False
        return True

    # -- actor side --------------------------------------------------------
    async def run(self) -> None:
        """The actor's task. Returns on stop(); raises if the loop itself fails."""
        self._running = True
        try:
            while True:
                msg = await self._mailbox.get()
                if msg is _STOP:
                    break
                if self.inject_crash is not None:
                    exc, self.inject_crash = self.inject_crash, None
                    _, _, fut = msg
                    if fut is not None and not fut.done():
                        fut.set_exception(ActorStopped(self.name))
                    raise exc
                handler, args, fut = msg
                try:
                    result = handler(*args)
                    if getattr(handler, "stepped", False):
                        result = await self._run_stepped(result, fut)
                except _Cancelled as c:
                    raise cast(BaseException, c.__cause__) from None  # the actor's own task was cancelled
                except BaseException as exc:  # handler errors go back to the caller
                    if fut is None:
                        log.warning("%s: %s%r failed: %r", self.name, handler.__name__, args, exc)
                    elif not fut.done():
                        fut.set_exception(exc)
                else:
                    if fut is not None:
                        if not fut.done():
                            fut.set_result(result)
                        elif (orphan := getattr(fut, "orphan", None)) is not None:
                            orphan(result)
        except BaseException as exc:
            self.crash_cause = exc
            raise
        finally:
            self._running = False
            self._fail_pending()

    async def _run_stepped(
        self, gen: Generator[Any, Any, Any], fut: asyncio.Future[Any] | None
    ) -> Any:
        """Drive a stepped handler to its end, giving the loop back between slices."""
        self._busy = True
        try:
            while True:
                done, result = _run_slice(gen)
                if done:
                    return result
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError as exc:
                    # The actor's task itself is cancelled: the handler ends at a
                    # step boundary, where its state is consistent.
                    gen.close()
                    if fut is not None and not fut.done():
                        fut.set_exception(ActorStopped(self.name))
                    raise _Cancelled() from exc
        finally:
            self._busy = False

    def _fail_pending(self) -> None:
        """Answer every queued request with EIO so no caller waits forever."""
        while True:
            try:
                msg = self._mailbox.get_nowait()
            except asyncio.QueueEmpty:
                return
            if msg is _STOP:
                continue
            handler, args, fut = msg
            if handler is _resume:
                args[0].close()  # a stepped handler begun in its asker: ends here
            else:
                self._dropped(handler, args)
            if fut is not None and not fut.done():
                fut.set_exception(ActorStopped(self.name))

    def _dropped(self, handler: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """A queued message that will never run: release what it carried (an fd)."""

    def stop(self) -> None:
        """Ask the run loop to end after the messages already queued."""
        self._stopped = True
        if not self._running:
            # A crashed (or never started) actor has no loop to read its mailbox:
            # answer what is queued with EIO now rather than leave callers waiting.
            # The _STOP still goes in: an actor whose task has not started yet
            # reads it first and ends at once.
            self._fail_pending()
        try:
            self._mailbox.put_nowait(_STOP)
        except asyncio.QueueFull:
            # A full mailbox: drop the backlog with EIO rather than wait.
            self._fail_pending()
            self._mailbox.put_nowait(_STOP)

    def restart(self) -> None:
        """Allow run() to be started again after a crash (state is kept)."""
        self._stopped = False
        self.crash_cause = None

    def close(self) -> None:
        """Release every resource the actor owns (fds, mappings). Idempotent."""

    @property
    def running(self) -> bool:
        return self._running
