"""TLS (X.509) on `nbdbackup serve`, checked with nbdinfo, qemu-img and qemu-nbd."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import time

import pytest

from helpers import support
from helpers.repo import repo_with_vm1
from helpers.serve import RawClient, serve, wait_until
from nbdbackup.nbd import proto


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-tls")
    repo_with_vm1(d, 1536 * 1024, 5)
    return d / "repo", d / "vm1.raw"


def _tls_args(d, with_ca: bool):
    args = ["--tls-cert", str(d / "server-cert.pem"), "--tls-key", str(d / "server-key.pem")]
    return args + (["--tls-ca", str(d / "ca-cert.pem")] if with_ca else [])


def test_tls_required_and_working(pki, repo, tmp_path):
    d, client_dir = pki.server, pki.client
    path, raw = repo
    nbdinfo = support.require_tool("nbdinfo")
    qemu_img = support.require_tool("qemu-img")
    qemu_nbd = support.require_tool("qemu-nbd")
    with serve(path, tmp_path, *_tls_args(d, with_ca=False)) as s:
        # Plain clients are refused with TLS_REQD, for everything but STARTTLS/ABORT.
        assert subprocess.run([nbdinfo, s.uri("vm1")], capture_output=True).returncode != 0
        with RawClient(s) as c:
            c.greet()
            assert c.option(proto.OPT_LIST)[-1][0] == proto.REP_ERR_TLS_REQD
            assert c.option(proto.OPT_STRUCTURED_REPLY)[-1][0] == proto.REP_ERR_TLS_REQD
            n = b"vm1"
            go = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
            assert c.option(proto.OPT_GO, go)[-1][0] == proto.REP_ERR_TLS_REQD
            assert c.option(proto.OPT_STARTTLS, b"x")[-1][0] == proto.REP_ERR_INVALID
            assert c.option(proto.OPT_ABORT)[-1][0] == proto.REP_ACK
        # nbdinfo over TLS
        uri = f"nbds+unix:///vm1?socket={s.sock}&tls-certificates={client_dir}"
        info = json.loads(support.run([nbdinfo, "--json", uri]).stdout)
        assert info["protocol"] == "newstyle-fixed" and info["TLS"] is True
        assert info["exports"][0]["export-size"] == raw.stat().st_size
        # qemu-img through tls-creds-x509
        out = tmp_path / "out.raw"
        obj = f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client"
        support.run([qemu_img, "convert", "--object", obj, "--image-opts",
                     f"driver=nbd,server.type=unix,server.path={s.sock},export=vm1,tls-creds=tls0,tls-hostname=localhost",
                     "-O", "raw", str(out)])
        assert out.read_bytes()[:raw.stat().st_size] == raw.read_bytes()
        # qemu-nbd --list
        p = support.run([qemu_nbd, "--list", "-k", s.sock, "--object", obj, 
                         "--tls-creds", "tls0", "--tls-hostname", "localhost"])
        assert "vm1" in p.stdout


def test_tls_client_certificates(pki, repo, tmp_path):
    d, client_dir, ca_only = pki.server, pki.client, pki.ca_only
    path, raw = repo
    nbdinfo = support.require_tool("nbdinfo")
    with serve(path, tmp_path, *_tls_args(d, with_ca=True)) as s:
        ok = support.run([nbdinfo, "--size", f"nbds+unix:///vm1?socket={s.sock}&tls-certificates={client_dir}"])
        assert int(ok.stdout) == raw.stat().st_size
        # no client certificate: refused
        p = subprocess.run([nbdinfo, "--size", f"nbds+unix:///vm1?socket={s.sock}&tls-certificates={ca_only}"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0
        assert s.alive()


def _tls_session(c: RawClient, client_dir):
    """Upgrade RawClient *c* (after the STARTTLS ACK) to TLS, trusting the test CA."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(client_dir / "ca-cert.pem"))
    c.s = ctx.wrap_socket(c.s, server_hostname="localhost")
    return c


def test_starttls_plaintext_injection_closes_the_connection(pki, repo, tmp_path):
    """CVE-2021-3716 (nbdkit): options sent in plaintext right behind STARTTLS, in the same
    segment, must never be executed inside the TLS session. We close the connection."""
    d, client_dir = pki.server, pki.client
    path, _ = repo
    starttls = proto.OPTION_REQUEST.pack(proto.IHAVEOPT, proto.OPT_STARTTLS, 0)
    injected = proto.OPTION_REQUEST.pack(proto.IHAVEOPT, proto.OPT_STRUCTURED_REPLY, 0)
    port = support.free_port()
    with serve(path, tmp_path, *_tls_args(d, with_ca=False), port=port) as s:
        assert "TLS without --tls-ca" in s.log()        # TCP, no client certificates: said at start
        # Control: STARTTLS alone is accepted and the session works.
        with RawClient(s) as c:
            c.greet()
            assert c.option(proto.OPT_STARTTLS) == [(proto.REP_ACK, b"")]
            _tls_session(c, client_dir)
            assert c.option(proto.OPT_STRUCTURED_REPLY)[-1][0] == proto.REP_ACK
            c.go("vm1", structured=False)
            assert len(c.read(0, 4096)) == 4096
        # STARTTLS + STRUCTURED_REPLY (or GO) in one segment: no ACK, the connection is closed.
        go = struct.pack(">I", 3) + b"vm1" + struct.pack(">H", 0)
        for queued in (injected, proto.OPTION_REQUEST.pack(proto.IHAVEOPT, proto.OPT_GO, len(go)) + go):
            with RawClient(s) as c:
                c.greet()
                c.s.sendall(starttls + queued)
                assert c.is_closed(), "the server answered STARTTLS with plaintext data queued behind it"
        assert wait_until(lambda: "plaintext data after STARTTLS" in s.log())
        # Plaintext arriving after STARTTLS but before our ACK is read goes to the TLS
        # layer (the server stopped reading plaintext), where it breaks the handshake.
        with RawClient(s) as c:
            c.greet()
            c.s.sendall(starttls)
            time.sleep(0.3)
            c.s.sendall(injected)
            replies = []
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    replies.append(proto.OPTION_REPLY.unpack(c.recv(20)))
            assert [r[2] for r in replies] == [proto.REP_ACK]     # only the STARTTLS ACK, in plaintext
        assert s.alive()
