"""TLS for the NBD client: X.509 certificates through Python's ssl module.

The connection's receiver thread reads while other threads write. OpenSSL
does not promise that one SSL object survives concurrent SSL_read and
SSL_write, so TlsStream keeps the TLS state machine in memory BIOs behind a
lock and does the (blocking) socket I/O outside it.
"""

from __future__ import annotations

import os
import ssl
import threading
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


RAW_RECV = 256 * 1024
PLAIN_SEND = 1024 * 1024


class TlsStream:
    """The subset of the socket API the client uses, over TLS, safe for one reader + many writers.

    Lock order: send lock, then TLS-state lock; the TLS-state lock is never held
    during socket I/O.
    """

    is_tls = True

    def __init__(self, sock, ctx: ssl.SSLContext, hostname: str | None):
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=False, server_hostname=hostname)
        self._state = threading.Lock()
        self._send = threading.Lock()
        self._handshake()

    def _flush(self) -> None:
        """Send what the TLS engine produced; caller holds the send lock (keeps records in order)."""
        with self._state:
            data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _feed(self) -> bool:
        data = self.sock.recv(RAW_RECV)
        if not data:
            return False
        with self._state:
            self._in.write(data)
        return True

    def _handshake(self) -> None:
        while True:
            try:
                with self._state:
                    self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                with self._send:
                    self._flush()
                if not self._feed():
                    raise ConnectionResetError("the server closed the connection during the TLS handshake")
        with self._send:
            self._flush()

    def sendall(self, data) -> None:
        mv = memoryview(data).cast("B")
        with self._send:
            for pos in range(0, len(mv), PLAIN_SEND):
                piece = mv[pos:pos + PLAIN_SEND]
                with self._state:
                    done = 0
                    while done < len(piece):
                        done += self._obj.write(piece[done:])
                    out = self._out.read()
                self.sock.sendall(out)

    def recv_into(self, buf, nbytes: int = 0) -> int:
        mv = memoryview(buf).cast("B")
        n = nbytes or len(mv)
        while True:
            got = None
            with self._state:
                try:
                    got = self._obj.read(n, mv)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:   # close_notify: orderly end
                    got = 0
                pending = self._out.pending
            if pending:   # e.g. a key update the engine must answer
                with self._send:
                    self._flush()
            if got is not None:
                return got
            if not self._feed():
                return 0

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        k = self.recv_into(buf, n)
        return bytes(buf[:k])

    def settimeout(self, t) -> None:
        self.sock.settimeout(t)

    def gettimeout(self):
        return self.sock.gettimeout()

    def shutdown(self, how) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()
