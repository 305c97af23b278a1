"""The op contract: the Operations / DaxOperations protocols list exactly the op
functions the dispatcher calls, the op layer modules provide them with the same
parameters (mypy compares the types, in runtime/fuse/operations.py), and SETATTR
reaches the op layer as a SetattrArgs, not as the wire struct."""

from __future__ import annotations

import inspect
import re
import types

from actorfs.runtime.core.abi import FATTR_FH, FATTR_MODE, FATTR_SIZE
from actorfs.runtime.core.attrs import Attr, SetattrArgs
from actorfs.runtime.dax import ops as dax_ops
from actorfs.runtime.fuse import dispatcher as dispatcher_mod
from actorfs.runtime.fuse import protocol as P
from actorfs.runtime.fuse.dispatcher import Dispatcher
from actorfs.runtime.fuse.operations import DAX_OP_NAMES, OP_NAMES, DaxOperations, Operations
from actorfs.runtime.ops import ops


def _called(layer: str) -> set[str]:
    """The op functions the dispatcher calls on self.<layer>."""
    source = inspect.getsource(dispatcher_mod)
    return set(re.findall(rf"self\.{layer}\.(\w+)\(", source))


def test_protocols_list_what_the_dispatcher_calls():
    assert _called("ops") == set(OP_NAMES)
    assert _called("ops_dax") == set(DAX_OP_NAMES)


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_op_modules_implement_the_protocols():
    for proto, module, names in ((Operations, ops, OP_NAMES), (DaxOperations, dax_ops, DAX_OP_NAMES)):
        for name in names:
            fn = getattr(module, name)
            assert inspect.iscoroutinefunction(fn), name
            # The protocol's method has `self` first; the module function does not.
            want = _params(getattr(proto, name))[1:]
            if module is dax_ops:  # unannotated and called positionally: the count matters
                assert len(_params(fn)) == len(want), name
            else:
                assert _params(fn) == want, name


class _Cfg:
    attr_timeout = 1.0
    entry_timeout = 1.0
    writeback = False
    cache = "auto"
    passthrough = "off"
    extra: dict = {}


async def test_setattr_gets_setattr_args():
    got = []

    async def setattr(fs, ctx, nodeid, s):
        got.append((nodeid, s))
        return Attr(nodeid, 4, 0, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096)

    fs = types.SimpleNamespace(config=_Cfg(), dax=None, root_path="/")
    d = Dispatcher(fs, ops=types.SimpleNamespace(setattr=setattr), ops_dax=types.SimpleNamespace())
    sent: list[bytes] = []
    await d.submit(P.encode_request(P.Init(h=P.InHeader(unique=1), major=7, minor=38)),
                   lambda iov: sent.append(P.iov_bytes(iov)))  # fmt: skip
    msg = P.Setattr(
        h=P.InHeader(unique=3, nodeid=9), valid=FATTR_MODE | FATTR_SIZE | FATTR_FH, fh=5, size=4,
        lock_owner=77, atime=10, mtime=11, ctime=12, atimensec=13, mtimensec=14, ctimensec=15,
        mode=0o640, uid=16, gid=17,
    )  # fmt: skip
    await d.submit(P.encode_request(msg), lambda iov: sent.append(P.iov_bytes(iov)))
    await d.drain()
    assert got == [(9, SetattrArgs(FATTR_MODE | FATTR_SIZE | FATTR_FH, fh=5, size=4, mode=0o640,
                                   uid=16, gid=17, atime=10, atimensec=13, mtime=11,
                                   mtimensec=14))]  # fmt: skip
    assert P.parse_out_header(sent[-1])[1:] == (0, 3)
