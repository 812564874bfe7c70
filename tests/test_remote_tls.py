"""TLS to the remote parts.

S3 over HTTPS: radosgw behind a TLS-terminating proxy (the way a deployment puts it behind
a load balancer). A certificate from a private CA is accepted through AWS_CA_BUNDLE, as boto3
users expect, and everything works through it (GETs sent directly too); a certificate nobody
vouches for is refused before anything is written, with exit 17 and a hint that names the fix.
PostgreSQL: TLS asked for in --index-url (libpq's sslmode) and not had is exit 17 with a hint
about TLS, not about the network; a server that takes only TLS, verified against a private CA
(sslmode=verify-full, sslrootcert), serves every command, and one from another CA is refused."""

from __future__ import annotations

import os
import time

import pytest

from helpers.ceph import FaultProxy
from helpers.pg import running_pg_server
from helpers.places import make_place
from helpers.support import nbdbackup

pytestmark = pytest.mark.slow


@pytest.fixture
def https_place(request, tmp_path, ceph_s3, pki, monkeypatch):
    place = make_place(request, "s3+pg", tmp_path)
    proxy = FaultProxy(ceph_s3.rgw_port, tls=(str(pki.server / "server-cert.pem"),
                                              str(pki.server / "server-key.pem")))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    place.env["AWS_ENDPOINT_URL"] = proxy.endpoint
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    try:
        yield place, proxy
    finally:
        proxy.close()


def test_private_ca_through_aws_ca_bundle(https_place, tmp_path, pki, ceph_s3, s3_bucket):
    place, proxy = https_place
    env = {"AWS_CA_BUNDLE": str(pki.ca_only / "ca-cert.pem")}
    nbdbackup("--repo", place, "init", env=env)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(3 << 20) + b"text " * (300 << 10) + bytes(2 << 20))
    nbdbackup("--repo", place, "full", "--image", disk, "--format", "raw", "--disk", "d", env=env)
    nbdbackup("--repo", place, "verify", env=env)
    out = tmp_path / "out.raw"
    nbdbackup("--repo", place, "restore", "d", out, env=env)
    assert out.read_bytes() == disk.read_bytes()
    assert proxy.connections > 0
    names = [o["Key"] for o in ceph_s3.client().list_objects_v2(Bucket=s3_bucket).get("Contents", ())]
    assert "config.json" in names and any(n.startswith("packs/") for n in names)


@pytest.mark.parametrize("bundle", [None, "other"])
def test_untrusted_certificate_refused_with_a_hint(https_place, pki, ceph_s3, s3_bucket, bundle):
    place, proxy = https_place
    env = {"AWS_CA_BUNDLE": str(pki.other / "ca-cert.pem")} if bundle else {}
    p = nbdbackup("--repo", place, "init", env=env, check=False)
    assert p.returncode == 17, p.stderr
    assert "Traceback" not in p.stderr
    assert "TLS: the certificate of S3 at https://127.0.0.1" in p.stderr, p.stderr
    assert "certificate verify failed" in p.stderr and "AWS_CA_BUNDLE" in p.stderr, p.stderr
    assert ceph_s3.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in p.stderr + p.stdout


def test_index_tls_required_but_not_offered(tmp_path, pg_url):
    p = nbdbackup("--repo", tmp_path / "repo", "--index-url", pg_url + "?sslmode=require", "init", check=False)
    assert p.returncode == 17, p.stderr
    assert "Traceback" not in p.stderr
    assert "TLS with the index database at 127.0.0.1:" in p.stderr, p.stderr
    assert "server does not support SSL" in p.stderr and "sslmode" in p.stderr, p.stderr
    assert not (tmp_path / "repo" / "config.json").exists()


@pytest.mark.parametrize("message, kind", [
    ("server does not support SSL, but SSL was required", "tls"),
    ("SSL error: certificate verify failed", "tls"),
    ('root certificate file "/etc/nbdbackup/db-ca.pem" does not exist', "tls"),
    ('pg_hba.conf rejects connection for host "10.0.0.2", user "nbd", database "idx", no encryption', "tls"),
    ('no pg_hba.conf entry for host "10.0.0.2", user "nbd", database "idx", no encryption', "tls"),
    ('no pg_hba.conf entry for host "10.0.0.2", user "nbd", database "idx", SSL encryption', "credentials"),
    ("SSL SYSCALL error: EOF detected", "unreachable"),              # a TLS connection lost: retried
    ('connection to server at "pg-ssl.example" (10.0.0.9), port 5432 failed: Connection refused', "unreachable"),
])
def test_libpq_tls_words_are_told_from_a_lost_connection(message, kind):
    """libpq gives connection failures no SQLSTATE: its words decide. TLS refused is not retried
    and gets the TLS hint; a connection lost mid-TLS, or a host whose name holds "ssl", is the
    network's (retried, with the network's hint)."""
    import psycopg

    from nbdbackup.repo.indexerrors import index_error, pg_failure
    from nbdbackup.repo.indexretry import connection_lost

    e = psycopg.OperationalError(message)
    assert pg_failure(e) == kind
    assert connection_lost(e) == (kind == "unreachable")
    err = index_error(e, "connecting to the index", path=None, where="db.example:5432")
    assert err.exit_code == (16 if kind == "credentials" else 17)
    assert ("sslmode" in err.hint) == (kind == "tls"), err.hint


@pytest.fixture(scope="module")
def tls_pg(pki):
    """A PostgreSQL of its own that takes TCP connections over TLS only (the session's has none)."""
    import psycopg

    with running_pg_server() as server:
        server.enable_tls(pki.server / "server-cert.pem", pki.server / "server-key.pem")
        deadline = time.monotonic() + 15          # pg_reload_conf() only signals the postmaster
        while True:
            try:
                psycopg.connect(host="127.0.0.1", port=server.port, user="test", password="testpass",
                                dbname="test", sslmode="require").close()
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "the server did not take TLS after its reload"
                time.sleep(0.1)
        yield server


def _tls_url(server, name: str, ca) -> str:
    return server.db_url(name) + f"?sslmode=verify-full&sslrootcert={ca / 'ca-cert.pem'}"


def test_index_over_verified_tls_serves_every_command(tmp_path, tls_pg, pki):
    name = tls_pg.create_database()
    # the server refuses TCP without TLS: everything below went over TLS
    p = nbdbackup("--repo", tmp_path / "probe", "--index-url", tls_pg.db_url(name) + "?sslmode=disable", "init",
                  check=False)
    assert p.returncode == 17 and "Traceback" not in p.stderr and "no encryption" in p.stderr, p.stderr
    assert "TLS with the index database" in p.stderr and "sslmode=require" in p.stderr, p.stderr
    url = _tls_url(tls_pg, name, pki.ca_only)
    repo = tmp_path / "repo"
    outputs = [nbdbackup("--repo", repo, "--index-url", url, "init")]
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(2 << 20) + b"text " * (200 << 10) + bytes(1 << 20))
    outputs.append(nbdbackup("--repo", repo, "--index-url", url, "full", "--image", disk, "--format", "raw",
                             "--disk", "d"))
    outputs.append(nbdbackup("--repo", repo, "--index-url", url, "verify"))
    out = tmp_path / "out.raw"
    outputs.append(nbdbackup("--repo", repo, "--index-url", url, "restore", "d", out))
    assert out.read_bytes() == disk.read_bytes()
    listed = nbdbackup("--repo", repo, "--index-url", url, "--json", "list")
    assert '"d"' in listed.stdout
    assert not any("testpass" in o.stdout + o.stderr for o in [*outputs, listed])


def test_index_certificate_of_another_ca_refused_with_a_hint(tmp_path, tls_pg, pki):
    name = tls_pg.create_database()
    p = nbdbackup("--repo", tmp_path / "repo", "--index-url", _tls_url(tls_pg, name, pki.other), "init",
                  check=False)
    assert p.returncode == 17, p.stderr
    assert "Traceback" not in p.stderr and "testpass" not in p.stderr
    assert "certificate verify failed" in p.stderr and "sslrootcert" in p.stderr, p.stderr
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
