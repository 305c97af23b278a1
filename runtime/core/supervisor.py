"""Starts and stops actors under an asyncio task group; decides what a crash means.

A crashed actor (its run loop raised) is reported with its cause. Policy
"restart" starts its loop again with the state it had (up to `max_restarts`);
policy "stop" stops every actor so the server shuts down cleanly. Either way,
requests that were queued on the crashed actor got EIO from the actor itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actorfs.runtime.core.actor import Actor

log = logging.getLogger("actorfs.supervisor")


class Supervisor:
    def __init__(self, policy: str = "restart", max_restarts: int = 3):
        self.policy = policy
        self.max_restarts = max_restarts
        self.crashes: list[tuple[str, BaseException]] = []
        self.failed = asyncio.Event()  # set when a crash made the supervisor stop everything
        self._actors: list[Actor] = []

    @contextlib.asynccontextmanager
    async def started(self, actors: list[Actor]) -> AsyncIterator[Supervisor]:
        self._actors = list(actors)
        try:
            async with asyncio.TaskGroup() as tg:
                for actor in self._actors:
                    tg.create_task(self._supervise(actor), name=f"actor:{actor.name}")
                try:
                    yield self
                finally:
                    self.request_stop()
        finally:
            for actor in self._actors:
                actor.close()

    def request_stop(self) -> None:
        for actor in self._actors:
            actor.stop()

    async def _supervise(self, actor: Actor) -> None:
        restarts = 0
        while True:
            try:
                await actor.run()
                return
            except Exception as exc:
                self.crashes.append((actor.name, exc))
                log.error("actor %s crashed: %r", actor.name, exc)
                if self.policy == "restart" and restarts < self.max_restarts:
                    restarts += 1
                    log.warning("restarting actor %s (%d/%d)", actor.name, restarts, self.max_restarts)
                    actor.restart()
                    continue
                log.error("stopping the server after actor %s failed", actor.name)
                self.failed.set()
                self.request_stop()
                return
