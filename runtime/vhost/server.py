"""`actorfs serve --socket PATH SRC`: the vhost-user-fs backend daemon.

One unix socket, one frontend (the VMM) at a time. Each connection starts a
FUSE session: its own Filesystem (actors, pool) and Dispatcher, torn down
when the frontend goes away, so a re-attached guest starts from a clean inode
table; a guest that sends INIT again (reset or reboot while mounted) gets a
fresh session too. Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues
1..N carry requests; all of them feed the same Dispatcher, driven from the
event loop by their kick eventfds.

The frontend is untrusted (docs/RELIABILITY.md, "The hostile VMM"): rings are
processed in bounded batches, a connection without SET_OWNER within
HANDSHAKE_TIMEOUT or with a message stalled half-way is dropped, every queue
stop ends its runner whatever the queue's state, and a kick fd at end of file
stops its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

from actorfs.runtime.core.abi import peek_header
from actorfs.runtime.core.shield import shielded
from actorfs.runtime.core.waits import first_of
from actorfs.runtime.fuse import protocol
from actorfs.runtime.ops.filesystem import FsConfig, check_root
from actorfs.runtime.vhost.vhost_user import (
    ProtocolError,
    VhostUserBackend,
    recv_message,
    send_message,
)
from actorfs.runtime.vhost.virtqueue import Chain, QueueBroken, Virtqueue

if TYPE_CHECKING:
    from actorfs.actors.dax import DaxWindow
    from actorfs.runtime.fuse.dispatcher import Dispatcher

# Connection.renew(): close the FUSE session, open a fresh one -> (dispatcher, DAX window).
Renew: TypeAlias = "Callable[[], Awaitable[tuple[Dispatcher, DaxWindow | None]]]"

log = logging.getLogger("actorfs.vhost")

DRAIN_TIMEOUT = 5.0  # how long a stopping queue waits for its in-flight requests
HANDSHAKE_TIMEOUT = 5.0  # a frontend that sends no SET_OWNER within this is dropped
BATCH_CHAINS = 64  # chains popped before the runner lets the rest of the loop run
BATCH_SECONDS = 0.001  # ... or this long, whichever comes first


class SocketInUse(Exception):
    """The socket path belongs to a live server (or is not a socket)."""


# -- the listening socket --------------------------------------------------------
def bind_socket(path: str) -> socket.socket:
    """Listen on `path`; a stale socket file is removed, a live one is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket: remove it or pick another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)  # a live server with a full backlog makes connect() wait
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: a leftover from a crashed server
        except TimeoutError:
            raise SocketInUse(f"socket {path} is in use by a busy server: stop it or pick another --socket") from None
        else:
            raise SocketInUse(f"socket {path} is in use by a running server: stop it or pick another --socket")
        finally:
            probe.close()
    # Bound and listening under a temporary name, then renamed into place: whoever
    # sees the path (a VMM started right after) can connect at once.
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(1)
        sock.setblocking(False)
        os.rename(tmp, path)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return sock


def _remove_socket(path: str, ino: int | None) -> None:
    """Remove the socket file only if it is still the one we bound."""
    with contextlib.suppress(OSError):
        if ino is not None and os.lstat(path).st_ino == ino:
            os.unlink(path)


# -- one queue --------------------------------------------------------------------
class QueueRunner:
    """Pops chains from one virtqueue on kicks and feeds them to the dispatcher."""

    def __init__(self, conn: Connection, vq: Virtqueue):
        self.conn = conn
        self.vq = vq
        self.loop = asyncio.get_running_loop()
        # VhostUserBackend._activate starts a runner only for a started queue, and
        # a queue is started only by a kick fd (SET_VRING_KICK, SET_VRING_ENABLE).
        assert vq.kick_fd is not None
        self.kick_fd: int = vq.kick_fd
        # A kick wakes the runner through one future, made only while it sleeps
        # (asyncio.Event costs a future, a waiter list and two calls per kick).
        self.kicked = False
        self._sleeping: asyncio.Future[None] | None = None
        # stop() waits for the in-flight replies through this, made only then.
        self._drained: asyncio.Future[None] | None = None
        self.inflight = 0
        self.notify_pending = False
        self.bad_chains = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """ValueError when the kick fd cannot be watched (epoll refuses it)."""
        os.set_blocking(self.kick_fd, False)
        try:
            self.loop.add_reader(self.kick_fd, self._on_kick)
        except (OSError, ValueError) as exc:
            raise ValueError(f"queue {self.vq.index}: kick fd cannot be watched: {exc}") from None
        self.kicked = True  # buffers may already be waiting (a restarted ring)
        self.task = asyncio.create_task(self._run(), name=f"vhost-queue-{self.vq.index}")

    def _on_kick(self) -> None:
        try:
            data = os.read(self.kick_fd, 8)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._kick_fd_gone(exc.strerror or str(exc))
            return
        if not data:  # a pipe whose writer is gone: readable forever, never a kick again
            self._kick_fd_gone("end of file")
            return
        self.kicked = True
        sleeping = self._sleeping
        if sleeping is not None and not sleeping.done():
            sleeping.set_result(None)

    def _kick_fd_gone(self, why: str) -> None:
        log.warning("queue %d: kick fd at %s: the queue is stopped until it is set up again",
                    self.vq.index, why)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.kick_fd)
        self.vq.broken = True
        self.vq.signal_error()

    async def _run(self) -> None:
        vq = self.vq
        while True:
            if not self.kicked:
                self._sleeping = self.loop.create_future()
                try:
                    await self._sleeping
                finally:
                    self._sleeping = None
            self.kicked = False
            try:
                # In batches: BATCH_CHAINS chains (malformed ones count) or BATCH_SECONDS,
                # then the loop runs the control channel, the other queues and the
                # interrupts. A guest that keeps the ring full cannot starve them.
                count = 0
                until = time.monotonic() + BATCH_SECONDS
                while vq.ready:
                    chain = vq.pop()
                    if chain is None:
                        if not vq.enable_kicks():
                            break
                        continue
                    await self._dispatch(chain)
                    count += 1
                    if count >= BATCH_CHAINS or time.monotonic() >= until:
                        await asyncio.sleep(0)
                        count = 0
                        until = time.monotonic() + BATCH_SECONDS
            except QueueBroken as exc:
                log.warning("%s: the queue is stopped until the driver sets it up again", exc)
            except Exception:
                # A bug must not silently stall the queue: say so, and stop it the same way.
                log.exception("queue %d: processing failed; the queue is stopped", vq.index)
                vq.broken = True
                vq.signal_error()

    async def _dispatch(self, chain: Chain) -> None:
        vq = self.vq
        if chain.error is not None:
            self._hostile("malformed descriptor chain %d: %s", chain.head, chain.error)
            self._complete(chain.head, 0)
            return
        frame = chain.request()
        head = peek_header(frame)
        if head is None or len(frame) < protocol.IN_HEADER_SIZE:
            self._hostile("request of %d bytes, shorter than a FUSE header", len(frame))
            written = 0
            if head is not None:  # its unique is there: answer it with EINVAL
                written = chain.write_reply(protocol.reply_error(head.unique, errno.EINVAL)) or 0
            self._complete(chain.head, written)
            return
        length, opcode, unique = head
        if length < protocol.IN_HEADER_SIZE:
            # fuse_in_header.len below the header itself; the unique is in the frame.
            self._hostile("fuse_in_header.len %d, shorter than the header", length)
            self._complete(chain.head,
                           chain.write_reply(protocol.reply_error(unique, errno.EINVAL)) or 0)
            return
        if length < len(frame):
            frame = frame[:length]  # the decoder wants exactly fuse_in_header.len bytes
        if opcode in protocol.NO_REPLY_OPCODES:
            # No reply will come: hand back the buffers now, and a copy to the dispatcher.
            # The copy is taken first: once the head is back, the guest may reuse the
            # buffer at once (even before we next run).
            frame = bytes(frame)
            self._complete(chain.head, 0)
            dispatcher = await self.conn.dispatcher_for(opcode)
            await dispatcher.submit(frame, _no_reply)
            return
        generation = vq.generation
        self.inflight += 1
        replied = False

        def send(iov: protocol.Iov) -> None:
            nonlocal replied
            if replied:
                return
            replied = True
            self._request_done()
            if vq.generation != generation or not vq.intact():
                return  # the ring was stopped or reset meanwhile: nobody waits for this
            written = chain.write_reply(iov)
            if written is None:
                log.warning("queue %d: reply of %d bytes does not fit in %d writable bytes",
                            vq.index, sum(len(b) for b in iov), chain.writable_len)
                written = chain.write_reply(protocol.reply_error(unique, errno.EINVAL)) or 0
            self._complete(chain.head, written)

        try:
            conn = self.conn
            dispatcher = conn.current_dispatcher(opcode) or await conn.dispatcher_for(opcode)
            await dispatcher.submit(frame, send)
        except asyncio.CancelledError:
            # The queue stops while the request waits (for a new session, or for room
            # in the dispatcher): answer it, which also keeps the in-flight count exact.
            send(protocol.reply_error(unique, errno.EIO))
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Not our cancellation: the request's own first step (run in this task,
            # runtime/core/eager.py) ended with one. Only that request fails.
            log.warning("queue %d: request %d was cancelled from within; answered EIO",
                        vq.index, unique)
        except Exception:
            log.exception("queue %d: dispatch failed", vq.index)
            send(protocol.reply_error(unique, errno.EIO))

    def _hostile(self, fmt: str, *args: object) -> None:
        """Log bad guest input, but not every time: a guest must not flood the log."""
        self.bad_chains += 1
        if self.bad_chains <= 10 or self.bad_chains % 1000 == 0:
            log.warning("queue %d: " + fmt + " (%d so far)", self.vq.index, *args,
                        self.bad_chains)

    def _request_done(self) -> None:
        self.inflight -= 1
        drained = self._drained
        if self.inflight == 0 and drained is not None and not drained.done():
            drained.set_result(None)

    def _complete(self, head: int, written: int) -> None:
        dropped = self.vq.dropped_pushes
        self.vq.push(head, written)
        n = self.vq.dropped_pushes
        if n != dropped and (n <= 10 or n % 1000 == 0):
            log.warning("queue %d: head %d was not in flight; its completion is dropped "
                        "(%d so far)", self.vq.index, head, self.vq.dropped_pushes)
        if not self.notify_pending:
            # One interrupt for every reply that completes in this loop iteration.
            self.notify_pending = True
            self.loop.call_soon(self._flush_notify)

    def _flush_notify(self) -> None:
        self.notify_pending = False
        if self.vq.needs_notify():
            self.vq.notify()

    def detach(self) -> None:
        """Stop listening for kicks and popping chains (synchronous, idempotent)."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.kick_fd)
        if self.task is not None:
            self.task.cancel()

    async def stop(self) -> None:
        """Stop popping, then wait (bounded) for the in-flight replies."""
        self.detach()
        if self.task is not None:
            await asyncio.wait([self.task])  # unlike `await task`, keeps our own cancellation
        if self.inflight:
            try:
                self._drained = self.loop.create_future()
                await asyncio.wait_for(self._drained, DRAIN_TIMEOUT)
            except TimeoutError:
                log.warning("queue %d: %d requests still in flight at stop", self.vq.index,
                            self.inflight)
        self._flush_notify()


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a FUSE session renewal failed: %r", task.exception())


def _no_reply(iov: protocol.Iov) -> None:
    """FORGET and friends never get a reply; a stray one has nowhere to go."""


# -- one frontend connection ------------------------------------------------------
class Connection:
    """The QueueListener for one frontend: owns the queue runners and the FUSE session."""

    def __init__(self, sock: socket.socket, dispatcher: Dispatcher, *, tag: str | None = None,
                 dax_window: DaxWindow | None = None, renew: Renew | None = None,
                 allow_unsealed: bool = False):
        self.sock = sock
        self.dispatcher = dispatcher
        self.runners: dict[int, QueueRunner] = {}
        self.dax_window = dax_window
        # renew(): close the session and open a fresh one -> (dispatcher, dax_window).
        self.renew = renew
        self._renewing = asyncio.Lock()
        self._renewal: asyncio.Task[None] | None = None
        self.backend = VhostUserBackend(self, tag=tag, dax=dax_window is not None,
                                        allow_unsealed=allow_unsealed)
        self.dax_sockets: list[socket.socket] = []

    def current_dispatcher(self, opcode: int) -> Dispatcher | None:
        """The dispatcher, when no renewal is under way or could start (the hot path)."""
        if opcode == protocol.FUSE_INIT or self._renewal is not None or self._renewing.locked():
            return None
        return self.dispatcher

    async def dispatcher_for(self, opcode: int) -> Dispatcher:
        """The dispatcher for a request; a second INIT starts a new FUSE session.

        A guest that reboots or resets the device without unmounting sends
        INIT again on the same connection: its old nodeids and handles are
        gone with it, so it gets a fresh Filesystem rather than an error.
        The renewal runs in a task of its own: a queue stopped meanwhile
        cancels the request that waits for it, never the renewal half-way.
        """
        async with self._renewing:
            if self._renewal is not None:
                await asyncio.shield(self._renewal)  # one begun by a cancelled request
            if (opcode == protocol.FUSE_INIT and self.renew is not None
                    and getattr(self.dispatcher, "init", None) is not None):
                log.info("the guest sent INIT again: starting a new FUSE session")
                self._renewal = asyncio.create_task(self._renew(), name="fuse-session-renewal")
                # Its failure reaches the request that waits; if that one was cancelled,
                # the next INIT tries again (from whatever state this one left).
                self._renewal.add_done_callback(_retrieve)
                await asyncio.shield(self._renewal)
            return self.dispatcher

    async def _renew(self) -> None:
        assert self.renew is not None  # dispatcher_for starts a renewal only with one
        try:
            self.dispatcher, self.dax_window = await self.renew()
            if self.dax_window is not None and self.dax_sockets:
                self._connect_dax(self.dax_window, self.dax_sockets[-1])
        finally:
            self._renewal = None

    # QueueListener
    def queue_active(self, vq: Virtqueue) -> None:
        old = self.runners.pop(vq.index, None)
        if old is not None:  # restarted without a stop (a new memory table): one runner only
            old.detach()
        runner = QueueRunner(self, vq)
        runner.start()
        self.runners[vq.index] = runner

    async def queue_stopping(self, vq: Virtqueue) -> None:
        runner = self.runners.pop(vq.index, None)
        if runner is not None:
            await runner.stop()

    def backend_channel(self, sock: socket.socket, shmem: bool) -> bool:
        """With SHMEM negotiated, DAX map/unmap requests go to the frontend on this channel."""
        if self.dax_window is None or not shmem:
            return False
        sock.setblocking(True)  # the DAX sender thread does blocking sends with a timeout
        self._connect_dax(self.dax_window, sock)
        self.dax_sockets.append(sock)  # closed after the DAX window (its unmaps go out first)
        log.info("DAX: SETUPMAPPING/REMOVEMAPPING go to the frontend over the backend channel")
        return True

    def _connect_dax(self, window: DaxWindow, sock: socket.socket) -> None:
        from actorfs.runtime.dax.channel import ChannelMapper, DaxChannel

        mapper = window.mapper
        if not isinstance(mapper, ChannelMapper):
            # virtiofs_config() gives a served window the channel mapper; a session
            # configured otherwise (serve_connection() called with another dax_mapper)
            # has no way to the frontend. (This was an AttributeError on .connect.)
            raise TypeError(f"a DAX window served over vhost-user needs dax_mapper='channel', "
                            f"not {type(mapper).__name__}")
        mapper.connect(DaxChannel(sock, reply_ack=self.backend.reply_ack))

    async def run(self) -> None:
        handshake_until = time.monotonic() + HANDSHAKE_TIMEOUT
        try:
            while True:
                if self.backend.owner:
                    msg = await recv_message(self.sock)
                else:
                    # Only SET_OWNER is timed (QEMU sends it at once): the memory table
                    # may come much later (a slow guest boot).
                    try:
                        async with asyncio.timeout(max(handshake_until - time.monotonic(), 0)):
                            msg = await recv_message(self.sock)
                    except TimeoutError:
                        log.warning("no SET_OWNER within %g s: closing the connection",
                                    HANDSHAKE_TIMEOUT)
                        return
                if msg is None:
                    log.info("frontend disconnected")
                    return
                reply = await self.backend.handle(msg)
                if reply is not None:
                    await send_message(self.sock, reply)
        except ProtocolError as exc:
            log.warning("vhost-user protocol error, closing the connection: %s", exc)
        except (ConnectionError, OSError) as exc:
            log.info("frontend connection lost: %s", exc)
        except Exception:
            log.exception("vhost-user message handling failed, closing the connection")
        finally:
            runners = list(self.runners.values())
            self.runners.clear()
            for runner in runners:
                runner.detach()
            try:
                for runner in runners:
                    await runner.stop()
                if self._renewal is not None:  # a renewal left behind by a cancelled request
                    await asyncio.wait([self._renewal])
            finally:
                await self.backend.close()


class Session:
    """One FUSE session: a Filesystem (actors, blocking pool) and its Dispatcher.

    The Filesystem lives in a task of its own: its supervisor's task group must
    be entered and left by the same task, while sessions are opened and closed
    from whichever task sees the frontend connect or the guest send INIT again.
    """

    def __init__(self, config: FsConfig):
        self.config = config
        self.dispatcher: Dispatcher | None = None
        self.dax_window: DaxWindow | None = None  # the Filesystem's DAX actor, when configured
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> Session:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._live(ready), name="fuse-session")
        try:
            await first_of(ready, self._task)
        except BaseException:
            self._task.cancel()
            raise
        if not ready.done():
            await self._task  # it ended before being ready: its exception
            raise RuntimeError("the FUSE session ended before it started")
        return self

    def serving(self) -> tuple[Dispatcher, DaxWindow | None]:
        """The session's dispatcher and DAX window, once open() has returned."""
        assert self.dispatcher is not None  # open() returns only once _live made it
        return self.dispatcher, self.dax_window

    async def _live(self, ready: asyncio.Future[None]) -> None:
        from actorfs.runtime.fuse.dispatcher import Dispatcher
        from actorfs.runtime.ops.filesystem import Filesystem

        async with Filesystem.running(self.config) as fs:
            dispatcher = self.dispatcher = Dispatcher(fs, transport="virtiofs")
            self.dax_window = fs.dax
            ready.set_result(None)
            await self._closing.wait()
            # Let the requests in flight finish (bounded), then stop the actors.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dispatcher.drain(), DRAIN_TIMEOUT)

    async def close(self) -> None:
        if self._task is None:
            return
        self._closing.set()
        try:
            await asyncio.wait([self._task])
        except BaseException:
            self._task.cancel()  # we are cancelled ourselves: do not leave it behind
            raise
        if not self._task.cancelled() and self._task.exception() is not None:
            log.warning("FUSE session ended with %r", self._task.exception())


async def serve_connection(config: FsConfig, sock: socket.socket, *,
                           tag: str | None = None, stats_interval: float = 0,
                           allow_unsealed_memory: bool = False,
                           on_connection: Callable[[Connection], None] | None = None) -> None:
    """Serve one frontend until it disconnects, in a fresh FUSE session.

    `config` is used as given. A DAX window reaches a frontend in another
    process only with `dax_mapper="channel"` (what `virtiofs_config()` and
    VhostUserServer set); an embedding VMM in this process may keep the
    in-process mapper. A frontend asking for the backend channel of a window
    configured otherwise is refused with a TypeError naming the fix.
    """
    sock.setblocking(False)
    session: Session | None = None
    conn: Connection | None = None

    async def renew() -> tuple[Dispatcher, DaxWindow | None]:
        nonlocal session
        old, session = session, None
        if old is not None:  # None: an earlier renewal failed half-way
            await old.close()
        session = await Session(config).open()
        return session.serving()

    try:
        session = await Session(config).open()
        dispatcher, dax_window = session.serving()
        conn = Connection(sock, dispatcher, tag=tag, dax_window=dax_window,
                          renew=renew, allow_unsealed=allow_unsealed_memory)
        if on_connection is not None:  # e.g. the stats socket reads conn.dispatcher
            on_connection(conn)
        await _serve(conn, stats_interval)
    finally:
        try:
            if session is not None:
                await session.close()
        finally:
            sock.close()
            for s in conn.dax_sockets if conn is not None else ():
                s.close()


def virtiofs_config(config: FsConfig, dax_name: str | None, dax_size: int) -> FsConfig:
    """The configuration a vhost-user session runs with.

    The hypervisor is another process: a DAX window is useful to it only through
    SHMEM_MAP requests on the backend channel, so the mapper is "channel".
    """
    if dax_size:
        config = dataclasses.replace(config, dax_size=dax_size)
    if dax_name:
        config = dataclasses.replace(config, dax_name=dax_name)
    if config.dax_name or config.dax_size:  # the Filesystem's own test for a window
        config = dataclasses.replace(config, dax_mapper="channel")
    return config


async def _serve(conn: Connection, stats_interval: float) -> None:
    stats: asyncio.Task[None] | None = None
    if stats_interval:
        stats = asyncio.create_task(_log_stats(conn, stats_interval))
    try:
        await conn.run()
    finally:
        if stats is not None:
            stats.cancel()


async def _log_stats(conn: Connection, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        log.info("stats: %s", conn.dispatcher.stats())


def adopt_listener(fd: int) -> socket.socket:
    """The already-listening unix socket a launcher passed as fd (`--fd=N`)."""
    try:
        st = os.fstat(fd)
    except OSError:
        raise SocketInUse(f"--fd={fd} is not an open file descriptor: pass the listening socket's fd") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"--fd={fd} is not a socket: pass a listening unix socket")
    sock = socket.socket(fileno=fd)
    if (sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        sock.detach()
        raise SocketInUse(f"--fd={fd} is not a listening unix stream socket: "
                          "bind and listen() before passing it")
    sock.setblocking(False)
    return sock


class VhostUserServer:
    """A vhost-user-fs backend listening on a unix socket. Build it with `serve_vhost_user()`.

        async with serve_vhost_user(config, "/run/fs.sock") as server:
            ...                     # listening here: start the VMM
            await server.wait()     # until the frontend is done (with once=True)
        # the socket is closed and removed, the session (if any) closed

    The block owns the accept loop's task: it is started on entry and cancelled
    and awaited on exit. A failure of the accept loop (with once=True, a frontend
    whose session could not be served) is raised by `wait()`, and out of the
    block when it ends. `await serve_vhost_user(...)` serves until the frontend
    is done (once=True) or the awaiting task is cancelled, and returns 0.

    Nothing is printed and the caller's FsConfig is not changed: user errors
    (a bad root, a socket in use, a bad DAX window) are raised on entry as
    ConfigError, SocketInUse or ValueError.
    """

    def __init__(self, config: FsConfig, socket_path: str | None, *, once: bool = False,
                 dax_name: str | None = None, dax_size: int = 0, tag: str | None = None,
                 stats_interval: float = 0, allow_unsealed_memory: bool = False,
                 listen_fd: int | None = None,
                 on_connection: Callable[[Connection], None] | None = None):
        if (socket_path is None) == (listen_fd is None):
            raise ValueError("pass one of socket_path or listen_fd")
        self.config = config
        self.socket_path = socket_path
        self.once = once
        self.dax_name = dax_name
        self.dax_size = dax_size
        self.tag = tag  # the virtio-fs config space tag, if the frontend asks
        self.stats_interval = stats_interval
        self.allow_unsealed_memory = allow_unsealed_memory
        self.listen_fd = listen_fd
        self.on_connection = on_connection
        self._listener: socket.socket | None = None
        self._ino: int | None = None
        self._task: asyncio.Task[None] | None = None

    def _listen(self) -> None:
        # A copy with the canonical root: the caller's FsConfig stays as it was.
        config = dataclasses.replace(self.config, root=check_root(self.config.root))
        config = virtiofs_config(config, self.dax_name, self.dax_size)
        if config.dax_name or config.dax_size:
            # Each session makes its window; a bad name or size is said now, once.
            from actorfs.runtime.ops.filesystem import Filesystem

            Filesystem._make_dax_window(config).close()
        if self.listen_fd is not None:
            self._listener = adopt_listener(self.listen_fd)
        else:
            assert self.socket_path is not None  # __init__: one of socket_path, listen_fd
            try:
                self._listener = bind_socket(self.socket_path)
            except OSError as exc:
                raise SocketInUse(f"cannot listen on {self.socket_path}: {exc.strerror}") from exc
            self._ino = os.lstat(self.socket_path).st_ino
        self._serving = config
        log.info("waiting for a vhost-user frontend on %s",
                 self.socket_path if self.listen_fd is None else f"fd {self.listen_fd}")

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.listen_fd is None:
                assert self.socket_path is not None  # __init__: one of socket_path, listen_fd
                _remove_socket(self.socket_path, self._ino)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        assert listener is not None  # __aenter__ starts this loop right after _listen()
        while True:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancel that landed during a teardown was absorbed on the way
                # (a task group): honour it instead of accepting again.
                raise asyncio.CancelledError
            sock, _ = await loop.sock_accept(listener)
            log.info("frontend connected")
            try:
                await serve_connection(self._serving, sock, tag=self.tag,
                                       stats_interval=self.stats_interval,
                                       allow_unsealed_memory=self.allow_unsealed_memory,
                                       on_connection=self.on_connection)
            except Exception:  # e.g. the session could not start: say so, go on
                log.exception("the connection failed")
                if self.once:
                    raise
                continue
            if self.once:
                return

    async def __aenter__(self) -> VhostUserServer:
        if self._task is not None:
            raise RuntimeError("server already started")
        self._listen()
        self._task = asyncio.create_task(self._accept_loop(), name="vhost-user:accept")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        task = self._task
        try:
            if task is not None and not task.done():
                task.cancel()
                await shielded(_settled(task))
        finally:
            self._close_listener()
        if exc_type is None and task is not None and not task.cancelled():
            failure = task.exception()
            if failure is not None:
                raise failure

    @property
    def listening(self) -> bool:
        return self._listener is not None and self._task is not None and not self._task.done()

    async def wait(self) -> None:
        """Until the accept loop ends (once=True: the frontend is done); raises its failure.

        Cancelling the waiter does not stop the server; leaving the block does.
        """
        if self._task is None:
            raise RuntimeError("server not started")
        await asyncio.shield(self._task)

    async def _run(self) -> int:
        async with self:
            await self.wait()
        return 0

    def __await__(self) -> Generator[Any, None, int]:
        return self._run().__await__()


async def _settled(task: asyncio.Task[None]) -> None:
    await asyncio.wait({task})


def serve_vhost_user(config: FsConfig, socket_path: str | None = None, *, once: bool = False,
                     dax_name: str | None = None, dax_size: int = 0, tag: str | None = None,
                     stats_interval: float = 0, allow_unsealed_memory: bool = False,
                     listen_fd: int | None = None,
                     on_connection: Callable[[Connection], None] | None = None,
                     ) -> VhostUserServer:
    """Serve vhost-user-fs frontends on `socket_path` one after the other (just one with `once`).

    Use as `async with serve_vhost_user(...) as server:` (listening inside the
    block; socket closed and removed, session closed when it ends), or
    `await serve_vhost_user(...)` to serve until done or cancelled.

    Guest memory must be sealed against shrinking (a memfd with F_SEAL_SHRINK,
    as QEMU's memory-backend-memfd makes it) unless `allow_unsealed_memory`:
    see runtime/vhost/guest_memory.py.

    listen_fd: serve on this already-listening socket instead (the launcher owns
    its path). dax_name/dax_size: a DAX window (a POSIX shm object) mapped by
    the hypervisor. tag: the virtio-fs tag, for a frontend that asks.
    on_connection(conn): called for each frontend. stats_interval: log the
    request stats this often (seconds; 0: never).
    """
    return VhostUserServer(config, socket_path, once=once, dax_name=dax_name, dax_size=dax_size,
                           tag=tag, stats_interval=stats_interval,
                           allow_unsealed_memory=allow_unsealed_memory, listen_fd=listen_fd,
                           on_connection=on_connection)
