"""X.509 test certificates, made with openssl (conftest's session_pki fixture makes one set)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from helpers import support


def _openssl(*args, cwd):
    support.run([support.require_tool("openssl"), *args], cwd=cwd)


def make_pki(d: Path) -> Path:
    """In *d*: a CA, a server certificate for localhost and a client certificate, with qemu's
    file names (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem)."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
             "-subj", "/CN=nbdbackup test CA", cwd=d)
    for who, usage, san in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                            ("client", "clientAuth", "DNS:client")):
        (d / f"{who}.ext").write_text(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                      f"extendedKeyUsage={usage}\nsubjectAltName={san}\n")
        _openssl("req", *ec, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj",
                 f"/CN={'localhost' if who == 'server' else 'client'}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    return d


def _copy(src: Path, dst: Path, *names: str) -> Path:
    dst.mkdir()
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


@dataclass(frozen=True)
class Pki:
    """server: everything make_pki() makes (what a server is given); client: the CA and the
    client's certificate and key only (the directory layout qemu and libnbd read); ca_only:
    just the CA certificate; other: a second, unrelated CA with its own certificates."""
    server: Path
    client: Path
    ca_only: Path
    other: Path


def make_test_pki(base: Path) -> Pki:
    server = make_pki(base / "server")
    return Pki(server=server,
               client=_copy(server, base / "client", "ca-cert.pem", "client-cert.pem", "client-key.pem"),
               ca_only=_copy(server, base / "ca-only", "ca-cert.pem"),
               other=make_pki(base / "other"))
