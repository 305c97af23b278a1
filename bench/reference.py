"""Another FUSE server measured in the same run: `bench.run --reference NAME=COMMAND`.

Ratios between servers mean something only when both ran in the same run on
the same machine state (docs/BENCHMARKS.md, "How to read these figures"), so
a comparison with another server (an older actorfs, a C passthrough server)
runs it as one more target. COMMAND mounts `{src}` on `{mnt}` and stays in
the foreground; the harness waits for the mount to appear in mountinfo,
runs the workloads, unmounts, and waits for the server to exit. No server
statistics are read from it: its rows have no latency table.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from actorfs.runtime.devfuse.mounting import is_mountpoint

MOUNT_TIMEOUT = 60.0  # seconds for the server to mount
EXIT_TIMEOUT = 20.0  # seconds for it to exit once unmounted


def is_mounted(mnt: Path) -> bool:
    """True when a mount's point is exactly `mnt`: read from mountinfo without
    stat-ing `mnt`, which a wedged server would never answer."""
    return is_mountpoint(str(mnt))


def command_line(template: str, src: Path, mnt: Path) -> list[str]:
    """The server's argv: the template split as a shell would, {src} and {mnt} filled in."""
    words = shlex.split(template)
    if not any("{mnt}" in w for w in words):
        raise ValueError(f"reference command {template!r} has no {{mnt}}: where would it mount?")
    return [w.format(src=src, mnt=mnt) for w in words]


class ReferenceServer:
    """Mounted on enter, unmounted on exit; the same shape as bench.server.ActorfsServer."""

    passthrough = ""  # unknown: not our server

    def __init__(self, command: str, src: Path, mnt: Path, log=None) -> None:
        self.argv = command_line(command, src, mnt)
        self.mnt, self.log = mnt, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ReferenceServer:
        if is_mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is already a mount point: unmount it first")
        # cwd "/": not this repository, whose packages would shadow another
        # checkout's (`python3 -m` puts the working directory first on sys.path).
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log, cwd="/",
                                     stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                cmd = shlex.join(self.argv)
                raise RuntimeError(f"{cmd} did not mount {self.mnt} (see the server log)")
            time.sleep(0.05)
        return self

    def stats(self) -> dict:
        return {}

    def __exit__(self, *exc) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=False)
        p = self.proc
        if p is None:
            return
        try:
            p.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if is_mounted(self.mnt):  # the server died mounted: the mount is dead too
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
