"""NBD URI parsing: the forms of the NBD URI spec, and clear errors for the rest."""

from __future__ import annotations

import pytest

from nbdbackup.errors import ExitCode, UsageError
from nbdbackup.nbd.uri import parse_uri


@pytest.mark.parametrize("text, tls, host, port, sock, export", [
    ("nbd://example.com", False, "example.com", 10809, None, ""),
    ("nbd://example.com/", False, "example.com", 10809, None, ""),
    ("nbd://example.com:1234/disk", False, "example.com", 1234, None, "disk"),
    ("nbds://example.com/disk", True, "example.com", 10809, None, "disk"),
    ("nbd://[::1]:10810/a%20b", False, "::1", 10810, None, "a b"),
    ("nbd://127.0.0.1//abs", False, "127.0.0.1", 10809, None, "/abs"),
    ("nbd+unix:///?socket=/tmp/x.sock", False, None, None, "/tmp/x.sock", ""),
    ("nbd+unix:///foo?socket=/tmp/x.sock", False, None, None, "/tmp/x.sock", "foo"),
    ("nbds+unix:///foo?socket=/tmp/x.sock&tls-certificates=/etc/pki", True, None, None, "/tmp/x.sock", "foo"),
    ("NBD://example.com/x", False, "example.com", 10809, None, "x"),
])
def test_valid(text, tls, host, port, sock, export):
    u = parse_uri(text)
    assert (u.tls, u.host, u.port, u.socket_path, u.export) == (tls, host, port, sock, export)
    assert parse_uri(str(u)) == u     # str() gives back an equivalent URI


def test_tls_query_parameters():
    u = parse_uri("nbds+unix:///e?socket=/s&tls-certificates=/c&tls-verify-peer=false&tls-hostname=h")
    assert u.tls_certificates == "/c" and u.tls_verify_peer is False and u.tls_hostname == "h"
    assert parse_uri(str(u)) == u


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("example.com:10809", "unknown scheme|no scheme"),
    ("http://example.com/", "unknown scheme 'http'"),
    ("nbd:/example.com", "expected '//'"),
    ("nbd+unix:///foo", "missing \\?socket=PATH"),
    ("nbd+unix://host/foo?socket=/s", "no host or port"),
    ("nbd://host:99999/", "bad port"),
    ("nbd://host:abc/", "bad port"),
    ("nbd://host/?socket=/s", "only valid with nbd\\+unix"),
    ("nbd://host/x?bogus=1", "unknown query parameter 'bogus'"),
    ("nbd://host/x#frag", "fragments"),
    ("nbd://host/?tls-certificates=/c", "need a TLS scheme"),
    ("nbds://host/?tls-verify-peer=maybe", "true or false"),
    ("nbd+vsock:///", "vsock"),
    ("nbd+unix:///?socket=/a&socket=/b", "more than once"),
])
def test_malformed(text, why):
    with pytest.raises(UsageError, match=why) as ei:
        parse_uri(text)
    assert ei.value.exit_code == ExitCode.USAGE
    assert "malformed NBD URI" in str(ei.value)
