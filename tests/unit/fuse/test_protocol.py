"""The FUSE wire format with plain bytes: layouts against <linux/fuse.h>, every
opcode's decode, every reply's encoding, and malformed frames."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field

import pytest

from actorfs.runtime.core.attrs import Attr, DirEntry, DirEntryPlus, Entry, Opened, StatFs
from actorfs.runtime.fuse import protocol as P

FUSE_H = "/usr/include/linux/fuse.h"

# Fields newer than the installed 7.38 header, checked by hand against 7.40.
NEWER_THAN_HEADER = {
    ("fuse_init_out", "max_stack_depth"): 36,
    ("fuse_init_out", "request_timeout"): 40,
    ("fuse_open_out", "backing_id"): 12,
}
NOT_IN_HEADER = {"fuse_setxattr_in_compat", "fuse_statx_in", "fuse_backing_map"}


def _c_members(name: str) -> list[tuple[str, str]]:
    """(our field name, C member path) for a layout, from the LAYOUTS spec."""
    out = []
    for item in P.LAYOUTS[name].split(","):
        type_, fname = item.split()
        base = type_.partition("*")[0]
        if base.startswith("pad"):
            continue
        if base in P.LAYOUTS:
            out += [(f"{fname}_{f}", f"{fname}.{m}") for f, m in _c_members(base)]
        else:
            out.append((fname, fname))
    return out


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """sizeof and offsetof of every struct we share with the installed fuse.h."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists(FUSE_H):
        pytest.skip("needs a C compiler and linux/fuse.h")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/fuse.h>",
        "int main(void){",
    ]
    for name in P.LAYOUTS:
        if name in NOT_IN_HEADER:
            continue
        lines.append(f'printf("{name} SIZEOF %zu\\n", sizeof(struct {name}));')
        for fname, member in _c_members(name):
            if (name, fname) in NEWER_THAN_HEADER:
                continue
            lines.append(f'printf("{name} {fname} %zu\\n", offsetof(struct {name}, {member}));')
    lines.append("return 0;}")
    d = tmp_path_factory.mktemp("cfuse")
    (d / "l.c").write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(d / "l"), str(d / "l.c")], check=True)
    out = subprocess.run([str(d / "l")], check=True, capture_output=True, text=True).stdout
    table: dict[tuple[str, str], int] = {}
    for line in out.splitlines():
        s, f, v = line.split()
        table[(s, f)] = int(v)
    return table


def test_layouts_match_installed_fuse_h(c_layout):
    checked = 0
    for name, lay in P.LAYOUT.items():
        if name in NOT_IN_HEADER:
            continue
        assert lay.size == c_layout[(name, "SIZEOF")], name
        for fname, off in zip(lay.fields, lay.offsets, strict=True):
            want = NEWER_THAN_HEADER.get((name, fname), c_layout.get((name, fname)))
            assert off == want, (name, fname)
            checked += 1
    assert checked > 200


def test_layouts_newer_than_header():
    assert P.LAYOUT["fuse_backing_map"].size == 16
    assert P.LAYOUT["fuse_backing_map"].offsets == (0, 4)
    assert P.LAYOUT["fuse_statx_in"].size == 24
    assert P.LAYOUT["fuse_init_out"].size == 64
    # _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t)
    assert P.FUSE_DEV_IOC_BACKING_OPEN == 0x4010E501
    assert P.FUSE_DEV_IOC_BACKING_CLOSE == 0x4004E502
    assert P.FUSE_PASSTHROUGH >> 32 == 1 << 5
    assert P.backing_map(7) == struct.pack("<iIQ", 7, 0, 0)


# -- decode: every opcode --------------------------------------------------------------


def _sample(opcode: int) -> P.Request:
    """A message with a distinct value in every field."""
    cls = P.MESSAGES[opcode]
    name, layout, tail = P.REQUESTS[opcode]
    h = P.InHeader(unique=1000 + opcode * 2, nodeid=77, uid=1001, gid=1002, pid=4242)
    kw: dict = {}
    if layout is not None:
        for i, f in enumerate(P.LAYOUT[layout].fields):
            kw[f] = 3 + i
    if opcode == P.FUSE_INIT:
        kw.update(major=7, minor=38)
    if tail == "name":
        kw["name"] = b"entry-name"
    elif tail.startswith("names:"):
        kw["name"] = b"old"
        kw[tail.split(":")[1]] = b"second-name"
    elif tail == "xattr":
        kw.update(name=b"user.k", value=memoryview(b"v" * kw["size"]))
    elif tail.startswith("data:"):
        key = tail.split(":")[1]
        kw["data"] = memoryview(bytes(range(kw[key])))
    elif tail == "forgets":
        kw.update(count=2, forgets=[(5, 1), (6, 9)])
    elif tail == "mappings":
        kw.update(count=3, mappings=[(0, 4096), (8192, 4096), (1 << 21, 1 << 21)])
    if opcode == P.FUSE_SETXATTR:
        kw["setxattr_flags"] = 0  # not on the wire without FUSE_SETXATTR_EXT
    return cls(h=h, **kw)


def _comparable(msg: P.Request) -> dict:
    out = {}
    for f in msg.__dataclass_fields__:
        v = getattr(msg, f)
        out[f] = bytes(v) if isinstance(v, memoryview) else v
    out["h"] = (msg.h.opcode, msg.h.unique, msg.h.nodeid, msg.h.uid, msg.h.gid, msg.h.pid)
    return out


@pytest.mark.parametrize("opcode", sorted(P.REQUESTS), ids=lambda o: P.OPCODE_NAMES[o])
def test_decode_every_opcode(opcode):
    msg = _sample(opcode)
    frame = P.encode_request(msg)
    got = P.decode(frame)
    assert type(got) is P.MESSAGES[opcode]
    assert got.opcode == opcode
    assert got.h.len == len(frame)
    msg.h.opcode, msg.h.len = opcode, len(frame)
    assert _comparable(got) == _comparable(msg)


def test_every_opcode_has_a_written_out_message_class():
    """Each opcode the decoder knows has its class written out in protocol.py (a
    module attribute a type checker sees, not one made at import), with the
    fields decode fills in wire order."""
    assert set(P.MESSAGES) == set(P.REQUESTS) == set(P._DECODERS)
    for opcode, (name, _, _) in P.REQUESTS.items():
        cls = P.MESSAGES[opcode]
        assert getattr(P, name) is cls and cls.__name__ == name
        assert cls.__module__ == P.__name__ and cls.opcode == opcode
        assert issubclass(cls, P.Request) and hasattr(cls, "__slots__")
        assert f"class {name}(Request):" in _PROTOCOL_SOURCE
    assert P.message_mismatches() == []


_PROTOCOL_SOURCE = open(P.__file__).read()


def test_message_check_notices_a_drifted_class(monkeypatch):
    """A class whose fields no longer follow its layout is caught (at import)."""

    @dataclass(slots=True)
    class Read(P.Request):  # fuse_read_in with two fields swapped
        opcode = P.FUSE_READ
        h: P.InHeader = field(default_factory=P.InHeader)
        offset: int = 0
        fh: int = 0

    monkeypatch.setitem(P.MESSAGES, P.FUSE_READ, Read)
    assert [m.split(":")[0] for m in P.message_mismatches()] == ["FUSE_READ"]
    monkeypatch.delitem(P.MESSAGES, P.FUSE_LOOKUP)
    assert any("without a class" in m for m in P.message_mismatches())


def _frame(opcode: int, body: bytes, unique: int = 9, nodeid: int = 1, extlen: int = 0) -> bytes:
    return (
        struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 1, 2, 3, extlen, 0) + body
    )


def test_decode_handmade_lookup_and_header_fields():
    m = P.decode(_frame(P.FUSE_LOOKUP, b"hello\0", unique=0xDEADBEEF, nodeid=5))
    assert isinstance(m, P.Lookup)
    assert (m.h.unique, m.h.nodeid, m.h.uid, m.h.gid, m.h.pid) == (0xDEADBEEF, 5, 1, 2, 3)
    assert m.name == b"hello"


def test_decode_write_payload_is_a_view_not_a_copy():
    body = struct.pack("<QQIIQII", 3, 4096, 5, 0, 0, 0, 0) + b"abcde"
    frame = bytearray(_frame(P.FUSE_WRITE, body))
    m = P.decode(frame)
    assert (m.fh, m.offset, m.size) == (3, 4096, 5)
    assert isinstance(m.data, memoryview) and bytes(m.data) == b"abcde"
    frame[-1] = ord("Z")  # the view sees the frame's bytes
    assert bytes(m.data) == b"abcdZ"


def test_decode_symlink_and_rename_names():
    m = P.decode(_frame(P.FUSE_SYMLINK, b"link\0../target\0"))
    assert (m.name, m.target) == (b"link", b"../target")
    m = P.decode(_frame(P.FUSE_RENAME2, struct.pack("<QII", 8, 1, 0) + b"a\0b\0"))
    assert (m.newdir, m.flags, m.name, m.newname) == (8, 1, b"a", b"b")


def test_decode_init_from_old_kernel_without_flags2():
    # 7.31..7.35 kernels send only major, minor, max_readahead, flags.
    m = P.decode(_frame(P.FUSE_INIT, struct.pack("<IIII", 7, 31, 65536, P.FUSE_ASYNC_READ)))
    assert (m.major, m.minor, m.max_readahead, m.flags, m.flags2) == (7, 31, 65536, 1, 0)


def test_decode_setxattr_compat_and_ext():
    compat = _frame(P.FUSE_SETXATTR, struct.pack("<II", 3, 1) + b"user.a\0xyz")
    m = P.decode(compat)
    assert (m.size, m.flags, m.setxattr_flags, m.name, bytes(m.value)) == (
        3,
        1,
        0,
        b"user.a",
        b"xyz",
    )
    ext = _frame(P.FUSE_SETXATTR, struct.pack("<IIII", 3, 2, 1, 0) + b"user.a\0xyz")
    m = P.decode(ext, setxattr_ext=True)
    assert (m.size, m.flags, m.setxattr_flags, bytes(m.value)) == (3, 2, 1, b"xyz")


def test_decode_skips_extensions():
    # A security-context extension trailing LOOKUP's name (total_extlen in 8-byte units).
    m = P.decode(_frame(P.FUSE_LOOKUP, b"n\0" + bytes(6) + bytes(16), extlen=2))
    assert m.name == b"n"


def test_decode_batch_forget_and_removemapping():
    body = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 10, 1, 11, 2)
    assert P.decode(_frame(P.FUSE_BATCH_FORGET, body)).forgets == [(10, 1), (11, 2)]
    body = struct.pack("<I", 1) + struct.pack("<QQ", 4096, 8192)
    assert P.decode(_frame(P.FUSE_REMOVEMAPPING, body)).mappings == [(4096, 8192)]


# -- decode: malformed frames --------------------------------------------------------------


def _err(frame, **kw) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frame, **kw)
    return info.value


def test_short_header_without_unique_is_eio_and_unreplyable():
    e = _err(b"\x01\x02\x03")
    assert e.errno == errno.EIO and e.unique is None and e.no_reply


def test_short_header_with_unique_is_einval():
    e = _err(struct.pack("<IIQ", 24, P.FUSE_GETATTR, 55) + bytes(8))
    assert e.errno == errno.EINVAL and e.unique == 55 and not e.no_reply


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_length_field_disagreeing_with_buffer(delta):
    frame = bytearray(_frame(P.FUSE_LOOKUP, b"abc\0", unique=7))
    struct.pack_into("<I", frame, 0, len(frame) + delta)
    e = _err(bytes(frame))
    assert (e.errno, e.unique) == (errno.EINVAL, 7)


@pytest.mark.parametrize("opcode", [0, 7, 19, 53, 4096, 26 << 24, 0xFFFFFFFF])
def test_unknown_opcode_is_enosys(opcode):
    e = _err(_frame(opcode, b"", unique=3))
    assert (e.errno, e.unique, e.opcode) == (errno.ENOSYS, 3, opcode)


@pytest.mark.parametrize(
    "opcode,body",
    [
        (P.FUSE_LOOKUP, b"no-nul"),
        (P.FUSE_LOOKUP, b""),
        (P.FUSE_SYMLINK, b"only-one\0"),
        (P.FUSE_RENAME, struct.pack("<Q", 1) + b"a\0b"),
        (P.FUSE_GETATTR, bytes(15)),  # struct cut short
        (P.FUSE_WRITE, struct.pack("<QQIIQII", 0, 0, 100, 0, 0, 0, 0) + b"x" * 99),
        (P.FUSE_SETXATTR, struct.pack("<II", 10, 0) + b"user.a\0short"),
        (P.FUSE_BATCH_FORGET, struct.pack("<II", 3, 0) + bytes(32)),
        (P.FUSE_REMOVEMAPPING, struct.pack("<I", 0xFFFFFFFF)),
        (P.FUSE_IOCTL, struct.pack("<QIIQII", 0, 0, 0, 0, 64, 0)),
        (P.FUSE_INIT, struct.pack("<III", 7, 38, 0)),
    ],
)
def test_malformed_bodies_are_einval(opcode, body):
    e = _err(_frame(opcode, body, unique=21))
    assert (e.errno, e.unique) == (errno.EINVAL, 21)


def test_extension_length_past_the_frame():
    e = _err(_frame(P.FUSE_GETATTR, bytes(16), unique=4, extlen=3))
    assert (e.errno, e.unique) == (errno.EINVAL, 4)


def test_malformed_no_reply_opcodes_say_so():
    assert _err(_frame(P.FUSE_FORGET, b"", unique=2)).no_reply
    assert _err(_frame(P.FUSE_INTERRUPT, b"", unique=2)).no_reply
    assert not _err(_frame(P.FUSE_GETATTR, b"", unique=2)).no_reply


def test_decode_rejects_non_byte_buffers():
    e = _err(memoryview(struct.pack("<10I", *range(10))).cast("I"))
    assert isinstance(e, P.ProtocolError)  # cast back to bytes: decodes or refuses, no crash
    with pytest.raises(P.ProtocolError):
        P.decode(12345)  # type: ignore[arg-type]


# -- replies -------------------------------------------------------------------------------

ATTR = Attr(
    ino=11, size=12, blocks=13, atime=-14, mtime=15, ctime=16, atimensec=17, mtimensec=18,
    ctimensec=19, mode=0o100644, nlink=2, uid=1000, gid=1001, rdev=0x1234, blksize=4096, flags=0,
)  # fmt: skip
ATTR_FMT = "<QQQqqqIIIIIIIIII"


def _join(iov) -> bytes:
    return P.iov_bytes(iov)


def _out(buf: bytes) -> tuple[int, int, int]:
    return struct.unpack_from("<IiQ", buf)


def test_reply_error_and_empty():
    assert _join(P.reply_error(5, errno.ENOENT)) == struct.pack("<IiQ", 16, -errno.ENOENT, 5)
    assert _out(_join(P.reply_error(5, 0)))[1] == -errno.EIO  # never a success by mistake
    assert _out(_join(P.reply_error(5, 100000)))[1] == -errno.EIO  # the kernel refuses <= -512
    assert _join(P.reply_empty(6)) == struct.pack("<IiQ", 16, 0, 6)


def test_reply_entry_layout():
    e = Entry(nodeid=42, generation=3, attr=ATTR, entry_valid=1.5, attr_valid=0.25)
    buf = _join(P.reply_entry(8, e))
    assert _out(buf) == (16 + 128, 0, 8)
    assert struct.unpack_from("<QQQQII", buf, 16) == (42, 3, 1, 0, 500_000_000, 250_000_000)
    assert struct.unpack_from(ATTR_FMT, buf, 16 + 40) == (
        11, 12, 13, -14, 15, 16, 17, 18, 19, 0o100644, 2, 1000, 1001, 0x1234, 4096, 0,
    )  # fmt: skip


def test_reply_attr_layout():
    buf = _join(P.reply_attr(9, ATTR, 2.0))
    assert _out(buf) == (16 + 104, 0, 9)
    assert struct.unpack_from("<QII", buf, 16) == (2, 0, 0)
    assert struct.unpack_from(ATTR_FMT, buf, 32)[0] == 11


def test_reply_open_create_write():
    buf = _join(P.reply_open(1, Opened(fh=99, open_flags=P.FOPEN_KEEP_CACHE, backing_id=5)))
    assert buf == struct.pack("<IiQQIi", 32, 0, 1, 99, P.FOPEN_KEEP_CACHE, 5)
    e = Entry(7, 0, ATTR, 0.0, 0.0)
    buf = _join(P.reply_create(2, e, Opened(fh=3)))
    assert _out(buf) == (16 + 128 + 16, 0, 2)
    assert struct.unpack_from("<Q", buf, 16)[0] == 7
    assert struct.unpack_from("<QIi", buf, 16 + 128) == (3, 0, 0)
    assert _join(P.reply_write(4, 4096)) == struct.pack("<IiQII", 24, 0, 4, 4096, 0)


def test_reply_statfs_layout():
    st = StatFs(blocks=1, bfree=2, bavail=3, files=4, ffree=5, bsize=6, namelen=255, frsize=8)
    buf = _join(P.reply_statfs(3, st))
    assert _out(buf) == (16 + 80, 0, 3)
    assert struct.unpack_from("<QQQQQIII", buf, 16) == (1, 2, 3, 4, 5, 6, 255, 8)
    assert buf[16 + 56 :] == bytes(24)  # padding and spare stay zero


def test_reply_data_passes_the_buffer_through():
    data = memoryview(bytearray(b"x" * 5000))
    iov = P.reply_data(10, data)
    assert iov[1] is data
    assert _out(iov[0]) == (16 + 5000, 0, 10)
    assert P.reply_data(10, b"") == P.reply_empty(10)


def test_reply_xattr_size_and_lseek():
    assert _join(P.reply_xattr_size(1, 77)) == struct.pack("<IiQII", 24, 0, 1, 77, 0)
    assert _join(P.reply_lseek(1, 1 << 40)) == struct.pack("<IiQQ", 24, 0, 1, 1 << 40)


def test_reply_readdir_records_are_aligned():
    entries = [
        DirEntry(ino=5, off=1, type=8, name=b"a"),
        DirEntry(ino=6, off=2, type=4, name=b"abcdefghi"),
    ]
    buf = _join(P.reply_readdir(12, entries))
    assert _out(buf)[0] == len(buf) == 16 + 32 + 40
    assert struct.unpack_from("<QQII", buf, 16) == (5, 1, 1, 8)
    assert buf[16 + 24 : 16 + 25] == b"a" and buf[16 + 25 : 16 + 32] == bytes(7)
    assert struct.unpack_from("<QQII", buf, 48) == (6, 2, 9, 4)
    assert buf[48 + 24 : 48 + 33] == b"abcdefghi"
    assert P.dirent_size(1) == 32 and P.dirent_size(9) == 40 and P.dirent_size(8) == 32


def test_reply_readdirplus_records():
    e = Entry(nodeid=50, generation=1, attr=ATTR, entry_valid=1.0, attr_valid=1.0)
    entries = [
        DirEntryPlus(e, DirEntry(ino=11, off=1, type=8, name=b"file")),
        DirEntryPlus(Entry(0, 0, ATTR, 0.0, 0.0), DirEntry(ino=1, off=2, type=4, name=b"..")),
    ]
    buf = _join(P.reply_readdirplus(13, entries))
    assert len(buf) == 16 + P.direntplus_size(4) + P.direntplus_size(2) == 16 + 160 + 160
    assert struct.unpack_from("<Q", buf, 16)[0] == 50
    assert struct.unpack_from("<QQII", buf, 16 + 128) == (11, 1, 4, 8)
    assert buf[16 + 152 : 16 + 156] == b"file"
    assert struct.unpack_from("<Q", buf, 16 + 160)[0] == 0
    assert buf[16 + 160 + 152 : 16 + 160 + 154] == b".."


def test_reply_init_layout_with_flags2_and_stack_depth():
    buf = _join(
        P.reply_init(
            3, major=7, minor=40, max_readahead=131072, flags=P.FUSE_INIT_EXT | 1,
            max_background=64, congestion_threshold=48, max_write=1 << 20, time_gran=1,
            max_pages=256, map_alignment=12, flags2=P.FUSE_PASSTHROUGH >> 32, max_stack_depth=1,
        )
    )  # fmt: skip
    assert _out(buf) == (16 + 64, 0, 3)
    got = struct.unpack_from("<IIIIHHIIHHII", buf, 16)
    assert got == (7, 40, 131072, P.FUSE_INIT_EXT | 1, 64, 48, 1 << 20, 1, 256, 12, 32, 1)
    assert buf[16 + 40 :] == bytes(24)
    with pytest.raises(TypeError):
        P.reply_init(1, not_a_field=1)


def test_split_timeout():
    assert P.split_timeout(1.5) == (1, 500_000_000)
    assert P.split_timeout(0) == (0, 0)
    assert P.split_timeout(-3) == (0, 0)
    assert P.split_timeout(float("nan")) == (0, 0)
    assert P.split_timeout(86400.0) == (86400, 0)
    sec, nsec = P.split_timeout(0.999999999999)
    assert sec == 0 and nsec < 1_000_000_000


# -- notifications -------------------------------------------------------------------------


def test_notify_inval_inode():
    buf = _join(P.notify_inval_inode(5, -1, 0))
    assert buf == struct.pack("<IiQQqq", 40, P.FUSE_NOTIFY_INVAL_INODE, 0, 5, -1, 0)


def test_notify_inval_entry_and_delete():
    buf = _join(P.notify_inval_entry(1, b"name"))
    assert (
        buf
        == struct.pack("<IiQQII", 16 + 16 + 5, P.FUSE_NOTIFY_INVAL_ENTRY, 0, 1, 4, 0) + b"name\0"
    )
    buf = _join(P.notify_delete(1, 9, b"gone"))
    assert (
        buf == struct.pack("<IiQQQII", 16 + 24 + 5, P.FUSE_NOTIFY_DELETE, 0, 1, 9, 4, 0) + b"gone\0"
    )


def test_notify_store_and_retrieve():
    buf = _join(P.notify_store(4, 100, b"abc"))
    assert (
        buf == struct.pack("<IiQQQII", 16 + 24 + 3, P.FUSE_NOTIFY_STORE, 0, 4, 100, 3, 0) + b"abc"
    )
    buf = _join(P.notify_retrieve(77, 4, 0, 4096))
    assert buf == struct.pack("<IiQQQQII", 16 + 32, P.FUSE_NOTIFY_RETRIEVE, 0, 77, 4, 0, 4096, 0)
