"""The server's own cost per op, without the kernel: frames straight into the dispatcher.

`python3 -m bench.microbench [--n N] [--concurrency C] [--profile out.html]`

Builds FUSE request frames with protocol.encode_request, submits them to a
Dispatcher over a real Filesystem on a directory (tmpfs by default), and times
how many of each op it answers per second with C requests in flight (C=1 is
one synchronous client, like one process doing stat() in a loop). This is the
number that bounds every FUSE figure in docs/BENCHMARKS*.md; use it (with
--profile, which needs pyinstrument) to find what is on the hot path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import tempfile
import time
from pathlib import Path

from actorfs.runtime.fuse import protocol as P  # noqa: E402
from actorfs.runtime.fuse.dispatcher import Dispatcher  # noqa: E402
from actorfs.runtime.ops.filesystem import Filesystem, FsConfig  # noqa: E402

MIB = 1 << 20


class Client:
    """A dispatcher fed frames; replies are matched to requests by unique."""

    def __init__(self, d: Dispatcher):
        self.d = d
        self.unique = 0
        self.waiting: dict[int, asyncio.Future] = {}
        self.uid, self.gid, self.pid = os.geteuid(), os.getegid(), os.getpid()

    def _send(self, iov) -> None:
        buf = P.iov_bytes(iov)
        unique = struct.unpack_from("<Q", buf, 8)[0]
        fut = self.waiting.pop(unique, None)
        if fut is not None:
            fut.set_result(buf)

    async def call(self, msg: P.Request, reply: bool = True) -> tuple[int, bytes]:
        self.unique += 2
        h = msg.h
        h.unique, h.uid, h.gid, h.pid = self.unique, self.uid, self.gid, self.pid
        fut = None
        if reply:
            fut = asyncio.get_running_loop().create_future()
            self.waiting[self.unique] = fut
        await self.d.submit(P.encode_request(msg), self._send)
        if fut is None:
            return 0, b""
        buf = await fut
        return struct.unpack_from("<i", buf, 4)[0], buf[16:]


def _h(nodeid: int = 1) -> P.InHeader:
    return P.InHeader(nodeid=nodeid)


async def _ok(c: Client, msg: P.Request) -> bytes:
    err, payload = await c.call(msg)
    if err:
        raise OSError(-err, f"{type(msg).__name__} failed")
    return payload


async def scenario(c: Client, name: str, n: int, conc: int) -> float:
    """Run `n` iterations of the named op pattern with `conc` clients: ops/s."""
    big = memoryview(os.urandom(MIB))
    setup: dict = {}
    if name in ("getattr", "lookup", "read_1m", "write_1m", "open_release"):
        payload = await _ok(c, P.Create(h=_h(), name=b"target", flags=os.O_RDWR, mode=0o100644))
        nodeid = struct.unpack_from("<Q", payload)[0]
        fh = struct.unpack_from("<Q", payload, 128)[0]
        await _ok(c, P.Write(h=_h(nodeid), fh=fh, offset=0, size=MIB, data=big))
        setup.update(nodeid=nodeid, fh=fh)

    async def one(worker: int, i: int) -> None:
        if name == "getattr":
            await _ok(c, P.Getattr(h=_h(setup["nodeid"])))
        elif name == "lookup":
            e = await _ok(c, P.Lookup(h=_h(), name=b"target"))
            await c.call(P.Forget(h=_h(struct.unpack_from("<Q", e)[0]), nlookup=1), reply=False)
        elif name == "lookup_enoent":
            await c.call(P.Lookup(h=_h(), name=b"missing"))
        elif name == "create_release":
            nm = b"c%d_%d" % (worker, i)
            p = await _ok(c, P.Create(h=_h(), name=nm, flags=os.O_WRONLY, mode=0o100644))
            nid = struct.unpack_from("<Q", p)[0]
            await _ok(c, P.Release(h=_h(nid), fh=struct.unpack_from("<Q", p, 128)[0]))
        elif name == "open_release":
            p = await _ok(c, P.Open(h=_h(setup["nodeid"]), flags=os.O_RDONLY))
            await _ok(c, P.Release(h=_h(setup["nodeid"]), fh=struct.unpack_from("<Q", p)[0]))
        elif name == "read_1m":
            await _ok(c, P.Read(h=_h(setup["nodeid"]), fh=setup["fh"], offset=0, size=MIB))
        elif name == "write_1m":
            await _ok(c, P.Write(h=_h(setup["nodeid"]), fh=setup["fh"], offset=0, size=MIB,
                                 data=big))  # fmt: skip
        else:
            raise ValueError(name)

    async def worker(w: int) -> None:
        for i in range(w, n, conc):
            await one(w, i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(conc)))
    return n / (time.perf_counter() - t0)


SCENARIOS = ["getattr", "lookup", "lookup_enoent", "open_release", "create_release",
             "read_1m", "write_1m"]  # fmt: skip


async def main_async(args) -> None:
    root = tempfile.mkdtemp(dir=args.dir)
    async with Filesystem.running(FsConfig(root=root, cache=args.cache)) as fs:
        c = Client(Dispatcher(fs))
        await _ok(c, P.Init(major=7, minor=38, max_readahead=1 << 17, flags=(1 << 32) - 1))
        names = args.only.split(",") if args.only else SCENARIOS
        for name in names:
            n = args.n // 16 if name.endswith("_1m") else args.n
            rate = await scenario(c, name, n, args.concurrency)
            unit = f"{rate * MIB / 1e6:8.0f} MB/s" if name.endswith("_1m") else ""
            print(f"{name:16s} {rate:10.0f} ops/s {1e6 / rate:8.1f} us/op {unit}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--cache", default="auto")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--only", default=None)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--profile", default=None, help="write a pyinstrument HTML profile here")
    args = ap.parse_args()
    run = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    if args.profile:
        from pyinstrument import Profiler

        with Profiler(async_mode="disabled") as prof:
            run(main_async(args))
        Path(args.profile).write_text(prof.output_html())
        print(prof.output_text(unicode=False, show_all=False)[:6000])
    else:
        run(main_async(args))


if __name__ == "__main__":
    main()
