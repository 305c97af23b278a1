"""The `actorfs` command: mount a directory, serve it to a VM, or run the demo.

    actorfs mount SRC MNT [-f] [--cache auto] ...   FUSE mount on the host
    actorfs serve --socket PATH SRC ...             virtio-fs over vhost-user
    actorfs stats MNT|SOCKET                        live request figures of a running server
    actorfs demo                                    mount a sample tree, use it, unmount
    actorfs SRC MNT -o OPTS                         the mount helper form (mount -t fuse.actorfs)

Every user error is one line, `actorfs: error: ...`, naming the thing and the
fix, with exit status 2 (as argparse does); no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, NotRequired, Protocol, TypedDict, TypeVar

from actorfs.runtime.core.waits import first_of
from actorfs.runtime.devfuse import mounting as fuse_mount
from actorfs.runtime.devfuse.mounting import MountError
from actorfs.runtime.host.backing_fs import INLINE_MODES
from actorfs.runtime.host.limits import apply_fd_caps, keep_large_buffers, raise_nofile_limit
from actorfs.runtime.ops.filesystem import (
    CACHE_MODES,
    SYMLINK_POLICIES,
    ConfigError,
    FsConfig,
    check_root,
)

if TYPE_CHECKING:
    # Imported where used: the command line loads only the transport it runs.
    from actorfs.runtime.cli.observe import Observers, StatsFn
    from actorfs.runtime.devfuse.server import MountedServer
    from actorfs.runtime.fuse.dispatcher import DispatcherStats
    from actorfs.runtime.vhost.server import Connection

PROG = "actorfs"
USER_ERROR = 2

T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix; str() is the one line to print."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        raise UserError(f"{message} (see {self.prog} --help)")


def fail(message: str, status: int = USER_ERROR) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return status


# -- argument parsing -----------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return v


def _whole_number(lo: int, hi: int, unit: str = "", lo_text: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from lo to hi, else one line saying so."""
    of = f" of {unit}" if unit else ""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number{of}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: use {lo}{lo_text} to {hi}"
            )
        return v

    return parse


_queues = _whole_number(1, 64)
_poll_us = _whole_number(0, 100_000, "microseconds")
_read_ahead = _whole_number(0, 1 << 20, "KiB", " (the kernel's)")
_fd_cache = _whole_number(1, 1 << 24, "fds")


def _mount_flags(text: str) -> tuple[str, ...]:
    from actorfs.runtime.devfuse.mounting import MOUNT_FLAGS

    flags = tuple(dict.fromkeys(f for f in text.split(",") if f))
    for f in flags:
        if f not in MOUNT_FLAGS:
            raise argparse.ArgumentTypeError(f"{f!r} is not a mount flag: use {', '.join(MOUNT_FLAGS)}")
    return flags


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512M', '1G', '4096' -> bytes (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 4096, 64M or 1G")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def _add_fs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--symlinks", choices=SYMLINK_POLICIES, default="opaque",
                   help="opaque: served as links whatever their target says, never followed by "
                        "the server (default); follow: served as their targets, even outside the "
                        "root: a client (who can make links) reaches every host path this server "
                        "can; links into this server's own mount (or any actorfs mount) are "
                        "ELOOP; deny: no new symlinks or hard links, and links whose target leaves "
                        "the root refused (EACCES)")  # fmt: skip
    p.add_argument("--no-devices", dest="devices", action="store_false",
                   help="refuse mknod of character and block devices (EPERM; the overlayfs "
                        "whiteout c 0 0 stays allowed). Without it a root client may make device "
                        "nodes in SRC, as it could on the host: the server never opens them, but "
                        "host programs that open files in SRC would; a nodev mount of SRC's "
                        "filesystem disarms them")  # fmt: skip
    p.add_argument("--cache", choices=CACHE_MODES, default="auto",
                   help="client caching: never (direct I/O), auto (1 s), always (host changes watched)")  # fmt: skip
    p.add_argument("--read-only", action="store_true", help="refuse every change (EROFS)")
    p.add_argument("--watch", dest="watch", action="store_true", default=None,
                   help="watch the host for changes and invalidate the client's caches "
                        "(default: on with --cache always)")  # fmt: skip
    p.add_argument("--no-watch", dest="watch", action="store_false",
                   help="do not watch the host for changes")  # fmt: skip
    p.add_argument("--inline", choices=INLINE_MODES, default="auto",
                   help="run syscalls on the event loop instead of the thread pool: "
                        "auto (all of them when SRC is on tmpfs or ramfs, which never wait "
                        "for a disk; only fstat on ext4, xfs, btrfs, f2fs), always, never")  # fmt: skip
    p.add_argument("--fd-cache", type=_fd_cache, metavar="N", default=None,
                   help="O_PATH fds kept open for inodes the client knows (least recently "
                        "used evicted, reopened on use); default: from RLIMIT_NOFILE, "
                        "leaving room for open files and directories")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="log what the server does to stderr")
    p.add_argument("--stats-interval", type=_positive_float, metavar="N",
                   help="print request statistics to stderr every N seconds")  # fmt: skip
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                   help="log messages of this level and above to stderr (default warning; "
                        "--debug: debug)")  # fmt: skip
    p.add_argument("--metrics", metavar="ADDR", default=None,
                   help="serve Prometheus metrics on ADDR: PORT or HOST:PORT (localhost "
                        "unless HOST is given) or a unix socket path (default: off)")  # fmt: skip
    p.add_argument("--stats-socket", metavar="PATH", default=None,
                   help="where `actorfs stats` reads this server's figures (default: an "
                        "abstract socket named after MNT or the socket; 'none': off)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A passthrough FUSE / virtio-fs filesystem server.",
                     epilog="Also `actorfs SRC MNT -o OPTIONS`, the form mount.fuse3 runs for "
                            "`mount -t fuse.actorfs` and fstab lines (docs/INTEGRATION.md).")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    m = sub.add_parser("mount", help="mount SRC on MNT through /dev/fuse",
                       description="Serve the directory SRC on the mountpoint MNT.")  # fmt: skip
    m.add_argument("src", metavar="SRC", help="the directory to serve")
    m.add_argument("mnt", metavar="MNT", help="an existing empty directory to mount on")
    _add_fs_options(m)
    m.add_argument("--writeback", action="store_true", help="let the kernel cache writes")
    m.set_defaults(passthrough="auto")
    m.add_argument("--passthrough", dest="passthrough", action="store_const", const="on",
                   help="let the kernel read and write opened files directly (FUSE "
                        "passthrough, Linux 6.9+, root) even with --writeback or --cache "
                        "never. Default: auto, on when the kernel offers it, the server "
                        "runs as root and neither of those options is given")  # fmt: skip
    m.add_argument("--no-passthrough", dest="passthrough", action="store_const", const="off",
                   help="never use FUSE passthrough")  # fmt: skip
    m.add_argument("--allow-other", action="store_true",
                   help="let other users use the mount (a root server creates and changes "
                        "things with their credentials: the host kernel checks them)")  # fmt: skip
    m.add_argument("--mount-flags", type=_mount_flags, metavar="LIST", default=(),
                   help="VFS flags for the mount, comma-separated: noexec, sync, dirsync, "
                        "noatime, nodiratime (nosuid and nodev are always set)")  # fmt: skip
    m.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    m.add_argument("--queues", type=_queues, metavar="N",
                   help="/dev/fuse queues (cloned fds) to read from (default 1)")  # fmt: skip
    m.add_argument("--poll", type=_poll_us, metavar="US", default=None,
                   help="keep reading /dev/fuse for US microseconds before sleeping: "
                        "saves a wake-up per request under load, costs that much CPU "
                        "after the last one (default 200; 0 sleeps at once)")  # fmt: skip
    m.add_argument("--read-ahead", type=_read_ahead, metavar="KB", default=None,
                   help="the mount's readahead window in KiB (default 1024; 0 keeps the "
                        "kernel's 128; needs root)")  # fmt: skip

    s = sub.add_parser("serve", help="serve SRC to a VM over a vhost-user socket (virtio-fs)",
                       description="Serve the directory SRC to a virtio-fs frontend.")  # fmt: skip
    s.add_argument("src", metavar="SRC", nargs="?", help="the directory to serve")
    s.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH",
                   help="the vhost-user socket to create")  # fmt: skip
    s.add_argument("--fd", type=_whole_number(0, 1 << 20), metavar="N", default=None,
                   help="serve on this already-listening unix socket, passed by the "
                        "launcher (instead of --socket)")  # fmt: skip
    s.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend's capabilities as JSON and exit")  # fmt: skip
    s.add_argument("--once", action="store_true", help="exit after the first frontend disconnects")
    s.add_argument("--dax-window", metavar="NAME", help="POSIX shm object name of the DAX window")
    s.add_argument("--dax-size", type=parse_size, default=0, metavar="SIZE",
                   help="DAX window size, e.g. 1G (0: no DAX)")  # fmt: skip
    s.add_argument("--allow-unsealed-memory", action="store_true",
                   help="accept guest memory not sealed against shrinking (e.g. "
                        "memory-backend-file): a frontend that truncates it could then "
                        "kill the server (default: memfd with F_SEAL_SHRINK only)")  # fmt: skip
    _add_fs_options(s)

    st = sub.add_parser("stats", help="show a running server's request rates, errors and latency",
                        description="Live per-op figures of the server serving MNT (a "
                                    "mountpoint) or SOCKET (its vhost-user socket or its stats "
                                    "socket), refreshed in place; Ctrl-C to quit.")  # fmt: skip
    st.add_argument("target", metavar="MNT|SOCKET")
    st.add_argument("-n", "--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 1)")  # fmt: skip
    st.add_argument("--once", action="store_true", help="print one reading and exit")

    j = sub.add_parser("vhost-user-json",
                       help="write the vhost-user JSON description of actorfs-virtiofsd",
                       description="Write the description QEMU's and libvirt's backend "
                                   "discovery reads (e.g. into /usr/share/qemu/vhost-user/).")  # fmt: skip
    j.add_argument("file", metavar="FILE", nargs="?", help="where to write it (default: stdout)")
    j.add_argument("--binary", metavar="PATH", default=None,
                   help="the daemon it names (default: actorfs-virtiofsd on PATH)")  # fmt: skip

    d = sub.add_parser("demo", help="mount a sample tree, work in it with real programs, unmount",
                       description="A self-contained tour: needs root or fusermount3.")  # fmt: skip
    d.add_argument("--hold", action="store_true", help="stay mounted until Ctrl-C")
    d.add_argument("--keep", action="store_true", help="keep the demo directories afterwards")
    return parser


def make_config(args: argparse.Namespace, root: str) -> FsConfig:
    config = FsConfig(
        root=root,
        symlinks=args.symlinks,
        cache=args.cache,
        writeback=getattr(args, "writeback", False),
        passthrough=getattr(args, "passthrough", "off"),
        read_only=args.read_only,
        devices=getattr(args, "devices", True),
        watch=getattr(args, "watch", None),
        inline=getattr(args, "inline", "auto"),
        fd_cache=getattr(args, "fd_cache", None),
    )
    apply_fd_caps(config)  # EMFILE from the caps before the process runs out of fds
    return config


LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(debug: bool, level: str | None = None) -> None:
    from actorfs.runtime.cli.sd_notify import journal_formatter

    level = level or ("debug" if debug else "warning")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="actorfs: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    fmt = journal_formatter()  # stderr is the journal: syslog priorities it understands
    if fmt is not None:
        for h in logging.getLogger().handlers:
            h.setFormatter(fmt)


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if hasattr(uvloop, "run"):
        return uvloop.run(coro)
    uvloop.install()
    return asyncio.run(coro)


# -- stats ----------------------------------------------------------------------------


def format_stats(stats: Mapping[str, Any]) -> str:
    """A short human summary of MountedServer.stats() / Dispatcher.stats()."""
    req = stats.get("requests", stats)
    lines = [
        f"actorfs stats: {stats.get('mountpoint', '')} up {stats.get('uptime_s', 0):.0f}s, "
        f"{req.get('total', 0)} requests, {req.get('errors', 0)} errors, "
        f"{req.get('in_flight', 0)} in flight"
    ]
    ops = sorted(req.get("ops", {}).items(), key=lambda kv: -kv[1]["count"])
    for name, o in ops[:12]:
        lines.append(
            f"  {name:<16} {o['count']:>9} req {o['errors']:>7} err  "
            f"p50 {o['p50_us']:>7}us  p99 {o['p99_us']:>8}us"
        )
    i = stats.get("inodes")
    if i:
        lines.append(
            f"  inodes: {i['inodes_known']} known, {i['fds_held']} fds held "
            f"(cache {i['fds_cached']}/{i['cache_cap']}, {i['fds_pinned']} with open handles), "
            f"{i['hits']} hits, {i['misses']} misses, {i['evictions']} evictions, reopened "
            f"{i['reopened_by_handle']} by handle / {i['reopened_by_path']} by path, {i['stale']} stale"
        )
    pt = stats.get("passthrough")
    if pt:
        lines.append(f"  passthrough {pt.get('reason') or ('on' if pt.get('on') else 'off')}")
    t = stats.get("transport")
    if t:
        lines.append(
            f"  /dev/fuse: {t['queues']} queue(s), {t['frames']} frames, "
            f"{t['replies_dropped']} interrupted replies, notifications "
            f"{t['notify_delivered']} sent / {t['notify_undelivered']} not delivered"
        )
    return "\n".join(lines)


def _print_stats(server: MountedServer) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(format_stats(server.stats()), file=sys.stderr, flush=True)


# -- mount ----------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    from actorfs.runtime.cli.mount_helper import log_notes

    setup_logging(args.debug, args.log_level)
    log_notes()  # what the mount helper form ignored
    # Everything the user can get wrong is checked here, before any fork.
    src = fuse_mount.check_source(args.src)
    fuse_mount.check_device()
    mnt, _ = fuse_mount.check_mountpoint(args.mnt)
    fuse_mount.check_nesting(src, mnt)
    if os.geteuid() != 0 and fuse_mount.fusermount_path() is None:
        raise MountError(
            "not running as root and fusermount3 is not installed: install fuse3 (apt-get install fuse3)"
        )
    config = make_config(args, src)
    if args.foreground:
        return run_loop(_serve_mount(args, config, mnt, on_ready=_foreground_ready))
    return _daemonize(lambda on_ready: run_loop(_serve_mount(args, config, mnt, on_ready)))


def _unmount_hint(mnt: str) -> str:
    return f"umount {mnt}" if os.geteuid() == 0 else f"fusermount3 -u {mnt}"


def _announce_foreground(server: MountedServer) -> None:
    print(
        f"{PROG}: serving {server.config.root} on {server.mountpoint}, "
        f"{server.passthrough_status} "
        f"(Ctrl-C or `{_unmount_hint(server.mountpoint)}` to unmount)",
        file=sys.stderr,
        flush=True,
    )


class MountOptions(TypedDict):
    """The keyword arguments of mount() that `actorfs mount`'s options set."""

    allow_other: bool
    queues: int | None
    read_ahead_kb: int
    poll_us: int
    mount_flags: tuple[str, ...]


def mount_options(args: argparse.Namespace) -> MountOptions:
    """mount()'s keyword arguments from `actorfs mount`'s options."""
    from actorfs.runtime.devfuse.server import DEFAULT_POLL_US, DEFAULT_READ_AHEAD_KB

    return {
        "allow_other": args.allow_other,
        "queues": args.queues,
        "read_ahead_kb": DEFAULT_READ_AHEAD_KB if args.read_ahead is None else args.read_ahead,
        "poll_us": DEFAULT_POLL_US if args.poll is None else args.poll,
        "mount_flags": tuple(args.mount_flags or ()),
    }


class OnReady(Protocol):
    """Told how the mount start ended: `server` once it is ready, else None with the
    error and exit status; returns the status to exit with (None once ready)."""

    def __call__(
        self, server: MountedServer | None, error: str | None = None, status: int = USER_ERROR
    ) -> int | None: ...


async def _serve_mount(
    args: argparse.Namespace, config: FsConfig, mnt: str, on_ready: OnReady
) -> int:
    from actorfs.runtime.cli import sd_notify
    from actorfs.runtime.devfuse.server import ServerFailed, mount

    server = mount(config, mnt, **mount_options(args))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    observers = _observers(args, server.stats, mnt)
    try:
        await observers.start()  # before mounting: a bad --metrics is said at once
    except (OSError, ValueError) as exc:
        return on_ready(None, f"cannot serve metrics on {args.metrics}: {exc}") or USER_ERROR

    def request_stop() -> None:
        if not stop.is_set():
            sd_notify.stopping(f"unmounting {mnt}")
        stop.set()
        server.request_stop()

    # Installed before mounting, so a signal during start-up still unmounts;
    # SIGHUP too: a closed terminal must not leave a dead mount behind.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, request_stop)
    loop.add_signal_handler(signal.SIGUSR1, _print_stats, server)
    try:
        await server.start()
    except MountError as exc:
        _remove_handlers(loop)
        await observers.close()
        return on_ready(None, str(exc)) or USER_ERROR
    except ServerFailed as exc:
        _remove_handlers(loop)
        await observers.close()
        return on_ready(None, str(exc), 1) or 1
    if not server.ready:  # a signal arrived while mounting
        await server.stop()
        _remove_handlers(loop)
        await observers.close()
        return on_ready(None, "stopped by a signal before the mount was ready", 1) or 1
    ticker = None
    if args.stats_interval:
        ticker = asyncio.create_task(_stats_every(server, args.stats_interval))
    on_ready(server)
    extra = observers.summary()
    sd_notify.ready(f"serving {config.root} on {mnt}" + (f"; {extra}" if extra else ""))
    waiter = asyncio.create_task(server.wait())  # awaited below for its outcome
    try:
        await first_of(waiter, stop.wait())
    finally:
        if ticker is not None:
            ticker.cancel()
        await server.stop()
        _remove_handlers(loop)
        await observers.close()
    if server.failure is not None:
        print(f"{PROG}: server failed: {server.reason}: {server.failure}", file=sys.stderr)
        with contextlib.suppress(BaseException):
            await waiter
        return 1
    with contextlib.suppress(BaseException):
        await waiter
    return 0


def _remove_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        loop.remove_signal_handler(sig)


async def _stats_every(server: MountedServer, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        _print_stats(server)


def _daemonize(serve: Callable[[OnReady], int]) -> int:
    """Fork; the parent exits 0 only once the child's mount is ready.

    The child reports on a pipe: "ok" when ready, or "<status> <message>".
    Then it leaves the terminal: new session, / as cwd, stdio on /dev/null.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace").strip()
        if msg.startswith("ok "):
            where, _, status = msg[3:].partition("\t")
            print(
                f"{PROG}: mounted on {where} (server pid {pid}, {status or 'passthrough unknown'}); "
                f"unmount with `{_unmount_hint(where)}`"
            )
            return 0
        if msg:
            status, _, text = msg.partition(" ")
            print(text, file=sys.stderr)
            return int(status) if status.isdigit() else 1
        # The child died before saying anything.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return fail("the server exited before the mount was ready (run with -f to see why)", 1)
    # child
    os.close(r)
    os.setsid()
    os.chdir("/")
    report = os.fdopen(w, "w")

    def on_ready(
        server: MountedServer | None, error: str | None = None, status: int = USER_ERROR
    ) -> int | None:
        if server is None:
            report.write(f"{status} {PROG}: error: {error}\n")
            report.close()
            return status
        report.write(f"ok {server.mountpoint}\t{server.passthrough_status}\n")
        report.close()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        return None

    exit_status = USER_ERROR
    try:
        exit_status = serve(on_ready)
    except BaseException:
        exit_status = 1
    finally:
        with contextlib.suppress(OSError, ValueError):
            report.close()
        os._exit(exit_status or 0)


def _foreground_ready(
    server: MountedServer | None, error: str | None = None, status: int = USER_ERROR
) -> int | None:
    if server is None:
        fail(str(error), status)  # as the daemon's report: always given with no server
        return status
    _announce_foreground(server)
    return None


# -- serve (virtio-fs) ----------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from actorfs.runtime.cli import sd_notify
    from actorfs.runtime.vhost.conventions import capabilities_json

    if args.print_capabilities:
        print(capabilities_json())
        return 0
    setup_logging(args.debug, args.log_level)
    if args.src is None:
        raise UserError("serve needs SRC, the directory to serve")
    if (args.socket is None) == (args.fd is None):
        raise UserError("serve: one of these is required: --socket PATH, or --fd N (a listening socket)")
    try:
        from actorfs.runtime.vhost.server import SocketInUse, serve_vhost_user
    except ImportError as exc:
        return fail(f"serve is unavailable in this build ({exc}): use actorfs mount instead")
    config = make_config(args, check_root(args.src))
    if args.dax_size and args.dax_window is None:
        args.dax_window = f"/actorfs-dax-{os.getpid()}"

    where = args.socket or f"fd {args.fd}"
    live: dict[str, Connection] = {}

    def stats() -> ServeStats:
        conn = live.get("conn")
        out: ServeStats = {"socket": where, "root": config.root, "uptime_s": round(time.monotonic() - t0, 3)}
        if conn is not None:
            out["requests"] = conn.dispatcher.stats()
        return out

    t0 = time.monotonic()
    observers = _observers(args, stats, args.socket or f"fd-{os.getpid()}")

    async def main() -> int:
        try:
            await observers.start()
        except (OSError, ValueError) as exc:
            return fail(f"cannot serve metrics on {args.metrics}: {exc}", 1)
        extra = observers.summary()
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def stop() -> None:
            sd_notify.stopping(f"stopping: {where}")
            stopping.set()

        # Installed before listening: a signal once the socket exists still cleans up.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        server = serve_vhost_user(
            config,
            args.socket,
            once=args.once,
            dax_name=args.dax_window,
            dax_size=args.dax_size,
            stats_interval=args.stats_interval or 0,
            allow_unsealed_memory=args.allow_unsealed_memory,
            listen_fd=args.fd,
            on_connection=lambda conn: live.__setitem__("conn", conn),
        )
        entered = False
        try:
            async with server:
                entered = True
                sd_notify.ready(f"serving {config.root} on {where}" + (f"; {extra}" if extra else ""))
                await first_of(server.wait(), stopping.wait())
            return 0
        except Exception as exc:
            if entered:
                return fail(f"serving the frontend failed: {exc}", 1)
            if isinstance(exc, (ConfigError, SocketInUse, ValueError, OSError)):
                return fail(str(exc), 1)  # a user error: one line
            raise
        finally:
            await observers.close()

    return run_loop(main()) or 0


class ServeStats(TypedDict):
    """What `actorfs serve` shows on its stats socket and metrics."""

    socket: str
    root: str
    uptime_s: float
    requests: NotRequired[DispatcherStats]  # once a frontend connected


def _observers(args: argparse.Namespace, stats: StatsFn, target: str) -> Observers:
    from actorfs.runtime.cli.observe import Observers, stats_socket_for

    path = args.stats_socket
    if path is None:
        path = stats_socket_for(target)
    elif path == "none":
        path = None
    return Observers(stats, stats_socket=path, metrics=args.metrics)


def cmd_stats(args: argparse.Namespace) -> int:
    from actorfs.runtime.cli.stats_view import run_stats_view

    return run_stats_view(args.target, interval=args.interval, once=args.once)


def cmd_vhost_user_json(args: argparse.Namespace) -> int:
    from actorfs.runtime.vhost.conventions import write_description

    return write_description(args.file, args.binary)


# -- demo -----------------------------------------------------------------------------

_DEMO_TREE = {
    "README.txt": "This tree lives in the source directory; you are reading it through FUSE.\n",
    "notes/todo.txt": "- mount\n- use\n- unmount\n",
    "notes/ideas.md": "# ideas\nactors own state; the loop never blocks\n",
    "data/numbers.csv": "".join(f"{i},{i * i}\n" for i in range(100)),
}

_DEMO_SCRIPT = r"""
set -e
cd "$MNT"
echo '$ ls -lR'; ls -lR | head -30
echo '$ cat README.txt'; cat README.txt
echo '$ echo hello > made-through-fuse.txt && mkdir -p new/dir && mv notes/todo.txt new/dir/'
echo hello > made-through-fuse.txt; mkdir -p new/dir; mv notes/todo.txt new/dir/
echo '$ ln made-through-fuse.txt hardlink.txt && ln -s README.txt link-to-readme'
ln made-through-fuse.txt hardlink.txt; ln -s README.txt link-to-readme
echo '$ tar c data | tar x -C new/'; tar cf - data | tar xf - -C new/
echo '$ sha256sum data/numbers.csv new/data/numbers.csv'; sha256sum data/numbers.csv new/data/numbers.csv
echo '$ df -h .'; df -h . | tail -1
"""


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging(False)
    base = tempfile.mkdtemp(prefix="actorfs-demo-")
    src, mnt = os.path.join(base, "src"), os.path.join(base, "mnt")
    os.makedirs(mnt)
    for rel, text in _DEMO_TREE.items():
        path = os.path.join(src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    try:
        return run_loop(_demo(src, mnt, hold=args.hold))
    finally:
        if args.keep:
            print(f"{PROG}: demo directories kept in {base}")
        elif not fuse_mount.is_mountpoint(mnt):
            shutil.rmtree(base, ignore_errors=True)


async def _demo(src: str, mnt: str, *, hold: bool) -> int:
    from actorfs.runtime.devfuse.server import mount

    print(f"{PROG} demo: serving {src} on {mnt}", flush=True)
    try:
        server = await mount(FsConfig(root=src), mnt)
    except MountError as exc:
        return fail(str(exc))
    async with server:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", _DEMO_SCRIPT, env=dict(os.environ, MNT=mnt, LC_ALL="C")
        )
        status = await proc.wait()
        host_ok = (
            os.path.isfile(os.path.join(src, "new/dir/todo.txt"))
            and os.path.samefile(
                os.path.join(src, "made-through-fuse.txt"), os.path.join(src, "hardlink.txt")
            )
            and os.readlink(os.path.join(src, "link-to-readme")) == "README.txt"
        )
        print(
            f"\n{PROG} demo: the changes are in the source directory: {'yes' if host_ok else 'NO'}"
        )
        print(format_stats(server.stats()))
        if hold:
            print(f"{PROG} demo: mounted on {mnt}; Ctrl-C to unmount", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await first_of(server.wait(), stop.wait())
    print(f"{PROG} demo: unmounted", flush=True)
    return 0 if status == 0 and host_ok else 1


# -- entry point ----------------------------------------------------------------------

COMMANDS = {"mount": cmd_mount, "serve": cmd_serve, "stats": cmd_stats,
            "vhost-user-json": cmd_vhost_user_json, "demo": cmd_demo}


def prepare_process() -> None:
    """What a server process sets up for itself before it serves."""
    raise_nofile_limit()  # room for the fd cache and open files: take what is allowed
    keep_large_buffers()  # 1 MiB READ/WRITE buffers reused, not page-faulted each time


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        if argv is None:
            argv = sys.argv[1:]
        from actorfs.runtime.cli.mount_helper import is_helper_form, translate

        if is_helper_form(argv, COMMANDS):  # mount.fuse3 runs `actorfs SRC MNT -o opts`
            argv = translate(argv)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return USER_ERROR
        prepare_process()
        return COMMANDS[args.command](args)
    except (UserError, MountError, ConfigError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
