"""DAX for an out-of-process hypervisor: map/unmap requests sent over vhost-user's backend channel.

The hypervisor maps the same shm window in its own process. Instead of
mapping file pages here, actorfs sends it each change as a backend-channel
message (the socket a front-end hands over with VHOST_USER_SET_BACKEND_REQ_FD)
and the hypervisor performs the MAP_FIXED on its side. Layout, from QEMU's
docs/interop/vhost-user.rst ("MMAP request", "Back-end message types"):

    header:  u32 request, u32 flags, u32 size            (little endian)
    VHOST_USER_BACKEND_SHMEM_MAP    id 9,  payload VhostUserMMap, fd in SCM_RIGHTS
    VHOST_USER_BACKEND_SHMEM_UNMAP  id 10, payload VhostUserMMap (no fd)
    VhostUserMMap: u8 shmid, u8 padding[7], u64 fd_offset, u64 shm_offset,
                   u64 len, u64 flags (0: read-only, 1: read-write)
    needs VHOST_USER_PROTOCOL_F_SHMEM (20); with VHOST_USER_PROTOCOL_F_REPLY_ACK (3)
    the sender sets NEED_REPLY (flags bit 3) and the front-end answers with the
    same request, REPLY (bit 2), and a u64: zero on success.

The spec forbids mapping over an existing map and unmaps only whole mapped
regions, so `ChannelMapper.splits_in_place` is False: the DAX actor unmaps an
entry it splits and maps the kept pieces again.

Sends run on one dedicated thread, in the order the DAX actor issued them, so
the hypervisor's window always follows the actor's table.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from actorfs.actors.dax import FileRef, Mapping, Prepared, _identity_of
from actorfs.runtime.host.fds import OwnedFd
from actorfs.runtime.host.shm_view import (
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    ShmView,
    mmap_at,
    munmap,
)

VHOST_USER_BACKEND_SHMEM_MAP = 9
VHOST_USER_BACKEND_SHMEM_UNMAP = 10
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_SHMEM = 20
VHOST_USER_MMAP_FLAG_RW = 1
# virtio-fs: shared memory region 0 is the DAX cache window (VIRTIO_FS_SHMCAP_ID_CACHE).
VIRTIO_FS_SHMCAP_ID_CACHE = 0

HEADER = struct.Struct("<III")
MMAP = struct.Struct("<B7xQQQQ")
U64 = struct.Struct("<Q")


def encode_mmap(
    request: int,
    shmid: int,
    fd_offset: int,
    shm_offset: int,
    length: int,
    flags: int,
    need_reply: bool,
) -> bytes:
    """One SHMEM_MAP / SHMEM_UNMAP message (header + VhostUserMMap)."""
    hflags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
    return HEADER.pack(request, hflags, MMAP.size) + MMAP.pack(
        shmid, fd_offset, shm_offset, length, flags
    )


def encode_reply(request: int, value: int) -> bytes:
    return HEADER.pack(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, U64.size) + U64.pack(
        value & 0xFFFFFFFFFFFFFFFF
    )


def recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes:
    """n bytes from a stream socket, collecting any SCM_RIGHTS fds into `fds`."""
    buf = bytearray()
    while len(buf) < n:
        data, got, _flags, _addr = socket.recv_fds(sock, n - len(buf), 8)
        if fds is not None:
            fds.extend(got)
        else:
            for fd in got:  # nobody asked for fds here: do not leak them
                os.close(fd)
        if not data:
            raise ConnectionError("vhost-user backend channel closed")
        buf += data
    return bytes(buf)


class DaxChannel:
    """The sending side: blocking calls; one thread (or the `lock`) at a time.

    `reply_ack` is whether VHOST_USER_PROTOCOL_F_REPLY_ACK was negotiated; only
    then can a refusal by the hypervisor be seen (as OSError EIO).
    """

    def __init__(
        self,
        sock: socket.socket,
        reply_ack: bool = True,
        shmid: int = VIRTIO_FS_SHMCAP_ID_CACHE,
        timeout: float | None = 10.0,
    ):
        self.sock = sock
        self.reply_ack = reply_ack
        self.shmid = shmid
        self.timeout = timeout
        self.lock = threading.Lock()  # shared with other users of the backend channel
        self.broken: BaseException | None = None

    def send_map(self, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool) -> None:
        flags = VHOST_USER_MMAP_FLAG_RW if writable else 0
        self._send(VHOST_USER_BACKEND_SHMEM_MAP, fd, fd_offset, shm_offset, length, flags)

    def send_unmap(self, shm_offset: int, length: int) -> None:
        self._send(VHOST_USER_BACKEND_SHMEM_UNMAP, None, 0, shm_offset, length, 0)

    def _send(
        self,
        request: int,
        fd: int | None,
        fd_offset: int,
        shm_offset: int,
        length: int,
        flags: int,
    ) -> None:
        if self.broken is not None:
            raise OSError(errno.EIO, f"backend channel is broken: {self.broken}")
        msg = encode_mmap(request, self.shmid, fd_offset, shm_offset, length, flags, self.reply_ack)
        with self.lock:
            try:
                self.sock.settimeout(self.timeout)
                sent = socket.send_fds(self.sock, [msg], [fd]) if fd is not None else 0
                if sent < len(msg):
                    self.sock.sendall(msg[sent:])
                if self.reply_ack:
                    value = self._read_reply(request)
                else:
                    value = 0
            except (OSError, ConnectionError, ValueError) as exc:
                # Lost or out-of-step: nothing later on this socket can be trusted.
                self.broken = exc
                raise OSError(errno.EIO, f"backend channel failed: {exc}") from exc
        if value != 0:
            raise OSError(errno.EIO, f"hypervisor refused request {request} (reply {value})")

    def _read_reply(self, request: int) -> int:
        req, flags, size = HEADER.unpack(recv_exact(self.sock, HEADER.size))
        payload = recv_exact(self.sock, size) if size else b""
        if req != request or not flags & VHOST_USER_REPLY_MASK or size != U64.size:
            raise ValueError(f"unexpected reply: request {req}, flags {flags:#x}, size {size}")
        value: int = U64.unpack(payload)[0]
        return value


class ChannelMapper:
    """DAX mapper strategy that sends every change to an out-of-process hypervisor."""

    splits_in_place = False

    def __init__(
        self,
        channel: DaxChannel | None = None,
        own_socket: bool = False,
        close_timeout: float = 10.0,
    ):
        # The backend channel may come later (VHOST_USER_SET_BACKEND_REQ_FD): connect().
        self.channel = channel
        self.own_socket = own_socket
        self.close_timeout = close_timeout
        self.view: ShmView | None = None
        self._steps: list[tuple[Any, ...]] = []
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="actorfs-dax-channel")

    def bind(self, view: ShmView) -> None:
        self.view = view

    def connect(self, channel: DaxChannel) -> None:
        """Use this backend channel from now on (a new frontend connection)."""
        self.channel = channel

    # -- blocking pool -------------------------------------------------------
    def prepare(self, fd: int, foffset: int, length: int, writable: bool) -> Prepared:
        """Check here that the host can map it (the errno the guest should get); keep fd."""
        with OwnedFd(fd) as owned:
            identity = _identity_of(fd)
            prot = PROT_READ | (PROT_WRITE if writable else 0)
            munmap(mmap_at(None, length, prot, MAP_SHARED, fd, foffset), length)
            return Prepared(identity, length, None, owned.release())

    # -- actor task: collect steps, send them in order on commit ---------------
    def install(self, m: Mapping, prepared: Prepared | None) -> None:
        self._steps.append(("map", m.file, m.foffset, m.start, m.length, m.writable))

    def clear(self, start: int, length: int) -> None:
        self._steps.append(("unmap", start, length))

    def release(self, ref: FileRef) -> None:
        # Closed only after the queued messages that carry it have gone out.
        self._steps.append(("close", ref))

    def commit(self) -> Future[None] | None:
        if not self._steps:
            return None
        steps, self._steps = self._steps, []
        return self._sender.submit(self._run, steps)

    def _run(self, steps: list[tuple[Any, ...]]) -> None:
        first: OSError | None = None
        for step in steps:
            try:
                if step[0] != "close" and self.channel is None:
                    raise OSError(errno.EIO, "no backend channel to the hypervisor yet")
                if step[0] == "map":
                    _, ref, foffset, start, length, writable = step
                    assert self.channel is not None  # checked above
                    self.channel.send_map(ref.fd, foffset, start, length, writable)
                elif step[0] == "unmap":
                    assert self.channel is not None  # checked above
                    self.channel.send_unmap(step[1], step[2])
                else:
                    os.close(step[1].fd)
            except OSError as exc:  # keep going: later closes must still happen
                first = first or exc
        if first is not None:
            raise first

    def close(self, table: list[Mapping]) -> None:
        """Unmap every entry on the hypervisor's side and close every fd we hold."""
        refs: dict[int, FileRef] = {}
        for m in table:
            self.clear(m.start, m.length)
            if m.file is not None:
                refs[id(m.file)] = m.file
        for ref in refs.values():
            self.release(ref)
        done = self.commit()
        try:
            if done is not None:
                done.result(self.close_timeout)
        finally:
            self._sender.shutdown(wait=True)
            if self.own_socket and self.channel is not None:
                self.channel.sock.close()
