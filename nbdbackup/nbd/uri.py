"""NBD URIs (the NBD URI specification, as libnbd's nbd_connect_uri reads them).

    nbd://host[:port]/export          TCP, plain
    nbds://host[:port]/export         TCP, TLS required
    nbd+unix:///export?socket=PATH    Unix socket, plain
    nbds+unix:///export?socket=PATH   Unix socket, TLS required

The export name is the path without its first "/", percent-decoded.
TLS query parameters: tls-certificates=DIR (ca-cert.pem, client-cert.pem,
client-key.pem as libnbd and qemu name them), tls-verify-peer=true|false,
tls-hostname=NAME.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from ..errors import UsageError
from . import proto

SCHEMES = {
    "nbd": (False, False),
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}
# Query parameters we understand; others are refused so a typo is not ignored.
KNOWN_QUERY = {"socket", "tls-certificates", "tls-verify-peer", "tls-hostname"}


@dataclass(frozen=True)
class NbdUri:
    tls: bool
    host: str | None = None
    port: int | None = None
    socket_path: str | None = None
    export: str = ""
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_hostname: str | None = None
    query: dict = field(default_factory=dict, compare=False)

    @property
    def is_unix(self) -> bool:
        return self.socket_path is not None

    @property
    def scheme(self) -> str:
        return ("nbds" if self.tls else "nbd") + ("+unix" if self.is_unix else "")

    def with_export(self, export: str) -> "NbdUri":
        from dataclasses import replace

        return replace(self, export=export)

    def __str__(self) -> str:
        path = "/" + urllib.parse.quote(self.export, safe="/:@!$&'()*+,;=-._~")
        if self.is_unix:
            netloc = ""
        else:
            host = self.host or "localhost"
            if ":" in host:
                host = f"[{host}]"
            netloc = host if self.port in (None, proto.DEFAULT_PORT) else f"{host}:{self.port}"
        q = {}
        if self.socket_path is not None:
            q["socket"] = self.socket_path
        if self.tls_certificates:
            q["tls-certificates"] = self.tls_certificates
        if not self.tls_verify_peer:
            q["tls-verify-peer"] = "false"
        if self.tls_hostname:
            q["tls-hostname"] = self.tls_hostname
        query = urllib.parse.urlencode(q, safe="/") if q else ""
        return f"{self.scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def _bad(uri: str, why: str) -> UsageError:
    return UsageError(f"malformed NBD URI {uri!r}: {why}",
                      hint="use nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH "
                           "(nbds:// and nbds+unix:// for TLS)")


def _bool(uri: str, name: str, value: str) -> bool:
    v = value.lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise _bad(uri, f"{name} must be true or false, not {value!r}")


def parse_uri(uri: "str | NbdUri") -> NbdUri:
    """Parse an NBD URI; raise UsageError naming what is wrong."""
    if isinstance(uri, NbdUri):
        return uri
    if not isinstance(uri, str) or not uri:
        raise _bad(str(uri), "empty")
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as e:
        raise _bad(uri, str(e)) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        if scheme in ("nbd+vsock", "nbds+vsock"):
            raise _bad(uri, "vsock transport is not supported")
        raise _bad(uri, f"unknown scheme {parts.scheme!r}" if scheme else "no scheme")
    if not uri[len(parts.scheme):].startswith("://"):
        raise _bad(uri, "expected '//' after the scheme")
    if parts.fragment:
        raise _bad(uri, "fragments (#...) are not allowed")
    tls, unix = SCHEMES[scheme]

    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise _bad(uri, f"bad query string: {e}") from None
    for k, v in query.items():
        if k not in KNOWN_QUERY:
            raise _bad(uri, f"unknown query parameter {k!r}")
        if len(v) != 1:
            raise _bad(uri, f"query parameter {k!r} given more than once")
    q = {k: v[0] for k, v in query.items()}

    path = urllib.parse.unquote(parts.path, errors="strict") if parts.path else ""
    if path and not path.startswith("/"):
        raise _bad(uri, "the export name must follow a '/'")
    export = path[1:]
    if len(export.encode()) > proto.MAX_NAME_LENGTH:
        raise _bad(uri, f"export name longer than {proto.MAX_NAME_LENGTH} bytes")

    try:
        port = parts.port
    except ValueError as e:
        raise _bad(uri, f"bad port: {e}") from None
    host = parts.hostname

    socket_path = None
    if unix:
        if host or port is not None:
            raise _bad(uri, "a unix-socket URI has no host or port (use nbd+unix:///EXPORT?socket=PATH)")
        socket_path = q.get("socket")
        if not socket_path:
            raise _bad(uri, "missing ?socket=PATH")
    else:
        if "socket" in q:
            raise _bad(uri, "?socket= is only valid with nbd+unix:// or nbds+unix://")
        if parts.netloc and not host:
            raise _bad(uri, "empty host")
        host = host or "localhost"
        if port is None:
            port = proto.DEFAULT_PORT
        if port == 0:
            raise _bad(uri, "port 0")

    if not tls and any(k.startswith("tls-") for k in q):
        raise _bad(uri, "TLS parameters need a TLS scheme (nbds:// or nbds+unix://)")
    verify = _bool(uri, "tls-verify-peer", q["tls-verify-peer"]) if "tls-verify-peer" in q else True

    return NbdUri(tls=tls, host=None if unix else host, port=None if unix else port,
                  socket_path=socket_path, export=export,
                  tls_certificates=q.get("tls-certificates") or None,
                  tls_verify_peer=verify, tls_hostname=q.get("tls-hostname") or None, query=q)
