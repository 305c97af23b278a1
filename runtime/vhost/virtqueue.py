"""Split virtqueues over guest memory (virtio 1.x, section 2.7 "Split Virtqueues").

Layout, all little-endian, in guest memory shared with the driver:
  descriptor table  num x {addr u64, len u32, flags u16, next u16}
  available ring    {flags u16, idx u16, ring[num] u16, used_event u16}
  used ring         {flags u16, idx u16, ring[num] {id u32, len u32}, avail_event u16}
(used_event / avail_event exist only with VIRTIO_RING_F_EVENT_IDX.)

The device pops a chain head from the available ring, walks the chain (the
device-readable part carries the FUSE request, the device-writable part gets
the reply), then puts {head, bytes written} in the used ring and bumps used.idx.

Guest memory is untrusted; unsealed guest memory (see runtime/vhost/guest_memory.py)
is checked for shrinking before the rings or buffers are touched. A chain that points outside guest memory, loops,
is longer than the queue, nests indirect tables or puts readable after
writable buffers comes back as a Chain with `error` set (the caller returns it
with 0 bytes written); an available index or head that cannot be right marks
the queue broken (QueueBroken) and it is not touched again until it is set up
anew. All access goes through memoryview slices of the mapped regions, which
cannot reach outside them.

Memory ordering. CPython writes guest memory with plain memcpy, in program
order, and x86 keeps stores in order (TSO), so "write the used element, then
used.idx" needs nothing more. Store-then-load (publish used.idx, then read
used_event; publish avail_event, then re-read avail.idx) can be reordered even
on x86: `full_fence()` orders them with a locked instruction (a mutex
acquire/release). This targets x86-64 hosts, where QEMU's TCG and KVM run here.

Torn writes. Each ring field the driver may read at any moment (used.idx,
avail_event, the used elements) is written with ONE store of its final value,
through typed views of the used ring (memoryview.cast "H" / "I"). Never with
struct.pack_into: it zeroes its destination first and writes the value after.
A driver reading used.idx in between saw it fall to 0, took the stale element
at its next used slot for a completion, and broke its ring ("id N is not a
head!": the guest test's flake, docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeAlias

from actorfs.runtime.vhost.guest_memory import GuestMemory, GuestMemoryError

Bytes: TypeAlias = bytes | bytearray | memoryview  # what a reply iov holds

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

MAX_QUEUE_SIZE = 32768  # virtio: the queue size of a split ring is at most 2^15
MAX_REQUEST_BYTES = 64 << 20  # a FUSE request is far smaller; more is a hostile chain

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_EVENTFD_ONE = (1).to_bytes(8, "little")
# The typed views store native-endian values; the rings are little-endian.
if sys.byteorder != "little":  # pragma: no cover - x86-64 and arm64 hosts are little-endian
    raise ImportError("the vhost-user backend needs a little-endian host")

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: acquiring a mutex is a locked read-modify-write on x86."""
    _fence_lock.acquire()
    _fence_lock.release()


class QueueBroken(Exception):
    """The driver broke the ring itself; the queue stops until it is set up again."""


class ChainError(Exception):
    """One malformed descriptor chain; the queue itself stays usable."""


@dataclass
class Chain:
    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    error: str | None = None

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def request(self) -> memoryview | bytes:
        """The device-readable bytes: a view when in one buffer, else gathered once."""
        if len(self.readable) == 1:
            return self.readable[0]
        return b"".join(self.readable)

    def write_reply(self, iov: Sequence[Bytes]) -> int | None:
        """Scatter `iov` into the writable buffers; the byte count, or None if it won't fit."""
        srcs = [_bytes_view(b) for b in iov]
        total = sum(len(s) for s in srcs)
        if total > self.writable_len:
            return None
        dsts = iter(self.writable)
        dst: memoryview | None = None
        doff = 0
        for src in srcs:
            soff = 0
            while soff < len(src):
                if dst is None or doff == len(dst):
                    dst = next(dsts)
                    doff = 0
                n = min(len(src) - soff, len(dst) - doff)
                dst[doff:doff + n] = src[soff:soff + n]
                soff += n
                doff += n
        return total

    def release(self) -> None:
        """Drop the views into guest memory so a remapped table can be unmapped."""
        for v in self.readable + self.writable:
            v.release()
        self.readable = []
        self.writable = []


def _bytes_view(b: Bytes) -> memoryview:
    v = b if isinstance(b, memoryview) else memoryview(b)
    if v.format != "B" or v.ndim != 1:
        v = v.cast("B")
    return v


class Virtqueue:
    """One split virtqueue: its configuration (from the vring messages) and its rings."""

    def __init__(self, index: int):
        self.index = index
        self.num = 0
        self.desc_uaddr = self.avail_uaddr = self.used_uaddr = 0
        self.addr_set = False
        self.last_avail = 0  # next available-ring slot to pop (SET/GET_VRING_BASE)
        self.used_idx = 0
        self.signalled_used = 0  # used.idx at the last notification (event idx)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.started = False
        self.broken = False
        self.event_idx = False
        self.generation = 0  # bumped on every stop/reset: late replies are dropped
        # Heads popped and not yet pushed back. A head is pushed at most once per
        # pop: a second push (a bug, or a late reply after a re-map) would make
        # the driver see an id that is not a head, which breaks its whole ring.
        self.held: set[int] = set()
        self.dropped_pushes = 0
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        # The used ring as u16 (idx at [1], avail_event at [2 + 4 * num]) and as u32
        # (element i at [1 + 2 * i], [2 + 2 * i]): one aligned store per field.
        self._used16: memoryview | None = None
        self._used32: memoryview | None = None
        self.mem: GuestMemory | None = None
        self._check_mem = False  # unsealed guest memory: check its size before touching it

    # -- setup -------------------------------------------------------------
    def map_rings(self, mem: GuestMemory) -> None:
        """Translate the ring addresses (frontend virtual) into views; GuestMemoryError if not."""
        self.unmap_rings()
        n = self.num
        if not self.addr_set or not 0 < n <= MAX_QUEUE_SIZE:
            raise GuestMemoryError(f"queue {self.index} has no size or no ring addresses")
        if not mem.intact():
            raise GuestMemoryError("guest memory shrank under its mapping")
        self._desc = mem.user_view(self.desc_uaddr, 16 * n)
        self._avail = mem.user_view(self.avail_uaddr, 4 + 2 * n + 2)
        self._used = mem.user_view(self.used_uaddr, 4 + 8 * n + 2)
        self._used16 = self._used.cast("H")
        self._used32 = self._used[:4 + 8 * n].cast("I")
        self.mem = mem
        self._check_mem = not mem.sealed
        self.broken = False
        # The used index lives in guest memory: a restarted ring continues from it.
        self.used_idx = self.signalled_used = _U16.unpack_from(self._used, 2)[0]

    def unmap_rings(self) -> None:
        for v in (self._used16, self._used32, self._desc, self._avail, self._used):
            if v is not None:
                v.release()
        self._desc = self._avail = self._used = self._used16 = self._used32 = None
        self.mem = None

    @property
    def ready(self) -> bool:
        return self._desc is not None and not self.broken

    def intact(self) -> bool:
        """Ready, and its guest memory still all there (unsealed memory can shrink).

        A shrunk memory breaks the queue: touching it would be SIGBUS.
        """
        if not self.ready:
            return False
        if self._check_mem and self.mem is not None and not self.mem.intact():
            self.broken = True
            self.signal_error()
            return False
        return True

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)

    # -- available ring ----------------------------------------------------
    def avail_idx(self) -> int:
        assert self._avail is not None  # only called on a ready queue
        idx: int = _U16.unpack_from(self._avail, 2)[0]
        return idx

    def has_work(self) -> bool:
        return self.ready and self.avail_idx() != self.last_avail

    def pop(self) -> Chain | None:
        """The next chain, or None when the ring is empty. Raises QueueBroken."""
        if not self.ready:
            return None
        if not self.intact():
            raise QueueBroken(f"queue {self.index}: guest memory shrank under its mapping")
        avail = self.avail_idx()
        pending = (avail - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            self._break(f"available index {avail} is {pending} ahead of {self.last_avail}")
        slot = self.last_avail % self.num
        assert self._avail is not None
        head: int = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        if head >= self.num:
            self._break(f"chain head {head} outside a queue of {self.num}")
        if head in self.held:
            # The driver published a head it has not got back yet: its ring is
            # corrupt (or hostile). Completing either copy would let the other's
            # reply land in buffers the driver may reuse: stop the queue instead.
            self._break(f"chain head {head} published while still in flight")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = Chain(head)
        self.held.add(head)
        try:
            self._walk(chain)
        except (ChainError, GuestMemoryError) as exc:
            chain.release()
            chain.error = str(exc)
        return chain

    def _walk(self, chain: Chain) -> None:
        assert self._desc is not None and self.mem is not None
        mem = self.mem
        table: memoryview | bytes = self._desc
        size = self.num
        i = chain.head
        seen = 0
        total = 0
        indirect = False
        while True:
            if i >= size:
                raise ChainError(f"descriptor index {i} outside a table of {size}")
            seen += 1
            if seen > size:
                raise ChainError("descriptor chain loops or is longer than its table")
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise ChainError("indirect table inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError("indirect descriptor with NEXT set")
                if seen != 1:
                    raise ChainError("indirect descriptor in the middle of a chain")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise ChainError(f"indirect table of {length} bytes")
                # A snapshot: the table cannot change under the walk.
                table = bytes(mem.view(addr, length))
                size = length // 16
                i = 0
                seen = 0
                indirect = True
                continue
            total += length
            if total > MAX_REQUEST_BYTES:
                raise ChainError(f"chain of more than {MAX_REQUEST_BYTES} bytes")
            bufs = mem.slices(addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.extend(bufs)
            else:
                if chain.writable:
                    raise ChainError("device-readable buffer after a device-writable one")
                chain.readable.extend(bufs)
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            i = nxt

    def _break(self, why: str) -> NoReturn:
        self.broken = True
        self.signal_error()
        raise QueueBroken(f"queue {self.index}: {why}")

    # -- used ring ---------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Publish one used element: the element first, then used.idx (store order).

        Only a head that was popped and not pushed since; any other is dropped
        (and counted), so the driver never sees an id that is not a head.
        """
        if head not in self.held:
            self.dropped_pushes += 1
            return
        if not self.intact():
            return
        self.held.discard(head)
        used16, used32 = self._used16, self._used32
        assert used16 is not None and used32 is not None  # intact() means mapped
        slot = self.used_idx % self.num
        used32[1 + 2 * slot] = head
        used32[2 + 2 * slot] = written
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        used16[1] = self.used_idx  # one 16-bit store: the driver may be reading it

    def enable_kicks(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers arrived meanwhile (re-check)."""
        if not self.intact():
            return False
        if self.event_idx:
            assert self._used16 is not None
            self._used16[2 + 4 * self.num] = self.last_avail
            full_fence()  # publish avail_event before re-reading avail.idx
        return self.avail_idx() != self.last_avail

    def needs_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        if not self.intact():
            return False
        full_fence()  # used.idx must be visible before reading the driver's suppression
        avail = self._avail
        assert avail is not None
        new = self.used_idx
        old = self.signalled_used
        if self.event_idx:
            used_event: int = _U16.unpack_from(avail, 4 + 2 * self.num)[0]
            # vring_need_event(): did new pass used_event since old?
            need = ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            flags: int = _U16.unpack_from(avail, 0)[0]
            need = new != old and not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        self.signalled_used = new
        return need

    def notify(self) -> None:
        """Signal the call eventfd (the frontend turns it into a guest interrupt).

        The fd is non-blocking (made so when received): a counter at its maximum
        or a full pipe (EAGAIN) has already signalled, so the write is dropped.
        """
        if self.call_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.call_fd, _EVENTFD_ONE)

    def signal_error(self) -> None:
        if self.err_fd is not None:
            with contextlib.suppress(OSError):  # non-blocking too: see notify()
                os.write(self.err_fd, _EVENTFD_ONE)

    # -- lifecycle ----------------------------------------------------------
    def stop(self) -> int:
        """GET_VRING_BASE: stop the ring; returns the next available index to process."""
        self.started = False
        self.generation += 1
        self.held.clear()  # what was in flight is never pushed to this ring again
        self.unmap_rings()
        return self.last_avail

    def reset(self) -> None:
        self.stop()
        self.close_fds()
        self.num = 0
        self.addr_set = False
        self.last_avail = self.used_idx = self.signalled_used = 0
        self.enabled = False
        self.broken = False
