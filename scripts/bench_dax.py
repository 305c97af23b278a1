"""Benchmark (not a test): read a large file through the DAX window vs. READ through the op layer.

    python3 -m scripts.bench_dax [--size-mib 256] [--chunk-kib 128] [--rounds 3]

Both paths read the same warm file in the same chunk size and copy each chunk
into a Python bytes object. The op-layer path is what a FUSE READ costs
without the transport (handle lookup + pool hop + pread); the window path is
SETUPMAPPING of the file in 2 MiB ranges (as the guest kernel does), then
plain memory reads, with no request per read.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import tempfile
import time
import uuid

from actorfs.actors.dax import DaxWindow  # noqa: E402
from actorfs.runtime.core.attrs import RequestContext  # noqa: E402
from actorfs.runtime.dax import ops as ops_dax  # noqa: E402
from actorfs.runtime.ops import ops  # noqa: E402
from actorfs.runtime.ops.filesystem import Filesystem, FsConfig  # noqa: E402

MAP_CHUNK = 2 << 20


async def bench(size: int, chunk: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "big")
        with open(path, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        fs = Filesystem(FsConfig(root=root))
        fs.dax = DaxWindow.create(f"actorfs-bench-{uuid.uuid4().hex[:8]}", size)
        ctx = RequestContext(os.geteuid(), os.getegid(), os.getpid())
        async with fs.supervisor.started(fs.actors()):
            try:
                e = await ops.lookup(fs, ctx, 1, b"big")
                fh = (await ops.open(fs, ctx, e.nodeid, os.O_RDONLY)).fh

                async def op_read() -> int:
                    n = 0
                    for off in range(0, size, chunk):
                        n += len(await ops.read(fs, ctx, e.nodeid, fh, off, chunk))
                    return n

                t0 = time.perf_counter()
                flag = ops_dax.FUSE_SETUPMAPPING_FLAG_READ
                for off in range(0, size, MAP_CHUNK):
                    n = min(MAP_CHUNK, size - off)
                    await ops_dax.setupmapping(fs, ctx, e.nodeid, fh, off, n, flag, off)
                t_map = time.perf_counter() - t0
                base = fs.dax.base_address

                def window_read() -> int:
                    n = 0
                    for off in range(0, size, chunk):
                        n += len(ctypes.string_at(base + off, min(chunk, size - off)))
                    return n

                await op_read()  # warm the page cache
                window_read()
                rows = []
                for name, run in (("op-layer READ", None), ("DAX window", window_read)):
                    best = float("inf")
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        got = await op_read() if run is None else run()
                        best = min(best, time.perf_counter() - t0)
                        assert got == size
                    rows.append((name, best))
                mib = size / (1 << 20)
                print(f"file {mib:.0f} MiB, chunk {chunk >> 10} KiB, best of {rounds}")
                for name, t in rows:
                    print(f"  {name:14s} {t * 1e3:9.1f} ms  {mib / t:9.0f} MiB/s")
                n_maps = (size + MAP_CHUNK - 1) // MAP_CHUNK
                print(f"  setupmapping   {t_map * 1e3:9.1f} ms for {n_maps} x 2 MiB ranges")
            finally:
                fs.supervisor.request_stop()
        fs.pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--chunk-kib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    asyncio.run(bench(a.size_mib << 20, a.chunk_kib << 10, a.rounds))


if __name__ == "__main__":
    main()
