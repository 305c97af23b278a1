"""What worker processes could give parallel metadata, measured without building them.

`python3 -m bench.parallel_bound [--rounds N]` (root): the parallel workload
(bench/workloads.py, 4 processes) against one actorfs server, and against two
independent actorfs servers with two of the processes on each. Two servers
that share nothing are the upper bound of any design with two server
processes over one tree: a shared inode table, forwarding of handles and
locks would only cost more. Rounds alternate; medians of the aggregate rate,
and native tmpfs in the same run for the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import workloads
from bench.server import ActorfsServer

PARAMS = {"files": 750, "par_files": 750, "procs": 4}


def _run(d: Path, dirs: list[Path]) -> float:
    """The parallel workload with its process i working in dirs[i]: aggregate ops/s."""
    for i, target in enumerate(dirs):
        target.mkdir(parents=True)
        (d / f"par{i}").symlink_to(target)
    try:
        return workloads.parallel(str(d), PARAMS)["all"]
    finally:
        for i in range(len(dirs)):
            (d / f"par{i}").unlink()


def one_round(work: Path, servers: int) -> float:
    srcs = [work / f"src{k}" for k in range(servers)]
    mnts = [work / f"mnt{k}" for k in range(servers)]
    for p in (*srcs, *mnts):
        p.mkdir()
    links = work / "links"
    links.mkdir()
    try:
        with contextlib.ExitStack() as stack:
            for s, m in zip(srcs, mnts, strict=True):
                stack.enter_context(ActorfsServer(s, m, []))
            procs = PARAMS["procs"]
            dirs = [mnts[i * servers // procs] / f"w{i}" for i in range(procs)]
            return _run(links, dirs)
    finally:
        for p in (*srcs, *mnts, links):
            shutil.rmtree(p, ignore_errors=True)


def native_round(work: Path) -> float:
    links = work / "links"
    links.mkdir()
    try:
        return _run(links, [work / "native" / f"w{i}" for i in range(PARAMS["procs"])])
    finally:
        shutil.rmtree(work / "native", ignore_errors=True)
        shutil.rmtree(links, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/parallel_bound.py mounts: run it as root", file=sys.stderr)
        return 2
    res: dict[str, list[float]] = {"native": [], "one server": [], "two servers": []}
    with tempfile.TemporaryDirectory(prefix="actorfs-par-bound-") as w:
        work = Path(w)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "actorfs-bench", w], check=True)
        try:
            for r in range(args.rounds):
                res["native"].append(native_round(work))
                order = ["one server", "two servers"] if r % 2 == 0 else ["two servers", "one server"]
                for name in order:
                    res[name].append(one_round(work, 1 if name == "one server" else 2))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in res.items()),
                      flush=True)  # fmt: skip
        finally:
            subprocess.run(["umount", "-l", w], check=False)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nparallel metadata, {PARAMS['procs']} processes x {PARAMS['par_files']} files, "
          f"medians of {args.rounds} alternating rounds (aggregate ops/s, ratio to native):")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:12s} {v:10,.0f}  {v / med['native']:6.1%}")
    print(f"  two servers / one server: {med['two servers'] / med['one server']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
