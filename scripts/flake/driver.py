"""Reproduce the guest ring flake ("id N is not a head!", docs/RELIABILITY.md).

Boots the test guest once with scripts/flake/repro.sh as its workload: the file
phases of tests/guest/workload.sh (a 16 MiB file, 300 small files, four parallel
writers) ITERS times, each in a fresh directory, stopping at the first
"not a head" in the guest's kernel log.

    PYTHONPATH=. python3 -m scripts.flake.driver BACKEND ITERS [--smp N] [--big MiB]
        [--timeout S] [--repo CHECKOUT] [--keep CONSOLE_COPY]

BACKEND: actorfs, actorfs-api or virtiofsd (tests/guest/run.py's command lines);
--repo runs actorfs from another checkout (e.g. one with the old code).
Prints the REPRO lines and a RESULT line; exit status 0 when all ITERS ran clean.
About 3 s per iteration under TCG on 2 CPUs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.guest import image
from tests.guest import run as run_mod

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("backend")
    ap.add_argument("iters", type=int)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--big", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=3000)
    ap.add_argument("--keep", default=None, help="copy the console log here")
    ap.add_argument("--repo", default=str(run_mod.REPO),
                    help="run the backend from this checkout (e.g. /work/main for the old code)")
    a = ap.parse_args()
    img = image.build({"workload.sh": HERE / "repro.sh"})
    with tempfile.TemporaryDirectory(prefix=f"flake-{a.backend}-") as d:
        d = Path(d)
        root = d / "shared"
        run_mod.prepare_root(root)
        sock = d / "fs.sock"
        console = d / "console.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = a.repo
        blog = open(d / "backend.log", "wb")
        server = subprocess.Popen(run_mod.backend_command(a.backend, sock, root), stdout=blog,
                                  stderr=subprocess.STDOUT, cwd=a.repo, env=env)
        while not sock.exists():
            if server.poll() is not None:
                print((d / "backend.log").read_text())
                return 2
            time.sleep(0.05)
        cmd = image.qemu_command(img, str(sock), str(console))
        cmd[cmd.index("-smp") + 1] = str(a.smp)
        ai = cmd.index("-append") + 1
        cmd[ai] += f" repro.iters={a.iters} repro.big={a.big}"
        start = time.monotonic()
        qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = 0
        result = "timeout"
        last_iter = 0
        try:
            while True:
                time.sleep(1)
                text = console.read_text(errors="replace") if console.exists() else ""
                lines = text.splitlines()
                for line in lines[seen:]:
                    if "REPRO-ITER" in line:
                        last_iter = int(line.split()[1])
                        if last_iter % 10 == 0:
                            print(f"{time.monotonic() - start:7.0f}s {line.strip()}", flush=True)
                    elif "not a head" in line or "REPRO-" in line or "BUG" in line or "virtio" in line.lower():
                        print(f"{time.monotonic() - start:7.0f}s {line.strip()}", flush=True)
                seen = len(lines)
                if "not a head" in text:
                    result = "NOTAHEAD"
                    time.sleep(5)
                    break
                if "REPRO-END" in text:
                    result = "clean"
                    break
                if qemu.poll() is not None:
                    result = f"qemu exited {qemu.returncode}"
                    break
                if time.monotonic() - start > a.timeout:
                    break
        finally:
            if result == "NOTAHEAD":
                # let the server dump while the queue is still mapped
                server.send_signal(10)
                time.sleep(3)
            if qemu.poll() is None:
                try:
                    qemu.wait(60 if result == "clean" else 1)
                except subprocess.TimeoutExpired:
                    qemu.kill()
                    qemu.wait()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.terminate()
                try:
                    server.wait(10)
                except subprocess.TimeoutExpired:
                    server.kill()
            if a.keep:
                import shutil
                shutil.copy(console, a.keep)
                shutil.copy(d / "backend.log", a.keep + ".backend")
        print(f"RESULT backend={a.backend} smp={a.smp} iters_done={last_iter} result={result} "
              f"seconds={time.monotonic() - start:.0f} qemu_rc={qemu.returncode} "
              f"backend_rc={server.returncode}", flush=True)
        if result != "clean":
            print(qemu.stderr.read().decode(errors="replace")[-2000:] if qemu.stderr else "")
            print((d / "backend.log").read_text(errors="replace")[-3000:])
    return 0 if result == "clean" else 1


if __name__ == "__main__":
    sys.exit(main())
