"""Options for commands that connect to an NBD server as a client: TLS and timeout."""

from __future__ import annotations

from ..errors import UsageError
from . import numbers

DEFAULT_TIMEOUT = 30.0


def add_client_arguments(p) -> None:
    g = p.add_argument_group("NBD connection")
    g.add_argument("--timeout", type=numbers.seconds(numbers.DAY, positive=True), default=DEFAULT_TIMEOUT,
                   metavar="SECONDS",
                   help=f"give up on any socket operation after SECONDS (default {DEFAULT_TIMEOUT:g})")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificate to verify the server with (nbds:// URIs)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate, for servers that ask for one")
    g.add_argument("--tls-key", metavar="PEM", help="its private key (default: inside --tls-cert)")
    g.add_argument("--tls-hostname", metavar="NAME", help="name the server certificate must carry")
    g.add_argument("--tls-no-verify", action="store_true", help="do not verify the server (testing only)")


def client_options(args, uri):
    """(TlsConfig or None, timeout) from the options; TLS options need an nbds URI."""
    from ..nbd.tls import TlsConfig

    given = args.tls_ca or args.tls_cert or args.tls_key or args.tls_hostname or args.tls_no_verify
    if args.tls_key and not args.tls_cert:
        raise UsageError("--tls-key needs --tls-cert")
    if not given:
        return None, args.timeout
    if not uri.tls:
        raise UsageError("TLS options need an nbds:// or nbds+unix:// URI")
    tls = TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                    verify_peer=not args.tls_no_verify, hostname=args.tls_hostname or uri.tls_hostname or uri.host)
    tls.context()   # load the files now: a bad path is a usage error before any connection
    return tls, args.timeout
