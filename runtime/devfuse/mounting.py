"""Mounting and unmounting a FUSE filesystem on the host.

As root we open /dev/fuse and call mount(2) ourselves; otherwise the setuid
helper fusermount3 mounts and hands the /dev/fuse fd back over a unix socket
(the _FUSE_COMMFD protocol, SCM_RIGHTS). Every user mistake becomes a
`MountError` whose message is one line naming the thing and the fix.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass

log = logging.getLogger("actorfs.mount")

FUSE_DEVICE = "/dev/fuse"
FUSECTL_DIR = "/sys/fs/fuse/connections"
FSTYPE = "fuse.actorfs"
SUBTYPE = "actorfs"

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
# The VFS flags a mount may ask for beyond nosuid,nodev (always set): mount(2)'s
# bit, and fusermount3's option of the same name.
MOUNT_FLAGS = {"noexec": MS_NOEXEC, "sync": MS_SYNCHRONOUS, "dirsync": MS_DIRSYNC,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME}  # fmt: skip
MNT_DETACH = 2


class MountError(Exception):
    """A mount/unmount failure the user can fix; str() is one line."""


@dataclass
class Mount:
    """A live mount: the /dev/fuse fd the kernel talks to and where it sits."""

    fd: int
    mountpoint: str
    source: str
    by_fusermount: bool
    # kernel dev_t of the superblock: the name of its /sys/fs/fuse/connections dir
    conn: int | None = None


_libc: ctypes.CDLL | None = None


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.mount.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
        ]  # fmt: skip
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


# -- /proc/self/mountinfo ---------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass
class MountInfo:
    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields, tail = left.split(" "), right.split(" ")
            if len(fields) < 5 or len(tail) < 2:
                continue
            major, _, minor = fields[2].partition(":")
            entries.append(
                MountInfo(
                    int(major), int(minor), _unescape_mountinfo(fields[4]), tail[0],
                    _unescape_mountinfo(tail[1]),
                )
            )  # fmt: skip
    return entries


def canonical_mountpoint(path: str) -> str:
    """Canonical path of `path` without stat-ing `path` itself.

    Resolving a live FUSE mountpoint asks its server (GETATTR), which blocks
    until INIT and deadlocks when the asking process is the server.
    """
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def is_mountpoint(path: str) -> bool:
    real = canonical_mountpoint(path)
    return any(m.mountpoint == real for m in mountinfo())


def find_connection(mountpoint: str) -> int | None:
    """The fusectl connection number of the topmost FUSE mount on `mountpoint`.

    `mountpoint` must already be canonical: resolving it would stat the new
    mount, which blocks until FUSE_INIT is answered.
    """
    conn = None
    for m in mountinfo():
        if m.mountpoint == mountpoint and m.fstype.startswith("fuse"):
            conn = (m.major << 20) | m.minor  # the kernel's internal dev_t encoding
    return conn


# -- checks -----------------------------------------------------------------


def check_source(src: str) -> str:
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise MountError(
            f"source directory {src} does not exist: create it or pass another path"
        ) from None
    except PermissionError:
        raise MountError(
            f"source directory {src} is not accessible: check its permissions"
        ) from None
    except OSError as exc:
        raise MountError(f"source directory {src}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"source {src} is not a directory: pass a directory to serve")
    return os.path.realpath(src)


def check_mountpoint(mnt: str) -> tuple[str, int]:
    """Canonical mountpoint and its file type bits, or MountError."""
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise MountError(
            f"mountpoint {mnt} does not exist: create it with mkdir -p {mnt}"
        ) from None
    except PermissionError:
        raise MountError(f"mountpoint {mnt} is not accessible: check its permissions") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"mountpoint {mnt} is a dead FUSE mount: clean it up with umount -l {mnt}"
            ) from None
        raise MountError(f"mountpoint {mnt}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mnt} is not a directory: pass an empty directory")
    real = os.path.realpath(mnt)
    if is_mountpoint(real):
        raise MountError(
            f"mountpoint {mnt} is already a mount point: unmount it first (umount {mnt})"
        )
    return real, stat.S_IFMT(st.st_mode)


def check_nesting(src: str, mnt: str) -> None:
    """Refuse a mountpoint strictly inside the served directory (both canonical).

    The server would reach its own mount through the root and hold it busy
    (lookups of the mountpoint would cross into the mount it serves).
    """
    if mnt != src and mnt.startswith(src.rstrip("/") + "/"):
        raise MountError(
            f"mountpoint {mnt} is inside the source directory {src}: pick a mountpoint outside it"
        )


def check_device() -> None:
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(f"{FUSE_DEVICE} does not exist: load the fuse module (modprobe fuse)")


def fusermount_path() -> str | None:
    return shutil.which("fusermount3")


# -- mount ------------------------------------------------------------------


def _escape_opt(value: str) -> str:
    # fusermount3 splits -o on commas; backslash escapes them (as libfuse does).
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _common_options(allow_other: bool) -> list[str]:
    # Only the mounting user may enter a mount without allow_other, and our
    # host syscalls already run with that user's rights (as root, with root's),
    # so the host enforces permissions. default_permissions would only add a
    # GETATTR of the directory after every create, unlink or rename in it (the
    # kernel drops the directory's attributes and must re-check its mode).
    # With allow_other, other users' requests are checked by the kernel.
    if allow_other:
        return ["default_permissions", "allow_other"]
    return []


def mount(
    src: str,
    mnt: str,
    *,
    allow_other: bool = False,
    read_only: bool = False,
    use_fusermount: bool | None = None,
    flags: tuple[str, ...] = (),
) -> Mount:
    """Mount a FUSE filesystem serving `src` on `mnt`; returns the /dev/fuse fd.

    `use_fusermount` forces the unprivileged path (None: only when not root).
    `flags` are names from MOUNT_FLAGS (noexec, sync, ...), on top of nosuid,nodev.
    The kernel queues FUSE_INIT right away; the caller must answer it.
    """
    src = check_source(src)
    check_device()
    real, rootmode = check_mountpoint(mnt)
    check_nesting(src, real)
    if use_fusermount is None:
        use_fusermount = os.geteuid() != 0
    unknown = [f for f in flags if f not in MOUNT_FLAGS]
    if unknown:
        raise MountError(f"unknown mount flag {unknown[0]!r}: use {', '.join(MOUNT_FLAGS)}")
    source = f"actorfs:{src}"
    if use_fusermount:
        m = _mount_fusermount(source, real, allow_other=allow_other, read_only=read_only,
                              flags=flags)
    else:
        m = _mount_syscall(source, real, rootmode, allow_other=allow_other, read_only=read_only,
                           flags=flags)
    m.conn = find_connection(real)
    return m


def _open_device() -> int:
    try:
        return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise MountError(
            f"no permission to open {FUSE_DEVICE}: run as root or install fuse3 (apt-get install fuse3)"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise MountError(
                f"{FUSE_DEVICE} has no driver: load the fuse module (modprobe fuse)"
            ) from None
        raise MountError(f"cannot open {FUSE_DEVICE}: {exc.strerror}") from None


def _mount_syscall(
    source: str, mnt: str, rootmode: int, *, allow_other: bool, read_only: bool,
    flags: tuple[str, ...] = (),
) -> Mount:
    fd = _open_device()
    opts = [
        f"fd={fd}",
        f"rootmode={rootmode:o}",
        f"user_id={os.getuid()}",
        f"group_id={os.getgid()}",
        *_common_options(allow_other),
    ]
    bits = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    for f in flags:
        bits |= MOUNT_FLAGS[f]
    libc = _libc_handle()
    rc = libc.mount(
        os.fsencode(source), os.fsencode(mnt), FSTYPE.encode(), bits, ",".join(opts).encode()
    )
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fd)
        if err == errno.EPERM:
            raise MountError(
                f"no permission to mount on {mnt} (mount(2) needs CAP_SYS_ADMIN): run as root "
                "outside a restricted container, or install fuse3 (apt-get install fuse3) "
                "and run as an ordinary user"
            )
        if err == errno.ENODEV:
            raise MountError(
                "the kernel has no fuse filesystem type: load the fuse module (modprobe fuse)"
            )
        raise MountError(f"mount on {mnt} failed: {os.strerror(err)}")
    return Mount(fd=fd, mountpoint=mnt, source=source, by_fusermount=False)


def _mount_fusermount(source: str, mnt: str, *, allow_other: bool, read_only: bool,
                      flags: tuple[str, ...] = ()) -> Mount:
    helper = fusermount_path()
    if helper is None:
        raise MountError(
            "fusermount3 not found and not running as root: install fuse3 (apt-get install fuse3)"
        )
    opts = ["nosuid", "nodev", *flags, *_common_options(allow_other)]
    opts += ["ro" if read_only else "rw", f"fsname={_escape_opt(source)}", f"subtype={SUBTYPE}"]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run(
            [helper, "-o", ",".join(opts), "--", mnt],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
        theirs.close()
        if proc.returncode != 0:
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise MountError(f"fusermount3 could not mount on {mnt}: {why}")
        ours.settimeout(5)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except (OSError, TimeoutError) as exc:
            raise MountError(f"fusermount3 did not pass the /dev/fuse fd: {exc}") from None
        if not fds:
            raise MountError("fusermount3 did not pass the /dev/fuse fd")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return Mount(fd=fds[0], mountpoint=mnt, source=source, by_fusermount=True)
    except subprocess.TimeoutExpired:
        raise MountError(f"fusermount3 hung while mounting on {mnt}") from None
    finally:
        ours.close()
        with contextlib.suppress(OSError):
            theirs.close()


# -- unmount / abort ----------------------------------------------------------


def unmount(mnt: str, *, by_fusermount: bool | None = None) -> bool:
    """Lazily detach the mount at `mnt`. False if nothing was mounted there."""
    if by_fusermount is None:
        by_fusermount = os.geteuid() != 0
    if by_fusermount:
        helper = fusermount_path()
        if helper is None:
            raise MountError("fusermount3 not found: install fuse3 (apt-get install fuse3)")
        proc = subprocess.run(
            [helper, "-u", "-z", "--", mnt],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
        if proc.returncode == 0:
            return True
        if any(s in proc.stderr for s in (b"not mounted", b"not found in", b"Invalid argument")):
            return False
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        raise MountError(
            f"fusermount3 could not unmount {mnt}: {why[-1] if why else proc.returncode}"
        )
    libc = _libc_handle()
    if libc.umount2(os.fsencode(mnt), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
        return False
    raise MountError(f"cannot unmount {mnt}: {os.strerror(err)}")


def _ensure_fusectl() -> bool:
    if os.path.isdir(FUSECTL_DIR) and os.listdir(FUSECTL_DIR):
        return True
    if os.geteuid() != 0 or not os.path.isdir(FUSECTL_DIR):
        return False
    libc = _libc_handle()
    rc = libc.mount(b"fusectl", FUSECTL_DIR.encode(), b"fusectl", 0, None)
    return rc == 0 or ctypes.get_errno() == errno.EBUSY


def set_read_ahead(conn: int | None, kb: int) -> bool:
    """Set the mount's readahead window (its bdi's read_ahead_kb); False if not allowed.

    The kernel gives a FUSE mount 128 KiB, and INIT can only lower that: a
    sequential reader then costs one READ round trip per 128 KiB. A larger
    window lets READs grow up to max_pages (1 MiB). Needs root.
    """
    if conn is None:
        return False
    path = f"/sys/class/bdi/{conn >> 20}:{conn & 0xFFFFF}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("cannot set %s: %s", path, exc)
        return False
    return True


def abort_connection(conn: int | None) -> bool:
    """Abort a FUSE connection so no program hangs on it (needs root and fusectl).

    Every pending and later request fails with ENOTCONN. Closing the last
    /dev/fuse fd has the same effect; this also works while fds are open.
    """
    if conn is None:
        return False
    path = os.path.join(FUSECTL_DIR, str(conn), "abort")
    if not os.path.exists(path) and not _ensure_fusectl():
        return False
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError:
        return False
    return True
