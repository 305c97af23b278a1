"""The /dev/fuse transport: moves frames between the kernel and the dispatcher.

One reader task per queue reads requests from a nonblocking /dev/fuse fd
without blocking the loop (it waits for readability with `add_reader` only
when the fd is empty) and hands each frame to `Dispatcher.submit`, whose
backpressure simply makes the reader stop reading. Replies go back with one
`writev` on the fd the request came from (the kernel keeps per-fd lists of
requests being processed). Extra queues are fds cloned from the first with
FUSE_DEV_IOC_CLONE.

Notifications (FUSE_NOTIFY_*) are written by a single notification thread
fed from a bounded queue, because such a write can wait in the kernel on a
directory lock held by a request whose reply the event loop still has to
write. A full queue drops the notification and counts it.

FUSE passthrough: `backing` registers host fds with the kernel
(FUSE_DEV_IOC_BACKING_OPEN/CLOSE) so reads and writes of an opened file skip
the server entirely.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import TypeAlias, TypedDict

from actorfs.runtime.core.abi import peek_header
from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.fuse.dispatcher import MAX_WRITE, PAGE_SIZE, Dispatcher
from actorfs.runtime.fuse.notify import WriterNotifier

log = logging.getLogger("actorfs.fuse")

# A read must offer room for the largest request: a WRITE of max_write bytes
# plus its headers. One spare page covers every header.
READ_BUFFER_SIZE = MAX_WRITE + max(PAGE_SIZE, 4096)

# Frames above this size (WRITEs) are not copied out of the read buffer.
SMALL_FRAME = 64 * 1024
# Read buffers kept for reuse per queue (each READ_BUFFER_SIZE bytes).
SPARE_BUFFERS = 4

# Reads that end the session: unmounted (ENODEV) or aborted through fusectl.
_GONE = (errno.ENODEV, errno.ECONNABORTED)

# How long a reader keeps polling an empty /dev/fuse before it sleeps (µs).
DEFAULT_POLL_US = 200

# A reply sender: writes one reply's buffers to /dev/fuse (a dispatcher Send).
ReplySender: TypeAlias = Callable[[P.Iov], None]


class BackingStats(TypedDict):
    """BackingFiles.stats(): FUSE passthrough backing files."""

    opened: int
    closed: int
    failed: int
    live: int


class TransportStats(TypedDict):
    """FuseTransport.stats(): frames and replies through /dev/fuse."""

    queues: int
    frames: int
    bytes_in: int
    replies: int
    replies_dropped: int
    reply_errors: int
    notify_delivered: int
    notify_undelivered: int
    notify_dropped: int
    backing: BackingStats


class BackingFiles:
    """FUSE passthrough: register host fds as kernel backing files.

    The op layer calls `open(fd) -> backing_id` when it opens a file and puts
    the id in the open reply with FOPEN_PASSTHROUGH; `close(backing_id)` on
    release. Both raise OSError on failure (the op then falls back to normal
    I/O): EPERM without CAP_SYS_ADMIN, EOPNOTSUPP without kernel support.

    The kernel fails an open with EIO when one inode is given two different
    backing files, so every open of the same host inode shares one backing id,
    counted, and closed with the last release. (The kernel opens its own file
    on the backing path with each open's flags, so sharing is safe.)
    """

    def __init__(self, devfd: int):
        self._devfd = devfd
        self._by_inode: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [id, refs]
        self._inode_of: dict[int, tuple[int, int]] = {}
        self.opened = 0
        self.closed = 0
        self.failed = 0

    def open(self, fd: int) -> int:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        shared = self._by_inode.get(key)
        if shared is not None:
            shared[1] += 1
            return shared[0]
        arg = bytearray(P.backing_map(fd))
        try:
            # mutate_flag=True makes ioctl return the syscall's value: the id.
            # (typeshed types this overload, a writable buffer, as Any.)
            backing_id: int = fcntl.ioctl(self._devfd, P.FUSE_DEV_IOC_BACKING_OPEN, arg, True)
        except OSError:
            self.failed += 1
            raise
        self._by_inode[key] = [backing_id, 1]
        self._inode_of[backing_id] = key
        self.opened += 1
        return backing_id

    def close(self, backing_id: int) -> None:
        key = self._inode_of.get(backing_id)
        if key is not None:
            shared = self._by_inode[key]
            shared[1] -= 1
            if shared[1] > 0:
                return
            del self._by_inode[key]
            del self._inode_of[backing_id]
        arg = bytearray(struct.pack("<I", backing_id))
        fcntl.ioctl(self._devfd, P.FUSE_DEV_IOC_BACKING_CLOSE, arg, True)
        self.closed += 1

    @property
    def live(self) -> int:
        return len(self._inode_of)

    def stats(self) -> BackingStats:
        return {
            "opened": self.opened,
            "closed": self.closed,
            "failed": self.failed,
            "live": self.live,
        }


def clone_fd(devfd: int) -> int:
    """A new /dev/fuse fd attached to devfd's connection (one more queue)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, P.FUSE_DEV_IOC_CLONE, struct.pack("<I", devfd))
    except OSError:
        os.close(fd)
        raise
    return fd


class FuseTransport:
    """Serves one mounted FUSE connection through `dispatcher`.

    `run()` returns when the session ends: unmounted from outside (ENODEV),
    `stop()`, or a fatal error (kept in `error`). `ready` is set once the
    FUSE_INIT reply was accepted by the kernel: the mount is usable.
    """

    def __init__(
        self,
        devfd: int,
        dispatcher: Dispatcher,
        *,
        queues: int = 1,
        notify_queue: int = 1024,
        poll_us: int = DEFAULT_POLL_US,
    ):
        if queues < 1:
            raise ValueError("queues must be at least 1")
        self.devfd = devfd
        self.dispatcher = dispatcher
        self.queues = queues
        self.poll_seconds = max(0, poll_us) / 1e6
        self.ready = asyncio.Event()
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.error: BaseException | None = None
        self._fds: list[int] = [devfd]
        self._readers: list[asyncio.Task[None]] = []
        self._closed = False
        # counters
        self.frames = 0
        self.bytes_in = 0
        self.replies = 0
        self.replies_dropped = 0  # ENOENT: the kernel had already given up the request
        self.reply_errors = 0
        self.notify_dropped = 0
        # notifications
        # (the notification's buffers, the future told whether it was written)
        self._notify_queue: asyncio.Queue[tuple[P.Iov, asyncio.Future[bool]]] = asyncio.Queue(
            notify_queue
        )
        self._notify_task: asyncio.Task[None] | None = None
        self._notify_thread: ThreadPoolExecutor | None = None
        self.notifier = WriterNotifier(self._enqueue_notification, enabled=self._can_notify)
        self.backing = BackingFiles(devfd)

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Read and dispatch until the session ends."""
        for _ in range(self.queues - 1):
            try:
                self._fds.append(clone_fd(self.devfd))
            except OSError as exc:
                log.warning("cannot clone /dev/fuse (%s): serving %d queue(s)", exc, len(self._fds))
                break
        for fd in self._fds:
            os.set_blocking(fd, False)
        self._notify_thread = ThreadPoolExecutor(1, thread_name_prefix="actorfs-fuse-notify")
        self._notify_task = asyncio.create_task(self._notify_loop(), name="fuse:notify")
        self._readers = [
            asyncio.create_task(self._read_loop(fd), name=f"fuse:read:{i}")
            for i, fd in enumerate(self._fds)
        ]
        try:
            await self.ended.wait()
        finally:
            await self._stop_tasks()

    def stop(self, reason: str = "stopped") -> None:
        """End the session: the readers stop reading (the kernel keeps what is queued)."""
        self._end(reason)

    def _end(self, reason: str, error: BaseException | None = None) -> None:
        if self.ended.is_set():
            return
        self.end_reason = reason
        self.error = error
        self.ended.set()

    async def _stop_tasks(self) -> None:
        tasks = [*self._readers, *([self._notify_task] if self._notify_task else [])]
        current = asyncio.current_task()
        for t in tasks:
            if t is not current:
                t.cancel()
        for t in tasks:
            if t is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self._readers = []
        self._notify_task = None
        # Anything still queued will never be written.
        while not self._notify_queue.empty():
            _iov, fut = self._notify_queue.get_nowait()
            if not fut.done():
                fut.set_result(False)

    def close(self) -> None:
        """Close every fd (this aborts the connection if it is still mounted)."""
        if self._closed:
            return
        self._closed = True
        if self._notify_thread is not None:
            # A notify write blocked in the kernel returns once the fd is closed
            # or the connection aborted; do not wait for it here.
            self._notify_thread.shutdown(wait=False, cancel_futures=True)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._notify_thread is not None:
            self._notify_thread.shutdown(wait=True)
            self._notify_thread = None

    # -- requests -----------------------------------------------------------------------

    async def _read_loop(self, fd: int) -> None:
        buf = bytearray(READ_BUFFER_SIZE)
        view = memoryview(buf)
        spare: list[bytearray] = []
        submit = self.dispatcher.submit
        send = self._sender(fd)
        debug = log.isEnabledFor(logging.DEBUG)
        poll = self.poll_seconds
        polling_until = 0.0
        try:
            while True:
                try:
                    n = os.readv(fd, [buf])
                except BlockingIOError:
                    # Keep reading for a while before sleeping: the next request
                    # of a busy client usually comes within microseconds, and a
                    # server asleep in epoll is woken by an inter-processor
                    # interrupt, which on a VM costs more than the whole request
                    # (docs/BENCHMARKS.md). Each turn lets the loop run what is
                    # ready and yields the CPU to a client that may want it.
                    if poll:
                        now = perf_counter()
                        if not polling_until:
                            polling_until = now + poll
                        if now < polling_until:
                            await asyncio.sleep(0)
                            os.sched_yield()
                            continue
                    polling_until = 0.0
                    await self._readable(fd)
                    continue
                except OSError as exc:
                    if exc.errno in _GONE:
                        self._end("unmounted")
                        return
                    if exc.errno == errno.ENOENT:  # the request was interrupted meanwhile
                        continue
                    raise
                if n == 0:
                    self._end("unmounted")
                    return
                polling_until = 0.0
                self.frames += 1
                self.bytes_in += n
                # The dispatcher keeps the frame until the reply is sent (WRITE
                # data is a view into it). A small frame is copied and the buffer
                # reused; a large one (a WRITE) keeps the buffer, which comes back
                # to `spare` once its reply is sent, and reading goes on in another.
                reply = send
                frame: bytes | memoryview
                if n > SMALL_FRAME:
                    frame = view[:n]
                    reply = self._recycling(send, buf, spare)
                    buf = spare.pop() if spare else bytearray(READ_BUFFER_SIZE)
                    view = memoryview(buf)
                else:
                    frame = bytes(view[:n])
                if debug:
                    _log_request(frame)
                if not self.ready.is_set() and _is_init(frame):
                    await submit(frame, self._init_sender(fd))
                else:
                    await submit(frame, reply)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("reading /dev/fuse failed")
            self._end("error", exc)

    @staticmethod
    def _recycling(send: ReplySender, buf: bytearray, spare: list[bytearray]) -> ReplySender:
        """`send`, then give `buf` back for reading: the request is done with it."""

        def send_and_recycle(iov: P.Iov) -> None:
            send(iov)
            if len(spare) < SPARE_BUFFERS:
                spare.append(buf)

        return send_and_recycle

    async def _readable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_reader(fd)

    def _sender(self, fd: int) -> ReplySender:
        debug = log.isEnabledFor(logging.DEBUG)

        def send(iov: P.Iov) -> None:
            if debug:
                length, error, unique = P.parse_out_header(iov[0])
                log.debug("reply unique=%d error=%d len=%d", unique, error, length)
            try:
                os.writev(fd, iov)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    # Interrupted and already answered by the kernel: nothing to do.
                    self.replies_dropped += 1
                    return
                self.reply_errors += 1
                if exc.errno in _GONE:
                    self._end("unmounted")
                    return
                if exc.errno == errno.EBADF and self._closed:
                    return
                log.error("reply rejected by the kernel: %s", exc)
                return
            self.replies += 1

        return send

    def _init_sender(self, fd: int) -> ReplySender:
        send = self._sender(fd)

        def send_init(iov: P.Iov) -> None:
            init = self.dispatcher.init
            ok = P.parse_out_header(iov[0])[1] == 0 and init is not None
            fs = self.dispatcher.fs
            if ok and init is not None and init.passthrough:
                # Before the reply: the kernel sends OPEN only after reading it.
                fs.backing = self.backing
            before = self.replies
            send(iov)
            if ok and self.replies > before:
                self.ready.set()

        return send_init

    # -- notifications -------------------------------------------------------------------

    def _can_notify(self) -> bool:
        return self.ready.is_set() and not self.ended.is_set()

    async def _enqueue_notification(self, iov: P.Iov) -> bool:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        try:
            self._notify_queue.put_nowait((iov, fut))
        except asyncio.QueueFull:
            self.notify_dropped += 1
            return False
        return await fut

    async def _notify_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            iov, fut = await self._notify_queue.get()
            try:
                await loop.run_in_executor(self._notify_thread, os.writev, self.devfd, iov)
                ok = True
            except OSError as exc:
                # ENOENT: the kernel no longer caches that inode/entry;
                # ENOTDIR/EBUSY...: it refused (DELETE of a mount point...).
                log.debug("notification not delivered: %s", exc)
                ok = False
            except asyncio.CancelledError:
                if not fut.done():
                    fut.set_result(False)
                raise
            if not fut.done():
                fut.set_result(ok)

    # -- stats -------------------------------------------------------------------------

    def stats(self) -> TransportStats:
        return {
            "queues": len(self._fds),
            "frames": self.frames,
            "bytes_in": self.bytes_in,
            "replies": self.replies,
            "replies_dropped": self.replies_dropped,
            "reply_errors": self.reply_errors,
            "notify_delivered": self.notifier.delivered,
            "notify_undelivered": self.notifier.undelivered,
            "notify_dropped": self.notify_dropped,
            "backing": self.backing.stats(),
        }


def _log_request(frame: bytes | memoryview) -> None:
    head = peek_header(frame)
    if head is None or len(frame) < P.IN_HEADER_SIZE:
        log.debug("short frame of %d bytes", len(frame))
        return
    length, opcode, unique = head
    name = P.OPCODE_NAMES.get(opcode, str(opcode))
    log.debug("request %s unique=%d len=%d", name, unique, length)


def _is_init(frame: bytes | memoryview) -> bool:
    head = peek_header(frame)
    return head is not None and head.opcode == P.FUSE_INIT


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
