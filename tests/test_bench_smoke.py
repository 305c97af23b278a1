"""The benchmark harness itself: a --quick run produces a well-formed report.

No timing assertions: only that every workload ran against every target and
the tables, ratios and server latencies are there and parse.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.report import Target
from bench.workloads import METADATA_PHASES, UNITS

REPO = Path(__file__).resolve().parents[1]

NUMBER = r"[\d,]+(\.\d+)?( s)?"


def _table(md: str, workload: str) -> list[list[str]]:
    """The rows (cells) of the figures table for `workload`."""
    m = re.search(rf"^### {workload} \(.*?\n\n(\|.*?)(\n\n|\n?\Z)", md, re.S | re.M)
    assert m, f"no table for {workload}"
    lines = m.group(1).splitlines()
    assert re.fullmatch(r"\|(-+\|)+", lines[1]), lines[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in [lines[0], *lines[2:]]]


def _synthetic_results() -> tuple[list[Target], list[dict]]:
    targets = [
        Target("native / tmpfs", "tmpfs", None),
        Target("actorfs default / tmpfs", "tmpfs", "default"),
    ]
    rows = []
    for r, scale in enumerate((1.0, 1.2, 0.9)):
        for t, f in ((targets[0], 100.0), (targets[1], 10.0)):
            srv = (
                None if t.native else {"LOOKUP": {"count": 4, "histogram_us": {"64": 3, "512": 1}}}
            )
            rows.append({"target": t.name, "repeat": r, "workload": "metadata", "server": srv,
                         "figures": {p: f * scale for p in [*METADATA_PHASES, "all"]}})  # fmt: skip
            rows.append({"target": t.name, "repeat": r, "workload": "small_files", "server": None,
                         "figures": {"extract": 1 / f * scale, "read back": 2 / f}})  # fmt: skip
    return targets, rows


def test_render_medians_ratios_and_latency():
    targets, rows = _synthetic_results()
    meta = {"date": "d", "machine": "m", "kernel": "k", "python": "p", "mode": "quick",
            "repeat": 3, "sizes": "s"}  # fmt: skip
    md = report.render(meta, targets, rows, [])
    table = _table(md, "metadata")
    assert table[0] == ["target", *METADATA_PHASES, "all"]
    native, ours = table[1], table[2]
    assert native[0] == "native / tmpfs" and native[1] == "100"  # median of 100, 120, 90
    assert ours[0] == "actorfs default / tmpfs" and ours[1] == "10.0 (10.0%)"
    small = _table(md, "small_files")
    assert small[2][1].endswith("(10.0x)")  # lower is better: a time multiple
    assert "LOOKUP 4× 64/512" in md  # p50 in the 64 us bucket, p99 in the 512 us one
    assert "| create no lower than before (3.5%, an earlier run) | 10.0% of native | yes |" in md
    assert "| stat no lower than before (80.5%, an earlier run) | 10.0% of native | no |" in md
    assert "| small-file tree read-back within 4x | 10.0x native time | no |" in md
    assert "| sequential 1 MiB write >= 90% | not measured | – |" in md


def test_read_targets_use_the_pairing_with_the_backing_file():
    """The native target's medians say 50%, each run's pair 99%: the pair wins."""
    targets, rows = _synthetic_results()
    for r, (native, ours, backing) in enumerate([(10.0, 5.0, 5.0), (10.0, 4.0, 4.1),
                                                  (10.0, 6.0, 6.1)]):  # fmt: skip
        rows.append({"target": "native / tmpfs", "repeat": r, "workload": "seq_read",
                     "server": None, "figures": {"cold read": native}})  # fmt: skip
        rows.append({"target": "actorfs default / tmpfs", "repeat": r, "workload": "seq_read",
                     "server": None, "figures": {"cold read": ours},
                     "paired": {"cold read": backing}})  # fmt: skip
    got = {label: (v, met) for label, v, met in report.goals(report.medians(rows), targets, rows)}
    v, met = got["cold sequential read >= 95%"]
    assert v == pytest.approx(6.0 / 6.1) and met
    assert got["create no lower than before (3.5%, an earlier run)"] == (pytest.approx(0.1), True)


def test_before_bars_come_from_the_old_code_in_the_same_run():
    """With the pre-issue code measured as a reference target, "no lower than
    before" compares with its ratio in this run, not with an old run's."""
    targets, rows = _synthetic_results()
    targets.append(Target(report.BEFORE, "tmpfs", None, command="old-server {src} {mnt}"))
    assert not targets[-1].native
    for r, f in enumerate((12.0, 11.0, 9.0)):  # median 11 against native's 100: 11%
        rows.append({"target": report.BEFORE, "repeat": r, "workload": "metadata",
                     "server": None, "figures": {p: f for p in [*METADATA_PHASES, "all"]}})  # fmt: skip
    got = {label: (v, met) for label, v, met in report.goals(report.medians(rows), targets, rows)}
    assert got["create no lower than before (11.0% in this run)"] == (pytest.approx(0.1), False)
    meta = {"date": "d", "machine": "m", "kernel": "k", "python": "p", "mode": "quick",
            "repeat": 3, "sizes": "s", "references": {report.BEFORE: "old-server {src} {mnt}"}}  # fmt: skip
    md = report.render(meta, targets, rows, [])
    assert _table(md, "metadata")[3][:2] == [report.BEFORE, "11.0 (11.0%)"]
    assert f"- {report.BEFORE}: `old-server {{src}} {{mnt}}`" in md  # how it was run


def test_targets_take_turns_at_running_first():
    from bench.run import run_order

    ts = [Target(n, "tmpfs", None if n == "native" else "default") for n in "abc"]
    firsts = [run_order(ts, r)[0].name for r in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(t.name for t in run_order(ts, r)) == ["a", "b", "c"] for r in range(6))


def test_reference_server_mounts_and_leaves_nothing_behind(tmp_path):
    """A reference target is any server that mounts {src} on {mnt} in the
    foreground; here actorfs itself, through the same harness bench.run uses."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("a reference server mounts: it needs root and /dev/fuse")
    from bench.reference import ReferenceServer, command_line, is_mounted

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    cmd = f"{sys.executable} -m actorfs mount -f {{src}} {{mnt}}"
    with open(tmp_path / "log", "w") as log, ReferenceServer(cmd, src, mnt, log=log) as srv:
        assert is_mounted(mnt)
        (mnt / "through").write_text("x")
        assert (src / "through").read_text() == "x"
        assert srv.stats() == {}
    assert not is_mounted(mnt) and srv.proc is not None and srv.proc.returncode is not None
    with pytest.raises(RuntimeError, match="did not mount"), open(tmp_path / "log", "a") as log:
        with ReferenceServer("false {mnt}", src, mnt, log=log):
            pass
    with pytest.raises(ValueError, match="no {mnt}"):
        command_line("server {src}", src, mnt)


def test_diff_stats_subtracts_histograms():
    before = {"ops": {"READ": {"histogram_us": {"64": 2}}}}
    after = {
        "ops": {"READ": {"histogram_us": {"64": 5, "128": 1}}, "OPEN": {"histogram_us": {"8": 1}}}
    }
    d = report.diff_stats(before, after)
    assert d == {"READ": {"count": 4, "histogram_us": {"64": 3, "128": 1}},
                 "OPEN": {"count": 1, "histogram_us": {"8": 1}}}  # fmt: skip


def test_plots_chart_every_table_and_link_each_once(tmp_path):
    from bench import plots

    targets, rows = _synthetic_results()
    meta = {"date": "d", "machine": "m", "kernel": "k", "python": "p", "mode": "quick",
            "repeat": 3, "sizes": "s"}  # fmt: skip
    out = tmp_path / "BENCH.md"
    out.write_text(report.render(meta, targets, rows, []) + "\n")
    tables = {t.workload: t for t in plots.parse(out.read_text())}
    # ratios as the chart draws them: taller is better, 1 is native
    assert tables["metadata"].ratios["actorfs default / tmpfs"]["create"] == pytest.approx(0.1)
    assert tables["small_files"].ratios["actorfs default / tmpfs"]["extract"] == pytest.approx(0.1)
    pngs = plots.annotate(out)
    assert [p.name for p in pngs] == ["BENCH-metadata.png", "BENCH-small_files.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    first = out.read_text()
    assert first.count("](plots/BENCH-metadata.png)") == 1
    assert plots.annotate(out) == pngs and out.read_text() == first  # again: nothing doubled
    link = first.index("](plots/BENCH-metadata.png)")
    assert first.index("### metadata") < link < first.index("Server latency for metadata")


@pytest.mark.slow
@pytest.mark.timeout(700)  # the run itself is given 600 s
def test_quick_run_writes_a_well_formed_report(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("the benchmark mounts: it needs root and /dev/fuse")
    out = tmp_path / "BENCH.md"
    env = dict(os.environ, ACTORFS_BENCH_DIR=str(tmp_path / "work"))
    p = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--no-guest",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env,
                       cwd=REPO)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    md = out.read_text()
    assert "- kernel: " in md and "- machine: " in md
    for workload in UNITS:
        table = _table(md, workload)
        names = [row[0] for row in table[1:]]
        assert names == ["native / tmpfs", "actorfs default / tmpfs"], (workload, names)
        for row in table[1:]:
            assert len(row) == len(table[0])
            for cell in row[1:]:
                assert re.match(NUMBER, cell), (workload, cell)
        for cell in table[2][1:]:
            assert re.search(r"\((\d+\.\d%|\d+\.\dx)\)$", cell), (workload, cell)
        # the server's own latency per op, from its stats (none for the data
        # workloads when passthrough does the I/O in the kernel)
        if workload not in ("seq_read", "rand_read"):
            assert re.search(rf"Server latency for {workload} .*?\| actorfs default / tmpfs \| "
                             r"\w+ \d+× \d+/\d+", md, re.S), workload  # fmt: skip
    assert re.search(r"\| create no lower than before \(3\.5%, an earlier run\) \| \d+\.\d% of native \| (yes|no) \|", md)
    assert "- passthrough as the mounts reported it: actorfs default / tmpfs: " in md
    # the charts beside the tables, linked under them
    pngs = sorted((tmp_path / "plots").glob("BENCH-*.png"))
    assert {p.name for p in pngs} >= {f"BENCH-{w}.png" for w in UNITS}, pngs
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert f"](plots/BENCH-{next(iter(UNITS))}.png)" in md
    # nothing left mounted
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts


def test_parallel_bound_runs_the_workload_over_two_servers(tmp_path, monkeypatch):
    """bench/parallel_bound.py: 4 processes split over two independent mounts."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("the bound mounts: it needs root and /dev/fuse")
    from bench import parallel_bound

    monkeypatch.setattr(parallel_bound, "PARAMS", {"files": 20, "par_files": 20, "procs": 4})
    assert parallel_bound.one_round(tmp_path, 2) > 0
    assert parallel_bound.native_round(tmp_path) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # everything removed
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
