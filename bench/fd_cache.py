"""The cost of the inode table's fd cache (issue 15): eviction and reopen.

`python3 -m bench.fd_cache [--files N] [--tree N] [--limit 1024]` (root, for
the mount part and reopening by handle). Two parts, each against native on
the same tmpfs in the same run:

1. GETATTR rate at the op layer (no kernel) over a working set of N files with
   the cache at 100%, 10% and 1% of it, reopening by file handle and by name,
   beside os.stat of the same files. Uniform random access, so a cache of p%
   hits about p% of the time: the 1% line is nearly all reopens.
2. `find` over a tree of --tree files through a real mount with the server's
   fd limit at --limit (prlimit, hard and soft) and with the default limit,
   beside `find` on the host; with the server's peak RSS and fd count.

Prints a Markdown section for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from actorfs.runtime.core.attrs import RequestContext  # noqa: E402
from actorfs.runtime.ops import ops  # noqa: E402
from actorfs.runtime.ops.filesystem import Filesystem, FsConfig  # noqa: E402

CTX = RequestContext(uid=0, gid=0, pid=os.getpid())


def make_files(root: str, n: int, per_dir: int = 1000) -> list[str]:
    names = []
    for i in range(n):
        d = os.path.join(root, f"d{i // per_dir:04}")
        if i % per_dir == 0:
            os.mkdir(d)
        p = os.path.join(d, f"f{i % per_dir:04}")
        open(p, "wb").close()
        names.append(p)
    return names


async def op_rates(root: str, n: int, cache: int, handles: bool, seconds: float) -> tuple:
    """(GETATTR/s, OPEN+RELEASE/s, hit rate) over n files, random order."""
    cfg = FsConfig(root=root, fd_cache=cache, file_handles=None if handles else False, inline="always")
    async with Filesystem.running(cfg) as fs:
        dirs = {}
        nodeids = []
        for i in range(n):
            d = f"d{i // 1000:04}".encode()
            if d not in dirs:
                dirs[d] = (await ops.lookup(fs, CTX, 1, d)).nodeid
            nodeids.append((await ops.lookup(fs, CTX, dirs[d], b"f%04d" % (i % 1000))).nodeid)
        rnd = random.Random(1)
        order = [rnd.choice(nodeids) for _ in range(1 << 16)]
        s0 = fs.inodes.stats()
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for nid in order[:2000]:
                await ops.getattr(fs, CTX, nid)
            done += 2000
            order = order[2000:] + order[:2000]
        rate = done / (time.perf_counter() - t0)
        s = fs.inodes.stats()
        hits, misses = s["hits"] - s0["hits"], s["misses"] - s0["misses"]
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for nid in order[:1000]:
                o = await ops.open(fs, CTX, nid, os.O_RDONLY)
                await ops.release(fs, CTX, nid, o.fh)
            done += 1000
            order = order[1000:] + order[:1000]
        opens = done / (time.perf_counter() - t0)
        return rate, opens, hits / max(hits + misses, 1)


def native_rates(paths: list[str], seconds: float) -> tuple[float, float]:
    """(lstat/s, open+close/s) of the same files, random order."""
    rnd = random.Random(1)
    order = [rnd.choice(paths) for _ in range(1 << 16)]
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for p in order[:2000]:
            os.lstat(p)
        done += 2000
        order = order[2000:] + order[:2000]
    stats = done / (time.perf_counter() - t0)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for p in order[:1000]:
            os.close(os.open(p, os.O_RDONLY))
        done += 1000
        order = order[1000:] + order[:1000]
    return stats, done / (time.perf_counter() - t0)


class Peak:
    def __init__(self, pid: int):
        self.pid, self.fds, self.rss, self._stop = pid, 0, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.rss = max(self.rss, int(line.split()[1]) * 1024)
            except OSError:
                pass
            self._stop.wait(0.05)

    def stop(self):
        self._stop.set()
        self._t.join(5)


def mounted_find(src: str, mnt: str, limit: int | None) -> tuple[float, int, int, int, int]:
    cmd = [sys.executable, "-m", "actorfs", "mount", src, mnt, "-f"]
    if limit:
        cmd = ["prlimit", f"--nofile={limit}:{limit}", *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        for line in p.stderr:
            if "serving" in line:
                break
        else:
            raise RuntimeError(f"the server did not mount (status {p.wait()})")
        peak = Peak(p.pid)
        t0 = time.perf_counter()
        r = subprocess.run(["find", mnt], capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        peak.stop()
        return elapsed, peak.rss, peak.fds, len(r.stderr.splitlines()), r.stdout.count("\n")
    finally:
        p.terminate()
        p.wait(60)
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000, help="GETATTR working set")
    ap.add_argument("--tree", type=int, default=200_000, help="files in the find tree")
    ap.add_argument("--limit", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="actorfs-fdbench-")
    src = os.path.join(base, "src")
    os.mkdir(src)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", src], check=True)
    out = []
    try:
        paths = make_files(src, args.files)
        nstat, nopen = native_rates(paths, args.seconds)
        out.append(f"GETATTR and OPEN+RELEASE at the op layer (no kernel) over {args.files:,} "
                   f"files in random order; native lstat {nstat:,.0f}/s, open+close "
                   f"{nopen:,.0f}/s. In brackets: the ratio to native.\n")  # fmt: skip
        out.append("| cache | reopen | GETATTR/s | OPEN+RELEASE/s | hit rate |")
        out.append("|---|---|---|---|---|")
        for pct in (100, 10, 1):
            cache = max(1, args.files * pct // 100 + (8 if pct == 100 else 0))
            for handles in (True, False):
                rate, opens, hit = asyncio.run(
                    op_rates(src, args.files, cache, handles, args.seconds)
                )
                out.append(f"| {pct}% ({cache:,} fds) | {'handle' if handles else 'name'} | "
                           f"{rate:,.0f} ({rate / nstat:.3f}) | {opens:,.0f} ({opens / nopen:.3f}) "
                           f"| {hit:.0%} |")  # fmt: skip
        for d in os.listdir(src):
            shutil.rmtree(os.path.join(src, d))
        make_files(src, args.tree, per_dir=2000)
        t0 = time.perf_counter()
        entries = subprocess.run(["find", src], capture_output=True, check=True).stdout.count(b"\n")
        native_find = time.perf_counter() - t0
        mnt = os.path.join(base, "mnt")
        os.mkdir(mnt)
        out.append(f"\n`find` over {args.tree:,} files (tmpfs); native: {native_find:.2f} s.\n")
        out.append("| server fd limit | time (s, x native) | peak RSS | peak fds | errors | entries |")
        out.append("|---|---|---|---|---|---|")
        default = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        for limit in (args.limit, None):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            elapsed, rss, fds, errors, found = mounted_find(src, mnt, limit)
            out.append(f"| {limit or f'{default:,} (hard limit)'} | {elapsed:.2f} "
                       f"({elapsed / native_find:.1f}) | {rss >> 20} MiB | {fds} | {errors} "
                       f"| {found:,} of {entries:,} |")  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", src], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
