"""STARTTLS with X.509: a CA made here with openssl, qemu-nbd and nbdkit as TLS servers."""

from __future__ import annotations

import subprocess

import pytest

from helpers import support
from helpers.nbd_servers import nbdkit
from helpers.support import wait_listening
from nbdbackup.errors import NbdConnectionError, NbdOptionError
from nbdbackup.nbd import proto
from nbdbackup.nbd.client import Client, TlsConfig
from nbdbackup.nbd.extents import walk_context

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("tlsimg")
    img = d / "t.raw"
    import random

    img.write_bytes(random.Random(5).randbytes(4 << 20))
    return img


def qemu_nbd_tls(image, sock, certdir, verify_peer: bool):
    exe = support.require_tool("qemu-nbd")
    cmd = [exe, "-r", "-t", "-e", "4", "-k", str(sock), "-f", "raw",
           "--object", f"tls-creds-x509,id=tls0,dir={certdir},endpoint=server,"
                       f"verify-peer={'on' if verify_peer else 'off'}",
           "--tls-creds", "tls0", str(image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(sock, proc=proc)
    except BaseException:
        support.stop(proc)
        raise
    return proc


def test_qemu_nbd_tls(tmp_path, pki, raw_image):
    srv, cli, other = pki.server, pki.client, pki.other
    data = raw_image.read_bytes()
    sock = tmp_path / "s"
    proc = qemu_nbd_tls(raw_image, sock, srv, verify_peer=False)
    try:
        uri = f"nbds+unix:///?socket={sock}&tls-certificates={cli}"
        with Client.connect(uri, meta_contexts=["base:allocation"]) as c:
            futs = [(off, c.submit_read(off, 65536)) for off in range(0, c.size, 65536)]
            for off, f in futs:    # many in flight over one TLS session
                assert f.result() == data[off:off + 65536]
            assert list(walk_context(c, "base:allocation")) == [(0, len(data), 0)]
        # explicit settings, with the host name checked
        tls = TlsConfig(ca_file=str(cli / "ca-cert.pem"), hostname="localhost")
        with Client.connect(f"nbds+unix:///?socket={sock}", tls=tls) as c:
            assert c.read(0, 4096) == data[:4096]
        info = Client.query_info(uri)
        assert info.size == len(data) and "base:allocation" in info.contexts
        # wrong name in the certificate check
        with pytest.raises(NbdConnectionError, match="certificate"):
            Client.connect(f"nbds+unix:///?socket={sock}&tls-certificates={cli}&tls-hostname=evil.example")
        # a CA that did not sign the server's certificate
        with pytest.raises(NbdConnectionError, match="certificate"):
            Client.connect(f"nbds+unix:///?socket={sock}", tls=TlsConfig(ca_file=str(other / "ca-cert.pem")))
        # plain NBD to a server that requires TLS: a clear refusal with a hint
        with pytest.raises(NbdOptionError, match="requires TLS") as ei:
            Client.connect(f"nbd+unix:///?socket={sock}")
        assert ei.value.reply_type == proto.REP_ERR_TLS_REQD and "nbds" in ei.value.hint
    finally:
        support.stop(proc)


def test_qemu_nbd_tls_client_certificate(tmp_path, pki, raw_image):
    srv, cli = pki.server, pki.client
    data = raw_image.read_bytes()
    sock = tmp_path / "s"
    proc = qemu_nbd_tls(raw_image, sock, srv, verify_peer=True)
    try:
        tls = TlsConfig(ca_file=str(cli / "ca-cert.pem"), cert_file=str(cli / "client-cert.pem"),
                        key_file=str(cli / "client-key.pem"))
        with Client.connect(f"nbds+unix:///?socket={sock}", tls=tls) as c:
            assert c.read(0, c.size) == data
        with pytest.raises(NbdConnectionError):
            c = Client.connect(f"nbds+unix:///?socket={sock}", tls=TlsConfig(ca_file=str(cli / "ca-cert.pem")),
                               timeout=5)
            try:   # TLS 1.3 may report the missing certificate only at the first read
                c.read(0, 4096)
            finally:
                c.close()
    finally:
        support.stop(proc)


def test_nbdkit_tls_require(tmp_path, pki):
    srv, cli = pki.server, pki.client
    with nbdkit(tmp_path / "s", "memory", "4M", options=("--tls=require", f"--tls-certificates={srv}")) as uri:
        tls_uri = uri.replace("nbd+unix", "nbds+unix") + f"&tls-certificates={cli}"
        with Client.connect(tls_uri, meta_contexts=["base:allocation"]) as c:
            c.write(65536, b"T" * 65536)
            c.flush()
            assert c.read(0, 3 * 65536) == bytes(65536) + b"T" * 65536 + bytes(65536)
            assert list(walk_context(c, "base:allocation"))[0] == (0, 65536, 3)
        with pytest.raises(NbdOptionError, match="requires TLS"):
            Client.connect(uri)


def test_missing_certificate_files_are_a_usage_error(tmp_path):
    from nbdbackup.errors import UsageError

    with pytest.raises(UsageError, match="cannot load TLS certificates"):
        TlsConfig(ca_file=str(tmp_path / "nope.pem")).context()
    with pytest.raises(UsageError, match="does not exist"):
        TlsConfig.from_directory(str(tmp_path / "nodir"))


def test_tls_concurrent_writers_and_reader(tmp_path, pki):
    """Several threads write while the receiver thread reads, all over one TLS session."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    srv, cli = pki.server, pki.client
    blobs = [random.Random(i).randbytes(1 << 20) for i in range(4)]
    with nbdkit(tmp_path / "s", "memory", "8M", options=("--tls=require", f"--tls-certificates={srv}")) as uri:
        with Client.connect(uri.replace("nbd+unix", "nbds+unix") + f"&tls-certificates={cli}") as c:
            def work(i):
                futs = [c.submit_write(i * (2 << 20) + off, blobs[i][off:off + 65536])
                        for off in range(0, 1 << 20, 65536)]
                reads = [c.submit_read(i * (2 << 20) + (1 << 20), 65536) for _ in range(16)]
                for f in futs:
                    f.result()
                assert all(r.result() == bytes(65536) for r in reads)
                return bytes(c.read(i * (2 << 20), 1 << 20))
            with ThreadPoolExecutor(4) as ex:
                got = list(ex.map(work, range(4)))
            assert got == blobs


@pytest.mark.parametrize("when", ["with-the-ack", "after-the-ack", "none"])
def test_plaintext_behind_the_starttls_ack_is_never_a_reply(tmp_path, pki, when):
    """The client side of CVE-2021-3716: a server (or a man in the middle) that sends
    plaintext option replies behind its STARTTLS ACK, before the TLS handshake, must
    not have them taken as replies: the handshake fails instead."""
    import ssl
    import time

    from helpers.fake_nbd_server import FakeServer

    srv_dir, cli = pki.server, pki.client
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(srv_dir / "server-cert.pem"), str(srv_dir / "server-key.pem"))
    # What a forger would want the client to believe: structured replies and a GO answered.
    forged = b"".join(proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, opt, proto.REP_ACK, 0)
                      for opt in (proto.OPT_STRUCTURED_REPLY, proto.OPT_GO))

    def handler(conn, srv):
        srv.greet(conn)
        opt, _ = srv.read_option(conn)
        assert opt == proto.OPT_STARTTLS
        ack = proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, opt, proto.REP_ACK, 0)
        if when == "with-the-ack":
            conn.sendall(ack + forged)           # one segment
        else:
            conn.sendall(ack)
            if when == "after-the-ack":
                time.sleep(0.2)
                conn.sendall(forged)
        tls = ctx.wrap_socket(conn, server_side=True)
        srv.negotiate(tls, greet=False)
        srv.wait_disc(tls)

    with FakeServer(tmp_path / "s", handler) as srv:
        uri = srv.uri.replace("nbd+unix", "nbds+unix") + f"&tls-certificates={cli}&tls-hostname=localhost"
        if when == "none":         # control: the fake TLS server itself is honest and works
            with Client.connect(uri, timeout=10) as c:
                assert c.size == srv.size
            assert srv.options_seen[0] == proto.OPT_STARTTLS and proto.OPT_GO in srv.options_seen
        else:
            with pytest.raises(NbdConnectionError, match="TLS handshake failed"):
                Client.connect(uri, timeout=10)
            assert srv.options_seen == [proto.OPT_STARTTLS]     # nothing negotiated after it
