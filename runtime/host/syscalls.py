"""Linux syscalls Python's os module lacks (renameat2, fallocate with a mode,
utimensat with UTIME_NOW/OMIT, fchownat with AT_EMPTY_PATH), via ctypes.

These run in the blocking pool; each raises OSError with the host errno.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
# openat2(2): resolve flags (linux/openat2.h); the syscall number is 437 on
# every architecture (asm-generic table).
SYS_openat2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, old, newdirfd, new, flags), "renameat2")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate64(fd, mode, offset, length), "fallocate")


def fchownat(dirfd: int, path: bytes, uid: int, gid: int, flags: int) -> None:
    _check(_libc.fchownat(dirfd, path, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, flags), "fchownat")


def utimensat(dirfd: int, path: bytes | None, atime: tuple[int, int], mtime: tuple[int, int], flags: int) -> None:
    """atime/mtime are (sec, nsec); nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(dirfd, path, times, flags), "utimensat")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open with RESOLVE_* restrictions on how the path is walked."""
    how = _OpenHow(flags, mode, resolve)
    rc = _libc.syscall(
        ctypes.c_long(SYS_openat2), ctypes.c_int(dirfd), ctypes.c_char_p(path),
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
    )  # fmt: skip
    return _check(rc, "openat2")


# -- file handles and birth time (the inode table's fd cache) -------------------------
# name_to_handle_at(2) needs no privilege; open_by_handle_at(2) needs
# CAP_DAC_READ_SEARCH. Both run on the loop: they read in-memory inodes.
MAX_HANDLE_SZ = 128
STATX_BTIME = 0x800
AT_STATX_DONT_SYNC = 0x4000


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


_libc.name_to_handle_at.argtypes = [
    ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle), ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]  # fmt: skip
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]


def name_to_handle(fd: int) -> tuple[bytes, int]:
    """(handle, mount id) of the object behind `fd` (an O_PATH fd is fine).

    The handle is opaque bytes: handle_type (4, native order) + f_handle.
    OSError EOPNOTSUPP where the filesystem has no handles.
    """
    h = _FileHandle()
    h.handle_bytes = MAX_HANDLE_SZ
    mnt = ctypes.c_int()
    _check(_libc.name_to_handle_at(fd, b"", ctypes.byref(h), ctypes.byref(mnt), AT_EMPTY_PATH),
           "name_to_handle_at")  # fmt: skip
    n = h.handle_bytes
    return h.handle_type.to_bytes(4, "little", signed=True) + bytes(h.f_handle[:n]), mnt.value


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2) for a handle from name_to_handle(); `mount_fd` must
    not be an O_PATH fd (the kernel refuses those as the mount reference)."""
    h = _FileHandle()
    h.handle_type = int.from_bytes(handle[:4], "little", signed=True)
    body = handle[4:]
    h.handle_bytes = len(body)
    ctypes.memmove(h.f_handle, body, len(body))
    return _check(_libc.open_by_handle_at(mount_fd, ctypes.byref(h), flags), "open_by_handle_at")


_STATX_SIZE = 256
try:
    _libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _HAVE_STATX = True
except AttributeError:  # pragma: no cover - glibc before 2.28
    _HAVE_STATX = False


def birth_time(fd: int) -> tuple[int, int] | None:
    """statx(2) birth time (sec, nsec) of the object behind `fd`, or None where
    the filesystem (or libc) does not report one."""
    if not _HAVE_STATX:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    rc = _libc.statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC, STATX_BTIME, buf)
    if rc < 0:
        return None
    raw = buf.raw
    if not int.from_bytes(raw[0:4], "little") & STATX_BTIME:
        return None
    return int.from_bytes(raw[80:88], "little", signed=True), int.from_bytes(raw[88:92], "little")


def proc_self_fd(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd
