"""The handshake is bounded: options, bytes, total time, and how many connections may be
negotiating at once (apart from --max-connections). Real sockets against the server class
with short bounds injected, and the real `nbdbackup serve` for the option."""

from __future__ import annotations

import logging
import time

import pytest

from helpers import support
from helpers.repo import repo_with_vm1
from helpers.serve import RawClient, serve, serve_in_process, wait_until
from nbdbackup.nbd import proto
from nbdbackup.nbd.server_handshake import HandshakeLimits

UNKNOWN_OPTION = 99


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-bounds")
    data, _ = repo_with_vm1(d, 256 * 1024, 11)
    return d / "repo", data


def option_bytes(opt: int, data: bytes = b"") -> bytes:
    return proto.OPTION_REQUEST.pack(proto.IHAVEOPT, opt, len(data)) + data


def unsup(c: RawClient, data: bytes = b"") -> bool:
    """One unknown option answered with ERR_UNSUP (True), or the connection ended (False)."""
    try:
        return c.option(UNKNOWN_OPTION, data)[-1][0] == proto.REP_ERR_UNSUP
    except (ConnectionError, OSError):
        return False


def healthy(s, data: bytes) -> bool:
    with RawClient(s) as c:
        try:
            c.greet()
            c.go("vm1")
            return c.read(0, 4096) == data[:4096]
        except (ConnectionError, OSError, AssertionError):
            return False


def test_one_option_now_and_then_is_cut_off_by_the_total_time(repo, tmp_path, caplog):
    """The issue's client sends an unknown option every 20 s, under the 30 s per-read
    timeout: scaled down, every 0.5 s under a 1.5 s timeout, against a 2.5 s total."""
    path, data = repo
    limits = HandshakeLimits(read_timeout=1.5, total_time=2.5)
    caplog.set_level(logging.INFO, logger="nbdbackup.server")
    with serve_in_process(path, tmp_path, handshake_limits=limits) as s:
        t0 = time.monotonic()
        with RawClient(s) as c:
            c.greet()
            answered = 0
            while time.monotonic() - t0 < 8 and unsup(c):
                answered += 1
                time.sleep(0.5)
            took = time.monotonic() - t0
        assert answered >= 3, answered                     # the per-read timeout never fired
        assert 2.0 <= took <= 4.0, f"cut off after {took:.1f} s ({answered} options answered)"
        assert "handshake not finished within 2.5 s" in caplog.text
        assert healthy(s, data)                            # a fresh client is served normally


def test_handshake_bytes_are_bounded(repo, tmp_path, caplog):
    path, data = repo
    limits = HandshakeLimits(max_bytes=64 * 1024)
    caplog.set_level(logging.INFO, logger="nbdbackup.server")
    with serve_in_process(path, tmp_path, handshake_limits=limits) as s:
        with RawClient(s) as c:
            c.greet()
            answered = 0
            while answered < 100 and unsup(c, bytes(8192)):
                answered += 1
            fit = (limits.max_bytes - 4) // (16 + 8192)   # after the 4 bytes of client flags
            assert answered == fit, (answered, fit)
            assert c.is_closed()
        assert "more than 65536 bytes during the handshake" in caplog.text
        assert healthy(s, data)


def test_option_count_is_bounded(repo, tmp_path):
    path, data = repo
    with serve_in_process(path, tmp_path, handshake_limits=HandshakeLimits(max_options=10)) as s:
        with RawClient(s) as c:
            c.greet()
            c.s.sendall(option_bytes(proto.OPT_STRUCTURED_REPLY) * 20)
            for _ in range(10):
                assert proto.OPTION_REPLY.unpack(c.recv(20))[2] == proto.REP_ACK
            assert c.is_closed()
        assert healthy(s, data)


def test_negotiating_connections_have_their_own_bound(repo, tmp_path, caplog):
    """Silent clients take at most --max-handshakes slots, and only until the total time;
    connected clients are never counted or disturbed."""
    path, data = repo
    limits = HandshakeLimits(total_time=2.0)
    caplog.set_level(logging.INFO, logger="nbdbackup.server")
    with serve_in_process(path, tmp_path, max_clients=10, max_handshakes=2, handshake_limits=limits) as s:
        connected = []
        for _ in range(3):                               # more than max_handshakes, one after another
            c = RawClient(s)
            c.greet()
            c.go("vm1")
            connected.append(c)
        silent = [RawClient(s), RawClient(s)]           # greeting read, never answered
        for c in silent:
            c.recv(18)
        assert wait_until(lambda: s.server.handshaking == 2)
        with RawClient(s) as c:
            assert c.is_closed(timeout=5), "a third negotiating client got a greeting"
        assert "still in the handshake (--max-handshakes)" in caplog.text
        for c in connected:
            assert c.read(0, 4096) == data[:4096]
        # The total time frees the slots; new clients get through again.
        assert all(c.is_closed(timeout=6) for c in silent)
        assert wait_until(lambda: healthy(s, data), timeout=5)
        assert s.server.handshaking == 0
        for c in connected + silent:
            c.close()


def test_max_handshakes_option(repo, tmp_path):
    path, data = repo
    p = support.nbdbackup("serve", "--repo", path, "--listen", f"unix:{tmp_path}/x.sock", "--max-handshakes", "0",
                          check=False, timeout=30)
    assert p.returncode == 2
    assert "argument --max-handshakes: invalid whole number '0': must be between 1 and 65536" in p.stderr
    with serve(path, tmp_path, "--max-handshakes", "1") as s:
        with RawClient(s) as idle:
            idle.recv(18)
            with RawClient(s) as c:
                assert c.is_closed(timeout=5)
            assert wait_until(lambda: "--max-handshakes" in s.log())
        assert wait_until(lambda: healthy(s, data))


def test_silent_clients_never_hold_every_connection_slot(repo, tmp_path, caplog):
    """By default at most half of --max-connections may be negotiating."""
    path, data = repo
    caplog.set_level(logging.INFO, logger="nbdbackup.server")
    with serve_in_process(path, tmp_path, max_clients=4) as s:
        assert s.server.max_handshakes == 2
        with RawClient(s) as connected:
            connected.greet()
            connected.go("vm1")
            silent = [RawClient(s), RawClient(s)]
            for c in silent:
                c.recv(18)
            with RawClient(s) as c:
                assert c.is_closed(timeout=5)
            assert "still in the handshake (--max-handshakes)" in caplog.text
            for c in silent:            # they leave: a negotiating client is welcome again
                c.close()
            assert wait_until(lambda: s.server.handshaking == 0)
            assert healthy(s, data)      # a fourth connection, while `connected` stays
            assert connected.read(0, 4096) == data[:4096]
