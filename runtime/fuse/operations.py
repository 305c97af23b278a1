"""The op layer as the dispatcher sees it: the async functions it calls, with
their signatures.

`Operations` is what runtime/ops/ops.py provides, `DaxOperations` what
runtime/dax/ops.py provides (FUSE_SETUPMAPPING / REMOVEMAPPING on a virtio-fs
DAX window). Each op gets the Filesystem, the caller (RequestContext) and the
request's arguments, already decoded and typed, and returns the reply's
content; failures are OSError (host errno) or FsError (Linux errno), which the
dispatcher turns into -errno.

The modules implement the protocols as modules: the check at the end of this
file makes a type checker compare every signature. A test or embedder may hand
the dispatcher a partial op layer: it serves only the ops it finds and replies
ENOSYS to the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from actorfs.runtime.core.attrs import (
    Attr,
    DirEntry,
    DirEntryPlus,
    Entry,
    NegativeEntry,
    Opened,
    RequestContext,
    SetattrArgs,
    StatFs,
    XattrReply,
)
from actorfs.runtime.ops.filesystem import Filesystem


class Operations(Protocol):
    """The FUSE operations of runtime/ops/ops.py (nodeids as the kernel names them)."""

    async def lookup(
        self, fs: Filesystem, ctx: RequestContext, parent: int, name: bytes
    ) -> Entry | NegativeEntry: ...

    async def forget(self, fs: Filesystem, nodeid: int, nlookup: int) -> None: ...

    async def batch_forget(self, fs: Filesystem, items: list[tuple[int, int]]) -> None: ...

    async def getattr(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int | None = None
    ) -> Attr: ...

    async def setattr(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, s: SetattrArgs
    ) -> Attr: ...

    async def readlink(self, fs: Filesystem, ctx: RequestContext, nodeid: int) -> bytes: ...

    async def symlink(
        self, fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, target: bytes
    ) -> Entry: ...

    async def mknod(
        self, fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, mode: int,
        rdev: int = 0, umask: int = 0,
    ) -> Entry: ...  # fmt: skip

    async def mkdir(
        self, fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, mode: int,
        umask: int = 0,
    ) -> Entry: ...  # fmt: skip

    async def unlink(self, fs: Filesystem, ctx: RequestContext, parent: int, name: bytes) -> None: ...

    async def rmdir(self, fs: Filesystem, ctx: RequestContext, parent: int, name: bytes) -> None: ...

    async def rename(
        self, fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, newparent: int,
        newname: bytes, flags: int = 0,
    ) -> None: ...  # fmt: skip

    async def link(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, newparent: int, newname: bytes
    ) -> Entry: ...

    async def open(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, flags: int, open_flags: int = 0
    ) -> Opened: ...

    async def read(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, size: int
    ) -> bytes: ...

    async def write(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int,
        data: memoryview, write_flags: int = 0,
    ) -> int: ...  # fmt: skip

    async def statfs(self, fs: Filesystem, ctx: RequestContext, nodeid: int) -> StatFs: ...

    async def release(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, flags: int = 0
    ) -> None: ...

    async def fsync(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, datasync: bool = False
    ) -> None: ...

    async def setxattr(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, name: bytes, value: bytes,
        flags: int = 0,
    ) -> None: ...  # fmt: skip

    async def getxattr(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, name: bytes, size: int
    ) -> XattrReply: ...

    async def listxattr(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, size: int
    ) -> XattrReply: ...

    async def removexattr(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, name: bytes
    ) -> None: ...

    async def flush(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, lock_owner: int = 0
    ) -> None: ...

    async def opendir(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, flags: int = 0
    ) -> Opened: ...

    async def readdir(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, size: int
    ) -> list[DirEntry]: ...

    async def readdirplus(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, size: int
    ) -> list[DirEntryPlus]: ...

    async def releasedir(self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int) -> None: ...

    async def fsyncdir(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, datasync: bool = False
    ) -> None: ...

    async def access(self, fs: Filesystem, ctx: RequestContext, nodeid: int, mask: int) -> None: ...

    async def create(
        self, fs: Filesystem, ctx: RequestContext, parent: int, name: bytes, mode: int,
        flags: int, umask: int = 0, open_flags: int = 0,
    ) -> tuple[Entry, Opened]: ...  # fmt: skip

    async def fallocate(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int,
        length: int, mode: int = 0,
    ) -> None: ...  # fmt: skip

    async def lseek(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, offset: int, whence: int
    ) -> int: ...

    async def copy_file_range(
        self, fs: Filesystem, ctx: RequestContext, nodeid_in: int, fh_in: int, off_in: int,
        nodeid_out: int, fh_out: int, off_out: int, length: int, flags: int = 0,
    ) -> int: ...  # fmt: skip


class DaxOperations(Protocol):
    """The DAX mapping operations of runtime/dax/ops.py (virtio-fs with a DAX window)."""

    async def setupmapping(
        self, fs: Filesystem, ctx: RequestContext, nodeid: int, fh: int, foffset: int,
        length: int, flags: int, moffset: int,
    ) -> None: ...  # fmt: skip

    async def removemapping(
        self, fs: Filesystem, ctx: RequestContext, ranges: list[tuple[int, int]]
    ) -> None: ...


OP_NAMES: tuple[str, ...] = tuple(n for n in vars(Operations) if not n.startswith("_"))
DAX_OP_NAMES: tuple[str, ...] = tuple(n for n in vars(DaxOperations) if not n.startswith("_"))


if TYPE_CHECKING:
    # The real op layer implements the protocols: a type checker compares every
    # signature here (modules can implement a Protocol).
    from actorfs.runtime.dax import ops as _dax_ops
    from actorfs.runtime.ops import ops as _ops

    _OPS_CONFORM: Operations = _ops
    _DAX_OPS_CONFORM: DaxOperations = _dax_ops
