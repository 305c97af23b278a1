"""Directories through a real mount: many handles on a big directory cost the
server no memory per handle, and telldir/seekdir work (runtime/ops/dirstream.py)."""

from __future__ import annotations

import os
import select
import subprocess
import sys

from tests.support.mount_util import CliMount, env, needs_mount, py, wait_until

pytestmark = needs_mount

N_ENTRIES = 5000
N_HANDLES = 400

# Opens N_HANDLES fds on one directory, reads each once, says "held", waits
# for a line on stdin, closes them all, says "closed", waits for EOF.
_HOLDER = r"""
import os, sys
d, n, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for _ in range(n)]
for fd in fds:
    assert len(os.listdir(fd)) == want
print("held", flush=True)
sys.stdin.readline()
for fd in fds:
    os.close(fd)
print("closed", flush=True)
sys.stdin.readline()
"""


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _expect(proc: subprocess.Popen, word: str, timeout: float) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"holder did not say {word!r} within {timeout}s"
    line = proc.stdout.readline().strip()
    assert line == word, f"holder said {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"


def test_many_handles_on_a_big_directory_cost_no_memory(dirs):
    src, mnt = dirs
    big = src / "big"
    big.mkdir()
    for i in range(N_ENTRIES):
        os.close(os.open(big / f"f{i:04}", os.O_CREAT | os.O_WRONLY, 0o644))
    with CliMount(src, mnt) as m:
        # warm up: the kernel looks every entry up once (READDIRPLUS)
        py(f"import os; assert len(os.listdir({str(mnt / 'big')!r})) == {N_ENTRIES}")
        base = _rss_kib(m.pid)
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(mnt / "big"), str(N_HANDLES), str(N_ENTRIES)], env=env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _expect(holder, "held", 300)
            held = _rss_kib(m.pid) - base
            holder.stdin.write("\n")
            holder.stdin.flush()
            _expect(holder, "closed", 120)
            # RELEASEDIR is asynchronous to close(2): poll with a deadline
            wait_until(lambda: _rss_kib(m.pid) - base < 4096, timeout=30)
            after = _rss_kib(m.pid) - base
        finally:
            holder.kill()
            holder.wait(30)
    print(f"server RSS: base {base} KiB, +{held} KiB held, +{after} KiB after close")
    assert held < 30 * 1024, f"server grew {held} KiB with {N_HANDLES} handles held"
    assert after < 4096, f"server kept {after} KiB after the handles closed"


# telldir/seekdir through libc on the mount: the cookie a telldir returns is
# a READDIR offset; seekdir there goes on with the same entries.
_SEEKDIR = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
class Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]
libc.opendir.restype = ctypes.c_void_p
libc.opendir.argtypes = [ctypes.c_char_p]
libc.readdir64.restype = ctypes.POINTER(Dirent)
libc.readdir64.argtypes = [ctypes.c_void_p]
libc.telldir.restype = ctypes.c_long
libc.telldir.argtypes = [ctypes.c_void_p]
libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
libc.rewinddir.argtypes = [ctypes.c_void_p]
libc.closedir.argtypes = [ctypes.c_void_p]
d = libc.opendir(sys.argv[1].encode())
assert d
def names(k=None):
    out = []
    while k is None or len(out) < k:
        e = libc.readdir64(d)
        if not e:
            break
        out.append(e.contents.d_name)
    return out
first = names(777)
pos = libc.telldir(d)
rest = names()
assert len(first) + len(rest) == int(sys.argv[2]) + 2, (len(first), len(rest))
libc.seekdir(d, pos)
assert names() == rest
libc.seekdir(d, pos)
assert names(5) == rest[:5]
libc.rewinddir(d)
assert names() == first + rest
libc.closedir(d)
print("ok")
"""


def test_telldir_seekdir_through_the_mount(dirs):
    src, mnt = dirs
    d = src / "d"
    d.mkdir()
    for i in range(2000):
        os.close(os.open(d / f"entry-{i:04}", os.O_CREAT | os.O_WRONLY, 0o644))
    with CliMount(src, mnt):
        p = subprocess.run(
            [sys.executable, "-c", _SEEKDIR, str(mnt / "d"), "2000"], env=env(),
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
