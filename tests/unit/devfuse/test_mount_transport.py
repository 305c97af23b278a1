"""The /dev/fuse transport against a SOCK_SEQPACKET peer standing in for the kernel.

A seqpacket socket keeps message boundaries like /dev/fuse does (one read, one
request; one writev, one reply), so the reader loop, the reply path, readiness
after INIT, the end of the session and the bounded notification queue are
exercised without a mount. The real-mount tests cover the rest.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from actorfs.runtime.devfuse.transport import FuseTransport
from actorfs.runtime.fuse import protocol as P

pytestmark = pytest.mark.timeout(30)

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")


def request(opcode: int, unique: int, body: bytes = b"") -> bytes:
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, 1, 0, 0, 0, 0, 0) + body


class Init:
    passthrough = False


class Config:
    passthrough = False


class Fs:
    config = Config()
    backing = None


class EchoDispatcher:
    """Replies to every frame with an empty reply (error 0) and records it."""

    def __init__(self):
        self.frames: list[bytes] = []
        self.init = None
        self.fs = Fs()

    async def submit(self, frame, send) -> None:
        self.frames.append(bytes(frame))
        _, opcode, unique = struct.unpack_from("<IIQ", frame)
        if opcode == P.FUSE_INIT:
            self.init = Init()
        if opcode in P.NO_REPLY_OPCODES:
            return
        send([OUT_HEADER.pack(OUT_HEADER.size, 0, unique)])


@pytest.fixture
def pair():
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.setblocking(False)
    yield kernel, server
    kernel.close()


async def recv(sock: socket.socket, timeout: float = 5) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), timeout)


async def test_requests_in_replies_out_ready_after_init_and_end_on_hangup(pair):
    kernel, server = pair
    d = EchoDispatcher()
    t = FuseTransport(server.detach(), d)
    run = asyncio.create_task(t.run())
    await asyncio.sleep(0)
    assert not t.ready.is_set()
    kernel.send(request(P.FUSE_INIT, 2, bytes(64)))
    assert OUT_HEADER.unpack(await recv(kernel)) == (16, 0, 2)
    await asyncio.wait_for(t.ready.wait(), 5)
    kernel.send(request(P.FUSE_GETATTR, 4, bytes(16)))
    kernel.send(request(P.FUSE_FORGET, 6, struct.pack("<Q", 1)))  # no reply
    kernel.send(request(P.FUSE_LOOKUP, 8, b"name\0"))
    assert OUT_HEADER.unpack(await recv(kernel))[2] == 4
    assert OUT_HEADER.unpack(await recv(kernel))[2] == 8
    assert [struct.unpack_from("<I", f, 4)[0] for f in d.frames] == [
        P.FUSE_INIT, P.FUSE_GETATTR, P.FUSE_FORGET, P.FUSE_LOOKUP,
    ]  # fmt: skip
    assert d.frames[3].endswith(b"name\0")  # whole frames, each its own copy
    kernel.shutdown(socket.SHUT_RDWR)  # the "kernel" goes away: like ENODEV
    await asyncio.wait_for(run, 5)
    assert t.end_reason == "unmounted" and t.error is None
    st = t.stats()
    assert (st["frames"], st["replies"]) == (4, 3)
    t.close()


async def test_notifications_are_written_whole_and_only_while_ready(pair):
    kernel, server = pair
    t = FuseTransport(server.detach(), EchoDispatcher())
    run = asyncio.create_task(t.run())
    assert await t.notifier.inval_entry(1, b"early") is False  # before INIT: refused
    kernel.send(request(P.FUSE_INIT, 2))
    await recv(kernel)
    await asyncio.wait_for(t.ready.wait(), 5)
    assert await t.notifier.inval_entry(5, b"child") is True
    assert await recv(kernel) == P.iov_bytes(P.notify_inval_entry(5, b"child"))
    assert await t.notifier.inval_inode(7, -1, 0) is True
    assert await recv(kernel) == P.iov_bytes(P.notify_inval_inode(7, -1, 0))
    assert await t.notifier.delete(5, 9, b"gone") is True
    head = await recv(kernel)
    assert OUT_HEADER.unpack_from(head)[1] == P.FUSE_NOTIFY_DELETE
    t.stop()
    await asyncio.wait_for(run, 5)
    assert await t.notifier.inval_inode(7) is False  # after the end: refused
    t.close()


async def test_a_full_notification_queue_drops_and_counts(pair):
    kernel, server = pair
    t = FuseTransport(server.detach(), EchoDispatcher(), notify_queue=1)
    run = asyncio.create_task(t.run())
    kernel.send(request(P.FUSE_INIT, 2))
    await recv(kernel)
    await asyncio.wait_for(t.ready.wait(), 5)
    results = await asyncio.gather(*(t.notifier.inval_inode(n) for n in range(10, 15)))
    # One fits in the queue; the others are dropped at once, never waited for.
    assert results == [True, False, False, False, False]
    assert t.notify_dropped == 4
    assert await recv(kernel) == P.iov_bytes(P.notify_inval_inode(10))
    t.stop()
    await asyncio.wait_for(run, 5)
    t.close()


async def test_a_failing_dispatcher_ends_the_session_with_the_error(pair):
    kernel, server = pair

    class Broken(EchoDispatcher):
        async def submit(self, frame, send):
            raise RuntimeError("dispatcher bug")

    t = FuseTransport(server.detach(), Broken())
    run = asyncio.create_task(t.run())
    kernel.send(request(P.FUSE_INIT, 2))
    await asyncio.wait_for(run, 5)
    assert t.end_reason == "error" and isinstance(t.error, RuntimeError)
    t.close()
