"""A reference receiver of DAX backend-channel messages: the hypervisor's side.

A Python hypervisor (and the tests) attach the shm window by name, then feed
this class the backend-channel socket: each VHOST_USER_BACKEND_SHMEM_MAP puts
the received fd's pages at `shm_offset` of its own view of the window
(MAP_FIXED), each SHMEM_UNMAP puts the window's own pages back. The rules of
the vhost-user spec are enforced: no mapping over an existing map, unmap only
whole mapped regions. The sender is not trusted: anything malformed gets a
non-zero reply (when one is asked for) and changes nothing.

Run as a process for tests and experiments:

    python -m actorfs.runtime.dax.receiver --window NAME --fd N

serves the channel on inherited fd N in a thread, and answers line commands
on stdin (`sha256 OFF LEN`, `read OFF LEN`, `write OFF HEX`, `msync OFF LEN`,
`maps`, `quit`), one line of output each.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import socket
import sys
import threading
from typing import TextIO

from actorfs.runtime.dax.channel import (
    HEADER,
    MMAP,
    VHOST_USER_BACKEND_SHMEM_MAP,
    VHOST_USER_BACKEND_SHMEM_UNMAP,
    VHOST_USER_MMAP_FLAG_RW,
    VHOST_USER_NEED_REPLY_MASK,
    VIRTIO_FS_SHMCAP_ID_CACHE,
    encode_reply,
    recv_exact,
)
from actorfs.runtime.host.shm_view import ShmView

log = logging.getLogger("actorfs.dax_receiver")

_MAX_PAYLOAD = 4096  # far more than any message we handle; bounds what we read


class DaxReceiver:
    """Applies SHMEM_MAP / SHMEM_UNMAP from one backend channel to a window view."""

    def __init__(self, sock: socket.socket, view: ShmView, shmid: int = VIRTIO_FS_SHMCAP_ID_CACHE):
        self.sock = sock
        self.view = view
        self.shmid = shmid
        self.regions: dict[int, int] = {}  # shm_offset -> len of mapped regions
        self.lock = threading.Lock()  # guards regions and the view against readers
        self.handled = 0

    def serve(self) -> None:
        """Handle messages until the sender closes the channel."""
        try:
            while self.handle_one():
                pass
        except (ConnectionError, OSError) as exc:
            log.info("backend channel ended: %s", exc)

    def handle_one(self) -> bool:
        """Read and apply one message; False at end of stream."""
        fds: list[int] = []
        try:
            head = recv_exact(self.sock, HEADER.size, fds)
        except ConnectionError:
            return False
        try:
            request, flags, size = HEADER.unpack(head)
            if size > _MAX_PAYLOAD:
                raise ConnectionError(f"message of {size} bytes: not a vhost-user peer")
            payload = recv_exact(self.sock, size, fds) if size else b""
            status = self._apply(request, payload, fds)
            if flags & VHOST_USER_NEED_REPLY_MASK:
                self.sock.sendall(encode_reply(request, status))
            self.handled += 1
        finally:
            for fd in fds:
                os.close(fd)  # a mapping holds its own reference to the file
        return True

    def _apply(self, request: int, payload: bytes, fds: list[int]) -> int:
        """0 on success, a positive errno otherwise (sent back as the reply value)."""
        if request not in (VHOST_USER_BACKEND_SHMEM_MAP, VHOST_USER_BACKEND_SHMEM_UNMAP):
            return errno.ENOSYS
        if len(payload) != MMAP.size:
            return errno.EINVAL
        shmid, fd_offset, shm_offset, length, mflags = MMAP.unpack(payload)
        if shmid != self.shmid:
            return errno.EINVAL
        try:
            self.view.check_range(shm_offset, length)
        except OSError as exc:
            return exc.errno if exc.errno is not None else errno.EIO  # check_range sets one
        with self.lock:
            if request == VHOST_USER_BACKEND_SHMEM_MAP:
                if len(fds) != 1 or mflags & ~VHOST_USER_MMAP_FLAG_RW:
                    return errno.EINVAL
                if any(
                    s < shm_offset + length and shm_offset < s + n for s, n in self.regions.items()
                ):
                    return errno.EEXIST  # mapping over an existing map is not allowed
                try:
                    self.view.map_fd(
                        shm_offset,
                        length,
                        fds[0],
                        fd_offset,
                        bool(mflags & VHOST_USER_MMAP_FLAG_RW),
                    )
                except OSError as exc:
                    return exc.errno or errno.EIO
                self.regions[shm_offset] = length
                return 0
            if self.regions.get(shm_offset) != length:
                return errno.EINVAL  # only whole mapped regions can be unmapped
            self.view.restore(shm_offset, length)
            del self.regions[shm_offset]
            return 0


def _commands(receiver: DaxReceiver, out: TextIO) -> None:
    view = receiver.view
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        try:
            with receiver.lock:
                if cmd == "sha256":
                    reply = hashlib.sha256(view.read(int(args[0]), int(args[1]))).hexdigest()
                elif cmd == "read":
                    reply = view.read(int(args[0]), int(args[1])).hex()
                elif cmd == "write":
                    view.write(int(args[0]), bytes.fromhex(args[1]))
                    reply = "ok"
                elif cmd == "msync":
                    view.msync(int(args[0]), int(args[1]))
                    reply = "ok"
                elif cmd == "maps":
                    reply = json.dumps(sorted(receiver.regions.items()))
                elif cmd == "handled":
                    reply = str(receiver.handled)
                elif cmd == "quit":
                    return
                else:
                    reply = f"error unknown command {cmd}"
        except (ValueError, IndexError, OSError) as exc:
            reply = f"error {exc}"
        print(reply, file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="reference DAX backend-channel receiver")
    ap.add_argument("--window", required=True, help="shm name of the DAX window")
    ap.add_argument("--fd", type=int, required=True, help="inherited backend-channel socket fd")
    ap.add_argument("--shmid", type=int, default=VIRTIO_FS_SHMCAP_ID_CACHE)
    args = ap.parse_args(argv)
    view = ShmView.attach(args.window)
    sock = socket.socket(fileno=args.fd)
    receiver = DaxReceiver(sock, view, args.shmid)
    server = threading.Thread(target=receiver.serve, name="dax-receiver", daemon=True)
    server.start()
    print("ready", flush=True)
    try:
        _commands(receiver, sys.stdout)
    finally:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the serving thread
        server.join()
        sock.close()
        view.close(unlink=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
