"""One process's view of a DAX window: a POSIX shm object mapped once, plus MAP_FIXED tools.

Both sides of DAX use this: the server's DAX actor (in-process mapping) and
the reference receiver of an out-of-process hypervisor. Python's mmap module
cannot map at a fixed address, so the window view and every change to it go
through libc (ctypes): the view's base address is then known exactly, and a
file range can be placed over part of it with MAP_FIXED (or moved there with
mremap), and the window's own pages put back the same way.

None of these calls touch a disk: they change page tables of this process
only. (Reads and writes through the view can fault pages in from the file.)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import posix_ipc

PAGE_SIZE = mmap.PAGESIZE

PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_SHARED = mmap.MAP_SHARED
MAP_FIXED = 0x10
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MS_SYNC = 4

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
# mremap is variadic in C (new_address only with MREMAP_FIXED); passing all five
# integer arguments is correct for the Linux calling conventions we run on.
_mremap = _libc.mremap
_mremap.restype = ctypes.c_void_p
_mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
_msync = _libc.msync
_msync.restype = ctypes.c_int
_msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_MAP_FAILED = ctypes.c_void_p(-1).value


def _oserror() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


def mmap_at(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """libc mmap; returns the address or raises OSError (errno as the kernel says)."""
    ptr = _mmap(addr, length, prot, flags, fd, offset)
    if ptr is None or ptr == _MAP_FAILED:
        raise _oserror()
    return int(ptr)  # c_void_p restype: already an int, typed Any


def munmap(addr: int, length: int) -> None:
    if _munmap(addr, length) != 0:
        raise _oserror()


def mremap_fixed(old: int, length: int, new: int) -> None:
    """Move the mapping at `old` to `new`, replacing whatever was mapped there."""
    ptr = _mremap(old, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, new)
    if ptr is None or ptr == _MAP_FAILED:
        raise _oserror()


def msync(addr: int, length: int) -> None:
    if _msync(addr, length, MS_SYNC) != 0:
        raise _oserror()


def page_aligned(value: int) -> bool:
    return value % PAGE_SIZE == 0


def shm_name(name: str) -> str:
    """The posix_ipc name ('/NAME') for a window name, or ValueError saying why not."""
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"DAX window name {name!r} is empty: pass a name such as 'actorfs-dax'")
    bare = name[1:] if name.startswith("/") else name
    if "/" in bare or "\0" in bare or len(bare) > 250:
        raise ValueError(
            f"DAX window name {name!r} is not a valid shared-memory name: "
            "use one component without '/' (at most 250 characters)"
        )
    return "/" + bare


def check_window_size(size: object) -> int:
    """The window size in bytes, or ValueError naming the rule it breaks."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"DAX window size {size!r} is not an integer number of bytes")
    if size <= 0:
        raise ValueError(f"DAX window size {size} must be positive")
    if not page_aligned(size):
        raise ValueError(
            f"DAX window size {size} is not a multiple of the page size {PAGE_SIZE}: "
            f"round it to {(size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE}"
        )
    return size


class ShmView:
    """A shm object mapped read-write at `base` in this process, `size` bytes long."""

    def __init__(self, shm: posix_ipc.SharedMemory, size: int, created: bool):
        self.name = shm.name
        self.size = size
        self.created = created
        self._shm = shm
        self.fd = shm.fd
        try:
            self.base = mmap_at(None, size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        except OSError:
            shm.close_fd()
            if created:
                shm.unlink()
            raise
        self.closed = False

    @classmethod
    def create(cls, name: str, size: int) -> ShmView:
        name, size = shm_name(name), check_window_size(size)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            raise ValueError(
                f"DAX window {name} already exists: attach to it or pass another name"
            ) from None
        return cls(shm, size, created=True)

    @classmethod
    def attach(cls, name: str) -> ShmView:
        name = shm_name(name)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise ValueError(f"DAX window {name} does not exist: create it first") from None
        try:
            size = check_window_size(shm.size)
        except ValueError as exc:
            shm.close_fd()
            raise ValueError(f"cannot attach DAX window {name}: {exc}") from None
        return cls(shm, size, created=False)

    # -- checks ----------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        """EINVAL unless [offset, offset+length) is a non-empty page-aligned part of the window."""
        if (
            offset < 0
            or length <= 0
            or not page_aligned(offset)
            or not page_aligned(length)
            or offset + length > self.size
        ):
            raise OSError(errno.EINVAL, f"range {offset:#x}+{length:#x} outside the DAX window")

    def _live(self) -> None:
        if self.closed:
            raise ValueError(f"DAX window {self.name} is closed")

    # -- changing the view -------------------------------------------------------
    def map_fd(self, offset: int, length: int, fd: int, foffset: int, writable: bool) -> None:
        """Place fd's [foffset, +length) at window offset (MAP_FIXED, MAP_SHARED)."""
        self._live()
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        try:
            mmap_at(self.base + offset, length, prot, MAP_SHARED | MAP_FIXED, fd, foffset)
        except OSError:
            # A failed MAP_FIXED may already have unmapped the old pages: never
            # leave a hole in the window, put the window's own pages back.
            self.restore(offset, length)
            raise

    def move_into(self, offset: int, length: int, addr: int) -> None:
        """Move an existing mapping (at addr) to window offset, replacing what was there."""
        self._live()
        mremap_fixed(addr, length, self.base + offset)

    def restore(self, offset: int, length: int) -> None:
        """Put the window's own shm pages back over [offset, offset+length)."""
        self._live()
        mmap_at(
            self.base + offset,
            length,
            PROT_READ | PROT_WRITE,
            MAP_SHARED | MAP_FIXED,
            self.fd,
            offset,
        )

    # -- access (tests, an embedding hypervisor) -----------------------------------
    def read(self, offset: int, length: int) -> bytes:
        self._live()
        self._bounds(offset, length)
        return ctypes.string_at(self.base + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._live()
        self._bounds(offset, len(data))
        ctypes.memmove(self.base + offset, data, len(data))

    def msync(self, offset: int, length: int) -> None:
        """Write dirty pages of [offset, +length) back to whatever backs them (MS_SYNC)."""
        self._live()
        self.check_range(offset, length)
        msync(self.base + offset, length)

    def _bounds(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{offset}+{length} is outside the {self.size}-byte window")

    def close(self, unlink: bool | None = None) -> None:
        """Unmap the view (dropping every file mapping in it), close the fd, unlink if ours."""
        if self.closed:
            return
        self.closed = True
        munmap(self.base, self.size)
        self._shm.close_fd()
        if self.created if unlink is None else unlink:
            try:
                self._shm.unlink()
            except posix_ipc.ExistentialError:
                pass
