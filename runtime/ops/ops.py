"""Op handlers: FUSE operations as host syscalls beneath the root.

Plain `async def` functions over the actors and the blocking pool; they hold
no state. Every host object is reached from an O_PATH fd held by the inode
table, with *at() syscalls and one validated name component, never by a
joined path. A file is (re)opened through its O_PATH fd via /proc/self/fd,
which names the object itself, not a path that can be swapped.

Pool jobs (the `_job_*` functions) run in a thread and own the fds they are
given (the pool closes them when the job ends). Until an fd is handed on (to a
pool job, the inode or handle table, the watcher, or the caller) an `OwnedFd`
holds it (runtime/host/fds.py): closed on any exception, cancellation included. Errors are OSError (host
errno) or FsError (Linux errno); the dispatcher turns either into -errno.
"""

from __future__ import annotations

import builtins
import errno
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from actorfs.actors.inode_table import KIND_DIR, KIND_FILE, KIND_SYMLINK
from actorfs.runtime.core.abi import (
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_KILL_SUIDGID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
    FOPEN_CACHE_DIR,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    FOPEN_NOFLUSH,
    FOPEN_PASSTHROUGH,
    FUSE_OPEN_KILL_SUIDGID,
    FUSE_ROOT_ID,
    FUSE_WRITE_KILL_SUIDGID,
    MAX_TRANSFER,
    NO_FH,
    dirent_size,
    direntplus_size,
)
from actorfs.runtime.core.attrs import (
    Attr,
    DirEntry,
    DirEntryPlus,
    Entry,
    NegativeEntry,
    Opened,
    RequestContext,
    SetattrArgs,
    StatFs,
    XattrReply,
)
from actorfs.runtime.core.blocking_pool import close_all
from actorfs.runtime.core.errno_map import FsError, linux_errno_of
from actorfs.runtime.host import syscalls
from actorfs.runtime.host.fds import OwnedFd
from actorfs.runtime.ops import creds, dirstream, follow
from actorfs.runtime.ops.creds import Creds
from actorfs.runtime.ops.filesystem import Filesystem

T = TypeVar("T")

NAME_MAX = 255
MAX_IO = 32 << 20  # copy_file_range chunk (no buffer here: the kernel copies)
# A READ reply is a buffer we allocate: no bigger than the largest transfer INIT
# announces (abi.MAX_TRANSFER), which bounds every READ a kernel sends; a hostile
# client asking for 4 GiB gets this much, not 32 MiB per request in flight.
MAX_READ = MAX_TRANSFER

O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# open(2) flags a client may not pass through: we never create on OPEN, and
# O_NOFOLLOW/O_PATH are meaningless when reopening through /proc/self/fd.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_PATH | os.O_DIRECTORY


def proc_fd(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


def check_name(name: bytes) -> None:
    """One path component: empty, ".", "..", "/" or NUL -> EINVAL; > 255 -> ENAMETOOLONG."""
    if not name or name == b"." or name == b".." or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"bad name {name[:64]!r}")
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)


def _ro(fs: Filesystem) -> None:
    if fs.config.read_only:
        raise FsError(errno.EROFS)


def _entry(fs: Filesystem, nodeid: int, st: os.stat_result) -> Entry:
    return Entry(
        nodeid, 0, Attr.from_stat(st.st_ino, st), fs.config.entry_timeout, fs.config.attr_timeout
    )


# --------------------------------------------------------------------------
# pool jobs (run in a thread)


def _job_lookup(
    pfd: int, name: bytes, policy: str, root: bytes, want_dup: bool
) -> tuple[int, os.stat_result, int]:
    """O_PATH fd + stat for parent/name under the symlink policy."""
    # try/except rather than an OwnedFd (runtime/host/fds.py): LOOKUP's hot
    # path, where the helper's ~0.4 us would show.
    fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)
    try:
        if policy == "follow":  # never stat one of our own mounts (ELOOP)
            follow.check_mount(fd, follow.mnt_id(pfd))
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            if policy == "follow":
                # The client sees the target (lstat fallback when broken),
                # resolved by runtime/ops/follow.py: never through our own mount.
                try:
                    tfd = follow.open_target(pfd, name)
                except OSError:
                    pass
                else:
                    os.close(fd)
                    fd = tfd
                    st = os.fstat(fd)
            elif policy == "deny" and _leaves_root(pfd, fd, root):
                raise FsError(errno.EACCES, "symlink points outside the root")
            # opaque: a link is an object like any other, whatever its target
            # says. The server never follows one (every object is reached
            # through an O_PATH fd beneath the root), so the text leads the
            # server nowhere; the client resolves it in its own namespace.
        dup = os.dup(fd) if want_dup and stat.S_ISDIR(st.st_mode) else -1
        return fd, st, dup
    except BaseException:
        os.close(fd)
        raise


def _leaves_root(pfd: int, fd: int, root: bytes) -> bool:
    """Whether the symlink behind the O_PATH fd (found in the directory pfd),
    read as text, would lead out of the root. The text is read through fd, so
    it is that link's, not whatever the name holds by now.

    Decided lexically (`--symlinks deny`): the target is read, never resolved,
    so nothing outside the root (this server's own mount included) is looked
    at. An absolute target must name the root or lie beneath its path; a
    relative one may not climb with ".." above the root from the parent's
    place in it. A link through another link is refused at that link's own
    LOOKUP: the client resolves one component at a time, each checked here.
    A parent no longer beneath the root counts as the root itself (stricter).
    """
    base = root.rstrip(b"/")
    try:
        target = os.fsencode(os.readlink("", dir_fd=fd))
    except OSError:
        return False
    if target.startswith(b"/"):
        if base and target != base and not target.startswith(base + b"/"):
            return True
        parts, depth = target[len(base) :].split(b"/"), 0
    else:
        try:
            parent = os.readlink(proc_fd(pfd))
        except OSError:
            parent = b""
        depth = 0
        if base and parent.startswith(base + b"/"):
            depth = len([c for c in parent[len(base) + 1 :].split(b"/") if c])
        elif not base and parent.startswith(b"/"):
            depth = len([c for c in parent.split(b"/") if c])
        parts = target.split(b"/")
    for c in parts:
        if c == b"..":
            depth -= 1
            if depth < 0:
                return True
        elif c and c != b".":
            depth += 1
    return False


def _creator(fs: Filesystem, ctx: RequestContext) -> creds.Creds | None:
    """Who a create op (mkdir, mknod, symlink, create, link) runs as: the
    requester, on both transports, so the new object is theirs from birth and
    nothing is chowned after the fact (runtime/ops/creds.py). None: as the server
    (a request by the server's own uid/gid, or a server that is not root).
    Supplementary groups only for a host process (/dev/fuse)."""
    if not creds.needed(fs.euid, fs.egid, ctx.uid, ctx.gid):
        return None
    return creds.Creds(ctx.uid, ctx.gid, ctx.pid if fs.host_callers else 0)


def _caller(fs: Filesystem, ctx: RequestContext) -> creds.Creds | None:
    """Who a change to a name or an object (unlink, rmdir, rename, setattr,
    open, setxattr, removexattr) runs as: over /dev/fuse the requesting host
    process, so the host kernel makes the permission decision (sticky
    directories, protected hardlinks, ownership); over virtio-fs the server."""
    return _creator(fs, ctx) if fs.host_callers else None


def _kill_gid(c: creds.Creds | None, gid: int) -> int:
    """kill_gid for an O_TRUNC open or a truncate: -1 when the syscall runs as
    an unprivileged requester, for the host kernel then drops the set-ID bits
    itself (and a chmod by a writer who is not the owner would fail)."""
    return -1 if c is not None and c.uid != 0 else gid


def _fix_mode(fd: int, want: int, umask_proc: int, kind: str) -> None:
    """Undo this process's umask: the client's mode & ~umask is what it asked for.

    fd was opened by name after mkdir/mknod: only an object of the kind just
    made that is owned by this thread's fsuid is changed (never another's
    object swapped in under the name meanwhile).
    """
    if not want & umask_proc:
        return
    st = os.fstat(fd)
    fmt = stat.S_IFDIR if kind == "dir" else stat.S_IFMT(want) or stat.S_IFREG
    if stat.S_IFMT(st.st_mode) != fmt or st.st_uid != creds.getfsuid():
        return
    os.chmod(proc_fd(fd), want & 0o7777)




def _kill_suidgid(fd: int, gid: int) -> None:
    """Drop the set-ID bits a write or truncate by an unprivileged process drops
    on a kernel filesystem: set-user-ID always; set-group-ID when the file is
    group-executable, or when the writer (primary group `gid`) is not in the
    file's group. Supplementary groups are not in a FUSE request: a writer in
    the group through one of them loses the bit, erring on the safe side.

    Under HANDLE_KILLPRIV_V2 the kernel leaves this to us (and tells us when
    the writer lacks CAP_FSETID). Our own write, as root, would keep the bits;
    security.capability the host kernel drops on our write in any case.
    """
    st = os.fstat(fd)
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        return
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or st.st_gid != gid):
        kill |= stat.S_ISGID
    if kill:
        os.chmod(proc_fd(fd), stat.S_IMODE(mode) & ~kill)


def _job_write(fd: int, data: bytes | bytearray | memoryview, offset: int, kill_gid: int) -> int:
    """pwrite; then, when kill_gid >= 0, drop set-ID bits for that writer."""
    n = os.pwrite(fd, data, offset)
    if kill_gid >= 0:
        _kill_suidgid(fd, kill_gid)
    return n


def _job_make(
    pfd: int, name: bytes, kind: str, mode: int, rdev: int, target: bytes, umask_proc: int
) -> tuple[int, os.stat_result]:
    """mkdir / mknod / symlink, then O_PATH + stat of the new object (as the
    requester: _creator)."""
    if kind == "dir":
        os.mkdir(name, mode, dir_fd=pfd)
    elif kind == "node":
        os.mknod(name, mode, rdev, dir_fd=pfd)
    else:
        os.symlink(target, name, dir_fd=pfd)
    with OwnedFd(os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)) as fd:
        if kind != "symlink":
            _fix_mode(fd.fd, mode, umask_proc, kind)
        st = os.fstat(fd.fd)
        return fd.release(), st


def _job_create(
    pfd: int, name: bytes, mode: int, flags: int, umask_proc: int, kill_gid: int = -1,
    want_dup: bool = False,
) -> tuple[int, int, os.stat_result, int]:
    """Exclusive create (the client's O_EXCL is honoured; a stale negative dentry
    in the client's cache that meets a file created on the host opens it): the
    open fd, an O_PATH fd and stat of the file, and (want_dup) a dup of the
    O_PATH fd for the watcher."""
    base = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW
    created = True
    try:
        fd = os.open(name, base | os.O_CREAT | os.O_EXCL, mode, dir_fd=pfd)
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        created = False
        fd = _open_existing(pfd, name, base, kill_gid if flags & os.O_TRUNC else -1)
    with OwnedFd(fd) as opened, OwnedFd(os.open(proc_fd(fd), os.O_PATH | os.O_CLOEXEC)) as opath:
        if created:  # fd is the file O_EXCL made: no check needed
            _fix_mode(opath.fd, stat.S_IFREG | mode, umask_proc, "node")
        st = os.fstat(opath.fd)
        dup = os.dup(opath.fd) if want_dup else -1
        return opened.release(), opath.release(), st, dup


def _job_lookup_many(
    pfd: int, names: list[bytes], policy: str, root: bytes, want_dup: bool
) -> list[tuple[bytes, int, os.stat_result | None, int]]:
    out: list[tuple[bytes, int, os.stat_result | None, int]] = []
    for name in names:
        try:
            out.append((name, *_job_lookup(pfd, name, policy, root, want_dup)))
        except (OSError, FsError):
            out.append((name, -1, None, -1))
    return out


def _job_setattr(
    fd: int, is_handle: bool, kind: int, s: Any, umask_proc: int, gid_of_caller: int = -1
) -> os.stat_result:
    valid = s.valid
    path: int | bytes = fd if is_handle else proc_fd(fd)
    if valid & FATTR_MODE:
        if kind == KIND_SYMLINK and not is_handle:
            raise FsError(errno.EOPNOTSUPP)  # Linux has no lchmod
        os.chmod(path, s.mode & 0o7777)
    if valid & (FATTR_UID | FATTR_GID):
        uid = s.uid if valid & FATTR_UID else -1
        gid = s.gid if valid & FATTR_GID else -1
        syscalls.fchownat(fd, b"", uid, gid, syscalls.AT_EMPTY_PATH | syscalls.AT_SYMLINK_NOFOLLOW)
    if valid & FATTR_SIZE:
        if kind == KIND_DIR:
            raise FsError(errno.EISDIR)
        if kind != 0 and not is_handle:
            raise FsError(errno.EINVAL)
        os.truncate(path, s.size)
    if valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW):
        omit = (0, syscalls.UTIME_OMIT)
        now = (0, syscalls.UTIME_NOW)
        at = now if valid & FATTR_ATIME_NOW else (s.atime, s.atimensec) if valid & FATTR_ATIME else omit
        mt = now if valid & FATTR_MTIME_NOW else (s.mtime, s.mtimensec) if valid & FATTR_MTIME else omit
        syscalls.utimensat(fd, b"", at, mt, syscalls.AT_EMPTY_PATH | syscalls.AT_SYMLINK_NOFOLLOW)
    if valid & FATTR_KILL_SUIDGID and not valid & FATTR_MODE and kind == KIND_FILE and gid_of_caller >= 0:
        _kill_suidgid(fd, gid_of_caller)  # a truncate (or chown) by an unprivileged process
    return os.fstat(fd)


def _fsync_fd(fd: int, datasync: bool) -> None:
    if datasync:
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def _job_xattr(fd: int, kind: int, fn: Callable[..., T], *args: Any) -> T:
    """xattr syscalls on the object behind an O_PATH fd (f*xattr refuse O_PATH).

    /proc/self/fd/N is a magic link to the object itself: following it lands
    on a symlink's own inode, never on the link's target, so a symlink gets
    what the host kernel answers for that link (ENODATA for user.*, its real
    security.* / trusted.* names), as lgetxattr(2) would.
    """
    return fn(proc_fd(fd), *args)


# --------------------------------------------------------------------------
# ops


async def _pool(
    fs: Filesystem,
    fds: Sequence[int],
    fn: Callable[..., T],
    *args: Any,
    inline: bool | None = None,
    creds: Creds | None = None,
) -> T:
    """Run a job that owns `fds`: on the loop when it cannot block (`inline`,
    by default fs.inline: runtime/host/backing_fs.py), else in the blocking pool.
    With `creds` (runtime/ops/creds.py) the job runs with those credentials on
    whichever thread runs it, restored before that thread does anything else."""
    if creds is not None:
        fn, args = _run_as, (creds, fn, *args)  # run_as(creds, fn, *args) returns fn's result
    try:
        if fs.inline if inline is None else inline:
            try:
                return fn(*args)
            finally:
                close_all(fds)
        return await fs.pool.run_owning(fds, fn, *args)
    except (OverflowError, ValueError) as e:  # absurd offsets/sizes from a client
        raise FsError(errno.EINVAL, str(e)) from None


_run_as = creds.run_as


def _watch(fs: Filesystem, nodeid: int, fd: int, is_dir: bool) -> None:
    """Hand a dup'ed O_PATH fd to the watcher (which owns it), or close it."""
    w = fs.watcher
    if w is None or fd < 0:
        if fd >= 0:
            os.close(fd)
        return
    w.watch(nodeid, fd, is_dir)


def _dir_only(dup: tuple[int, int]) -> int:
    """The fd of an inodes.dup_fd() result (fd, kind) when it is a directory's;
    for any other kind the fd is closed and the error is ENOTDIR."""
    fd, kind = dup
    if kind != KIND_DIR:
        os.close(fd)
        raise FsError(errno.ENOTDIR)
    return fd


async def lookup(
    fs: Filesystem, ctx: RequestContext, parent: int, name: bytes
) -> Entry | NegativeEntry:
    """The entry for parent/name. A name the host does not have is a
    NegativeEntry when the client caches entries (entry_timeout > 0): the
    kernel then keeps "no such name" for the entry timeout instead of asking
    again on every miss (PATH searches, build tools probing); the watcher
    invalidates it when the name appears on the host. Without entry caching,
    and for an unknown parent, it is ENOENT."""
    check_name(name)
    pfd = _dir_only(await fs.inodes.dup_fd(parent))
    try:
        fd, st, dup = await _pool(
            fs, (pfd,), _job_lookup, pfd, name, fs.config.symlinks, fs.inodes.root, fs.watcher is not None
        )
    except (OSError, FsError) as exc:
        timeout = fs.config.entry_timeout
        if timeout > 0 and linux_errno_of(exc) == errno.ENOENT:
            return NegativeEntry(timeout)
        raise
    # The table adopts fd (or closes it); a directory's dup goes to the watcher.
    if dup < 0:  # (no dup: the hot path pays for no OwnedFd)
        return _entry(fs, await fs.inodes.register(parent, name, fd, st), st)
    with OwnedFd(dup) as wfd:
        nodeid = await fs.inodes.register(parent, name, fd, st)
        _watch(fs, nodeid, wfd.release(), True)
    return _entry(fs, nodeid, st)


async def forget(fs: Filesystem, nodeid: int, nlookup: int) -> None:
    if await fs.inodes.forget(nodeid, nlookup):
        fs.page_versions.pop(nodeid, None)
        if fs.watcher is not None:
            fs.watcher.unwatch(nodeid)


async def batch_forget(fs: Filesystem, items: list[tuple[int, int]]) -> None:
    dropped = await fs.inodes.batch_forget(items)
    for nodeid in dropped:
        fs.page_versions.pop(nodeid, None)
    if fs.watcher is not None:
        for nodeid in dropped:
            fs.watcher.unwatch(nodeid)


async def getattr(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int | None = None) -> Attr:
    if fh is not None:
        fd = await fs.handles.dup_fd(fh)
    else:
        fd, _ = await fs.inodes.dup_fd(nodeid)
    st = await _pool(fs, (fd,), os.fstat, fd, inline=fs.inline_fstat)
    return Attr.from_stat(st.st_ino, st)


async def setattr(fs: Filesystem, ctx: RequestContext, nodeid: int, s: SetattrArgs) -> Attr:
    _ro(fs)
    ifd, kind = await fs.inodes.dup_fd(nodeid)
    fds: tuple[int, ...]
    if s.valid & FATTR_FH:
        with OwnedFd(ifd) as owned:
            hfd = await fs.handles.dup_fd(s.fh, want_dir=None)
            owned.release()
        fds, fd, is_handle = (ifd, hfd), hfd, True
    else:
        fds, fd, is_handle = (ifd,), ifd, False
    c = _caller(fs, ctx)
    st = await _pool(fs, fds, _job_setattr, fd, is_handle, kind, s, _proc_umask(), _kill_gid(c, ctx.gid), creds=c)
    return Attr.from_stat(st.st_ino, st)


async def readlink(fs: Filesystem, ctx: RequestContext, nodeid: int) -> bytes:
    fd, kind = await fs.inodes.dup_fd(nodeid)
    if kind != KIND_SYMLINK:
        os.close(fd)
        raise FsError(errno.EINVAL)
    return await _pool(fs, (fd,), _readlink_fd, fd)


def _readlink_fd(fd: int) -> bytes:
    return os.fsencode(os.readlink("", dir_fd=fd))


async def _make(
    fs: Filesystem,
    ctx: RequestContext,
    parent: int,
    name: bytes,
    kind: str,
    mode: int,
    rdev: int = 0,
    target: bytes = b"",
) -> Entry:
    _ro(fs)
    check_name(name)
    pfd = _dir_only(await fs.inodes.dup_fd(parent))
    fd, st = await _pool(
        fs, (pfd,), _job_make, pfd, name, kind, mode, rdev, target, _proc_umask(), creds=_creator(fs, ctx)
    )
    # The table adopts fd (or closes it: the inode cap); wfd goes to the watcher.
    with OwnedFd(fd) as owned:
        with OwnedFd(os.dup(fd) if kind == "dir" and fs.watcher is not None else -1) as wfd:
            nodeid = await fs.inodes.register(parent, name, owned.release(), st)
            _watch(fs, nodeid, wfd.release(), True)
    return _entry(fs, nodeid, st)


async def mkdir(fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, mode: int, umask: int = 0) -> Entry:
    return await _make(fs, ctx, parent, name, "dir", (mode & ~umask) & 0o7777)


async def mknod(
    fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, mode: int, rdev: int = 0, umask: int = 0
) -> Entry:
    fmt = stat.S_IFMT(mode)
    if fmt == 0:
        fmt = stat.S_IFREG
    if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        raise FsError(errno.EINVAL, f"mknod of file type {fmt:#o}")
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        # A device node is inert to the server (it opens regular files and
        # directories only); the host kernel decides who may make one
        # (CAP_MKNOD). --no-devices refuses them, but for overlayfs's whiteout
        # (c 0 0), which opens nothing anywhere.
        if not fs.config.devices and not (fmt == stat.S_IFCHR and rdev == 0):
            raise FsError(errno.EPERM, "device nodes are refused (--no-devices)")
    else:
        rdev = 0
    return await _make(fs, ctx, parent, name, "node", fmt | ((mode & ~umask) & 0o7777), rdev)


async def symlink(fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, target: bytes) -> Entry:
    if fs.config.symlinks == "deny":
        raise FsError(errno.EPERM, "symlinks are denied by policy")
    if not target or b"\0" in target:
        raise FsError(errno.EINVAL, "empty or NUL-containing symlink target")
    if len(target) >= 4096:
        raise FsError(errno.ENAMETOOLONG)
    return await _make(fs, ctx, parent, name, "symlink", 0o777, 0, target)


async def unlink(fs: Filesystem, ctx: RequestContext, parent: int, name: bytes) -> None:
    await _remove(fs, ctx, parent, name, os.unlink)


async def rmdir(fs: Filesystem, ctx: RequestContext, parent: int, name: bytes) -> None:
    await _remove(fs, ctx, parent, name, os.rmdir)


async def _remove(
    fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, fn: Callable[..., None]
) -> None:
    _ro(fs)
    check_name(name)
    pfd, _ = await fs.inodes.dup_fd(parent)
    await _pool(fs, (pfd,), _remove_at, fn, name, pfd, creds=_caller(fs, ctx))
    await fs.inodes.unlinked(parent, name)


def _remove_at(fn: Callable[..., None], name: bytes, pfd: int) -> None:
    fn(name, dir_fd=pfd)


async def rename(
    fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, newparent: int, newname: bytes, flags: int = 0
) -> None:
    _ro(fs)
    check_name(name)
    check_name(newname)
    allowed = syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE
    if flags & ~allowed or flags == allowed:
        raise FsError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
    ofd, nfd = await fs.inodes.dup_two(parent, newparent)
    await _pool(fs, (ofd, nfd), syscalls.renameat2, ofd, name, nfd, newname, flags, creds=_caller(fs, ctx))
    await fs.inodes.renamed(parent, name, newparent, newname, bool(flags & syscalls.RENAME_EXCHANGE))


async def link(fs: Filesystem, ctx: RequestContext, nodeid: int, newparent: int, newname: bytes) -> Entry:
    _ro(fs)
    if fs.config.symlinks == "deny":
        raise FsError(errno.EPERM, "links are denied by policy")
    check_name(newname)
    sfd, nfd = await fs.inodes.dup_two(nodeid, newparent)
    fd, st = await _pool(fs, (sfd, nfd), _job_link, sfd, nfd, newname, creds=_creator(fs, ctx))
    nodeid2 = await fs.inodes.register(newparent, newname, fd, st)
    return _entry(fs, nodeid2, st)


def _job_link(sfd: int, nfd: int, newname: bytes) -> tuple[int, os.stat_result]:
    # linkat through /proc/self/fd follows only the magic link, so the new name
    # links the object itself (a symlink stays a symlink: link(2) never follows).
    if stat.S_ISDIR(os.fstat(sfd).st_mode):
        raise FsError(errno.EPERM)
    os.link(proc_fd(sfd), newname, dst_dir_fd=nfd, follow_symlinks=True)
    with OwnedFd(os.open(newname, O_PATH_NOFOLLOW, dir_fd=nfd)) as fd:
        st = os.fstat(fd.fd)
        return fd.release(), st


def _open_flags(fs: Filesystem, flags: int) -> int:
    flags &= ~_OPEN_STRIP
    if fs.config.read_only and (flags & os.O_ACCMODE) != os.O_RDONLY or (fs.config.read_only and flags & os.O_TRUNC):
        raise FsError(errno.EROFS)
    if fs.config.writeback:
        # With the writeback cache the kernel reads pages of write-only files and
        # does appends itself at the offset it knows.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        flags &= ~os.O_APPEND
    return flags | os.O_CLOEXEC


def _file_open_flags(fs: Filesystem, flags: int = os.O_RDONLY) -> int:
    # NOFLUSH: FLUSH would only close a dup of the handle's fd, which releases
    # nothing (we never take POSIX locks: the kernel does locking locally), so
    # the kernel is told not to send it; one round trip less per close(2). The
    # kernel ignores it under the writeback cache, where FLUSH writes pages back.
    cache = fs.config.cache
    if cache == "never":
        return FOPEN_DIRECT_IO | FOPEN_NOFLUSH
    if cache == "always":
        return FOPEN_KEEP_CACHE | FOPEN_NOFLUSH
    if flags & os.O_ACCMODE == os.O_WRONLY and not fs.config.writeback:
        # A write-only open under "auto" gains nothing from the client's page
        # cache (the next open drops it: no KEEP_CACHE) but pays for filling
        # it: the kernel allocates and copies every page it passes on. Direct
        # I/O hands us the writer's own pages instead. (mmap needs read access,
        # so none is possible on such a file.)
        return FOPEN_DIRECT_IO | FOPEN_NOFLUSH
    return FOPEN_NOFLUSH


async def _opened(
    fs: Filesystem, fd: int, nodeid: int, oflags: int = os.O_RDONLY, st: os.stat_result | None = None
) -> Opened:
    """The handle for an opened host fd, and how the kernel is to do its I/O.

    `st` (the opened file's stat) lets a cached open keep the client's pages
    and keeps set-ID files off passthrough."""
    flags = _file_open_flags(fs, oflags)
    backing = 0
    b = fs.backing  # set only when passthrough was negotiated
    if b is not None:
        try:
            backing = b.open(fd)
        except OSError:
            backing = 0  # fall back to normal reads and writes
        if backing:
            # The kernel fails the open (EIO) on any flag outside its
            # passthrough mask: KEEP_CACHE (--cache always) among them.
            flags = (flags & FOPEN_NOFLUSH) | FOPEN_PASSTHROUGH
            if oflags & os.O_ACCMODE != os.O_RDONLY and _set_id(st if st is not None else os.fstat(fd)):
                # Passthrough writes bypass us, and the host kernel keeps the
                # bits for our privileged writer. DIRECT_IO overrides
                # PASSTHROUGH for the I/O, so this open's writes reach the
                # server (which drops the bits as a kernel filesystem does),
                # while the inode stays in passthrough mode: the kernel
                # refuses (EIO) an open without PASSTHROUGH of an inode that
                # has a backing file.
                flags |= FOPEN_DIRECT_IO
    if st is not None and fs.config.cache == "auto" and not flags & (FOPEN_DIRECT_IO | FOPEN_PASSTHROUGH):
        # Keep the client's pages when the file is as it was at the last
        # cached open of this inode (FUSE_AUTO_INVAL_DATA drops them when a
        # later GETATTR shows a change).
        # ctime too: a host change that puts the old mtime back (cp -p, tar,
        # rsync -t) cannot put the old ctime back.
        version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if fs.page_versions.get(nodeid) == version:
            flags |= FOPEN_KEEP_CACHE
        else:
            fs.page_versions[nodeid] = version
    try:
        fh = await fs.handles.add(fd, nodeid, False, backing)
    except BaseException:
        if backing and b is not None:  # backing != 0 only when b opened it
            b.close(backing)
        raise
    return Opened(fh, flags, backing)


async def open(
    fs: Filesystem, ctx: RequestContext, nodeid: int, flags: int, open_flags: int = 0
) -> Opened:
    oflags = _open_flags(fs, flags)
    c = _caller(fs, ctx)
    kill_gid = _kill_gid(c, ctx.gid) if open_flags & FUSE_OPEN_KILL_SUIDGID and oflags & os.O_TRUNC else -1
    # pin: an inode with an open handle keeps its O_PATH fd (actors/inode_table.py).
    ifd, kind = await fs.inodes.dup_fd(nodeid, pin=True)
    try:
        if kind == KIND_DIR or kind == KIND_SYMLINK:
            os.close(ifd)
            raise FsError(errno.EISDIR if kind == KIND_DIR else errno.ELOOP)
        fd, st, wfd = await _pool(
            fs, (ifd,), _job_reopen_stat, ifd, oflags, kill_gid, fs.watcher is not None, creds=c
        )
        _watch(fs, nodeid, wfd, False)
        return await _opened(fs, fd, nodeid, oflags, st)
    except BaseException:
        await fs.inodes.unpin(nodeid)
        raise


def _set_id(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_ISUID | stat.S_ISGID))


def _job_reopen_stat(
    ifd: int, flags: int, kill_gid: int = -1, want_dup: bool = False
) -> tuple[int, os.stat_result, int]:
    """The opened file, its stat, and (want_dup) a dup of ifd for the watcher.
    (try/except rather than an OwnedFd: OPEN's hot path, as _job_lookup.)"""
    fd = _reopen(ifd, flags, kill_gid)
    try:
        return fd, os.fstat(fd), os.dup(ifd) if want_dup else -1
    except BaseException:
        os.close(fd)
        raise


def _open_existing(pfd: int, name: bytes, flags: int, kill_gid: int = -1) -> int:
    """open(2) of parent/name that never opens a symlink or a special file."""
    with OwnedFd(os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)) as ifd:
        # O_NOFOLLOW would refuse the /proc/self/fd magic link itself (ELOOP);
        # the O_PATH open above already refused a symlink.
        return _reopen(ifd.fd, flags & ~os.O_NOFOLLOW, kill_gid)


def _reopen(ifd: int, flags: int, kill_gid: int = -1) -> int:
    # Regular files only: a kernel opens special files itself and never sends
    # OPEN for them, but a hostile client can, and open(2) on a FIFO blocks a
    # pool thread until a writer comes (a device open has side effects).
    mode = os.fstat(ifd).st_mode
    if not stat.S_ISREG(mode):
        err = errno.EISDIR if stat.S_ISDIR(mode) else errno.ELOOP if stat.S_ISLNK(mode) else errno.ENXIO
        raise FsError(err, "not a regular file")
    try:
        fd = os.open(proc_fd(ifd), flags)
    except PermissionError:
        if not flags & os.O_NOATIME:
            raise
        fd = os.open(proc_fd(ifd), flags & ~os.O_NOATIME)  # O_NOATIME needs ownership
    if kill_gid >= 0:  # an O_TRUNC open by an unprivileged process (KILLPRIV_V2)
        with OwnedFd(fd) as owned:
            _kill_suidgid(fd, kill_gid)
            owned.release()
    return fd


async def create(
    fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, mode: int, flags: int, umask: int = 0,
    open_flags: int = 0,
) -> tuple[Entry, Opened]:
    _ro(fs)
    check_name(name)
    oflags = _open_flags(fs, flags) | (flags & os.O_EXCL)
    pfd = _dir_only(await fs.inodes.dup_fd(parent))
    fmode = (mode & ~umask) & 0o7777
    c = _creator(fs, ctx)
    fd, ifd, st, dup = await _pool(
        fs, (pfd,), _job_create, pfd, name, fmode, oflags, _proc_umask(),
        _kill_gid(c, ctx.gid) if open_flags & FUSE_OPEN_KILL_SUIDGID else -1,
        fs.watcher is not None, creds=c,
    )
    # The table adopts ifd (or closes it); fd goes to a handle, dup to the watcher.
    with OwnedFd(fd) as owned, OwnedFd(dup) as wfd:
        nodeid = await fs.inodes.register(parent, name, ifd, st, pin=True)
        _watch(fs, nodeid, wfd.release(), False)
        owned.release()
    try:
        opened = await _opened(fs, fd, nodeid, oflags, st)
    except BaseException:
        # The client never sees this entry: give its lookup back (EMFILE at the handle cap).
        await fs.inodes.unpin(nodeid)
        await forget(fs, nodeid, 1)
        raise
    return _entry(fs, nodeid, st), opened


async def read(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, size: int) -> bytes:
    fd = await fs.handles.dup_fd(fh, want_dir=False)
    return await _pool(fs, (fd,), os.pread, fd, min(size, MAX_READ), offset)


async def write(
    fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, data: bytes | bytearray | memoryview, write_flags: int = 0
) -> int:
    fd = await fs.handles.dup_fd(fh, want_dir=False)
    kill_gid = ctx.gid if write_flags & FUSE_WRITE_KILL_SUIDGID else -1
    return await _pool(fs, (fd,), _job_write, fd, data, offset, kill_gid)


async def statfs(fs: Filesystem, ctx: RequestContext, nodeid: int) -> StatFs:
    fd, _ = await fs.inodes.dup_fd(nodeid)
    s = await _pool(fs, (fd,), os.statvfs, fd)
    return StatFs(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, min(s.f_namemax, NAME_MAX), s.f_frsize)


async def release(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, flags: int = 0) -> None:
    h = await fs.handles.remove(fh, want_dir=False)
    await fs.inodes.unpin(h.nodeid)
    if h.backing_id and fs.backing is not None:
        try:
            fs.backing.close(h.backing_id)
        except OSError:
            pass
    await _pool(fs, (h.fd,), _noop)


def _noop() -> None:
    return None


async def flush(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, lock_owner: int = 0) -> None:
    # close() of a dup releases POSIX locks of the caller, as close(2) would.
    fd = await fs.handles.dup_fd(fh, want_dir=False)
    await _pool(fs, (fd,), _noop)


async def fsync(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, datasync: bool = False) -> None:
    fd = await fs.handles.dup_fd(fh, want_dir=False)
    await _pool(fs, (fd,), _fsync_fd, fd, bool(datasync))


async def opendir(fs: Filesystem, ctx: RequestContext, nodeid: int, flags: int = 0) -> Opened:
    ifd, kind = await fs.inodes.dup_fd(nodeid, pin=True)
    try:
        with OwnedFd(ifd) as owned:
            if kind != KIND_DIR:
                raise FsError(errno.ENOTDIR)
            fd = await _pool(fs, (owned.release(),), os.open, proc_fd(ifd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = await fs.handles.add(fd, nodeid, True)
    except BaseException:
        await fs.inodes.unpin(nodeid)
        raise
    flags_out = FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE if fs.config.cache == "always" else 0
    return Opened(fh, flags_out)


async def _dir_batch(fs: Filesystem, fh: int, offset: int, size: int) -> list[tuple[int, int, int, bytes]]:
    """Host entries from cookie `offset` (runtime/ops/dirstream.py): nothing is kept per handle."""
    dfd = await fs.handles.dup_fd(fh, want_dir=True)
    return await _pool(fs, (dfd,), dirstream.read, dfd, offset, size, fh)


async def readdir(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, size: int) -> list[DirEntry]:
    out, used = [], 0
    for ino, off, t, name in await _dir_batch(fs, fh, offset, size):
        used += dirent_size(len(name))
        if used > size:
            break
        out.append(DirEntry(ino, off, t, name))
    return out


async def readdirplus(
    fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, size: int
) -> list[DirEntryPlus]:
    fit, used = [], 0
    for ent in await _dir_batch(fs, fh, offset, size):
        used += direntplus_size(len(ent[3]))
        if used > size:
            break
        fit.append(ent)
    names = [ent[3] for ent in fit if ent[3] not in (b".", b"..")]
    found: dict[bytes, Entry] = {}
    if names:
        pfd, _ = await fs.inodes.dup_fd(nodeid)
        want_dup = fs.watcher is not None
        results = await _pool(
            fs, (pfd,), _job_lookup_many, pfd, names, fs.config.symlinks, fs.inodes.root, want_dup
        )
        ok = [(n, fd, st) for n, fd, st, _ in results if fd >= 0 and st is not None]  # st: set when fd is
        nodeids = await fs.inodes.register_many(nodeid, ok) if ok else []
        for (n, _fd, st), nid in zip(ok, nodeids, strict=True):
            if nid:
                found[n] = _entry(fs, nid, st)
        for n, _fd, _st, wfd in results:
            if wfd >= 0:
                e = found.get(n)
                if e is not None:
                    _watch(fs, e.nodeid, wfd, True)
                else:
                    os.close(wfd)
    out = []
    for ino, off, t, name in fit:
        e = found.get(name)
        if e is None:  # ".", "..", or vanished/refused: a plain dirent, no lookup counted
            e = Entry(0, 0, Attr(ino, 0, 0, 0, 0, 0, 0, 0, 0, t << 12, 0, 0, 0, 0, 0), 0.0, 0.0)
        out.append(DirEntryPlus(e, DirEntry(ino, off, t, name)))
    return out


async def releasedir(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int) -> None:
    h = await fs.handles.remove(fh, want_dir=True)
    await fs.inodes.unpin(h.nodeid)
    await _pool(fs, (h.fd,), _noop)


async def fsyncdir(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, datasync: bool = False) -> None:
    fd = await fs.handles.dup_fd(fh, want_dir=True)
    await _pool(fs, (fd,), _fsync_fd, fd, bool(datasync))


async def access(fs: Filesystem, ctx: RequestContext, nodeid: int, mask: int) -> None:
    fd, _ = await fs.inodes.dup_fd(nodeid)
    st = await _pool(fs, (fd,), os.fstat, fd, inline=fs.inline_fstat)
    if mask & os.W_OK and fs.config.read_only:
        raise FsError(errno.EROFS)
    if mask == os.F_OK:
        return
    mode = st.st_mode
    if ctx.uid == 0:
        # root may read and write anything; execute needs some x bit (or a directory).
        if mask & os.X_OK and not (mode & 0o111 or stat.S_ISDIR(mode)):
            raise FsError(errno.EACCES)
        return
    if ctx.uid == st.st_uid:
        bits = (mode >> 6) & 7
    elif ctx.gid == st.st_gid:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    if mask & 7 & ~bits:
        raise FsError(errno.EACCES)


async def _xattr(
    fs: Filesystem,
    nodeid: int,
    fn: Callable[..., T],
    *args: Any,
    creds: Creds | None = None,
) -> T:
    fd, kind = await fs.inodes.dup_fd(nodeid)
    return await _pool(fs, (fd,), _job_xattr, fd, kind, fn, *args, creds=creds)


async def setxattr(fs: Filesystem, ctx: RequestContext, nodeid: int, name: bytes, value: bytes, flags: int = 0) -> None:
    _ro(fs)
    _check_xattr_name(name)
    await _xattr(fs, nodeid, os.setxattr, name, bytes(value), flags, creds=_caller(fs, ctx))


async def getxattr(fs: Filesystem, ctx: RequestContext, nodeid: int, name: bytes, size: int) -> XattrReply:
    _check_xattr_name(name)
    return _sized(await _xattr(fs, nodeid, os.getxattr, name), size)


async def listxattr(fs: Filesystem, ctx: RequestContext, nodeid: int, size: int) -> XattrReply:
    names = await _xattr(fs, nodeid, os.listxattr)
    if ctx.uid != 0:  # the host lists trusted.* to CAP_SYS_ADMIN only; the FUSE client never filters
        names = [n for n in names if not n.startswith("trusted.")]
    return _sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)


def _sized(value: bytes, size: int) -> XattrReply:
    """The xattr size rule: size 0 asks for the size only; a value that does not
    fit the caller's buffer is ERANGE."""
    if size == 0:
        return XattrReply(len(value))
    if len(value) > size:
        raise FsError(errno.ERANGE)
    return XattrReply(len(value), value)


async def removexattr(fs: Filesystem, ctx: RequestContext, nodeid: int, name: bytes) -> None:
    _ro(fs)
    _check_xattr_name(name)
    await _xattr(fs, nodeid, os.removexattr, name, creds=_caller(fs, ctx))


def _check_xattr_name(name: bytes) -> None:
    if not name or b"\0" in name:
        raise FsError(errno.EINVAL)
    if len(name) > 255:
        raise FsError(errno.ERANGE)


async def fallocate(
    fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, length: int, mode: int = 0
) -> None:
    _ro(fs)
    fd = await fs.handles.dup_fd(fh, want_dir=False)
    await _pool(fs, (fd,), syscalls.fallocate, fd, mode, offset, length)


async def lseek(fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, whence: int) -> int:
    if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
        raise FsError(errno.EINVAL)
    fd = await fs.handles.dup_fd(fh, want_dir=False)
    return await _pool(fs, (fd,), os.lseek, fd, offset, whence)


async def copy_file_range(
    fs: Filesystem, ctx: RequestContext, nodeid_in: int, fh_in: int, off_in: int,
    nodeid_out: int, fh_out: int, off_out: int, length: int, flags: int = 0,
) -> int:  # fmt: skip
    _ro(fs)
    if flags:
        raise FsError(errno.EINVAL)
    fin = await fs.handles.dup_fd(fh_in, want_dir=False)
    with OwnedFd(fin) as owned:
        fout = await fs.handles.dup_fd(fh_out, want_dir=False)
        owned.release()
    return await _pool(fs, (fin, fout), os.copy_file_range, fin, fout, min(length, MAX_IO), off_in, off_out)


_UMASK: int | None = None


def _proc_umask() -> int:
    """This process's umask (read once; the CLI sets 0, an embedder may not)."""
    global _UMASK
    if _UMASK is None:
        # /proc (Linux 4.7+) reads it without the set-and-restore that would
        # briefly change it for every thread of an embedding program.
        try:
            with builtins.open("/proc/self/status") as f:
                _UMASK = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0)
            os.umask(_UMASK)
    return _UMASK


__all__ = [
    "FUSE_ROOT_ID", "NO_FH", "access", "batch_forget", "check_name", "copy_file_range", "create",
    "fallocate", "flush", "forget", "fsync", "fsyncdir", "getattr", "getxattr", "link",
    "listxattr", "lookup", "lseek", "mkdir", "mknod", "open", "opendir", "read", "readdir",
    "readdirplus", "readlink", "release", "releasedir", "removexattr", "rename", "rmdir",
    "setattr", "setxattr", "statfs", "symlink", "unlink", "write",
]  # fmt: skip
