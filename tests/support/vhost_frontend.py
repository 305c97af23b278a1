"""A small vhost-user FRONTEND for tests: what a VMM does, in Python.

It connects to the backend's socket, negotiates features, shares a memfd as
"guest memory" (SET_MEM_TABLE), lays out split virtqueues in it, and plays the
guest driver: writes descriptor chains (well-formed or hostile), kicks, waits
for the call eventfd and reads the used ring. Blocking code: the backend under
test runs on its own event loop in another thread.

Addresses: guest-physical memory starts at GPA_BASE; the "frontend virtual"
address of the same bytes (what SET_VRING_ADDR carries) starts at UADDR_BASE.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import socket
import struct

from actorfs.runtime.vhost import vhost_user as vu

GPA_BASE = 0x100000
UADDR_BASE = 0x7F0000000000
PAGE = 4096

HDR = struct.Struct("<III")
U64 = struct.Struct("<Q")
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header


class Frontend:
    def __init__(self, path: str, mem_size: int = 8 << 20, timeout: float = 10.0,
                 sealed: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.timeout = timeout
        # Sealed against shrinking and growing, as QEMU's memory-backend-memfd (seal=on).
        self.memfd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING if sealed else 0)
        os.ftruncate(self.memfd, mem_size)
        if sealed:
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.mem = mmap.mmap(self.memfd, mem_size)
        self.mem_size = mem_size
        self.brk = 0  # bump allocator over guest memory
        self.queues: dict[int, Queue] = {}

    # -- memory ------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        """Guest-physical address of `size` fresh bytes."""
        self.brk = (self.brk + align - 1) // align * align
        off = self.brk
        self.brk += size
        if self.brk > self.mem_size:
            raise MemoryError("test guest memory exhausted")
        return GPA_BASE + off

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - GPA_BASE
        self.mem[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - GPA_BASE
        return bytes(self.mem[off:off + n])

    def uaddr(self, gpa: int) -> int:
        return gpa - GPA_BASE + UADDR_BASE

    # -- messages ------------------------------------------------------------------------
    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False, flags: int | None = None) -> None:
        if flags is None:
            flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        data = HDR.pack(request, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def recv(self) -> tuple[int, int, bytes]:
        head = self._recv_exact(HDR.size)
        request, flags, size = HDR.unpack(head)
        return request, flags, self._recv_exact(size) if size else b""

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("backend closed the connection")
            buf += chunk
        return buf

    def call(self, request: int, payload: bytes = b"", fds=None) -> bytes:
        """A request with its own reply (GET_*)."""
        self.send(request, payload, fds)
        req, flags, reply = self.recv()
        assert req == request and flags & vu.FLAG_REPLY, (req, flags)
        return reply

    def acked(self, request: int, payload: bytes = b"", fds=None) -> int:
        """A request sent with NEED_REPLY: the u64 ack (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        req, flags, reply = self.recv()
        assert req == request and flags & vu.FLAG_REPLY, (req, flags)
        return U64.unpack(reply)[0]

    def get_u64(self, request: int) -> int:
        return U64.unpack(self.call(request))[0]

    # -- the usual QEMU sequence ------------------------------------------------------------
    def negotiate(self, features: int | None = None, protocol: int | None = None) -> None:
        offered = self.get_u64(vu.GET_FEATURES)
        self.features = offered if features is None else features & offered
        if self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            pf = self.get_u64(vu.GET_PROTOCOL_FEATURES)
            self.protocol = pf if protocol is None else protocol & pf
            self.send(vu.SET_PROTOCOL_FEATURES, U64.pack(self.protocol))
        else:
            self.protocol = 0
        self.send(vu.SET_OWNER)
        self.send(vu.SET_FEATURES, U64.pack(self.features))

    def set_mem_table(self) -> int:
        payload = struct.pack("<II", 1, 0) + struct.pack(
            "<QQQQ", GPA_BASE, self.mem_size, UADDR_BASE, 0)
        return self.acked(vu.SET_MEM_TABLE, payload, [self.memfd])

    def setup_queue(self, index: int, size: int = 64, enable: bool = True, **fds) -> Queue:
        """fds: kick_fd / call_fd / err_fd to send instead of fresh eventfds."""
        q = Queue(self, index, size)
        for name, fd in fds.items():
            os.close(getattr(q, name))
            setattr(q, name, fd)
        self.queues[index] = q
        self.send(vu.SET_VRING_NUM, struct.pack("<II", index, size))
        self.send(vu.SET_VRING_BASE, struct.pack("<II", index, 0))
        self.send(vu.SET_VRING_ADDR, struct.pack(
            "<IIQQQQ", index, 0, self.uaddr(q.desc), self.uaddr(q.used), self.uaddr(q.avail), 0))
        self.send(vu.SET_VRING_CALL, U64.pack(index), [q.call_fd])
        self.send(vu.SET_VRING_ERR, U64.pack(index), [q.err_fd])
        self.send(vu.SET_VRING_KICK, U64.pack(index), [q.kick_fd])
        if enable and self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            assert self.acked(vu.SET_VRING_ENABLE, struct.pack("<II", index, 1)) == 0
        return q

    def start(self, nqueues: int = 2, size: int = 64) -> None:
        self.negotiate()
        assert self.set_mem_table() == 0
        for i in range(nqueues):
            self.setup_queue(i, size)

    def get_vring_base(self, index: int) -> int:
        i, base = struct.unpack("<II", self.call(vu.GET_VRING_BASE, struct.pack("<II", index, 0)))
        assert i == index
        return base

    def close(self) -> None:
        if self.memfd < 0:
            return
        with contextlib.suppress(OSError):
            self.sock.close()
        for q in self.queues.values():
            q.close()
        self.mem.close()
        os.close(self.memfd)
        self.memfd = -1


class Queue:
    """The driver side of one split virtqueue in the frontend's memory."""

    def __init__(self, fe: Frontend, index: int, size: int):
        self.fe = fe
        self.index = index
        self.size = size
        self.desc = fe.alloc(16 * size, PAGE)
        self.avail = fe.alloc(6 + 2 * size, 2)
        self.used = fe.alloc(6 + 8 * size, 4)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.last_used = 0
        self.next_desc = 0

    # -- descriptors -------------------------------------------------------------------------
    def put_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                 table: int | None = None) -> None:
        self.fe.write((self.desc if table is None else table) + 16 * i,
                      DESC.pack(addr, length, flags, nxt))

    def take(self, n: int) -> list[int]:
        out = [(self.next_desc + k) % self.size for k in range(n)]
        self.next_desc = (self.next_desc + n) % self.size
        return out

    def add_chain(self, readable: list[bytes], writable: list[int],
                  indirect: bool = False, kick: bool = True) -> tuple[int, list[tuple[int, int]]]:
        """Buffers in fresh guest memory; returns head and the writable (gpa, len)."""
        bufs = []
        for data in readable:
            gpa = self.fe.alloc(max(len(data), 1))
            self.fe.write(gpa, data)
            bufs.append((gpa, len(data), 0))
        out = []
        for n in writable:
            gpa = self.fe.alloc(max(n, 1))
            bufs.append((gpa, n, F_WRITE))
            out.append((gpa, n))
        if indirect:
            table = self.fe.alloc(16 * len(bufs))
            for k, (gpa, n, fl) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.put_desc(k, gpa, n, fl | (0 if last else F_NEXT), k + 1, table)
            (head,) = self.take(1)
            self.put_desc(head, table, 16 * len(bufs), F_INDIRECT, 0)
        else:
            idx = self.take(len(bufs))
            for k, (gpa, n, fl) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.put_desc(idx[k], gpa, n, fl | (0 if last else F_NEXT),
                              0 if last else idx[k + 1])
            head = idx[0]
        self.publish(head, kick)
        return head, out

    def publish(self, head: int, kick: bool = True) -> None:
        """Put a head in the available ring (element, then idx) and kick."""
        slot = self.avail_idx % self.size
        self.fe.write(self.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.fe.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        if kick:
            self.kick()

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.fe.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- used ring -----------------------------------------------------------------------------
    def used_idx(self) -> int:
        return struct.unpack("<H", self.fe.read(self.used + 2, 2))[0]

    def wait_used(self, count: int = 1, timeout: float | None = None) -> list[tuple[int, int]]:
        """The next `count` used elements (id, len), waiting on the call eventfd."""
        timeout = self.fe.timeout if timeout is None else timeout
        out: list[tuple[int, int]] = []
        while len(out) < count:
            while self.last_used != self.used_idx() and len(out) < count:
                slot = self.last_used % self.size
                out.append(struct.unpack("<II", self.fe.read(self.used + 4 + 8 * slot, 8)))
                self.last_used = (self.last_used + 1) & 0xFFFF
            if len(out) >= count:
                break
            # EVENT_IDX: ask for an interrupt at the next used entry, then look again.
            self.fe.write(self.avail + 4 + 2 * self.size, struct.pack("<H", self.last_used))
            if self.last_used != self.used_idx():
                continue
            ready, _, _ = select.select([self.call_fd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"queue {self.index}: {len(out)}/{count} used after {timeout}s")
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call_fd)
        return out

    def error_signalled(self) -> bool:
        try:
            os.eventfd_read(self.err_fd)
        except BlockingIOError:
            return False
        return True

    # -- FUSE round trip ------------------------------------------------------------------------
    def fuse_nowait(self, opcode: int, nodeid: int, body: bytes = b"", reply_size: int = 4096,
                    unique: int | None = None, split: bool = True, indirect: bool = False,
                    length: int | None = None, kick: bool = True):
        """Publish one FUSE request; returns (head, writable buffers, unique).

        length: the fuse_in_header.len to claim (default: the true length).
        """
        if unique is None:
            unique = self.fe.next_unique = getattr(self.fe, "next_unique", 0) + 2
        if length is None:
            length = IN_HEADER.size + len(body)
        hdr = IN_HEADER.pack(length, opcode, unique, nodeid,
                             os.getuid(), os.getgid(), os.getpid(), 0, 0)
        readable = [hdr, body] if split and body else [hdr + body]
        writable = [OUT_HEADER.size, reply_size] if split else [OUT_HEADER.size + reply_size]
        head, out = self.add_chain(readable, writable, indirect=indirect, kick=kick)
        return head, out, unique

    def fuse(self, opcode: int, nodeid: int, body: bytes = b"", reply_size: int = 4096,
             unique: int | None = None, split: bool = True,
             indirect: bool = False) -> tuple[int, bytes]:
        """Send one FUSE request; returns (error, reply payload)."""
        head, out, unique = self.fuse_nowait(opcode, nodeid, body, reply_size, unique, split,
                                             indirect)
        ((used_id, used_len),) = self.wait_used()
        assert used_id == head, (used_id, head)
        data = b"".join(self.fe.read(gpa, n) for gpa, n in out)[:used_len]
        length, error, got_unique = OUT_HEADER.unpack_from(data)
        assert got_unique == unique and length == used_len, (got_unique, unique, length, used_len)
        return error, data[OUT_HEADER.size:]

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
