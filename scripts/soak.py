#!/usr/bin/env python3
"""Soak: a real mount, several client processes doing a random mix of ops, for a fixed time.

    python3 -m scripts.soak --seconds 3600 --clients 8 [--stress] [--json out.json]

The server runs in this process (the embedding API, actorfs.runtime.devfuse.server.mount), so
its RSS, fd count, inode-table and handle counts are sampled directly. Each
client owns a directory (every read is checked against what it wrote: a lost
or torn write fails the run) and shares another with the others (races, errors
allowed). --stress also runs stress-ng's filesystem stressors in rotation.

At the end the clients stop, the kernel is told to drop its caches (it then
FORGETs every inode), and the figures are sampled again: RSS, fds and nodeids
must come back to where they were after warm-up. Exit status 0 when they did
and every client passed; the summary (JSON) is printed and optionally saved.
Needs root (a FUSE mount, and drop_caches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from actorfs.runtime.devfuse.server import mount  # noqa: E402
from actorfs.runtime.host.limits import raise_nofile_limit  # noqa: E402
from actorfs.runtime.ops.filesystem import FsConfig  # noqa: E402

CLIENT = r"""
import errno, json, os, random, sys, time
k, own, shared, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
rng = random.Random(k)
model = {}  # name -> bytes, for files in `own`
counts = {"ops": 0, "verified": 0, "shared_errors": 0}
end = time.monotonic() + seconds
def path(n): return os.path.join(own, n)
while time.monotonic() < end:
    counts["ops"] += 1
    op = rng.randrange(14)
    name = "f%d" % rng.randrange(30)
    if op <= 2:  # write at a random offset, maybe fsync
        data = rng.randbytes(rng.randrange(1, 20000))
        off = rng.randrange(0, 30000)
        fd = os.open(path(name), os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, data, off)
        if rng.random() < 0.2:
            os.fsync(fd)
        os.close(fd)
        old = bytearray(model.get(name, b""))
        if len(old) < off:
            old += bytes(off - len(old))
        old[off:off + len(data)] = data
        model[name] = bytes(old)
    elif op <= 4 and name in model:  # read back and verify
        with open(path(name), "rb") as f:
            got = f.read()
        if got != model[name]:
            print(json.dumps({"error": "content mismatch", "file": name, "want": len(model[name]),
                              "got": len(got)}), flush=True)
            sys.exit(1)
        counts["verified"] += 1
    elif op == 5 and name in model:  # rename within own dir
        new = "f%d" % rng.randrange(30)
        os.rename(path(name), path(new))
        model[new] = model.pop(name)
    elif op == 6 and name in model:
        os.unlink(path(name))
        del model[name]
    elif op == 7 and name in model:  # truncate
        n = rng.randrange(0, len(model[name]) + 100)
        os.truncate(path(name), n)
        model[name] = model[name][:n] + bytes(max(0, n - len(model[name])))
    elif op == 8:
        listing = set(os.listdir(own))
        want = set(model)
        if not want <= listing or any(n.startswith("f") and n not in want for n in listing):
            print(json.dumps({"error": "listing mismatch", "extra": sorted(listing - want),
                              "missing": sorted(want - listing)}), flush=True)
            sys.exit(1)
    elif op == 9 and name in model:  # xattr round trip
        v = rng.randbytes(16)
        os.setxattr(path(name), b"user.soak", v)
        if os.getxattr(path(name), b"user.soak") != v:
            print(json.dumps({"error": "xattr mismatch"}), flush=True)
            sys.exit(1)
    elif op == 10 and name in model:  # hard link and relative symlink, then gone again
        os.link(path(name), path("hl"))
        os.symlink(name, path("sl"))
        if os.readlink(path("sl")) != name or os.stat(path("hl")).st_nlink < 2:
            print(json.dumps({"error": "link mismatch"}), flush=True)
            sys.exit(1)
        os.unlink(path("hl"))
        os.unlink(path("sl"))
    else:  # the shared directory: races with the other clients, errors expected
        s = os.path.join(shared, "s%d" % rng.randrange(20))
        try:
            r = rng.randrange(5)
            if r == 0:
                with open(s, "w") as f:
                    f.write("x" * rng.randrange(100))
            elif r == 1:
                os.rename(s, os.path.join(shared, "s%d" % rng.randrange(20)))
            elif r == 2:
                os.unlink(s)
            elif r == 3:
                os.mkdir(s + "d")
            else:
                os.rmdir(s + "d")
        except OSError:
            counts["shared_errors"] += 1
for n in list(model):
    os.unlink(path(n))
print(json.dumps(counts), flush=True)
"""

STRESSORS = ["dir", "dentry", "filename", "rename", "link", "chmod", "utime", "fallocate", "xattr",
             "seek", "hdd", "readahead", "flock", "mmap"]  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def sample(server) -> dict:
    fs = server.fs
    counts = await fs.inodes.counts()
    return {
        "t": round(time.monotonic(), 1),
        "rss_mib": round(rss_bytes() / 2**20, 1),
        "fds": len(os.listdir("/proc/self/fd")),
        "inodes": counts["inodes"],
        "handles": await fs.handles.count(),
        "requests": server.dispatcher.stats()["total"],
        "errors": server.dispatcher.stats()["errors"],
    }


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


async def stress_rotation(mnt: str, until: float, seconds: int) -> list:
    results = []
    i = 0
    while time.monotonic() < until - seconds:
        s = STRESSORS[i % len(STRESSORS)]
        i += 1
        work = os.path.join(mnt, "stress")
        await asyncio.to_thread(os.makedirs, work, exist_ok=True)
        p = await asyncio.create_subprocess_exec(
            "stress-ng", f"--{s}", "2", "--timeout", f"{seconds}s", "--verify",
            "--temp-path", work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await p.communicate()
        results.append((s, p.returncode, err.decode()[-300:] if p.returncode else ""))
    return results


async def run(args) -> dict:
    raise_nofile_limit()
    base = tempfile.mkdtemp(prefix="actorfs-soak-")
    src, mnt = os.path.join(base, "src"), os.path.join(base, "mnt")
    os.makedirs(os.path.join(src, "shared"))
    os.makedirs(mnt)
    server = await mount(FsConfig(root=src, cache=args.cache), mnt)
    samples: list = []
    summary: dict = {"seconds": args.seconds, "clients": args.clients, "cache": args.cache}
    try:
        # Nothing here touches the mount from the event loop's thread: it is the
        # thread that serves it (a blocking call on the mount would wait for itself).
        for k in range(args.clients):
            await asyncio.to_thread(os.makedirs, os.path.join(mnt, f"c{k}"))
        await asyncio.to_thread(drop_caches)
        await asyncio.sleep(1)
        baseline = await sample(server)
        until = time.monotonic() + args.seconds
        clients = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, str(k), os.path.join(mnt, f"c{k}"),
                os.path.join(mnt, "shared"), str(args.seconds),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            for k in range(args.clients)
        ]
        stress = (asyncio.ensure_future(stress_rotation(mnt, until, args.stress_seconds))
                  if args.stress else None)  # fmt: skip
        outs = asyncio.ensure_future(asyncio.gather(*(c.communicate() for c in clients)))
        while not outs.done():
            samples.append(await sample(server))
            await asyncio.wait({outs}, timeout=args.interval)
        results = outs.result()
        stress_results = await stress if stress is not None else []
        samples.append(await sample(server))
        for d in ("shared", "stress"):
            await asyncio.to_thread(shutil.rmtree, os.path.join(mnt, d), True)
        dropped = await asyncio.to_thread(drop_caches)
        # The kernel's FORGETs follow the eviction; poll (bounded) rather than
        # trust a fixed sleep on a loaded machine. A leak stays a leak.
        deadline = time.monotonic() + 30
        while True:
            await asyncio.sleep(1)
            after = await sample(server)
            settled = after["inodes"] <= baseline["inodes"] and after["handles"] == 0
            if settled or time.monotonic() > deadline:
                break
        clients_out = []
        for c, (out, err) in zip(clients, results, strict=True):
            last = (out.decode().strip().splitlines() or ["{}"])[-1]
            clients_out.append({"rc": c.returncode, "result": json.loads(last),
                                "stderr": err.decode()[-500:]})  # fmt: skip
        peak = {k: max(s[k] for s in samples) for k in ("rss_mib", "fds", "inodes", "handles")}
        summary.update(
            baseline=baseline, peak=peak, after=after, dropped_caches=dropped,
            requests=after["requests"] - baseline["requests"],
            clients_ok=all(c["rc"] == 0 for c in clients_out), client_results=clients_out,
            stress=[{"stressor": s, "rc": rc, "err": e} for s, rc, e in stress_results],
            samples=samples if args.keep_samples else samples[-5:],
        )  # fmt: skip
        summary["flat"] = {
            "inodes": after["inodes"] <= baseline["inodes"] + args.slack_inodes,
            "fds": after["fds"] <= baseline["fds"] + args.slack_inodes,
            "handles": after["handles"] == 0,
            "rss": after["rss_mib"] - baseline["rss_mib"] <= args.slack_rss_mib,
        }
        summary["ok"] = (summary["clients_ok"] and all(summary["flat"].values())
                         and all(s["rc"] == 0 for s in summary["stress"]))  # fmt: skip
    finally:
        await server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--cache", default="auto", choices=("never", "auto", "always"))
    ap.add_argument("--interval", type=float, default=1.0, help="sampling interval (s)")
    ap.add_argument("--stress", action="store_true", help="also rotate stress-ng stressors")
    ap.add_argument("--stress-seconds", type=int, default=20)
    ap.add_argument("--slack-inodes", type=int, default=8)
    ap.add_argument("--slack-rss-mib", type=float, default=64)
    ap.add_argument("--keep-samples", action="store_true")
    ap.add_argument("--json", help="write the summary here too")
    args = ap.parse_args()
    summary = asyncio.run(run(args))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
