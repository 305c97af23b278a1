"""Bar charts beside the benchmark tables: each target's ratio to native, per workload.

    python3 -m bench.plots docs/BENCHMARKS.md      # what bench/run.py does after writing it

Reads the report's own tables (so the pictures always show the figures
printed next to them), writes one PNG per workload table into plots/ beside
the report (`plots/<REPORT>-<workload>.png`) and links each under its table.
Running it again replaces the pictures and the links, never duplicates them.

Each bar is a target's speed relative to native on the same backing (for a
guest table: relative to virtiofsd), one group of bars per phase: the
bracketed ratio for higher-is-better figures, and native time / time for
lower-is-better ones, so on every chart taller is better and 1 is native.
The scale is logarithmic: ratios here span from about 1% to about 1.
Needs matplotlib (the `bench` extra: pip install -e '.[bench]').
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HEADER = re.compile(r"^### (\w+) \(([^,]+), (higher|lower) is better; in brackets: (.*)\)$")
RATIO = re.compile(r"\((\d+(?:\.\d+)?)(%|x)\)\s*$")
LINK = re.compile(r"^!\[[^\]]*\]\(plots/[^)]*\.png\)$")


@dataclass
class Table:
    workload: str
    unit: str
    higher: bool
    phases: list[str]
    end: int  # index of the line after the table's last row
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # target -> phase -> ratio


def parse(md: str) -> list[Table]:
    """The figures tables of a report, each with every non-native target's ratios."""
    lines = md.splitlines()
    tables = []
    i = 0
    while i < len(lines):
        m = HEADER.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        head = [c.strip() for c in lines[j].strip("|").split("|")]
        t = Table(m.group(1), m.group(2), m.group(3) == "higher", head[1:], 0)
        j += 2  # the header and the |---| line
        while j < len(lines) and lines[j].startswith("|"):
            cells = [c.strip() for c in lines[j].strip("|").split("|")]
            target, values = cells[0], cells[1:]
            for phase, cell in zip(t.phases, values, strict=False):
                r = RATIO.search(cell)
                if r is None:
                    continue
                v = float(r.group(1))
                speed = v / 100 if r.group(2) == "%" else (1 / v if v else 0.0)
                if r.group(2) == "x" and t.higher:  # a multiple of a higher-is-better figure
                    speed = v
                t.ratios.setdefault(target, {})[phase] = speed
            j += 1
        t.end = j
        tables.append(t)
        i = j
    return tables


def chart(t: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(t.ratios)
    n = max(len(targets), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(t.phases) + 3), 4.2), dpi=100)
    for k, target in enumerate(targets):
        xs = [p + (k - (n - 1) / 2) * width for p in range(len(t.phases))]
        ys = [t.ratios[target].get(ph, 0.0) for ph in t.phases]
        ax.bar(xs, [y if y > 0 else float("nan") for y in ys], width, label=target)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(t.phases)), t.phases)
    reference = "virtiofsd" if t.workload.startswith("guest_") else "native"
    ax.set_ylabel(f"speed relative to {reference} (1 = {reference})")
    ax.set_title(f"{t.workload} ({t.unit}, {'higher' if t.higher else 'lower'} is better "
                 "in the table; here taller is better)", fontsize=10)  # fmt: skip
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def annotate(report: Path) -> list[Path]:
    """Write the charts of `report` and link them under their tables; returns the PNGs."""
    text = report.read_text()
    lines: list[str] = []
    skip_blank = False
    for line in text.splitlines():  # drop the links of an earlier run, each with its blank
        if LINK.match(line):
            skip_blank = True
            continue
        if not (skip_blank and line == ""):
            lines.append(line)
        skip_blank = False
    tables = [t for t in parse("\n".join(lines)) if t.ratios]
    written = []
    for t in reversed(tables):  # insert from the bottom: earlier indexes stay valid
        png = report.parent / "plots" / f"{report.stem}-{t.workload}.png"
        chart(t, png)
        written.append(png)
        link = f"![{t.workload}: each target's speed relative to native](plots/{png.name})"
        if t.end < len(lines) and lines[t.end] == "":
            lines[t.end + 1:t.end + 1] = [link, ""]
        else:
            lines[t.end:t.end] = ["", link, ""]
    report.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
    return list(reversed(written))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    for name in argv:
        for png in annotate(Path(name)):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
