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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest import image

REPO = Path(__file__).resolve().parents[2]
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
BOOT_TIMEOUT = 200  # ~10 s here; a hung guest still gets a report within pytest's timeout
# The init's first line. Its kernel reaches it in 1-3 s here, ~10 s on a loaded machine.
INIT_MARK = "ACTORFS-INIT"
EARLY_BOOT_TIMEOUT = 90
MAX_BOOT_HANGS = 1  # boots again once after a kernel that hung before its init


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
    boot_hangs: list[str] = field(default_factory=list)  # console tails of boots redone

    @property
    def reached_init(self) -> bool:
        return INIT_MARK in self.console

    def report(self) -> list[str]:
        m = re.search(r"ACTORFS-REPORT-BEGIN\s*\n(.*?)ACTORFS-REPORT-END", self.console, re.S)
        if not m:
            return []
        return [line.strip() for line in m.group(1).splitlines() if line.strip()]

    def context(self) -> str:
        return (f"\n--- qemu (status {self.qemu_status}) ---\n{self.qemu_stderr[-2000:]}"
                f"\n--- backend (status {self.backend_status}) ---\n{self.backend_log[-3000:]}"
                f"\n--- console ---\n{self.console[-4000:]}"
                + "".join(f"\n--- boot redone after its kernel hung before init ---\n{tail}"
                          for tail in self.boot_hangs))


Launch = Callable[[], tuple[list[str], tuple[int, ...]]]


def run_guest(img: image.GuestImage, backend: str, workdir: Path, root: Path,
              reboot: bool = False, command: list[str] | None = None,
              launch: Launch | None = None) -> GuestRun:
    """Start the backend on a socket in workdir, boot the guest, wait for both to end.

    command: the backend's command line instead of backend_command()'s; launch:
    instead, a function returning a fresh (command line, fds handed to it), as a
    launcher that opens the listening socket itself does (the fds are closed
    here once the backend has them).

    A guest kernel that hangs before it runs its init (no ACTORFS-INIT on the
    console within EARLY_BOOT_TIMEOUT) is booted once more, against a fresh
    backend, and the hang is kept in GuestRun.boot_hangs. Until the init loads
    the virtio-fs driver, the backend has answered QEMU's start-up messages and
    gets no more (docs/RELIABILITY.md), so such a hang is the TCG guest's own.
    """
    hangs: list[str] = []
    while True:
        run = _run_once(img, backend, workdir, root, reboot, command, launch)
        if run.reached_init or len(hangs) >= MAX_BOOT_HANGS:
            run.boot_hangs = hangs
            return run
        hangs.append(run.console[-1500:])
        warnings.warn(f"the guest kernel hung before its init (boot {len(hangs)}); "
                      f"booting again. Console tail: {run.console[-300:]!r}", stacklevel=2)


def _run_once(img: image.GuestImage, backend: str, workdir: Path, root: Path, reboot: bool,
              command: list[str] | None, launch: Launch | None) -> GuestRun:
    sock = workdir / f"{backend}.sock"
    console_log = workdir / f"{backend}-console.log"
    backend_log = workdir / f"{backend}.log"
    for stale in (sock, console_log):
        stale.unlink(missing_ok=True)
    if launch is not None:
        argv, pass_fds = launch()
    else:
        argv, pass_fds = command or backend_command(backend, sock, root), ()
    with open(backend_log, "wb") as blog:
        try:
            server = subprocess.Popen(argv, stdout=blog, stderr=subprocess.STDOUT, cwd=REPO,
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
            qemu_status, qemu_stderr = _run_qemu(cmd, console_log)
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


def _run_qemu(cmd: list[str], console_log: Path) -> tuple[int, str]:
    """Run QEMU to its end, killing it if its guest has not reached its init by
    EARLY_BOOT_TIMEOUT or has not powered off by BOOT_TIMEOUT: (status, stderr)."""
    with tempfile.TemporaryFile() as err:
        qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        start = time.monotonic()
        reached_init = False
        try:
            while qemu.poll() is None:
                waited = time.monotonic() - start
                if not reached_init:
                    reached_init = INIT_MARK in _read(console_log)
                if not reached_init and waited > EARLY_BOOT_TIMEOUT:
                    why = f"the guest kernel did not reach its init in {EARLY_BOOT_TIMEOUT} s"
                    break
                if waited > BOOT_TIMEOUT:
                    why = f"the guest hung: not powered off after {BOOT_TIMEOUT} s"
                    break
                time.sleep(0.1)
            else:
                err.seek(0)
                return qemu.returncode, err.read().decode(errors="replace")
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        err.seek(0)
        return -1, f"QEMU killed: {why}\n" + err.read().decode(errors="replace")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


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
