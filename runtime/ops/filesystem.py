"""The served filesystem: configuration plus the actors and the pool, under a supervisor.

`Filesystem` is the one object op handlers receive. It holds no per-request
state; everything mutable lives in an actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from actorfs.actors.handles import HandleTable
from actorfs.actors.inode_table import FdBudget, InodeTable
from actorfs.runtime.core.actor import Actor
from actorfs.runtime.core.blocking_pool import BlockingPool
from actorfs.runtime.core.supervisor import Supervisor
from actorfs.runtime.host.backing_fs import (
    INLINE_MODES,
    InlineMode,
    beneath,
    fstat_never_blocks,
    inline_syscalls,
)

# Each policy is a Literal (what a type checker sees) and the tuple of its values
# (what __post_init__ and the command line check against), one from the other.
SymlinkPolicy = Literal["opaque", "follow", "deny"]
CacheMode = Literal["never", "auto", "always"]
PassthroughMode = Literal["auto", "on", "off"]
DaxMapper = Literal["inprocess", "channel"]
SYMLINK_POLICIES: tuple[SymlinkPolicy, ...] = get_args(SymlinkPolicy)
CACHE_MODES: tuple[CacheMode, ...] = get_args(CacheMode)
PASSTHROUGH_MODES: tuple[PassthroughMode, ...] = get_args(PassthroughMode)
DAX_MAPPERS: tuple[DaxMapper, ...] = get_args(DaxMapper)

# entry/attr timeouts per cache mode (seconds). "always" relies on the watcher.
_TIMEOUTS = {"never": 0.0, "auto": 1.0, "always": 86400.0}


if TYPE_CHECKING:
    from actorfs.actors.dax import DaxWindow


class BackingRegistry(Protocol):
    """Filesystem.backing: the transport's FUSE passthrough backing files."""

    def open(self, fd: int) -> int: ...

    def close(self, backing_id: int) -> None: ...


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the thing and the fix."""


@dataclass
class FsConfig:
    root: str
    symlinks: SymlinkPolicy = "opaque"
    cache: CacheMode = "auto"
    writeback: bool = False
    # FUSE passthrough (/dev/fuse only): "auto" (on when the kernel offers it,
    # we hold CAP_SYS_ADMIN and no other option excludes it: passthrough_plan),
    # "on" / True (whenever the kernel offers it), "off" / False.
    passthrough: bool | PassthroughMode = "auto"
    read_only: bool = False
    devices: bool = True  # mknod of character/block devices (but c 0 0, a whiteout)
    max_inodes: int = 1 << 20  # cap on inodes the client may know (EMFILE beyond)
    max_handles: int = 1 << 18  # cap on open file/dir handles (EMFILE beyond)
    # O_PATH fds kept in the inode table's LRU cache (--fd-cache); None: derived
    # from RLIMIT_NOFILE, with headroom for open handles (actors/inode_table.py).
    fd_cache: int | None = None
    # Reopen evicted inodes by file handle when the server may (root): None
    # (auto) or False (always by name; tests and bench/fd_cache.py).
    file_handles: bool | None = None
    pool_workers: int | None = None
    # DAX window (virtio-fs): a POSIX shm object of dax_size bytes named dax_name.
    # dax_mapper "inprocess" maps with MAP_FIXED in this process (an embedding VMM);
    # "channel" sends SHMEM_MAP/UNMAP to an out-of-process hypervisor.
    dax_name: str | None = None
    dax_size: int = 0
    dax_mapper: DaxMapper = "inprocess"
    dax_attach: bool = False  # attach an existing shm object instead of creating it
    # Watch host changes and invalidate the client's caches. None: only with
    # cache "always", the one mode whose long timeouts rely on it (with "auto"
    # the 1 s timeouts bound staleness, and the watcher's invalidations of the
    # server's own changes cost more than they give: docs/BENCHMARKS.md).
    watch: bool | None = None
    # Op syscalls on the event loop instead of the blocking pool: "auto" when
    # the root is memory-backed (nothing can wait for a disk), "always" (an
    # embedder that knows its root never blocks), "never". runtime/host/backing_fs.py.
    inline: InlineMode = "auto"
    # FUSE passthrough's max_stack_depth answered in INIT; None: the root's own
    # stacking depth plus one (runtime/fuse/dispatcher.py).
    max_stack_depth: int | None = None

    def __post_init__(self) -> None:
        if self.symlinks not in SYMLINK_POLICIES:
            raise ConfigError(
                f"unknown symlink policy {self.symlinks!r}: use one of {', '.join(SYMLINK_POLICIES)}"
            )
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"unknown cache mode {self.cache!r}: use one of {', '.join(CACHE_MODES)}")
        if self.watch is None:
            self.watch = self.cache == "always"
        if self.fd_cache is not None and self.fd_cache < 1:
            raise ConfigError(f"fd cache of {self.fd_cache} fds: use 1 or more")
        if self.passthrough is True or self.passthrough is False:
            self.passthrough = "on" if self.passthrough else "off"
        if self.passthrough not in PASSTHROUGH_MODES:
            raise ConfigError(
                f"unknown passthrough mode {self.passthrough!r}: use one of {', '.join(PASSTHROUGH_MODES)}"
            )
        if self.dax_mapper not in DAX_MAPPERS:
            raise ConfigError(
                f"unknown DAX mapper {self.dax_mapper!r}: use one of {', '.join(DAX_MAPPERS)}"
            )
        if self.inline not in INLINE_MODES:
            raise ConfigError(f"unknown inline mode {self.inline!r}: use one of {', '.join(INLINE_MODES)}")

    @property
    def entry_timeout(self) -> float:
        return _TIMEOUTS[self.cache]

    @property
    def attr_timeout(self) -> float:
        return _TIMEOUTS[self.cache]


# CAP_SYS_ADMIN: FUSE_DEV_IOC_BACKING_OPEN requires it in the initial user namespace.
_CAP_SYS_ADMIN = 21


def may_register_backing() -> bool:
    """Whether this process holds CAP_SYS_ADMIN (the kernel's test for passthrough)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def passthrough_plan(config: FsConfig, transport: str, kernel_offers: bool) -> tuple[bool, str]:
    """(use FUSE passthrough, why): decided at INIT, shown at start-up and in stats.

    Under "auto" it stays off where it would break a promise of another option:
    the writeback cache (the kernel excludes the two) and `--cache never`
    (every read and write is to reach the server). Set-ID files are handled
    per open (ops._opened): their writable opens never pass through, so the
    server still drops the bits on write. Read-only, the watcher and the
    attribute timeouts hold as they are: passthrough moves only read/write
    data, straight to the host file.
    """
    mode = getattr(config, "passthrough", "off")
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    if transport != "fuse":
        return False, "off: virtio-fs has no kernel passthrough"
    if mode == "off":
        return False, "off: --no-passthrough"
    if not kernel_offers:
        return False, "off: the kernel does not offer it (FUSE passthrough needs Linux 6.9+)"
    if mode == "on":
        return True, "on: --passthrough"
    if getattr(config, "writeback", False):
        return False, "off: --writeback (the kernel excludes the two; --passthrough forces it)"
    if getattr(config, "cache", "auto") == "never":
        return False, "off: --cache never sends every read and write to the server"
    if not may_register_backing():
        return False, "off: registering backing files needs CAP_SYS_ADMIN (run as root)"
    return True, "on (auto): offered by the kernel"


def check_root(root: str) -> str:
    """Canonical root path, or ConfigError with a one-line reason."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise ConfigError(f"source directory {root} does not exist: create it or pass another path") from None
    except PermissionError:
        raise ConfigError(f"source directory {root} is not accessible: check its permissions") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"source {root} is not a directory: pass a directory to serve")
    return os.path.realpath(root)


class Filesystem:
    """Config + actors + pool. Build with `async with Filesystem.running(config)`."""

    def __init__(self, config: FsConfig):
        # A copy with the canonical root: the caller's FsConfig is never changed.
        config = dataclasses.replace(config, root=check_root(config.root))
        self.config = config
        self.root_path = config.root
        self.euid = os.geteuid()
        self.egid = os.getegid()
        # Requests come from host processes (/dev/fuse): their pids name them,
        # and changes run with their credentials (runtime/ops/creds.py). The
        # virtio-fs dispatcher clears it: a guest's pid means nothing here.
        self.host_callers = True
        self.pool = BlockingPool(config.pool_workers)
        # Whether ops run their syscalls on the loop (runtime/host/backing_fs.py).
        self.inline = inline_syscalls(config.inline, config.root, config.symlinks)
        # fstat of a held fd on the loop: wherever it reads only memory.
        self.inline_fstat = self.inline or (
            config.inline == "auto" and fstat_never_blocks(config.root)
        )
        self.fd_budget = FdBudget(config.fd_cache)
        self.inodes = InodeTable(
            config.root, max_inodes=config.max_inodes, budget=self.fd_budget,
            file_handles=config.file_handles, follow=config.symlinks == "follow",
        )  # fmt: skip
        self.handles = HandleTable(max_handles=config.max_handles, budget=self.fd_budget)
        self.dax = None  # actors.dax.DaxWindow when a DAX window is configured
        self.watcher = None  # actors.watcher.Watcher when host changes are watched
        # FUSE passthrough: set by the /dev/fuse transport once INIT negotiated it;
        # an object with open(fd) -> backing_id and close(backing_id).
        self.backing: BackingRegistry | None = None
        # nodeid -> (dev, ino, size, mtime_ns, ctime_ns) at its last cached open: an open
        # that finds the same keeps the client's page cache (ops._opened).
        self.page_versions: dict[int, tuple[int, int, int, int, int]] = {}
        self.supervisor = Supervisor()
        if config.dax_name or config.dax_size:
            self.dax = self._make_dax_window(config)
        if config.watch:
            from actorfs.actors.watcher import Watcher

            self.watcher = Watcher(self)

    def serving_at(self, mountpoint: str) -> None:
        """The client reaches us through `mountpoint`: inline syscalls must never
        stat our own mount (the loop would wait for itself), so they stay off
        when it lies beneath the root. Only the parent is resolved: the
        mountpoint may already be one of our own mounts."""
        mnt = os.path.abspath(mountpoint)
        mnt = os.path.join(os.path.realpath(os.path.dirname(mnt)), os.path.basename(mnt))
        if beneath(mnt, self.root_path):
            self.inline = self.inline_fstat = False

    async def reset_session(self) -> None:
        """After FUSE_DESTROY: the client forgot everything; so do we (root stays).

        A virtio-fs guest may INIT again on the same connection; without this the
        old session's inodes and open handles would stay until the server exits.
        """
        dropped = await self.inodes.reset()
        self.page_versions.clear()
        if self.watcher is not None:
            for nodeid in dropped:
                self.watcher.unwatch(nodeid)
        handles = await self.handles.reset()
        for h in handles:
            if h.backing_id and self.backing is not None:
                try:
                    self.backing.close(h.backing_id)
                except OSError:
                    pass
        if handles:
            await self.pool.run_owning([h.fd for h in handles], lambda: None)

    @staticmethod
    def _make_dax_window(config: FsConfig) -> DaxWindow:
        from actorfs.actors.dax import DaxWindow

        if config.dax_mapper == "channel":
            from actorfs.runtime.dax.channel import ChannelMapper

            mapper = ChannelMapper()
        elif config.dax_mapper == "inprocess":
            mapper = None
        else:
            raise ConfigError(f"unknown DAX mapper {config.dax_mapper!r}: use inprocess or channel")
        name = config.dax_name or f"/actorfs-dax-{os.getpid()}"
        try:
            if config.dax_attach:
                return DaxWindow.attach(name, mapper)
            return DaxWindow.create(name, config.dax_size, mapper)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def actors(self) -> list[Actor]:
        return [a for a in (self.inodes, self.handles, self.dax, self.watcher) if a is not None]

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, config: FsConfig) -> AsyncIterator[Filesystem]:
        fs = cls(config)
        try:
            async with fs.supervisor.started(fs.actors()):
                try:
                    yield fs
                finally:
                    fs.supervisor.request_stop()
        finally:
            fs.pool.shutdown()  # also when the body failed: no thread left behind
