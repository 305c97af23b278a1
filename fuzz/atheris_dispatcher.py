"""Coverage-guided fuzzing of the decoder and the dispatcher over a real op layer.

    python3 -m fuzz.atheris_dispatcher [libFuzzer options] [CORPUS_DIR ...]
    e.g. python3 -m fuzz.atheris_dispatcher -max_total_time=600 /tmp/corpus

One input is a session: records of (u8 flags, u16 length, frame bytes). Each
frame goes through `protocol.decode` and `Dispatcher.submit` of one long-lived
session over a small scratch tree (a 64 MiB tmpfs when run as root). Flags
steer the fuzzer past the cheap checks: bit 0 writes the true length into the
header, bit 1 aims the frame at a nodeid the session handed out, bit 2 at the
root. A crash is any exception out of the dispatcher, a request without its
one reply (or a reply to FORGET & co.), a reply with a bad header, or a hang.

Found crashes are kept under tests/fuzz_corpus/ and replayed by
tests/unit/fuse/test_fuzz_corpus.py (which needs no atheris).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
import tempfile

try:
    import atheris
except ImportError:  # the harness is also used by tests/unit/fuse/test_fuzz_corpus.py
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        import actorfs.actors.handles  # noqa: F401
        import actorfs.actors.inode_table  # noqa: F401
        import actorfs.runtime.ops.ops  # noqa: F401
        from actorfs.runtime.fuse import protocol as P
        from actorfs.runtime.fuse.dispatcher import MAX_WRITE, Dispatcher
else:
    from actorfs.runtime.fuse import protocol as P
    from actorfs.runtime.fuse.dispatcher import MAX_WRITE, Dispatcher

from actorfs.runtime.ops.filesystem import Filesystem, FsConfig  # noqa: E402

_REC = struct.Struct("<BH")
HANG_SECONDS = 30.0


def records(data: bytes):
    """(flags, frame) records of one fuzz input."""
    pos = 0
    while pos + _REC.size <= len(data):
        flags, n = _REC.unpack_from(data, pos)
        pos += _REC.size
        yield flags, data[pos : pos + n]
        pos += n


def encode(frames: list[tuple[int, bytes]]) -> bytes:
    """The inverse of records(): build an input (for seeds and regression files)."""
    return b"".join(_REC.pack(f, len(b)) + b for f, b in frames)


def make_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "d", "sub"), exist_ok=True)
    with open(os.path.join(root, "f"), "wb") as f:
        f.write(b"0123456789" * 50)
    with open(os.path.join(root, "d", "g"), "wb") as f:
        f.write(b"g")
    for name, target in (("s", "d"), ("up", "../outside"), ("abs", "/etc")):
        with contextlib.suppress(FileExistsError):
            os.symlink(target, os.path.join(root, name))
    with contextlib.suppress(FileExistsError):
        os.mkfifo(os.path.join(root, "fifo"))


class Harness:
    """One served tree and one FUSE session, fed fuzz inputs one at a time."""

    def __init__(self, root: str):
        self.root = root
        make_tree(root)
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = self.loop.create_future()
        self._server = self.loop.create_task(self._serve())
        self.loop.run_until_complete(self._ready)
        self.nodeids: list[int] = [1]
        self.unique = 0x10000
        self.inputs = 0

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        cfg = FsConfig(root=self.root, max_inodes=4096, max_handles=1024, pool_workers=4)
        async with Filesystem.running(cfg) as fs:
            self.fs = fs
            self.d = Dispatcher(fs, max_in_flight=32)
            self._ready.set_result(None)
            await self._stop.wait()
            await self.d.cancel_all()

    def close(self) -> None:
        assert self._stop is not None
        self._stop.set()
        self.loop.run_until_complete(self._server)
        self.loop.close()

    def run(self, data: bytes) -> None:
        self.inputs += 1
        self.loop.run_until_complete(asyncio.wait_for(self._one(data), HANG_SECONDS))

    async def _init(self) -> None:
        if self.d.init is None:
            init = P.Init(h=P.InHeader(unique=2), major=7, minor=38, max_readahead=1 << 17,
                          flags=(1 << 32) - 1)  # fmt: skip
            await self.d.submit(P.encode_request(init), lambda iov: None)

    async def _one(self, data: bytes) -> None:
        await self._init()
        self.nodeids = [1]  # per input, so that a saved input replays the same way
        owed: dict[int, tuple[int | None, int]] = {}
        got: dict[int, int] = {}

        def sender(unique: int):
            def send(iov) -> None:
                buf = P.iov_bytes(iov)
                length, error, u = struct.unpack_from("<IiQ", buf)
                if length != len(buf) or u != unique or not -512 < error <= 0:
                    raise AssertionError(f"bad reply header {(length, error, u)} for {unique}")
                got[unique] = got.get(unique, 0) + 1
                opcode = owed.get(unique, (0,))[0]
                if opcode in (P.FUSE_READ, P.FUSE_READDIR, P.FUSE_READDIRPLUS) and (
                    len(buf) - P.OUT_HEADER_SIZE > MAX_WRITE
                ):  # a kernel never asks more than max_pages pages
                    raise AssertionError(f"a {len(buf)}-byte reply to a READ")
                if error == 0 and len(buf) >= 24 and owed.get(unique, (0,))[0] in _ENTRY_OPS:
                    nodeid = struct.unpack_from("<Q", buf, 16)[0]
                    if nodeid and len(self.nodeids) < 512:
                        self.nodeids.append(nodeid)

            return send

        for flags, frame in records(data):
            frame = bytearray(frame)
            if len(frame) >= 24:
                if flags & 1:
                    struct.pack_into("<I", frame, 0, len(frame))
                if flags & 2:
                    struct.pack_into("<Q", frame, 16, self.nodeids[(flags >> 3) % len(self.nodeids)])
                elif flags & 4:
                    struct.pack_into("<Q", frame, 16, 1)
            unique = None
            if len(frame) >= 16:
                self.unique += 2
                unique = self.unique
                struct.pack_into("<Q", frame, 8, unique)
            opcode, want = _expected(bytes(frame))
            if unique is None:
                await self.d.submit(bytes(frame), _no_reply_expected)
                continue
            owed[unique] = (opcode, want)
            await self.d.submit(bytes(frame), sender(unique))
            if opcode == P.FUSE_DESTROY:
                await self.d.drain()
                self.nodeids = [1]
                await self._init()
        await self.d.drain()
        for unique, (opcode, want) in owed.items():
            if got.get(unique, 0) != want:
                raise AssertionError(
                    f"{P.OPCODE_NAMES.get(opcode, opcode)} unique {unique}: "
                    f"{got.get(unique, 0)} replies, {want} owed"
                )


_ENTRY_OPS = {P.FUSE_LOOKUP, P.FUSE_MKDIR, P.FUSE_MKNOD, P.FUSE_SYMLINK, P.FUSE_LINK,
              P.FUSE_CREATE}  # fmt: skip


def _no_reply_expected(iov) -> None:
    raise AssertionError(f"a reply to a frame without a unique: {P.iov_bytes(iov)[:16]!r}")


def _expected(frame: bytes) -> tuple[int | None, int]:
    try:
        msg = P.decode(frame)
    except P.ProtocolError as e:
        return e.opcode, 0 if e.no_reply else 1
    return msg.opcode, 0 if msg.opcode in P.NO_REPLY_OPCODES else 1


def seeds() -> list[bytes]:
    """A few sessions that reach deep: lookups, opens, reads, writes, readdirplus, renames."""
    h = P.InHeader
    msgs = [
        P.Lookup(h=h(nodeid=1), name=b"f"),
        P.Lookup(h=h(nodeid=1), name=b"d"),
        P.Open(h=h(nodeid=2), flags=os.O_RDWR),
        P.Read(h=h(nodeid=2), fh=1, offset=0, size=4096),
        P.Write(h=h(nodeid=2), fh=1, offset=7, size=3, data=memoryview(b"abc")),
        P.Opendir(h=h(nodeid=1)),
        P.Readdirplus(h=h(nodeid=1), fh=2, offset=0, size=4096),
        P.Mkdir(h=h(nodeid=1), mode=0o755, name=b"new"),
        P.Rename(h=h(nodeid=1), newdir=1, name=b"new", newname=b"old"),
        P.Symlink(h=h(nodeid=1), name=b"l", target=b"../x"),
        P.Lookup(h=h(nodeid=1), name=b"up"),
        P.Setxattr(h=h(nodeid=2), size=1, name=b"user.a", value=memoryview(b"1")),
        P.Getxattr(h=h(nodeid=2), size=64, name=b"user.a"),
        P.Forget(h=h(nodeid=2), nlookup=5),
        P.BatchForget(count=1, forgets=[(3, 1)]),
        P.Interrupt(h=h(), unique=0x10002),
    ]
    one = encode([(1, P.encode_request(m)) for m in msgs])
    return [one, encode([(0, P.encode_request(m)) for m in msgs[:4]]), b"\x01\x28\x00" + bytes(40)]


def main() -> None:
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris")
    from tests.support.hostile_client import scratch_tmpfs

    base = tempfile.mkdtemp(prefix="actorfs-fuzz-")
    with scratch_tmpfs(base) as small:
        if not small:
            print("warning: not root, the fuzz tree is not on a small tmpfs", file=sys.stderr)
        root = os.path.join(base, "root")
        os.makedirs(root, exist_ok=True)
        harness = Harness(root)
        corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
        for d in corpus:
            os.makedirs(d, exist_ok=True)
            if not os.listdir(d):
                for i, s in enumerate(seeds()):
                    with open(os.path.join(d, f"seed-{i}"), "wb") as f:
                        f.write(s)
        atheris.Setup(sys.argv, lambda data: harness.run(bytes(data)))
        try:
            atheris.Fuzz()
        finally:
            harness.close()


if __name__ == "__main__":
    main()
