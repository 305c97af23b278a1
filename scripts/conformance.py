#!/usr/bin/env python3
"""CPython's own filesystem test modules, on a mount and natively, compared.

    python3 -m scripts.conformance [--out docs/CONFORMANCE.md] [--modules test_os ...]

Mounts a fresh source directory with the defaults (`actorfs mount SRC MNT`),
then runs each module with `python3 -m test` twice in the same run: once with
its working directory and TMPDIR inside the mount, once in a plain directory
beside the source (the same filesystem). Every test case's outcome (ok,
skipped, failure, error) is read from regrtest's JUnit XML, and the two runs
are compared case by case. Writes a Markdown report (docs/CONFORMANCE.md by
default). Needs root (a mount) and the `test` package of this Python.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULES = (
    "test_os test_shutil test_tempfile test_tarfile test_zipfile test_glob test_pathlib "
    "test_fileio test_posix test_stat test_genericpath test_posixpath test_filecmp "
    "test_fileinput test_mmap test_dbm_dumb test_sqlite3 test_logging test_compileall"
).split()


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(extra)
    return e


def available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("test." + module) is not None
    except ImportError:
        return False


def run_module(module: str, workdir: str, timeout: float = 900) -> dict:
    """Run one test module with cwd and TMPDIR in `workdir`.

    Returns {"cases": {name: "ok"|"skipped"|"failure"|"error"}, "rc": int,
    "seconds": float, "tail": last lines of output}."""
    os.makedirs(workdir, exist_ok=True)
    xml = os.path.join(tempfile.mkdtemp(prefix="conf-xml-"), "j.xml")
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "test", "--tempdir", workdir, "--junit-xml", xml,
             "--timeout", str(int(timeout)), module],
            cwd=workdir, env=env(TMPDIR=workdir), capture_output=True, text=True,
            timeout=timeout + 60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timed out after {e.timeout} s"
    seconds = time.monotonic() - t0
    cases: dict[str, str] = {}
    try:
        for tc in ET.parse(xml).getroot().iter("testcase"):
            status = "ok"
            for child in tc:
                if child.tag in ("skipped", "failure", "error"):
                    status = child.tag
                    break
            cases[tc.get("name", "?")] = status
    except (OSError, ET.ParseError):
        pass
    finally:
        shutil.rmtree(os.path.dirname(xml), ignore_errors=True)
    return {"cases": cases, "rc": rc, "seconds": seconds, "tail": out.strip().splitlines()[-15:]}


def compare(native: dict, mounted: dict) -> list[str]:
    """Test cases whose outcome differs (or that ran on one side only)."""
    a, b = native["cases"], mounted["cases"]
    out = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            out.append(f"{name}: native {a.get(name, 'absent')}, mount {b.get(name, 'absent')}")
    if not a and not b and native["rc"] != mounted["rc"]:
        out.append(f"exit status: native {native['rc']}, mount {mounted['rc']}")
    return out


def summary(r: dict) -> str:
    c = list(r["cases"].values())
    bad = c.count("failure") + c.count("error")
    verdict = "pass" if r["rc"] == 0 else f"FAIL (rc {r['rc']})"
    return f"{verdict}: {c.count('ok')} ok, {c.count('skipped')} skipped, {bad} failed ({r['seconds']:.0f} s)"


class Mount:
    """`actorfs mount SRC MNT -f OPTIONS` in a subprocess, unmounted on exit."""

    def __init__(self, src: str, mnt: str, *options: str):
        self.src, self.mnt, self.options = src, mnt, list(options)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Mount:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actorfs", "mount", self.src, self.mnt, "-f", *self.options],
            env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "serving" in line:
                # keep draining: a full pipe would stall the server
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return self
        raise RuntimeError("the mount did not come up")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        subprocess.run(["umount", "-l", self.mnt], capture_output=True)


def report(results: list, options: list[str], seconds: float) -> str:
    n_diff = sum(1 for r in results if r["diff"])
    lines = [
        "# CPython's filesystem tests on a mount and natively",
        "",
        "Written by `python3 -m scripts.conformance` (do not edit by hand). Each module of",
        "CPython's own test suite runs twice in the same run with `python3 -m test`: with",
        "its working directory and TMPDIR inside a default mount (`actorfs mount SRC MNT"
        + (" " + " ".join(options) if options else "") + "`), and in a plain directory on",
        "the same filesystem. Outcomes are compared test case by test case.",
        "",
        f"Python {platform.python_version()}, kernel {platform.release()}, as "
        + ("root" if os.geteuid() == 0 else f"uid {os.geteuid()}")
        + f"; {len(results)} modules, {seconds:.0f} s in all.",
        "",
        f"**Modules whose test cases differ between mount and native: {n_diff} of {len(results)}.**",
        "",
        "| module | native | mount | cases that differ |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['module']} | {summary(r['native'])} | {summary(r['mount'])} | {len(r['diff'])} |")
    for r in results:
        if r["diff"]:
            lines += ["", f"## {r['module']}: what differs", ""]
            lines += [f"- `{d}`" for d in r["diff"][:50]]
    both = [(r["module"], n) for r in results for n, v in sorted(r["native"]["cases"].items())
            if v in ("failure", "error") and r["mount"]["cases"].get(n) == v]  # fmt: skip
    if both:
        lines += ["", "## Failing natively too (the same on the mount)", "",
                  "These cases fail on this machine's native directory as well; they say",
                  "nothing about actorfs.", ""]  # fmt: skip
        lines += [f"- {m}: `{n}`" for m, n in both[:50]]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="+", default=MODULES, metavar="MODULE")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "CONFORMANCE.md"))
    ap.add_argument("--base", default="/tmp", help="where the scratch directories go")
    ap.add_argument("--timeout", type=float, default=900, help="per module and side, seconds")
    ap.add_argument("mount_options", nargs="*", help="extra actorfs mount options (after --)")
    a = ap.parse_args(argv)
    missing = [m for m in a.modules if not available(m)]
    if missing:
        print(f"not in this Python's test package: {' '.join(missing)}", file=sys.stderr)
    modules = [m for m in a.modules if m not in missing]
    base = tempfile.mkdtemp(prefix="actorfs-cpython-", dir=a.base)
    src, mnt, native = (os.path.join(base, n) for n in ("src", "mnt", "native"))
    for d in (src, mnt, native):
        os.mkdir(d)
    results = []
    t0 = time.monotonic()
    try:
        with Mount(src, mnt, *a.mount_options):
            for m in modules:
                rn = run_module(m, os.path.join(native, m), a.timeout)
                rm = run_module(m, os.path.join(mnt, m), a.timeout)
                d = compare(rn, rm)
                results.append({"module": m, "native": rn, "mount": rm, "diff": d})
                print(f"{m:18} native {summary(rn)} | mount {summary(rm)} | {len(d)} differ", flush=True)
                shutil.rmtree(os.path.join(mnt, m), ignore_errors=True)
                shutil.rmtree(os.path.join(native, m), ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = report(results, a.mount_options, time.monotonic() - t0)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        print(f"wrote {a.out}")
    return 0 if not any(r["diff"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
