"""Huge trees under a low fd limit (issue 15), on real mounts.

A 40,000-file tree on a private tmpfs, served by a server whose RLIMIT_NOFILE
is 1,024 (soft and hard: it cannot raise it), as root (evicted inodes reopened
by file handle) and as uid 65534 through fusermount3 (reopened by name). `ls
-lR`, `find` and `du -s` through the mount print what they print on the host,
twice, with `echo 3 > /proc/sys/vm/drop_caches` between (the kernel forgets
everything and looks it all up again), and the server's fd count stays under
the limit while its statistics show the cache evicting and reopening. Before
the fd cache the server held one fd per inode the kernel remembered and the
walk failed with "Too many open files".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.support.mount_util import REPO, env, force_unmount, is_mounted, needs_mount, wait_until

pytestmark = [needs_mount, pytest.mark.mount, pytest.mark.slow]

LIMIT = 1024
NOBODY = 65534
SETPRIV = shutil.which("setpriv")
DIRS, PER_DIR, BIG = 15, 2000, 10_000  # 40,000 files: 15 x 2,000 plus one of 10,000

# Started as root (the interpreter may live where uid 65534 cannot read it),
# the launcher imports everything the server needs, takes the fd limit, drops
# to the given uid when asked, and runs the CLI.
LAUNCHER = """
import importlib, os, pkgutil, resource, sys
repo, limit, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import actorfs  # this checkout's (PYTHONPATH, from env())
for m in pkgutil.walk_packages(actorfs.__path__, "actorfs."):
    importlib.import_module(m.name)
for name in ("uvloop", "encodings.idna"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
if uid:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
from actorfs.runtime.cli.main import main
sys.exit(main(sys.argv[4:]))
"""

WALK = "ls -lR . ; echo '== find'; find . | sort ; echo '== du'; du -s ."


@pytest.fixture(scope="module")
def huge_tree():
    """(base, src): src a private tmpfs holding the tree; base reachable by uid 65534."""
    base = tempfile.mkdtemp(prefix="actorfs-huge-")
    os.chmod(base, 0o755)
    src = os.path.join(base, "src")
    os.mkdir(src)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=256m", "tmpfs", src], check=True)
    try:
        n = 0
        for d in range(DIRS + 1):
            dpath = os.path.join(src, "big" if d == DIRS else f"d{d:02}")
            os.mkdir(dpath)
            for i in range(BIG if d == DIRS else PER_DIR):
                with open(os.path.join(dpath, f"f{i:05}"), "wb") as f:
                    if n % 97 == 0:
                        f.write(b"x" * (n % 5000))  # some blocks for du to count
                n += 1
        assert n == DIRS * PER_DIR + BIG == 40_000
        yield base, src
    finally:
        subprocess.run(["umount", "-l", src], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def walk(cwd: str, uid: int) -> str:
    # cd as the walking user: root may not enter a mount served by uid 65534
    cmd = ["sh", "-c", 'cd "$1" && ' + WALK, "walk", cwd]
    if uid:
        cmd = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=env(LC_ALL="C"), stdin=subprocess.DEVNULL)  # fmt: skip
    print(f"walk {cwd}: {time.monotonic() - t0:.1f}s")
    assert p.returncode == 0 and not p.stderr, f"walk failed ({p.returncode}): {p.stderr[:2000]}"
    return p.stdout


class FdWatch:
    """The peak of a process's fd count, polled from /proc in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                pass
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._t.join(10)
        return self.peak


@contextlib.contextmanager
def fuse_device_open_to_all():
    """/dev/fuse mode 0666 for the duration (fusermount3 opens it as the
    calling user; it is 0600 here), then its mode as it was. Runs of this test
    on one machine take turns (a lock on the device itself), so one never
    saves a mode another widened."""
    lock = os.open("/dev/fuse", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mode = stat.S_IMODE(os.fstat(lock).st_mode)
        os.chmod("/dev/fuse", 0o666)
        try:
            yield
        finally:
            os.chmod("/dev/fuse", mode)
    finally:
        os.close(lock)  # releases the lock


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_huge_tree_walks_under_1024_fds(huge_tree, who):
    if who == "nobody":
        with fuse_device_open_to_all():
            _huge_tree_walk(huge_tree, who)
    else:
        _huge_tree_walk(huge_tree, who)


def _huge_tree_walk(huge_tree, who):
    base, src = huge_tree
    uid = NOBODY if who == "nobody" else 0
    mnt = tempfile.mkdtemp(prefix=f"mnt-{who}-", dir=base)
    os.chmod(mnt, 0o755)
    if uid:
        os.chown(mnt, uid, uid)
    launcher = os.path.join(base, "launch.py")
    with open(launcher, "w") as f:
        f.write(LAUNCHER)
    proc = None
    lines: list[str] = []
    try:
        proc = subprocess.Popen(
            [sys.executable, launcher, REPO, str(LIMIT), str(uid), "mount", src, mnt, "-f"],
            env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        assert wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, 60), "no mount"
        assert proc.poll() is None, "".join(lines)
        watch = FdWatch(proc.pid)
        host = walk(src, uid)
        assert host.count("\n") > 40_000
        try:
            for _ in range(2):
                got = walk(mnt, uid)
                assert got == host, _first_difference(host, got)
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
        finally:
            peak = watch.stop()
        assert 0 < peak < LIMIT, f"server fd count peaked at {peak}"
        proc.send_signal(signal.SIGUSR1)  # the statistics: the cache evicted and reopened
        assert wait_until(lambda: any("inodes:" in x for x in lines), 30), "".join(lines)
        inodes = next(x for x in lines if "inodes:" in x)
        evictions = int(inodes.split(" evictions")[0].rsplit(" ", 1)[1])
        assert evictions > 10_000, inodes
        print(f"{who}: peak {peak} fds; {inodes.strip()}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        force_unmount(mnt)


def _first_difference(want: str, got: str) -> str:
    a, b = want.splitlines(), got.splitlines()
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"line {i}: host {x!r} mount {y!r} ({len(a)} vs {len(b)} lines)"
    return f"{len(a)} host lines vs {len(b)} through the mount"
