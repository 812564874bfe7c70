"""ConnectionPool: N connections only with multi-conn, carry on when the server is full, reconnect."""

from __future__ import annotations

import logging
import subprocess
import threading
import time

import pytest

from helpers import support
from helpers.fake_nbd_server import FakeServer
from helpers.nbd_servers import qcow2_with_bitmap_and_raw
from helpers.support import qemu_nbd
from nbdbackup.nbd import proto
from nbdbackup.nbd.extents import walk_extents
from nbdbackup.nbd.pool import ConnectionPool

pytestmark = pytest.mark.timeout(120)

BM = "qemu:dirty-bitmap:bm0"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return qcow2_with_bitmap_and_raw(tmp_path_factory.mktemp("pimg"))


def read_all(pool, size, step=1 << 20):
    futs = [pool.submit_read(off, min(step, size - off)) for off in range(0, size, step)]
    return b"".join(bytes(f.result()) for f in futs)


def test_four_connections_with_multi_conn(tmp_path, image, caplog):
    img, raw = image
    with qemu_nbd(img, tmp_path / "s", connections=4, bitmaps=("bm0",)) as uri:
        with caplog.at_level(logging.WARNING):
            with ConnectionPool(uri, connections=4, meta_contexts=["base:allocation", BM]) as pool:
                assert pool.connections == 4 and pool.notes == []
                assert read_all(pool, pool.size) == raw
                assert sum(e.length for e in walk_extents(pool, BM)) == pool.size
                assert pool.connections == 4     # block status used the same connections
                assert all(c.alive for c in pool.clients)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_one_connection_without_multi_conn_warns(tmp_path, image, caplog):
    img, raw = image
    with qemu_nbd(img, tmp_path / "s", connections=1) as uri:
        with caplog.at_level(logging.WARNING):
            with ConnectionPool(uri, connections=4) as pool:
                assert pool.connections == 1
                assert read_all(pool, pool.size) == raw
        assert any("multi-conn" in r.getMessage() and "1 connection instead of 4" in r.getMessage()
                   for r in caplog.records)


def test_full_server_carry_on(tmp_path, image, caplog):
    """qemu-nbd -e 4 leaves a fifth client without a greeting: carry on with four, and say so."""
    img, raw = image
    with qemu_nbd(img, tmp_path / "s", connections=4) as uri:
        with caplog.at_level(logging.WARNING):
            with ConnectionPool(uri, connections=5, greeting_timeout=1.0) as pool:
                assert pool.connections == 4
                assert read_all(pool, pool.size) == raw
        assert any("did not greet connection 5" in r.getMessage() for r in caplog.records)


def test_reconnect_after_server_restart(tmp_path, image, caplog):
    img, raw = image
    sock = tmp_path / "s"
    with qemu_nbd(img, sock, connections=2) as uri:
        pool = ConnectionPool(uri, connections=2)
        try:
            assert pool.read(0, 1 << 20) == raw[:1 << 20]
        except BaseException:
            pool.close()
            raise
    try:
        sock.unlink(missing_ok=True)
        with qemu_nbd(img, sock, connections=2):
            with caplog.at_level(logging.WARNING):
                assert read_all(pool, pool.size) == raw
                assert pool.connections <= 2
            assert any("reconnected" in r.getMessage() for r in caplog.records)
    finally:
        pool.close()


def test_requests_lost_with_a_dropped_connection_are_retried(tmp_path):
    """The first connection dies with reads in flight; the pool reconnects and sends them again."""
    size = 1 << 20
    data = bytes(range(256)) * (size // 256)
    conns = []
    lock = threading.Lock()

    def handler(conn, srv):
        with lock:
            conns.append(conn)
            first = len(conns) == 1
        srv.negotiate(conn)
        n = 0
        while True:
            _, cmd, cookie, off, ln = srv.read_request(conn)
            if cmd == proto.CMD_DISC:
                return
            n += 1
            if first and n == 3:
                conn.close()   # drop with requests outstanding
                return
            srv.simple(conn, cookie, 0, data[off:off + ln])

    with FakeServer(tmp_path / "s", handler, size=size) as srv:
        with ConnectionPool(srv.uri, connections=1, timeout=5) as pool:
            got = read_all(pool, size, step=65536)
            assert got == data
            assert len(conns) == 2 and pool.connections == 1


def test_server_gone_with_many_requests_in_flight_fails_them_within_one_round(tmp_path):
    """Every connection drops with reads outstanding and the server is gone: one round of
    reconnect attempts decides for all of them (a round per lost request took minutes)."""
    from nbdbackup.errors import NbdConnectionError

    inflight = 32
    received = threading.Semaphore(0)

    def handler(conn, srv):
        srv.negotiate(conn)
        while True:             # take requests, answer none
            srv.read_request(conn)
            received.release()

    with FakeServer(tmp_path / "s", handler, size=1 << 20, flags=proto.FLAG_CAN_MULTI_CONN) as srv:
        with ConnectionPool(srv.uri, connections=4, timeout=30) as pool:
            assert pool.connections == 4
            futs = [pool.submit_read(i * 4096, 4096) for i in range(inflight)]
            for _ in range(inflight):
                assert received.acquire(timeout=10), "the reads never reached the server"
            started = time.monotonic()
            srv.vanish()
            errors = [f.exception(timeout=60) for f in futs]
            took = time.monotonic() - started
            assert all(isinstance(e, NbdConnectionError) for e in errors), errors
            # one round sleeps 0.5 + 1 + 2 s between its attempts
            assert took < 8, f"{inflight} lost reads took {took:.1f}s to fail"
            assert all("could not reconnect" in str(e) for e in errors), errors[0]
            t0 = time.monotonic()
            with pytest.raises(NbdConnectionError, match="could not reconnect"):
                pool.read(0, 4096)              # and a new request learns it at once
            assert time.monotonic() - t0 < 1


def test_unreachable_server_is_a_clear_error(tmp_path):
    from nbdbackup.errors import NbdConnectionError

    with pytest.raises(NbdConnectionError, match="cannot connect"):
        ConnectionPool(f"nbd+unix:///?socket={tmp_path}/nothing", connections=2)


def test_pool_over_tcp(tmp_path, image):
    """TCP transport through the pool too (qemu-nbd on 127.0.0.1)."""
    img, raw = image
    port = support.free_port()
    proc = subprocess.Popen([support.require_tool("qemu-nbd"), "-r", "-t", "-e", "3", "-b", "127.0.0.1",
                             "-p", str(port), "-f", "qcow2", str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        support.wait_for_port(port)
        with ConnectionPool(f"nbd://127.0.0.1:{port}/", connections=3) as pool:
            assert pool.connections == 3
            assert read_all(pool, pool.size) == raw
    finally:
        support.stop(proc)


def test_export_that_changes_across_a_reconnect_is_refused(tmp_path):
    """After a drop the new connection shows a different size: an error, not reads from another disk."""
    from nbdbackup.errors import NbdProtocolError

    conns = []

    def handler(conn, srv):
        conns.append(conn)
        first = len(conns) == 1
        if not first:
            srv.size = 2 << 20
        srv.negotiate(conn)
        _, cmd, cookie, off, ln = srv.read_request(conn)
        if first:
            conn.close()
            return
        srv.simple(conn, cookie, 0, bytes(ln))
        srv.wait_disc(conn)

    with FakeServer(tmp_path / "s", handler, size=1 << 20) as srv:
        with ConnectionPool(srv.uri, connections=1, timeout=5) as pool:
            with pytest.raises(NbdProtocolError, match="changed size from 1048576 to 2097152"):
                pool.read(0, 4096)


def test_server_connection_limit_carry_on(tmp_path, caplog):
    """nbdkit's limit filter turns away a third client: the pool carries on with two."""
    from helpers.nbd_servers import nbdkit

    with nbdkit(tmp_path / "s", "memory", "4M", "limit=2", filters=("limit",)) as uri:
        with caplog.at_level(logging.WARNING):
            with ConnectionPool(uri, connections=4) as pool:
                assert pool.connections == 2
                pool.write(0, b"x" * 65536)
                pool.flush()
                assert [bytes(pool.read(0, 65536)) for _ in range(4)] == [b"x" * 65536] * 4
        assert any("connection 3" in r.getMessage() and "carrying on with 2" in r.getMessage()
                   for r in caplog.records)
