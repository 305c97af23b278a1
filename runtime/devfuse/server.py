"""Embedding API: serve a directory on a FUSE mount from inside an asyncio program.

    async with actorfs.mount("/srv/data", "/mnt/data") as server:
        ...                       # the mount is ready here
        print(server.stats())
    # unmounted, in-flight requests drained, every fd closed, actors stopped

The block owns the server: its one task is started on entry and awaited on
exit, whatever ends the block (an exception, a cancel of the enclosing task).
A server failure inside the block (an actor crashed, /dev/fuse failed) is
raised by `server.wait()`, and out of the block when it ends (ServerFailed,
chained to the cause). `FsConfig` carries the filesystem's options, mount()'s
keywords the mount's; the caller's FsConfig is never changed.

`await actorfs.mount(...)` also works, for a caller that owns the lifetime
itself and must call `await server.stop()`:

    server = await actorfs.mount(config, mnt)
    reason = await server.wait()  # "unmounted" when someone ran umount
    await server.stop()

Nothing here installs signal handlers or touches process-wide state; the CLI
does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from actorfs.runtime.core.shield import shielded
from actorfs.runtime.core.waits import first_of
from actorfs.runtime.devfuse import mounting as fuse_mount
from actorfs.runtime.devfuse.mounting import MountError
from actorfs.runtime.devfuse.transport import DEFAULT_POLL_US as DEFAULT_POLL_US  # re-exported
from actorfs.runtime.devfuse.transport import FuseTransport, TransportStats
from actorfs.runtime.fuse.dispatcher import Dispatcher, DispatcherStats
from actorfs.runtime.ops import follow
from actorfs.runtime.ops.filesystem import ConfigError, Filesystem, FsConfig

if TYPE_CHECKING:
    from actorfs.actors.inode_table import FdCacheStats
    from actorfs.actors.watcher import WatcherStats

log = logging.getLogger("actorfs.server")

# How long stop() lets a lazily detached mount wind down (files still open
# through it keep the connection alive) before aborting the connection.
UNMOUNT_GRACE = 2.0
# How long stop() waits for in-flight requests before abandoning them.
DRAIN_TIMEOUT = 5.0

DEFAULT_QUEUES = 1  # one asyncio thread reads them all: more queues measured no faster
# The readahead window of a mount (KiB): READs of up to 1 MiB instead of 128 KiB.
DEFAULT_READ_AHEAD_KB = 1024


class ServerFailed(Exception):
    """The server stopped on a fatal error (an actor crashed, /dev/fuse failed)."""


class PassthroughStats(TypedDict):
    on: bool
    reason: str


class PoolStats(TypedDict):
    workers: int
    submitted: int


class MountStats(TypedDict):
    """MountedServer.stats() (JSON-ready: the stats socket); the parts that exist yet."""

    mountpoint: str
    root: str
    ready: bool
    uptime_s: float
    transport: NotRequired[TransportStats]
    requests: NotRequired[DispatcherStats]
    passthrough: NotRequired[PassthroughStats]
    pool: NotRequired[PoolStats]
    inodes: NotRequired[FdCacheStats]
    watcher: NotRequired[WatcherStats]


class MountedServer:
    """One FUSE mount served by this event loop. Build it with `mount()`.

    An async context manager (the block owns the serving task) and awaitable
    (`await mount(...)` starts it and returns it once ready).
    """

    def __init__(
        self,
        config: FsConfig,
        mountpoint: str,
        *,
        allow_other: bool = False,
        queues: int | None = None,
        max_in_flight: int = 256,
        use_fusermount: bool | None = None,
        read_ahead_kb: int = DEFAULT_READ_AHEAD_KB,
        poll_us: int = DEFAULT_POLL_US,
        mount_flags: tuple[str, ...] = (),
    ):
        self.config = config
        self.mount_flags = tuple(mount_flags)  # noexec, sync, ... (fuse_mount.MOUNT_FLAGS)
        self.read_ahead_kb = read_ahead_kb
        self.poll_us = poll_us
        self.mountpoint = mountpoint
        self.allow_other = allow_other
        self.queues = queues or DEFAULT_QUEUES
        self.max_in_flight = max_in_flight
        self.use_fusermount = use_fusermount
        self.fs: Filesystem | None = None
        self.dispatcher: Dispatcher | None = None
        self.transport: FuseTransport | None = None
        self.mount_info: fuse_mount.Mount | None = None
        self.reason: str | None = None  # why it ended: stopped, unmounted, failed
        self.failure: BaseException | None = None
        self.started_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop_requested = asyncio.Event()

    # -- public API ---------------------------------------------------------------------

    async def start(self) -> MountedServer:
        """Mount and return once the kernel accepted FUSE_INIT; MountError on user errors."""
        if self._task is not None:
            raise RuntimeError("server already started")
        self._task = asyncio.create_task(self._serve(), name=f"actorfs:{self.mountpoint}")
        try:
            await first_of(self._ready.wait(), self._task)
        except asyncio.CancelledError:
            await self.stop()
            raise
        if not self._ready.is_set():
            await asyncio.wait({self._task})
            exc = self._task.exception()
            if exc is not None:
                raise exc
            if not self._stop_requested.is_set():
                raise ServerFailed(f"the mount on {self.mountpoint} ended before it was ready")
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self.done

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def wait(self) -> str:
        """Wait until the server ends; returns why ("stopped" or "unmounted").

        Raises ServerFailed if it ended on a fatal error. Cancelling the waiter
        does not stop the server.
        """
        if self._task is None:
            raise RuntimeError("server not started")
        await asyncio.shield(self._task)
        if self.failure is not None:
            raise ServerFailed(f"{self.reason}: {self.failure!r}") from self.failure
        return self.reason or "stopped"

    def request_stop(self) -> None:
        """Ask the server to stop (safe from a signal handler); `stop()` also waits."""
        self._stop_requested.set()

    async def stop(self) -> None:
        """Unmount, drain in-flight requests, close every fd, stop the actors."""
        if self._task is None:
            return
        self._stop_requested.set()
        # A cancel of our caller waits for the teardown to end, then is raised:
        # no task of ours outlives stop().
        await shielded(_settled(self._task))

    @property
    def passthrough_status(self) -> str:
        """"passthrough on (...)" / "passthrough off: ...", once INIT is done."""
        d = self.dispatcher
        if d is None or not d.passthrough_reason:
            return "passthrough not negotiated yet"
        return f"passthrough {d.passthrough_reason}"

    def stats(self) -> MountStats:
        out: MountStats = {
            "mountpoint": self.mountpoint,
            "root": self.config.root,
            "ready": self.ready,
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0,
        }
        if self.transport is not None:
            out["transport"] = self.transport.stats()
        if self.dispatcher is not None:
            out["requests"] = self.dispatcher.stats()
            out["passthrough"] = {
                "on": self.dispatcher.passthrough,
                "reason": self.dispatcher.passthrough_reason,
            }
        if self.fs is not None:
            out["pool"] = {"workers": self.fs.pool.workers, "submitted": self.fs.pool.submitted}
            out["inodes"] = self.fs.inodes.stats()
            if self.fs.watcher is not None and hasattr(self.fs.watcher, "stats"):
                with contextlib.suppress(Exception):
                    out["watcher"] = self.fs.watcher.stats()
        return out

    def __await__(self) -> Generator[Any, None, MountedServer]:
        """`await mount(...)`: start, and return the server once it is ready."""
        return self.start().__await__()

    async def __aenter__(self) -> MountedServer:
        if self._task is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        if exc_type is None and self.failure is not None:
            raise ServerFailed(f"{self.reason}: {self.failure!r}") from self.failure

    # -- the serving task ----------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            async with Filesystem.running(self.config) as fs:
                self.fs = fs
                fs.serving_at(self.mountpoint)
                await self._serve_mounted(fs)
        except ConfigError as exc:
            raise MountError(str(exc)) from None
        except BaseExceptionGroup as group:
            # The actors' task group wraps what the body raised: unwrap a lone error.
            if len(group.exceptions) == 1:
                inner = group.exceptions[0]
                if isinstance(inner, ConfigError):
                    raise MountError(str(inner)) from None
                raise inner from None
            raise

    async def _serve_mounted(self, fs: Filesystem) -> None:
        m = await fs.pool.run(
            lambda: fuse_mount.mount(
                fs.root_path,
                self.mountpoint,
                allow_other=self.allow_other,
                read_only=self.config.read_only,
                use_fusermount=self.use_fusermount,
                flags=self.mount_flags,
            )
        )
        self.mount_info = m
        follow.register_own(m.conn)  # --symlinks follow never walks into it
        try:
            dispatcher = self.dispatcher = Dispatcher(fs, "fuse", self.max_in_flight)
            transport = self.transport = FuseTransport(
                m.fd, dispatcher, queues=self.queues, poll_us=self.poll_us
            )
        except BaseException:
            os.close(m.fd)  # the only fd: closing it aborts the connection
            with contextlib.suppress(MountError):
                fuse_mount.unmount(m.mountpoint, by_fusermount=m.by_fusermount)
            raise
        if fs.watcher is not None:
            fs.watcher.set_notifier(transport.notifier)
        run = asyncio.create_task(transport.run(), name="fuse:transport")
        try:
            await self._until_ready(transport, run)
            if self._ready.is_set():
                if self.read_ahead_kb > 0:
                    fuse_mount.set_read_ahead(m.conn, self.read_ahead_kb)
                self.started_at = time.monotonic()
                log.info("serving %s on %s", fs.root_path, m.mountpoint)
                await self._until_end(fs, dispatcher, transport)
        finally:
            # Cancellation of this task (the embedding loop shutting down) must
            # still unmount and close: do it under a shield.
            await asyncio.shield(self._teardown(fs, m, dispatcher, transport, run))

    async def _until_ready(self, transport: FuseTransport, run: asyncio.Task[None]) -> None:
        await first_of(transport.ready.wait(), self._stop_requested.wait(), run)
        if not transport.ready.is_set():
            if self._stop_requested.is_set():
                return  # stopped while starting: straight to the teardown
            why = transport.error or transport.end_reason or "no FUSE_INIT"
            raise ServerFailed(f"the kernel did not accept FUSE_INIT on {self.mountpoint}: {why}")
        self._ready.set()

    async def _until_end(
        self, fs: Filesystem, dispatcher: Dispatcher, transport: FuseTransport
    ) -> None:
        await first_of(
            transport.ended.wait(),
            self._stop_requested.wait(),
            fs.supervisor.failed.wait(),
            dispatcher.destroyed.wait(),
        )
        if fs.supervisor.failed.is_set():
            name, cause = fs.supervisor.crashes[-1] if fs.supervisor.crashes else ("?", None)
            self.reason = f"actor {name} failed"
            self.failure = cause or ServerFailed(self.reason)
        elif transport.ended.is_set() and transport.error is not None:
            self.reason = "transport failed"
            self.failure = transport.error
        elif transport.ended.is_set() or dispatcher.destroyed.is_set():
            self.reason = "unmounted"
        else:
            self.reason = "stopped"

    async def _teardown(
        self,
        fs: Filesystem,
        m: fuse_mount.Mount,
        dispatcher: Dispatcher,
        transport: FuseTransport,
        run: asyncio.Task[None],
    ) -> None:
        if self.reason is None:
            self.reason = "stopped"
        if self.failure is not None:
            # Nothing may hang on a server that is going away: fail everything now.
            fuse_mount.abort_connection(m.conn)
        still_ours = fuse_mount.find_connection(m.mountpoint) == m.conn and m.conn is not None
        if still_ours:
            try:
                await fs.pool.run(
                    lambda: fuse_mount.unmount(m.mountpoint, by_fusermount=m.by_fusermount)
                )
            except MountError as exc:
                log.error("%s", exc)
            # A lazy detach ends the session once the last file opened through
            # the mount is closed; keep serving those for a grace period.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(transport.ended.wait()), UNMOUNT_GRACE)
            if not transport.ended.is_set():
                log.warning("files still open on %s: aborting the connection", m.mountpoint)
                fuse_mount.abort_connection(m.conn)
        transport.stop(self.reason)
        with contextlib.suppress(BaseException):
            await run
        try:
            await asyncio.wait_for(dispatcher.drain(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.warning("%d request(s) still running: abandoning them", dispatcher.in_flight)
            await dispatcher.cancel_all()
        fs.backing = None
        if fs.watcher is not None:
            fs.watcher.set_notifier(None)
        transport.close()
        follow.unregister_own(m.conn)
        log.info("unmounted %s (%s)", m.mountpoint, self.reason)


async def _settled(task: asyncio.Task[None]) -> None:
    """Wait for `task`; its result or failure is read elsewhere (wait(), .failure)."""
    with contextlib.suppress(BaseException):
        await asyncio.wait({task})


def mount(
    source: str | os.PathLike[str] | FsConfig,
    mountpoint: str | os.PathLike[str],
    *,
    allow_other: bool = False,
    queues: int | None = None,
    max_in_flight: int = 256,
    use_fusermount: bool | None = None,
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB,
    poll_us: int = DEFAULT_POLL_US,
    mount_flags: tuple[str, ...] = (),
) -> MountedServer:
    """Serve `source` on a FUSE mount at `mountpoint`.

    source: the directory to serve (with FsConfig's defaults), or an FsConfig
    for the filesystem's options (cache, symlinks, read_only, ...). It is not
    changed: the server works on a validated copy.

    allow_other: let other users through the mount (the allow_other option).
    queues: /dev/fuse queues (cloned fds) to read; None: DEFAULT_QUEUES.
    max_in_flight: requests served at once before reading waits.
    use_fusermount: mount through fusermount3; None: only when not root.
    read_ahead_kb: the mount's readahead window (KiB); 0 leaves the kernel's.
    poll_us: busy-poll the queue this long after a request (0: never).
    mount_flags: mount(8) flags such as "noexec", "nosuid", "sync".

    Use as `async with mount(...) as server:` (mounted and ready inside the
    block; unmounted and torn down when it ends), or `server = await mount(...)`
    and `await server.stop()` later.
    """
    config = source if isinstance(source, FsConfig) else FsConfig(root=os.fspath(source))
    return MountedServer(
        config,
        os.path.abspath(os.fspath(mountpoint)),
        allow_other=allow_other,
        queues=queues,
        max_in_flight=max_in_flight,
        use_fusermount=use_fusermount,
        read_ahead_kb=read_ahead_kb,
        poll_us=poll_us,
        mount_flags=mount_flags,
    )
