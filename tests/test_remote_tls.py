"""TLS to the remote parts.

S3 over HTTPS: radosgw behind a TLS-terminating proxy (the way a deployment puts it behind
a load balancer). A certificate from a private CA is accepted through AWS_CA_BUNDLE, as boto3
users expect, and everything works through it (GETs sent directly too); a certificate nobody
vouches for is refused before anything is written, with exit 17 and a hint that names the fix.
PostgreSQL: TLS asked for in --index-url (libpq's sslmode) and not had is exit 17 with a hint
about TLS, not about the network."""

from __future__ import annotations

import os

import pytest

from helpers.ceph import FaultProxy
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
