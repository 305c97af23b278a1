"""Guest memory for the vhost-user backend: the frontend's regions, mapped from their fds.

The frontend describes guest RAM as regions (vhost-user SET_MEM_TABLE, message 5):
each has a guest-physical address, a size, the frontend's own virtual address for
it (used by SET_VRING_ADDR, message 9) and an offset into the fd that backs it.
Descriptor addresses are guest-physical; ring addresses are frontend-virtual.

Everything the guest hands us is untrusted, so every translation checks that the
whole range lies inside mapped regions and returns memoryview slices of the
mmaps: a slice can never reach outside its region.

Shrinking. Touching a shared mapping past the end of its file is SIGBUS, which
kills the process. A frontend that could truncate its guest memory under us
could kill the server at will, so a region must be sealed against shrinking
(memfd with F_SEAL_SHRINK, which QEMU's memory-backend-memfd sets by default,
seal=on). Unsealed regions are refused, unless the server is told to accept
them (`--allow-unsealed-memory`): then each region keeps its fd and
`GuestMemory.intact()` compares the file sizes with the mappings before the
queues touch them; a shrunk region stops the queues instead of being touched.
That check and the access are not atomic: with unsealed memory, a frontend
that truncates at exactly the wrong moment can still kill the server, which is
why it is not the default.

Only shareable, file-backed memory is accepted: regular files (memfd, POSIX
shm, hugetlbfs and files on disk are all regular files). A character device
such as /dev/zero would give the server private memory of its own, allocated
on the frontend's say.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

U64 = (1 << 64) - 1
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


class GuestMemoryError(Exception):
    """An address range that is not (entirely) guest memory."""


@dataclass
class Region:
    guest_addr: int  # guest-physical start
    size: int
    user_addr: int  # the frontend's virtual address of the same bytes
    mm: mmap.mmap
    view: memoryview  # exactly [guest_addr, guest_addr + size)
    sealed: bool = True  # its file cannot shrink (F_SEAL_SHRINK)
    fd: int | None = None  # unsealed: a dup of the file, to check its size
    end: int = 0  # unsealed: the file size the mapping needs (offset + size)

    def intact(self) -> bool:
        """The whole mapping is still backed by its file (always so when sealed)."""
        if self.fd is None:
            return True
        try:
            return os.fstat(self.fd).st_size >= self.end
        except OSError:
            return False

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        self.view.release()
        # In-flight requests may still hold slices (exports): the mapping then
        # lives until the last slice goes away.
        with contextlib.suppress(BufferError):
            self.mm.close()


def is_sealed(fd: int) -> bool:
    """Whether the file cannot shrink: F_SEAL_SHRINK (memfd; EINVAL elsewhere)."""
    try:
        return bool(fcntl.fcntl(fd, _F_GET_SEALS) & _F_SEAL_SHRINK)
    except OSError:
        return False


def map_region(fd: int, guest_addr: int, size: int, user_addr: int, mmap_offset: int) -> Region:
    """mmap `size` bytes at `mmap_offset` of `fd` (the fd is not closed here).

    An unsealed region keeps a dup of the fd, for `Region.intact()`.
    """
    if size <= 0 or guest_addr + size > U64 + 1 or user_addr + size > U64 + 1:
        raise GuestMemoryError(f"bad memory region gpa={guest_addr:#x} size={size:#x}")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError(f"memory region fd: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        # /dev/zero and friends: private memory, nothing shared with the guest.
        raise GuestMemoryError("a memory region must be a shareable file (memfd, shm, "
                               "hugetlbfs or a regular file), not a "
                               + _kind(st.st_mode))
    # Touching a mapping past the end of its file is SIGBUS: refuse such a region.
    if st.st_size < mmap_offset + size:
        raise GuestMemoryError(
            f"memory region of {size:#x} bytes at offset {mmap_offset:#x} "
            f"runs past its {st.st_size:#x}-byte file")
    # mmap offsets must be page aligned; map from the page below and slice.
    gran = mmap.ALLOCATIONGRANULARITY
    base = mmap_offset - mmap_offset % gran
    skip = mmap_offset - base
    try:
        mm = mmap.mmap(fd, size + skip, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(f"cannot map guest memory region: {exc}") from None
    view = memoryview(mm)[skip:skip + size]
    region = Region(guest_addr, size, user_addr, mm, view, sealed=is_sealed(fd))
    if not region.sealed:
        try:
            region.fd = os.dup(fd)
        except OSError as exc:
            region.close()
            raise GuestMemoryError(f"memory region fd: {exc.strerror}") from None
        region.end = mmap_offset + size
    return region


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "pipe"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


class GuestMemory:
    """The current memory table. Replaced as a whole on every SET_MEM_TABLE."""

    def __init__(self, regions: list[Region] | None = None):
        # Sorted by guest address so a range that spans adjacent regions is found in order.
        self.regions = sorted(regions or [], key=lambda r: r.guest_addr)

    @classmethod
    def from_fds(cls, entries: list[tuple[int, int, int, int]], fds: list[int], *,
                 allow_unsealed: bool = False) -> GuestMemory:
        """entries: (guest_addr, size, user_addr, mmap_offset), one fd each. Closes the fds.

        Regions whose file can shrink are refused unless `allow_unsealed`.
        """
        regions: list[Region] = []
        try:
            if len(entries) != len(fds):
                raise GuestMemoryError(f"{len(entries)} memory regions but {len(fds)} fds")
            for (gpa, size, uaddr, off), fd in zip(entries, fds, strict=True):
                if not allow_unsealed and not is_sealed(fd):
                    raise GuestMemoryError(
                        "guest memory not sealed against shrinking (F_SEAL_SHRINK): use "
                        "memory-backend-memfd (seal=on), or --allow-unsealed-memory")
                regions.append(map_region(fd, gpa, size, uaddr, off))
            mem = cls(regions)
            mem._check_overlap()
            return mem
        except GuestMemoryError:
            for r in regions:
                r.close()
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _check_overlap(self) -> None:
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.guest_addr + a.size > b.guest_addr:
                raise GuestMemoryError("overlapping guest memory regions")

    @property
    def sealed(self) -> bool:
        return all(r.sealed for r in self.regions)

    def intact(self) -> bool:
        """No region's file has shrunk under its mapping (one fstat per unsealed region)."""
        return all(r.intact() for r in self.regions)

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []

    # -- translation -------------------------------------------------------
    def _find(self, gpa: int) -> Region | None:
        for r in self.regions:
            if r.guest_addr <= gpa < r.guest_addr + r.size:
                return r
        return None

    def slices(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering guest-physical [gpa, gpa+length): one per region crossed."""
        if length < 0 or gpa < 0 or gpa + length > U64 + 1:
            raise GuestMemoryError(f"address range overflows: {gpa:#x}+{length:#x}")
        out: list[memoryview] = []
        while length:
            r = self._find(gpa)
            if r is None:
                raise GuestMemoryError(f"guest address {gpa:#x} is outside guest memory")
            start = gpa - r.guest_addr
            n = min(length, r.size - start)
            out.append(r.view[start:start + n])
            gpa += n
            length -= n
        return out

    def view(self, gpa: int, length: int) -> memoryview:
        """One contiguous view of guest-physical [gpa, gpa+length) (no spanning)."""
        r = self._find(gpa)
        if r is None or length < 0 or gpa + length > r.guest_addr + r.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not in one region")
        start = gpa - r.guest_addr
        return r.view[start:start + length]

    def user_view(self, uaddr: int, length: int) -> memoryview:
        """Like view(), for an address in the frontend's virtual address space."""
        for r in self.regions:
            if r.user_addr <= uaddr and uaddr + length <= r.user_addr + r.size and length >= 0:
                start = uaddr - r.user_addr
                return r.view[start:start + length]
        raise GuestMemoryError(f"frontend address {uaddr:#x}+{length:#x} is not in one region")
