"""The virtio-fs half: the same guest workload against actorfs and against virtiofsd.

Reuses the test guest (tests/guest/: Debian's kernel, a busybox initramfs,
QEMU with vhost-user-fs-pci) with bench/guest_workload.sh in place of the
functional workload. Backends: `actorfs serve --once` (the CLI) and Debian's
/usr/lib/qemu/virtiofsd (package qemu-system-common, pulled in by
qemu-system-x86), both with cache=auto, on a fresh directory on tmpfs.

The guest runs under TCG (see tests/guest/run.py: KVM hangs in early boot on
these nested machines), so every figure includes instruction emulation; the
ratio between the two backends is the point, not the absolute time.

`python3 -m bench.guest [--rounds N]` runs it alone and prints the figures.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from bench.report import Target  # noqa: E402

BACKENDS = {"actorfs": "virtio-fs: actorfs (guest)", "virtiofsd": "virtio-fs: virtiofsd (guest)"}
PHASES = {
    "metadata": ["create", "stat", "rename", "unlink"],
    "seq_write": ["seq_write"],
    "seq_read": ["seq_read"],
    "small_files": ["extract", "read_back"],
}
GUEST_TAR_FILES = 1000


def parse(console: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^BENCH (\S+) ([\d.]+)", console,
                                                                 re.M)}  # fmt: skip


def run(work: Path, repeat: int, log) -> tuple[list[Target], list[dict], list[str]]:
    """(targets, result rows for report.render, notes) of the guest half."""
    try:
        from tests.guest import image
        from tests.guest.run import VIRTIOFSD, prepare_root, run_guest
    except ImportError as exc:
        return [], [], [f"- virtio-fs half skipped: the guest tooling is missing ({exc})."]
    from bench import workloads

    try:
        img = image.build({"workload.sh": HERE / "guest_workload.sh"})
    except Exception as exc:  # no kernel package, no busybox...
        return [], [], [f"- virtio-fs half skipped: cannot build the guest ({exc})."]
    tar = work / f"guest-pylib-{GUEST_TAR_FILES}.tar"
    if not tar.exists():
        workloads.make_tar(str(tar), ["/usr/lib/python3.11"], GUEST_TAR_FILES)
    backends = ["actorfs"] + (["virtiofsd"] if os.path.exists(VIRTIOFSD) else [])
    results, notes = [], []
    per_backend: dict[str, list[float]] = {}
    for r in range(repeat):
        for b in backends:
            d = work / "tmpfs" / f"guest-{b}"
            shutil.rmtree(d, ignore_errors=True)
            root = d / "shared"
            prepare_root(root)
            shutil.copyfile(tar, root / "small.tar")
            g = run_guest(img, b, d, root)
            figs = parse(g.console)
            if not figs or "BENCHFAIL" in g.console:
                notes.append(f"- guest run {r + 1} against {b} failed "
                             f"(qemu {g.qemu_status}): see {d}")  # fmt: skip
                if log is not None:
                    log.write(g.context())
                continue
            shutil.rmtree(d, ignore_errors=True)
            per_backend.setdefault(b, []).append(g.seconds)
            for workload, phases in PHASES.items():
                got = {p: figs[p] for p in phases if p in figs}
                if got:
                    results.append({"target": BACKENDS[b], "repeat": r, "workload": f"guest_{workload}",
                                    "figures": got, "server": None})  # fmt: skip
    targets = [Target(BACKENDS[b], "guest", None if b == "virtiofsd" else "auto") for b in backends]
    for b, secs in per_backend.items():
        notes.append(
            f"- guest boot-to-poweroff against {b}: median {statistics.median(secs):.1f} s"
        )
    return targets, results, notes


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternating rounds per backend; medians are reported (default 1)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    work = Path(os.environ.get("ACTORFS_BENCH_DIR", "/var/tmp/actorfs-bench"))
    (work / "tmpfs").mkdir(parents=True, exist_ok=True)
    ts, rows, ns = run(work, args.rounds, sys.stderr)
    for row in rows:
        print(row["target"], row["workload"], row["figures"])
    print("\n".join(ns))
