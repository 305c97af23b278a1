"""Figures -> docs/BENCHMARKS*.md: medians, ratios to native, server latency, targets.

Pure functions over the results run.py collects, so the smoke test can check
the table's shape without timing anything.

results: list of runs, each {"target": name, "repeat": i, "workload": w,
"figures": {phase: value}, "server": {op: {"count", "histogram_us"}} or None}.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.workloads import UNITS


@dataclass(frozen=True)
class Target:
    """One thing the workloads run against."""

    name: str  # e.g. "actorfs auto / tmpfs"
    backing: str  # "tmpfs" or "disk"
    cache: str | None  # None: the plain directory (native)
    writeback: bool = False
    passthrough: bool | None = None  # None: the default (auto); True/False force it
    watch: bool = True  # False: a bench-only switch, to measure the watcher's cost
    # Another FUSE server measured in the same run (`--reference NAME=COMMAND`):
    # the command mounts {src} on {mnt} in the foreground (bench/reference.py).
    command: str | None = None

    @property
    def native(self) -> bool:
        return self.cache is None and self.command is None

    def cli_args(self) -> list[str]:
        args = [] if self.cache in (None, "default") else ["--cache", self.cache]
        if self.writeback:
            args.append("--writeback")
        if self.passthrough is True:
            args.append("--passthrough")
        elif self.passthrough is False:
            args.append("--no-passthrough")
        if not self.watch:
            args.append("--bench-no-watch")
        return args


DEFAULT = "actorfs default / tmpfs"

# Metadata ratios to native tmpfs of the default options before passthrough
# and the kept page cache (docs/BENCHMARKS-auto.md, medians of 5, same VM):
# the "no lower than today" bar when nothing better is at hand.
TODAY = {"create": 0.035, "stat": 0.805, "rename": 0.057, "unlink": 0.083}

# The better bar: the code from before issue 17, measured in the same run as
# a reference target of this name (`bench.run --reference "actorfs before
# issue 17=COMMAND"`, docs/BENCHMARKS.md says how). Those ratios were taken
# under another load; a same-run ratio is not.
BEFORE = "actorfs before issue 17 / tmpfs"

# The targets, default options against native tmpfs in the same run:
# (label, workload, phase, target name, kind, threshold). kind "ratio":
# figure / native >= threshold; "times": time <= threshold x native time.
GOALS = [
    ("sequential 1 MiB write >= 90%", "seq_write", "write", DEFAULT, "ratio", 0.90),
    ("cold sequential read >= 95%", "seq_read", "cold read", DEFAULT, "ratio", 0.95),
    ("warm re-read >= 90%", "seq_read", "warm re-read", DEFAULT, "ratio", 0.90),
    ("4 KiB random read >= 90%", "rand_read", "4k randread", DEFAULT, "ratio", 0.90),
    ("small-file tree read-back within 4x", "small_files", "read back", DEFAULT, "times", 4.0),
    ("parallel metadata (4 processes) >= 30%", "parallel", "all", DEFAULT, "ratio", 0.30),
    # threshold None: the BEFORE target's ratio in this run, else TODAY's
    *((f"{p} no lower than before", "metadata", p, DEFAULT, "ratio", None)
      for p in ("create", "stat", "rename", "unlink")),
]  # fmt: skip


def medians(results: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """(target, workload) -> {phase: median over repeats}."""
    acc: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in results:
        phases = acc.setdefault((r["target"], r["workload"]), {})
        for phase, v in r["figures"].items():
            phases.setdefault(phase, []).append(v)
    return {k: {p: statistics.median(vs) for p, vs in ph.items()} for k, ph in acc.items()}


def merged_server_stats(results: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(target, workload) -> {op: {"count": per run, "p50_us", "p99_us"}} over all repeats."""
    acc: dict[tuple[str, str], dict[str, dict[int, int]]] = {}
    runs: dict[tuple[str, str], int] = {}
    for r in results:
        if not r.get("server"):
            continue
        key = (r["target"], r["workload"])
        runs[key] = runs.get(key, 0) + 1
        ops = acc.setdefault(key, {})
        for op, s in r["server"].items():
            h = ops.setdefault(op, {})
            for bound, n in s["histogram_us"].items():
                h[int(bound)] = h.get(int(bound), 0) + n
    out = {}
    for key, ops in acc.items():
        out[key] = {}
        for op, h in ops.items():
            count = sum(h.values())
            if count:
                out[key][op] = {
                    "count": count // runs[key],
                    "p50_us": percentile(h, 0.5),
                    "p99_us": percentile(h, 0.99),
                }
    return out


def percentile(hist: dict[int, int], q: float) -> int:
    """Upper bound (us) of the log2 bucket holding the q-quantile."""
    total = sum(hist.values())
    rank, seen = q * total, 0
    for bound in sorted(hist):
        seen += hist[bound]
        if seen >= rank:
            return bound
    return max(hist) if hist else 0


def diff_stats(before: dict | None, after: dict) -> dict:
    """Per-op histogram of what happened between two dispatcher stats() snapshots."""
    out = {}
    prev = (before or {}).get("ops", {})
    for op, s in after.get("ops", {}).items():
        old = prev.get(op, {}).get("histogram_us", {})
        hist = {}
        for bound, n in s.get("histogram_us", {}).items():
            d = n - old.get(bound, old.get(str(bound), 0))
            if d > 0:
                hist[str(bound)] = d
        if hist:
            out[op] = {"count": sum(hist.values()), "histogram_us": hist}
    return out


def unit_of(workload: str) -> tuple[str, bool]:
    """(unit, higher is better); the guest half reports seconds per phase."""
    return UNITS.get(workload, ("s", False))


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def native_of(t: Target, targets: list[Target]) -> Target | None:
    return next((n for n in targets if n.native and n.backing == t.backing), None)


def workload_table(workload: str, targets: list[Target], med: dict) -> list[str]:
    unit, higher = unit_of(workload)
    phases: list[str] = []
    for t in targets:
        for p in med.get((t.name, workload), {}):
            if p not in phases:
                phases.append(p)
    if not phases:
        return []
    better = "higher is better" if higher else "lower is better"
    lines = [
        f"### {workload} ({unit}, {better}; in brackets: the ratio to native on the same backing)",
        "",
        "| target | " + " | ".join(phases) + " |",
        "|---|" + "---|" * len(phases),
    ]
    for t in targets:
        figs = med.get((t.name, workload))
        if figs is None:
            continue
        nat = native_of(t, targets)
        nfigs = med.get((nat.name, workload), {}) if nat else {}
        cells = []
        for p in phases:
            v = figs.get(p)
            if v is None:
                cells.append("–")
                continue
            cell = _fmt(v, unit)
            n = nfigs.get(p)
            if not t.native and n:
                cell += f" ({v / n:.1%})" if higher else f" ({v / n:.1f}x)"
            cells.append(cell)
        lines.append(f"| {t.name} | " + " | ".join(cells) + " |")
    return lines + [""]


def latency_table(workload: str, targets: list[Target], srv: dict) -> list[str]:
    rows = []
    for t in targets:
        ops = srv.get((t.name, workload))
        if not ops:
            continue
        top = sorted(ops.items(), key=lambda kv: -kv[1]["count"])[:8]
        cell = " · ".join(f"{op} {s['count']}× {s['p50_us']}/{s['p99_us']}" for op, s in top)
        rows.append(f"| {t.name} | {cell} |")
    if not rows:
        return []
    return [
        f"Server latency for {workload} (op, requests per run, p50/p99 in µs, upper bounds "
        "of log2 buckets):",
        "",
        "| target | ops |",
        "|---|---|",
        *rows,
        "",
    ]


def paired_ratios(results: list[dict]) -> dict[tuple[str, str, str], float]:
    """(target, workload, phase) -> median over repeats of figure / the same phase
    on the backing file, read in the same process (rows with "paired")."""
    acc: dict[tuple[str, str, str], list[float]] = {}
    for r in results:
        for phase, base in r.get("paired", {}).items():
            ours = r["figures"].get(phase)
            if ours is not None and base:
                acc.setdefault((r["target"], r["workload"], phase), []).append(ours / base)
    return {k: statistics.median(v) for k, v in acc.items()}


def goals(med: dict, targets: list[Target], results: list[dict] | None = None,
          ) -> list[tuple[str, float | None, bool | None]]:  # fmt: skip
    """(label, achieved value (ratio or time multiple), met?) for each issue target.

    A phase measured paired with the backing file (PAIRED in bench/run.py) is
    judged by that pairing; the others by the medians against native tmpfs."""
    names = {t.name for t in targets}
    paired = paired_ratios(results or [])
    out = []
    for label, workload, phase, tname, kind, bar in GOALS:
        native = med.get(("native / tmpfs", workload), {}).get(phase)
        ours = med.get((tname, workload), {}).get(phase)
        threshold = bar if bar is not None else TODAY[phase]
        if bar is None:
            before = med.get((BEFORE, workload), {}).get(phase)
            if before is not None and native:
                threshold = before / native
                label += f" ({threshold:.1%} in this run)"
            else:
                label += f" ({threshold:.1%}, an earlier run)"
        v = paired.get((tname, workload, phase))
        if v is None:
            if tname not in names or native is None or ours is None or not native:
                out.append((label, None, None))
                continue
            v = ours / native
        out.append((label, v, v >= threshold if kind == "ratio" else v <= threshold))
    return out


def goals_table(med: dict, targets: list[Target], results: list[dict] | None = None,
                ) -> list[str]:  # fmt: skip
    lines = ["| target (issue 17) | achieved | met |", "|---|---|---|"]
    for label, v, met in goals(med, targets, results):
        if v is None:
            lines.append(f"| {label} | not measured | – |")
            continue
        shown = f"{v:.1f}x native time" if "within" in label else f"{v:.1%} of native"
        lines.append(f"| {label} | {shown} | {'yes' if met else 'no'} |")
    return lines + [""]


WORKLOAD_ORDER = [*UNITS, "guest_metadata", "guest_seq_write", "guest_seq_read",
                  "guest_small_files"]  # fmt: skip


def render(meta: dict, targets: list[Target], results: list[dict], notes: list[str]) -> str:
    med = medians(results)
    srv = merged_server_stats(results)
    out = [
        "# actorfs benchmarks",
        "",
        f"Written by `{meta.get('command', 'python3 -m bench.run')}` (do not edit by hand; "
        "notes below the tables come from bench/notes.md). To measure again, as root: "
        "`python3 -m bench.run`, one command for everything below (about 6-9 minutes on a "
        "quiet 2-CPU VM; run it on a quiet machine, the ratios move with the load).",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- kernel: {meta['kernel']}",
        f"- python: {meta['python']}",
        f"- mode: {meta['mode']}; {meta['repeat']} repeats, medians reported"
        + (f"; took {meta['elapsed']}" if meta.get("elapsed") else ""),
        f"- sizes: {meta['sizes']}",
        "",
        "Targets: `native` is the plain backing directory; `actorfs default` is a FUSE "
        "mount of it through actorfs with no options (passthrough auto, `--cache auto`); "
        "`actorfs MODE` adds `--cache MODE`, `writeback` = `--writeback`, `passthrough` / "
        "`no passthrough` = `--passthrough` / `--no-passthrough`. Backing `tmpfs` measures "
        "the server's cost; `disk` adds the disk's.",
        "",
        *([f"- passthrough as the mounts reported it: {meta['passthrough']}", ""]
          if meta.get("passthrough") else []),
        *(["Other servers measured in the same run (`--reference NAME=COMMAND`, "
           "bench/reference.py; bench/notes.md says how each was built):", "",
           *(f"- {name}: `{cmd}`" for name, cmd in meta["references"].items()), ""]
          if meta.get("references") else []),
        *([meta["conditions"], ""] if meta.get("conditions") else []),
        "## Issue targets (actorfs with default options over tmpfs vs native tmpfs, same run)",
        "",
        *goals_table(med, targets, results),
        "The write and read targets compare each write or read of the mount's file with the "
        "same write, or a read of the same file, in the backing directory, in the same "
        "process, one after the other (medians of the per-run ratios); the others compare "
        "the medians with the native target's. Reads of a fresh tmpfs file in separate "
        "processes spread too widely to tell 90% from 95% (bench/workloads.py).",
        "",
        "## Results",
        "",
    ]
    for w in WORKLOAD_ORDER:
        if w == "guest_metadata" and any(t.backing == "guest" for t in targets):
            out += [
                "## virtio-fs: a guest against actorfs and against virtiofsd",
                "",
                "The guest's own clock, busybox tools, TCG (no KVM): seconds per phase; the "
                "ratio is to virtiofsd (Debian's C reference daemon) in the same run.",
                "",
            ]
        out += workload_table(w, targets, med)
        out += latency_table(w, targets, srv)
    if notes:
        out += ["## Notes", ""]
        for note in notes:  # each a block of markdown: a blank line between them
            out += [note, ""]
    return "\n".join(out)
