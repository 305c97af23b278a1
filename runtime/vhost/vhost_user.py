"""The vhost-user protocol, backend side, for a virtio-fs device.

Reference: QEMU docs/interop/vhost-user.rst ("Vhost-user Protocol"). Every
message is a header {request u32, flags u32, size u32} in host byte order (we
are little-endian x86-64), then `size` payload bytes; file descriptors travel
as SCM_RIGHTS ancillary data with the message. Flags: bits 0-1 the version
(1), bit 2 REPLY, bit 3 NEED_REPLY.

This module holds the messages and the per-connection device state
(`VhostUserBackend`); it does no queue processing itself. A `QueueListener`
(the server) is told when a queue becomes active or must stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

from actorfs.runtime.vhost.guest_memory import GuestMemory, GuestMemoryError
from actorfs.runtime.vhost.virtqueue import MAX_QUEUE_SIZE, Virtqueue

log = logging.getLogger("actorfs.vhost_user")

# -- front-end message types (vhost-user.rst, "Front-end message types") -------
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SET_BACKEND_REQ_FD = 21
GET_CONFIG = 24
SET_CONFIG = 25
RESET_DEVICE = 34
GET_MAX_MEM_SLOTS = 36

# -- back-end message types (sent on the backend channel) ---------------------
BACKEND_SHMEM_MAP = 9
BACKEND_SHMEM_UNMAP = 10

# -- header flags ---------------------------------------------------------------
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

HEADER = struct.Struct("<III")
MAX_PAYLOAD = 0x1000  # the largest message (memory table, config space) fits in 4 KiB
MAX_FDS = 32
MESSAGE_TIMEOUT = 5.0  # a message begun must be complete within this many seconds

# -- virtio feature bits ----------------------------------------------------------
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32

DEVICE_FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VHOST_USER_F_PROTOCOL_FEATURES
)

# -- protocol feature bits (vhost-user.rst, "Protocol features") ----------------
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_BACKEND_REQ = 1 << 5
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_F_BACKEND_SEND_FD = 1 << 10
PROTOCOL_F_RESET_DEVICE = 1 << 13
PROTOCOL_F_SHMEM = 1 << 20

PROTOCOL_FEATURES = (
    PROTOCOL_F_MQ
    | PROTOCOL_F_REPLY_ACK
    | PROTOCOL_F_BACKEND_REQ
    | PROTOCOL_F_RESET_DEVICE
)
# CONFIG is offered only with a tag to put in the config space, as virtiofsd does:
# QEMU 7.2 keeps the tag itself and warns about a backend that offers CONFIG.
DAX_PROTOCOL_FEATURES = PROTOCOL_F_BACKEND_SEND_FD | PROTOCOL_F_SHMEM

MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE carries at most 8
VIRTIO_FS_TAG_LEN = 36  # struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }

_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")  # {index, num}
_VRING_ADDR = struct.Struct("<IIQQQQ")  # {index, flags, desc, used, avail, log}
_MEM_HDR = struct.Struct("<II")  # {nregions, padding}
_MEM_REGION = struct.Struct("<QQQQ")  # {guest_addr, size, user_addr, mmap_offset}
_CONFIG_HDR = struct.Struct("<III")  # {offset, size, flags}
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8  # SET_VRING_KICK/CALL/ERR: no fd attached


class ProtocolError(Exception):
    """The frontend broke the protocol; the connection is closed."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


# -- socket I/O -----------------------------------------------------------------
async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _recv(sock: socket.socket, n: int, fds: list[int], deadline: list[float | None],
                stall: float) -> bytes:
    """Exactly n bytes (b'' at EOF before the first byte); collects passed fds.

    deadline[0] is set when the message's first byte arrives: from then on, the
    rest must come within `stall` seconds (ProtocolError otherwise).
    """
    buf = bytearray()
    while len(buf) < n:
        try:
            data, got, _flags, _addr = socket.recv_fds(sock, n - len(buf), MAX_FDS)
        except (BlockingIOError, InterruptedError):
            if deadline[0] is None:
                await _wait_readable(sock)  # between messages: no limit
                continue
            remaining = deadline[0] - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    await _wait_readable(sock)
            except TimeoutError:
                raise ProtocolError(f"a message stalled for {stall:g} s half-way") from None
            continue
        fds.extend(got)
        if not data:
            if buf or deadline[0] is not None:
                raise ProtocolError("connection closed inside a message")
            return b""
        if deadline[0] is None:
            deadline[0] = time.monotonic() + stall
        buf += data
    return bytes(buf)


async def recv_message(sock: socket.socket, stall: float = MESSAGE_TIMEOUT) -> Message | None:
    """The next message, or None when the frontend closed the connection.

    A message whose first byte came must be complete within `stall` seconds:
    a frontend that stops half-way is a ProtocolError, not a connection held forever.
    """
    fds: list[int] = []
    deadline: list[float | None] = [None]
    try:
        head = await _recv(sock, HEADER.size, fds, deadline, stall)
        if not head:
            return None
        request, flags, size = HEADER.unpack(head)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"message {request} with a {size}-byte payload")
        if flags & 0x3 != VERSION:
            raise ProtocolError(f"message {request} with protocol version {flags & 0x3}")
        payload = await _recv(sock, size, fds, deadline, stall) if size else b""
        return Message(request, flags, payload, fds)
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


async def send_message(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


# -- the device state ---------------------------------------------------------------
class QueueListener(Protocol):
    def queue_active(self, vq: Virtqueue) -> None: ...
    async def queue_stopping(self, vq: Virtqueue) -> None: ...
    def backend_channel(self, sock: socket.socket, shmem: bool) -> bool:
        """A backend channel arrived; True if the listener keeps (and will close) it."""
        ...


class VhostUserBackend:
    """One frontend connection's view of the device: features, memory, queues."""

    def __init__(self, listener: QueueListener, *, num_request_queues: int = 1,
                 max_queues: int = 1 + 16, tag: str | None = None, dax: bool = False,
                 allow_unsealed: bool = False):
        self.listener = listener
        self.allow_unsealed = allow_unsealed  # accept guest memory that can shrink
        self.max_queues = max_queues
        self.num_request_queues = num_request_queues
        self.tag = tag
        self.protocol_offered = (PROTOCOL_FEATURES | (DAX_PROTOCOL_FEATURES if dax else 0)
                                 | (PROTOCOL_F_CONFIG if tag else 0))
        self.features = 0  # acked virtio features
        self.protocol_features = 0
        self.owner = False
        self.mem: GuestMemory | None = None
        self.queues: dict[int, Virtqueue] = {}
        self.backend_sock: socket.socket | None = None

    # -- helpers -------------------------------------------------------------------
    def queue(self, index: int) -> Virtqueue:
        if not 0 <= index < self.max_queues:
            raise ProtocolError(f"queue index {index} beyond {self.max_queues} queues")
        vq = self.queues.get(index)
        if vq is None:
            vq = self.queues[index] = Virtqueue(index)
        return vq

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & PROTOCOL_F_REPLY_ACK)

    def _protocol_negotiated(self) -> bool:
        return bool(self.features & VHOST_USER_F_PROTOCOL_FEATURES)

    def _activate(self, vq: Virtqueue) -> None:
        """Start processing a queue once it has memory, rings, a kick fd and is enabled.

        ValueError when its kick fd cannot be watched (the request gets a failure ack).
        """
        if not (vq.started and vq.enabled and self.mem is not None):
            return
        if vq.ready:
            return
        try:
            vq.event_idx = bool(self.features & VIRTIO_RING_F_EVENT_IDX)
            vq.map_rings(self.mem)
        except GuestMemoryError as exc:
            log.warning("queue %d not started: %s", vq.index, exc)
            return
        try:
            self.listener.queue_active(vq)
        except ValueError:
            vq.stop()
            raise

    async def _stop_queue(self, vq: Virtqueue) -> int:
        """Stop a queue whatever its state (running, broken, never started): its
        runner, if any, stops listening and ends. Returns the next avail index."""
        await self.listener.queue_stopping(vq)
        return vq.stop()

    # -- dispatch -----------------------------------------------------------------------
    async def handle(self, msg: Message) -> bytes | None:
        """Apply one message; returns the encoded reply (or ack) to send, if any."""
        handler = _HANDLERS.get(msg.request)
        if handler is None:
            log.info("unknown vhost-user request %d (%d bytes): ignored", msg.request,
                     len(msg.payload))
            msg.close_fds()
            return self._ack(msg, ok=False)
        try:
            result = await handler(self, msg)
        except (struct.error, GuestMemoryError, ValueError) as exc:
            if msg.request in _REPLYING:
                # The frontend waits for a reply we cannot give: end the connection.
                raise ProtocolError(f"request {msg.request}: {exc}") from None
            log.warning("vhost-user request %d failed: %s", msg.request, exc)
            msg.close_fds()
            return self._ack(msg, ok=False)
        finally:
            msg.close_fds()  # handlers take the fds they keep out of msg.fds
        if isinstance(result, bytes):  # a request with its own reply
            return encode(msg.request, result, VERSION | FLAG_REPLY)
        return self._ack(msg, ok=result is not False)

    def _ack(self, msg: Message, ok: bool) -> bytes | None:
        # REPLY_ACK: a u64 reply, 0 for success, when the frontend set NEED_REPLY.
        if msg.need_reply and self.reply_ack:
            return encode(msg.request, _U64.pack(0 if ok else 1), VERSION | FLAG_REPLY)
        return None

    # -- handlers ------------------------------------------------------------------------
    async def _get_features(self, msg: Message) -> bytes:
        return _U64.pack(DEVICE_FEATURES)

    async def _set_features(self, msg: Message) -> bool:
        (value,) = _U64.unpack(msg.payload[:8])
        if value & ~DEVICE_FEATURES:
            log.warning("frontend acked unoffered features %#x", value & ~DEVICE_FEATURES)
        self.features = value & DEVICE_FEATURES
        if not self._protocol_negotiated():
            # Without the protocol-features bit, rings are enabled from the start.
            for vq in self.queues.values():
                vq.enabled = True
        return True

    async def _get_protocol_features(self, msg: Message) -> bytes:
        return _U64.pack(self.protocol_offered)

    async def _set_protocol_features(self, msg: Message) -> bool:
        (value,) = _U64.unpack(msg.payload[:8])
        self.protocol_features = value & self.protocol_offered
        return True

    async def _set_owner(self, msg: Message) -> bool:
        self.owner = True
        return True

    async def _reset(self, msg: Message) -> bool:
        await self.reset()
        return True

    async def _get_queue_num(self, msg: Message) -> bytes:
        return _U64.pack(self.max_queues)

    async def _set_mem_table(self, msg: Message) -> bool:
        nregions, _pad = _MEM_HDR.unpack_from(msg.payload)
        if not 0 < nregions <= MAX_MEM_REGIONS:
            raise ValueError(f"{nregions} memory regions")
        if len(msg.payload) < _MEM_HDR.size + nregions * _MEM_REGION.size:
            raise ValueError("memory table shorter than its region count")
        entries = [_MEM_REGION.unpack_from(msg.payload, _MEM_HDR.size + i * _MEM_REGION.size)
                   for i in range(nregions)]
        fds, msg.fds = msg.fds, []
        mem = GuestMemory.from_fds(entries, fds,  # closes the fds
                                   allow_unsealed=self.allow_unsealed)
        old, self.mem = self.mem, mem
        # Running queues keep running: re-translate their ring addresses.
        for vq in self.queues.values():
            if vq.ready:
                try:
                    vq.map_rings(mem)
                except GuestMemoryError as exc:
                    log.warning("queue %d lost its rings in the new memory table: %s",
                                vq.index, exc)
                    vq.broken = True
            else:
                try:
                    self._activate(vq)
                except ValueError as exc:
                    log.warning("queue %d not started: %s", vq.index, exc)
        if old is not None:
            old.close()
        return True

    async def _set_vring_num(self, msg: Message) -> bool:
        index, num = _VRING_STATE.unpack_from(msg.payload)
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise ValueError(f"queue size {num}")
        vq = self.queue(index)
        if vq.ready:
            raise ValueError(f"queue {index} resized while running")
        vq.num = num
        return True

    async def _set_vring_addr(self, msg: Message) -> bool:
        index, _flags, desc, used, avail, _log = _VRING_ADDR.unpack_from(msg.payload)
        vq = self.queue(index)
        vq.desc_uaddr, vq.used_uaddr, vq.avail_uaddr = desc, used, avail
        vq.addr_set = True
        if vq.ready and self.mem is not None:
            vq.map_rings(self.mem)
        return True

    async def _set_vring_base(self, msg: Message) -> bool:
        index, base = _VRING_STATE.unpack_from(msg.payload)
        vq = self.queue(index)
        if vq.ready:
            # Moving last_avail under a running ring would pop chains a second time.
            raise ValueError(f"queue {index}: SET_VRING_BASE while the ring runs")
        vq.last_avail = base & 0xFFFF
        return True

    async def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = _VRING_STATE.unpack_from(msg.payload)
        vq = self.queue(index)
        base = await self._stop_queue(vq)
        vq.close_fds()  # the spec: the kick fd is no longer used once the ring stops
        return _VRING_STATE.pack(index, base)

    def _vring_fd(self, msg: Message) -> tuple[Virtqueue, int | None]:
        (value,) = _U64.unpack(msg.payload[:8])
        vq = self.queue(value & VRING_INDEX_MASK)
        if value & VRING_NOFD:
            return vq, None
        if not msg.fds:
            raise ValueError(f"request {msg.request} without its fd")
        check_notify_fd(msg.fds[0])  # refused: handle() closes it
        fd = msg.fds.pop(0)
        return vq, fd

    async def _set_vring_kick(self, msg: Message) -> bool:
        vq, fd = self._vring_fd(msg)
        await self._stop_queue(vq)  # a new kick fd: whatever ran on the old one ends
        if vq.kick_fd is not None:
            os.close(vq.kick_fd)
        vq.kick_fd = fd
        if fd is None:
            log.warning("queue %d: no kick fd (polling is not supported)", vq.index)
            return True
        # The ring is started by its kick fd; without protocol features it is enabled too.
        vq.started = True
        if not self._protocol_negotiated():
            vq.enabled = True
        self._activate(vq)
        return True

    async def _set_vring_call(self, msg: Message) -> bool:
        vq, fd = self._vring_fd(msg)
        if vq.call_fd is not None:
            os.close(vq.call_fd)
        vq.call_fd = fd
        return True

    async def _set_vring_err(self, msg: Message) -> bool:
        vq, fd = self._vring_fd(msg)
        if vq.err_fd is not None:
            os.close(vq.err_fd)
        vq.err_fd = fd
        return True

    async def _set_vring_enable(self, msg: Message) -> bool:
        index, enable = _VRING_STATE.unpack_from(msg.payload)
        vq = self.queue(index)
        vq.enabled = bool(enable)
        if enable:
            self._activate(vq)
        else:
            await self._stop_queue(vq)
            vq.started = vq.kick_fd is not None
        return True

    async def _set_backend_req_fd(self, msg: Message) -> bool:
        if not msg.fds:
            raise ValueError("SET_BACKEND_REQ_FD without an fd")
        fd = msg.fds.pop(0)
        if self.backend_sock is not None:
            self.backend_sock.close()
        sock = socket.socket(fileno=fd)
        shmem = bool(self.protocol_features & PROTOCOL_F_SHMEM)
        # Kept by the listener (the DAX sender) or by us, to be closed with the connection.
        self.backend_sock = None if self.listener.backend_channel(sock, shmem) else sock
        return True

    def config_space(self) -> bytes:
        tag = (self.tag or "").encode()[:VIRTIO_FS_TAG_LEN].ljust(VIRTIO_FS_TAG_LEN, b"\0")
        return tag + struct.pack("<I", self.num_request_queues)

    async def _get_config(self, msg: Message) -> bytes:
        offset, size, flags = _CONFIG_HDR.unpack_from(msg.payload)
        space = self.config_space()
        if offset + size > len(space) or size > MAX_PAYLOAD - _CONFIG_HDR.size:
            # A failed read answers with an empty config payload (size 0).
            return _CONFIG_HDR.pack(offset, 0, flags)
        return _CONFIG_HDR.pack(offset, size, flags) + space[offset:offset + size]

    async def _set_config(self, msg: Message) -> bool:
        return False  # the virtio-fs configuration space is read-only

    async def _get_max_mem_slots(self, msg: Message) -> bytes:
        return _U64.pack(MAX_MEM_REGIONS)

    async def _ignored(self, msg: Message) -> bool:
        # Logging and other features we never offered: fds are closed, nothing kept.
        return False

    # -- lifecycle ------------------------------------------------------------------------
    async def reset(self) -> None:
        """RESET_OWNER / RESET_DEVICE: every ring stops, state back to just-connected."""
        for vq in self.queues.values():
            await self.listener.queue_stopping(vq)
            vq.reset()
        self.queues.clear()
        self.features = 0

    async def close(self) -> None:
        await self.reset()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None


def check_notify_fd(fd: int) -> None:
    """A kick, call or err fd must be an eventfd or a pipe/FIFO; it is made non-blocking.

    A blocking fd would let the frontend stop the event loop in write() (an
    eventfd at its maximum count, a full pipe); anything else (a file, a
    socket, a device) is refused with ValueError.
    """
    try:
        st = os.fstat(fd)
        kind = "pipe" if stat.S_ISFIFO(st.st_mode) else os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise ValueError(f"notification fd: {exc.strerror}") from None
    if kind not in ("pipe", "anon_inode:[eventfd]"):
        raise ValueError(f"notification fd is not an eventfd or a pipe ({kind})")
    os.set_blocking(fd, False)


# Requests whose reply is their answer, not an ack.
_REPLYING = frozenset({GET_FEATURES, GET_PROTOCOL_FEATURES, GET_VRING_BASE, GET_QUEUE_NUM,
                       GET_CONFIG, GET_MAX_MEM_SLOTS})

_HANDLERS = {
    GET_FEATURES: VhostUserBackend._get_features,
    SET_FEATURES: VhostUserBackend._set_features,
    SET_OWNER: VhostUserBackend._set_owner,
    RESET_OWNER: VhostUserBackend._reset,
    SET_MEM_TABLE: VhostUserBackend._set_mem_table,
    SET_LOG_BASE: VhostUserBackend._ignored,
    SET_LOG_FD: VhostUserBackend._ignored,
    SET_VRING_NUM: VhostUserBackend._set_vring_num,
    SET_VRING_ADDR: VhostUserBackend._set_vring_addr,
    SET_VRING_BASE: VhostUserBackend._set_vring_base,
    GET_VRING_BASE: VhostUserBackend._get_vring_base,
    SET_VRING_KICK: VhostUserBackend._set_vring_kick,
    SET_VRING_CALL: VhostUserBackend._set_vring_call,
    SET_VRING_ERR: VhostUserBackend._set_vring_err,
    GET_PROTOCOL_FEATURES: VhostUserBackend._get_protocol_features,
    SET_PROTOCOL_FEATURES: VhostUserBackend._set_protocol_features,
    GET_QUEUE_NUM: VhostUserBackend._get_queue_num,
    SET_VRING_ENABLE: VhostUserBackend._set_vring_enable,
    SET_BACKEND_REQ_FD: VhostUserBackend._set_backend_req_fd,
    GET_CONFIG: VhostUserBackend._get_config,
    SET_CONFIG: VhostUserBackend._set_config,
    RESET_DEVICE: VhostUserBackend._reset,
    GET_MAX_MEM_SLOTS: VhostUserBackend._get_max_mem_slots,
}
