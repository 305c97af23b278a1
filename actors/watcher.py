"""The watcher actor: host-side changes -> FUSE invalidation notices.

A client that caches entries, attributes and pages for a long time (`--cache
always`) must learn when something on the host changes a file it has seen.
The op layer asks the watcher to watch each directory the client looks up and
each file it opens or maps; the watcher turns inotify events into notices:

- content change of a watched inode (IN_MODIFY, IN_CLOSE_WRITE, also seen as a
  named child event in a watched directory): INVAL_INODE(nodeid, 0, 0), which
  drops the attributes and every cached page;
- attribute change (IN_ATTRIB): INVAL_INODE(nodeid, -1, 0), attributes only
  (a negative offset leaves the pages alone);
- a name created, deleted or moved in a watched directory: the directory's own
  attributes and readdir cache, and INVAL_ENTRY(parent, name) unless the name
  still leads to the inode the client knows there (the echo of the client's own
  create, mkdir or rename); DELETE(parent, child, name) instead when that inode
  has no link left (falling back to INVAL_ENTRY when the kernel refuses it).

INVAL_ENTRY is never sent for a plain attribute or content change: it makes the
kernel drop the dentry, and a mount stacked on that dentry would then be
bypassed by the next lookup (the reference backend learned this the hard way,
from atime updates under a stacked node_modules mount).

Watches follow the inode, not a path: the op layer hands over a dup'ed O_PATH
fd, the watch is added on /proc/self/fd/N and the fd closed. A watch lives until
the server forgets the inode (unwatch), or the kernel drops it (the inode was
deleted: IN_DELETE_SELF / IN_IGNORED). A watched inode renamed on the host is
still the client's nodeid, so its watch stays: the name it had is invalidated.

Events are collected for a short window and deduplicated per notice, so a burst
(one editor save, a build writing a file) costs a few notices. Notices are sent
by the watcher's own sender task, never from a request; a synchronous notifier
is called in the watcher's own thread, because a /dev/fuse notify write can wait
in the kernel on a page or directory lock held by a request whose reply the
event loop still has to write.

State (the watch maps and the pending batch) is owned by the mailbox task;
inotify readiness only posts a message to it. The sender task takes a finished
batch through the mailbox and owns nothing else but its delivery counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from actorfs.actors.inode_table import KIND_DIR
from actorfs.runtime.core.abi import FUSE_ROOT_ID
from actorfs.runtime.core.actor import Actor
from actorfs.runtime.core.errno_map import FsError
from actorfs.runtime.core.shield import shielded
from actorfs.runtime.host import inotify

if TYPE_CHECKING:
    from actorfs.actors.inode_table import InodeTable
    from actorfs.runtime.core.blocking_pool import BlockingPool

log = logging.getLogger("actorfs.watcher")

DEFAULT_WINDOW = 0.015  # seconds of events merged into one batch of notices
DEFAULT_MAX_WATCHES = 1 << 16

_CONTENT = inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE
_NAMES = inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO
_SELF_GONE = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF
FILE_MASK = _CONTENT | inotify.IN_ATTRIB | _SELF_GONE
# A directory watch also reports its children's content and attribute changes
# (by name), which covers files the client has looked up but not opened.
# EXCL_UNLINK: no events from children after they were unlinked.
DIR_MASK = FILE_MASK | _NAMES | inotify.IN_ONLYDIR | inotify.IN_EXCL_UNLINK

ENTRY_CHECKS_IN_FLIGHT = 32  # pool jobs comparing a name with the client's inode

NOTICE_KINDS = ("inval_inode", "inval_entry", "delete")


@dataclass(slots=True)
class Watched:
    nodeid: int
    wd: int
    is_dir: bool
    parent: int | None
    name: bytes | None


@dataclass
class Batch:
    """Notices waiting for the end of the coalescing window."""

    # nodeid -> content changed too (else attributes only)
    inodes: dict[int, bool] = field(default_factory=dict)
    # (parent, name) of a changed child of a watched directory -> content changed
    children: dict[tuple[int, bytes], bool] = field(default_factory=dict)
    # (parent, name) whose entry changed -> the last event was a deletion
    entries: dict[tuple[int, bytes], bool] = field(default_factory=dict)
    # entries put off once (see Watcher._deliver): decided for good this time
    rechecks: dict[tuple[int, bytes], bool] = field(default_factory=dict)
    overflow: bool = False
    # filled when taken: every watch (for an overflow) and the notifier to use
    watched: list[tuple[int, bool, int | None, bytes | None]] = field(default_factory=list)
    notifier: object | None = None

    def __bool__(self) -> bool:
        return bool(self.inodes or self.children or self.entries or self.rechecks or self.overflow)


# A notice for the notifier: (method name, *its arguments).
Notice = tuple[Any, ...]


class WatcherStats(TypedDict):
    """Watcher.stats() (JSON-ready: the stats socket)."""

    events: int
    coalesced: int
    batches: int
    overflows: int
    watches_active: int
    watches_added: int
    watches_removed: int
    watches_refused: int
    watch_errors: int
    entries_unchanged: int
    max_watches: int
    sent: dict[str, int]
    undelivered: dict[str, int]
    inotify: bool


class Watcher(Actor):
    """Watches host inodes for the client; see the module docstring.

    The op layer's API is synchronous and fire-and-forget (built on Actor.tell),
    so a request never waits on the watcher:

    - ``watch(nodeid, fd, is_dir, parent=None, name=None) -> bool``
    - ``unwatch(nodeid) -> bool``
    - ``await watch_file(nodeid)`` (the one async call: it asks the inode table for the fd)
    - ``set_notifier(notifier)``
    - ``stats() -> dict``
    """

    name = "watcher"

    # fs: the op layer's Filesystem (actorfs.runtime.ops, above this package);
    # notifier: a transport's notifier (runtime/fuse/notify.py), sync or async.
    def __init__(
        self,
        fs: Any = None,
        notifier: Any = None,
        *,
        window: float = DEFAULT_WINDOW,
        max_watches: int | None = None,
        mailbox_size: int = 1 << 16,
    ) -> None:
        super().__init__(mailbox_size)
        self.inodes: InodeTable | None = fs.inodes if fs is not None else None  # for (parent, name) -> nodeid
        self.pool: BlockingPool | None = fs.pool if fs is not None else None  # for the entry checks' syscalls
        self.notifier = notifier
        self.window = window
        self.max_watches = min(max_watches or DEFAULT_MAX_WATCHES, inotify.max_user_watches())
        self._ino: inotify.Inotify | None = None
        self._init_error: OSError | None = None
        self._by_nodeid: dict[int, Watched] = {}
        self._by_wd: dict[int, int] = {}
        self._batch = Batch()
        self._work = asyncio.Event()  # set while a batch is pending
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed = False
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[list[tuple[str, object]]] | None = None
        # counters
        self.events = 0
        self.coalesced = 0
        self.batches = 0
        self.overflows = 0
        self.watches_added = 0
        self.watches_removed = 0
        self.watches_refused = 0  # our bound or the kernel's (ENOSPC)
        self.watch_errors = 0  # the inode could not be watched (EACCES, ENOENT...)
        self.sent = dict.fromkeys(NOTICE_KINDS, 0)
        self.undelivered = dict.fromkeys(NOTICE_KINDS, 0)
        self.entries_unchanged = 0  # entry notices skipped: the name leads where it did
        self._root_fd = fs.inodes.root_fd if fs is not None else None
        # The inotify fd, the notify thread and the root's watch come with run():
        # a watcher built but never run holds nothing.

    # -- the op layer's API (sync, never waits) ---------------------------------
    def watch(
        self,
        nodeid: int,
        fd: int,
        is_dir: bool,
        parent: int | None = None,
        name: bytes | None = None,
    ) -> bool:
        """Watch the inode behind `fd` (an O_PATH fd this call takes over) as `nodeid`.

        A new kernel watch is added right here, before the op's reply goes out,
        so no host change after the reply can slip past; only the bookkeeping
        goes through the mailbox (ahead of any event of that watch, which can
        only be read after this returns). An inode that already has a watch
        (the same nodeid again, or an older nodeid whose unwatch is still
        queued) goes through the mailbox whole, to stay ordered after it.
        """
        ino = self._ino
        if ino is None and not self._stopped and self._init_error is None:
            # Not started yet: the mailbox keeps it (and its fd) until run().
            if self.tell(self._watch, nodeid, fd, is_dir, parent, name):
                return True
        if self._stopped or ino is None or ino.closed:
            os.close(fd)
            self.watches_refused += 1
            return False
        mask = (DIR_MASK if is_dir else FILE_MASK) | inotify.IN_MASK_CREATE
        try:
            wd = ino.add_watch(b"/proc/self/fd/%d" % fd, mask)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                if self.tell(self._watch, nodeid, fd, is_dir, parent, name):
                    return True
                self.watches_refused += 1
            elif exc.errno == errno.ENOSPC:  # the kernel's max_user_watches
                self.watches_refused += 1
            else:
                self.watch_errors += 1
                log.debug("watch %d failed: %s", nodeid, exc)
            os.close(fd)
            return False
        os.close(fd)
        if self.tell(self._adopt, nodeid, wd, is_dir, parent, name):
            return True
        with contextlib.suppress(OSError):
            ino.rm_watch(wd)
        self.watches_refused += 1
        return False

    async def watch_file(self, nodeid: int) -> bool:
        """watch() by nodeid alone (SETUPMAPPING): the fd comes from the inode table."""
        if self.inodes is None or self._stopped:
            return False
        fd, kind = await self.inodes.dup_fd(nodeid)
        return self.watch(nodeid, fd, kind == KIND_DIR)

    def unwatch(self, nodeid: int) -> bool:
        """The server forgot `nodeid`: drop its watch."""
        return self.tell(self._unwatch, nodeid)

    def set_notifier(self, notifier: Any) -> None:
        """Swap the notifier (None: notices are counted as undelivered)."""
        if not self.tell(self._set_notifier, notifier):
            self.notifier = notifier  # not running: nobody else reads it now

    def stats(self) -> WatcherStats:
        return {
            "events": self.events,
            "coalesced": self.coalesced,
            "batches": self.batches,
            "overflows": self.overflows,
            "watches_active": len(self._by_nodeid),
            "watches_added": self.watches_added,
            "watches_removed": self.watches_removed,
            "watches_refused": self.watches_refused,
            "watch_errors": self.watch_errors,
            "entries_unchanged": self.entries_unchanged,
            "max_watches": self.max_watches,
            "sent": dict(self.sent),
            "undelivered": dict(self.undelivered),
            "inotify": self._init_error is None,
        }

    async def watched(self) -> dict[int, tuple[bool, int | None, bytes | None]]:
        """nodeid -> (is_dir, parent, name) of every live watch (tests, debugging)."""
        return await self.ask(
            lambda: {n: (w.is_dir, w.parent, w.name) for n, w in self._by_nodeid.items()}
        )

    # -- handlers (the mailbox task) --------------------------------------------
    def _watch(
        self, nodeid: int, fd: int, is_dir: bool, parent: int | None, name: bytes | None
    ) -> None:
        """An inode that had a kernel watch when watch() was called."""
        try:
            w = self._by_nodeid.get(nodeid)
            if w is not None:
                if name is not None:  # the client may know it under a new name now
                    w.parent, w.name = parent, name
                return
            if self._ino is None or self._ino.closed:
                self.watches_refused += 1
                return
            try:
                # Without MASK_CREATE: join the existing kernel watch (its
                # older nodeid was forgotten) or make one if it is gone now.
                wd = self._ino.add_watch(
                    b"/proc/self/fd/%d" % fd, DIR_MASK if is_dir else FILE_MASK
                )
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self.watches_refused += 1
                else:
                    self.watch_errors += 1
                log.debug("watch %d failed: %s", nodeid, exc)
                return
        finally:
            os.close(fd)
        self._adopt(nodeid, wd, is_dir, parent, name)

    def _adopt(
        self, nodeid: int, wd: int, is_dir: bool, parent: int | None, name: bytes | None
    ) -> None:
        """Record a kernel watch `wd` as nodeid's (within our bound)."""
        old = self._by_nodeid.get(nodeid)
        if old is not None and old.wd != wd and self._by_wd.get(old.wd) == nodeid:
            # The kernel dropped nodeid's old watch (its IN_IGNORED is still
            # queued) and a new one was made: forget the old descriptor.
            del self._by_wd[old.wd]
        prev = self._by_wd.get(wd)
        if prev is not None and prev != nodeid:
            # The same host inode under a new nodeid (the old one is being
            # forgotten): the kernel watch is shared, the newer nodeid owns it.
            self._by_nodeid.pop(prev, None)
        elif prev is None and len(self._by_nodeid) >= self.max_watches:
            assert self._ino is not None  # _watch() checked it
            with contextlib.suppress(OSError):
                self._ino.rm_watch(wd)
            self.watches_refused += 1
            return
        self._by_wd[wd] = nodeid
        self._by_nodeid[nodeid] = Watched(nodeid, wd, is_dir, parent, name)
        self.watches_added += 1

    def _unwatch(self, nodeid: int) -> None:
        w = self._by_nodeid.pop(nodeid, None)
        if w is None:
            return
        self.watches_removed += 1
        if self._by_wd.get(w.wd) == nodeid:
            del self._by_wd[w.wd]
            if self._ino is not None and not self._ino.closed:
                with contextlib.suppress(OSError):  # EINVAL: the kernel dropped it already
                    self._ino.rm_watch(w.wd)

    def _set_notifier(self, notifier: Any) -> None:
        self.notifier = notifier

    def _drain(self) -> None:
        """inotify is readable: fold every queued event into the pending batch."""
        if self._ino is None or self._ino.closed:
            return
        try:
            for wd, mask, _cookie, name in self._ino.read_events():
                self._on_event(wd, mask, name)
        finally:
            self._arm()
        if self._batch:
            self._work.set()

    def _on_event(self, wd: int, mask: int, name: bytes | None) -> None:
        self.events += 1
        b = self._batch
        if mask & inotify.IN_Q_OVERFLOW:
            self.overflows += 1
            b.overflow = True
            return
        nodeid = self._by_wd.get(wd)
        if nodeid is None:
            return  # a watch we already dropped
        w = self._by_nodeid.get(nodeid)
        if mask & inotify.IN_IGNORED:  # the kernel removed the watch
            del self._by_wd[wd]
            if w is not None and w.wd == wd:
                del self._by_nodeid[nodeid]
                self.watches_removed += 1
            return
        if w is None or w.wd != wd:
            return  # the nodeid has a newer watch; this one is on its way out
        if name is None:  # the watched inode itself
            if mask & _CONTENT:
                self._mark(b.inodes, nodeid, True)
            elif mask & inotify.IN_ATTRIB:
                self._mark(b.inodes, nodeid, False)
            if mask & _SELF_GONE:
                # Deleted (its last link) or renamed: the name the client
                # knew it by no longer leads to it; its nlink/ctime changed.
                self._mark(b.inodes, nodeid, False)
                if w.parent is not None and w.name is not None:
                    self._mark(b.entries, (w.parent, w.name), False)
            return
        if mask & _NAMES:
            self._mark(b.entries, (nodeid, name), bool(mask & inotify.IN_DELETE), last=True)
            # the directory's mtime, size and readdir cache
            self._mark(b.inodes, nodeid, True)
        elif mask & _CONTENT:
            self._mark(b.children, (nodeid, name), True)
        elif mask & inotify.IN_ATTRIB:
            self._mark(b.children, (nodeid, name), False)

    def _mark(self, d: dict[Any, bool], key: Any, flag: bool, last: bool = False) -> None:
        """Merge one notice into the batch; `last`: the newest flag wins, else any."""
        if key in d:
            self.coalesced += 1
            d[key] = flag if last else (d[key] or flag)
        else:
            d[key] = flag

    def _recheck(self, entries: dict[tuple[int, bytes], bool]) -> None:
        for key, deleted in entries.items():
            self._batch.rechecks[key] = self._batch.rechecks.get(key, False) or deleted
        if self._batch:
            self._work.set()

    def _take_batch(self) -> Batch | None:
        self._work.clear()
        b, self._batch = self._batch, Batch()
        if not b:
            return None
        if b.overflow:
            b.watched = [(w.nodeid, w.is_dir, w.parent, w.name) for w in self._by_nodeid.values()]
        b.notifier = self.notifier
        return b

    # -- the run loop: mailbox + inotify + sender -------------------------------
    def _arm(self) -> None:
        if self._loop is None or self._armed or self._stopped:
            return
        if self._ino is None or self._ino.closed:
            return
        self._loop.add_reader(self._ino.fd, self._on_readable)
        self._armed = True

    def _disarm(self) -> None:
        if self._armed and self._loop is not None and self._ino is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._ino.fd)
        self._armed = False

    def _on_readable(self) -> None:
        # One drain message at a time: stop watching the fd until it ran.
        self._disarm()
        try:
            self._mailbox.put_nowait((self._drain, (), None))
        except asyncio.QueueFull:
            # Handlers are plain functions run one at a time on this thread,
            # so running this one here cannot interleave with another.
            self._drain()

    def _open_inotify(self) -> None:
        if self._ino is not None or self._init_error is not None:
            return
        try:
            self._ino = inotify.Inotify()
        except OSError as exc:  # EMFILE: too many inotify instances for this user
            self._init_error = exc
            log.warning("host changes are not watched: inotify_init1 failed: %s", exc)
            return
        if self._root_fd is not None:
            self._watch(FUSE_ROOT_ID, os.dup(self._root_fd), True, None, None)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._open_inotify()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="actorfs-notify")
        sender = asyncio.create_task(self._send_loop(), name="watcher:send")
        self._armed = False
        self._arm()
        if self._batch:  # left from before a crash
            self._work.set()
        try:
            await super().run()
        finally:
            await shielded(self._wind_down(sender))

    async def _wind_down(self, sender: asyncio.Task[None]) -> None:
        self._disarm()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        stuck = not await self._wait_inflight()
        # An idle thread is joined at once (no thread left behind); one
        # still stuck in a notify write is left to end with the fd.
        assert self._executor is not None  # made in run(), before the sender
        self._executor.shutdown(wait=not stuck, cancel_futures=True)
        self._executor = None
        if self._stopped:  # a clean stop, not a crash to restart from
            self._close_inotify()

    async def _wait_inflight(self) -> bool:
        """Let a notify write already in the kernel finish (bounded); False if it did not."""
        fut = self._inflight
        if fut is not None and not fut.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), 1.0)
        return fut is None or fut.done()

    async def _send_loop(self) -> None:
        while True:
            await self._work.wait()
            await asyncio.sleep(self.window)  # let the burst finish
            try:
                batch = await self.ask(self._take_batch)
            except FsError:
                return  # stopped
            if batch is not None:
                self.batches += 1
                try:
                    await self._deliver(batch)
                except Exception:  # never let one bad batch end all notices
                    log.exception("watcher: delivering a batch of notices failed")

    async def _child(self, parent: int, name: bytes) -> int | None:
        if self.inodes is None:
            return None
        try:
            return await self.inodes.child(parent, name)
        except FsError:
            return None

    async def _children(self, parent: int) -> list[tuple[bytes, int]]:
        """Names the inode table knows in `parent` (if the table can list them)."""
        listing = getattr(self.inodes, "children", None)
        if listing is None:
            return []
        try:
            return list(await listing(parent))
        except FsError:
            return []

    async def _entry_state(self, parent: int, name: bytes, child: int | None) -> str | None:
        """Where `name` leads now, against `child` (the nodeid the client knows there).

        "same": still to child, so the client's dentry is right and an entry
        notice would only hurt (this is mostly the echo of the client's own
        create, mkdir or rename through us; dropping the dentry of a directory
        the client just made would unhash its cwd). "deleted": gone, and child
        has no link left, so DELETE (which zeroes the client's nlink) is true.
        "present" / "absent": no child known, the name exists / does not.
        "other" or None (could not tell): invalidate the entry.
        """
        if self.pool is None:
            return None
        assert self.inodes is not None  # set with the pool, from fs
        fds: tuple[int, ...]
        try:
            if child is None:
                pfd, _kind = await self.inodes.dup_fd(parent)
                fds = (pfd,)
                cfd = -1
            else:
                pfd, cfd = await self.inodes.dup_two(parent, child)
                fds = (pfd, cfd)
        except (FsError, OSError):
            return None
        try:
            return await self.pool.run_owning(fds, _entry_state_job, pfd, name, cfd)
        except Exception:  # a stopping pool, a vanished parent: be conservative
            return None

    async def _deliver(self, b: Batch) -> None:
        inodes = dict(b.inodes)
        entries = dict(b.entries)
        if b.overflow:
            # Events were lost: every watched inode may have changed, and any
            # name we know may now lead elsewhere.
            for nodeid, _is_dir, parent, name in b.watched:
                inodes[nodeid] = True
                if parent is not None and name is not None:
                    entries.setdefault((parent, name), False)
            for nodeid, is_dir, _parent, _name in b.watched:
                for cname, kid in await self._children(nodeid) if is_dir else ():
                    inodes[kid] = True
                    entries.setdefault((nodeid, cname), False)
        for (parent, name), data in b.children.items():
            child = await self._child(parent, name)
            if child is not None:
                inodes[child] = inodes.get(child, False) or data
        n = b.notifier
        if n is None:  # nobody to tell: count, and spare the entry checks
            self.undelivered["inval_inode"] += len(inodes)
            self.undelivered["inval_entry"] += len(entries) + len(b.rechecks)
            return
        calls: list[Notice] = []
        for nodeid, data in inodes.items():
            calls.append(("inval_inode", nodeid, 0 if data else -1, 0))
        can_delete = getattr(n, "delete", None) is not None
        later: dict[tuple[int, bytes], bool] = {}
        todo = [(k, d, False) for k, d in entries.items() if k not in b.rechecks]
        todo += [(k, d, True) for k, d in b.rechecks.items()]
        limit = asyncio.Semaphore(ENTRY_CHECKS_IN_FLIGHT)

        async def check(parent: int, name: bytes) -> tuple[int | None, str | None]:
            async with limit:
                child = await self._child(parent, name)
                return child, await self._entry_state(parent, name, child)

        checked = await asyncio.gather(*(check(p, nm) for (p, nm), _d, _f in todo))
        for ((parent, name), deleted, final), (child, state) in zip(todo, checked, strict=True):
            if state == "same":
                self.entries_unchanged += 1
            elif state == "present" and not final:
                # A name the inode table does not know yet may be one a
                # request is registering right now (the client's own create
                # or mkdir): look again after one more window.
                later[(parent, name)] = deleted
            elif state == "deleted" and deleted and can_delete:
                calls.append(("delete", parent, child, name))
            else:
                calls.append(("inval_entry", parent, name))
        if later:
            self.tell(self._recheck, later)
        if inspect.iscoroutinefunction(getattr(n, "inval_inode", None)):
            results = []
            for call in calls:
                ok = await _notify_async(n, call)
                results.append((call[0], ok))
                if call[0] == "delete" and ok is False:  # see _with_fallback
                    fallback = ("inval_entry", call[1], call[3])
                    results.append(("inval_entry", await _notify_async(n, fallback)))
        else:
            assert self._executor is not None  # made when the watcher started
            self._inflight = self._executor.submit(_notify_all, n, calls)
            results = await asyncio.wrap_future(self._inflight)
            self._inflight = None
        for kind, ok in results:
            self.sent[kind] += 1
            if ok is False:
                self.undelivered[kind] += 1

    def _close_inotify(self) -> None:
        if self._ino is not None:
            self._disarm()
            self._ino.close()  # drops every kernel watch with it
        self._by_nodeid.clear()
        self._by_wd.clear()

    def _dropped(self, handler: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """A queued watch() message's fd is closed, not leaked."""
        if getattr(handler, "__func__", None) is Watcher._watch:
            with contextlib.suppress(OSError):
                os.close(args[1])

    def close(self) -> None:
        self._close_inotify()
        self._fail_pending()  # a watcher that never ran still owns queued fds
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _entry_state_job(pfd: int, name: bytes, cfd: int) -> str:
    """Pool job for Watcher._entry_state: compare the host's name with the client's inode."""
    known = os.fstat(cfd) if cfd >= 0 else None
    try:
        now = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        if known is None:
            return "absent"
        return "deleted" if known.st_nlink == 0 else "other"
    except OSError:
        return "other"
    if known is None:
        return "present"
    return "same" if (now.st_dev, now.st_ino) == (known.st_dev, known.st_ino) else "other"


def _notify(n: Any, call: Notice) -> Any:
    """One notice; returns the notifier's result (False: not delivered), or a coroutine."""
    kind, *args = call
    try:
        return getattr(n, kind)(*args)
    except Exception as exc:  # a broken transport must not kill the watcher
        log.debug("notify %s%r failed: %r", kind, tuple(args), exc)
        return False


async def _notify_async(n: Any, call: Notice) -> Any:
    """One notice through a coroutine notifier; False if it failed."""
    r = _notify(n, call)
    if not inspect.isawaitable(r):
        return r
    try:
        return await r
    except Exception as exc:
        log.debug("notify %r failed: %r", call, exc)
        return False


def _with_fallback(n: Any, call: Notice, ok: object) -> list[tuple[str, object]]:
    out = [(call[0], ok)]
    if call[0] == "delete" and ok is False:
        # The kernel refuses DELETE when the dentry now leads elsewhere, is a
        # mount point or a non-empty directory: drop the entry instead.
        out.append(("inval_entry", _notify(n, ("inval_entry", call[1], call[3]))))
    return out


def _notify_all(n: Any, calls: list[Notice]) -> list[tuple[str, object]]:
    """Runs in the watcher's thread for a synchronous notifier."""
    out: list[tuple[str, object]] = []
    for call in calls:
        out.extend(_with_fallback(n, call, _notify(n, call)))
    return out
