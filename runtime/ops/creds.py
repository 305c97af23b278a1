"""Per-thread credentials: a syscall made with the requester's fsuid, fsgid and groups.

Linux keeps credentials per thread. A root server that creates a client's
object as itself and then chowns it has to find the object again by name,
and a host user who can write the directory can swap another object (root's
0600 file) under that name in between. Made with the caller's credentials,
the object is the caller's from birth: nothing to chown, and the host kernel
makes every permission decision itself (sticky directories, protected
hardlinks, set-ID bits, supplementary groups).

`run_as(creds, fn, *args)` switches the calling thread, runs fn, and restores
it in a finally, so the thread serves its next job as the server again:

- The raw syscalls, never glibc's wrappers: glibc's setgroups, setresuid and
  setresgid broadcast the change to every thread of the process (POSIX wants
  per-process credentials), which would hand one request's credentials to
  every op in flight. setfsuid/setfsgid/setgroups(2) act on the caller only.
- Every switch is verified: setfsuid and setfsgid report no error, they
  return the previous value; a second call with an invalid id reads the
  current one back. A switch that did not take (an id unmapped in our user
  namespace, a missing capability) fails the op with EPERM rather than run it
  with the server's rights.
- A restore that does not take aborts the process: a thread left with a
  client's credentials must never serve another request.
- Leaving fsuid 0 drops the filesystem capabilities (CAP_DAC_OVERRIDE,
  CAP_FOWNER, CAP_CHOWN, CAP_FSETID, ...) from the thread's effective set;
  returning to 0 restores them. CAP_SETUID/CAP_SETGID stay, so the thread can
  always switch back.

Supplementary groups come from /proc/PID/status of the requesting process,
and only while that process still has the request's fsuid and fsgid (a pid
that exited and was reused by someone else gives no groups). A virtio-fs
request has no host process: no supplementary groups.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar, cast

from actorfs.runtime.core.errno_map import FsError

T = TypeVar("T")

# x86_64 and aarch64 syscall numbers (the 32-bit-id variants on both).
_SYSCALLS = {
    "x86_64": {"setfsuid": 122, "setfsgid": 123, "getgroups": 115, "setgroups": 116},
    "aarch64": {"setfsuid": 151, "setfsgid": 152, "getgroups": 158, "setgroups": 159},
}
_NR = _SYSCALLS.get(platform.machine())
_INVALID = 0xFFFFFFFF  # (uid_t)-1: never a valid id, so setfs*id(-1) only reads back
MAX_GROUPS = 65536  # NGROUPS_MAX


# ctypes function objects are untyped (typeshed: a private _FuncPointer): Any.
def _prototype(*argtypes: Any) -> Any:
    """syscall(2) with fixed argument types: a new function object each (CDLL's
    item access does not cache), so no per-call argument conversion objects."""
    f = cast(ctypes.CDLL, _libc)["syscall"]
    f.restype = ctypes.c_long
    f.argtypes = [ctypes.c_long, *argtypes]
    return f


_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sys_id = _prototype(ctypes.c_uint)  # setfsuid, setfsgid
    _sys_groups = _prototype(ctypes.c_size_t, ctypes.c_void_p)  # getgroups, setgroups
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _libc = None


class Creds(NamedTuple):
    """Who a syscall runs as. pid > 0: take supplementary groups from that
    process (while it still has uid/gid); pid 0: no supplementary groups."""

    uid: int
    gid: int
    pid: int = 0


def available() -> bool:
    """Whether this process can switch: Linux on a known architecture, as root."""
    return _libc is not None and _NR is not None and os.geteuid() == 0


_NR_SETFSUID = _NR["setfsuid"] if _NR else -1
_NR_SETFSGID = _NR["setfsgid"] if _NR else -1


def setfsuid(uid: int) -> int:
    """Raw setfsuid(2): the previous fsuid of this thread."""
    prev: int = _sys_id(_NR_SETFSUID, uid & 0xFFFFFFFF)
    return prev


def setfsgid(gid: int) -> int:
    """Raw setfsgid(2): the previous fsgid of this thread."""
    prev: int = _sys_id(_NR_SETFSGID, gid & 0xFFFFFFFF)
    return prev


def getfsuid() -> int:
    """This thread's fsuid (the effective uid where the syscall is unknown)."""
    if _libc is None or _NR is None:
        return os.geteuid()
    return setfsuid(_INVALID)


def getfsgid() -> int:
    return setfsgid(_INVALID)


def setgroups(groups: Sequence[int]) -> None:
    """Raw setgroups(2): this thread only."""
    arr = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _sys_groups(cast("dict[str, int]", _NR)["setgroups"], len(groups), ctypes.addressof(arr)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def getgroups() -> tuple[int, ...]:
    """Raw getgroups(2) of this thread."""
    n = _sys_groups(cast("dict[str, int]", _NR)["getgroups"], 0, None)
    arr = (ctypes.c_uint * max(1, n))()
    if n > 0:
        n = _sys_groups(cast("dict[str, int]", _NR)["getgroups"], n, ctypes.addressof(arr))
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return tuple(arr[:n])


def groups_of(pid: int, uid: int, gid: int) -> tuple[int, ...]:
    """Supplementary groups of process `pid`, while its fsuid/fsgid are uid/gid; else ()."""
    if pid <= 0:
        return ()
    try:
        fd = os.open(b"/proc/%d/status" % pid, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ()
    try:
        text = os.read(fd, 1 << 16)
    except OSError:
        return ()
    finally:
        os.close(fd)
    # "Uid:\treal\teffective\tsaved\tfs": a FUSE request carries the fs ids.
    if _field(text, b"\nUid:", 3) != uid or _field(text, b"\nGid:", 3) != gid:
        return ()  # not (or no longer) the requester
    i = text.find(b"\nGroups:")
    if i < 0:
        return ()
    line = text[i + 8 : text.find(b"\n", i + 8)]
    try:
        return tuple(int(g) for g in line.split())[:MAX_GROUPS]
    except ValueError:
        return ()


def _field(text: bytes, key: bytes, n: int) -> int | None:
    i = text.find(key)
    if i < 0:
        return None
    fields = text[i + len(key) : text.find(b"\n", i + 1)].split()
    try:
        return int(fields[n])
    except (IndexError, ValueError):
        return None


class _Server(NamedTuple):
    uid: int
    gid: int
    groups: tuple[int, ...]


_SERVER: _Server | None = None


def _server() -> _Server:
    """The credentials every thread returns to: the process's own (read once)."""
    global _SERVER
    if _SERVER is None:
        _SERVER = _Server(os.geteuid(), os.getegid(), tuple(os.getgroups()))
    return _SERVER


def _restore(srv: _Server, groups_changed: bool) -> None:
    """Back to the server's credentials, or abort the process."""
    try:
        setfsuid(srv.uid)
        setfsgid(srv.gid)
        ok = getfsuid() == srv.uid and getfsgid() == srv.gid
        if groups_changed:
            setgroups(srv.groups)
            ok = ok and getgroups() == srv.groups
    except BaseException:
        ok = False
    if not ok:
        os.write(2, b"actorfs: could not restore a thread's credentials; aborting\n")
        os.abort()


def run_as(creds: Creds, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on this thread with creds' fsuid, fsgid and groups; restored after.

    EPERM (the op does not run) when a switch does not take.
    """
    srv = _server()
    groups = groups_of(creds.pid, creds.uid, creds.gid)
    groups_changed = groups != srv.groups
    try:
        if groups_changed:
            try:
                setgroups(groups)
            except OSError as e:
                raise FsError(errno.EPERM, f"setgroups: {e.strerror}") from None
        setfsgid(creds.gid)
        if getfsgid() != creds.gid:
            raise FsError(errno.EPERM, f"setfsgid({creds.gid}) did not take")
        setfsuid(creds.uid)
        if getfsuid() != creds.uid:
            raise FsError(errno.EPERM, f"setfsuid({creds.uid}) did not take")
        return fn(*args)
    finally:
        _restore(srv, groups_changed)


_AVAILABLE: bool | None = None


def needed(server_uid: int, server_gid: int, uid: int, gid: int) -> bool:
    """A switch is needed (and possible) for a request by uid/gid to a server of
    server_uid/server_gid: only a root server switches, and not for itself."""
    global _AVAILABLE
    if server_uid != 0 or (uid, gid) == (server_uid, server_gid):
        return False
    if _AVAILABLE is None:
        _AVAILABLE = available()
    return _AVAILABLE
