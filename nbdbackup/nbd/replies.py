"""Client side of the transmission phase: reading and checking replies.

One ReplyReader per connection runs in its own thread. It matches each reply
to its request by cookie (in the connection's inflight.InFlight) and checks everything a server could get wrong
(magic, chunk type, chunk range, overlap, coverage, DF, context ids). The
first violation fails every outstanding request with an NbdProtocolError that
says what the server did, and ends the connection.

Byte layouts: proto.py's "Transmission" tables. A reply starts with a u32 magic
that says which of the two headers follows: the simple reply (magic, u32 error,
u64 cookie; 16 bytes) or a structured chunk (magic, u16 flags, u16 type, u64
cookie, u32 payload length; 20 bytes).
"""

from __future__ import annotations

import array
import socket
import ssl
import sys

from ..errors import NbdCommandError, NbdConnectionError, NbdError, NbdProtocolError, TruncatedReply
from . import proto
from .inflight import InFlight, Pending
from .sockio import TIMEOUTS, recv_into_exact, recv_some

# A block-status chunk bigger than this is not believable (qemu caps at 128Ki extents).
MAX_BLOCK_STATUS_CHUNK = 4 + 8 * (1 << 20)
MAX_ERROR_CHUNK = 64 * 1024
READ_AHEAD = 64     # bytes a header read may take at once (a structured header + offset is 28)


class ReplyReader:
    """Reads the replies of one connection and finishes the matching requests of *requests*."""

    def __init__(self, sock, requests: InFlight, *, structured: bool, contexts: dict[str, int], timeout: float,
                 size: int, name: str):
        self.sock = sock
        self.requests = requests
        self.structured = structured
        self.context_names = {cid: n for n, cid in contexts.items()}
        self.timeout = timeout
        self.size = size
        self.name = name
        self.closing = False
        self._ahead = bytearray(READ_AHEAD)
        self._ahead_pos = 0         # unread bytes are _ahead[_ahead_pos:_ahead_end]
        self._ahead_end = 0

    # --- the receive loop ------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                if not self._wait_for_header():
                    return
                self._one_reply()
        except NbdError as e:
            self.requests.fail(e)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            self.requests.fail(NbdConnectionError(f"NBD receiver failed: {type(e).__name__}: {e}"))
        finally:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # Headers are read through a small read-ahead buffer: one recv usually brings a
    # reply's whole header (and the first bytes of its data), where reading it field
    # by field cost three syscalls, each a GIL release and re-acquire, per reply.

    def _wait_for_header(self) -> bool:
        """Block until a reply starts; False on an orderly end (EOF with nothing pending)."""
        while self._ahead_end - self._ahead_pos < 4:
            mv = self._ahead_room()
            try:
                k = self.sock.recv_into(mv, len(mv))
            except TIMEOUTS:
                if self.requests.outstanding:
                    raise NbdConnectionError(f"{self.name}: no reply within {self.timeout:g}s "
                                             f"({self.requests.outstanding} requests outstanding)") from None
                continue
            except (OSError, ssl.SSLError) as e:
                if self.closing or self.requests.error is not None:
                    self.requests.fail(NbdConnectionError(f"connection to {self.name} was closed"))
                    return False
                raise NbdConnectionError(f"connection to {self.name} failed: {e}") from None
            if k == 0:
                if self._ahead_end > self._ahead_pos:
                    raise TruncatedReply.during("a reply header", self._ahead_end - self._ahead_pos, 4)
                if self.requests.outstanding:
                    raise NbdConnectionError(f"{self.name} closed the connection with "
                                             f"{self.requests.outstanding} requests outstanding")
                self.requests.fail(NbdConnectionError(f"{self.name} closed the connection"))
                return False
            self._ahead_end += k
        return True

    def _ahead_room(self) -> memoryview:
        """The free tail of the read-ahead buffer (unread bytes moved to its start first)."""
        pos, end = self._ahead_pos, self._ahead_end
        if pos:
            self._ahead[:end - pos] = self._ahead[pos:end]
            self._ahead_pos, self._ahead_end = 0, end - pos
        return memoryview(self._ahead)[self._ahead_end:]

    def _recv(self, n: int, what: str) -> bytes | memoryview:
        """The next *n* bytes of the stream."""
        if n > READ_AHEAD:
            mv = memoryview(bytearray(n))
            self._recv_into(mv, what)
            return mv
        while self._ahead_end - self._ahead_pos < n:
            mv = self._ahead_room()
            got = self._ahead_end - self._ahead_pos
            k = recv_some(self.sock, mv, what)
            if k == 0:
                raise TruncatedReply.during(what, got, n)
            self._ahead_end += k
        pos = self._ahead_pos
        self._ahead_pos = pos + n
        return bytes(self._ahead[pos:pos + n])

    def _recv_into(self, mv: memoryview, what: str) -> None:
        """Fill *mv* with the next bytes of the stream (read-ahead bytes first)."""
        k = min(len(mv), self._ahead_end - self._ahead_pos)
        if k:
            pos = self._ahead_pos
            mv[:k] = self._ahead[pos:pos + k]
            self._ahead_pos = pos + k
        if k < len(mv):
            recv_into_exact(self.sock, mv[k:], what)

    def _one_reply(self) -> None:
        (magic,) = proto.U32.unpack(self._recv(4, "a reply header"))
        if magic == proto.SIMPLE_REPLY_MAGIC:
            self._simple_reply()
        elif magic == proto.STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                raise NbdProtocolError(f"{self.name} sent a structured reply, but structured replies "
                                       "were not negotiated")
            self._structured_chunk()
        else:
            raise NbdProtocolError(f"{self.name} sent a reply with bad magic {magic:#010x}")

    def _lookup(self, cookie: int, kind: str) -> Pending:
        p = self.requests.get(cookie)
        if p is None:
            raise NbdProtocolError(f"{self.name} sent a {kind} with cookie {cookie:#x}, "
                                   "which matches no outstanding request (wrong cookie)")
        return p

    def _simple_reply(self) -> None:
        """After the magic: u32 error | u64 cookie; a READ's data follows when error is 0."""
        rest = self._recv(12, "a simple reply")
        err, cookie = proto.U32.unpack_from(rest)[0], proto.U64.unpack_from(rest, 4)[0]
        p = self._lookup(cookie, "simple reply")
        if err:
            self.requests.finish(p, exc=NbdCommandError(f"{p.what} failed on the server: {proto.errno_name(err)}",
                                                errno=err, **p.request_fields()))
            return
        if p.cmd == proto.CMD_BLOCK_STATUS:
            raise NbdProtocolError(f"{self.name} answered {p.what} with a simple reply without error")
        if p.cmd == proto.CMD_READ:
            # Structured servers must not do this, but the payload length is unambiguous.
            self._recv_into(p.buf, f"the data of {p.what}")
            self.requests.finish(p, p.result)
            return
        self.requests.finish(p, None)

    def _structured_chunk(self) -> None:
        """After the magic: u16 flags | u16 type | u64 cookie | u32 length, then the payload."""
        rest = self._recv(16, "a structured reply header")
        flags, rtype = proto.U16.unpack_from(rest)[0], proto.U16.unpack_from(rest, 2)[0]
        cookie, length = proto.U64.unpack_from(rest, 4)[0], proto.U32.unpack_from(rest, 12)[0]
        p = self._lookup(cookie, f"structured reply chunk (type {rtype})")
        done = bool(flags & proto.REPLY_FLAG_DONE)
        if rtype == proto.REPLY_TYPE_NONE:
            if length:
                raise NbdProtocolError(f"{self.name}: NBD_REPLY_TYPE_NONE with {length} bytes of payload")
            if not done:
                raise NbdProtocolError(f"{self.name}: NBD_REPLY_TYPE_NONE without the DONE flag")
        elif rtype == proto.REPLY_TYPE_OFFSET_DATA:
            self._offset_data(p, length)
        elif rtype == proto.REPLY_TYPE_OFFSET_HOLE:
            self._offset_hole(p, length)
        elif rtype == proto.REPLY_TYPE_BLOCK_STATUS:
            self._block_status(p, length)
        elif rtype & proto.REPLY_TYPE_ERROR_BIT:
            self._error_chunk(p, rtype, length)
        else:
            raise NbdProtocolError(f"{self.name} sent unknown structured reply chunk type {rtype} "
                                   f"for {p.what}")
        if done:
            self._complete(p)

    def _check_content(self, p: Pending, kind: str, off: int, n: int) -> None:
        if p.cmd != proto.CMD_READ:
            raise NbdProtocolError(f"{self.name} sent {kind} in reply to {p.what}")
        if n == 0:
            raise NbdProtocolError(f"{self.name} sent an empty {kind} chunk for {p.what}")
        if off < p.offset or off + n > p.offset + p.length:
            raise NbdProtocolError(f"{self.name} sent a {kind} chunk [{off}, +{n}] outside its "
                                   f"request {p.what}")
        p.content_chunks += 1
        if p.df and p.content_chunks > 1:
            raise NbdProtocolError(f"{self.name} sent more than one content chunk for {p.what} "
                                   "although it asked for no fragmentation (DF)")
        p.ranges.append((off, n))

    def _offset_data(self, p: Pending, length: int) -> None:
        """NBD_REPLY_TYPE_OFFSET_DATA: u64 offset | length - 8 bytes of data."""
        if length < 9:
            raise NbdProtocolError(f"{self.name}: NBD_REPLY_TYPE_OFFSET_DATA of {length} bytes is too short")
        (off,) = proto.U64.unpack(self._recv(8, "an OFFSET_DATA chunk"))
        n = length - 8
        self._check_content(p, "OFFSET_DATA", off, n)
        start = off - p.offset
        self._recv_into(p.buf[start:start + n], f"the data of {p.what}")

    def _offset_hole(self, p: Pending, length: int) -> None:
        """NBD_REPLY_TYPE_OFFSET_HOLE: u64 offset | u32 hole length (12 bytes)."""
        if length != proto.OFFSET_HOLE_STRUCT.size:
            raise NbdProtocolError(f"{self.name}: NBD_REPLY_TYPE_OFFSET_HOLE of {length} bytes (expected 12)")
        off, n = proto.OFFSET_HOLE_STRUCT.unpack(self._recv(12, "an OFFSET_HOLE chunk"))
        self._check_content(p, "OFFSET_HOLE", off, n)
        if p.zero_holes:   # a caller's reused buffer; a fresh one is already zero
            start = off - p.offset
            zero = _zeroes(n)
            for pos in range(0, n, len(zero)):
                k = min(len(zero), n - pos)
                p.buf[start + pos:start + pos + k] = zero[:k]

    def _block_status(self, p: Pending, length: int) -> None:
        """NBD_REPLY_TYPE_BLOCK_STATUS: u32 context id | (length - 4) / 8 x (u32 extent length,
        u32 flags); the extents run on from the request's offset."""
        if p.cmd != proto.CMD_BLOCK_STATUS:
            raise NbdProtocolError(f"{self.name} sent block status in reply to {p.what}")
        if length < 12 or (length - 4) % 8 or length > MAX_BLOCK_STATUS_CHUNK:
            raise NbdProtocolError(f"{self.name}: block status chunk of {length} bytes is malformed")
        data = self._recv(length, "a block status chunk")
        (cid,) = proto.U32.unpack_from(data)
        name = self.context_names.get(cid)
        if name is None:
            raise NbdProtocolError(f"{self.name} sent block status for context id {cid}, which was not negotiated")
        if name in p.extents:
            raise NbdProtocolError(f"{self.name} sent two block status chunks for {name} in one reply")
        n = (length - 4) // 8
        if p.req_one and n != 1:
            raise NbdProtocolError(f"{self.name} sent {n} extents for {name} although REQ_ONE asked for one")
        raw = memoryview(data)[4:].cast("B")
        vals = _unpack_extents(raw)
        extents: list[tuple[int, int]] = []
        end = p.offset + p.length
        pos = p.offset
        for i in range(n):
            elen, eflags = vals[2 * i], vals[2 * i + 1]
            if elen == 0:
                raise NbdProtocolError(f"{self.name} sent a zero-length extent for {name}")
            if pos >= end:
                raise NbdProtocolError(f"{self.name} sent extents for {name} past the end of the request "
                                       f"{p.what}")
            elen = min(elen, end - pos)   # the last extent may run past the request: clip it
            extents.append((elen, eflags))
            pos += elen
        p.extents[name] = extents

    def _error_chunk(self, p: Pending, rtype: int, length: int) -> None:
        """NBD_REPLY_TYPE_ERROR: u32 errno | u16 m | m bytes UTF-8 message;
        NBD_REPLY_TYPE_ERROR_OFFSET: the same, then u64 offset (inside the request)."""
        if length < 6 or length > MAX_ERROR_CHUNK:
            raise NbdProtocolError(f"{self.name}: error chunk of {length} bytes is malformed")
        data = self._recv(length, "an error chunk")
        err, mlen = proto.ERROR_STRUCT.unpack_from(data)
        if err == 0:
            raise NbdProtocolError(f"{self.name} sent an error chunk with errno 0 for {p.what}")
        if 6 + mlen > length:
            raise NbdProtocolError(f"{self.name}: error chunk message runs past the chunk")
        msg = bytes(data[6:6 + mlen]).decode(errors="replace")
        offset = None
        if rtype == proto.REPLY_TYPE_ERROR_OFFSET:
            if length != 6 + mlen + 8:
                raise NbdProtocolError(f"{self.name}: NBD_REPLY_TYPE_ERROR_OFFSET of {length} bytes is malformed")
            (offset,) = proto.U64.unpack_from(data, 6 + mlen)
            if not p.offset <= offset < p.offset + max(p.length, 1):
                raise NbdProtocolError(f"{self.name} sent an error offset {offset} outside its request {p.what}")
        text = f"{p.what} failed on the server: {proto.errno_name(err)}"
        if offset is not None:
            text += f" at offset {offset}"
        if msg:
            text += f" ({msg})"
        if p.error is None:
            p.error = NbdCommandError(text, errno=err, offset=offset, **p.request_fields())

    def _complete(self, p: Pending) -> None:
        if p.error is not None:
            self.requests.finish(p, exc=p.error)
            return
        if p.cmd == proto.CMD_READ:
            pos = p.offset
            for off, n in sorted(p.ranges):
                if off < pos:
                    raise NbdProtocolError(f"{self.name} sent overlapping chunks at offset {off} for {p.what}")
                if off > pos:
                    break
                pos = off + n
            if pos != p.offset + p.length:
                raise NbdProtocolError(f"{self.name} finished {p.what} without sending data for "
                                       f"[{pos}, ...): reply does not cover the request")
            self.requests.finish(p, p.result)
        elif p.cmd == proto.CMD_BLOCK_STATUS:
            if not p.extents:
                raise NbdProtocolError(f"{self.name} finished {p.what} without any extents")
            self.requests.finish(p, p.extents)
        else:
            self.requests.finish(p, None)


def _unpack_extents(raw: memoryview) -> array.array:
    """Big-endian u32 pairs, decoded in C rather than per field in Python."""
    a = array.array("I")
    a.frombytes(raw)
    if sys.byteorder == "little":
        a.byteswap()
    return a


_ZEROES = memoryview(b"")


def _zeroes(n: int) -> memoryview:
    """A shared read-only run of zero bytes (at most 4 MiB; callers loop)."""
    global _ZEROES
    if len(_ZEROES) < min(n, 4 << 20):
        _ZEROES = memoryview(bytes(4 << 20))
    return _ZEROES
