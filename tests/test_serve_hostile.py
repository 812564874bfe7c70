"""Broken and hostile clients get the spec's answers; only they are disconnected."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from helpers import support
from helpers.repo import CHUNK_SIZE as CHUNK
from helpers.repo import new_repo, repo_with_vm1, write_backup
from helpers.serve import RawClient, serve, wait_until
from nbdbackup.nbd import proto

SIZE = 1024 * 1024 + 4096


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-hostile")
    data, _ = repo_with_vm1(d, SIZE, 21)
    with serve(d / "repo", d, "--writable") as s:
        with RawClient(s) as c:          # warm up: views, pools and caches exist before we count fds
            c.greet()
            c.go("vm1")
            c.read(0, 4096)
        time.sleep(0.5)                  # let the warm-up connection's close finish
        s.baseline_fds = s.fd_count()
        s.data = data
        yield s
        assert s.alive()
        log = s.log()
        for bad in ("Traceback", "internal error", "socket.send() raised", "Task exception was never retrieved"):
            assert bad not in log, f"server log has {bad!r}:\n{log[-3000:]}"


def _go_data(name: bytes, reqs=(proto.INFO_BLOCK_SIZE,)) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs))\
        + b"".join(struct.pack(">H", r) for r in reqs)


def _healthy(s) -> None:
    with RawClient(s) as c:
        c.greet()
        c.go("vm1")
        assert c.read(CHUNK - 10, 20) == s.data[CHUNK - 10:CHUNK + 10]


def test_garbage_and_bad_flags_disconnect_only_that_client(served):
    s = served
    with RawClient(s) as c:
        c.greet()
        c.s.sendall(os.urandom(200))
        assert c.is_closed()
    with RawClient(s) as c:
        c.greet(cflags=0x80000003)                    # unknown client flag
        assert c.is_closed()
    with RawClient(s) as c:
        c.greet()
        c.s.sendall(struct.pack(">QII", 0x1234, proto.OPT_LIST, 0))   # bad option magic
        assert c.is_closed()
    with RawClient(s) as c:
        c.s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)   # not even NBD
        c.recv(18)                                    # our greeting, then nothing but the close
        assert c.is_closed()
    _healthy(s)


def test_option_errors(served):
    s = served
    with RawClient(s) as c:
        c.greet()
        assert c.option(99, b"abc")[-1][0] == proto.REP_ERR_UNSUP
        assert c.option(proto.OPT_PEEK_EXPORT)[-1][0] == proto.REP_ERR_UNSUP
        assert c.option(proto.OPT_EXTENDED_HEADERS)[-1][0] == proto.REP_ERR_UNSUP
        assert c.option(proto.OPT_STARTTLS)[-1][0] == proto.REP_ERR_POLICY   # TLS not configured
        assert c.option(proto.OPT_LIST, b"x")[-1][0] == proto.REP_ERR_INVALID
        assert c.option(proto.OPT_STRUCTURED_REPLY, b"x")[-1][0] == proto.REP_ERR_INVALID
        assert c.option(proto.OPT_LIST, os.urandom(100_000))[-1][0] == proto.REP_ERR_TOO_BIG
        # malformed INFO/GO
        assert c.option(proto.OPT_INFO, b"\0\0")[-1][0] == proto.REP_ERR_INVALID
        assert c.option(proto.OPT_INFO, struct.pack(">I", 1000) + b"vm1\0\0")[-1][0] == proto.REP_ERR_INVALID
        assert c.option(proto.OPT_GO, _go_data(b"vm1") + b"junk")[-1][0] == proto.REP_ERR_INVALID
        assert c.option(proto.OPT_GO, _go_data(b"\xff\xfe"))[-1][0] == proto.REP_ERR_INVALID
        # names are looked up, never used as paths
        for name in (b"../../../../etc/passwd", b"/etc/passwd", b"vm1/../vm1", b"vm1\0", b"", b"x" * 4096,
                     b"overlays/" + b"a" * 32, b"." , b".."):
            assert c.option(proto.OPT_GO, _go_data(name))[-1][0] == proto.REP_ERR_UNKNOWN, name
        # meta contexts
        q = b"base:allocation"
        meta = struct.pack(">I", 3) + b"vm1" + struct.pack(">II", 1, len(q)) + q
        assert c.option(proto.OPT_SET_META_CONTEXT, meta)[-1][0] == proto.REP_ERR_INVALID   # no structured yet
        listed = c.option(proto.OPT_LIST_META_CONTEXT, struct.pack(">I", 3) + b"vm1" + struct.pack(">I", 0))
        assert listed[0][0] == proto.REP_META_CONTEXT and listed[0][1][4:] == q
        assert c.option(proto.OPT_STRUCTURED_REPLY)[-1][0] == proto.REP_ACK
        assert c.option(proto.OPT_SET_META_CONTEXT, meta[:-3])[-1][0] == proto.REP_ERR_INVALID
        bad_name = struct.pack(">I", 3) + b"zz9" + struct.pack(">II", 1, len(q)) + q
        assert c.option(proto.OPT_SET_META_CONTEXT, bad_name)[-1][0] == proto.REP_ERR_UNKNOWN
        other = b"qemu:dirty-bitmap:x"
        none = c.option(proto.OPT_SET_META_CONTEXT, struct.pack(">I", 3) + b"vm1"
                        + struct.pack(">II", 1, len(other)) + other)
        assert [t for t, _ in none] == [proto.REP_ACK]
        c.go("vm1")
        # no context selected: block status is refused, the connection stays
        assert c.request(proto.CMD_BLOCK_STATUS, 0, 4096).error == proto.EINVAL
        assert c.read(0, 10) == s.data[:10]
    with RawClient(s) as c:
        c.greet()
        c.s.sendall(proto.OPTION_REQUEST.pack(proto.IHAVEOPT, proto.OPT_LIST, 1 << 31))   # absurd length
        assert c.is_closed()
    with RawClient(s) as c:
        c.greet()
        c.s.sendall(proto.OPTION_REQUEST.pack(proto.IHAVEOPT, proto.OPT_EXPORT_NAME, 4) + b"nope")
        assert c.is_closed()                           # the spec's only answer to a refused EXPORT_NAME
    with RawClient(s) as c:                            # too many options
        c.greet()
        one = proto.OPTION_REQUEST.pack(proto.IHAVEOPT, proto.OPT_STRUCTURED_REPLY, 0)
        c.s.sendall(one * 5000)
        for _ in range(4096):
            magic, _, rtype, ln = proto.OPTION_REPLY.unpack(c.recv(20))
            assert rtype == proto.REP_ACK
        assert c.is_closed()
    _healthy(s)


def test_transmission_errors(served):
    s = served
    with RawClient(s) as c:
        c.greet()
        c.go("vm1", meta=True)
        size = c.size
        assert size == SIZE
        assert c.request(proto.CMD_READ, size - 10, 20).error == proto.EINVAL
        assert c.request(proto.CMD_READ, 2 ** 64 - 4096, 8192).error == proto.EINVAL
        assert c.request(proto.CMD_READ, 0, 33 * 1024 * 1024).error == proto.EINVAL
        assert c.request(proto.CMD_BLOCK_STATUS, size, 1).error == proto.EINVAL
        assert c.request(proto.CMD_CACHE, size - 1, 2).error == proto.EINVAL
        r = c.request(proto.CMD_READ, 0, 0)
        assert r.error == 0 and r.data == b""
        assert c.request(proto.CMD_WRITE, size - 10, 20, payload=b"z" * 20).error == proto.ENOSPC
        assert c.request(proto.CMD_READ, 0, 4, flags=1 << 9).error == proto.EINVAL    # unknown flag
        assert c.request(proto.CMD_FLUSH, 0, 0, flags=proto.CMD_FLAG_DF).error == proto.EINVAL
        assert c.request(99, 0, 4096).error == proto.EINVAL                          # unknown command
        assert c.request(proto.CMD_RESIZE, 0, 0).error == proto.EINVAL
        # a write payload over the advertised maximum: EINVAL, the payload is drained
        big = 32 * 1024 * 1024 + 4096
        ck = c.send(proto.CMD_WRITE, 0, big)
        chunk = b"\xee" * (1 << 20)
        left = big
        while left:
            c.s.sendall(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
        assert c.reply(ck).error == proto.EINVAL
        assert c.read(0, 100) == s.data[:100]          # nothing of the refused write landed
        # the server never wrote the payload, and the stream is still in sync
        assert c.request(proto.CMD_WRITE, 4096, 0).error == 0
        # a bad request magic ends the connection
        c.s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 10))
        assert c.is_closed()
    with RawClient(s) as c:                # DF on a too-large read: EOVERFLOW (structured)
        c.greet()
        c.go("vm1")
        assert c.request(proto.CMD_READ, 0, 33 * 1024 * 1024, flags=proto.CMD_FLAG_DF).error == proto.EOVERFLOW
    with RawClient(s) as c:
        c.greet()
        c.go("vm1")
        c.send(proto.CMD_WRITE, 0, 64 * 1024 * 1024 + 1)   # beyond what we drain: disconnect
        assert c.is_closed()
    _healthy(s)


def test_vanishing_clients_leak_nothing(served):
    s = served
    for k in range(30):
        c = RawClient(s)
        c.greet()
        if k % 3 == 0:
            c.close()                      # gone during the handshake
            continue
        c.go("vm1")
        for i in range(16):                # a pipeline of reads, then vanish mid-reply
            c.send(proto.CMD_READ, (i * 65536) % (SIZE - 65536), 65536)
        if k % 3 == 2:
            c.s.sendall(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 99, 0, 4096) + b"half")
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST
        c.close()
    _healthy(s)
    assert wait_until(lambda: s.fd_count() == s.baseline_fds, timeout=20), (s.fd_count(), s.baseline_fds)
    # threads are pools of fixed size (main + 4 chunk workers + 1 index + default executor), not per client
    assert s.thread_count() <= 8, s.thread_count()


def test_corrupt_chunk_is_eio_never_wrong_bytes(tmp_path):
    r = new_repo(tmp_path / "repo")
    try:
        rnd = os.urandom(16 * CHUNK)       # incompressible: the pack is mostly chunk payloads
        write_backup(r, "vm1", rnd, zero_holes=True)
    finally:
        r.close()
    packs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "repo" / "packs") for f in fs]
    assert packs
    pack = max(packs, key=os.path.getsize)
    raw = bytearray(open(pack, "rb").read())
    mid = len(raw) // 2
    raw[mid:mid + 16] = bytes(b ^ 0xFF for b in raw[mid:mid + 16])
    open(pack, "wb").write(bytes(raw))
    qemu_img = support.require_tool("qemu-img")
    (tmp_path / "orig.raw").write_bytes(rnd)
    with serve(tmp_path / "repo", tmp_path) as s:
        with RawClient(s) as c:
            c.greet()
            c.go("vm1")
            bad = 0
            for i in range(16):
                r = c.request(proto.CMD_READ, i * CHUNK, CHUNK)
                if r.error:
                    assert r.error == proto.EIO
                    bad += 1
                else:
                    assert r.data == rnd[i * CHUNK:(i + 1) * CHUNK]
            assert bad >= 1
            # again (nothing bad got cached), and with simple replies
        with RawClient(s) as c:
            c.greet()
            c.go("vm1", structured=False)
            errs = [c.request(proto.CMD_READ, i * CHUNK, CHUNK).error for i in range(16)]
            assert errs.count(proto.EIO) == bad
        p = support.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(tmp_path / "orig.raw"),
                         s.uri("vm1")], check=False)
        assert p.returncode != 0 and "identical" not in p.stdout
        assert s.alive()
        assert "damaged" in s.log() or "EIO" in s.log()
