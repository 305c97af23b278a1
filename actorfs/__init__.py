"""actorfs: a passthrough FUSE / virtio-fs filesystem server built as asyncio actors.

The public API (the names in ``__all__``) is imported from here; everything
else lives in subpackages layered bottom to top. A package imports only
packages below it (tests/test_layout.py checks this):

    actorfs.runtime.core     actor base, supervisor, blocking pool, eager starts,
                             FsError and the errno map, the Attr/Entry value types
    actorfs.runtime.host     host-side helpers: syscalls, inotify, shared-memory
                             view, fd limits, the backing-filesystem probe
    actorfs.actors           single-owner state: the inode table, the handle
                             table, the DAX window, the watcher (each an Actor)
    actorfs.runtime.dax      the DAX window's channel, receiver and ops
    actorfs.runtime.ops      the op layer: Filesystem, FsConfig and one function
                             per FUSE operation
    actorfs.runtime.fuse     the sans-IO FUSE protocol, the Dispatcher (decode,
                             call an op, encode), notifications, per-op stats
    actorfs.runtime.devfuse  the /dev/fuse transport, mounting, mount() and
                             MountedServer
    actorfs.runtime.vhost    vhost-user, virtqueues, guest memory and the
                             virtio-fs server (serve_vhost_user)
    actorfs.runtime.cli      the command lines (actorfs, actorfs-virtiofsd),
                             the mount(8) helper, stats socket and view, sd_notify

devfuse and vhost are the two transports; neither imports the other.

The names below are loaded on first use, so ``import actorfs`` stays cheap and
the command line does not pay for the transport it does not run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    # serving
    "mount",
    "MountedServer",
    "serve_vhost_user",
    "VhostUserServer",
    "serve_connection",
    # configuration and the layers an embedder may build on
    "FsConfig",
    "Filesystem",
    "Dispatcher",
    # stats
    "Stats",
    "OpStats",
    "FdCacheStats",
    "InodeCounts",
    "WatcherStats",
    # errors
    "FsError",
    "ConfigError",
    "MountError",
    "ServerFailed",
    "SocketInUse",
    "ProtocolError",
]

_WHERE = {
    "mount": "actorfs.runtime.devfuse.server",
    "MountedServer": "actorfs.runtime.devfuse.server",
    "ServerFailed": "actorfs.runtime.devfuse.server",
    "MountError": "actorfs.runtime.devfuse.mounting",
    "serve_vhost_user": "actorfs.runtime.vhost.server",
    "VhostUserServer": "actorfs.runtime.vhost.server",
    "serve_connection": "actorfs.runtime.vhost.server",
    "SocketInUse": "actorfs.runtime.vhost.server",
    "FsConfig": "actorfs.runtime.ops.filesystem",
    "Filesystem": "actorfs.runtime.ops.filesystem",
    "ConfigError": "actorfs.runtime.ops.filesystem",
    "Dispatcher": "actorfs.runtime.fuse.dispatcher",
    "ProtocolError": "actorfs.runtime.fuse.protocol",
    "Stats": "actorfs.runtime.fuse.stats",
    "OpStats": "actorfs.runtime.fuse.stats",
    "FdCacheStats": "actorfs.actors.inode_table",
    "InodeCounts": "actorfs.actors.inode_table",
    "WatcherStats": "actorfs.actors.watcher",
    "FsError": "actorfs.runtime.core.errno_map",
}

if TYPE_CHECKING:  # what a type checker or an IDE sees
    from actorfs.actors.inode_table import FdCacheStats, InodeCounts
    from actorfs.actors.watcher import WatcherStats
    from actorfs.runtime.core.errno_map import FsError
    from actorfs.runtime.devfuse.mounting import MountError
    from actorfs.runtime.devfuse.server import MountedServer, ServerFailed, mount
    from actorfs.runtime.fuse.dispatcher import Dispatcher
    from actorfs.runtime.fuse.protocol import ProtocolError
    from actorfs.runtime.fuse.stats import OpStats, Stats
    from actorfs.runtime.ops.filesystem import ConfigError, Filesystem, FsConfig
    from actorfs.runtime.vhost.server import (
        SocketInUse,
        VhostUserServer,
        serve_connection,
        serve_vhost_user,
    )


def __getattr__(name: str) -> object:  # the names of __all__ are typed above
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'actorfs' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
