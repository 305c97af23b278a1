"""One sequence of filesystem operations, run in a child process, printing its
results as JSON: `python3 conformance_seq.py DIR UID GID GROUPS OTHER_UID`.

tests/mount/test_conformance_diff.py runs it on a mount and on a plain directory of
the same filesystem, as root and as non-root users, and diffs the outputs.
Each check records a return value, an errno name, or the lstat fields that
must match (type, permission bits, nlink, uid, gid, size, rdev) and time
relations (which of mtime/ctime an op changed). The child starts as root,
plants objects owned by root and by OTHER_UID, then drops to UID/GID/GROUPS.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import stat
import sys
import time

R: list = []
OLD = 1_000_000_000 * 10**9  # a time in the past, in ns
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100


def err(e: OSError) -> str:
    return errno.errorcode.get(e.errno, f"E{e.errno}")


def norm(v):
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, os.stat_result):
        return fields(v)
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if v is None or isinstance(v, (bool, int, str, float)):
        return v
    return type(v).__name__


def chk(name: str, fn, *a, **kw):
    try:
        v = fn(*a, **kw)
    except OSError as e:
        R.append([name, err(e)])
        return None
    except Exception as e:  # noqa: BLE001
        R.append([name, type(e).__name__])
        return None
    R.append([name, norm(v)])
    return v


def fields(st: os.stat_result) -> list:
    t = stat.S_IFMT(st.st_mode)
    kind = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
            stat.S_IFSOCK: "s", stat.S_IFCHR: "c", stat.S_IFBLK: "b"}.get(t, "?")  # fmt: skip
    return [kind, oct(stat.S_IMODE(st.st_mode)), st.st_nlink, st.st_uid, st.st_gid, st.st_size,
            st.st_rdev]  # fmt: skip


def ls(name: str, path: str):
    chk("lstat " + name, os.lstat, path)


def times(name: str, path: str, op, *a, old: bool = True, **kw):
    """Run op; record it and which of mtime/ctime of `path` it changed."""
    try:
        if old:
            os.utime(path, ns=(OLD, OLD), follow_symlinks=False)
        before = os.lstat(path)
    except OSError as e:
        R.append([name + " (setup)", err(e)])
        return
    time.sleep(0.012)  # past the timestamp granularity: a changed ctime shows
    chk(name, op, *a, **kw)
    try:
        after = os.lstat(path)
    except OSError as e:
        R.append([name + " times", err(e)])
        return
    R.append([name + " times", ("m" if after.st_mtime_ns != before.st_mtime_ns else "")
              + ("c" if after.st_ctime_ns > before.st_ctime_ns else "")])  # fmt: skip


def write_file(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o666):
    fd = os.open(path, flags, mode)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def read_file(path: str, flags: int = os.O_RDONLY) -> bytes:
    fd = os.open(path, flags)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def open_close(path: str, flags: int, mode: int = 0o666) -> str:
    os.close(os.open(path, flags, mode))
    return "ok"


def renameat2(a: str, b: str, flags: int) -> int:
    rc = libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str, at, mt, flags: int = 0) -> int:
    ts = (Timespec * 2)(Timespec(*at), Timespec(*mt))
    rc = libc.utimensat(AT_FDCWD, path.encode(), ts, flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def tstamps(path: str) -> list:
    st = os.lstat(path)
    return [st.st_atime_ns, st.st_mtime_ns]


def xlist(path: str, follow: bool = True) -> list:
    return sorted(os.listxattr(path, follow_symlinks=follow))


def plant(other: int) -> None:
    """As root: objects owned by root and by `other`, shared by every run."""
    write_file("rootfile", b"root\n", mode=0o644)
    os.chmod("rootfile", 0o644)
    write_file("secret", b"s\n", mode=0o600)
    os.chmod("secret", 0o600)
    os.mkdir("ro", 0o555)
    os.chmod("ro", 0o555)
    os.mkdir("sticky", 0o777)
    os.chmod("sticky", 0o1777)
    write_file("sticky/other", b"o\n", mode=0o666)
    os.chmod("sticky/other", 0o666)
    os.chown("sticky/other", other, other)
    os.mkdir("sgid", 0o775)
    os.chown("sgid", 0, 4243)
    os.chmod("sgid", 0o2775)
    os.symlink("rootfile", "rootlink")
    os.mkdir("otherdir", 0o755)
    os.chown("otherdir", other, other)
    os.chmod("otherdir", 0o755)


def seq(uid: int, gid: int) -> None:
    root = uid == 0
    # ---- regular files and open flags
    chk("create excl", open_close, "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    ls("f", "f")
    chk("create excl again", open_close, "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    chk("write", write_file, "f", b"hello", os.O_WRONLY)
    chk("read", read_file, "f")
    chk("O_DIRECTORY on file", open_close, "f", os.O_RDONLY | os.O_DIRECTORY)
    chk("open f/x", open_close, "f/x", os.O_RDONLY)
    chk("stat f/x", os.stat, "f/x")
    chk("mkdir f/x", os.mkdir, "f/x")
    chk("open missing", open_close, "missing", os.O_RDONLY)
    chk("create in missing dir", open_close, "nodir/x", os.O_CREAT | os.O_WRONLY)
    chk("open . O_WRONLY", open_close, ".", os.O_WRONLY)
    chk("open . O_RDONLY", open_close, ".", os.O_RDONLY)
    chk("O_TRUNC", open_close, "f", os.O_WRONLY | os.O_TRUNC)
    ls("f after trunc", "f")
    chk("write again", write_file, "f", b"abc", os.O_WRONLY)
    chk("O_APPEND", write_file, "f", b"def", os.O_WRONLY | os.O_APPEND)
    chk("read appended", read_file, "f")
    chk("O_CREAT existing", open_close, "f", os.O_CREAT | os.O_RDWR)
    ls("f final", "f")
    os.umask(0o077)
    chk("create umask 077", open_close, "f077", os.O_CREAT | os.O_WRONLY, 0o666)
    ls("f077", "f077")
    chk("mkdir umask 077", os.mkdir, "d077", 0o777)
    ls("d077", "d077")
    os.umask(0o022)
    chk("create 04755", open_close, "fsuid", os.O_CREAT | os.O_WRONLY, 0o4755)
    ls("fsuid", "fsuid")
    chk("create 0", open_close, "f0", os.O_CREAT | os.O_WRONLY, 0)
    ls("f0", "f0")
    chk("read f0", read_file, "f0")
    chk("O_NOATIME on own", open_close, "f", os.O_RDONLY | os.O_NOATIME)
    chk("O_NOATIME on rootfile", open_close, "rootfile", os.O_RDONLY | os.O_NOATIME)
    n255, n256 = "n" * 255, "n" * 256
    chk("create 255", open_close, n255, os.O_CREAT | os.O_WRONLY)
    chk("create 256", open_close, n256, os.O_CREAT | os.O_WRONLY)
    chk("stat 256", os.lstat, n256)
    chk("mkdir 256", os.mkdir, n256)
    chk("symlink 256", os.symlink, "x", n256)
    chk("rename to 256", os.rename, n255, n256)
    chk("unlink 255", os.unlink, n255)
    # ---- permissions
    chk("read rootfile", read_file, "rootfile")
    chk("write rootfile", open_close, "rootfile", os.O_WRONLY)
    chk("read secret", read_file, "secret")
    chk("create in ro", open_close, "ro/x", os.O_CREAT | os.O_WRONLY)
    chk("mkdir in ro", os.mkdir, "ro/d")
    chk("symlink in ro", os.symlink, "t", "ro/l")
    chk("mkfifo in ro", os.mkfifo, "ro/p")
    chk("chmod f 0", os.chmod, "f", 0)
    chk("read f mode 0", read_file, "f")
    chk("write f mode 0", open_close, "f", os.O_WRONLY)
    chk("chmod f 644", os.chmod, "f", 0o644)
    chk("mkdir nox", os.mkdir, "nox", 0o700)
    write_file("nox/in", b"x")
    chk("chmod nox 600", os.chmod, "nox", 0o600)
    chk("stat nox/in", os.lstat, "nox/in")
    chk("listdir nox", lambda: sorted(os.listdir("nox")))
    chk("create nox/new", open_close, "nox/new", os.O_CREAT | os.O_WRONLY)
    chk("chmod nox 700", os.chmod, "nox", 0o700)
    chk("mkdir in otherdir", os.mkdir, "otherdir/x")
    for p in ("f", "rootfile", "secret", "ro", "fsuid", "f0"):
        for m, mn in ((os.R_OK, "r"), (os.W_OK, "w"), (os.X_OK, "x")):
            chk(f"access {p} {mn}", os.access, p, m)
    # ---- directories
    chk("mkdir d", os.mkdir, "d", 0o777)
    ls("d", "d")
    chk("mkdir d again", os.mkdir, "d")
    chk("mkdir d/e", os.mkdir, "d/e", 0o755)
    ls("d with subdir", "d")
    chk("rmdir missing", os.rmdir, "missing")
    chk("rmdir f", os.rmdir, "f")
    chk("unlink d", os.unlink, "d")
    chk("rmdir d nonempty", os.rmdir, "d")
    chk("rmdir d/e/.", os.rmdir, "d/e/.")
    chk("rmdir d/e/..", os.rmdir, "d/e/..")
    chk("rename d into d/e", os.rename, "d", "d/e/d")
    chk("rename . ", os.rename, "d/e/.", "d/x")
    chk("listdir d", lambda: sorted(os.listdir("d")))
    # ---- symlinks
    targets = {"abs": "/usr/bin/env", "rel": "f", "dang": "missing", "loop1": "loop2",
               "loop2": "loop1", "up": "../../../../../../../../etc", "dlink": "d"}  # fmt: skip
    for n, t in targets.items():
        chk("symlink " + n, os.symlink, t, n)
        ls(n, n)
        chk("readlink " + n, os.readlink, n)
    chk("symlink exists", os.symlink, "x", "rel")
    chk("stat loop1", os.stat, "loop1")
    chk("open loop1", open_close, "loop1", os.O_RDONLY)
    chk("open rel NOFOLLOW", open_close, "rel", os.O_RDONLY | os.O_NOFOLLOW)
    chk("open rel", read_file, "rel")
    chk("stat abs type", lambda: stat.S_IFMT(os.stat("abs").st_mode))
    chk("stat dang", os.stat, "dang")
    chk("create through dang", open_close, "dang", os.O_CREAT | os.O_WRONLY)
    ls("made through dang", "missing")
    chk("unlink missing", os.unlink, "missing")
    chk("create excl through rel", open_close, "rel", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    chk("listdir dlink", lambda: sorted(os.listdir("dlink")))
    chk("stat dlink/e", lambda: fields(os.stat("dlink/e")))
    chk("lchown abs own", os.chown, "abs", uid, gid, follow_symlinks=False)
    chk("lchown rootlink", os.chown, "rootlink", uid, gid, follow_symlinks=False)
    ls("rootlink", "rootlink")
    chk("lutime abs", os.utime, "abs", ns=(10**9, 2 * 10**9), follow_symlinks=False)
    chk("lutime abs times", tstamps, "abs")
    chk("lutime rootlink", os.utime, "rootlink", ns=(10**9, 2 * 10**9), follow_symlinks=False)
    chk("lgetxattr abs", os.getxattr, "abs", "user.x", follow_symlinks=False)
    chk("lsetxattr abs user", os.setxattr, "abs", "user.x", b"1", follow_symlinks=False)
    chk("link abs", os.link, "abs", "abs2", follow_symlinks=False)
    ls("abs after link", "abs")
    ls("abs2", "abs2")
    chk("rename abs2", os.rename, "abs2", "abs3")
    ls("abs3", "abs3")
    chk("unlink abs3", os.unlink, "abs3")
    chk("symlink long target 4095", os.symlink, "t" * 4095, "longl")
    chk("symlink long target 4096", os.symlink, "t" * 4096, "longl2")
    ls("longl", "longl")
    chk("chmod abs follows", lambda: os.chmod("dang", 0o600))
    # ---- fifos, sockets, devices
    chk("mkfifo p", os.mkfifo, "p", 0o666)
    ls("p", "p")
    chk("open p rd nonblock", open_close, "p", os.O_RDONLY | os.O_NONBLOCK)
    chk("open p wr nonblock", open_close, "p", os.O_WRONLY | os.O_NONBLOCK)
    chk("mknod sock", os.mknod, "s", stat.S_IFSOCK | 0o644)
    ls("s", "s")
    sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        chk("bind", sk.bind, "sb")
        sk.listen(1)
        ls("sb", "sb")
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        chk("connect", c.connect, "sb")
        c.close()
    finally:
        sk.close()
    chk("mknod char", os.mknod, "c", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    ls("c", "c")
    chk("mknod block", os.mknod, "b", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    ls("b", "b")
    chk("mknod whiteout", os.mknod, "wh", stat.S_IFCHR, 0)
    ls("wh", "wh")
    chk("mknod existing", os.mknod, "p", stat.S_IFIFO | 0o600)
    for n in ("p", "s", "c", "wh"):
        chk("link " + n, os.link, n, n + "2")
        ls(n + " after link", n)
    chk("chmod p", os.chmod, "p", 0o600)
    ls("p after chmod", "p")
    chk("utime p", os.utime, "p", ns=(10**9, 3 * 10**9))
    chk("utime p times", tstamps, "p")
    chk("setxattr p user", os.setxattr, "p", "user.x", b"1")
    chk("truncate p", os.truncate, "p", 0)
    # ---- hard links
    chk("link f", os.link, "f", "f2")
    ls("f linked", "f")
    chk("link f exists", os.link, "f", "f2")
    chk("link missing", os.link, "nope", "nope2")
    chk("link d", os.link, "d", "d2")
    chk("link rootfile", os.link, "rootfile", "rootfile2")
    chk("link secret", os.link, "secret", "secret2")
    chk("link into ro", os.link, "f", "ro/f")
    chk("unlink f2", os.unlink, "f2")
    ls("f unlinked", "f")
    # ---- rename
    for n in ("ra", "rb", "rc"):
        write_file(n, n.encode())
    os.mkdir("rd")
    os.mkdir("re")
    os.mkdir("rf")
    write_file("rf/child", b"c")
    os.mkfifo("rp")
    os.symlink("ra", "rl")
    chk("rename file over file", os.rename, "ra", "rb")
    chk("read renamed", read_file, "rb")
    chk("rename file over dir", os.rename, "rb", "rd")
    chk("rename dir over file", os.rename, "rd", "rb")
    chk("rename dir over empty dir", os.rename, "rd", "re")
    chk("rename dir over nonempty", os.rename, "re", "rf")
    chk("rename missing", os.rename, "nothere", "x")
    chk("rename over symlink", os.rename, "rb", "rl")
    ls("rl", "rl")
    chk("rename fifo over file", os.rename, "rp", "rc")
    ls("rc", "rc")
    chk("rename symlink over file", os.rename, "rel", "rc")
    ls("rc now", "rc")
    chk("rename to same", os.rename, "rc", "rc")
    chk("rename file into missing dir", os.rename, "rl", "nodir/x")
    write_file("x1", b"1")
    write_file("x2", b"2")
    os.mkdir("xd")
    chk("noreplace existing", renameat2, "x1", "x2", RENAME_NOREPLACE)
    chk("noreplace new", renameat2, "x1", "x3", RENAME_NOREPLACE)
    chk("exchange file dir", renameat2, "x2", "xd", RENAME_EXCHANGE)
    ls("x2 after exchange", "x2")
    ls("xd after exchange", "xd")
    chk("exchange missing", renameat2, "x3", "xmissing", RENAME_EXCHANGE)
    chk("exchange both flags", renameat2, "x3", "x2", RENAME_EXCHANGE | RENAME_NOREPLACE)
    chk("exchange symlink fifo", renameat2, "dang", "p", RENAME_EXCHANGE)
    ls("dang now", "dang")
    # ---- sticky and setgid directories
    chk("create in sticky", open_close, "sticky/mine" + str(uid), os.O_CREAT | os.O_WRONLY)
    ls("sticky mine", "sticky/mine" + str(uid))
    chk("rename mine in sticky", os.rename, "sticky/mine" + str(uid), "sticky/mine2-" + str(uid))
    chk("unlink mine in sticky", os.unlink, "sticky/mine2-" + str(uid))
    chk("write other in sticky", write_file, "sticky/other", b"w", os.O_WRONLY)
    chk("utime now other", os.utime, "sticky/other", None)
    chk("utime set other", os.utime, "sticky/other", ns=(10**9, 10**9))
    chk("chmod other", os.chmod, "sticky/other", 0o644)
    chk("chown other", os.chown, "sticky/other", uid, gid)
    chk("setxattr other", os.setxattr, "sticky/other", "user.o", b"1")
    chk("rename other in sticky", os.rename, "sticky/other", "sticky/other2")
    chk("unlink other in sticky", os.unlink, "sticky/other")
    chk("create in sgid", open_close, "sgid/f" + str(uid), os.O_CREAT | os.O_WRONLY, 0o2755)
    ls("sgid file", "sgid/f" + str(uid))
    chk("mkdir in sgid", os.mkdir, "sgid/d" + str(uid), 0o755)
    ls("sgid dir", "sgid/d" + str(uid))
    chk("mknod in sgid", os.mkfifo, "sgid/p" + str(uid), 0o644)
    ls("sgid fifo", "sgid/p" + str(uid))
    chk("symlink in sgid", os.symlink, "t", "sgid/l" + str(uid))
    ls("sgid link", "sgid/l" + str(uid))
    # ---- chmod, chown
    chk("chmod f 640", os.chmod, "f", 0o640)
    ls("f 640", "f")
    chk("chmod rootfile", os.chmod, "rootfile", 0o600)
    chk("chmod f 2755", os.chmod, "f", 0o2755)
    ls("f 2755", "f")
    chk("chgrp f 4243", os.chown, "f", -1, 4243)
    ls("f chgrp", "f")
    chk("chmod f 2755 again", os.chmod, "f", 0o2755)
    ls("f 2755 again", "f")
    chk("chgrp f 4244", os.chown, "f", -1, 4244)
    chk("chown f other", os.chown, "f", 4242 if uid != 4242 else 65534, -1)
    chk("chown f -1 -1", os.chown, "f", -1, -1)
    chk("chmod f 6755", os.chmod, "f", 0o6755)
    chk("chown f own", os.chown, "f", uid, gid)
    ls("f after own chown", "f")
    chk("chmod f 6755 b", os.chmod, "f", 0o6755)
    chk("write setuid", write_file, "f", b"Z", os.O_WRONLY)
    ls("f after write", "f")
    chk("chmod f 6755 c", os.chmod, "f", 0o6755)
    chk("truncate setuid", os.truncate, "f", 2)
    ls("f after truncate", "f")
    chk("chmod f 644 b", os.chmod, "f", 0o644)
    # ---- utime
    chk("utime f", os.utime, "f", ns=(10**9, 2 * 10**9))
    chk("utime f times", tstamps, "f")
    chk("utime omit atime", utimensat, "f", (0, UTIME_OMIT), (5, 0))
    chk("utime omit times", tstamps, "f")
    chk("utime omit both", utimensat, "f", (0, UTIME_OMIT), (0, UTIME_OMIT))
    chk("utime omit both times", tstamps, "f")
    chk("utime now", utimensat, "f", (0, UTIME_NOW), (0, UTIME_NOW))
    chk("utime now is recent", lambda: os.lstat("f").st_mtime > time.time() - 3600)
    chk("utime rootfile now", os.utime, "rootfile", None)
    chk("utime rootfile set", os.utime, "rootfile", ns=(1, 1))
    chk("utime missing", os.utime, "missing-x", None)
    # ---- truncate
    chk("truncate f 100", os.truncate, "f", 100)
    ls("f 100", "f")
    chk("truncate f 0", os.truncate, "f", 0)
    chk("truncate d", os.truncate, "d", 0)
    chk("truncate -1", os.truncate, "f", -1)
    chk("truncate rootfile", os.truncate, "rootfile", 0)
    chk("truncate missing", os.truncate, "missing-x", 0)
    chk("ftruncate rdonly", lambda: os.ftruncate(os.open("f", os.O_RDONLY), 0))
    # ---- xattrs
    for p in ("f", "d"):
        chk(f"setxattr {p}", os.setxattr, p, "user.a", b"1")
        chk(f"getxattr {p}", os.getxattr, p, "user.a")
        chk(f"listxattr {p}", xlist, p)
        chk(f"setxattr create {p}", os.setxattr, p, "user.a", b"2", os.XATTR_CREATE)
        chk(f"setxattr replace missing {p}", os.setxattr, p, "user.b", b"2", os.XATTR_REPLACE)
        chk(f"setxattr replace {p}", os.setxattr, p, "user.a", b"3", os.XATTR_REPLACE)
        chk(f"getxattr replaced {p}", os.getxattr, p, "user.a")
        chk(f"removexattr {p}", os.removexattr, p, "user.a")
        chk(f"removexattr again {p}", os.removexattr, p, "user.a")
        chk(f"getxattr missing {p}", os.getxattr, p, "user.a")
    chk("setxattr trusted", os.setxattr, "f", "trusted.t", b"1")
    chk("getxattr trusted", os.getxattr, "f", "trusted.t")
    chk("setxattr rootfile", os.setxattr, "rootfile", "user.r", b"1")
    chk("getxattr rootfile", os.getxattr, "rootfile", "user.r")
    chk("setxattr long name", os.setxattr, "f", "user." + "x" * 251, b"1")
    chk("setxattr big value", os.setxattr, "f", "user.big", b"v" * 65537)
    chk("setxattr empty value", os.setxattr, "f", "user.e", b"")
    chk("getxattr empty value", os.getxattr, "f", "user.e")
    chk("setxattr bad ns", os.setxattr, "f", "bogus.x", b"1")
    chk("listxattr f end", xlist, "f")
    chk("getxattr follows rel", os.getxattr, "dlink", "user.a")
    # ---- time relations
    os.mkdir("t", 0o755)
    write_file("t/f", b"x")
    times("create in dir", "t", open_close, "t/new", os.O_CREAT | os.O_WRONLY)
    times("mkdir in dir", "t", os.mkdir, "t/sub")
    times("symlink in dir", "t", os.symlink, "x", "t/l")
    times("mkfifo in dir", "t", os.mkfifo, "t/p")
    times("unlink in dir", "t", os.unlink, "t/new")
    times("rmdir in dir", "t", os.rmdir, "t/sub")
    times("rename in dir", "t", os.rename, "t/l", "t/l2")
    times("rename moves file", "t/f", os.rename, "t/f", "t/g")
    times("write file", "t/g", write_file, "t/g", b"y", os.O_WRONLY)
    times("chmod file", "t/g", os.chmod, "t/g", 0o600)
    times("chown file", "t/g", os.chown, "t/g", uid, gid)
    times("link file", "t/g", os.link, "t/g", "t/h")
    times("link in dir", "t", os.link, "t/g", "t/h2")
    times("unlink link", "t/g", os.unlink, "t/h")
    times("truncate file", "t/g", os.truncate, "t/g", 10)
    times("truncate same size", "t/g", os.truncate, "t/g", 10)
    times("setxattr file", "t/g", os.setxattr, "t/g", "user.t", b"1")
    times("removexattr file", "t/g", os.removexattr, "t/g", "user.t")
    times("utime now file", "t/g", os.utime, "t/g", None)
    times("O_TRUNC open", "t/g", open_close, "t/g", os.O_WRONLY | os.O_TRUNC)
    times("read file", "t/g", read_file, "t/g")
    times("chmod fifo", "t/p", os.chmod, "t/p", 0o600)
    times("lchown symlink", "t/l2", os.chown, "t/l2", uid, gid, follow_symlinks=False)
    times("setxattr dir", "t", os.setxattr, "t", "user.t", b"1")
    # ---- xattr names that reach the filesystem on every type (ls -la asks these)
    for n in ("abs", "dang", "p", "s", "wh", "f", "d"):
        for a in ("security.selinux", "system.posix_acl_access", "trusted.t", "user.a"):
            chk(f"lgetxattr {n} {a}", os.getxattr, n, a, follow_symlinks=False)
        chk(f"llistxattr {n}", xlist, n, False)
        chk(f"lsetxattr {n} trusted", os.setxattr, n, "trusted.u", b"1", follow_symlinks=False)
        chk(f"lremovexattr {n} trusted", os.removexattr, n, "trusted.u", follow_symlinks=False)
    # ---- more permission cases
    chk("chdir nox", lambda: os.chmod("nox", 0o600) or os.chdir("nox") or os.chdir(".."))
    os.chmod("nox", 0o700)
    chk("mkdir in mode-0 dir", lambda: os.mkdir("z0") or os.chmod("z0", 0) or os.mkdir("z0/x"))
    chk("chmod z0 back", os.chmod, "z0", 0o755)
    chk("rename other's dir to new parent", os.rename, "otherdir", "d/otherdir")
    chk("rename other's dir in place", os.rename, "otherdir", "otherdir2")
    chk("excl through dangling", open_close, "dang2", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    chk("symlink dang2", os.symlink, "nowhere", "dang2")
    chk("excl through dangling 2", open_close, "dang2", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    chk("posix_fallocate", lambda: os.posix_fallocate(os.open("f", os.O_RDWR), 0, 8192))
    ls("f fallocated", "f")
    chk("unlink in ro", os.unlink, "ro/none")
    chk("rmdir ro", os.rmdir, "ro")
    chk("scandir types", lambda: sorted(
        (e.name[:40], e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
         e.is_symlink()) for e in os.scandir(".")))  # fmt: skip
    # ---- the end: listing and removal
    chk("listdir", lambda: sorted(os.listdir(".")))
    for n in sorted(os.listdir(".")):
        chk("final " + n[:40], os.lstat, n)
    chk("unlink rootfile", os.unlink, "rootfile")
    if root:
        chk("chown back", os.chown, "f", 0, 0)


def main() -> None:
    d, uid, gid, groups, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    os.chdir(d)
    os.umask(0o022)
    plant(other)
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    seq(uid, gid)
    json.dump(R, sys.stdout)


if __name__ == "__main__":
    main()
