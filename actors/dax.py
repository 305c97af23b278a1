"""The DAX window actor: a POSIX shm window and the table of file ranges mapped into it.

virtio-fs DAX: the guest asks (FUSE_SETUPMAPPING) for a range of a file to
appear at an offset of a shared window that the hypervisor maps into guest
memory, and later (FUSE_REMOVEMAPPING) for the window's own pages back. This
actor alone owns the mapping table: window ranges -> (file identity, file
offset, length, writable). Every change to the table and to the window is made
in the actor's task, one message at a time, so the table always says what
the window holds.

Who changes the window is a strategy, the *mapper*:

- `InProcessMapper` (default): an embedded hypervisor registers this
  process's view of the window as guest memory, so file pages go straight
  into that view. Where the work happens, and why:
  * mmap of a file can block (the filesystem's mmap hook), so the caller
    maps the file range at a free address in the blocking pool ("prepare");
    that is also where every host error (EACCES for a write mapping of a
    read-only fd, ENODEV...) comes from, before anything is changed.
  * The actor then moves that mapping into the window with
    mremap(MREMAP_FIXED), and puts the window's own pages back with a
    MAP_FIXED mmap of the shm fd. Both only edit page tables of this process
    (no disk), so they run in the actor's handler and the table and window
    never disagree. A split of a mapping needs no syscall at all.
- `actorfs.runtime.dax.channel.ChannelMapper`: an out-of-process hypervisor maps the
  same shm object itself; every change is sent to it as a vhost-user
  SHMEM_MAP / SHMEM_UNMAP message with the fd (see that module).

The window is created (and unlinked on close) or attached by name:
`DaxWindow.create(name, size)` / `DaxWindow.attach(name)`. Wire it as
`fs.dax = window` before the supervisor starts the actors.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Generator, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sortedcontainers import SortedList

from actorfs.runtime.core.actor import Actor, stepped
from actorfs.runtime.core.errno_map import FsError
from actorfs.runtime.host.shm_view import (
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    ShmView,
    mmap_at,
    munmap,
    page_aligned,
)

T = TypeVar("T")
log = logging.getLogger("actorfs.dax")

_OFF_MAX = (1 << 63) - 1  # off_t

RunBlocking = Callable[..., Awaitable[Any]]


class FileRef:
    """An fd kept open while table entries need it (split pieces share one)."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int):
        self.fd = fd
        self.refs = 0


@dataclass(slots=True)
class Mapping:
    """One table entry: window [start, start+length) shows file [foffset, +length)."""

    start: int
    length: int
    foffset: int
    identity: tuple[int, int]  # (st_dev, st_ino) of the mapped file
    writable: bool
    file: FileRef | None = None  # kept only when the mapper must map pieces again

    @property
    def end(self) -> int:
        return self.start + self.length

    def piece(self, start: int, end: int) -> Mapping:
        """The part of this mapping over window [start, end)."""
        return Mapping(
            start,
            end - start,
            self.foffset + (start - self.start),
            self.identity,
            self.writable,
            self.file,
        )


class Prepared:
    """A file range made ready for the window in the blocking pool.

    Owned by whoever holds it: the actor consumes it, or the caller discards it
    (on error or cancellation). Both run on the event-loop thread, so the flags
    need no lock.
    """

    __slots__ = ("identity", "length", "probe", "fd", "consumed", "discarded")

    def __init__(self, identity: tuple[int, int], length: int, probe: int | None, fd: int | None):
        self.identity = identity
        self.length = length
        self.probe = probe  # address of a mapping of the file range (in-process mapper)
        self.fd = fd  # the open fd itself (channel mapper)
        self.consumed = False
        self.discarded = False

    def consume(self) -> None:
        if self.discarded:
            # The caller gave up (cancelled) before the actor got to it.
            raise FsError(errno.EINTR, "setupmapping was abandoned")
        self.consumed = True

    def discard(self) -> None:
        if self.consumed or self.discarded:
            return
        self.discarded = True
        if self.probe is not None:
            munmap(self.probe, self.length)
        if self.fd is not None:
            os.close(self.fd)


def _identity_of(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino); EISDIR for a directory, ENODEV for what cannot be mapped."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise FsError(errno.EISDIR)
    if not stat.S_ISREG(st.st_mode):
        raise FsError(errno.ENODEV, "only regular files can be mapped into the DAX window")
    return (st.st_dev, st.st_ino)


async def _shielded(work: Awaitable[Prepared]) -> Prepared:
    """Await prepare(); if the caller is cancelled meanwhile, discard what it makes."""
    fut = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() else f.result().discard()
        )
        raise


class InProcessMapper:
    """Maps file ranges over this process's own view of the window."""

    # Splitting an entry leaves its pages where they are: no syscall needed.
    splits_in_place = True

    def __init__(self) -> None:
        self.view: ShmView | None = None

    def bind(self, view: ShmView) -> None:
        self.view = view

    # -- blocking pool -------------------------------------------------------
    def prepare(self, fd: int, foffset: int, length: int, writable: bool) -> Prepared:
        """Map the file range somewhere free; takes ownership of fd (closed here)."""
        try:
            identity = _identity_of(fd)
            prot = PROT_READ | (PROT_WRITE if writable else 0)
            probe = mmap_at(None, length, prot, MAP_SHARED, fd, foffset)
        finally:
            os.close(fd)  # the mapping keeps its own reference to the file
        return Prepared(identity, length, probe, None)

    # -- actor task ----------------------------------------------------------
    def install(self, m: Mapping, prepared: Prepared | None) -> None:
        assert prepared is not None and prepared.probe is not None
        assert self.view is not None  # bound by the window before any mapping
        try:
            self.view.move_into(m.start, m.length, prepared.probe)
        except OSError:
            # mremap may have unmapped the target before failing: no holes.
            self.view.restore(m.start, m.length)
            munmap(prepared.probe, m.length)
            raise

    def clear(self, start: int, length: int) -> None:
        assert self.view is not None  # bound by the window before any mapping
        self.view.restore(start, length)

    def release(self, ref: FileRef) -> None:  # no fds are kept in-process
        os.close(ref.fd)

    def commit(self) -> Future[None] | None:
        return None  # everything above already happened

    def close(self, table: list[Mapping]) -> None:
        """The view is unmapped as a whole by the window; nothing else to undo."""


def _stepped_result(
    handler: Callable[..., Generator[Any, Any, T]],
) -> Callable[..., T]:
    """For the type checker: Actor.ask() of a stepped handler returns what the
    generator returns (the object itself is passed through unchanged)."""
    return cast("Callable[..., T]", handler)


class DaxWindow(Actor):
    """The DAX actor. Handlers (`_setup`, `_remove`, `_snapshot`) run in its task only.

    The table is ordered by window offset (a SortedList of starts), so finding
    the entries a range touches costs O(log M): a REMOVEMAPPING of N ranges over
    M entries costs O((N + M) log M). `_setup` and `_remove` are stepped
    handlers (actorfs.runtime.core.actor): they yield after each range or entry, so a request
    with thousands of ranges gives the event loop back every few milliseconds.
    """

    name = "dax"

    def __init__(self, view: ShmView, mapper: Any = None, mailbox_size: int = 4096):
        super().__init__(mailbox_size)
        self.view = view
        self.mapper = mapper if mapper is not None else InProcessMapper()
        self.mapper.bind(view)
        self._starts = SortedList()  # window offsets of table entries, in order
        self._table: dict[int, Mapping] = {}
        self._closed = False

    @classmethod
    def create(cls, name: str, size: int, mapper: Any = None) -> DaxWindow:
        """A new shm window NAME of SIZE bytes (page multiple); unlinked on close."""
        return cls(ShmView.create(name, size), mapper)

    @classmethod
    def attach(cls, name: str, mapper: Any = None) -> DaxWindow:
        """An existing shm window (e.g. made by the hypervisor); left in place on close."""
        return cls(ShmView.attach(name), mapper)

    # -- facts a hypervisor needs ------------------------------------------------
    @property
    def shm_name(self) -> str:
        name: str = self.view.name  # posix_ipc's, untyped
        return name

    @property
    def size(self) -> int:
        return self.view.size

    @property
    def map_alignment(self) -> int:
        """log2 of the alignment SETUPMAPPING offsets need (FUSE_INIT map_alignment)."""
        return PAGE_SIZE.bit_length() - 1

    @property
    def base_address(self) -> int:
        """Address of this process's view (what an embedded VMM registers as guest memory)."""
        return self.view.base

    # -- client side (called from op handlers) ------------------------------------
    async def map_file(
        self,
        fd: int,
        foffset: int,
        length: int,
        moffset: int,
        writable: bool,
        run_blocking: RunBlocking | None = None,
    ) -> None:
        """SETUPMAPPING of an open fd (ownership of fd passes here, even on error)."""
        try:
            self.check_range(moffset, length)
            if foffset < 0 or not page_aligned(foffset) or foffset > _OFF_MAX - length:
                raise FsError(errno.EINVAL, f"file offset {foffset:#x} cannot be mapped")
        except BaseException:
            os.close(fd)
            raise
        started = False

        def prepare() -> Prepared:
            nonlocal started
            started = True  # from here on prepare() owns fd
            return self.mapper.prepare(fd, foffset, length, writable)

        try:
            prepared = await _shielded((run_blocking or asyncio.to_thread)(prepare))
        except asyncio.CancelledError:
            raise  # the shielded job still runs, and cleans up after itself
        except BaseException:
            if not started:  # e.g. the pool is shut down: fd is still ours
                os.close(fd)
            raise
        try:
            done = await self.ask(_stepped_result(self._setup), moffset, foffset, writable, prepared)
        finally:
            prepared.discard()  # no-op once the actor took it
        if done is not None:
            try:
                await asyncio.wrap_future(done)
            except OSError as exc:
                log.warning("dax: hypervisor refused mapping at %#x: %s", moffset, exc)
                self.tell(self._forget, moffset, prepared)
                raise FsError(errno.EIO, f"hypervisor refused the mapping: {exc}") from exc

    async def unmap(self, ranges: Iterable[tuple[int, int]]) -> None:
        """REMOVEMAPPING: each range gets the window's own pages back."""
        done = await self.ask(_stepped_result(self._remove), list(ranges))
        if done is not None:
            try:
                await asyncio.wrap_future(done)
            except OSError as exc:
                raise FsError(errno.EIO, f"hypervisor refused the unmapping: {exc}") from exc

    async def mappings(self) -> list[Mapping]:
        """A copy of the table, sorted by window offset."""
        return await self.ask(self._snapshot)

    def check_range(self, moffset: int, length: int) -> None:
        """EINVAL unless the range is a non-empty page-aligned part of the window."""
        try:
            self.view.check_range(moffset, length)
        except OSError as exc:
            raise FsError(errno.EINVAL, str(exc.strerror)) from None

    # -- actor side ------------------------------------------------------------------
    # Stepped handlers: each `yield` is a point where the table and the window
    # agree; later messages to this actor wait until the handler returns.
    @stepped
    def _setup(
        self, moffset: int, foffset: int, writable: bool, prepared: Prepared
    ) -> Generator[None, None, Future[None] | None]:
        if self._closed:
            raise FsError(errno.EIO, "DAX window is closed")
        prepared.consume()
        new = Mapping(moffset, prepared.length, foffset, prepared.identity, writable)
        if prepared.fd is not None:
            new.file = FileRef(prepared.fd)
            prepared.fd = None
        # Overlapped parts of older entries are replaced; the window change for
        # the new range is the install itself (MAP_FIXED semantics).
        try:
            yield from self._cut(new.start, new.end, clear=False)
        except GeneratorExit:
            # The actor is stopping (shutdown) mid-way: release what this
            # request carried; the window itself goes away with the actor.
            prepared.consumed = False
            prepared.discard()
            if new.file is not None:
                self.mapper.release(new.file)
            raise
        try:
            self.mapper.install(new, prepared)
        except OSError:
            if new.file is not None:
                self.mapper.release(new.file)
            self.mapper.commit()
            raise
        self._insert(new)
        return self.mapper.commit()

    @stepped
    def _remove(
        self, ranges: list[tuple[int, int]]
    ) -> Generator[None, None, Future[None] | None]:
        if self._closed:
            raise FsError(errno.EIO, "DAX window is closed")
        # All or nothing: every range must be valid and fully mapped before any changes.
        checked = []
        for s, n in ranges:
            s, n = int(s), int(n)
            self.check_range(s, n)
            checked.append((s, n))
            if len(checked) % 256 == 0:
                yield
        ranges = checked
        covered = yield from self._check_covered(ranges)
        if not covered:
            raise FsError(errno.EINVAL, "range is not mapped in the DAX window")
        for s, n in ranges:
            yield from self._cut(s, s + n, clear=True)
        return self.mapper.commit()

    def _snapshot(self) -> list[Mapping]:
        return [self._table[s].piece(s, self._table[s].end) for s in self._starts]

    def _forget(self, moffset: int, prepared: Prepared) -> None:
        """Drop an entry the hypervisor refused, if it is still that one."""
        m = self._table.get(moffset)
        if m is not None and m.length == prepared.length and m.identity == prepared.identity:
            self._starts.remove(moffset)
            del self._table[moffset]
            self._unref(m.file)
            self.mapper.commit()

    # -- the table ---------------------------------------------------------------------
    def _overlapping(self, start: int, end: int) -> list[Mapping]:
        """The entries that overlap window [start, end), in order: O(log M + k)."""
        starts = self._starts
        out = []
        i = starts.bisect_right(start) - 1
        if i >= 0 and (m := self._table[starts[i]]).end > start:
            out.append(m)  # the entry that begins at or before start
        for s in starts.irange(start, end, inclusive=(False, False)):
            out.append(self._table[s])
        return out

    def _check_covered(self, ranges: list[tuple[int, int]]) -> Generator[None, None, bool]:
        """Whether the ranges are disjoint and each is wholly mapped (a stepped part).

        Disjoint ranges do not change each other's coverage, so each is checked
        against the table as it is: sorting makes the overlap check O(N log N).
        """
        end = 0
        for s, n in sorted(ranges):
            e = s + n
            if s < end:
                return False  # two ranges of the request overlap
            end = e
            cursor = s
            for m in self._overlapping(s, e):
                if m.start > cursor:
                    return False
                cursor = m.end
            if cursor < e:
                return False
            yield
        return True

    def _insert(self, m: Mapping) -> None:
        self._starts.add(m.start)
        self._table[m.start] = m
        if m.file is not None:
            m.file.refs += 1

    def _unref(self, ref: FileRef | None) -> None:
        if ref is not None:
            ref.refs -= 1
            if ref.refs == 0:
                self.mapper.release(ref)

    def _cut(self, start: int, end: int, clear: bool) -> Generator[None, None, None]:
        """Remove [start, end) from the table, keeping the parts of entries outside it.

        A stepped part: yields after each entry it changes.
        """
        for m in self._overlapping(start, end):
            self._starts.remove(m.start)
            del self._table[m.start]
            keep = [p for p in (m.piece(m.start, start), m.piece(end, m.end)) if p.length > 0]
            if self.mapper.splits_in_place:
                if clear:
                    self.mapper.clear(max(m.start, start), min(m.end, end) - max(m.start, start))
            else:
                # The hypervisor only unmaps whole regions: unmap, map the kept parts again.
                self.mapper.clear(m.start, m.length)
                for p in keep:
                    self.mapper.install(p, None)
            for p in keep:
                self._insert(p)
            self._unref(m.file)
            yield

    # -- shutdown -----------------------------------------------------------------------
    def close(self) -> None:
        """Remove every mapping, close every fd, unmap the view, unlink the shm if ours."""
        if self._closed:
            return
        self._closed = True
        table = [self._table[s] for s in self._starts]
        self._starts.clear()
        self._table.clear()
        try:
            self.mapper.close(table)
        except Exception as exc:  # still release our own resources
            log.warning("dax: closing the mapper failed: %r", exc)
        self.view.close()

    @property
    def closed(self) -> bool:
        return self._closed
