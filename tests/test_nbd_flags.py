"""The client honours the export's transmission flags: what it sends, and what it does instead."""

from __future__ import annotations

import time

import pytest

from helpers.fake_nbd_server import FakeServer
from nbdbackup.errors import NbdCommandError
from nbdbackup.nbd import proto
from nbdbackup.nbd.client import Client

pytestmark = pytest.mark.timeout(60)


def recording_server(tmp_path, flags, size=1 << 20):
    """A server that answers every request with success and records (cmd, flags, offset, length)."""
    seen = []

    def handler(conn, srv):
        srv.negotiate(conn)
        while True:
            rflags, cmd, cookie, off, n = srv.read_request(conn)
            seen.append((cmd, rflags, off, n))
            if cmd == proto.CMD_DISC:
                return
            srv.simple(conn, cookie, 0, bytes(n) if cmd == proto.CMD_READ else b"")
    return FakeServer(tmp_path / "s", handler, size=size, flags=flags), seen


def wait_for(seen, cmd):
    deadline = time.monotonic() + 3
    while not any(s[0] == cmd for s in seen) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_nothing_advertised(tmp_path):
    """No FUA/FLUSH/TRIM/WRITE_ZEROES/CACHE/DF: emulate or skip, never send them."""
    srv, seen = recording_server(tmp_path, flags=0)
    with srv:
        with Client.connect(srv.uri, timeout=5) as c:
            c.write(0, b"x" * 4096, fua=True)         # FUA without FLUSH: a plain write
            c.write_zeroes(8192, 3 * 4096)             # emulated with WRITEs of zeroes
            with pytest.raises(NbdCommandError, match="fast zero") as ei:
                c.write_zeroes(0, 4096, fast=True)
            assert ei.value.errno == proto.ENOTSUP
            c.trim(0, 4096)
            c.cache(0, 4096)
            c.flush()
            c.read(0, 4096, df=True)
        wait_for(seen, proto.CMD_DISC)
    cmds = [(cmd, fl) for cmd, fl, _, _ in seen]
    assert cmds == [(proto.CMD_WRITE, 0), (proto.CMD_WRITE, 0), (proto.CMD_READ, 0), (proto.CMD_DISC, 0)]
    assert seen[1][2:] == (8192, 3 * 4096)


def test_fua_emulated_with_flush(tmp_path):
    srv, seen = recording_server(tmp_path, flags=proto.FLAG_SEND_FLUSH | proto.FLAG_SEND_WRITE_ZEROES)
    with srv:
        with Client.connect(srv.uri, timeout=5) as c:
            c.write(0, b"x" * 4096, fua=True)
            c.write_zeroes(0, 4096)
        wait_for(seen, proto.CMD_DISC)
    assert [(cmd, fl) for cmd, fl, _, _ in seen] == [
        (proto.CMD_WRITE, 0), (proto.CMD_FLUSH, 0), (proto.CMD_WRITE_ZEROES, 0), (proto.CMD_DISC, 0)]


def test_everything_advertised(tmp_path):
    all_flags = (proto.FLAG_SEND_FLUSH | proto.FLAG_SEND_FUA | proto.FLAG_SEND_TRIM | proto.FLAG_SEND_WRITE_ZEROES
                 | proto.FLAG_SEND_FAST_ZERO | proto.FLAG_SEND_CACHE | proto.FLAG_SEND_DF)
    srv, seen = recording_server(tmp_path, flags=all_flags, size=8 << 30)
    with srv:
        with Client.connect(srv.uri, timeout=5) as c:
            c.write(0, b"x" * 4096, fua=True)
            c.write_zeroes(0, 4096, no_hole=True, fast=True)
            c.trim(0, 4096)
            c.cache(0, 4096)
            c.flush()
            c.read(0, 4096, df=True)
            c.write_zeroes(0, 5 << 30)          # longer than a u32: split
        wait_for(seen, proto.CMD_DISC)
    assert [(cmd, fl) for cmd, fl, _, _ in seen[:6]] == [
        (proto.CMD_WRITE, proto.CMD_FLAG_FUA),
        (proto.CMD_WRITE_ZEROES, proto.CMD_FLAG_NO_HOLE | proto.CMD_FLAG_FAST_ZERO),
        (proto.CMD_TRIM, 0), (proto.CMD_CACHE, 0), (proto.CMD_FLUSH, 0), (proto.CMD_READ, proto.CMD_FLAG_DF)]
    zeroes = [(off, n) for cmd, _, off, n in seen[6:] if cmd == proto.CMD_WRITE_ZEROES]
    assert len(zeroes) == 2 and sum(n for _, n in zeroes) == 5 << 30 and all(n < 1 << 32 for _, n in zeroes)
    assert zeroes[1][0] == zeroes[0][1]


def test_writes_split_at_max_block_and_bounds_checked(tmp_path):
    from nbdbackup.errors import UsageError

    srv, seen = recording_server(tmp_path, flags=0, size=4 << 20)
    with srv:
        with Client.connect(srv.uri, timeout=5) as c:
            assert c.max_block == 1 << 20       # the fake server says so
            c.write(0, bytes(3 << 20))
            assert bytes(c.read(0, 3 << 20)) == bytes(3 << 20)
            with pytest.raises(UsageError, match="outside the export"):
                c.read(4 << 20, 1)
            with pytest.raises(UsageError, match="outside the export"):
                c.write((4 << 20) - 10, b"x" * 11)
        wait_for(seen, proto.CMD_DISC)
    writes = [n for cmd, _, _, n in seen if cmd == proto.CMD_WRITE]
    reads = [n for cmd, _, _, n in seen if cmd == proto.CMD_READ]
    assert writes == [1 << 20] * 3 and reads == [1 << 20] * 3


def test_query_info_and_list_end_with_abort(tmp_path):
    def handler(conn, srv):
        srv.negotiate(conn)
    with FakeServer(tmp_path / "s", handler, size=12345 * 512, flags=proto.FLAG_READ_ONLY) as srv:
        info = Client.query_info(srv.uri, timeout=5)
        assert info.size == 12345 * 512 and info.read_only and info.block_size_negotiated
        assert info.max_block == 1 << 20
        assert proto.OPT_INFO in srv.options_seen and proto.OPT_GO not in srv.options_seen
        deadline = time.monotonic() + 3
        while proto.OPT_ABORT not in srv.options_seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proto.OPT_ABORT in srv.options_seen
