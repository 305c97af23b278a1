"""The vhost-user transport, driven by a Python frontend (tests/support/vhost_frontend.py).

The backend runs on its own event loop in a thread, the frontend is plain
blocking code playing VMM and guest driver over a shared memfd. The transport
tests use an echo dispatcher (the transport is what is under test); the FUSE
tests at the end go through the real Dispatcher and ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import socket
import stat
import struct
import threading
import time

import pytest

from actorfs.runtime.ops.filesystem import FsConfig
from actorfs.runtime.vhost import server as vhost_server
from actorfs.runtime.vhost import vhost_user as vu
from actorfs.runtime.vhost.guest_memory import GuestMemory
from actorfs.runtime.vhost.server import Connection, SocketInUse, bind_socket, serve_vhost_user
from actorfs.runtime.vhost.virtqueue import QueueBroken, Virtqueue
from tests.support.vhost_frontend import (
    DESC,
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    GPA_BASE,
    IN_HEADER,
    OUT_HEADER,
    Frontend,
)

ECHO = 4000  # an opcode the echo dispatcher answers with the request body
BIG = 4001  # answered with 64 KiB: more than the tests' writable buffers
SELF_CANCELLING = 4002  # its first step ends with CancelledError, as a request's own may
FORGET = 2


class EchoDispatcher:
    """Stands in for actorfs.runtime.fuse.dispatcher: same submit(frame, send) contract."""

    def __init__(self):
        self.frames: list[bytes] = []
        self.tasks: set[asyncio.Task] = set()

    async def submit(self, frame, send) -> None:
        frame = bytes(frame)
        self.frames.append(frame)
        length, opcode, unique = struct.unpack_from("<IIQ", frame)
        if opcode == FORGET:
            return
        if opcode == SELF_CANCELLING:
            raise asyncio.CancelledError
        body = frame[IN_HEADER.size:] if opcode == ECHO else b"x" * 65536
        task = asyncio.get_running_loop().create_task(self._reply(unique, body, send))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, unique: int, body: bytes, send) -> None:
        await asyncio.sleep(0)  # replies complete later, as real ones do
        send([OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique), body])

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks)


class BackendThread:
    """Runs `main(stop)` on a fresh event loop in a thread."""

    def __init__(self, main):
        self.main = main
        self.ready = threading.Event()
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        async def runner():
            self.loop = asyncio.get_running_loop()
            self.task = asyncio.current_task()
            self.ready.set()
            return await self.main()

        with contextlib.suppress(asyncio.CancelledError):
            self.result = asyncio.run(runner())

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(15)
        if self.thread.is_alive():
            import io
            out = io.StringIO()

            def dump():
                for task in asyncio.all_tasks(self.loop):
                    task.print_stack(file=out)

            self.loop.call_soon_threadsafe(dump)
            threading.Event().wait(1)
            raise AssertionError("the backend did not stop when cancelled:\n" + out.getvalue())


def _wait_for(path: str) -> None:
    for _ in range(500):
        if os.path.exists(path):
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"the backend never created {path}")


@pytest.fixture
def echo_server(tmp_path):
    """A transport-only backend: serves connections one after another with EchoDispatcher."""
    path = str(tmp_path / "vhost.sock")
    dispatchers: list[EchoDispatcher] = []

    async def main():
        listener = bind_socket(path)
        loop = asyncio.get_running_loop()
        try:
            while True:
                sock, _ = await loop.sock_accept(listener)
                sock.setblocking(False)
                d = EchoDispatcher()
                dispatchers.append(d)
                try:
                    await Connection(sock, d, tag="testfs").run()
                finally:
                    sock.close()
        finally:
            listener.close()

    server = BackendThread(main)
    _wait_for(path)
    frontends: list[Frontend] = []

    def connect(**kw) -> Frontend:
        fe = Frontend(path, **kw)
        frontends.append(fe)
        return fe

    connect.dispatchers = dispatchers
    connect.path = path
    yield connect
    for fe in frontends:
        fe.close()
    server.stop()


def echo(q, body: bytes, **kw) -> bytes:
    error, reply = q.fuse(ECHO, 1, body, reply_size=max(len(body), 1), **kw)
    assert error == 0
    return reply


# -- negotiation ---------------------------------------------------------------------------
def test_features_and_protocol_features(echo_server):
    fe = echo_server()
    features = fe.get_u64(vu.GET_FEATURES)
    for bit in (vu.VIRTIO_F_VERSION_1, vu.VHOST_USER_F_PROTOCOL_FEATURES,
                vu.VIRTIO_RING_F_INDIRECT_DESC, vu.VIRTIO_RING_F_EVENT_IDX):
        assert features & bit
    pf = fe.get_u64(vu.GET_PROTOCOL_FEATURES)
    for bit in (vu.PROTOCOL_F_MQ, vu.PROTOCOL_F_REPLY_ACK, vu.PROTOCOL_F_CONFIG):
        assert pf & bit
    assert not pf & vu.PROTOCOL_F_SHMEM  # no DAX window configured
    fe.send(vu.SET_PROTOCOL_FEATURES, struct.pack("<Q", pf))
    assert fe.get_u64(vu.GET_QUEUE_NUM) >= 2
    assert fe.acked(vu.SET_OWNER) == 0


def test_config_space_tag_and_queue_count(echo_server):
    fe = echo_server()
    fe.negotiate()
    reply = fe.call(vu.GET_CONFIG, struct.pack("<III", 0, 40, 0) + bytes(40))
    offset, size, _ = struct.unpack_from("<III", reply)
    assert (offset, size) == (0, 40)
    tag, nreq = reply[12:48], struct.unpack_from("<I", reply, 48)[0]
    assert tag.rstrip(b"\0") == b"testfs" and nreq == 1
    # Out of range: an empty answer, and the connection lives on.
    reply = fe.call(vu.GET_CONFIG, struct.pack("<III", 30, 40, 0) + bytes(40))
    assert struct.unpack_from("<III", reply)[1] == 0
    assert fe.acked(vu.SET_CONFIG, struct.pack("<III", 0, 4, 0) + b"abcd") != 0
    assert fe.get_u64(vu.GET_FEATURES)


def test_unknown_requests_get_a_clean_answer(echo_server):
    fe = echo_server()
    fe.negotiate()
    assert fe.acked(999, b"\0" * 8) != 0  # unknown, NEED_REPLY: a failure ack
    fe.send(998, b"junk")  # unknown, no reply wanted: ignored
    r, w = os.pipe()
    fe.send(vu.SET_LOG_FD, b"", [r])  # never offered: the fd is closed, not kept
    os.close(r)
    os.close(w)
    assert fe.get_u64(vu.GET_FEATURES) & vu.VIRTIO_F_VERSION_1


def test_bad_memory_table_is_refused(echo_server):
    fe = echo_server()
    fe.negotiate()
    # Two regions announced, one fd sent.
    payload = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", GPA_BASE, 4096, 0, 0) * 2
    assert fe.acked(vu.SET_MEM_TABLE, payload, [fe.memfd]) != 0
    # A region bigger than its fd cannot be mapped beyond... but overlapping ones are refused.
    payload = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", GPA_BASE, 8192, 0, 0) + \
        struct.pack("<QQQQ", GPA_BASE + 4096, 8192, 1 << 40, 0)
    assert fe.acked(vu.SET_MEM_TABLE, payload, [fe.memfd, fe.memfd]) != 0
    # A region that runs past the end of its memfd (touching it would be SIGBUS).
    payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA_BASE, 2 * fe.mem_size, 0, 0)
    assert fe.acked(vu.SET_MEM_TABLE, payload, [fe.memfd]) != 0
    assert fe.set_mem_table() == 0


def test_buffers_spanning_two_regions(echo_server):
    """Two regions of one memfd, adjacent in guest-physical space (as QEMU splits RAM)."""
    fe = echo_server()
    fe.negotiate()
    half = fe.mem_size // 2
    payload = struct.pack("<II", 2, 0) + struct.pack(
        "<QQQQ", GPA_BASE, half, 0x7F0000000000, 0) + struct.pack(
        "<QQQQ", GPA_BASE + half, half, 0x7F0000000000 + half, half)
    assert fe.acked(vu.SET_MEM_TABLE, payload, [fe.memfd, fe.memfd]) == 0
    q = fe.setup_queue(1)
    fe.brk = half - 30  # the next buffers straddle the boundary
    body = os.urandom(100)
    assert echo(q, body, split=False) == body


def test_oversized_message_closes_only_that_connection(echo_server):
    fe = echo_server()
    fe.sock.sendall(struct.pack("<III", vu.GET_FEATURES, vu.VERSION, 1 << 20))
    with pytest.raises((ConnectionError, OSError)):
        fe.recv()
    fe2 = echo_server()
    fe2.start()
    assert echo(fe2.queues[1], b"after") == b"after"


# -- requests over the rings ---------------------------------------------------------------
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("event_idx", [False, True])
def test_echo_round_trip(echo_server, indirect, event_idx):
    fe = echo_server()
    features = None if event_idx else ~vu.VIRTIO_RING_F_EVENT_IDX & ((1 << 64) - 1)
    fe.negotiate(features=features)
    assert fe.set_mem_table() == 0
    q = fe.setup_queue(1)
    for n in (1, 100, 5000):
        body = os.urandom(n)
        assert echo(q, body, indirect=indirect) == body
    # A request in one readable buffer and its reply in one writable buffer.
    assert echo(q, b"whole", split=False) == b"whole"


def test_many_requests_in_flight(echo_server):
    fe = echo_server()
    fe.start(nqueues=2, size=256)
    q = fe.queues[1]
    heads = {}
    for i in range(60):  # 4 descriptors each: 240 of the 256
        body = struct.pack("<I", i) * 4
        hdr = IN_HEADER.pack(IN_HEADER.size + len(body), ECHO, 2 * i + 2, 1, 0, 0, 0, 0, 0)
        head, out = q.add_chain([hdr, body], [16, 16])
        heads[head] = (i, out)
    used = q.wait_used(60)
    assert sorted(h for h, _ in used) == sorted(heads)
    for head, length in used:
        i, out = heads[head]
        assert length == 32
        assert fe.read(out[1][0], 16) == struct.pack("<I", i) * 4


def test_forget_on_hiprio_returns_the_buffer(echo_server):
    fe = echo_server()
    fe.start()
    hq = fe.queues[0]
    body = struct.pack("<Q", 1)
    hdr = IN_HEADER.pack(IN_HEADER.size + 8, FORGET, 0, 5, 0, 0, 0, 0, 0)
    head, _ = hq.add_chain([hdr, body], [])
    assert hq.wait_used() == [(head, 0)]
    fe.get_u64(vu.GET_FEATURES)  # a round trip: the dispatcher has had its turn
    assert echo_server.dispatchers[-1].frames[-1] == hdr + body


def test_forget_frame_is_copied_before_its_buffer_goes_back(echo_server, monkeypatch):
    """The guest may reuse a FORGET's buffer as soon as it has the head back: the
    dispatcher must get the frame as published, whatever the guest writes after."""
    real = vhost_server.Connection.dispatcher_for

    async def slow_dispatcher_for(self, opcode):
        await asyncio.sleep(0.3)  # e.g. a new FUSE session on its way
        return await real(self, opcode)

    monkeypatch.setattr(vhost_server.Connection, "dispatcher_for", slow_dispatcher_for)
    fe = echo_server()
    fe.start()
    hq = fe.queues[0]
    body = struct.pack("<Q", 1)
    hdr = IN_HEADER.pack(IN_HEADER.size + 8, FORGET, 0, 5, 0, 0, 0, 0, 0)
    head, _ = hq.add_chain([hdr + body], [])  # one buffer: the backend reads it in place
    assert hq.wait_used() == [(head, 0)]
    addr = DESC.unpack(fe.read(hq.desc + 16 * head, 16))[0]
    fe.write(addr, b"\xee" * IN_HEADER.size)  # the guest reuses the buffer at once
    deadline = time.monotonic() + 10
    while not echo_server.dispatchers[-1].frames and time.monotonic() < deadline:
        time.sleep(0.01)
    assert echo_server.dispatchers[-1].frames == [hdr + body]


def test_a_request_cancelled_from_within_fails_alone(echo_server):
    """A CancelledError out of a request's own first step is that request's failure:
    it gets EIO and the queue goes on (it used to end the queue's runner silently)."""
    fe = echo_server()
    fe.start()
    q = fe.queues[1]
    error, _ = q.fuse(SELF_CANCELLING, 1, b"", reply_size=16)
    assert error == -errno.EIO
    assert echo(q, b"still served") == b"still served"


def test_set_vring_base_on_a_running_ring_is_refused(echo_server):
    """Moving last_avail back under a running ring would serve chains twice: the
    driver would see heads completed twice ("id N is not a head") and stop."""
    fe = echo_server()
    fe.start()
    q = fe.queues[1]
    for _ in range(3):
        echo(q, b"abc")
    assert fe.acked(vu.SET_VRING_BASE, struct.pack("<II", 1, 0)) != 0
    assert echo(q, b"once") == b"once"
    assert q.used_idx() == 4


def test_each_head_is_pushed_once_per_pop():
    """A second completion of a head, or one for a head never popped, never reaches
    the used ring."""
    fd = os.memfd_create("vq", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 16)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mem = GuestMemory.from_fds([(0, 1 << 16, 0x10000, 0)], [fd])
    try:
        vq = Virtqueue(1)
        vq.num = 4
        vq.desc_uaddr, vq.avail_uaddr, vq.used_uaddr = 0x10000, 0x11000, 0x12000
        vq.addr_set = True
        vq.map_rings(mem)
        view = mem.user_view(0x10000, 0x3000)
        struct.pack_into("<QIHH", view, 16 * 2, 0x2800, 16, 0, 0)  # desc 2, at gpa 0x2800
        struct.pack_into("<H", view, 0x1000 + 4, 2)  # avail ring[0] = head 2
        struct.pack_into("<H", view, 0x1000 + 2, 1)  # avail.idx = 1
        chain = vq.pop()
        assert chain.head == 2 and chain.error is None
        used = lambda: struct.unpack_from("<H", view, 0x2000 + 2)[0]  # noqa: E731
        vq.push(3, 0)  # never popped
        assert used() == 0 and vq.dropped_pushes == 1
        vq.push(2, 16)
        assert used() == 1
        vq.push(2, 16)  # twice
        assert used() == 1 and vq.dropped_pushes == 2
        # Published again while in flight: the ring is corrupt, the queue stops
        # (answering either copy would let the other's reply hit reused buffers).
        struct.pack_into("<H", view, 0x1000 + 6, 2)  # avail ring[1] = head 2
        struct.pack_into("<H", view, 0x1000 + 2, 2)  # avail.idx = 2
        again = vq.pop()
        assert again.head == 2 and again.error is None  # head 2 was back: fine
        struct.pack_into("<H", view, 0x1000 + 8, 2)  # avail ring[2] = head 2, still held
        struct.pack_into("<H", view, 0x1000 + 2, 3)
        with pytest.raises(QueueBroken, match="still in flight"):
            vq.pop()
        assert vq.broken
        again.release()
        chain.release()
        view.release()
        vq.unmap_rings()
    finally:
        mem.close()


def test_stop_and_restart_a_queue(echo_server):
    fe = echo_server()
    fe.start()
    q = fe.queues[1]
    for _ in range(3):
        echo(q, b"abc")
    assert fe.get_vring_base(1) == 3
    # The ring is stopped: a kick is not served.
    q.add_chain([IN_HEADER.pack(41, ECHO, 99, 1, 0, 0, 0, 0, 0), b"z"], [16, 1])
    with pytest.raises(TimeoutError):
        q.wait_used(timeout=0.3)
    # Restarted (new fds, as QEMU does) from base 3: the pending request is served.
    for fd in (q.kick_fd, q.call_fd, q.err_fd):
        os.close(fd)
    q.kick_fd, q.call_fd, q.err_fd = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
    fe.send(vu.SET_VRING_BASE, struct.pack("<II", 1, 3))
    fe.send(vu.SET_VRING_CALL, struct.pack("<Q", 1), [q.call_fd])
    fe.send(vu.SET_VRING_KICK, struct.pack("<Q", 1), [q.kick_fd])
    assert fe.acked(vu.SET_VRING_ENABLE, struct.pack("<II", 1, 1)) == 0
    (used,) = q.wait_used()
    assert used[1] == 17
    assert echo(q, b"again") == b"again"


def test_disabled_ring_is_not_served_until_enabled(echo_server):
    fe = echo_server()
    fe.negotiate()
    fe.set_mem_table()
    q = fe.setup_queue(1, enable=False)
    q.add_chain([IN_HEADER.pack(42, ECHO, 2, 1, 0, 0, 0, 0, 0), b"hi"], [16, 2])
    with pytest.raises(TimeoutError):
        q.wait_used(timeout=0.3)
    assert fe.acked(vu.SET_VRING_ENABLE, struct.pack("<II", 1, 1)) == 0
    assert q.wait_used()[0][1] == 18


def test_disconnect_then_a_new_frontend(echo_server):
    fe = echo_server()
    fe.start()
    echo(fe.queues[1], b"one")
    fe.close()
    fe2 = echo_server()
    fe2.start()
    assert echo(fe2.queues[1], b"two") == b"two"


# -- a hostile guest ------------------------------------------------------------------------
def _raw_chain(q, descs: list[tuple[int, int, int, int]]) -> int:
    """Write raw descriptors at slots 0.. and publish slot 0 as the head."""
    for i, d in enumerate(descs):
        q.put_desc(i, *d)
    q.next_desc = len(descs) % q.size
    q.publish(0)
    return 0


def _valid_request(fe, q):
    hdr = IN_HEADER.pack(43, ECHO, 7, 1, 0, 0, 0, 0, 0)
    a = fe.alloc(43)
    fe.write(a, hdr + b"abc")
    w = fe.alloc(19)
    return a, w


HOSTILE = {
    "address outside memory": lambda fe, a, w: [(1 << 40, 43, F_NEXT, 1), (w, 19, F_WRITE, 0)],
    "length overflows": lambda fe, a, w: [((1 << 64) - 8, 43, F_NEXT, 1), (w, 19, F_WRITE, 0)],
    "length past the region": lambda fe, a, w: [(a, 43, F_NEXT, 1),
                                                (w, fe.mem_size, F_WRITE, 0)],
    "chain loops": lambda fe, a, w: [(a, 43, F_NEXT, 1), (w, 19, F_WRITE | F_NEXT, 1)],
    "next outside the table": lambda fe, a, w: [(a, 43, F_NEXT, 5000)],
    "readable after writable": lambda fe, a, w: [(w, 19, F_WRITE | F_NEXT, 1), (a, 43, 0, 0)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_malformed_chain_gets_no_reply_and_queue_goes_on(echo_server, case):
    fe = echo_server()
    fe.start()
    q = fe.queues[1]
    a, w = _valid_request(fe, q)
    fe.write(w, b"\xee" * 19)
    head = _raw_chain(q, HOSTILE[case](fe, a, w))
    assert q.wait_used() == [(head, 0)]
    assert fe.read(w, 19) == b"\xee" * 19  # nothing was written for it
    assert echo(q, b"still fine") == b"still fine"


def _indirect(fe, q, entries: list[tuple[int, int, int, int]], length: int | None = None):
    table = fe.alloc(16 * max(len(entries), 1))
    for i, d in enumerate(entries):
        fe.write(table + 16 * i, DESC.pack(*d))
    return [(table, 16 * len(entries) if length is None else length, F_INDIRECT, 0)]


INDIRECT = {
    "loop inside the table": lambda fe, q, a, w: _indirect(
        fe, q, [(a, 43, F_NEXT, 1), (w, 19, F_WRITE | F_NEXT, 0)]),
    "nested indirect": lambda fe, q, a, w: _indirect(
        fe, q, [(fe.alloc(32), 32, F_INDIRECT, 0)]),
    "table length not a multiple of 16": lambda fe, q, a, w: _indirect(
        fe, q, [(a, 43, F_NEXT, 1), (w, 19, F_WRITE, 0)], length=24),
    "table outside memory": lambda fe, q, a, w: [(1 << 44, 32, F_INDIRECT, 0)],
    "empty table": lambda fe, q, a, w: [(fe.alloc(16), 0, F_INDIRECT, 0)],
    "indirect with next": lambda fe, q, a, w: [(fe.alloc(16), 16, F_INDIRECT | F_NEXT, 1),
                                               (w, 19, F_WRITE, 0)],
}


@pytest.mark.parametrize("case", sorted(INDIRECT))
def test_indirect_table_tricks(echo_server, case):
    fe = echo_server()
    fe.start()
    q = fe.queues[1]
    a, w = _valid_request(fe, q)
    head = _raw_chain(q, INDIRECT[case](fe, q, a, w))
    assert q.wait_used() == [(head, 0)]
    assert echo(q, b"ok") == b"ok"


def test_readable_part_too_short_for_a_header(echo_server):
    fe = echo_server()
    fe.start()
    q = fe.queues[1]
    # 20 bytes: the unique is readable, so the request is answered with EINVAL.
    head, out = q.add_chain([struct.pack("<IIQI", 20, ECHO, 0x1234, 0)], [16])
    assert q.wait_used() == [(head, 16)]
    assert OUT_HEADER.unpack(fe.read(out[0][0], 16)) == (16, -errno.EINVAL, 0x1234)
    # 10 bytes: not even a unique to answer; the buffers come back unwritten.
    head, _ = q.add_chain([b"\x01" * 10], [16])
    assert q.wait_used() == [(head, 0)]
    assert echo_server.dispatchers[-1].frames == []  # neither reached the dispatcher
    assert echo(q, b"ok") == b"ok"


def test_reply_bigger_than_the_writable_part_is_an_error(echo_server):
    fe = echo_server()
    fe.start()
    error, _ = fe.queues[1].fuse(BIG, 1, b"", reply_size=100)
    assert error == -errno.EINVAL


@pytest.mark.parametrize("how", ["head outside the queue", "available index jumps"])
def test_broken_ring_marks_the_queue_broken(echo_server, how):
    fe = echo_server()
    fe.start()
    q = fe.queues[1]
    if how == "head outside the queue":
        q.publish(q.size + 3)
    else:
        q.set_avail_idx(q.size + 10)
        q.kick()
    # The backend stops the queue and signals the error eventfd; nothing is used.
    with pytest.raises(TimeoutError):
        q.wait_used(timeout=0.3)
    assert q.error_signalled()
    # The device itself stays alive: the other queue and the socket still work.
    assert echo(fe.queues[0], b"hiprio alive") == b"hiprio alive"


def test_ring_addresses_outside_memory_do_not_start_the_queue(echo_server):
    fe = echo_server()
    fe.negotiate()
    fe.set_mem_table()
    q = fe.setup_queue(1)
    fe.get_vring_base(1)
    fe.send(vu.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, 1 << 50, 1 << 50, 1 << 50, 0))
    fe.send(vu.SET_VRING_KICK, struct.pack("<Q", 1), [q.kick_fd])
    assert fe.acked(vu.SET_VRING_ENABLE, struct.pack("<II", 1, 1)) == 0
    assert fe.get_u64(vu.GET_FEATURES)  # still talking


def test_truncated_get_request_closes_the_connection(echo_server):
    fe = echo_server()
    fe.negotiate()
    fe.send(vu.GET_VRING_BASE, b"\x01\x00")  # needs {index, num}: 8 bytes
    with pytest.raises((ConnectionError, OSError)):
        fe.recv()
    fe2 = echo_server()
    fe2.start()
    assert echo(fe2.queues[1], b"next") == b"next"


def test_queue_index_out_of_range_closes_the_connection(echo_server):
    fe = echo_server()
    fe.negotiate()
    fe.send(vu.SET_VRING_NUM, struct.pack("<II", 200, 64))
    with pytest.raises((ConnectionError, OSError)):
        fe.get_u64(vu.GET_FEATURES)


# -- the socket -----------------------------------------------------------------------------
def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a file nobody listens on
    live = bind_socket(path)
    try:
        with pytest.raises(SocketInUse, match="in use"):
            bind_socket(path)
    finally:
        live.close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(SocketInUse, match="not a socket"):
        bind_socket(str(regular))


# -- through the real dispatcher ------------------------------------------------------------
def _fs_server(tmp_path, once=False, inline="auto"):
    root = tmp_path / "root"
    root.mkdir()
    path = str(tmp_path / "fs.sock")
    config = FsConfig(root=str(root), inline=inline)
    server = BackendThread(lambda: serve_vhost_user(config, path, once=once))
    _wait_for(path)
    return root, path, server


FUSE_LOOKUP, FUSE_GETATTR, FUSE_OPEN, FUSE_READ, FUSE_WRITE = 1, 3, 14, 15, 16
FUSE_INIT, FUSE_CREATE, FUSE_RELEASE = 26, 35, 18


def _init(q):
    body = struct.pack("<IIIIII", 7, 38, 1 << 20, 0, 0, 0) + bytes(40)
    error, reply = q.fuse(FUSE_INIT, 0, body)
    assert error == 0, error
    major, minor = struct.unpack_from("<II", reply)
    assert major == 7


# "always": what a tmpfs root gets, syscalls inline on the loop (runtime/host/backing_fs.py).
@pytest.mark.parametrize("inline", ["never", "always"])
def test_fuse_session_over_virtio(tmp_path, inline):
    root, path, server = _fs_server(tmp_path, inline=inline)
    (root / "hello.txt").write_bytes(b"hello from the host\n")
    fe = Frontend(path)
    try:
        fe.start(nqueues=2, size=128)
        q = fe.queues[1]
        _init(q)
        error, reply = q.fuse(FUSE_LOOKUP, 1, b"hello.txt\0")
        assert error == 0
        nodeid = struct.unpack_from("<Q", reply)[0]
        size = struct.unpack_from("<Q", reply, 40 + 8)[0]  # fuse_entry_out.attr.size
        assert size == 20
        error, reply = q.fuse(FUSE_GETATTR, nodeid, struct.pack("<IIQ", 0, 0, 0))
        assert error == 0
        error, reply = q.fuse(FUSE_OPEN, nodeid, struct.pack("<II", os.O_RDWR, 0))
        assert error == 0
        fh = struct.unpack_from("<Q", reply)[0]
        read_in = struct.pack("<QQIIQII", fh, 0, 4096, 0, 0, 0, 0)
        error, reply = q.fuse(FUSE_READ, nodeid, read_in, indirect=True)
        assert (error, reply) == (0, b"hello from the host\n")
        data = os.urandom(100_000)
        write_in = struct.pack("<QQIIQII", fh, 0, len(data), 0, 0, 0, 0)
        error, reply = q.fuse(FUSE_WRITE, nodeid, write_in + data)
        assert error == 0 and struct.unpack_from("<I", reply)[0] == len(data)
        assert (root / "hello.txt").read_bytes() == data
        # A miss under entry caching is a negative entry (nodeid 0), not ENOENT.
        error, reply = q.fuse(FUSE_LOOKUP, 1, b"missing\0")
        assert error == 0 and struct.unpack_from("<Q", reply)[0] == 0
        error, _ = q.fuse(FUSE_RELEASE, nodeid, struct.pack("<QIIQ", fh, 0, 0, 0))
        assert error == 0
    finally:
        fe.close()
        server.stop()
    assert not os.path.exists(path)  # the socket file is removed on stop


def test_once_exits_after_the_frontend_leaves(tmp_path):
    root, path, server = _fs_server(tmp_path, once=True)
    fe = Frontend(path)
    fe.start()
    _init(fe.queues[1])
    fe.close()
    server.thread.join(15)
    assert not server.thread.is_alive() and server.result == 0
    assert not os.path.exists(path)


def test_dax_setupmapping_goes_over_the_backend_channel(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "mapped").write_bytes(b"m" * 8192)
    path = str(tmp_path / "dax.sock")
    name = f"/actorfs-test-dax-{os.getpid()}"
    server = BackendThread(lambda: serve_vhost_user(
        FsConfig(root=str(root)), path, dax_name=name, dax_size=1 << 21))
    _wait_for(path)
    fe = Frontend(path)
    ours, theirs = socket.socketpair()
    try:
        fe.negotiate()
        assert fe.protocol & vu.PROTOCOL_F_SHMEM and fe.protocol & vu.PROTOCOL_F_BACKEND_REQ
        assert fe.acked(vu.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
        theirs.close()
        fe.set_mem_table()
        q = fe.setup_queue(1)
        fe.setup_queue(0)
        _init(q)
        error, reply = q.fuse(FUSE_LOOKUP, 1, b"mapped\0")
        assert error == 0
        nodeid = struct.unpack_from("<Q", reply)[0]
        error, reply = q.fuse(FUSE_OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0))
        fh = struct.unpack_from("<Q", reply)[0]

        # The frontend's side of the channel: answer the SHMEM_MAP the backend sends.
        got = {}

        def frontend_side():
            data, fds, _, _ = socket.recv_fds(ours, 12 + 40, 4)
            got["msg"], got["fds"] = data, fds
            req, flags, _ = struct.unpack_from("<III", data)
            ours.sendall(struct.pack("<IIIQ", req, vu.VERSION | vu.FLAG_REPLY, 8, 0))

        helper = threading.Thread(target=frontend_side)
        helper.start()
        setup = struct.pack("<QQQQQ", fh, 0, 4096, 2, 4096)  # READ flag, window offset 4096
        error, _ = q.fuse(48, nodeid, setup)
        helper.join(10)
        assert error == 0
        req, flags, size = struct.unpack_from("<III", got["msg"])
        shmid, fd_offset, shm_offset, length, mflags = struct.unpack_from(
            "<B7xQQQQ", got["msg"], 12)
        assert (req, size, fd_offset, shm_offset, length) == (vu.BACKEND_SHMEM_MAP, 40, 0,
                                                              4096, 4096)
        assert len(got["fds"]) == 1 and os.fstat(got["fds"][0]).st_ino == (
            root / "mapped").stat().st_ino
        for fd in got["fds"]:
            os.close(fd)
    finally:
        fe.close()
        ours.close()
        server.stop()


@pytest.mark.parametrize("inline", ["never", "always"])
def test_many_fuse_requests_in_flight(tmp_path, inline):
    root, path, server = _fs_server(tmp_path, inline=inline)
    for i in range(40):
        (root / f"f{i}").write_bytes(b"x" * i)
    fe = Frontend(path)
    try:
        fe.start(nqueues=2, size=256)
        q = fe.queues[1]
        _init(q)
        pending = {}
        for i in range(40):
            name = f"f{i}\0".encode()
            hdr = IN_HEADER.pack(IN_HEADER.size + len(name), FUSE_LOOKUP, 1000 + 2 * i, 1,
                                 0, 0, 0, 0, 0)
            head, out = q.add_chain([hdr, name], [16, 128])
            pending[head] = (i, out)
        for head, length in q.wait_used(40):
            i, out = pending.pop(head)
            data = b"".join(fe.read(gpa, n) for gpa, n in out)[:length]
            _, error, unique = OUT_HEADER.unpack_from(data)
            assert (error, unique) == (0, 1000 + 2 * i)
            assert struct.unpack_from("<Q", data, 16 + 40 + 8)[0] == i  # attr.size
        assert not pending
    finally:
        fe.close()
        server.stop()


# -- the descriptor walker, fuzzed ----------------------------------------------------------
def test_descriptor_walker_never_escapes_guest_memory():
    """Random rings and tables: pop() returns chains inside memory or breaks the queue."""
    import mmap as mmap_mod

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from actorfs.runtime.vhost.guest_memory import GuestMemory, map_region
    from actorfs.runtime.vhost.virtqueue import Chain, QueueBroken, Virtqueue

    size = 1 << 16
    fd = os.memfd_create("fuzz")
    os.ftruncate(fd, size)
    mem = GuestMemory([map_region(fd, 0x10000, size, 0x10000, 0)])
    raw = mmap_mod.mmap(fd, size)
    base = 0x10000
    # Mostly plausible buffers, so that chains get far enough to loop and nest.
    inside = st.integers(base + 0x4000, base + size - 600)
    addrs = st.one_of(inside, inside, inside, st.integers(0, (1 << 64) - 1),
                      st.integers(base - 64, base + size + 64),
                      st.sampled_from([base + 0x1000, base + size - 16, (1 << 64) - 16]))
    lengths = st.one_of(st.integers(0, 512), st.integers(0, 512),
                        st.integers(0, (1 << 32) - 1), st.sampled_from([16, 32, 64, 256]))
    desc = st.tuples(addrs, lengths, st.integers(0, 7), st.integers(0, 20))

    @settings(max_examples=500, deadline=None)
    @given(num=st.sampled_from([4, 8, 16]), table=st.lists(desc, min_size=16, max_size=16),
           heads=st.lists(st.integers(0, 3) | st.integers(0, 3) | st.integers(0, 20),
                          min_size=1, max_size=4),
           avail=st.integers(1, 4) | st.integers(1, 4) | st.integers(0, 0xFFFF))
    def check(num, table, heads, avail):
        raw[:] = bytes(size)
        for i, d in enumerate(table):
            struct.pack_into("<QIHH", raw, 16 * i, *d)
        # Indirect tables point into the same area (offset 0x1000) with random contents.
        for i, d in enumerate(table):
            struct.pack_into("<QIHH", raw, 0x1000 + 16 * i, *d)
        for k, h in enumerate(heads):
            struct.pack_into("<H", raw, 0x2000 + 4 + 2 * k, h)
        struct.pack_into("<H", raw, 0x2000 + 2, avail)
        vq = Virtqueue(1)
        vq.num = num
        vq.desc_uaddr, vq.avail_uaddr, vq.used_uaddr = base, base + 0x2000, base + 0x3000
        vq.addr_set = True
        vq.map_rings(mem)
        try:
            for _ in range(len(heads) + 1):
                chain = vq.pop()
                if chain is None:
                    break
                assert isinstance(chain, Chain) and 0 <= chain.head < num
                if chain.error is None:
                    for v in chain.readable + chain.writable:
                        assert v.obj is mem.regions[0].mm  # a slice of the mapping itself
                    chain.write_reply([b"\xab" * min(chain.writable_len, 64)])
                vq.push(chain.head, 0)
        except QueueBroken:
            assert vq.broken
        vq.unmap_rings()

    try:
        check()
    finally:
        mem.close()
        raw.close()
        os.close(fd)


def test_second_init_starts_a_new_session(tmp_path):
    """A guest reset without unmounting: rings set up again, INIT again, clean slate."""
    root, path, server = _fs_server(tmp_path)
    (root / "a").write_text("x")
    fe = Frontend(path)
    try:
        fe.start()
        _init(fe.queues[1])
        error, reply = fe.queues[1].fuse(FUSE_LOOKUP, 1, b"a\0")
        assert error == 0
        old_nodeid = struct.unpack_from("<Q", reply)[0]
        for i in (0, 1):
            fe.get_vring_base(i)
        fe.queues.clear()
        fe.setup_queue(0)
        q = fe.setup_queue(1)
        _init(q)  # not EIO: a new session
        error, reply = q.fuse(FUSE_LOOKUP, 1, b"a\0")
        assert error == 0
        error, _ = q.fuse(FUSE_GETATTR, old_nodeid + 1000, struct.pack("<IIQ", 0, 0, 0))
        assert error != 0
    finally:
        fe.close()
        server.stop()


def test_guest_memory_must_be_sealed_unless_allowed(tmp_path):
    """Unsealed regions are refused; allowed, they are size-checked before use."""
    import fcntl

    from actorfs.runtime.vhost.guest_memory import GuestMemory, GuestMemoryError
    from actorfs.runtime.vhost.virtqueue import QueueBroken, Virtqueue

    size = 1 << 16
    entry = [(0x10000, size, 0x10000, 0)]

    def memfd(sealed: bool) -> int:
        fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if sealed:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return fd

    with pytest.raises(GuestMemoryError, match="sealed"):
        GuestMemory.from_fds(entry, [memfd(False)])
    GuestMemory.from_fds(entry, [memfd(True)]).close()
    for dev in ("/dev/zero", "/dev/null"):
        with pytest.raises(GuestMemoryError, match="shareable"):
            GuestMemory.from_fds(entry, [os.open(dev, os.O_RDWR)], allow_unsealed=True)
    fd = memfd(False)
    keep = os.dup(fd)
    mem = GuestMemory.from_fds(entry, [fd], allow_unsealed=True)
    try:
        vq = Virtqueue(1)
        vq.num = 4
        vq.desc_uaddr, vq.avail_uaddr, vq.used_uaddr = 0x10000, 0x11000, 0x12000
        vq.addr_set = True
        vq.map_rings(mem)
        assert mem.intact() and vq.intact()
        os.ftruncate(keep, 4096)  # the rings are now past the end of the file
        assert not mem.intact()
        with pytest.raises(QueueBroken, match="shrank"):
            vq.pop()
        vq.held.add(0)  # as if head 0 were in flight
        vq.push(0, 0)  # not touched: no SIGBUS
        assert not vq.needs_notify() and vq.broken
    finally:
        mem.close()
        os.close(keep)


# -- the structured form: `async with serve_vhost_user(...)` ------------------------------


def test_the_context_listens_on_entry_and_removes_its_socket_on_exit(tmp_path, capfd):
    import dataclasses

    root = tmp_path / "root"
    root.mkdir()
    link = tmp_path / "link"
    link.symlink_to(root)
    path = str(tmp_path / "fs.sock")
    config = FsConfig(root=str(link) + "/")
    snapshot = dataclasses.asdict(config)

    async def main():
        before = asyncio.all_tasks() - {asyncio.current_task()}
        async with serve_vhost_user(config, path) as server:
            assert server.listening
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            # A frontend can connect at once: the socket listens.
            reader, writer = await asyncio.open_unix_connection(path)
            writer.close()
            await writer.wait_closed()
        assert not os.path.exists(path)
        assert asyncio.all_tasks() - {asyncio.current_task()} == before

    asyncio.run(main())
    assert dataclasses.asdict(config) == snapshot  # the caller's config is not changed
    assert capfd.readouterr().err == ""


def test_an_exception_in_the_block_closes_and_propagates(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    path = str(tmp_path / "fs.sock")

    async def main():
        async with serve_vhost_user(FsConfig(root=str(root)), path):
            raise KeyError("boom")

    with pytest.raises(KeyError):
        asyncio.run(main())
    assert not os.path.exists(path)


def test_user_errors_are_raised_not_printed(tmp_path, capfd):
    from actorfs.runtime.ops.filesystem import ConfigError

    async def main(config, path):
        async with serve_vhost_user(config, path):
            raise AssertionError("entered")

    with pytest.raises(ConfigError, match="does not exist"):
        asyncio.run(main(FsConfig(root=str(tmp_path / "nope")), str(tmp_path / "a.sock")))
    (tmp_path / "root").mkdir()
    with pytest.raises(SocketInUse, match="cannot listen"):
        asyncio.run(main(FsConfig(root=str(tmp_path / "root")), str(tmp_path / "no/dir/b.sock")))
    assert capfd.readouterr().err == ""


def test_used_idx_and_avail_event_never_show_a_value_not_written():
    """Another process (the guest) polling used.idx and avail_event while the
    backend pushes never reads anything but a value the backend published.

    struct.pack_into zeroes its destination before writing the value: a driver
    reading used.idx in between saw it fall to 0, took the stale element at its
    next used slot for a completion and broke its ring ("id N is not a head!",
    about 1 guest boot in 100 under TCG). A thread cannot see this (the GIL
    covers pack_into): the reader is a forked process on the shared memfd.
    """
    size, num, start = 1 << 16, 256, 0x100  # used.idx runs from start to under 0xff00
    desc, avail, used, ctl = 0x0000, 0x1000, 0x2000, 0x3000  # offsets in the memfd
    fd = os.memfd_create("vq", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    shared = mmap.mmap(fd, size)  # the "guest's" mapping
    mem = GuestMemory.from_fds([(0, size, 0x10000, 0)], [os.dup(fd)])
    os.close(fd)
    for i in range(num):
        struct.pack_into("<QIHH", shared, desc + 16 * i, 0x8000 + 64 * i, 64, 0, 0)
    struct.pack_into("<H", shared, avail + 2, start)
    struct.pack_into("<H", shared, used + 2, start)
    struct.pack_into("<H", shared, used + 4 + 8 * num, start)  # avail_event
    pid = os.fork()
    if pid == 0:  # the guest: poll until told to stop
        code = 1
        try:
            reads = bad = 0
            prev = start
            struct.pack_into("<I", shared, ctl + 4, 1)  # polling
            while not struct.unpack_from("<I", shared, ctl)[0]:
                idx, = struct.unpack_from("<H", shared, used + 2)
                event, = struct.unpack_from("<H", shared, used + 4 + 8 * num)
                reads += 1
                if idx < prev or event < start:  # went back (to 0): never published here
                    bad += 1
                else:
                    prev = idx
            struct.pack_into("<QQ", shared, ctl + 8, reads, bad)
            code = 0
        finally:
            os._exit(code)
    vq = Virtqueue(1)
    try:
        vq.num = num
        vq.desc_uaddr, vq.avail_uaddr, vq.used_uaddr = 0x10000 + desc, 0x10000 + avail, 0x10000 + used
        vq.addr_set = True
        vq.event_idx = True
        vq.map_rings(mem)
        vq.last_avail = start
        deadline = time.monotonic() + 10
        while not struct.unpack_from("<I", shared, ctl + 4)[0] and time.monotonic() < deadline:
            time.sleep(0.001)
        end = time.monotonic() + 3.0
        n = 0
        while time.monotonic() < end and n < 0xFE00 - start:  # no wrap: 0 is never published
            for _ in range(100):
                slot = (start + n) % num
                struct.pack_into("<H", shared, avail + 4 + 2 * slot, n % num)
                struct.pack_into("<H", shared, avail + 2, (start + n + 1) & 0xFFFF)
                chain = vq.pop()
                assert chain is not None and chain.head == n % num
                chain.release()
                vq.push(chain.head, 0)
                vq.enable_kicks()
                n += 1
        assert struct.unpack_from("<H", shared, used + 2)[0] == start + n
    finally:
        struct.pack_into("<I", shared, ctl, 1)
        _, status = os.waitpid(pid, 0)
        vq.unmap_rings()
        mem.close()
    assert os.waitstatus_to_exitcode(status) == 0
    reads, bad = struct.unpack_from("<QQ", shared, ctl + 8)
    shared.close()
    assert reads > 0
    assert bad == 0, f"{bad} of {reads} reads saw a used.idx or avail_event never published"
