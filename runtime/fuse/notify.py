"""Server -> kernel notifications: the interface the watcher calls, and two implementations.

A transport implements `Notifier` (or hands `WriterNotifier` a function that
writes one encoded notification). The watcher calls it when the host changes
under the client, never from inside a request.

The methods are coroutines on purpose: writing FUSE_NOTIFY_INVAL_ENTRY or
DELETE to /dev/fuse takes the parent directory's inode lock in the kernel,
which a request still waiting for our reply may hold. Done on the event loop
thread, that write would block the very loop that must send the reply; a
transport does it in a thread (or queues it, for virtio-fs) and awaits it.
Each returns False when the notification could not be delivered (no session,
the kernel refused it, the queue was full).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from actorfs.runtime.fuse import protocol as P

log = logging.getLogger("actorfs.notify")


@runtime_checkable
class Notifier(Protocol):
    async def inval_inode(self, nodeid: int, off: int = 0, length: int = 0) -> bool:
        """Drop cached data of nodeid in [off, off+length) (length 0: to the end).

        off < 0 invalidates only the attributes.
        """
        ...

    async def inval_entry(self, parent: int, name: bytes) -> bool:
        """Forget the dentry `name` in directory `parent`."""
        ...

    async def delete(self, parent: int, child: int, name: bytes) -> bool:
        """`name` (nodeid child) in `parent` is gone: drop the dentry and unhash it."""
        ...


class NullNotifier:
    """Delivers nothing (no session, or a transport without notifications); counts."""

    def __init__(self) -> None:
        self.undelivered = 0

    async def inval_inode(self, nodeid: int, off: int = 0, length: int = 0) -> bool:
        self.undelivered += 1
        return False

    async def inval_entry(self, parent: int, name: bytes) -> bool:
        self.undelivered += 1
        return False

    async def delete(self, parent: int, child: int, name: bytes) -> bool:
        self.undelivered += 1
        return False


Write = Callable[[P.Iov], Awaitable[bool | None] | bool | None]


class WriterNotifier:
    """Encodes each notification and hands the buffers to `write`.

    `write(iov)` may be sync or async; it returns False (or raises OSError)
    when the notification was not delivered. `enabled` lets a transport hold
    notifications back until FUSE_INIT is done (the kernel refuses them
    before) and after the session ends.
    """

    def __init__(self, write: Write, *, enabled: Callable[[], bool] | None = None):
        self._write = write
        self._enabled = enabled
        self.delivered = 0
        self.undelivered = 0

    async def _deliver(self, iov: P.Iov) -> bool:
        if self._enabled is not None and not self._enabled():
            self.undelivered += 1
            return False
        try:
            r = self._write(iov)
            if inspect.isawaitable(r):
                r = await r
        except OSError as exc:
            # ENOENT: the kernel no longer knows the inode/entry; not worth more.
            log.debug("notification not delivered: %s", exc)
            r = False
        ok = r is not False
        if ok:
            self.delivered += 1
        else:
            self.undelivered += 1
        return ok

    async def inval_inode(self, nodeid: int, off: int = 0, length: int = 0) -> bool:
        return await self._deliver(P.notify_inval_inode(nodeid, off, length))

    async def inval_entry(self, parent: int, name: bytes) -> bool:
        return await self._deliver(P.notify_inval_entry(parent, name))

    async def delete(self, parent: int, child: int, name: bytes) -> bool:
        return await self._deliver(P.notify_delete(parent, child, name))
