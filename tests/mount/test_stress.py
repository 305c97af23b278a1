"""Stress on a real mount: stress-ng's filesystem stressors, and many processes at once.

Each stress-ng stressor runs for a few seconds with --verify where it has it
(the total stays under about three minutes; scripts/soak.py runs them longer).
After each one the server must still be up and serving, and stress-ng must
report success. The multi-process tests check what POSIX promises: O_APPEND
records neither lost nor torn, disjoint pwrite regions intact, and listings
through the mount equal to the host's afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support import mount_util

pytestmark = [mount_util.needs_mount, pytest.mark.mount]

SECONDS = int(os.environ.get("ACTORFS_STRESS_SECONDS", "3"))
INSTANCES = 2

# stressor -> extra options (sizes kept small: the point is the ops, not the bytes)
STRESSORS = {
    "dir": [],
    "dentry": [],
    "filename": [],
    "rename": [],
    "link": [],
    "symlink": [],
    "chmod": [],
    "utime": [],
    "fallocate": ["--fallocate-bytes", "16m"],
    "seek": ["--seek-size", "16m"],
    "hdd": ["--hdd-bytes", "16m", "--hdd-write-size", "4k"],
    "readahead": ["--readahead-bytes", "16m"],
    "flock": [],
    "xattr": [],
    "mmap": ["--mmap-file", "--mmap-bytes", "16m"],
}


def stress_ng_cmd(stressor: str, path: str, seconds: int, instances: int = INSTANCES) -> list:
    return [
        "stress-ng", f"--{stressor}", str(instances), "--timeout", f"{seconds}s", "--verify",
        "--temp-path", path, "--metrics-brief", *STRESSORS[stressor],
    ]  # fmt: skip


# The source is on the disk: "inline" forces what a tmpfs source gets by default
# (syscalls on the event loop), so both request paths take the stress.
@pytest.fixture(scope="module", params=["pool", "inline"])
def mount(request, tmp_path_factory):
    if shutil.which("stress-ng") is None:
        pytest.skip("stress-ng is not installed")
    base = tmp_path_factory.mktemp(f"stress-{request.param}")
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    options = ["--inline", "always"] if request.param == "inline" else ["--inline", "never"]
    m = mount_util.CliMount(src, mnt, *options)
    m.start()
    try:
        yield src, mnt, m
    finally:
        m.stop()


def alive(m, mnt) -> None:
    assert m.proc.poll() is None, f"the server died:\n{m.stderr[-3000:]}"
    p = subprocess.run(["stat", str(mnt)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("stressor", sorted(STRESSORS))
def test_stress_ng(mount, stressor):
    src, mnt, m = mount
    work = mnt / stressor
    work.mkdir(exist_ok=True)
    p = subprocess.run(
        stress_ng_cmd(stressor, str(work), SECONDS), capture_output=True, text=True,
        timeout=SECONDS * 20 + 60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = p.stdout + p.stderr
    alive(m, mnt)
    assert p.returncode == 0 and "unsuccessful" not in out, out[-4000:]
    # stress-ng cleans up after itself: nothing it made is left, on either side
    assert sorted(os.listdir(work)) == sorted(os.listdir(src / stressor)) == []


# -- many processes ----------------------------------------------------------------------------


def test_concurrent_appends_are_neither_lost_nor_torn(mount):
    src, mnt, m = mount
    procs, records = 8, 400
    path = mnt / "appends"
    code = """
import os, sys
k = int(sys.argv[1])
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for i in range(int(sys.argv[3])):
    rec = (b"%02d:%06d:" % (k, i)).ljust(99, b"abcdefghij"[k % 10 : k % 10 + 1]) + b"\\n"
    assert os.write(fd, rec) == 100
os.close(fd)
"""
    ps = [subprocess.Popen(["python3", "-c", code, str(k), str(path), str(records)])
          for k in range(procs)]  # fmt: skip
    assert all(p.wait(120) == 0 for p in ps)
    alive(m, mnt)
    for data in (path.read_bytes(), (src / "appends").read_bytes()):
        assert len(data) == procs * records * 100
        lines = data.split(b"\n")[:-1]
        seen = set()
        for line in lines:
            k, i, fill = line.split(b":")
            ch = b"abcdefghij"[int(k) % 10 : int(k) % 10 + 1]
            assert fill == ch * len(fill), f"torn record {line[:40]!r}"
            seen.add((int(k), int(i)))
        assert seen == {(k, i) for k in range(procs) for i in range(records)}
        # each writer's own records are in its order
        for k in range(procs):
            mine = [int(line.split(b":")[1]) for line in lines if int(line[:2]) == k]
            assert mine == sorted(mine)


def test_disjoint_pwrites_from_many_processes_are_intact(mount):
    src, mnt, m = mount
    procs, blocks, bs = 6, 64, 8192
    path = mnt / "regions"
    path.write_bytes(b"")
    code = """
import os, sys, random
k, path, blocks, bs, procs = int(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])
fd = os.open(path, os.O_RDWR)
order = list(range(blocks))
random.Random(k).shuffle(order)
for b in order:
    off = (b * procs + k) * bs
    os.pwrite(fd, bytes([k + 65]) * bs, off)
    if b % 16 == 0:
        os.fsync(fd)
os.close(fd)
"""
    ps = [subprocess.Popen(["python3", "-c", code, str(k), str(path), str(blocks), str(bs),
                            str(procs)]) for k in range(procs)]  # fmt: skip
    assert all(p.wait(120) == 0 for p in ps)
    alive(m, mnt)
    for data in (path.read_bytes(), (src / "regions").read_bytes()):
        assert len(data) == procs * blocks * bs
        for n in range(procs * blocks):
            chunk = data[n * bs : (n + 1) * bs]
            assert chunk == bytes([n % procs + 65]) * bs, f"block {n} lost or torn"


def test_namespace_churn_from_many_processes_leaves_listings_equal(mount):
    src, mnt, m = mount
    top = mnt / "churn"
    top.mkdir()
    code = """
import os, random, sys
k, top = int(sys.argv[1]), sys.argv[2]
rng = random.Random(k)
for i in range(300):
    a = os.path.join(top, "n%d" % rng.randrange(40))
    b = os.path.join(top, "n%d" % rng.randrange(40))
    op = rng.randrange(6)
    try:
        if op == 0:
            with open(a, "w") as f:
                f.write("%d-%d" % (k, i))
        elif op == 1:
            os.rename(a, b)
        elif op == 2:
            os.unlink(a)
        elif op == 3:
            os.mkdir(a)
        elif op == 4:
            os.rmdir(a)
        else:
            os.listdir(top)
    except OSError:
        pass
"""
    ps = [subprocess.Popen(["python3", "-c", code, str(k), str(top)]) for k in range(8)]
    assert all(p.wait(180) == 0 for p in ps)
    alive(m, mnt)
    assert sorted(os.listdir(top)) == sorted(os.listdir(src / "churn"))
    for name in os.listdir(src / "churn"):
        host = src / "churn" / name
        via = top / name
        assert host.is_dir() == via.is_dir()
        if host.is_file():
            assert via.read_bytes() == host.read_bytes()


_EINTR_PROBE = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
path = sys.argv[1].encode()
open(path, "w").close()
os.setxattr(path, b"user.k", b"v")
signal.signal(signal.SIGALRM, lambda *a: None)  # a handler: SA_RESTART is off in Python
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
buf = ctypes.create_string_buffer(64)
st = ctypes.create_string_buffer(256)
eintr = calls = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for fn, args in ((libc.getxattr, (path, b"user.k", buf, 64)), (libc.stat, (path, st)),
                     (libc.access, (path, 4))):
        calls += 1
        if fn(*args) < 0 and ctypes.get_errno() == 4:
            eintr += 1
signal.setitimer(signal.ITIMER_REAL, 0)
print(calls, eintr)
"""


def test_signals_do_not_surface_as_eintr_from_stat_getxattr_access(mount):
    """stat(2), getxattr(2) and access(2) never fail with EINTR on a local filesystem,
    and programs do not expect it (stress-ng's xattr stressor fails on it). A signal
    while such a request is in flight makes the kernel send FUSE_INTERRUPT; answering
    a quick request with EINTR hands that EINTR to the program (fixed in 7bb2529: only
    requests stuck past a grace period are abandoned)."""
    src, mnt, m = mount
    p = subprocess.run(["python3", "-c", _EINTR_PROBE, str(mnt / "probe"), str(SECONDS)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    calls, eintr = map(int, p.stdout.split())
    assert calls > 100
    assert eintr == 0, f"{eintr} of {calls} stat/getxattr/access calls failed with EINTR"
