"""The dispatcher: frame -> decode -> op -> encoded reply, with bounded concurrency.

One `Dispatcher` serves one FUSE session (a /dev/fuse mount or a virtio-fs
device). Transports only move frames: they `await submit(frame, send)` for
each request and write whatever `send` is handed.

- Backpressure: at most `max_in_flight` requests run at once; `submit` waits
  for a slot, so a transport reading faster than ops complete just stops
  reading (the kernel queues) instead of growing an unbounded task set.
- Every request starts at once in the submitting task and runs there up to
  its first wait (runtime/core/eager.py); only one that waits gets its own task.
  Each replies exactly once (never for FORGET, BATCH_FORGET, INTERRUPT,
  NOTIFY_REPLY), with -errno on any failure.
- INIT is negotiated here; INTERRUPT cancels the target task (for ops that are
  safe to abandon midway) which then replies EINTR.
- A frame buffer given to `submit` must stay untouched until its reply is
  sent: WRITE payloads are handed to the op as a memoryview into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import importlib
import inspect
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from types import ModuleType
from typing import TypeAlias, TypedDict, TypeVar, cast

from actorfs.runtime.core import eager
from actorfs.runtime.core.abi import MAX_TRANSFER
from actorfs.runtime.core.attrs import (
    Opened,
    RequestContext,
    SetattrArgs,
    XattrReply,
)
from actorfs.runtime.core.errno_map import FsError, linux_errno_of
from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.fuse.operations import DaxOperations, Operations
from actorfs.runtime.fuse.stats import Stats, StatsSnapshot
from actorfs.runtime.host import backing_fs
from actorfs.runtime.ops.filesystem import Filesystem, passthrough_plan

log = logging.getLogger("actorfs.dispatcher")

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)

# Hands one reply's buffers to the transport (may be a coroutine function).
Send: TypeAlias = Callable[[P.Iov], Awaitable[None] | None]
# A request message -> its reply's buffers (None: the op gets no reply).
Handler: TypeAlias = Callable[[P.Request], Awaitable[P.Iov | None]]

MAX_WRITE = MAX_TRANSFER  # 1 MiB: INIT's max_write, and the largest READ
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_PAGES = MAX_WRITE // PAGE_SIZE

# What we always offer when the kernel does (each is implemented by the ops):
# concurrent requests, READDIRPLUS, large writes, O_TRUNC handled by open,
# cacheable symlinks. EXPORT_SUPPORT only when the op layer declares that its
# lookup answers "." and ".." (ops.LOOKUP_DOT_DOTDOT). Deliberately absent:
# POSIX_LOCKS / FLOCK_LOCKS (the kernel then does locking locally), SPLICE_*,
# DONT_MASK (the kernel applies the umask), HANDLE_KILLPRIV (v1), POSIX_ACL,
# SETXATTR_EXT, SECURITY_CTX. HANDLE_KILLPRIV_V2: the ops drop suid/sgid when
# the kernel says the writer may not keep them; in exchange the kernel stops
# asking GETXATTR security.capability before every write(2).
BASE_INIT_FLAGS = (
    P.FUSE_ASYNC_READ
    | P.FUSE_PARALLEL_DIROPS
    | P.FUSE_DO_READDIRPLUS
    | P.FUSE_READDIRPLUS_AUTO
    | P.FUSE_BIG_WRITES
    | P.FUSE_ATOMIC_O_TRUNC
    | P.FUSE_AUTO_INVAL_DATA
    | P.FUSE_CACHE_SYMLINKS
    | P.FUSE_MAX_PAGES
    | P.FUSE_HANDLE_KILLPRIV_V2
)

# Ops an INTERRUPT may abandon midway, replying EINTR. A pool job runs to its
# end even when its request is abandoned, so EINTR must be true whether or
# not the job has run: only ops without side effects (queries, reads) and
# retry-safe syncs qualify. WRITE, FALLOCATE, COPY_FILE_RANGE, ops that create
# kernel-visible state (an entry with a lookup count, an open fh) or change the
# namespace run to the end and reply what happened, as FUSE allows: a client
# told EINTR for a write that landed would write it twice (O_APPEND).
# Ops run again once when a syscall ran out of fds (EMFILE/ENFILE) and the
# inode table could evict unused cached O_PATH fds: each fails before any
# change a client could see (an entry, a handle, a namespace change), so a
# second run is the first that counts (actors/inode_table.py, the fd budget).
RETRY_AFTER_EVICTION = frozenset(
    {
        P.FUSE_LOOKUP,
        P.FUSE_GETATTR,
        P.FUSE_READLINK,
        P.FUSE_OPEN,
        P.FUSE_OPENDIR,
        P.FUSE_READDIR,
        P.FUSE_STATFS,
        P.FUSE_ACCESS,
        P.FUSE_GETXATTR,
        P.FUSE_LISTXATTR,
    }
)

INTERRUPTIBLE = frozenset(
    {
        P.FUSE_GETATTR,
        P.FUSE_READLINK,
        P.FUSE_READ,
        P.FUSE_STATFS,
        P.FUSE_FSYNC,
        P.FUSE_GETXATTR,
        P.FUSE_LISTXATTR,
        P.FUSE_FLUSH,
        P.FUSE_READDIR,
        P.FUSE_FSYNCDIR,
        P.FUSE_ACCESS,
        P.FUSE_LSEEK,
    }
)

# How long an interruptible request may still run after its INTERRUPT reached
# us before it is abandoned (EINTR). Counted from the INTERRUPT: a server
# descheduled under load reads requests and INTERRUPTs late, and a request is
# not stuck for that. A kernel filesystem's stat never fails with EINTR, so this
# errs on the side of finishing; a really stuck request still ends within it.
INTERRUPT_GRACE = 1.0

# Replied ENOSYS without running anything: the kernel then stops asking (or,
# for locks, never asks: we do not advertise them) and falls back.
ENOSYS_OPCODES = frozenset(
    {
        P.FUSE_GETLK,
        P.FUSE_SETLK,
        P.FUSE_SETLKW,
        P.FUSE_BMAP,
        P.FUSE_IOCTL,
        P.FUSE_POLL,
        P.FUSE_SYNCFS,
        P.FUSE_TMPFILE,
        P.FUSE_STATX,
    }
)

# Pseudo-opcodes for stats of frames that never reached an op.
STAT_INVALID = -1

_ORPHAN_INTERRUPTS = 256  # interrupts whose target has not arrived yet (bounded)


class _Flight:
    """One request in flight: its task and whether an INTERRUPT hit it."""

    __slots__ = ("opcode", "task", "started", "interrupted", "signalled")

    def __init__(self, opcode: int):
        self.opcode = opcode
        self.task: asyncio.Task[None] | None = None
        self.started = False
        self.interrupted = False
        self.signalled = False  # an INTERRUPT came: abandoned if still running later


@dataclass(slots=True)
class NegotiatedInit:
    """The outcome of FUSE_INIT: what both sides agreed on."""

    major: int
    minor: int  # the minor we replied (min of the kernel's and ours)
    kernel_minor: int
    kernel_flags: int  # everything the kernel offered (flags | flags2 << 32)
    flags: int  # what we replied (flags | flags2 << 32)
    max_readahead: int
    max_write: int
    max_pages: int
    max_background: int
    congestion_threshold: int
    time_gran: int
    map_alignment: int
    max_stack_depth: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def passthrough(self) -> bool:
        return self.has(P.FUSE_PASSTHROUGH)

    @property
    def writeback(self) -> bool:
        return self.has(P.FUSE_WRITEBACK_CACHE)

    @property
    def setxattr_ext(self) -> bool:
        return self.has(P.FUSE_SETXATTR_EXT)


class InitStats(TypedDict):
    """What FUSE_INIT agreed on, in Dispatcher.stats()."""

    minor: int
    kernel_minor: int
    flags: int
    passthrough: bool
    passthrough_reason: str
    writeback: bool
    max_write: int


class DispatcherStats(StatsSnapshot):
    """Dispatcher.stats(): the per-op counters and the session's state."""

    in_flight: int
    max_in_flight: int
    protocol_errors: int
    interrupts: int
    send_errors: int
    init: InitStats | None  # None before FUSE_INIT (and after DESTROY)


def root_stack_depth(root: str) -> int:
    """s_stack_depth of the filesystem holding `root` (0, or 1 on overlayfs)."""
    return backing_fs.stack_depth(root)


# An op layer that provides nothing (its module could not be imported): the
# dispatcher then has no handlers for it and replies ENOSYS.
_NO_OPS = ModuleType("actorfs.runtime.fuse.no_ops")


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name != name:  # the module exists but is broken: say so
            log.error("cannot import %s: %s", name, exc)
        return None


R = TypeVar("R", bound=P.Request)


def _entry(
    cls: type[R], handler: Callable[[R], Awaitable[P.Iov | None]], layer: object, *names: str
) -> tuple[int, Handler, object, tuple[str, ...]]:
    """A handler table row: the opcode of `cls`, its handler, and the op layer
    functions (in `layer`) it needs."""
    # decode() builds a `cls` for cls.opcode, and handlers are looked up by the
    # decoded opcode: this handler only ever receives a `cls`.
    return cls.opcode, cast(Handler, handler), layer, names


class Dispatcher:
    """Serves one FUSE session. See docs/ARCHITECTURE.md for the contract."""

    def __init__(
        self,
        fs: Filesystem,
        transport: str = "fuse",
        max_in_flight: int = 256,
        *,
        ops: Operations | None = None,
        ops_dax: DaxOperations | None = None,
    ):
        if transport not in ("fuse", "virtiofs"):
            raise ValueError(f"unknown transport {transport!r}: use 'fuse' or 'virtiofs'")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.fs = fs
        self.transport = transport
        if transport == "virtiofs":
            fs.host_callers = False  # guest pids name no host process (runtime/ops/creds.py)
        self.max_in_flight = max_in_flight
        # The op layer; tests may pass their own namespace, with only some of the
        # ops (the others get ENOSYS). One that cannot be imported provides none.
        if ops is None:
            ops = _load("actorfs.runtime.ops.ops") or _NO_OPS
        if ops_dax is None:
            ops_dax = _load("actorfs.runtime.dax.ops") or _NO_OPS
        self.ops: Operations = ops
        self.ops_dax: DaxOperations = ops_dax
        self.passthrough_reason = ""  # why passthrough is on or off (set at INIT)
        self.init: NegotiatedInit | None = None
        self.destroyed = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._tasks: dict[int, _Flight] = {}
        self._orphans: OrderedDict[int, None] = OrderedDict()
        self._setxattr_ext = False
        self._stats = Stats()
        self.protocol_errors = 0
        self.interrupts = 0
        self.send_errors = 0
        self._handlers = self._build_handlers()

    # -- the transport-facing API ---------------------------------------------

    async def submit(self, frame: bytes | bytearray | memoryview, send: Send) -> None:
        """Decode one frame and start it; waits while max_in_flight requests run."""
        t0 = perf_counter_ns()
        try:
            req = P.decode(frame, setxattr_ext=self._setxattr_ext)
        except P.ProtocolError as exc:
            self.protocol_errors += 1
            self._stats.record(STAT_INVALID, perf_counter_ns() - t0, True)
            log.debug("bad frame: %s", exc)
            if not exc.no_reply and exc.unique is not None:
                await self._send(send, P.reply_error(exc.unique, exc.errno))
            return
        opcode = req.opcode
        unique = req.h.unique
        # Handled inline, without a slot: an INTERRUPT must get through even
        # when every slot is held by the requests it is meant to interrupt.
        if isinstance(req, P.Interrupt):
            self._interrupt(req.unique)
            self._stats.record(opcode, perf_counter_ns() - t0, False)
            return
        if self.init is None or opcode == P.FUSE_INIT:
            if isinstance(req, P.Init) and self.init is None:
                try:
                    iov = self._negotiate(req)
                except Exception:  # a broken config must not kill the transport
                    log.exception("FUSE_INIT negotiation failed")
                    self.init = None
                    iov = P.reply_error(unique, errno.EIO)
            elif opcode in P.NO_REPLY_OPCODES:
                return
            else:  # before INIT (or a second INIT): the session is not usable
                iov = P.reply_error(unique, errno.EIO)
            self._stats.record(opcode, perf_counter_ns() - t0, iov is not None and _is_err(iov))
            await self._send(send, iov)
            return
        if opcode == P.FUSE_DESTROY:
            # After DESTROY the session wants a fresh INIT (a virtio-fs guest
            # may remount the same device).
            self.init = None
            self._setxattr_ext = False
            try:
                await self.fs.reset_session()
            except Exception:  # a stopping server: nothing left to reset
                log.debug("reset after DESTROY failed", exc_info=True)
            self.destroyed.set()
            self._stats.record(opcode, perf_counter_ns() - t0, False)
            await self._send(send, P.reply_empty(unique))
            return
        handler = self._handlers.get(opcode)
        if handler is None:
            if opcode in P.NO_REPLY_OPCODES:
                # NOTIFY_REPLY: we never send RETRIEVE, nothing to match. FORGET
                # without a forget op: nothing to do, and never a reply.
                self._stats.record(opcode, perf_counter_ns() - t0, False)
                return
            self._stats.record(opcode, perf_counter_ns() - t0, True)
            # IOCTL: ENOTTY is what isatty() and friends expect of a regular file.
            err = errno.ENOTTY if opcode == P.FUSE_IOCTL else errno.ENOSYS
            await self._send(send, P.reply_error(unique, err))
            return
        await self._slots.acquire()
        self._in_flight += 1
        self._idle.clear()
        flight = _Flight(opcode)
        orphan = bool(self._orphans) and unique in self._orphans
        if orphan:
            del self._orphans[unique]
        self._tasks[unique] = flight
        if orphan:
            self._interrupt_flight(unique, flight)
        # The request runs now, in this task, up to its first wait: most finish
        # there (runtime/core/eager.py), and only one that waits gets a task.
        try:
            task = eager.start(self._run(handler, req, send, t0, flight), asyncio.get_running_loop())
        except BaseException:
            self._finished(unique, flight)
            raise
        if task is None:
            self._finished(unique, flight)
            return
        flight.task = task
        # Bookkeeping in a done callback: it runs even for a task cancelled
        # before it resumes (shutdown), which never finishes _run's body.
        task.add_done_callback(lambda _t: self._finished(unique, flight))

    async def drain(self) -> None:
        """Wait until no request is in flight."""
        await self._idle.wait()

    async def cancel_all(self) -> None:
        """Abandon every request in flight (shutdown): they get no reply."""
        tasks = [f.task for f in self._tasks.values() if f.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        await self.drain()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def passthrough(self) -> bool:
        return self.init is not None and self.init.passthrough

    @property
    def writeback(self) -> bool:
        return self.init is not None and self.init.writeback

    def stats(self) -> DispatcherStats:
        snap = self._stats.snapshot(self._op_name)
        return DispatcherStats(
            **snap,
            in_flight=self._in_flight,
            max_in_flight=self.max_in_flight,
            protocol_errors=self.protocol_errors,
            interrupts=self.interrupts,
            send_errors=self.send_errors,
            init=None if self.init is None else InitStats(
                minor=self.init.minor,
                kernel_minor=self.init.kernel_minor,
                flags=self.init.flags,
                passthrough=self.init.passthrough,
                passthrough_reason=self.passthrough_reason,
                writeback=self.init.writeback,
                max_write=self.init.max_write,
            ),
        )  # fmt: skip

    # -- running one request -----------------------------------------------------

    async def _run(
        self, handler: Handler, req: P.Request, send: Send, t0: int, flight: _Flight
    ) -> None:
        unique = req.h.unique
        flight.started = True
        failed = True
        try:
            if flight.interrupted:  # interrupted before it ever ran
                raise asyncio.CancelledError
            try:
                iov = await handler(req)
            except OSError as exc:
                if exc.errno not in _OUT_OF_FDS or not await self._made_room(req.opcode):
                    raise
                iov = await handler(req)
            failed = False
        except asyncio.CancelledError:
            if not flight.interrupted:
                raise  # shutdown, not FUSE_INTERRUPT: no reply
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            iov = P.reply_error(unique, errno.EINTR)
        except Exception as exc:  # any op failure becomes -errno
            err = linux_errno_of(exc)
            if err == errno.EIO and not isinstance(exc, OSError | FsError):
                log.exception("op %s failed", self._op_name(req.opcode))
            iov = P.reply_error(unique, err)
        if req.opcode in P.NO_REPLY_OPCODES:
            iov = None  # FORGET and friends: never a reply, not even an error
        # Off the table before sending: a late INTERRUPT finds nothing to cancel.
        if self._tasks.get(unique) is flight:
            del self._tasks[unique]
        self._stats.record(req.opcode, perf_counter_ns() - t0, failed)
        if iov is not None:
            await self._send(send, iov)

    async def _made_room(self, opcode: int) -> bool:
        inodes = getattr(self.fs, "inodes", None)  # a test's stand-in may have none
        if opcode not in RETRY_AFTER_EVICTION or inodes is None or not hasattr(inodes, "make_room"):
            return False
        evicted: int = await inodes.make_room()
        return evicted > 0

    def _finished(self, unique: int, flight: _Flight) -> None:
        if self._tasks.get(unique) is flight:
            del self._tasks[unique]
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()
        self._slots.release()

    async def _send(self, send: Send, iov: P.Iov) -> None:
        try:
            r = send(iov)
            if r is not None and inspect.isawaitable(r):
                await r
        except Exception as exc:
            # ENOENT from /dev/fuse: the kernel already dropped the request.
            self.send_errors += 1
            log.debug("send failed: %r", exc)

    def _interrupt(self, target: int) -> None:
        self.interrupts += 1
        flight = self._tasks.get(target)
        if flight is None:
            # The target may still be on its way (read later, or waiting for a
            # slot); remember a bounded number of these.
            self._orphans[target] = None
            if len(self._orphans) > _ORPHAN_INTERRUPTS:
                self._orphans.popitem(last=False)
            return
        self._interrupt_flight(target, flight)

    def _interrupt_flight(self, target: int, flight: _Flight) -> None:
        if flight.opcode not in INTERRUPTIBLE or flight.interrupted:
            return
        # The kernel sends INTERRUPT whenever the waiting process gets a signal
        # (SIGCHLD, SIGALRM...). A request that is merely quick is left to
        # finish: a kernel filesystem's stat or read does not fail with EINTR
        # because a signal arrived. Only a request still running a grace period
        # after its INTERRUPT is really stuck, and that one is abandoned (EINTR).
        if not flight.signalled:
            flight.signalled = True
            asyncio.get_running_loop().call_later(
                INTERRUPT_GRACE, self._interrupt_late, target, flight
            )
            return
        flight.interrupted = True
        # A task that has not started yet sees the flag on entry; cancelling
        # it now would skip its body, and with it the EINTR reply.
        if flight.started and flight.task is not None:
            # Not at once: the task that finishes an eagerly started request
            # (runtime/core/eager.py) might not have taken its first step yet, and
            # cancelled then it would die before resuming the request: no reply
            # ever, and the caller stuck for good. Its first step is already
            # queued, so a callback queued now runs after it.
            asyncio.get_running_loop().call_soon(self._cancel_flight, target, flight)

    def _cancel_flight(self, target: int, flight: _Flight) -> None:
        if self._tasks.get(target) is flight and flight.task is not None and not flight.task.done():
            flight.task.cancel()

    def _interrupt_late(self, target: int, flight: _Flight) -> None:
        if self._tasks.get(target) is flight and flight.task is not None and not flight.task.done():
            self._interrupt_flight(target, flight)

    # -- INIT -----------------------------------------------------------------

    def _negotiate(self, r: P.Init) -> P.Iov:
        unique = r.h.unique
        if r.major > P.FUSE_KERNEL_VERSION:
            # Tell the kernel our major; it retries INIT with it (or gives up).
            return P.reply_init(
                unique, major=P.FUSE_KERNEL_VERSION, minor=P.FUSE_KERNEL_MINOR_VERSION
            )
        if r.major < P.FUSE_KERNEL_VERSION or r.minor < P.FUSE_MIN_MINOR_VERSION:
            log.error("kernel speaks FUSE %d.%d; need 7.%d or newer", r.major, r.minor,
                      P.FUSE_MIN_MINOR_VERSION)  # fmt: skip
            return P.reply_error(unique, errno.EPROTO)
        kflags = r.flags
        if r.flags & P.FUSE_INIT_EXT:
            kflags |= r.flags2 << 32
        config = self.fs.config
        want = BASE_INIT_FLAGS
        if getattr(config, "writeback", False):
            want |= P.FUSE_WRITEBACK_CACHE
        if getattr(config, "cache", None) == "never":
            # Files are opened FOPEN_DIRECT_IO: still allow shared mmap (sqlite WAL).
            want |= P.FUSE_DIRECT_IO_ALLOW_MMAP
        use_pt, self.passthrough_reason = passthrough_plan(
            config, self.transport, bool(kflags & P.FUSE_PASSTHROUGH)
        )
        if use_pt:
            want |= P.FUSE_PASSTHROUGH
        if self.transport == "virtiofs" and getattr(self.fs, "dax", None) is not None:
            want |= P.FUSE_MAP_ALIGNMENT
        if not hasattr(self.ops, "readdirplus"):
            want &= ~(P.FUSE_DO_READDIRPLUS | P.FUSE_READDIRPLUS_AUTO)
        if getattr(self.ops, "LOOKUP_DOT_DOTDOT", False):
            # NFS export / open_by_handle_at: the kernel looks up "." and "..".
            want |= P.FUSE_EXPORT_SUPPORT
        flags = want & kflags
        if flags & P.FUSE_PASSTHROUGH and flags & P.FUSE_WRITEBACK_CACHE:
            # The kernel turns passthrough off under writeback caching.
            log.warning("passthrough and writeback cache exclude each other: using passthrough")
            flags &= ~P.FUSE_WRITEBACK_CACHE
        if kflags & P.FUSE_INIT_EXT:
            flags |= P.FUSE_INIT_EXT  # so the kernel reads our flags2
        max_stack_depth = 0
        if flags & P.FUSE_PASSTHROUGH:
            max_stack_depth = getattr(config, "max_stack_depth", None) or (
                root_stack_depth(self.fs.root_path) + 1
            )
            max_stack_depth = max(1, min(int(max_stack_depth), P.FILESYSTEM_MAX_STACK_DEPTH))
        ours = P.FUSE_PASSTHROUGH_MINOR_VERSION if flags & P.FUSE_PASSTHROUGH else (
            P.FUSE_KERNEL_MINOR_VERSION
        )  # fmt: skip
        map_alignment = 0
        if flags & P.FUSE_MAP_ALIGNMENT:
            map_alignment = int(getattr(self.fs.dax, "map_alignment", 0)) or (
                PAGE_SIZE.bit_length() - 1
            )
        max_background = min(max(1, self.max_in_flight // 2), 0xFFFF)
        self.init = NegotiatedInit(
            major=P.FUSE_KERNEL_VERSION,
            minor=min(r.minor, ours),
            kernel_minor=r.minor,
            kernel_flags=kflags,
            flags=flags,
            max_readahead=r.max_readahead,
            max_write=MAX_WRITE,
            max_pages=MAX_PAGES if flags & P.FUSE_MAX_PAGES else 0,
            max_background=max_background,
            congestion_threshold=max(1, max_background * 3 // 4),
            time_gran=1,
            map_alignment=map_alignment,
            max_stack_depth=max_stack_depth,
        )
        self._setxattr_ext = self.init.setxattr_ext
        self.destroyed.clear()
        i = self.init
        log.info("FUSE %d.%d negotiated (kernel 7.%d), flags %#x, passthrough %s", i.major,
                 i.minor, i.kernel_minor, i.flags, self.passthrough_reason)  # fmt: skip
        return P.reply_init(
            unique,
            major=i.major,
            minor=i.minor,
            max_readahead=i.max_readahead,
            flags=i.flags & 0xFFFFFFFF,
            flags2=i.flags >> 32,
            max_background=i.max_background,
            congestion_threshold=i.congestion_threshold,
            max_write=i.max_write,
            time_gran=i.time_gran,
            max_pages=i.max_pages,
            map_alignment=i.map_alignment,
            max_stack_depth=i.max_stack_depth,
        )

    # -- op handlers: request message -> reply buffers -----------------------------

    def _build_handlers(self) -> dict[int, Handler]:
        """opcode -> handler, for the ops the op layer actually provides."""
        table = [
            _entry(P.Lookup, self._lookup, self.ops, "lookup"),
            _entry(P.Forget, self._forget, self.ops, "forget"),
            _entry(P.BatchForget, self._batch_forget, self.ops, "batch_forget"),
            _entry(P.Getattr, self._getattr, self.ops, "getattr"),
            _entry(P.Setattr, self._setattr, self.ops, "setattr"),
            _entry(P.Readlink, self._readlink, self.ops, "readlink"),
            _entry(P.Symlink, self._symlink, self.ops, "symlink"),
            _entry(P.Mknod, self._mknod, self.ops, "mknod"),
            _entry(P.Mkdir, self._mkdir, self.ops, "mkdir"),
            _entry(P.Unlink, self._unlink, self.ops, "unlink"),
            _entry(P.Rmdir, self._rmdir, self.ops, "rmdir"),
            _entry(P.Rename, self._rename, self.ops, "rename"),
            _entry(P.Rename2, self._rename, self.ops, "rename"),
            _entry(P.Link, self._link, self.ops, "link"),
            _entry(P.Open, self._open, self.ops, "open"),
            _entry(P.Read, self._read, self.ops, "read"),
            _entry(P.Write, self._write, self.ops, "write"),
            _entry(P.Statfs, self._statfs, self.ops, "statfs"),
            _entry(P.Release, self._release, self.ops, "release"),
            _entry(P.Fsync, self._fsync, self.ops, "fsync"),
            _entry(P.Setxattr, self._setxattr, self.ops, "setxattr"),
            _entry(P.Getxattr, self._getxattr, self.ops, "getxattr"),
            _entry(P.Listxattr, self._listxattr, self.ops, "listxattr"),
            _entry(P.Removexattr, self._removexattr, self.ops, "removexattr"),
            _entry(P.Flush, self._flush, self.ops, "flush"),
            _entry(P.Opendir, self._opendir, self.ops, "opendir"),
            _entry(P.Readdir, self._readdir, self.ops, "readdir"),
            _entry(P.Readdirplus, self._readdirplus, self.ops, "readdirplus", "forget"),
            _entry(P.Releasedir, self._releasedir, self.ops, "releasedir"),
            _entry(P.Fsyncdir, self._fsyncdir, self.ops, "fsyncdir"),
            _entry(P.Access, self._access, self.ops, "access"),
            _entry(P.Create, self._create, self.ops, "create"),
            _entry(P.Fallocate, self._fallocate, self.ops, "fallocate"),
            _entry(P.Lseek, self._lseek, self.ops, "lseek"),
            _entry(P.CopyFileRange, self._copy_file_range, self.ops, "copy_file_range"),
            _entry(P.Setupmapping, self._setupmapping, self.ops_dax, "setupmapping"),
            _entry(P.Removemapping, self._removemapping, self.ops_dax, "removemapping"),
        ]
        handlers = {}
        for opcode, handler, layer, names in table:
            if opcode in ENOSYS_OPCODES:
                continue
            if all(callable(getattr(layer, n, None)) for n in names):
                handlers[opcode] = handler
        return handlers

    @staticmethod
    def _ctx(r: P.Request) -> RequestContext:
        h = r.h
        return RequestContext(h.uid, h.gid, h.pid)

    @staticmethod
    def _op_name(opcode: int) -> str:
        if opcode == STAT_INVALID:
            return "INVALID"
        return P.OPCODE_NAMES.get(opcode, str(opcode)).removeprefix("FUSE_")

    def _opened(self, opened: Opened) -> Opened:
        # Never hand the kernel a passthrough open it did not agree to.
        if opened.open_flags & P.FOPEN_PASSTHROUGH and not self.passthrough:
            return dataclasses.replace(
                opened, open_flags=opened.open_flags & ~P.FOPEN_PASSTHROUGH, backing_id=0
            )
        return opened

    async def _lookup(self, r: P.Lookup) -> P.Iov:
        # A miss may be a NegativeEntry (the op layer decides when: ops.lookup).
        e = await self.ops.lookup(self.fs, self._ctx(r), r.h.nodeid, r.name)
        return P.reply_entry(r.h.unique, e)

    async def _forget(self, r: P.Forget) -> None:
        await self.ops.forget(self.fs, r.h.nodeid, r.nlookup)

    async def _batch_forget(self, r: P.BatchForget) -> None:
        await self.ops.batch_forget(self.fs, r.forgets)

    async def _getattr(self, r: P.Getattr) -> P.Iov:
        fh = r.fh if r.getattr_flags & P.FUSE_GETATTR_FH else None
        attr = await self.ops.getattr(self.fs, self._ctx(r), r.h.nodeid, fh)
        return P.reply_attr(r.h.unique, attr, self.fs.config.attr_timeout)

    async def _setattr(self, r: P.Setattr) -> P.Iov:
        # What may change, not the wire struct (lock_owner, ctime are not ours).
        s = SetattrArgs(
            r.valid, fh=r.fh, size=r.size, mode=r.mode, uid=r.uid, gid=r.gid, atime=r.atime,
            atimensec=r.atimensec, mtime=r.mtime, mtimensec=r.mtimensec,
        )  # fmt: skip
        attr = await self.ops.setattr(self.fs, self._ctx(r), r.h.nodeid, s)
        return P.reply_attr(r.h.unique, attr, self.fs.config.attr_timeout)

    async def _readlink(self, r: P.Readlink) -> P.Iov:
        return P.reply_data(r.h.unique, await self.ops.readlink(self.fs, self._ctx(r), r.h.nodeid))

    async def _symlink(self, r: P.Symlink) -> P.Iov:
        e = await self.ops.symlink(self.fs, self._ctx(r), r.h.nodeid, r.name, r.target)
        return P.reply_entry(r.h.unique, e)

    async def _mknod(self, r: P.Mknod) -> P.Iov:
        e = await self.ops.mknod(self.fs, self._ctx(r), r.h.nodeid, r.name, r.mode, r.rdev, r.umask)
        return P.reply_entry(r.h.unique, e)

    async def _mkdir(self, r: P.Mkdir) -> P.Iov:
        e = await self.ops.mkdir(self.fs, self._ctx(r), r.h.nodeid, r.name, r.mode, r.umask)
        return P.reply_entry(r.h.unique, e)

    async def _unlink(self, r: P.Unlink) -> P.Iov:
        await self.ops.unlink(self.fs, self._ctx(r), r.h.nodeid, r.name)
        return P.reply_empty(r.h.unique)

    async def _rmdir(self, r: P.Rmdir) -> P.Iov:
        await self.ops.rmdir(self.fs, self._ctx(r), r.h.nodeid, r.name)
        return P.reply_empty(r.h.unique)

    async def _rename(self, r: P.Rename | P.Rename2) -> P.Iov:
        flags = r.flags if isinstance(r, P.Rename2) else 0  # RENAME2 only
        await self.ops.rename(self.fs, self._ctx(r), r.h.nodeid, r.name, r.newdir, r.newname, flags)
        return P.reply_empty(r.h.unique)

    async def _link(self, r: P.Link) -> P.Iov:
        e = await self.ops.link(self.fs, self._ctx(r), r.oldnodeid, r.h.nodeid, r.name)
        return P.reply_entry(r.h.unique, e)

    async def _open(self, r: P.Open) -> P.Iov:
        # open_flags only when set: FUSE_OPEN_KILL_SUIDGID (HANDLE_KILLPRIV_V2).
        kw = {"open_flags": r.open_flags} if r.open_flags else {}
        opened = await self.ops.open(self.fs, self._ctx(r), r.h.nodeid, r.flags, **kw)
        return P.reply_open(r.h.unique, self._opened(opened))

    async def _read(self, r: P.Read) -> P.Iov:
        data: P.Buffer = await self.ops.read(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.size
        )
        if len(data) > r.size:  # the kernel rejects a reply longer than asked
            data = memoryview(data)[: r.size]
        return P.reply_data(r.h.unique, data)

    async def _write(self, r: P.Write) -> P.Iov:
        n = await self.ops.write(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.data, r.write_flags
        )
        return P.reply_write(r.h.unique, n)

    async def _statfs(self, r: P.Statfs) -> P.Iov:
        return P.reply_statfs(r.h.unique, await self.ops.statfs(self.fs, self._ctx(r), r.h.nodeid))

    async def _release(self, r: P.Release) -> P.Iov:
        await self.ops.release(self.fs, self._ctx(r), r.h.nodeid, r.fh, r.flags)
        return P.reply_empty(r.h.unique)

    async def _fsync(self, r: P.Fsync) -> P.Iov:
        datasync = bool(r.fsync_flags & P.FUSE_FSYNC_FDATASYNC)
        await self.ops.fsync(self.fs, self._ctx(r), r.h.nodeid, r.fh, datasync)
        return P.reply_empty(r.h.unique)

    async def _setxattr(self, r: P.Setxattr) -> P.Iov:
        await self.ops.setxattr(self.fs, self._ctx(r), r.h.nodeid, r.name, bytes(r.value), r.flags)
        return P.reply_empty(r.h.unique)

    def _xattr_reply(self, r: P.Getxattr | P.Listxattr, res: XattrReply) -> P.Iov:
        # The size rule (size 0 probes, ERANGE) is the op layer's: see ops._sized.
        if res.value is None:
            return P.reply_xattr_size(r.h.unique, res.size)
        return P.reply_data(r.h.unique, res.value)

    async def _getxattr(self, r: P.Getxattr) -> P.Iov:
        res = await self.ops.getxattr(self.fs, self._ctx(r), r.h.nodeid, r.name, r.size)
        return self._xattr_reply(r, res)

    async def _listxattr(self, r: P.Listxattr) -> P.Iov:
        res = await self.ops.listxattr(self.fs, self._ctx(r), r.h.nodeid, r.size)
        return self._xattr_reply(r, res)

    async def _removexattr(self, r: P.Removexattr) -> P.Iov:
        await self.ops.removexattr(self.fs, self._ctx(r), r.h.nodeid, r.name)
        return P.reply_empty(r.h.unique)

    async def _flush(self, r: P.Flush) -> P.Iov:
        await self.ops.flush(self.fs, self._ctx(r), r.h.nodeid, r.fh)
        return P.reply_empty(r.h.unique)

    async def _opendir(self, r: P.Opendir) -> P.Iov:
        opened = await self.ops.opendir(self.fs, self._ctx(r), r.h.nodeid, r.flags)
        return P.reply_open(r.h.unique, self._opened(opened))

    # The op layer fills exactly one reply buffer of r.size bytes (and counts a
    # lookup only for a READDIRPLUS entry it returns): the policy lives there.
    async def _readdir(self, r: P.Readdir) -> P.Iov:
        entries = await self.ops.readdir(self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.size)
        return P.reply_readdir(r.h.unique, entries)

    async def _readdirplus(self, r: P.Readdirplus) -> P.Iov:
        entries = await self.ops.readdirplus(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.size
        )
        return P.reply_readdirplus(r.h.unique, entries)

    async def _releasedir(self, r: P.Releasedir) -> P.Iov:
        await self.ops.releasedir(self.fs, self._ctx(r), r.h.nodeid, r.fh)
        return P.reply_empty(r.h.unique)

    async def _fsyncdir(self, r: P.Fsyncdir) -> P.Iov:
        datasync = bool(r.fsync_flags & P.FUSE_FSYNC_FDATASYNC)
        await self.ops.fsyncdir(self.fs, self._ctx(r), r.h.nodeid, r.fh, datasync)
        return P.reply_empty(r.h.unique)

    async def _access(self, r: P.Access) -> P.Iov:
        await self.ops.access(self.fs, self._ctx(r), r.h.nodeid, r.mask)
        return P.reply_empty(r.h.unique)

    async def _create(self, r: P.Create) -> P.Iov:
        kw = {"open_flags": r.open_flags} if r.open_flags else {}
        entry, opened = await self.ops.create(
            self.fs, self._ctx(r), r.h.nodeid, r.name, r.mode, r.flags, r.umask, **kw
        )
        return P.reply_create(r.h.unique, entry, self._opened(opened))

    async def _fallocate(self, r: P.Fallocate) -> P.Iov:
        await self.ops.fallocate(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.length, r.mode
        )
        return P.reply_empty(r.h.unique)

    async def _lseek(self, r: P.Lseek) -> P.Iov:
        off = await self.ops.lseek(self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.whence)
        return P.reply_lseek(r.h.unique, off)

    async def _copy_file_range(self, r: P.CopyFileRange) -> P.Iov:
        n = await self.ops.copy_file_range(
            self.fs, self._ctx(r), r.h.nodeid, r.fh_in, r.off_in, r.nodeid_out, r.fh_out,
            r.off_out, r.len, r.flags,
        )  # fmt: skip
        # fuse_write_out.size is 32 bits; the kernel asks again for the rest.
        return P.reply_write(r.h.unique, min(n, 0xFFFFFFFF))

    async def _setupmapping(self, r: P.Setupmapping) -> P.Iov:
        if getattr(self.fs, "dax", None) is None:
            raise FsError(errno.ENOSYS)
        await self.ops_dax.setupmapping(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.foffset, r.len, r.flags, r.moffset
        )
        return P.reply_empty(r.h.unique)

    async def _removemapping(self, r: P.Removemapping) -> P.Iov:
        if getattr(self.fs, "dax", None) is None:
            raise FsError(errno.ENOSYS)
        await self.ops_dax.removemapping(self.fs, self._ctx(r), r.mappings)
        return P.reply_empty(r.h.unique)


def _is_err(iov: P.Iov) -> bool:
    return P.parse_out_header(iov[0])[1] != 0
