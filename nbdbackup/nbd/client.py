"""NBD client: one connection, many requests in flight.

Threading: callers send requests under a send lock; one receiver thread per
connection reads replies and completes the matching Future (by cookie). A
protocol error or a dropped connection fails every outstanding request and
the connection stays dead (the pool reconnects). Reads land straight in a
preallocated, zero-initialised bytearray through recv_into, so holes cost
nothing.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from concurrent.futures import Future

from ..errors import (
    GreetingTimeout,
    NbdCommandError,
    NbdConnectionError,
    NbdError,
    NbdOptionError,
    TruncatedReply,
    UsageError,
)
from . import proto
from .client_handshake import ExportInfo, negotiate
from .futures import done_future, gather, then, then_map
from .inflight import InFlight, Pending
from .replies import ReplyReader
from .sockio import send_all, use_kernel_timeouts
from .tls import TlsConfig
from .uri import NbdUri, parse_uri

__all__ = ["Client", "ExportInfo", "TlsConfig", "GreetingTimeout", "TruncatedReply"]

log = logging.getLogger(__name__)

# Without negotiated block sizes (or with a huge maximum) keep payloads at the
# spec's safe default.
MAX_PAYLOAD = proto.DEFAULT_MAX_BLOCK
U32_MAX = 0xFFFFFFFF
SMALL_PAYLOAD = 64 * 1024   # copied next to the header rather than sent separately
# Requests still outstanding at close() were abandoned by their caller (an error
# or Ctrl-C): let the server answer them briefly, but don't hold the exit for them.
CLOSE_DRAIN_TIMEOUT = 0.5


class Client:
    """A connected NBD client in the transmission phase. Use Client.connect()."""

    def __init__(self, sock, info: ExportInfo, contexts: dict[str, int], uri: NbdUri, timeout: float):
        self.sock = sock
        self.info = info
        self.uri = uri
        self.contexts = dict(contexts)
        self.timeout = timeout
        self._send_lock = threading.Lock()
        self._cookies = itertools.count(1)
        self._requests = InFlight()
        self._reader = ReplyReader(sock, self._requests, structured=info.structured, contexts=contexts,
                                   timeout=timeout, size=info.size, name=str(uri))
        self._thread = threading.Thread(target=self._reader.run, name=f"nbd-recv {uri}", daemon=True)
        self._thread.start()
        self._closed = False

    # --- connecting ------------------------------------------------------------
    @classmethod
    def connect(cls, uri: "str | NbdUri", *, meta_contexts=(), tls: TlsConfig | None = None,
                timeout: float = 30.0, structured: bool = True,
                greeting_timeout: float | None = None) -> "Client":
        u = parse_uri(uri)
        neg = negotiate(u, tls, timeout, greeting_timeout, structured)
        try:
            info, contexts = neg.open_export(u, meta_contexts)
            use_kernel_timeouts(neg.sock, timeout)
        except BaseException:
            neg.sock.close()
            raise
        return cls(neg.sock, info, contexts, u, timeout)

    @classmethod
    def list_exports(cls, uri, tls: TlsConfig | None = None, timeout: float = 30.0) -> list[tuple[str, str]]:
        neg = negotiate(parse_uri(uri), tls, timeout, None, structured=False)
        try:
            out = neg.list_exports()
            neg.abort()
            return out
        finally:
            neg.sock.close()

    @classmethod
    def query_info(cls, uri, tls: TlsConfig | None = None, meta_query=None, timeout: float = 30.0) -> ExportInfo:
        """Export details and offered meta contexts without entering transmission."""
        u = parse_uri(uri)
        neg = negotiate(u, tls, timeout, None, structured=True)
        try:
            contexts: list[str] = []
            if neg.structured:
                contexts = list(neg.meta_context(proto.OPT_LIST_META_CONTEXT, u.export, list(meta_query or [])))
            info = neg.go(u.export, proto.OPT_INFO)
            if info is None:  # no NBD_OPT_INFO: enter transmission the old way and leave
                info = neg.export_name(u.export)
                send_all(neg.sock, proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_DISC, 0, 0, 0), "DISC")
            else:
                neg.abort()
            info.contexts = contexts
            return info
        finally:
            neg.sock.close()

    # --- export properties -----------------------------------------------------
    size = property(lambda self: self.info.size)
    flags = property(lambda self: self.info.flags)
    read_only = property(lambda self: self.info.read_only)
    can_multi_conn = property(lambda self: self.info.can_multi_conn)
    min_block = property(lambda self: self.info.min_block)
    preferred_block = property(lambda self: self.info.preferred_block)
    max_block = property(lambda self: self.info.max_block)
    structured = property(lambda self: self.info.structured)

    @property
    def max_payload(self) -> int:
        """Largest READ/WRITE we send: the server's maximum, capped at 32 MiB."""
        m = min(self.info.max_block, MAX_PAYLOAD)
        return max(m - m % self.min_block, self.min_block)

    @property
    def alive(self) -> bool:
        return not self._closed and self._requests.error is None

    @property
    def in_flight(self) -> int:
        return self._requests.outstanding

    def _has(self, flag: int) -> bool:
        return bool(self.info.flags & flag)

    # --- sending ---------------------------------------------------------------
    def _send(self, p: Pending, flags: int, payload=None) -> Future:
        with self._send_lock:
            if self._closed:
                raise NbdConnectionError(f"connection to {self.uri} is closed")
            err = self._requests.error
            if err is not None:
                raise type(err)(f"connection to {self.uri} is dead: {err}")
            cookie = next(self._cookies)
            p.cookie = cookie
            self._requests.add(p)
            header = proto.REQUEST.pack(proto.REQUEST_MAGIC, flags, p.cmd, cookie, p.offset, p.length)
            try:
                if payload is not None and len(payload) <= SMALL_PAYLOAD:
                    send_all(self.sock, header + bytes(payload), proto.command_name(p.cmd))   # one syscall
                else:
                    send_all(self.sock, header, proto.command_name(p.cmd))
                    if payload is not None:
                        send_all(self.sock, payload, proto.command_name(p.cmd))
            except NbdError as e:
                self._requests.fail(e)
                self._shutdown()
                raise
        return p.future

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.info.size:
            raise UsageError(f"request [{offset}, +{length}) is outside the export (size {self.info.size})")

    def _check_writable(self, what: str) -> None:
        if self.info.read_only:
            raise NbdCommandError(f"{what} refused: export {self.uri} is read-only", errno=proto.EPERM)

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        a = self.min_block
        start = offset - offset % a
        end = min(-(-(offset + length) // a) * a, self.info.size)
        return start, end

    # --- reads -----------------------------------------------------------------
    def submit_read(self, offset: int, length: int, *, df: bool = False) -> Future:
        """Future of a bytearray with the data; split at max_payload, aligned to min_block."""
        self._check_range(offset, length)
        if length == 0:
            return done_future(bytearray())
        start, end = self._aligned(offset, length)
        buf = bytearray(end - start)   # zero-initialised: hole chunks need no work
        futs = self._send_reads(start, memoryview(buf), df, zero_holes=False, result=buf)
        if start == offset and end == offset + length:
            return futs[0] if len(futs) == 1 else gather(futs, lambda: buf)
        return gather(futs, lambda: buf[offset - start:offset - start + length])

    def _send_reads(self, start: int, mv: memoryview, df: bool, *, zero_holes: bool, result) -> list[Future]:
        flags = proto.CMD_FLAG_DF if df and self._has(proto.FLAG_SEND_DF) else 0
        step = self.max_payload
        futs = []
        single = len(mv) <= step
        for pos in range(0, len(mv), step):
            n = min(step, len(mv) - pos)
            p = Pending(proto.CMD_READ, start + pos, n, buf=mv[pos:pos + n], df=bool(flags),
                        zero_holes=zero_holes, result=result if single else None)
            futs.append(self._send(p, flags))
        return futs

    def submit_read_into(self, offset: int, buf, *, df: bool = False) -> Future:
        """Read len(buf) bytes into the caller's (reusable) buffer; the future gives buf back.

        Saves allocating a new buffer per request; hole ranges are zero-filled.
        """
        mv = memoryview(buf).cast("B")
        length = len(mv)
        self._check_range(offset, length)
        if length == 0:
            return done_future(buf)
        start, end = self._aligned(offset, length)
        if (start, end) != (offset, offset + length):   # rare: read aligned, then copy
            def copy(data):
                mv[:] = data
                return buf
            return then_map(self.submit_read(offset, length, df=df), copy)
        futs = self._send_reads(offset, mv, df, zero_holes=True, result=buf)
        return futs[0] if len(futs) == 1 else gather(futs, lambda: buf)

    def read(self, offset: int, length: int, *, df: bool = False) -> bytearray:
        return self.submit_read(offset, length, df=df).result()

    # --- writes ----------------------------------------------------------------
    def submit_write(self, offset: int, data, *, fua: bool = False) -> Future:
        self._check_writable("write")
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        self._check_block_aligned(offset, len(mv), "write")
        use_fua = fua and self._has(proto.FLAG_SEND_FUA)
        flags = proto.CMD_FLAG_FUA if use_fua else 0
        futs = []
        step = self.max_payload
        for pos in range(0, len(mv), step):
            chunk = mv[pos:pos + step]
            futs.append(self._send(Pending(proto.CMD_WRITE, offset + pos, len(chunk)), flags, chunk))
        if fua and not use_fua:  # emulate FUA with a flush after the writes
            return then(futs, self.submit_flush)
        return gather(futs, lambda: None)

    def write(self, offset: int, data, fua: bool = False) -> None:
        self.submit_write(offset, data, fua=fua).result()

    def _check_block_aligned(self, offset: int, length: int, what: str) -> None:
        a = self.min_block
        if a > 1 and (offset % a or (length % a and offset + length != self.info.size)):
            raise UsageError(f"{what} [{offset}, +{length}) is not aligned to the export's "
                             f"minimum block size {a}")

    def _split_u32(self, offset: int, length: int):
        a = max(self.min_block, 4096)
        step = U32_MAX - U32_MAX % a
        for pos in range(offset, offset + length, step):
            yield pos, min(step, offset + length - pos)

    def submit_write_zeroes(self, offset: int, length: int, *, no_hole: bool = False, fast: bool = False,
                            fua: bool = False) -> Future:
        self._check_writable("write zeroes")
        self._check_range(offset, length)
        self._check_block_aligned(offset, length, "write zeroes")
        if fast and not self._has(proto.FLAG_SEND_FAST_ZERO):
            raise NbdCommandError("fast zeroing is not supported by the server", errno=proto.ENOTSUP)
        if not self._has(proto.FLAG_SEND_WRITE_ZEROES):
            return self._zero_by_writing(offset, length, fua)
        flags = (proto.CMD_FLAG_NO_HOLE if no_hole else 0) | (proto.CMD_FLAG_FAST_ZERO if fast else 0)
        use_fua = fua and self._has(proto.FLAG_SEND_FUA)
        flags |= proto.CMD_FLAG_FUA if use_fua else 0
        futs = [self._send(Pending(proto.CMD_WRITE_ZEROES, pos, n), flags)
                for pos, n in self._split_u32(offset, length)]
        if fua and not use_fua:
            return then(futs, self.submit_flush)
        return gather(futs, lambda: None)

    def _zero_by_writing(self, offset: int, length: int, fua: bool) -> Future:
        zero = bytes(min(self.max_payload, length))
        futs = []
        for pos in range(offset, offset + length, len(zero)):
            n = min(len(zero), offset + length - pos)
            futs.append(self.submit_write(pos, memoryview(zero)[:n], fua=fua))
        return gather(futs, lambda: None)

    def write_zeroes(self, offset: int, length: int, no_hole: bool = False, fast: bool = False) -> None:
        self.submit_write_zeroes(offset, length, no_hole=no_hole, fast=fast).result()

    def submit_flush(self) -> Future:
        if not self._has(proto.FLAG_SEND_FLUSH):
            return done_future()   # no write cache advertised: writes are already stable
        return self._send(Pending(proto.CMD_FLUSH, 0, 0), 0)

    def flush(self) -> None:
        self.submit_flush().result()

    def trim(self, offset: int, length: int) -> None:
        """A hint; skipped (not sent) when the server does not advertise TRIM."""
        self._check_writable("trim")
        self._check_range(offset, length)
        if not self._has(proto.FLAG_SEND_TRIM) or length == 0:
            return
        gather([self._send(Pending(proto.CMD_TRIM, pos, n), 0) for pos, n in self._split_u32(offset, length)],
                lambda: None).result()

    def cache(self, offset: int, length: int) -> None:
        """A hint; skipped when the server does not advertise CACHE."""
        self._check_range(offset, length)
        if not self._has(proto.FLAG_SEND_CACHE) or length == 0:
            return
        gather([self._send(Pending(proto.CMD_CACHE, pos, n), 0) for pos, n in self._split_u32(offset, length)],
                lambda: None).result()

    # --- block status ----------------------------------------------------------
    def submit_block_status(self, offset: int, length: int, req_one: bool = False) -> Future:
        self._check_range(offset, length)
        if not self.contexts:
            raise NbdOptionError(f"no meta context was negotiated with {self.uri}: block status unavailable")
        a = max(self.min_block, 512)
        length = min(length, U32_MAX - U32_MAX % a)
        if length == 0:
            raise UsageError("block status of an empty range")
        flags = proto.CMD_FLAG_REQ_ONE if req_one else 0
        return self._send(Pending(proto.CMD_BLOCK_STATUS, offset, length, req_one=req_one), flags)

    def block_status(self, offset: int, length: int, req_one: bool = False) -> dict[str, list[tuple[int, int]]]:
        """{context name: [(length, flags), ...]} from *offset*; may cover less than asked, never more."""
        return self.submit_block_status(offset, length, req_one).result()

    # --- closing ---------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        if self._requests.error is None:
            try:
                with self._send_lock:
                    self._reader.closing = True
                    send_all(self.sock, proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_DISC,
                                                           next(self._cookies), 0, 0), "NBD_CMD_DISC")
                self._requests.wait_idle(min(self.timeout, CLOSE_DRAIN_TIMEOUT))
                self.sock.shutdown(socket.SHUT_WR)
            except (NbdError, OSError):
                pass
        self._closed = True
        self._shutdown()
        if threading.current_thread() is not self._thread:
            self._thread.join(self.timeout)
        self.sock.close()
        self._requests.fail(NbdConnectionError(f"connection to {self.uri} was closed"))

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self._shutdown()
                self.sock.close()
            except Exception:
                pass
