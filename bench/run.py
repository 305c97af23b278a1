"""The benchmark: `python3 -m bench.run [--quick] [--all-modes] [--repeat N]`.

By default: the issue's targets table. Every workload (bench/workloads.py)
against native tmpfs and against actorfs with DEFAULT options (passthrough
auto, `--cache auto`) and with `--no-passthrough`, on a fresh tmpfs, 5
repeats, medians and ratios to native from the same run, written to
docs/BENCHMARKS.md (about 5 minutes on a 2-CPU VM). `--all-modes`: every cache
mode, writeback, the disk and the virtio-fs half (bench/guest.py, a guest
against actorfs and against virtiofsd), written to docs/BENCHMARKS-modes.md.

Needs root (mount, drop_caches). Each workload group gets a fresh mount and a
fresh backing directory, so one workload's caches do not help the next.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from bench import report, workloads  # noqa: E402
from bench.reference import ReferenceServer  # noqa: E402
from bench.report import Target  # noqa: E402
from bench.server import ActorfsServer  # noqa: E402

WORK = Path(os.environ.get("ACTORFS_BENCH_DIR", "/var/tmp/actorfs-bench"))

FULL = {"files": 1500, "par_files": 750, "procs": 4, "mib": 512, "seconds": 3, "tar_files": 2000}
QUICK = {"files": 200, "par_files": 100, "procs": 4, "mib": 16, "seconds": 1, "tar_files": 200}

# Workloads that share a mount and a directory, in order (the reads need the
# file seq_write made).
GROUPS = [["metadata"], ["parallel"], ["seq_write", "seq_read", "rand_read"],
          ["small_files"], ["stat_heavy"]]  # fmt: skip

# Workloads that pair each write or read through the mount with the same one in
# its backing directory, in the same process: the issue targets use these pairs
# (bench/workloads.py).
PAIRED = {"seq_write", "seq_read", "rand_read"}

TAR_SOURCES = ["/usr/lib/python3.11", "/usr/lib/python3/dist-packages"]


def all_targets(quick: bool, all_modes: bool = False) -> list[Target]:
    if not all_modes:
        ts = [
            Target("native / tmpfs", "tmpfs", None),
            Target(report.DEFAULT, "tmpfs", "default"),
            Target("actorfs default, no passthrough / tmpfs", "tmpfs", "default", passthrough=False),
        ]
        return ts[:2] if quick else ts  # the smoke run: one of each kind
    return [
        Target("native / tmpfs", "tmpfs", None),
        Target(report.DEFAULT, "tmpfs", "default"),
        Target("actorfs never / tmpfs", "tmpfs", "never"),
        Target("actorfs auto, no passthrough / tmpfs", "tmpfs", "auto", passthrough=False),
        Target("actorfs auto, no passthrough, no watcher / tmpfs", "tmpfs", "auto",
               passthrough=False, watch=False),
        Target("actorfs always / tmpfs", "tmpfs", "always"),
        Target("actorfs writeback / tmpfs", "tmpfs", "auto", writeback=True),
        Target("native / disk", "disk", None),
        Target("actorfs default / disk", "disk", "default"),
    ]  # fmt: skip


def run_order(targets: list[Target], repeat: int) -> list[Target]:
    """The targets of one repeat, rotated by one place per repeat: what ran just
    before a target (its freed pages, its page cache) then changes from repeat
    to repeat instead of always favouring or hurting the same one."""
    k = repeat % len(targets) if targets else 0
    return targets[k:] + targets[:k]


def run_workload(name: str, directory: Path, params: dict) -> dict:
    p = subprocess.run(
        [sys.executable, str(HERE / "workloads.py"), name, str(directory), json.dumps(params)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"workload {name} on {directory} failed: {p.stderr.strip()[-1500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def fresh_tmpfs(path: Path):
    """A tmpfs of our own, so nothing else on /dev/shm disturbs the figures."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8g,mode=755", "actorfs-bench", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# target name -> its mounts' passthrough reason (for the report's header).
PASSTHROUGH: dict[str, str] = {}


def run_group(target: Target, group: list[str], backing: Path, mnt: Path, params: dict,
              log) -> list[dict]:  # fmt: skip
    """One workload group on a fresh directory (and a fresh mount): result rows."""
    src = backing / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    rows = []
    if target.native:
        for w in group:
            rows.append({"workload": w, "figures": run_workload(w, src, params), "server": None})
        shutil.rmtree(src)
        return rows
    mnt.mkdir(parents=True, exist_ok=True)
    server: ActorfsServer | ReferenceServer
    if target.command is not None:
        server = ReferenceServer(target.command, src, mnt, log=log)
    else:
        server = ActorfsServer(src, mnt, target.cli_args(), log=log)
    with server as srv:
        before = srv.stats()
        if target.command is None:
            PASSTHROUGH[target.name] = srv.passthrough
        for w in group:
            paired = w in PAIRED
            figures = run_workload(w, mnt, {**params, "backing": str(src)} if paired else params)
            after = srv.stats()
            row = {"workload": w,
                   "server": report.diff_stats(before, after) if target.command is None else None,
                   "figures": {k: v for k, v in figures.items()
                               if not k.startswith(workloads.BACKING)}}  # fmt: skip
            if paired:
                row["paired"] = {k.removeprefix(workloads.BACKING): v
                                 for k, v in figures.items() if k.startswith(workloads.BACKING)}
            rows.append(row)
            before = after
    shutil.rmtree(src)
    return rows


def _shown_args(argv: list[str]) -> str:
    """The command line for the report, quoted as a shell needs it, without
    --conditions (shown on its own) and --json (where this run's raw figures went)."""
    hidden = ("--conditions", "--json")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in hidden:
            skip = True
        elif not a.startswith(tuple(f"{h}=" for h in hidden)):
            out.append(a)
    return "".join(f" {shlex.quote(a)}" for a in out)


def vhost_cpu_section() -> str:
    """bench/vhost_cpu.py's table: CPU per request, actorfs beside virtiofsd."""
    p = subprocess.run([sys.executable, "-m", "bench.vhost_cpu", "--n", "3000", "--rounds", "3"],
                       cwd=HERE.parent, capture_output=True, text=True, timeout=900)  # fmt: skip
    if p.returncode != 0:
        return f"### vhost-user CPU per request\n\nnot measured: {p.stderr.strip()[-500:]}"
    return (
        "### vhost-user: the server's CPU per request (bench/vhost_cpu.py)\n\n"
        "A Python frontend plays VMM and guest driver (no guest, no KVM), one request in "
        "flight; CPU time of the server process (all threads) per 1,000 requests. "
        "`python3 -m bench.vhost_cpu --profile` adds cProfile call counts per request.\n\n"
        + p.stdout.strip()
    )


def machine() -> str:
    model = "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM, disk: {_root_fs()}"


def _root_fs() -> str:
    p = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(WORK)],
                       capture_output=True, text=True)  # fmt: skip
    return p.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, two targets (smoke run)")
    ap.add_argument("--all-modes", action="store_true",
                    help="every cache mode, writeback, the disk and the guest half")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per target (default 5; 3 with --all-modes; 1 quick)")  # fmt: skip
    ap.add_argument("--out", default=None,
                    help="default docs/BENCHMARKS.md (docs/BENCHMARKS-modes.md with --all-modes)")
    ap.add_argument("--conditions", default=None,
                    help="a line for the report on the conditions of this run (machine load...)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--targets", default=None, help="comma-separated substrings of target names")
    ap.add_argument("--workloads", default=None, help="comma-separated workload names")
    ap.add_argument("--reference", action="append", default=[], metavar="NAME=COMMAND",
                    help="also measure another FUSE server, as target NAME / tmpfs: COMMAND "
                         "mounts {src} on {mnt} in the foreground (bench/reference.py); "
                         "repeatable")  # fmt: skip
    ap.add_argument("--no-guest", action="store_true", help="skip the virtio-fs half")
    ap.add_argument("--no-vhost", action="store_true",
                    help="skip the vhost-user CPU per request (bench/vhost_cpu.py)")  # fmt: skip
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root (mount, drop_caches): run it with sudo", file=sys.stderr)
        return 2
    repeat = args.repeat or (1 if args.quick else 3 if args.all_modes else 5)
    if args.out is None:
        args.out = str(REPO / "docs" / ("BENCHMARKS-modes.md" if args.all_modes else "BENCHMARKS.md"))
    params = dict(QUICK if args.quick else FULL)
    targets = all_targets(args.quick, args.all_modes)
    if args.targets:
        want = args.targets.split(",")
        targets = [t for t in targets if t.native or any(s in t.name for s in want)]
    for ref in args.reference:
        name, sep, command = ref.partition("=")
        if not sep or not name or "{mnt}" not in command:
            ap.error(f"--reference {ref!r}: write NAME=COMMAND, with {{src}} and {{mnt}} in COMMAND")
        targets.append(Target(f"{name} / tmpfs", "tmpfs", None, command=command))
    groups = GROUPS
    if args.workloads:
        want_w = set(args.workloads.split(","))
        groups = [[w for w in g if w in want_w or g[0] in want_w] for g in GROUPS]
        groups = [g for g in groups if g]

    WORK.mkdir(parents=True, exist_ok=True)
    tar = WORK / f"pylib-{params['tar_files']}.tar"
    if not tar.exists():
        workloads.make_tar(str(tar), TAR_SOURCES, params["tar_files"])
    params["tar"] = str(tar)
    log_path = WORK / "server.log"
    results: list[dict] = []
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.monotonic()
    with open(log_path, "w") as log, fresh_tmpfs(WORK / "tmpfs") as tmpfs:
        disk = WORK / "disk"
        disk.mkdir(exist_ok=True)
        for r in range(repeat):
            for t in run_order(targets, r):
                backing = tmpfs if t.backing == "tmpfs" else disk
                for g in groups:
                    print(f"[{time.monotonic() - started:7.1f}s] run {r + 1}/{repeat} "
                          f"{t.name}: {', '.join(g)}", flush=True)  # fmt: skip
                    for row in run_group(t, g, backing, WORK / "mnt", params, log):
                        results.append({"target": t.name, "repeat": r, **row})
    notes: list[str] = []
    if args.all_modes and not args.no_guest and not args.quick:
        from bench import guest

        g_targets, g_results, g_notes = guest.run(WORK, repeat, log)
        targets = targets + g_targets
        results += g_results
        notes += g_notes
    if not args.quick and not args.no_vhost:
        print(f"[{time.monotonic() - started:7.1f}s] vhost-user CPU per request", flush=True)
        notes.append(vhost_cpu_section())
    notes_file = HERE / "notes.md"
    if notes_file.exists():
        notes.append(notes_file.read_text().strip())
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mode": "quick" if args.quick else "full",
        "repeat": repeat,
        "sizes": ", ".join(f"{k}={v}" for k, v in params.items() if k != "tar"),
        "passthrough": "; ".join(f"{k}: {v}" for k, v in PASSTHROUGH.items()),
        "references": {t.name: t.command for t in targets if t.command is not None},
        "conditions": args.conditions or f"Load average at the start: {load_at_start}.",
        "elapsed": f"{time.monotonic() - started:.0f} s",
        "command": "python3 -m bench.run" + _shown_args(argv if argv is not None else sys.argv[1:]),
    }
    text = report.render(meta, targets, results, notes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    try:  # the charts beside the tables (the bench extra: matplotlib)
        from bench import plots

        for png in plots.annotate(Path(args.out)):
            print(f"wrote {png}")
    except ImportError as exc:
        print(f"no charts ({exc}): pip install -e '.[bench]'", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
