"""actorfs under the benchmark: a mount in a separate process whose stats we can read.

Server side (`python3 -m bench.server SRC MNT STATS_FILE [mount options]`): the
same thing `actorfs mount SRC MNT -f [options]` runs (the CLI's parser, config
and event loop, the actorfs.runtime.devfuse.server API), plus: on SIGUSR1 it writes
`MountedServer.stats()` as JSON to STATS_FILE and prints `stats` on stdout;
on SIGTERM it unmounts and exits.

Harness side: `ActorfsServer(src, mnt, options)` as a context manager.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ActorfsServer:
    """A benchmark mount: started on enter, stats() on demand, unmounted on exit."""

    def __init__(self, src: Path, mnt: Path, options: list[str], log=None, wrap: list[str] = (),
                 python_args: list[str] = ()):  # fmt: skip
        self.src, self.mnt, self.options = src, mnt, options
        self.log = log
        self.wrap = list(wrap)  # e.g. ["py-spy", "record", "-o", "x.svg", "--"]
        self.python_args = list(python_args)  # e.g. ["-m", "cProfile", "-o", "x.prof"]
        fd, self.stats_file = tempfile.mkstemp(prefix="actorfs-bench-stats-", suffix=".json")
        os.close(fd)
        self.proc: subprocess.Popen | None = None
        self.passthrough = ""  # the mount's passthrough reason, from its stats

    def __enter__(self) -> ActorfsServer:
        cmd = [*self.wrap, sys.executable, *self.python_args, "-m", "bench.server", str(self.src),
               str(self.mnt), self.stats_file, *self.options]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log or None,
                                     cwd=REPO, text=True, bufsize=1)  # fmt: skip
        line = self._line(60)
        if line != "ready":
            self.__exit__(None, None, None)
            raise RuntimeError(f"actorfs did not mount {self.mnt}: {line!r} (see the server log)")
        return self

    def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return "<timeout>"
        return self.proc.stdout.readline().strip() or f"<exit {self.proc.poll()}>"

    def stats(self) -> dict:
        """The server's MountedServer.stats(), taken now."""
        assert self.proc is not None
        # The pid to signal is the Python server's, even under a wrapper.
        os.kill(self.server_pid(), signal.SIGUSR1)
        line = self._line(30)
        if line != "stats":
            raise RuntimeError(f"actorfs did not answer for stats: {line!r}")
        with open(self.stats_file) as f:
            full = json.load(f)
        pt = full.get("passthrough") or {}
        self.passthrough = pt.get("reason", "")
        return full.get("requests", {})

    def server_pid(self) -> int:
        with open(self.stats_file + ".pid") as f:
            return int(f.read())

    def __exit__(self, *exc) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.kill(self.server_pid(), signal.SIGTERM)
            except (OSError, ValueError):
                p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Never leave a mount behind, whatever happened to the server.
        subprocess.run(["umount", "-l", str(self.mnt)], stderr=subprocess.DEVNULL, check=False)
        for f in (self.stats_file, self.stats_file + ".pid"):
            with _suppress():
                os.unlink(f)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


# -- the server process -----------------------------------------------------------------


async def _serve(args, config, stats_file: str) -> int:
    import asyncio

    from actorfs.runtime.cli import main as cli
    from actorfs.runtime.devfuse.server import mount

    async with mount(config, args.mnt, **cli.mount_options(args)) as server:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def dump() -> None:
            tmp = stats_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(server.stats(), f)
            os.replace(tmp, stats_file)
            print("stats", flush=True)

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, dump)
        print("ready", flush=True)
        waiter = asyncio.ensure_future(server.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (waiter, stopper):
            t.cancel()
        await asyncio.gather(waiter, stopper, return_exceptions=True)
    return 0


def main(argv: list[str]) -> int:
    from actorfs.runtime.cli import main as cli

    src, mnt, stats_file, *options = argv
    # Bench-only switches (not CLI options), to measure what a feature costs.
    no_watch = "--bench-no-watch" in options
    options = [o for o in options if o != "--bench-no-watch"]
    with open(stats_file + ".pid", "w") as f:
        f.write(str(os.getpid()))
    args = cli.build_parser().parse_args(["mount", src, mnt, "-f", *options])
    cli.setup_logging(args.debug)
    cli.prepare_process()  # as `actorfs mount` does
    config = cli.make_config(args, os.path.realpath(src))
    if no_watch:
        config.watch = False
    t0 = time.monotonic()
    rc = cli.run_loop(_serve(args, config, stats_file))
    print(f"served for {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
