"""Protocol fuzzing of `nbdbackup serve` with hypothesis: thousands of messages,
well-formed and not. The server must answer in well-formed frames, never
hang, never die, and hold no more file descriptors afterwards than before."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.repo import repo_with_vm1
from helpers.serve import RawClient, serve, wait_until
from nbdbackup.nbd import proto

SIZE = 1024 * 1024 + 512
COUNT = {"messages": 0, "examples": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-fuzz")
    data, info = repo_with_vm1(d, SIZE, 33)
    with serve(d / "repo", d, "--writable") as s:
        s.backup_id = info.id
        s.data = data
        with RawClient(s) as c:
            c.greet()
            c.go("vm1")
            c.read(0, 4096)
        time.sleep(0.5)
        s.baseline_fds = s.fd_count(index=False)
        yield s
        assert s.alive()
        log = s.log()
        for bad in ("Traceback", "internal error", "socket.send() raised", "Task exception was never retrieved"):
            assert bad not in log, f"server log has {bad!r}:\n{log[-3000:]}"


def _name_blob(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name


names = st.sampled_from([b"vm1", b"", b"nope", b"../vm1", b"\xff"]) | st.binary(max_size=20)
info_reqs = st.lists(st.integers(0, 5) | st.integers(0, 0xFFFF), max_size=4)
queries = st.lists(st.sampled_from([b"base:allocation", b"base:", b"qemu:dirty-bitmap:x", b""])
                 | st.binary(max_size=10),
                   max_size=3)


@st.composite
def option(draw):
    opt = draw(st.sampled_from(list(proto.OPTION_NAMES)) | st.integers(0, 0xFFFFFFFF))
    kind = draw(st.sampled_from(["wellformed", "random", "empty"]))
    if kind == "empty":
        data = b""
    elif kind == "random":
        data = draw(st.binary(max_size=200))
    elif opt in (proto.OPT_INFO, proto.OPT_GO):
        reqs = draw(info_reqs)
        data = _name_blob(draw(names)) + struct.pack(f">H{len(reqs)}H", len(reqs), *reqs)
    elif opt in (proto.OPT_LIST_META_CONTEXT, proto.OPT_SET_META_CONTEXT):
        qs = draw(queries)
        data = _name_blob(draw(names)) + struct.pack(">I", len(qs)) + b"".join(_name_blob(q) for q in qs)
    elif opt == proto.OPT_EXPORT_NAME:
        data = draw(names)
    else:
        data = b""
    length = len(data)
    if draw(st.integers(0, 20)) == 0:
        length = draw(st.integers(0, 0xFFFFFFFF))        # lie about the length
    magic = proto.IHAVEOPT if draw(st.integers(0, 30)) else draw(st.integers(0, 2 ** 64 - 1))
    return proto.OPTION_REQUEST.pack(magic, opt, length) + data


@st.composite
def request(draw):
    if draw(st.integers(0, 40)) == 0:
        return None, draw(st.binary(min_size=1, max_size=40))          # garbage
    typ = draw(st.sampled_from(list(proto.COMMAND_NAMES)) | st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8, 16, 32]) | st.integers(0, 0xFFFF))
    off = draw(st.integers(0, SIZE) | st.integers(0, 2 ** 64 - 1) | st.sampled_from([SIZE - 1, SIZE, 0]))
    length = draw(st.integers(0, 70000) | st.integers(0, 0xFFFFFFFF) | st.sampled_from([0, 1, 512, 4096]))
    payload = b""
    if typ == proto.CMD_WRITE:
        if length <= 70000:
            payload = b"\xab" * length if draw(st.booleans()) else b"\xab" * draw(st.integers(0, length))
    return (typ, flags, off, length), payload


class Reader:
    """Check that whatever the server sends is well-framed NBD replies."""

    def __init__(self, sock):
        self.s = sock
        self.buf = b""

    def need(self, n) -> bytes | None:
        while len(self.buf) < n:
            d = self.s.recv(1 << 20)
            if not d:
                return None
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def replies(self, pending: dict, structured: bool) -> None:
        """Read replies until EOF; each must match an outstanding request."""
        while True:
            m = self.need(4)
            if m is None:
                return
            (magic,) = struct.unpack(">I", m)
            if magic == proto.SIMPLE_REPLY_MAGIC:
                err, ck = struct.unpack(">IQ", self.need(12))
                assert ck in pending, f"reply for unknown cookie {ck}"
                typ, off, length = pending.pop(ck)
                if typ == proto.CMD_READ and err == 0:
                    assert self.need(length) is not None
            elif magic == proto.STRUCTURED_REPLY_MAGIC:
                assert structured, "structured reply without negotiation"
                flags, rtype, ck, ln = struct.unpack(">HHQI", self.need(16))
                assert ck in pending, f"reply for unknown cookie {ck}"
                body = self.need(ln) if ln else b""
                assert body is not None
                typ, off, length = pending[ck]
                if rtype == proto.REPLY_TYPE_OFFSET_DATA:
                    (o,) = struct.unpack_from(">Q", body)
                    assert off <= o and o + ln - 8 <= off + length
                elif rtype == proto.REPLY_TYPE_OFFSET_HOLE:
                    o, n = struct.unpack(">QI", body)
                    assert off <= o and o + n <= off + length
                elif rtype == proto.REPLY_TYPE_BLOCK_STATUS:
                    assert (ln - 4) % 8 == 0 and ln >= 12
                else:
                    assert rtype in (proto.REPLY_TYPE_NONE, proto.REPLY_TYPE_ERROR,
                                     proto.REPLY_TYPE_ERROR_OFFSET), rtype
                if flags & proto.REPLY_FLAG_DONE:
                    pending.pop(ck)
            else:
                raise AssertionError(f"bad reply magic {magic:#x}")


def _healthy(s) -> None:
    with RawClient(s) as c:
        c.greet()
        c.go("vm1")
        assert len(c.read(SIZE - 4096, 4096)) == 4096


FUZZ = settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def test_fuzz_handshake(served):
    s = served

    @FUZZ
    @given(cflags=st.sampled_from([3, 3, 3, 1, 0]) | st.integers(0, 0xFFFFFFFF), opts=st.lists(option(), max_size=12))
    def run(cflags, opts):
        with RawClient(s) as c:
            c.s.settimeout(20)
            hello = c.recv(18)
            assert proto.HANDSHAKE.unpack(hello)[:2] == (proto.NBDMAGIC, proto.IHAVEOPT)
            try:
                c.s.sendall(struct.pack(">I", cflags) + b"".join(opts))
                c.s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass                       # the server already hung up on us: fine
            rd = Reader(c.s)
            try:
                while True:        # option replies, until EOF or the transmission phase
                    head = rd.need(20)
                    if head is None:
                        break
                    magic, _, _, ln = proto.OPTION_REPLY.unpack(head)
                    if magic != proto.OPTION_REPLY_MAGIC:
                        break      # e.g. an EXPORT_NAME reply: transmission started
                    assert rd.need(ln) is not None
            except ConnectionResetError:
                pass
        COUNT["messages"] += len(opts) + 1
        COUNT["examples"] += 1
        _healthy(s)

    run()


def test_fuzz_transmission(served):
    s = served

    @FUZZ
    @given(structured=st.booleans(), meta=st.booleans(), by_id=st.booleans(),
           reqs=st.lists(request(), min_size=1, max_size=25))
    def run(structured, meta, by_id, reqs):
        with RawClient(s) as c:
            c.s.settimeout(20)
            c.greet()
            c.go(s.backup_id if by_id else "vm1", structured=structured, meta=meta and structured)
            pending = {}
            out = []
            for k, (hdr, payload) in enumerate(reqs):
                if hdr is None:
                    out.append(payload)
                    break          # garbage where a header belongs: the server hangs up
                typ, flags, off, length = hdr
                ck = 1000 + k
                if typ != proto.CMD_DISC:
                    pending[ck] = (typ, off, length)
                out.append(proto.REQUEST.pack(proto.REQUEST_MAGIC, flags, typ, ck, off, length) + payload)
                if typ == proto.CMD_DISC or (typ == proto.CMD_WRITE and len(payload) != length):
                    break          # after this the server will not read on (or waits for payload)
            try:
                c.s.sendall(b"".join(out))
                c.s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                Reader(c.s).replies(pending, structured)
            except ConnectionResetError:
                pass
        COUNT["messages"] += len(out)
        COUNT["examples"] += 1
        _healthy(s)

    run()


def test_fuzz_left_nothing_behind(served):
    s = served
    print("fuzz:", COUNT)
    assert COUNT["messages"] >= 2000, COUNT
    # every socket, overlay and pipe is gone again; the index's pooled connections (each open
    # export's read lease borrows one) stay within SQLAlchemy's pool: 5 connections, 3 fds each
    assert wait_until(lambda: s.fd_count(index=False) == s.baseline_fds, timeout=20), \
        (s.fd_count(index=False), s.baseline_fds)
    assert s.fd_count(index=True) <= 5 * 3, s.fd_count(index=True)
    _healthy(s)
