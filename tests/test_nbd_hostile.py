"""A lying or broken server gets a clear error naming what it did: never a hang, never wrong data."""

from __future__ import annotations

import random
import struct
import time

import pytest

from helpers.fake_nbd_server import FakeServer
from nbdbackup.errors import NbdCommandError, NbdConnectionError, NbdOptionError, NbdProtocolError
from nbdbackup.nbd import proto
from nbdbackup.nbd.client import Client, GreetingTimeout, TruncatedReply

pytestmark = pytest.mark.timeout(60)

T = 5.0   # client timeout in these tests; nothing here may take that long unless it is the point


def one_request(body, **srv_kw):
    """Handler: honest handshake, then body(conn, srv, request) for the first request."""
    def handler(conn, srv):
        srv.negotiate(conn)
        req = srv.read_request(conn)
        body(conn, srv, req)
        srv.wait_disc(conn)
    return handler


def connect(srv, **kw):
    kw.setdefault("timeout", T)
    return Client.connect(srv.uri, **kw)


# --- handshake ---------------------------------------------------------------

def test_bad_greeting_magic(tmp_path):
    def h(conn, srv):
        conn.sendall(struct.pack(">QQH", 0x1122334455667788, proto.IHAVEOPT, 3))
        time.sleep(1)
    with FakeServer(tmp_path / "s", h) as srv:
        with pytest.raises(NbdProtocolError, match="bad greeting magic"):
            connect(srv)


def test_oldstyle_server_refused(tmp_path):
    def h(conn, srv):
        conn.sendall(struct.pack(">QQ", proto.NBDMAGIC, proto.CLISERV_MAGIC) + b"\0" * 8)
        time.sleep(1)
    with FakeServer(tmp_path / "s", h) as srv:
        with pytest.raises(NbdProtocolError, match="old-style"):
            connect(srv)


def test_no_greeting_times_out(tmp_path):
    with FakeServer(tmp_path / "s", lambda conn, srv: time.sleep(5)) as srv:
        t0 = time.monotonic()
        with pytest.raises(GreetingTimeout, match="no greeting"):
            connect(srv, greeting_timeout=0.5)
        assert time.monotonic() - t0 < 3


def test_option_reply_for_another_option(tmp_path):
    def h(conn, srv):
        srv.greet(conn)
        opt, _ = srv.read_option(conn)
        srv.reply(conn, proto.OPT_LIST, proto.REP_ACK)   # answers a question we did not ask
        time.sleep(1)
    with FakeServer(tmp_path / "s", h) as srv:
        with pytest.raises(NbdProtocolError, match="answered NBD_OPT_LIST while we asked NBD_OPT_STRUCTURED_REPLY"):
            connect(srv)


def test_bad_option_reply_magic(tmp_path):
    def h(conn, srv):
        srv.greet(conn)
        opt, _ = srv.read_option(conn)
        conn.sendall(proto.OPTION_REPLY.pack(0xDEADBEEF, opt, proto.REP_ACK, 0))
        time.sleep(1)
    with FakeServer(tmp_path / "s", h) as srv:
        with pytest.raises(NbdProtocolError, match="bad option reply magic"):
            connect(srv)


@pytest.mark.parametrize("rtype, data, match", [
    (proto.REP_ACK, b"", "without NBD_INFO_EXPORT"),
    (proto.REP_INFO, proto.INFO_BLOCK_SIZE_STRUCT.pack(proto.INFO_BLOCK_SIZE, 3, 4096, 1 << 20),
     "minimum block size 3"),
], ids=["go_without_export_info", "invalid_block_size_rejected"])
def test_bad_go_reply(tmp_path, rtype, data, match):
    def h(conn, srv):
        srv.greet(conn)
        while True:
            opt, _ = srv.read_option(conn)
            if opt == proto.OPT_GO:
                srv.reply(conn, opt, rtype, data)
                time.sleep(1)
                return
            srv.reply(conn, opt, proto.REP_ERR_UNSUP)
    with FakeServer(tmp_path / "s", h) as srv:
        with pytest.raises(NbdProtocolError, match=match):
            connect(srv)


def test_unknown_export_is_named(tmp_path):
    def h(conn, srv):
        srv.greet(conn)
        while True:
            opt, _ = srv.read_option(conn)
            srv.reply(conn, opt, proto.REP_ERR_UNKNOWN if opt == proto.OPT_GO else proto.REP_ERR_UNSUP)
    with FakeServer(tmp_path / "s", h) as srv:
        with pytest.raises(NbdOptionError, match="no export named 'nope'"):
            Client.connect(f"nbd+unix:///nope?socket={srv.path}", timeout=T)


def test_fallback_to_export_name_without_go(tmp_path):
    """A server without NBD_OPT_GO still works, through NBD_OPT_EXPORT_NAME."""
    payload = bytes(range(256)) * 16

    def h(conn, srv):
        srv.negotiate(conn, go=False, structured=False)
        _, cmd, cookie, off, n = srv.read_request(conn)
        assert cmd == proto.CMD_READ
        srv.simple(conn, cookie, 0, payload[off:off + n])
        srv.wait_disc(conn)
    with FakeServer(tmp_path / "s", h, size=4096) as srv:
        with connect(srv) as c:
            assert c.size == 4096 and not c.structured
            assert c.min_block == 1 and c.max_block == 32 << 20     # defaults: nothing negotiated
            assert bytes(c.read(0, 4096)) == payload
        assert proto.OPT_GO in srv.options_seen and proto.OPT_EXPORT_NAME in srv.options_seen


# --- transmission ------------------------------------------------------------

def expect_read_error(tmp_path, body, match, exc=NbdProtocolError, **kw):
    with FakeServer(tmp_path / "s", one_request(body), **kw) as srv:
        with connect(srv) as c:
            t0 = time.monotonic()
            with pytest.raises(exc, match=match):
                c.read(0, 4096)
            assert time.monotonic() - t0 < T
            assert not c.alive if exc is not NbdCommandError else c.alive


def test_bad_reply_magic(tmp_path):
    def body(conn, srv, req):
        conn.sendall(struct.pack(">IIQ", 0x12345678, 0, req[2]))
    expect_read_error(tmp_path, body, "bad magic 0x12345678")


def test_wrong_cookie(tmp_path):
    def body(conn, srv, req):
        srv.data_chunk(conn, req[2] + 1000, 0, b"x" * 4096, done=True)
    expect_read_error(tmp_path, body, "wrong cookie")


def test_unknown_chunk_type(tmp_path):
    def body(conn, srv, req):
        srv.chunk(conn, req[2], 77, b"????", done=True)
    expect_read_error(tmp_path, body, "unknown structured reply chunk type 77")


def test_chunk_outside_request(tmp_path):
    def body(conn, srv, req):
        srv.data_chunk(conn, req[2], 2048, b"x" * 4096, done=True)
    expect_read_error(tmp_path, body, r"outside its request")


def test_hole_outside_request(tmp_path):
    def body(conn, srv, req):
        srv.hole_chunk(conn, req[2], 8192, 4096, done=True)
    expect_read_error(tmp_path, body, r"outside its request")


def test_truncated_reply(tmp_path):
    def body(conn, srv, req):
        hdr = proto.STRUCTURED_REPLY.pack(proto.STRUCTURED_REPLY_MAGIC, proto.REPLY_FLAG_DONE,
                                          proto.REPLY_TYPE_OFFSET_DATA, req[2], 8 + 4096)
        conn.sendall(hdr + struct.pack(">Q", 0) + b"x" * 1000)
        conn.close()
    expect_read_error(tmp_path, body, "truncated reply", exc=TruncatedReply)


def test_reply_not_covering_request(tmp_path):
    def body(conn, srv, req):
        srv.data_chunk(conn, req[2], 0, b"x" * 1024, done=True)
    expect_read_error(tmp_path, body, "does not cover the request")


def test_overlapping_chunks(tmp_path):
    def body(conn, srv, req):
        srv.data_chunk(conn, req[2], 0, b"x" * 3000)
        srv.hole_chunk(conn, req[2], 2048, 2048, done=True)
    expect_read_error(tmp_path, body, "overlapping chunks")


def test_two_content_chunks_under_df(tmp_path):
    def handler(conn, srv):
        srv.negotiate(conn)
        flags, _, cookie, _, _ = srv.read_request(conn)
        assert flags & proto.CMD_FLAG_DF
        srv.data_chunk(conn, cookie, 0, b"x" * 2048)
        srv.data_chunk(conn, cookie, 2048, b"y" * 2048, done=True)
        srv.wait_disc(conn)
    with FakeServer(tmp_path / "s", handler, flags=proto.FLAG_SEND_DF) as srv:
        with connect(srv) as c:
            with pytest.raises(NbdProtocolError, match="more than one content chunk.*DF"):
                c.read(0, 4096, df=True)


def test_structured_reply_when_not_negotiated(tmp_path):
    def handler(conn, srv):
        srv.negotiate(conn, structured=False)
        _, _, cookie, _, _ = srv.read_request(conn)
        srv.data_chunk(conn, cookie, 0, b"x" * 4096, done=True)
        srv.wait_disc(conn)
    with FakeServer(tmp_path / "s", handler) as srv:
        with connect(srv) as c:
            with pytest.raises(NbdProtocolError, match="structured replies were not negotiated"):
                c.read(0, 4096)


def test_server_that_never_replies_times_out(tmp_path):
    def body(conn, srv, req):
        time.sleep(3)
    with FakeServer(tmp_path / "s", one_request(body)) as srv:
        with Client.connect(srv.uri, timeout=0.5) as c:
            t0 = time.monotonic()
            with pytest.raises(NbdConnectionError, match="no reply within"):
                c.read(0, 4096)
            assert time.monotonic() - t0 < 2.5


def test_error_chunk_with_zero_errno(tmp_path):
    def body(conn, srv, req):
        srv.chunk(conn, req[2], proto.REPLY_TYPE_ERROR, proto.ERROR_STRUCT.pack(0, 0), done=True)
    expect_read_error(tmp_path, body, "errno 0")


def test_error_offset_chunk_is_a_command_error(tmp_path):
    def body(conn, srv, req):
        cookie = req[2]
        srv.data_chunk(conn, cookie, 0, b"x" * 1024)
        msg = b"bad sector"
        srv.chunk(conn, cookie, proto.REPLY_TYPE_ERROR_OFFSET,
                  proto.ERROR_STRUCT.pack(proto.EIO, len(msg)) + msg + struct.pack(">Q", 1024))
        srv.hole_chunk(conn, cookie, 2048, 2048, done=True)
    with FakeServer(tmp_path / "s", one_request(body)) as srv:
        with connect(srv) as c:
            with pytest.raises(NbdCommandError, match="EIO at offset 1024 \\(bad sector\\)") as ei:
                c.read(0, 4096)
            assert ei.value.errno == proto.EIO and ei.value.offset == 1024
            assert c.alive    # a command error leaves the connection usable


def test_error_offset_outside_request(tmp_path):
    def body(conn, srv, req):
        srv.chunk(conn, req[2], proto.REPLY_TYPE_ERROR_OFFSET,
                  proto.ERROR_STRUCT.pack(proto.EIO, 0) + struct.pack(">Q", 1 << 19), done=True)
    expect_read_error(tmp_path, body, "error offset .* outside its request")


def test_chunks_in_any_order_assemble_correctly(tmp_path):
    """Data and hole chunks shuffled; holes read as zeroes; request split across several commands."""
    size = 1 << 20
    rnd = random.Random(7)
    image = bytearray(rnd.randbytes(size))
    holes = [(4096 * i, 4096) for i in range(0, 256, 3)]
    for off, n in holes:
        image[off:off + n] = bytes(n)

    def handler(conn, srv):
        srv.negotiate(conn)
        while True:
            _, cmd, cookie, off, n = srv.read_request(conn)
            if cmd == proto.CMD_DISC:
                return
            pieces, pos = [], off
            while pos < off + n:     # pieces along 4 KiB boundaries, clipped to the request
                blk = pos - pos % 4096
                ln = min(blk + 4096, off + n) - pos
                pieces.append(("h" if (blk, 4096) in holes else "d", pos, ln))
                pos += ln
            rnd.shuffle(pieces)
            for i, (kind, pos, ln) in enumerate(pieces):
                last = i == len(pieces) - 1
                if kind == "h":
                    srv.hole_chunk(conn, cookie, pos, ln, done=last)
                else:
                    srv.data_chunk(conn, cookie, pos, bytes(image[pos:pos + ln]), done=last)
    with FakeServer(tmp_path / "s", handler, size=size) as srv:
        with connect(srv) as c:
            futs = [c.submit_read(off, 65536) for off in range(0, size, 65536)]
            got = b"".join(bytes(f.result()) for f in futs)
            assert got == bytes(image)
            assert bytes(c.read(1000, 10000)) == bytes(image[1000:11000])   # unaligned, zero-filled holes
            # a reused, dirty buffer: hole ranges must be zero-filled, not left as they were
            buf = bytearray(b"\xff" * 65536)
            for off in range(0, size, 65536):
                assert c.submit_read_into(off, buf).result() is buf
                assert buf == image[off:off + 65536]
            assert c.submit_read_into(5, memoryview(buf)[:1000]).result() is not None
            assert buf[:1000] == image[5:1005]


@pytest.mark.parametrize("payload, match, call", [
    (struct.pack(">III", 99, 4096, 0), "context id 99, which was not negotiated",
     lambda c: c.block_status(0, 4096)),
    (struct.pack(">IIIII", 10, 2048, 0, 2048, 3), "REQ_ONE",
     lambda c: c.block_status(0, 4096, req_one=True)),
    (struct.pack(">III", 10, 4096, 0), "block status in reply to NBD_CMD_READ",
     lambda c: c.read(0, 4096)),
], ids=["unknown_context_id", "req_one_with_two_extents", "in_reply_to_read"])
def test_bad_block_status_reply(tmp_path, payload, match, call):
    def body(conn, srv, req):
        srv.chunk(conn, req[2], proto.REPLY_TYPE_BLOCK_STATUS, payload, done=True)
    with FakeServer(tmp_path / "s", one_request(body)) as srv:
        with connect(srv, meta_contexts=["base:allocation"]) as c:
            with pytest.raises(NbdProtocolError, match=match):
                call(c)


def test_short_block_status_replies_are_walked(tmp_path):
    """A server answering 4 KiB at a time: the walker keeps asking and merges the runs."""
    from nbdbackup.nbd.extents import walk_extents

    size = 1 << 20

    def handler(conn, srv):
        srv.negotiate(conn)
        while True:
            _, cmd, cookie, off, n = srv.read_request(conn)
            if cmd == proto.CMD_DISC:
                return
            flags = 3 if off >= size // 2 else 0
            srv.chunk(conn, cookie, proto.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 10, 4096, flags), done=True)
    with FakeServer(tmp_path / "s", handler, size=size) as srv:
        with connect(srv, meta_contexts=["base:allocation"]) as c:
            ext = list(walk_extents(c))
    assert [(e.offset, e.length, e.dirty, e.zero) for e in ext] == [
        (0, size // 2, True, False), (size // 2, size // 2, True, True)]


def test_outstanding_requests_all_fail_on_protocol_error(tmp_path):
    def handler(conn, srv):
        srv.negotiate(conn)
        cookies = [srv.read_request(conn)[2] for _ in range(5)]
        srv.data_chunk(conn, cookies[0], 0, b"x" * 4096, done=True)
        conn.sendall(b"\xff" * 16)
        srv.wait_disc(conn)
    with FakeServer(tmp_path / "s", handler) as srv:
        with connect(srv) as c:
            futs = [c.submit_read(0, 4096) for _ in range(5)]
            assert bytes(futs[0].result(T)) == b"x" * 4096
            for f in futs[1:]:
                with pytest.raises(NbdProtocolError, match="bad magic"):
                    f.result(T)
            with pytest.raises(NbdProtocolError, match="is dead"):
                c.submit_read(0, 4096)


def test_server_closing_between_replies(tmp_path):
    def body(conn, srv, req):
        conn.close()
    with FakeServer(tmp_path / "s", one_request(body)) as srv:
        with connect(srv) as c:
            with pytest.raises(NbdConnectionError, match="closed the connection with 1 requests outstanding"):
                c.read(0, 4096)


def test_local_refusals(tmp_path):
    """Read-only export: writes refused locally; unadvertised commands are never sent."""
    seen = []

    def handler(conn, srv):
        srv.negotiate(conn)
        while True:
            _, cmd, cookie, off, n = srv.read_request(conn)
            seen.append(cmd)
            if cmd == proto.CMD_DISC:
                return
            srv.simple(conn, cookie, 0, bytes(n) if cmd == proto.CMD_READ else b"")
    with FakeServer(tmp_path / "s", handler, flags=proto.FLAG_READ_ONLY) as srv:
        with connect(srv) as c:
            assert c.read_only
            with pytest.raises(NbdCommandError, match="read-only") as ei:
                c.write(0, b"x" * 512)
            assert ei.value.errno == proto.EPERM
            with pytest.raises(NbdCommandError, match="read-only"):
                c.write_zeroes(0, 4096)
            c.flush()           # no FLUSH advertised: nothing to flush, nothing sent
            c.cache(0, 4096)    # no CACHE advertised: a hint, skipped
            c.read(0, 4096)
        deadline = time.monotonic() + 3
        while len(seen) < 2 and time.monotonic() < deadline:   # DISC arrives after close()
            time.sleep(0.01)
    assert seen == [proto.CMD_READ, proto.CMD_DISC]


def test_replies_out_of_order_and_interleaved(tmp_path):
    """Eight reads answered last-first, their chunks interleaved: each future gets its own data."""
    size = 8 * 4096
    image = bytes(random.Random(11).randbytes(size))

    def handler(conn, srv):
        srv.negotiate(conn)
        reqs = [srv.read_request(conn) for _ in range(8)]
        reqs.reverse()
        for _, _, cookie, off, n in reqs:      # first halves, all requests
            srv.data_chunk(conn, cookie, off, image[off:off + n // 2])
        for _, _, cookie, off, n in reqs:      # then second halves, with DONE
            srv.data_chunk(conn, cookie, off + n // 2, image[off + n // 2:off + n], done=True)
        srv.wait_disc(conn)
    with FakeServer(tmp_path / "s", handler, size=size) as srv:
        with connect(srv) as c:
            futs = [(off, c.submit_read(off, 4096)) for off in range(0, size, 4096)]
            for off, f in futs:
                assert bytes(f.result(T)) == image[off:off + 4096]
