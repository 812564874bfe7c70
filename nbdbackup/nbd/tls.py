"""TLS for the NBD client: X.509 certificates through Python's ssl module."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class TlsConfig:
    """Where the certificates are. Without ca_file the system trust store is used."""

    ca_file: str | None = None
    cert_file: str | None = None      # client certificate (optional)
    key_file: str | None = None       # its key (defaults to cert_file)
    verify_peer: bool = True
    hostname: str | None = None       # name the server certificate must carry

    @classmethod
    def from_directory(cls, path: str, *, verify_peer: bool = True, hostname: str | None = None) -> "TlsConfig":
        """The layout qemu and libnbd use: ca-cert.pem, client-cert.pem, client-key.pem."""
        if not os.path.isdir(path):
            raise UsageError(f"TLS certificate directory {path!r} does not exist")

        def opt(name):
            p = os.path.join(path, name)
            return p if os.path.exists(p) else None

        return cls(ca_file=opt("ca-cert.pem"), cert_file=opt("client-cert.pem"),
                   key_file=opt("client-key.pem"), verify_peer=verify_peer, hostname=hostname)

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.verify_peer:
                if self.ca_file:
                    ctx.load_verify_locations(cafile=self.ca_file)
                else:
                    ctx.load_default_certs()
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"cannot load TLS certificates: {e}",
                             hint="check --tls-ca / --tls-cert / --tls-key (PEM files)") from None
        return ctx


def tls_for_uri(uri, tls: TlsConfig | None) -> TlsConfig | None:
    """The TLS settings for *uri*: explicit ones win, then the URI's query, then defaults."""
    if not uri.tls:
        return None
    if tls is not None:
        if tls.hostname is None and (uri.tls_hostname or uri.host):
            from dataclasses import replace

            tls = replace(tls, hostname=uri.tls_hostname or uri.host)
        return tls
    hostname = uri.tls_hostname or uri.host
    if uri.tls_certificates:
        return TlsConfig.from_directory(uri.tls_certificates, verify_peer=uri.tls_verify_peer, hostname=hostname)
    return TlsConfig(verify_peer=uri.tls_verify_peer, hostname=hostname)
