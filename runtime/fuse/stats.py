"""Per-op counters and latency histograms for the dispatcher.

Recording is on every request's path, so it is kept to a few integer
operations: latency goes into a log2 bucket of whole microseconds (bucket b
holds [2**(b-1), 2**b) us; bucket 0 holds < 1 us). Percentiles are read from
the buckets and reported as the bucket's upper bound, so they are exact to
within a factor of two, which is what a profile needs to spot a regression.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

NBUCKETS = 40  # 2**39 us is about six days: anything slower is clamped


class OpStats:
    __slots__ = ("count", "errors", "buckets", "total_ns")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total_ns = 0
        self.buckets = [0] * NBUCKETS

    def percentile_us(self, q: float) -> int:
        """Upper bound (us) of the bucket holding the q-quantile; 0 if empty."""
        if not self.count:
            return 0
        rank = q * self.count
        seen = 0
        for b, n in enumerate(self.buckets):
            seen += n
            if seen >= rank and n:
                return 1 << b
        return 1 << (NBUCKETS - 1)


class OpSnapshot(TypedDict):
    """One op's counters; latencies in microseconds (bucket upper bounds)."""

    count: int
    errors: int
    mean_us: int
    sum_us: int
    p50_us: int
    p99_us: int
    histogram_us: dict[int, int]  # only the buckets in use: {upper bound in us: count}


class StatsSnapshot(TypedDict):
    """Stats.snapshot(): totals, and each op by name."""

    total: int
    errors: int
    ops: dict[str, OpSnapshot]


class Stats:
    """Counters keyed by opcode; `snapshot()` names them for humans."""

    def __init__(self) -> None:
        self.ops: dict[int, OpStats] = {}

    def record(self, opcode: int, elapsed_ns: int, error: bool) -> None:
        s = self.ops.get(opcode)
        if s is None:
            s = self.ops[opcode] = OpStats()
        s.count += 1
        if error:
            s.errors += 1
        s.total_ns += elapsed_ns
        b = (elapsed_ns // 1000).bit_length()
        s.buckets[b if b < NBUCKETS else NBUCKETS - 1] += 1

    def snapshot(self, name_of: Callable[[int], str]) -> StatsSnapshot:
        ops: dict[str, OpSnapshot] = {}
        total = errors = 0
        for opcode, s in sorted(self.ops.items()):
            total += s.count
            errors += s.errors
            ops[name_of(opcode)] = OpSnapshot(
                count=s.count,
                errors=s.errors,
                mean_us=s.total_ns // s.count // 1000 if s.count else 0,
                sum_us=s.total_ns // 1000,
                p50_us=s.percentile_us(0.5),
                p99_us=s.percentile_us(0.99),
                histogram_us={1 << b: n for b, n in enumerate(s.buckets) if n},
            )
        return StatsSnapshot(total=total, errors=errors, ops=ops)
