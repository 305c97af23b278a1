"""Where the time goes with parallel metadata clients: `python3 -m bench.profile_parallel`.

Four processes create/stat/rename/unlink files, each in its own directory
(bench/workloads.py `parallel`), against actorfs over a fresh tmpfs, once per
server variant, in alternating rounds. For each: the aggregate rate, the
server's CPU time per 1,000 requests, split by thread (the event loop, the
blocking pool), and the requests per operation. `--profile` also runs the
default server under cProfile (the loop thread only) and prints the functions
with the most own time. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

from bench.run import fresh_tmpfs, run_workload  # noqa: E402
from bench.server import ActorfsServer  # noqa: E402

VARIANTS = {
    "default": [],
    "--inline never": ["--inline", "never"],
    "--queues 2": ["--queues", "2"],
    "--poll 0": ["--poll", "0"],
    "--queues 4": ["--queues", "4"],
}


def thread_cpu(pid: int) -> dict[str, float]:
    """Thread name -> CPU seconds (user + system) of process `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        key = "loop" if tid == str(pid) else name.rstrip("0123456789_")
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def one(options: list[str], base: Path, params: dict, python_args=()) -> dict:
    src, mnt = base / "src", base / "mnt"
    subprocess.run(["rm", "-rf", str(src)], check=True)
    src.mkdir()
    mnt.mkdir(exist_ok=True)
    with ActorfsServer(src, mnt, options, python_args=python_args) as srv:
        before, cpu0 = srv.stats(), thread_cpu(srv.server_pid())
        figures = run_workload("parallel", mnt, params)
        after, cpu1 = srv.stats(), thread_cpu(srv.server_pid())
    requests = after.get("total", 0) - before.get("total", 0)
    cpu = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    ops = {
        op: s["count"] - before.get("ops", {}).get(op, {}).get("count", 0)
        for op, s in after.get("ops", {}).items()
    }
    return {"rate": figures["all"], "requests": requests, "cpu": cpu, "ops": ops}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=750, help="files per process per phase")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="also a cProfile run of the default")
    ap.add_argument("--native", action="store_true", help="also native tmpfs, for the ratio")
    args = ap.parse_args()
    params = {"files": args.files, "par_files": args.files, "procs": 4}
    names = args.variants.split(",")
    work = Path(os.environ.get("ACTORFS_BENCH_DIR", "/var/tmp/actorfs-bench"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    native: list[float] = []
    with fresh_tmpfs(work / "tmpfs-prof") as base:
        for r in range(args.rounds):
            if args.native:
                d = base / "native"
                subprocess.run(["rm", "-rf", str(d)], check=True)
                d.mkdir()
                native.append(run_workload("parallel", d, params)["all"])
            for n in names:
                runs[n].append(one(VARIANTS[n], base, params))
                print(f"round {r + 1} {n}: {runs[n][-1]['rate']:,.0f} ops/s", file=sys.stderr)
        prof = None
        if args.profile:
            fd, prof = tempfile.mkstemp(suffix=".prof")
            os.close(fd)
            one([], base, params, python_args=["-m", "cProfile", "-o", prof])
    base_rate = statistics.median(x["rate"] for x in runs[names[0]])
    print(f"parallel metadata, 4 processes x {args.files} files, medians of {args.rounds} rounds")
    if native:
        print(f"native tmpfs: {statistics.median(native):,.0f} ops/s")
    for n in names:
        rs = runs[n]
        rate = statistics.median(x["rate"] for x in rs)
        reqs = statistics.median(x["requests"] for x in rs)
        threads = sorted({k for x in rs for k in x["cpu"]})
        per_k = {t: statistics.median(x["cpu"].get(t, 0.0) for x in rs) / reqs * 1000 for t in threads}
        cpu = " ".join(f"{t} {v * 1000:.0f} ms" for t, v in per_k.items() if v > 0)
        print(f"{n:<16} {rate:>9,.0f} ops/s ({rate / base_rate:.2f}x {names[0]}"
              + (f", {rate / statistics.median(native):.1%} of native" if native else "")
              + f"), {reqs:,.0f} requests, CPU per 1,000 requests: {cpu}")  # fmt: skip
    print("requests per op (first variant):", json.dumps(runs[names[0]][0]["ops"]))
    if prof:
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(25)
        os.unlink(prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
