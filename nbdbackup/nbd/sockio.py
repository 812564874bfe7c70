"""Blocking socket I/O for the NBD client, with every failure made an NbdError.

Shared by the handshake (client_handshake.py) and the reply receiver
(replies.py). *sock* is a socket.socket or a tls.TlsStream; *what* names the
message being read or sent, so an error says where the stream broke.
"""

from __future__ import annotations

import socket
import ssl
import struct

from ..errors import NbdConnectionError, TruncatedReply

TIMEOUTS = (socket.timeout, BlockingIOError)   # settimeout() / kernel timeout (EAGAIN)


def use_kernel_timeouts(sock, timeout: float) -> None:
    """Make *sock* blocking with SO_RCVTIMEO/SO_SNDTIMEO set to *timeout*.

    Python's settimeout() polls before every recv/send (an extra syscall per call,
    thousands per GiB); the kernel's timeout costs nothing. A call that times out
    raises BlockingIOError (EAGAIN), which every caller here treats as a timeout.
    """
    raw = getattr(sock, "sock", sock)     # a TlsStream does its I/O on the plain socket
    if timeout is None:
        raw.settimeout(None)
        return
    t = max(float(timeout), 0.001)        # a zero timeval would mean "wait forever"
    tv = struct.pack("@ll", int(t), int((t - int(t)) * 1_000_000))
    raw.settimeout(None)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def recv_exact(sock, n: int, what: str, *, started: bool = True) -> bytes:
    """Exactly n bytes or an error naming *what* we were reading."""
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf), what, started=started)
    return bytes(buf)


def recv_some(sock, mv: memoryview, what: str, flags: int = 0) -> int:
    """One recv into *mv*; 0 at EOF. Errors and timeouts become NbdConnectionError."""
    try:
        return sock.recv_into(mv, len(mv), flags) if flags else sock.recv_into(mv, len(mv))
    except TIMEOUTS:
        raise NbdConnectionError(f"timed out reading {what} from the NBD server") from None
    except (OSError, ssl.SSLError) as e:
        raise NbdConnectionError(f"connection error while reading {what}: {e}") from None


def recv_into_exact(sock, mv: memoryview, what: str, *, started: bool = True) -> None:
    """Fill *mv*. EOF part-way is a TruncatedReply; EOF before the first byte is one too
    when *started* (the message had begun), else an NbdConnectionError."""
    got, n = 0, len(mv)
    # MSG_WAITALL: one syscall (one GIL round trip) per payload instead of one per socket-buffer's worth
    flags = socket.MSG_WAITALL if isinstance(sock, socket.socket) else 0
    while got < n:
        k = recv_some(sock, mv[got:], what, flags)
        if k == 0:
            if got or started:
                raise TruncatedReply.during(what, got, n)
            hint = ("the server may have rejected our TLS client certificate"
                    if getattr(sock, "is_tls", False) else None)
            raise NbdConnectionError(f"server closed the connection before sending {what}", hint=hint)
        got += k


def send_all(sock, data, what: str) -> None:
    try:
        sock.sendall(data)
    except TIMEOUTS:
        raise NbdConnectionError(f"timed out sending {what} to the NBD server") from None
    except (OSError, ssl.SSLError) as e:
        raise NbdConnectionError(f"connection error while sending {what}: {e}") from None
