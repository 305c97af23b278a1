"""Boot the test guest against a vhost-user-fs backend and collect what happened.

Used by tests/guest/test_guest_e2e.py, and usable by a benchmark to run the same
guest workload against actorfs and against Debian's reference daemon:

    python3 -m tests.guest.run            # both, one after the other, with timings
    python3 -m tests.guest.run actorfs    # just one (actorfs-api: without the CLI)

Each run gets a fresh directory with `from_host.txt`, as the workload expects.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.guest import image

REPO = Path(__file__).resolve().parents[2]
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
BOOT_TIMEOUT = 200  # ~10 s here; below pytest's 300 s so a hung guest still gets a report


def backend_command(name: str, sock: Path, root: Path) -> list[str]:
    if name == "actorfs":  # the command users run
        return [sys.executable, "-m", "actorfs", "serve", "--socket", str(sock), "--once",
                str(root)]
    if name == "actorfs-api":  # serve_vhost_user() called directly
        return [sys.executable, "-m", "tests.guest.serve", str(sock), str(root)]
    if name == "virtiofsd":
        return [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={root}", "-o", "cache=auto"]
    raise ValueError(f"unknown backend {name!r}: actorfs, actorfs-api or virtiofsd")


def prepare_root(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "from_host.txt").write_text("written by the host")


@dataclass
class GuestRun:
    console: str
    qemu_status: int
    qemu_stderr: str
    backend_status: int | None
    backend_log: str
    seconds: float  # QEMU start to exit: boot, workload, power-off

    def report(self) -> list[str]:
        m = re.search(r"ACTORFS-REPORT-BEGIN\s*\n(.*?)ACTORFS-REPORT-END", self.console, re.S)
        if not m:
            return []
        return [line.strip() for line in m.group(1).splitlines() if line.strip()]

    def context(self) -> str:
        return (f"\n--- qemu (status {self.qemu_status}) ---\n{self.qemu_stderr[-2000:]}"
                f"\n--- backend (status {self.backend_status}) ---\n{self.backend_log[-3000:]}"
                f"\n--- console ---\n{self.console[-4000:]}")


def run_guest(img: image.GuestImage, backend: str, workdir: Path, root: Path,
              reboot: bool = False, command: list[str] | None = None,
              pass_fds: tuple[int, ...] = ()) -> GuestRun:
    """Start the backend on a socket in workdir, boot the guest, wait for both to end.

    command: the backend's command line instead of backend_command()'s; pass_fds:
    fds handed to it (as a launcher does with a listening socket: closed here
    once the backend has them).
    """
    sock = workdir / f"{backend}.sock"
    console_log = workdir / f"{backend}-console.log"
    backend_log = workdir / f"{backend}.log"
    with open(backend_log, "wb") as blog:
        try:
            server = subprocess.Popen(command or backend_command(backend, sock, root),
                                      stdout=blog, stderr=subprocess.STDOUT, cwd=REPO,
                                      pass_fds=pass_fds)
        finally:
            for fd in pass_fds:
                os.close(fd)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{backend} did not create {sock} "
                                       f"(status {server.poll()}): {backend_log.read_text()}")
                time.sleep(0.05)
            start = time.monotonic()
            cmd = image.qemu_command(img, str(sock), str(console_log), reboot=reboot)
            try:
                qemu = subprocess.run(cmd, capture_output=True, text=True, timeout=BOOT_TIMEOUT)
                qemu_status, qemu_stderr = qemu.returncode, qemu.stderr
            except subprocess.TimeoutExpired as exc:  # run() has killed QEMU
                qemu_status = -1
                qemu_stderr = f"QEMU killed after {BOOT_TIMEOUT} s (the guest hung)\n" + (
                    exc.stderr.decode(errors="replace") if exc.stderr else "")
            seconds = time.monotonic() - start
            try:
                status = server.wait(timeout=60)  # leaves with its frontend (--once)
            except subprocess.TimeoutExpired:
                status = None
        finally:
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
    console = console_log.read_text(errors="replace") if console_log.exists() else ""
    return GuestRun(console, qemu_status, qemu_stderr, status,
                    backend_log.read_text(errors="replace"), seconds)


def main(argv: list[str]) -> int:
    backends = argv or ["actorfs", "virtiofsd"]
    img = image.build()
    worst = 0
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix=f"guest-{backend}-") as d:
            root = Path(d) / "shared"
            prepare_root(root)
            run = run_guest(img, backend, Path(d), root)
            lines = run.report()
            result = next((line for line in lines if line.startswith("RESULT")), "no report")
            failed = [line for line in lines if line.startswith("FAIL")]
            print(f"{backend:10s} {run.seconds:6.1f} s  {result}")
            for line in failed:
                print(f"  {line}")
            if failed or not lines:
                worst = 1
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
