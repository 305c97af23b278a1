"""`actorfs stats MNT|SOCKET`: a running server's per-op figures, refreshed in place.

Reads the server's stats socket (runtime/cli/observe.py) every interval and shows,
per op: requests per second over the last interval, total requests, errors,
and p50 / p99 latency (log2 buckets: exact to a factor of two), from the
interval's own histogram when it saw requests, else since the start. Drawn
with rich, in place like top; Ctrl-C quits.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, TypedDict

from actorfs.runtime.cli.observe import read_stats, shown, stats_socket_for

if TYPE_CHECKING:
    from rich.console import Group, JustifyMethod


class StatsUnavailable(Exception):
    pass


def locate(target: str) -> str:
    """The stats socket for TARGET: the server's, found by what it serves, or TARGET itself."""
    derived = stats_socket_for(target)
    if _speaks_json(derived):
        return derived
    try:
        st = os.lstat(target)
    except OSError:
        st = None
    if st is not None and stat.S_ISSOCK(st.st_mode) and _speaks_json(target):
        return target
    raise StatsUnavailable(
        f"no running actorfs server found for {target} (no answer on {shown(derived)}): "
        "is it served by actorfs, started without --stats-socket?"
    )


def _speaks_json(path: str) -> bool:
    try:
        read_stats(path, timeout=5)
    except (OSError, ValueError):
        return False
    return True


def _percentile(hist: dict[int, int], q: float) -> int:
    total = sum(hist.values())
    if not total:
        return 0
    seen = 0
    for bound in sorted(hist):
        seen += hist[bound]
        if seen >= q * total:
            return bound
    return max(hist)


class Row(TypedDict):
    """One op's line of the view."""

    op: str
    rate: float  # requests per second over the interval
    count: int
    errors: int
    p50_us: int
    p99_us: int


# A reading of the stats socket: the server's stats() as JSON (read_stats).
Reading = dict[str, Any]


def rows(prev: Reading | None, cur: Reading, dt: float) -> list[Row]:
    """Per-op figures from two readings dt seconds apart (prev None: since the start)."""
    ops = (cur.get("requests") or {}).get("ops", {})
    old = ((prev or {}).get("requests") or {}).get("ops", {})
    out: list[Row] = []
    for name, o in ops.items():
        p = old.get(name, {})
        dcount = o["count"] - p.get("count", 0)
        hist = {int(b): n for b, n in o.get("histogram_us", {}).items()}
        phist = {int(b): n for b, n in p.get("histogram_us", {}).items()}
        delta = {b: n - phist.get(b, 0) for b, n in hist.items() if n - phist.get(b, 0) > 0}
        use = delta if prev is not None and delta else hist
        out.append({
            "op": name,
            "rate": dcount / dt if prev is not None and dt > 0 else 0.0,
            "count": o["count"],
            "errors": o["errors"],
            "p50_us": _percentile(use, 0.5),
            "p99_us": _percentile(use, 0.99),
        })
    out.sort(key=lambda r: (-r["rate"], -r["count"]))
    return out


def _us(v: int) -> str:
    if v >= 1_000_000:
        return f"{v / 1e6:.1f}s"
    if v >= 1000:
        return f"{v / 1000:.1f}ms"
    return f"{v}us"


def render(cur: Reading, table_rows: list[Row], target: str) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    req = cur.get("requests") or {}
    where = cur.get("mountpoint") or cur.get("socket") or target
    head = Text(
        f"actorfs {where}  root {cur.get('root', '?')}  up {cur.get('uptime_s', 0):.0f}s  "
        f"{req.get('total', 0)} requests  {req.get('errors', 0)} errors  "
        f"{req.get('in_flight', 0)} in flight"
    )
    t = Table(box=None, pad_edge=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("OP", "left"), ("REQ/S", "right"), ("TOTAL", "right"),
        ("ERRORS", "right"), ("P50", "right"), ("P99", "right"),
    )  # fmt: skip
    for col, justify in columns:
        t.add_column(col, justify=justify)
    for r in table_rows:
        t.add_row(r["op"], f"{r['rate']:.1f}", str(r["count"]), str(r["errors"]),
                  _us(r["p50_us"]), _us(r["p99_us"]))
    if not table_rows:
        t.add_row("(no requests yet)", "", "", "", "", "")
    return Group(head, t)


def run_stats_view(target: str, *, interval: float = 1.0, once: bool = False) -> int:
    from rich.console import Console
    from rich.live import Live

    from actorfs.runtime.cli.main import fail

    try:
        path = locate(target)
        cur = read_stats(path)
    except StatsUnavailable as exc:
        return fail(str(exc))
    except (OSError, ValueError) as exc:
        return fail(f"cannot read the stats of {target}: {exc}", 1)
    console = Console()
    if once:
        console.print(render(cur, rows(None, cur, 0), target))
        return 0
    # Ctrl-C quits, whatever SIGINT disposition we inherited: a shell without job
    # control starts background commands with SIGINT ignored, and Python then
    # leaves it ignored (the view would never exit).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    prev, t_prev = cur, time.monotonic()
    try:
        with Live(render(cur, rows(None, cur, 0), target), console=console,
                  auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                try:
                    cur = read_stats(path)
                except (TimeoutError, OSError, ValueError):
                    live.update(render(prev, [], target), refresh=True)
                    console.print(f"the server of {target} went away")
                    return 1
                now = time.monotonic()
                live.update(render(cur, rows(prev, cur, now - t_prev), target), refresh=True)
                prev, t_prev = cur, now
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(run_stats_view(sys.argv[1]))
