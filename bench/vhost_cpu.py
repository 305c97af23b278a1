"""CPU per request on the vhost-user path: `python3 -m bench.vhost_cpu [--n N] [--profile]`.

A Python vhost-user frontend (tests/support/vhost_frontend.py: what a VMM and a guest
driver do) sends FUSE requests one at a time over a split virtqueue in a memfd,
to `actorfs serve` and to virtiofsd (/usr/lib/qemu/virtiofsd, when installed),
each serving a fresh tmpfs directory. Per phase it reports the server's CPU
seconds per 1,000 requests (time on a CPU, all threads, from /proc schedstat: CPU time, not wall
time, though a loaded machine still inflates it through cache misses and
preemption). `--profile` also runs actorfs under cProfile and reports function
calls per request and the calls of interest (struct unpacking, eventfd
writes, tasks, copies out of guest memory): call counts do not depend on load.
Needs no root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from actorfs.runtime.fuse import protocol as P  # noqa: E402
from tests.support.vhost_frontend import Frontend  # noqa: E402

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
HEADER = 40  # fuse_in_header: the frontend writes its own


def body(msg) -> bytes:
    return P.encode_request(msg)[HEADER:]


def _tree(pid: int) -> list[int]:
    """pid and its descendants (virtiofsd serves from a forked child in a sandbox)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` and its descendants (schedstat: ns on a CPU)."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total / 1e9


def phases(q, n: int):
    """(name, requests, callable) per phase, each sending its requests synchronously."""
    err, payload = q.fuse(P.FUSE_CREATE, 1, body(P.Create(flags=os.O_RDWR, mode=0o100644,
                                                          name=b"target")), reply_size=4096)
    assert err == 0, err
    nodeid = int.from_bytes(payload[:8], "little")
    fh = int.from_bytes(payload[128:136], "little")
    q.fuse(P.FUSE_RELEASE, nodeid, body(P.Release(fh=fh)))

    def getattr_():
        for _ in range(n):
            assert q.fuse(P.FUSE_GETATTR, nodeid, body(P.Getattr()))[0] == 0

    def lookup():
        for _ in range(n):
            assert q.fuse(P.FUSE_LOOKUP, 1, body(P.Lookup(name=b"target")))[0] == 0

    def create_unlink():
        for i in range(n // 3):
            name = b"f%d" % i
            err, p = q.fuse(P.FUSE_CREATE, 1, body(P.Create(flags=os.O_WRONLY, mode=0o100644,
                                                            name=name)))  # fmt: skip
            assert err == 0, err
            nid = int.from_bytes(p[:8], "little")
            q.fuse(P.FUSE_RELEASE, nid, body(P.Release(fh=int.from_bytes(p[128:136], "little"))))
            assert q.fuse(P.FUSE_UNLINK, 1, body(P.Unlink(name=name)))[0] == 0

    def read_4k():
        err, p = q.fuse(P.FUSE_OPEN, nodeid, body(P.Open(flags=os.O_RDONLY)))
        h = int.from_bytes(p[:8], "little")
        for _ in range(n - 2):
            assert q.fuse(P.FUSE_READ, nodeid, body(P.Read(fh=h, offset=0, size=4096)),
                          reply_size=4096)[0] == 0  # fmt: skip
        q.fuse(P.FUSE_RELEASE, nodeid, body(P.Release(fh=h)))

    return [("getattr", n, getattr_), ("lookup", n, lookup),
            ("create+release+unlink", n // 3 * 3, create_unlink), ("read 4 KiB", n, read_4k)]


def start(cmd: list[str], sock: str, env=None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[0]} did not create {sock}: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    return proc


def run(backend: str, n: int, work: Path, profile: str | None = None) -> dict[str, float]:
    src = work / f"src-{backend}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    sock = str(work / f"{backend}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if backend == "virtiofsd":
        cmd = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={src}", "-o", "cache=auto"]
    else:
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        cmd = [sys.executable, *prof, "-m", "actorfs", "serve", str(src), "--socket", sock,
               "--once", "--cache", "auto"]  # fmt: skip
    proc = start(cmd, sock, env)
    out: dict[str, float] = {}
    try:
        fe = Frontend(sock, mem_size=64 << 20, timeout=30)
        try:
            fe.start(nqueues=2, size=256)
            q = fe.queues[1]  # the request queue (0 is hiprio)
            init = body(P.Init(major=7, minor=38, max_readahead=1 << 17,
                               flags=P.FUSE_INIT_EXT | P.FUSE_MAX_PAGES, flags2=0))  # fmt: skip
            assert q.fuse(P.FUSE_INIT, 0, init)[0] == 0
            for name, count, fn in phases(q, n):
                c0 = cpu_seconds(proc.pid)
                fn()
                out[name] = (cpu_seconds(proc.pid) - c0) / count * 1e6  # ms per 1,000
        finally:
            fe.close()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


INTERESTING = ("unpack", "unpack_from", "eventfd_write", "create_task", "read_into",
               "readinto", "tobytes", "__getitem__", "pack_into")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="requests per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    backends = ["actorfs"] + (["virtiofsd"] if os.path.exists(VIRTIOFSD) else [])
    with tempfile.TemporaryDirectory(prefix="actorfs-vhost-cpu-", dir="/dev/shm") as w:
        work = Path(w)
        res: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
        for _ in range(args.rounds):
            for b in backends:
                res[b].append(run(b, args.n, work))
        print(f"server CPU ms per 1,000 requests (medians of {args.rounds} alternating rounds, "
              f"{args.n} requests per phase, tmpfs):\n")  # fmt: skip
        names = list(res[backends[0]][0])
        print("| phase | " + " | ".join(backends) + (" | ratio |" if len(backends) > 1 else " |"))
        print("|---|" + "---|" * (len(backends) + (len(backends) > 1)))
        for ph in names:
            vals = [sorted(r[ph] for r in res[b])[len(res[b]) // 2] for b in backends]
            cells = [f"{v:.0f}" for v in vals]
            if len(vals) > 1:
                cells.append(f"{vals[0] / vals[1]:.1f}x" if vals[1] else "–")
            print(f"| {ph} | " + " | ".join(cells) + " |")
        if args.profile:
            prof = str(work / "actorfs.prof")
            run("actorfs", args.n, work, profile=prof)
            st = pstats.Stats(prof)
            total_reqs = args.n * 4
            calls = sum(v[1] for v in st.stats.values())
            print(f"\ncProfile of the actorfs server (loop thread), {total_reqs} requests + setup: "
                  f"{calls / total_reqs:.0f} Python-level function calls per request")  # fmt: skip
            rows = []
            for (file, line, fn), (_cc, nc, tt, _ct, _callers) in st.stats.items():
                if any(k in fn for k in INTERESTING) or "runtime/virtqueue" in file or "vhost" in file:
                    rows.append((nc / total_reqs, tt, f"{Path(file).name}:{line}({fn})"))
            for per, tt, name in sorted(rows, reverse=True)[:30]:
                print(f"  {per:6.2f} calls/request  {tt:6.3f} s own  {name}")
            # Own time by where it is spent: the vhost-user path, the FUSE
            # layers above it, builtins (syscalls, struct), asyncio.
            groups: dict[str, list[float]] = {}
            for (file, _line, fn), (_cc, nc, tt, _ct, _callers) in st.stats.items():
                if file == "~":
                    key = "builtins: " + (fn.split("'")[1] if "'" in fn else fn)
                else:
                    key = Path(file).name if "/runtime/" in file or "/actors/" in file else (
                        "asyncio" if "asyncio" in file else "other Python")
                g = groups.setdefault(key, [0.0, 0.0])
                g[0] += tt
                g[1] += nc
            own = sum(g[0] for g in groups.values())
            print(f"\nown time by place ({own:.2f} s in all, cProfile-inflated):")
            for key, (tt, nc) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:22]:
                print(f"  {tt / own:6.1%}  {nc / total_reqs:6.2f} calls/request  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
