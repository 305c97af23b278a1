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
from typing import Any

from actorfs.runtime.core import eager
from actorfs.runtime.core.abi import MAX_TRANSFER
from actorfs.runtime.core.attrs import Attr, Entry, RequestContext, XattrReply
from actorfs.runtime.core.errno_map import FsError, linux_errno_of
from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.fuse.stats import Stats
from actorfs.runtime.host import backing_fs
from actorfs.runtime.ops.filesystem import passthrough_plan

log = logging.getLogger("actorfs.dispatcher")

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)

Send = Callable[[list], Awaitable[None] | None]

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

_NO_ATTR = Attr(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)

# Pseudo-opcodes for stats of frames that never reached an op.
STAT_INVALID = -1

_ORPHAN_INTERRUPTS = 256  # interrupts whose target has not arrived yet (bounded)


class _Flight:
    """One request in flight: its task and whether an INTERRUPT hit it."""

    __slots__ = ("opcode", "task", "started", "interrupted", "signalled")

    def __init__(self, opcode: int):
        self.opcode = opcode
        self.task: asyncio.Task | None = None
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


def root_stack_depth(root: str) -> int:
    """s_stack_depth of the filesystem holding `root` (0, or 1 on overlayfs)."""
    return backing_fs.stack_depth(root)


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name != name:  # the module exists but is broken: say so
            log.error("cannot import %s: %s", name, exc)
        return None


class Dispatcher:
    """Serves one FUSE session. See docs/ARCHITECTURE.md for the contract."""

    def __init__(
        self,
        fs: Any,
        transport: str = "fuse",
        max_in_flight: int = 256,
        *,
        ops: Any = None,
        ops_dax: Any = None,
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
        # The op layer; tests may pass their own namespace.
        self.ops = ops if ops is not None else _load("actorfs.runtime.ops.ops")
        self.ops_dax = ops_dax if ops_dax is not None else _load("actorfs.runtime.dax.ops")
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
            if not exc.no_reply:
                await self._send(send, P.reply_error(exc.unique, exc.errno))
            return
        opcode = req.opcode
        unique = req.h.unique
        # Handled inline, without a slot: an INTERRUPT must get through even
        # when every slot is held by the requests it is meant to interrupt.
        if opcode == P.FUSE_INTERRUPT:
            self._interrupt(req.unique)
            self._stats.record(opcode, perf_counter_ns() - t0, False)
            return
        if self.init is None or opcode == P.FUSE_INIT:
            if opcode == P.FUSE_INIT and self.init is None:
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

    def stats(self) -> dict:
        snap = self._stats.snapshot(self._op_name)
        snap.update(
            in_flight=self._in_flight,
            max_in_flight=self.max_in_flight,
            protocol_errors=self.protocol_errors,
            interrupts=self.interrupts,
            send_errors=self.send_errors,
            init=None if self.init is None else {
                "minor": self.init.minor,
                "kernel_minor": self.init.kernel_minor,
                "flags": self.init.flags,
                "passthrough": self.init.passthrough,
                "passthrough_reason": self.passthrough_reason,
                "writeback": self.init.writeback,
                "max_write": self.init.max_write,
            },
        )  # fmt: skip
        return snap

    # -- running one request -----------------------------------------------------

    async def _run(
        self, handler: Callable, req: P.Request, send: Send, t0: int, flight: _Flight
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
        inodes = getattr(self.fs, "inodes", None)
        if opcode not in RETRY_AFTER_EVICTION or not hasattr(inodes, "make_room"):
            return False
        return await inodes.make_room() > 0

    def _finished(self, unique: int, flight: _Flight) -> None:
        if self._tasks.get(unique) is flight:
            del self._tasks[unique]
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()
        self._slots.release()

    async def _send(self, send: Send, iov: list) -> None:
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

    def _negotiate(self, r: P.Request) -> list:
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
        if self.ops is None or not hasattr(self.ops, "readdirplus"):
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

    def _build_handlers(self) -> dict[int, Callable]:
        """opcode -> handler, for the ops the op layer actually provides."""
        table: dict[int, tuple[Callable, Any, tuple[str, ...]]] = {
            P.FUSE_LOOKUP: (self._lookup, self.ops, ("lookup",)),
            P.FUSE_FORGET: (self._forget, self.ops, ("forget",)),
            P.FUSE_BATCH_FORGET: (self._batch_forget, self.ops, ("batch_forget",)),
            P.FUSE_GETATTR: (self._getattr, self.ops, ("getattr",)),
            P.FUSE_SETATTR: (self._setattr, self.ops, ("setattr",)),
            P.FUSE_READLINK: (self._readlink, self.ops, ("readlink",)),
            P.FUSE_SYMLINK: (self._symlink, self.ops, ("symlink",)),
            P.FUSE_MKNOD: (self._mknod, self.ops, ("mknod",)),
            P.FUSE_MKDIR: (self._mkdir, self.ops, ("mkdir",)),
            P.FUSE_UNLINK: (self._unlink, self.ops, ("unlink",)),
            P.FUSE_RMDIR: (self._rmdir, self.ops, ("rmdir",)),
            P.FUSE_RENAME: (self._rename, self.ops, ("rename",)),
            P.FUSE_RENAME2: (self._rename, self.ops, ("rename",)),
            P.FUSE_LINK: (self._link, self.ops, ("link",)),
            P.FUSE_OPEN: (self._open, self.ops, ("open",)),
            P.FUSE_READ: (self._read, self.ops, ("read",)),
            P.FUSE_WRITE: (self._write, self.ops, ("write",)),
            P.FUSE_STATFS: (self._statfs, self.ops, ("statfs",)),
            P.FUSE_RELEASE: (self._release, self.ops, ("release",)),
            P.FUSE_FSYNC: (self._fsync, self.ops, ("fsync",)),
            P.FUSE_SETXATTR: (self._setxattr, self.ops, ("setxattr",)),
            P.FUSE_GETXATTR: (self._getxattr, self.ops, ("getxattr",)),
            P.FUSE_LISTXATTR: (self._listxattr, self.ops, ("listxattr",)),
            P.FUSE_REMOVEXATTR: (self._removexattr, self.ops, ("removexattr",)),
            P.FUSE_FLUSH: (self._flush, self.ops, ("flush",)),
            P.FUSE_OPENDIR: (self._opendir, self.ops, ("opendir",)),
            P.FUSE_READDIR: (self._readdir, self.ops, ("readdir",)),
            P.FUSE_READDIRPLUS: (self._readdirplus, self.ops, ("readdirplus", "forget")),
            P.FUSE_RELEASEDIR: (self._releasedir, self.ops, ("releasedir",)),
            P.FUSE_FSYNCDIR: (self._fsyncdir, self.ops, ("fsyncdir",)),
            P.FUSE_ACCESS: (self._access, self.ops, ("access",)),
            P.FUSE_CREATE: (self._create, self.ops, ("create",)),
            P.FUSE_FALLOCATE: (self._fallocate, self.ops, ("fallocate",)),
            P.FUSE_LSEEK: (self._lseek, self.ops, ("lseek",)),
            P.FUSE_COPY_FILE_RANGE: (self._copy_file_range, self.ops, ("copy_file_range",)),
            P.FUSE_SETUPMAPPING: (self._setupmapping, self.ops_dax, ("setupmapping",)),
            P.FUSE_REMOVEMAPPING: (self._removemapping, self.ops_dax, ("removemapping",)),
        }
        handlers = {}
        for opcode, (handler, module, names) in table.items():
            if opcode in ENOSYS_OPCODES:
                continue
            if module is not None and all(callable(getattr(module, n, None)) for n in names):
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

    def _opened(self, opened: Any) -> Any:
        # Never hand the kernel a passthrough open it did not agree to.
        if opened.open_flags & P.FOPEN_PASSTHROUGH and not self.passthrough:
            return dataclasses.replace(
                opened, open_flags=opened.open_flags & ~P.FOPEN_PASSTHROUGH, backing_id=0
            )
        return opened

    async def _lookup(self, r: Any) -> list:
        try:
            e = await self.ops.lookup(self.fs, self._ctx(r), r.h.nodeid, r.name)
        except (FsError, OSError) as exc:
            timeout = self.fs.config.entry_timeout
            if timeout <= 0 or linux_errno_of(exc) != errno.ENOENT:
                raise
            # A negative entry (nodeid 0): the kernel caches "no such name" for
            # the entry timeout instead of asking again on every miss (PATH
            # searches, build tools probing). The watcher invalidates it when the
            # name appears on the host.
            e = Entry(0, 0, _NO_ATTR, timeout, 0.0)
        return P.reply_entry(r.h.unique, e)

    async def _forget(self, r: Any) -> None:
        await self.ops.forget(self.fs, r.h.nodeid, r.nlookup)

    async def _batch_forget(self, r: Any) -> None:
        await self.ops.batch_forget(self.fs, r.forgets)

    async def _getattr(self, r: Any) -> list:
        fh = r.fh if r.getattr_flags & P.FUSE_GETATTR_FH else None
        attr = await self.ops.getattr(self.fs, self._ctx(r), r.h.nodeid, fh)
        return P.reply_attr(r.h.unique, attr, self.fs.config.attr_timeout)

    async def _setattr(self, r: Any) -> list:
        attr = await self.ops.setattr(self.fs, self._ctx(r), r.h.nodeid, r)
        return P.reply_attr(r.h.unique, attr, self.fs.config.attr_timeout)

    async def _readlink(self, r: Any) -> list:
        return P.reply_data(r.h.unique, await self.ops.readlink(self.fs, self._ctx(r), r.h.nodeid))

    async def _symlink(self, r: Any) -> list:
        e = await self.ops.symlink(self.fs, self._ctx(r), r.h.nodeid, r.name, r.target)
        return P.reply_entry(r.h.unique, e)

    async def _mknod(self, r: Any) -> list:
        e = await self.ops.mknod(self.fs, self._ctx(r), r.h.nodeid, r.name, r.mode, r.rdev, r.umask)
        return P.reply_entry(r.h.unique, e)

    async def _mkdir(self, r: Any) -> list:
        e = await self.ops.mkdir(self.fs, self._ctx(r), r.h.nodeid, r.name, r.mode, r.umask)
        return P.reply_entry(r.h.unique, e)

    async def _unlink(self, r: Any) -> list:
        await self.ops.unlink(self.fs, self._ctx(r), r.h.nodeid, r.name)
        return P.reply_empty(r.h.unique)

    async def _rmdir(self, r: Any) -> list:
        await self.ops.rmdir(self.fs, self._ctx(r), r.h.nodeid, r.name)
        return P.reply_empty(r.h.unique)

    async def _rename(self, r: Any) -> list:
        flags = getattr(r, "flags", 0)  # RENAME2 only
        await self.ops.rename(self.fs, self._ctx(r), r.h.nodeid, r.name, r.newdir, r.newname, flags)
        return P.reply_empty(r.h.unique)

    async def _link(self, r: Any) -> list:
        e = await self.ops.link(self.fs, self._ctx(r), r.oldnodeid, r.h.nodeid, r.name)
        return P.reply_entry(r.h.unique, e)

    async def _open(self, r: Any) -> list:
        # open_flags only when set: FUSE_OPEN_KILL_SUIDGID (HANDLE_KILLPRIV_V2).
        kw = {"open_flags": r.open_flags} if r.open_flags else {}
        opened = await self.ops.open(self.fs, self._ctx(r), r.h.nodeid, r.flags, **kw)
        return P.reply_open(r.h.unique, self._opened(opened))

    async def _read(self, r: Any) -> list:
        data = await self.ops.read(self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.size)
        if len(data) > r.size:  # the kernel rejects a reply longer than asked
            data = memoryview(data)[: r.size]
        return P.reply_data(r.h.unique, data)

    async def _write(self, r: Any) -> list:
        n = await self.ops.write(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.data, r.write_flags
        )
        return P.reply_write(r.h.unique, n)

    async def _statfs(self, r: Any) -> list:
        return P.reply_statfs(r.h.unique, await self.ops.statfs(self.fs, self._ctx(r), r.h.nodeid))

    async def _release(self, r: Any) -> list:
        await self.ops.release(self.fs, self._ctx(r), r.h.nodeid, r.fh, r.flags)
        return P.reply_empty(r.h.unique)

    async def _fsync(self, r: Any) -> list:
        datasync = bool(r.fsync_flags & P.FUSE_FSYNC_FDATASYNC)
        await self.ops.fsync(self.fs, self._ctx(r), r.h.nodeid, r.fh, datasync)
        return P.reply_empty(r.h.unique)

    async def _setxattr(self, r: Any) -> list:
        await self.ops.setxattr(self.fs, self._ctx(r), r.h.nodeid, r.name, bytes(r.value), r.flags)
        return P.reply_empty(r.h.unique)

    def _xattr_reply(self, r: Any, res: XattrReply) -> list:
        # The size rule (size 0 probes, ERANGE) is the op layer's: see ops._sized.
        if res.value is None:
            return P.reply_xattr_size(r.h.unique, res.size)
        return P.reply_data(r.h.unique, res.value)

    async def _getxattr(self, r: Any) -> list:
        res = await self.ops.getxattr(self.fs, self._ctx(r), r.h.nodeid, r.name, r.size)
        return self._xattr_reply(r, res)

    async def _listxattr(self, r: Any) -> list:
        res = await self.ops.listxattr(self.fs, self._ctx(r), r.h.nodeid, r.size)
        return self._xattr_reply(r, res)

    async def _removexattr(self, r: Any) -> list:
        await self.ops.removexattr(self.fs, self._ctx(r), r.h.nodeid, r.name)
        return P.reply_empty(r.h.unique)

    async def _flush(self, r: Any) -> list:
        await self.ops.flush(self.fs, self._ctx(r), r.h.nodeid, r.fh)
        return P.reply_empty(r.h.unique)

    async def _opendir(self, r: Any) -> list:
        opened = await self.ops.opendir(self.fs, self._ctx(r), r.h.nodeid, r.flags)
        return P.reply_open(r.h.unique, self._opened(opened))

    # The op layer fills exactly one reply buffer of r.size bytes (and counts a
    # lookup only for a READDIRPLUS entry it returns): the policy lives there.
    async def _readdir(self, r: Any) -> list:
        entries = await self.ops.readdir(self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.size)
        return P.reply_readdir(r.h.unique, entries)

    async def _readdirplus(self, r: Any) -> list:
        entries = await self.ops.readdirplus(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.size
        )
        return P.reply_readdirplus(r.h.unique, entries)

    async def _releasedir(self, r: Any) -> list:
        await self.ops.releasedir(self.fs, self._ctx(r), r.h.nodeid, r.fh)
        return P.reply_empty(r.h.unique)

    async def _fsyncdir(self, r: Any) -> list:
        datasync = bool(r.fsync_flags & P.FUSE_FSYNC_FDATASYNC)
        await self.ops.fsyncdir(self.fs, self._ctx(r), r.h.nodeid, r.fh, datasync)
        return P.reply_empty(r.h.unique)

    async def _access(self, r: Any) -> list:
        await self.ops.access(self.fs, self._ctx(r), r.h.nodeid, r.mask)
        return P.reply_empty(r.h.unique)

    async def _create(self, r: Any) -> list:
        kw = {"open_flags": r.open_flags} if r.open_flags else {}
        entry, opened = await self.ops.create(
            self.fs, self._ctx(r), r.h.nodeid, r.name, r.mode, r.flags, r.umask, **kw
        )
        return P.reply_create(r.h.unique, entry, self._opened(opened))

    async def _fallocate(self, r: Any) -> list:
        await self.ops.fallocate(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.length, r.mode
        )
        return P.reply_empty(r.h.unique)

    async def _lseek(self, r: Any) -> list:
        off = await self.ops.lseek(self.fs, self._ctx(r), r.h.nodeid, r.fh, r.offset, r.whence)
        return P.reply_lseek(r.h.unique, off)

    async def _copy_file_range(self, r: Any) -> list:
        n = await self.ops.copy_file_range(
            self.fs, self._ctx(r), r.h.nodeid, r.fh_in, r.off_in, r.nodeid_out, r.fh_out,
            r.off_out, r.len, r.flags,
        )  # fmt: skip
        # fuse_write_out.size is 32 bits; the kernel asks again for the rest.
        return P.reply_write(r.h.unique, min(n, 0xFFFFFFFF))

    async def _setupmapping(self, r: Any) -> list:
        if getattr(self.fs, "dax", None) is None:
            raise FsError(errno.ENOSYS)
        await self.ops_dax.setupmapping(
            self.fs, self._ctx(r), r.h.nodeid, r.fh, r.foffset, r.len, r.flags, r.moffset
        )
        return P.reply_empty(r.h.unique)

    async def _removemapping(self, r: Any) -> list:
        if getattr(self.fs, "dax", None) is None:
            raise FsError(errno.ENOSYS)
        await self.ops_dax.removemapping(self.fs, self._ctx(r), r.mappings)
        return P.reply_empty(r.h.unique)


def _is_err(iov: list) -> bool:
    return P.parse_out_header(iov[0])[1] != 0
