"""Server side of the fixed-newstyle handshake (option haggling).

Handshake.run() returns a Session bound to an export view (after GO or
EXPORT_NAME), or None when the client aborted or must be disconnected.
Malformed options get the spec's error replies; only things the spec says
end the connection (bad magic, unknown client flags, a refused EXPORT_NAME,
absurd sizes) make us hang up.

Byte layouts: proto.py's "Handshake" tables; each handler's docstring gives the
layout of the option data it parses and the replies it sends.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from dataclasses import dataclass, field

from . import proto

log = logging.getLogger("nbdbackup.server")

HANDSHAKE_TIMEOUT = 30.0        # per read while negotiating: a silent client is dropped
MAX_OPTIONS = 4096              # per connection; nbdinfo --list sends ~2 per export
DRAIN_OPTION_LIMIT = 1 << 20    # oversized option data up to this is drained and refused
BASE_ALLOCATION_ID = 1


@dataclass(frozen=True)
class HandshakeLimits:
    """What one client may spend before transmission starts (docs/server.md's table).

    Per-read timeouts alone let a client that sends an option every 20 s keep its
    connection forever; the total time and bytes bound the whole handshake.
    """

    read_timeout: float = HANDSHAKE_TIMEOUT   # each read / write
    total_time: float = 60.0                  # greeting to GO / EXPORT_NAME, TLS handshake included
    max_options: int = MAX_OPTIONS
    max_bytes: int = 8 << 20                  # everything the client sends, drained option data included


class Disconnect(Exception):
    """End this client's connection (and only it)."""


@dataclass
class Session:
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)
    tls: bool = False
    no_zeroes: bool = False
    name: str = ""
    view: object = None        # ExportView once GO / EXPORT_NAME succeeded


class Handshake:
    def __init__(self, server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tls_ctx: ssl.SSLContext | None, limits: HandshakeLimits = HandshakeLimits()):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tls_ctx = tls_ctx
        self.limits = limits
        self.s = Session()
        self.bytes_read = 0
        self.deadline = asyncio.get_running_loop().time() + limits.total_time

    def _timeout(self) -> float:
        """This I/O's timeout: the per-read one, cut at the whole handshake's deadline."""
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise Disconnect(f"handshake not finished within {self.limits.total_time:g} s")
        return min(self.limits.read_timeout, left)

    def _timed_out(self, what: str) -> Disconnect:
        if asyncio.get_running_loop().time() >= self.deadline:
            return Disconnect(f"handshake not finished within {self.limits.total_time:g} s")
        return Disconnect(what)

    async def _read(self, n: int) -> bytes:
        if self.bytes_read + n > self.limits.max_bytes:
            raise Disconnect(f"client sent more than {self.limits.max_bytes} bytes during the handshake")
        self.bytes_read += n
        timeout = self._timeout()       # first: past the deadline it raises, and no coroutine is left unawaited
        try:
            return await asyncio.wait_for(self.reader.readexactly(n), timeout)
        except asyncio.TimeoutError:
            raise self._timed_out("client silent during handshake") from None

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        timeout = self._timeout()
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
        except asyncio.TimeoutError:
            raise self._timed_out("client does not read during handshake") from None

    async def _reply(self, opt: int, rep: int, payload: bytes = b"") -> None:
        await self._send(proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, opt, rep, len(payload)) + payload)

    async def _error(self, opt: int, rep: int, msg: str) -> None:
        await self._reply(opt, rep, msg.encode()[:1024])

    async def run(self) -> Session | None:
        """Send u64 NBDMAGIC | u64 IHAVEOPT | u16 flags; read u32 client flags, then options:
        u64 IHAVEOPT | u32 option | u32 length | data (replies: OPTION_REPLY + data)."""
        await self._send(proto.HANDSHAKE.pack(proto.NBDMAGIC, proto.IHAVEOPT,
                                              proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES))
        (cflags,) = proto.CLIENT_FLAGS.unpack(await self._read(4))
        if cflags & ~proto.KNOWN_CLIENT_FLAGS:
            raise Disconnect(f"unknown client flags {cflags:#x}")
        self.s.no_zeroes = bool(cflags & proto.FLAG_C_NO_ZEROES)
        for _ in range(self.limits.max_options):
            magic, opt, length = proto.OPTION_REQUEST.unpack(await self._read(16))
            if magic != proto.IHAVEOPT:
                raise Disconnect(f"bad option magic {magic:#x}")
            if length > proto.MAX_OPTION_LENGTH:
                if opt == proto.OPT_EXPORT_NAME or length > DRAIN_OPTION_LIMIT:
                    raise Disconnect(f"{proto.option_name(opt)} with {length} bytes of data")
                await self._read(length)
                await self._error(opt, proto.REP_ERR_TOO_BIG, "option data too long")
                continue
            data = await self._read(length) if length else b""
            if self.tls_ctx is not None and not self.s.tls and opt not in (proto.OPT_STARTTLS, proto.OPT_ABORT):
                if opt == proto.OPT_EXPORT_NAME:
                    raise Disconnect("EXPORT_NAME before STARTTLS")
                await self._error(opt, proto.REP_ERR_TLS_REQD, "this server requires TLS (STARTTLS)")
                continue
            done = await self._option(opt, data)
            if done:
                return self.s
        raise Disconnect("too many options")

    async def _option(self, opt: int, data: bytes) -> bool:
        """Handle one option; True when transmission starts."""
        if opt == proto.OPT_ABORT:
            try:
                await self._reply(opt, proto.REP_ACK)
            except (ConnectionError, Disconnect):
                pass
            raise Disconnect("client aborted")
        if opt == proto.OPT_EXPORT_NAME:
            return await self._export_name(data)
        if opt in (proto.OPT_INFO, proto.OPT_GO):
            return await self._info_go(opt, data)
        if opt == proto.OPT_LIST:
            await self._list(data)
        elif opt == proto.OPT_STARTTLS:
            await self._starttls(data)
        elif opt == proto.OPT_STRUCTURED_REPLY:
            if data:
                await self._error(opt, proto.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            else:
                self.s.structured = True
                await self._reply(opt, proto.REP_ACK)
        elif opt in (proto.OPT_LIST_META_CONTEXT, proto.OPT_SET_META_CONTEXT):
            await self._meta_context(opt, data)
        else:
            await self._error(opt, proto.REP_ERR_UNSUP, f"{proto.option_name(opt)} is not supported")
        return False

    @staticmethod
    def _decode(raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    async def _export_name(self, data: bytes) -> bool:
        """Data: the bare name. Reply (no header): u64 size | u16 flags | 124 zeroes unless NO_ZEROES."""
        name = self._decode(data)
        view = await self.server.acquire_view(name) if name is not None else None
        if view is None:
            raise Disconnect(f"EXPORT_NAME for unknown export {data[:64]!r}")   # the spec's only answer
        self.s.view, self.s.name = view, name
        flags = self.server.transmission_flags(view, self.s.structured)
        reply = proto.EXPORT_NAME_REPLY.pack(view.size, flags)
        await self._send(reply if self.s.no_zeroes else reply + bytes(124))
        return True

    async def _info_go(self, opt: int, data: bytes) -> bool:
        """Data: u32 n | name | u16 k | k x u16 info type. Replies: NBD_REP_INFO with INFO_EXPORT
        (u16 0 | u64 size | u16 flags), INFO_NAME / INFO_DESCRIPTION when asked (u16 type | text),
        INFO_BLOCK_SIZE (u16 3 | u32 min | u32 preferred | u32 max), then NBD_REP_ACK."""
        if len(data) < 6:
            await self._error(opt, proto.REP_ERR_INVALID, "option data too short")
            return False
        (nlen,) = proto.U32.unpack_from(data)
        if 4 + nlen + 2 > len(data):
            await self._error(opt, proto.REP_ERR_INVALID, "export name length out of bounds")
            return False
        (nreq,) = proto.U16.unpack_from(data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            await self._error(opt, proto.REP_ERR_INVALID, "information request count does not match length")
            return False
        name = self._decode(data[4:4 + nlen])
        if name is None:
            await self._error(opt, proto.REP_ERR_INVALID, "export name is not UTF-8")
            return False
        reqs = set(struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2))
        # INFO only describes: it does not open the backup (nbdinfo --list asks about every one).
        go = opt == proto.OPT_GO
        view = await (self.server.acquire_view(name) if go else self.server.peek(name))
        if view is None:
            await self._error(opt, proto.REP_ERR_UNKNOWN, f"no export named {name[:200]!r} "
                              "(list them with nbdinfo --list)")
            return False
        keep = not go
        try:
            flags = self.server.transmission_flags(view, self.s.structured)
            await self._reply(opt, proto.REP_INFO, proto.INFO_EXPORT_STRUCT.pack(proto.INFO_EXPORT, view.size, flags))
            if proto.INFO_NAME in reqs:
                await self._reply(opt, proto.REP_INFO, proto.U16.pack(proto.INFO_NAME) + name.encode())
            if proto.INFO_DESCRIPTION in reqs:
                desc = (await self.server.describe(view)).encode()[:4096]
                await self._reply(opt, proto.REP_INFO, proto.U16.pack(proto.INFO_DESCRIPTION) + desc)
            mn, pref, mx = self.server.block_sizes
            await self._reply(opt, proto.REP_INFO, 
                              proto.INFO_BLOCK_SIZE_STRUCT.pack(proto.INFO_BLOCK_SIZE, mn, pref, mx))
            await self._reply(opt, proto.REP_ACK)
            if go:
                self.s.view, self.s.name, keep = view, name, True
            return go
        finally:
            if not keep:
                self.server.release_view(view)

    async def _list(self, data: bytes) -> None:
        """No data. One NBD_REP_SERVER per export (u32 n | name | description), then NBD_REP_ACK."""
        if data:
            await self._error(proto.OPT_LIST, proto.REP_ERR_INVALID, "LIST takes no data")
            return
        for name, desc in await self.server.list_exports():
            raw = name.encode()
            await self._reply(proto.OPT_LIST, proto.REP_SERVER, proto.U32.pack(len(raw)) + raw + desc.encode()[:4096])
        await self._reply(proto.OPT_LIST, proto.REP_ACK)

    async def _starttls(self, data: bytes) -> None:
        opt = proto.OPT_STARTTLS
        if self.tls_ctx is None:
            await self._error(opt, proto.REP_ERR_POLICY, "TLS is not configured on this server")
        elif data:
            await self._error(opt, proto.REP_ERR_INVALID, "STARTTLS takes no data")
        elif self.s.tls:
            await self._error(opt, proto.REP_ERR_INVALID, "TLS is already active")
        else:
            # Stop reading before the ACK: the client's ClientHello must reach
            # the TLS layer, not our plain-text buffer.
            self.writer.transport.pause_reading()
            if self._buffered_plaintext():
                # CVE-2021-3716 (nbdkit): bytes that came with STARTTLS would be read as
                # if they had arrived inside the TLS session. A client must wait for our
                # ACK, so this is an injection (or a broken client): hang up.
                log.warning("client sent plaintext data after STARTTLS (%d bytes) before our reply: "
                            "closing the connection (a possible injection)", self._buffered_plaintext())
                raise Disconnect("plaintext data after STARTTLS")
            await self._reply(opt, proto.REP_ACK)
            try:
                await self.writer.start_tls(self.tls_ctx, ssl_handshake_timeout=self._timeout())
            except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
                raise Disconnect(f"TLS handshake failed: {e}") from None
            # The spec: state negotiated before STARTTLS does not carry over.
            self.s = Session(tls=True, no_zeroes=self.s.no_zeroes)

    def _buffered_plaintext(self) -> int:
        """Bytes the stream has read from the socket that no _read() consumed yet."""
        return len(self.reader._buffer)    # asyncio keeps no public accessor for it

    def _parse_meta(self, data: bytes) -> tuple[str, list[str]] | None:
        """(export name, queries) from u32 n | name | u32 k | k x (u32 m | query); None when malformed."""
        try:
            (nlen,) = proto.U32.unpack_from(data)
            name = data[4:4 + nlen].decode("utf-8")
            if len(name.encode()) != nlen:
                return None
            pos = 4 + nlen
            (nq,) = proto.U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (ql,) = proto.U32.unpack_from(data, pos)
                pos += 4
                q = data[pos:pos + ql]
                if len(q) != ql:
                    return None
                queries.append(q.decode("utf-8"))
                pos += ql
            if pos != len(data):
                return None
            return name, queries
        except (struct.error, UnicodeDecodeError):
            return None

    async def _meta_context(self, opt: int, data: bytes) -> None:
        """Replies: NBD_REP_META_CONTEXT (u32 context id, 0 for LIST | name) for base:allocation
        when it matches, then NBD_REP_ACK."""
        setting = opt == proto.OPT_SET_META_CONTEXT
        if setting and not self.s.structured:
            await self._error(opt, proto.REP_ERR_INVALID, "negotiate STRUCTURED_REPLY first")
            return
        parsed = self._parse_meta(data)
        if parsed is None:
            await self._error(opt, proto.REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        if not await self.server.export_exists(name):
            await self._error(opt, proto.REP_ERR_UNKNOWN, f"no export named {name[:200]!r}")
            return
        base = proto.CONTEXT_BASE_ALLOCATION
        if setting:
            match = base in queries
        else:
            match = not queries or any(q in (base, "base:") for q in queries)
        if match:
            cid = BASE_ALLOCATION_ID if setting else 0
            await self._reply(opt, proto.REP_META_CONTEXT, proto.U32.pack(cid) + base.encode())
        if setting:
            self.s.contexts = {BASE_ALLOCATION_ID: base} if match else {}
        await self._reply(opt, proto.REP_ACK)
