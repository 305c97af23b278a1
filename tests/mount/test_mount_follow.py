"""`--symlinks follow` never waits on itself: host links that lead back through
the server's own mountpoint fail (ELOOP) in bounded time, and the mount keeps
answering (runtime/ops/follow.py).

Every access to the mount runs in a subprocess with a timeout, and the fixture
aborts the FUSE connection if anything is still stuck, so a regression fails
the test instead of hanging the suite."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time

import pytest

from actorfs.runtime.devfuse import mounting as fuse_mount
from tests.support.mount_util import CliMount, canonical, env, needs_mount, py

pytestmark = needs_mount

PAIRS = 5
TIMEOUT = 60.0  # generous: a fixed server answers in milliseconds

_STAT = r"""
import errno, os, sys
try:
    os.stat(sys.argv[1])
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
else:
    print("ok")
"""


@pytest.fixture
def follow_mount(dirs):
    """A --symlinks follow mount; on teardown, a stuck connection is aborted."""
    src, mnt = dirs
    m = CliMount(src, mnt, "--symlinks", "follow", "--cache", "never")
    m.start()
    procs: list[subprocess.Popen] = []
    binds: list[str] = []
    try:
        yield src, mnt, procs, binds
    finally:
        for b in binds:
            subprocess.run(["umount", "-l", b], capture_output=True, timeout=60)
        stuck = [p for p in procs if p.poll() is None]
        if stuck:
            fuse_mount.abort_connection(fuse_mount.find_connection(canonical(mnt)))
        for p in procs:
            with contextlib.suppress(OSError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        if m.proc is not None and m.proc.poll() is None and stuck:
            m.proc.kill()
        m.stop()


def _stat_all(paths, procs) -> dict[str, str]:
    for p in paths:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _STAT, p], env=env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )  # fmt: skip
    mine = procs[-len(paths) :]
    deadline = time.monotonic() + TIMEOUT
    out = {}
    for path, p in zip(paths, mine, strict=True):
        try:
            stdout, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            out[path] = "HUNG"
            continue
        out[path] = stdout.strip()
    return out


def test_links_through_our_own_mountpoint_fail_and_the_mount_lives(follow_mount):
    src, mnt, procs, binds = follow_mount
    for k in range(PAIRS):
        os.symlink(os.path.join(str(mnt), f"b{k}"), src / f"a{k}")
        os.symlink(os.path.join(str(mnt), f"a{k}"), src / f"b{k}")
    os.symlink(str(mnt), src / "self")  # the mountpoint itself
    os.symlink(os.path.join(str(mnt), "hello"), src / "via")  # a file, but through us
    os.symlink("../mnt/hello", src / "up")  # through ".." and the mountpoint
    os.symlink("hello", src / "plain")  # an ordinary link: followed
    paths = [str(mnt / f"{ab}{k}") for k in range(PAIRS) for ab in "ab"]
    paths += [str(mnt / "self"), str(mnt / "via"), str(mnt / "self" / "hello"), str(mnt / "up")]
    # a bind mount of the mountpoint is the same superblock
    bind = src.parent / "bind"
    bind.mkdir()
    r = subprocess.run(["mount", "--bind", str(mnt), str(bind)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    binds.append(str(bind))
    os.symlink(os.path.join(str(bind), "hello"), src / "viabind")
    paths.append(str(mnt / "viabind"))
    t0 = time.monotonic()
    got = _stat_all(paths, procs)
    print(f"{len(paths)} stats answered in {time.monotonic() - t0:.2f} s: {sorted(set(got.values()))}")
    hung = [p for p, r in got.items() if r == "HUNG"]
    assert not hung, f"stat hung on {hung}"
    wrong = {p: r for p, r in got.items() if r not in ("ELOOP", "EXDEV")}
    assert not wrong, wrong
    # the mount still answers, and an ordinary link is still followed
    r = py(f"print(open({str(mnt / 'hello')!r}).read(), end='')", timeout=TIMEOUT)
    assert r.stdout == "hi\n"
    r = py(f"print(open({str(mnt / 'plain')!r}).read(), end='')", timeout=TIMEOUT)
    assert r.stdout == "hi\n"
    assert errno.errorcode[errno.ELOOP] == "ELOOP"

