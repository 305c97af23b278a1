"""Cost of one credential switch + restore (runtime/ops/creds.py), in microseconds.

    sudo python3 -m bench.creds_cost [N]

Prints the median per-call time of: a bare call; run_as without
supplementary groups (a virtio-fs request); run_as with the groups read from
/proc/PID/status of a process that has the request's ids (a /dev/fuse request);
and, through the op layer, MKDIR + RMDIR by root (no switch) against the same
by uid 65534 (two switches), syscalls in the pool and inline.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

from actorfs.runtime.ops import creds  # noqa: E402


def per_call_us(fn, n: int) -> float:
    runs = []
    for _ in range(5):
        t = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t) / n / 1000)
    return statistics.median(runs)


async def op_pair_us(inline: str, who, n: int) -> float:
    import tempfile

    from actorfs.runtime.ops import ops
    from actorfs.runtime.ops.filesystem import Filesystem, FsConfig

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o777)
        async with Filesystem.running(FsConfig(root=d, inline=inline)) as fs:
            runs = []
            for _ in range(5):
                t = time.perf_counter_ns()
                for _ in range(n):
                    await ops.mkdir(fs, who, 1, b"d", 0o755)
                    await ops.rmdir(fs, who, 1, b"d")
                runs.append((time.perf_counter_ns() - t) / n / 1000)
            return statistics.median(runs)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    if not creds.available():
        sys.exit("needs root on Linux x86_64/aarch64")
    child = subprocess.Popen(["sleep", "60"], user=65534, group=65534, extra_groups=[4242, 4343])
    try:
        noop = lambda: None  # noqa: E731
        bare = per_call_us(noop, n)
        plain = creds.Creds(65534, 65534)
        grouped = creds.Creds(65534, 65534, child.pid)
        switch = per_call_us(lambda: creds.run_as(plain, noop), n)
        switch_groups = per_call_us(lambda: creds.run_as(grouped, noop), n)
    finally:
        child.kill()
        child.wait()
    print(f"bare call                 {bare:6.2f} us")
    print(f"switch + restore          {switch:6.2f} us  (+{switch - bare:.2f})")
    print(f"  with /proc groups       {switch_groups:6.2f} us  (+{switch_groups - bare:.2f})")
    from actorfs.runtime.core.attrs import RequestContext

    root, nobody = RequestContext(0, 0, 0), RequestContext(65534, 65534, 0)
    for inline in ("never", "always"):
        a = asyncio.run(op_pair_us(inline, root, n // 20))
        b = asyncio.run(op_pair_us(inline, nobody, n // 20))
        print(
            f"MKDIR+RMDIR inline={inline:6}  root {a:7.1f} us   uid 65534 {b:7.1f} us  ({b / a:.2f}x)"
        )


if __name__ == "__main__":
    main()
