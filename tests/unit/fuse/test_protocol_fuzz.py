"""Hostile bytes never crash the decoder: a message or ProtocolError, nothing else."""

from __future__ import annotations

import errno
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actorfs.runtime.fuse import protocol as P

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OPCODES = sorted(P.REQUESTS)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
name = st.binary(min_size=0, max_size=300).filter(lambda b: b"\0" not in b)


def _decode_or_error(frame, **kw):
    try:
        msg = P.decode(frame, **kw)
    except P.ProtocolError as e:
        assert e.errno in (errno.EINVAL, errno.ENOSYS, errno.EIO)
        if e.unique is None:
            assert e.errno == errno.EIO
        return e
    assert isinstance(msg, P.Request)
    assert msg.h.len == len(frame)
    return msg


@st.composite
def valid_messages(draw, opcodes=None, small=None, names=None):
    """A well-formed request. `small`: a strategy mixed into every integer field
    (to hit live nodeids and fhs); `names`: the strategy for names."""
    opcode = draw(st.sampled_from(opcodes or OPCODES))
    _, layout, tail = P.REQUESTS[opcode]
    names = name if names is None else names

    def mixed(strategy):
        return st.one_of(small, strategy) if small is not None else strategy

    def num(strategy):
        return draw(mixed(strategy))

    h = P.InHeader(unique=draw(u64), nodeid=num(u64), uid=draw(u32), gid=draw(u32), pid=draw(u32))
    kw = {}
    if layout is not None:
        lay = P.LAYOUT[layout]
        for f, code in zip(lay.fields, _codes(lay), strict=True):
            kw[f] = num(_ints(code))
    if opcode == P.FUSE_SETXATTR:
        kw["setxattr_flags"] = 0
    if tail == "name":
        kw["name"] = draw(names)
    elif tail.startswith("names:"):
        kw["name"] = draw(names)
        kw[tail.split(":")[1]] = draw(names)
    elif tail == "xattr":
        value = draw(st.binary(max_size=200))
        kw.update(name=draw(names), size=len(value), value=memoryview(value))
    elif tail.startswith("data:"):
        data = draw(st.binary(max_size=300))
        kw[tail.split(":")[1]] = len(data)
        kw["data"] = memoryview(data)
    elif tail == "forgets":
        items = draw(st.lists(st.tuples(mixed(u64), mixed(u64)), max_size=10))
        kw.update(count=len(items), forgets=items)
    elif tail == "mappings":
        items = draw(st.lists(st.tuples(u64, u64), max_size=10))
        kw.update(count=len(items), mappings=items)
    if opcode == P.FUSE_INIT:
        kw["minor"] = max(kw["minor"], 36)  # a shorter INIT drops flags2 by design
    return P.MESSAGES[opcode](h=h, **kw)


def _codes(lay):
    return [c for c in lay.fmt if c.isalpha() and c != "x"]


def _ints(code):
    bits = struct.calcsize(code) * 8
    if code.islower() and code not in "x":
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


def _plain(msg):
    out = {}
    for f in msg.__dataclass_fields__:
        v = getattr(msg, f)
        if isinstance(v, memoryview):
            v = bytes(v)
        out[f] = v
    h = msg.h
    out["h"] = (h.unique, h.nodeid, h.uid, h.gid, h.pid)
    return out


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data):
    _decode_or_error(data)


@FUZZ
@given(
    st.sampled_from(OPCODES + [0, 7, 99, 4096]), st.binary(max_size=300), u64, st.integers(0, 40)
)
def test_random_bodies_with_a_consistent_header(opcode, body, unique, extlen):
    frame = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, 1, 0, 0, 0, extlen, 0) + body
    r = _decode_or_error(frame)
    if isinstance(r, P.ProtocolError):
        assert r.unique == unique
    r = _decode_or_error(frame, setxattr_ext=True)


@FUZZ
@given(valid_messages(), st.integers(0, 3))
def test_round_trip(msg, extlen):
    got = P.decode(P.encode_request(msg, extlen=extlen))
    assert type(got) is type(msg)
    assert _plain(got) == _plain(msg)


@FUZZ
@given(valid_messages(), st.data())
def test_mutated_valid_frames(msg, data):
    frame = bytearray(P.encode_request(msg))
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "len", "splice"]))
        if kind == "flip" and frame:
            i = data.draw(st.integers(0, len(frame) - 1))
            frame[i] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del frame[data.draw(st.integers(0, len(frame))) :]
        elif kind == "extend":
            frame += data.draw(st.binary(max_size=64))
        elif kind == "len" and len(frame) >= 4:
            struct.pack_into("<I", frame, 0, data.draw(u32))
        elif kind == "splice" and len(frame) >= 40:
            # keep the header consistent so the body parser is what gets exercised
            struct.pack_into("<I", frame, 0, len(frame))
    _decode_or_error(bytes(frame))
    _decode_or_error(memoryview(frame))
