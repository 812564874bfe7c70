"""Start-up and shutdown of `nbdbackup serve`: signals, sockets, listen addresses."""

from __future__ import annotations

import os
import signal
import socket
import struct

import pytest

from helpers import support
from helpers.repo import repo_with_vm1
from helpers.serve import RawClient, serve, wait_until
from nbdbackup.nbd import proto
from nbdbackup.nbd.server import ListenAddress


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-life")
    repo_with_vm1(d, 1024 * 1024, 3)
    return d / "repo", d / "vm1.raw"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(repo, tmp_path, sig):
    path, raw = repo
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    with serve(path, tmp_path, "--writable", env={"TMPDIR": str(tmpdir)}) as s:
        c = RawClient(s)
        c.greet()
        c.go("vm1")
        c.request(1, 0, 4096, payload=b"w" * 4096)         # the overlay now holds data
        assert len(os.listdir(tmpdir)) == 1                 # the default overlay dir is a temp dir
        idle = RawClient(s)                                 # one still negotiating
        idle.greet()
        s.proc.send_signal(sig)
        assert s.proc.wait(15) == 0
        assert c.is_closed() and idle.is_closed()
        c.close()
        idle.close()
        assert "stopping" in s.log()
        assert "chunk cache: " in s.log() and "lookups hit" in s.log()    # what --cache-size did
    assert os.listdir(tmpdir) == []                          # overlays dropped
    assert not os.path.exists(s.sock)


def test_stale_socket_is_replaced(repo, tmp_path):
    path, raw = repo
    sock = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock)          # a socket file nobody listens on, as after a crash
    dead.close()
    assert os.path.exists(sock)
    qemu_img = support.require_tool("qemu-img")
    with serve(path, tmp_path, sock=sock) as s:
        support.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(raw), s.uri("vm1")])


def test_live_socket_is_not_hijacked(repo, tmp_path):
    path, raw = repo
    qemu_img = support.require_tool("qemu-img")
    with serve(path, tmp_path) as s:
        p = support.nbdbackup("serve", "--repo", path, "--listen", f"unix:{s.sock}", check=False, timeout=30)
        assert p.returncode == 3, p.stderr
        assert "another server is listening" in p.stderr and "Traceback" not in p.stderr
        support.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(raw), s.uri("vm1")])
    notsock = tmp_path / "file.sock"
    notsock.write_text("precious")
    p = support.nbdbackup("serve", "--repo", path, "--listen", f"unix:{notsock}", check=False, timeout=30)
    assert p.returncode == 2 and "not a socket" in p.stderr
    assert notsock.read_text() == "precious"


def test_tcp_listen_and_banner(repo, tmp_path):
    path, raw = repo
    qemu_img = support.require_tool("qemu-img")
    port = support.free_port()
    with serve(path, tmp_path, "--insecure-tcp", port=port) as s:
        support.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(raw), s.uri("vm1")])
        log = s.log()
        assert f"listening on 127.0.0.1:{port}" in log
        assert "vm1" in log and "qemu-system-x86_64" in log and f"nbd://127.0.0.1:{port}/" in log


def test_json_start_report(repo, tmp_path):
    path, _ = repo
    with serve(path, tmp_path, "--json") as s:
        doc = s.json_report()
        assert doc["listen"] == f"unix:{s.sock}" and doc["writable"] is False and doc["tls"] is False
        assert {e["name"] for e in doc["exports"]} >= {"vm1"}


def test_listen_address_parsing():
    assert ListenAddress.parse("127.0.0.1:10809") == ListenAddress(host="127.0.0.1", port=10809)
    assert ListenAddress.parse("[::1]:10809") == ListenAddress(host="::1", port=10809)
    assert ListenAddress.parse("unix:/run/x.sock") == ListenAddress(unix="/run/x.sock")


def test_bad_options_are_usage_errors(repo, tmp_path):
    path, _ = repo
    for args in (["--listen", "nonsense"], ["--listen", "1.2.3.4:99999"], ["--tls-key", "k.pem"],
                 ["--tls-cert", str(tmp_path / "missing.pem")], ["--cache-size", "lots"]):
        p = support.nbdbackup("serve", "--repo", path, *args, check=False, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr
    p = support.nbdbackup("serve", "--repo", tmp_path / "nope", "--listen", f"unix:{tmp_path}/x.sock",
                          check=False, timeout=30)
    assert p.returncode == 6, p.stderr


def test_sigterm_finishes_in_flight_requests(repo, tmp_path):
    """Replies already started are completed: a client sees whole replies, then EOF."""
    path, raw = repo
    data = raw.read_bytes()
    with serve(path, tmp_path, "--cache-size", "0") as s:     # every read goes to the chunk pool
        c = RawClient(s)
        c.greet()
        c.go("vm1")
        cookies = [c.send(0, (k * 65536) % (len(data) - 65536), 65536) for k in range(48)]
        s.proc.send_signal(signal.SIGTERM)
        got = 0
        c.s.settimeout(20)
        while True:
            first = c.s.recv(1)
            if not first:
                break                                  # EOF between replies: fine
            c.s.settimeout(5)
            rest = c.recv(3)
            assert proto.U32.unpack(first + rest)[0] == proto.STRUCTURED_REPLY_MAGIC
            flags, typ, ck, ln = struct.unpack(">HHQI", c.recv(16))
            body = c.recv(ln)                          # a truncated reply raises here
            assert ck in cookies
            if typ == proto.REPLY_TYPE_OFFSET_DATA:
                off = proto.U64.unpack_from(body)[0]
                assert body[8:] == data[off:off + ln - 8]
                got += 1
        c.close()
        assert s.proc.wait(20) == 0
    assert got >= 1


def test_max_connections(repo, tmp_path):
    path, raw = repo
    with serve(path, tmp_path, "--max-connections", "2", "--max-handshakes", "2") as s:   # two may negotiate
        a, b = RawClient(s), RawClient(s)
        a.greet()
        b.greet()
        with RawClient(s) as c:
            assert c.is_closed()                       # turned away, no greeting
        a.close()
        assert wait_until(lambda: "refused" in s.log())
        def fresh_ok():
            with RawClient(s) as d:
                try:
                    d.greet()
                    d.go("vm1")
                    return d.read(0, 10) == raw.read_bytes()[:10]
                except (ConnectionError, AssertionError, OSError):
                    return False
        assert wait_until(fresh_ok)
        b.close()
