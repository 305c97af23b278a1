"""Helpers for the real-mount tests: run the actorfs CLI, wait for the mount, clean up.

Everything that touches the mount from the test side runs in a subprocess
with a timeout, so a server bug shows up as a failed test, never a hung
pytest process; the host side is checked directly on the source directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ACTORFS = [sys.executable, "-m", "actorfs"]

needs_mount = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="real mounts need root and /dev/fuse",
)


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(extra)
    return e


def mountpoints() -> set[str]:
    from actorfs.runtime.devfuse.mounting import mountinfo

    return {m.mountpoint for m in mountinfo()}


def canonical(mnt) -> str:
    """Canonical path of a mountpoint without stat-ing it: that would ask the
    server, and deadlock when this very process serves the mount."""
    mnt = os.path.abspath(str(mnt))
    return os.path.join(os.path.realpath(os.path.dirname(mnt)), os.path.basename(mnt))


def is_mounted(mnt) -> bool:
    return canonical(mnt) in mountpoints()


def wait_until(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def force_unmount(mnt) -> None:
    """Last-resort cleanup: lazy unmount whatever is still on mnt."""
    for _ in range(4):
        if not is_mounted(mnt):
            return
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run `actorfs ARGS...` to completion."""
    return subprocess.run(
        [*ACTORFS, *args], env=env(), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, **kw,
    )  # fmt: skip


def sh(
    script: str, cwd=None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a shell script (real programs against the mount) with a timeout."""
    p = subprocess.run(
        ["sh", "-ec", script], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=env(LC_ALL="C"), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and p.returncode != 0:
        raise AssertionError(f"script failed ({p.returncode}):\n{script}\n{p.stdout}\n{p.stderr}")
    return p


def py(
    code: str, cwd=None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    """Run Python code in a subprocess (cwd usually inside the mount)."""
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and p.returncode != 0:
        raise AssertionError(f"python failed ({p.returncode}):\n{code}\n{p.stdout}\n{p.stderr}")
    return p


class CliMount:
    """`actorfs mount SRC MNT -f ...` in a subprocess, ready once it says so on stderr."""

    def __init__(self, src, mnt, *options: str):
        self.src, self.mnt = str(src), str(mnt)
        self.options = list(options)
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 30) -> CliMount:
        self.proc = subprocess.Popen(
            [*ACTORFS, "mount", self.src, self.mnt, "-f", *self.options],
            env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise AssertionError(f"mount did not become ready: {self.stderr}")
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving" in line:
                self._ready.set()
        self._ready.set()  # EOF: the process is gone

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL; always leaves MNT unmounted."""
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(20)
        elif self.proc is not None:
            rc = self.proc.returncode
        force_unmount(self.mnt)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def __enter__(self) -> CliMount:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return False
    return True


def make_dirs(tmp_path, hello: bool = True):
    """src/ and mnt/ under tmp_path (src/hello holds "hi\\n" unless hello=False)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    if hello:
        (src / "hello").write_text("hi\n")
    return src, mnt
