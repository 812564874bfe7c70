"""Client side of the NBD handshake: greeting, options, TLS upgrade.

Every receive is checked: magic, that the reply answers the option we sent,
and that lengths are sane, so a broken server gets an NbdProtocolError that
says what it did, never a hang (the socket has a timeout) or a guess.

Byte layouts: proto.py's "Handshake" tables; each method's docstring gives the
layout of the data it sends or parses.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from dataclasses import dataclass, field

from ..errors import GreetingTimeout, NbdConnectionError, NbdExportNotFound, NbdOptionError, NbdProtocolError
from . import proto
from .sockio import recv_exact, send_all
from .tls import TlsConfig, TlsStream, tls_for_uri
from .uri import NbdUri

log = logging.getLogger(__name__)


@dataclass
class ExportInfo:
    name: str
    size: int
    flags: int
    min_block: int = proto.DEFAULT_MIN_BLOCK
    preferred_block: int = proto.DEFAULT_PREFERRED_BLOCK
    max_block: int = proto.DEFAULT_MAX_BLOCK
    block_size_negotiated: bool = False
    description: str | None = None
    structured: bool = False
    contexts: list[str] = field(default_factory=list)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & proto.FLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & proto.FLAG_CAN_MULTI_CONN)

    @property
    def flag_names(self) -> list[str]:
        return proto.flag_names(self.flags)


def _name_payload(name: str) -> bytes:
    b = name.encode()
    if len(b) > proto.MAX_NAME_LENGTH:
        raise NbdOptionError(f"export name longer than {proto.MAX_NAME_LENGTH} bytes")
    return proto.U32.pack(len(b)) + b


class Negotiator:
    """One connection in the option-haggling phase."""

    def __init__(self, sock, *, greeting_timeout: float | None = None, timeout: float = 30.0):
        self.sock = sock
        self.timeout = timeout
        self.greeting_timeout = greeting_timeout
        self.no_zeroes = False
        self.structured = False

    # --- greeting --------------------------------------------------------------
    def greet(self) -> None:
        """Read u64 NBDMAGIC | u64 IHAVEOPT | u16 handshake flags (18 bytes); send u32 client flags."""
        self.sock.settimeout(self.greeting_timeout or self.timeout)
        try:
            head = self.sock.recv(1)
        except socket.timeout:
            waited = self.greeting_timeout or self.timeout
            raise GreetingTimeout("the server accepted the connection but sent no greeting within "
                                  f"{waited:g}s (connection limit reached?)", timeout=waited) from None
        except OSError as e:
            raise NbdConnectionError(f"connection error while waiting for the greeting: {e}") from None
        if not head:
            raise NbdConnectionError("the server closed the connection without a greeting "
                                     "(connection limit reached, or not an NBD server)")
        self.sock.settimeout(self.timeout)
        rest = recv_exact(self.sock, 15, "the greeting")
        magic, opt_magic = struct.unpack(">QQ", head + rest)
        if magic != proto.NBDMAGIC:
            raise NbdProtocolError(f"bad greeting magic {magic:#018x}: not an NBD server")
        if opt_magic == proto.CLISERV_MAGIC:
            raise NbdProtocolError("the server speaks the old-style protocol, which is not supported",)
        if opt_magic != proto.IHAVEOPT:
            raise NbdProtocolError(f"bad newstyle magic {opt_magic:#018x} in the greeting")
        (hflags,) = proto.U16.unpack(recv_exact(self.sock, 2, "the handshake flags"))
        if not hflags & proto.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("the server does not support fixed-newstyle negotiation")
        self.no_zeroes = bool(hflags & proto.FLAG_NO_ZEROES)
        cflags = proto.FLAG_C_FIXED_NEWSTYLE | (proto.FLAG_C_NO_ZEROES if self.no_zeroes else 0)
        send_all(self.sock, proto.CLIENT_FLAGS.pack(cflags), "the client flags")

    # --- option plumbing -------------------------------------------------------
    def send_option(self, opt: int, payload: bytes = b"") -> None:
        """u64 IHAVEOPT | u32 option | u32 length | payload."""
        if len(payload) > proto.MAX_OPTION_LENGTH:
            raise NbdOptionError(f"{proto.option_name(opt)} payload too long ({len(payload)} bytes)", option=opt)
        send_all(self.sock, proto.OPTION_REQUEST.pack(proto.IHAVEOPT, opt, len(payload)) + payload,
                 proto.option_name(opt))

    def read_reply(self, opt: int) -> tuple[int, bytes]:
        """u64 OPTION_REPLY_MAGIC | u32 option | u32 reply type | u32 length | data:
        (reply type, data), checked to answer *opt*."""
        name = proto.option_name(opt)
        magic, ropt, rtype, length = proto.OPTION_REPLY.unpack(
            recv_exact(self.sock, proto.OPTION_REPLY.size, f"the reply to {name}", started=False))
        if magic != proto.OPTION_REPLY_MAGIC:
            raise NbdProtocolError(f"bad option reply magic {magic:#x} in the reply to {name}")
        if ropt != opt:
            raise NbdProtocolError(f"server answered {proto.option_name(ropt)} while we asked {name}")
        if length > proto.MAX_OPTION_LENGTH:
            raise NbdProtocolError(f"option reply of {length} bytes to {name} is too long")
        payload = recv_exact(self.sock, length, f"the reply to {name}") if length else b""
        return rtype, payload

    def raise_for_error(self, opt: int, rtype: int, payload: bytes, export: str | None = None):
        name = proto.option_name(opt)
        if not rtype & proto.REP_FLAG_ERROR:
            raise NbdProtocolError(f"unexpected {proto.reply_type_name(rtype)} in the reply to {name}")
        msg = payload.decode(errors="replace").strip()
        detail = f": {msg}" if msg else ""
        hint = None
        if rtype == proto.REP_ERR_UNKNOWN:
            text = f"the server has no export named {export!r}{detail}" if export is not None else \
                f"{name} refused: unknown{detail}"
            hint = "list the exports with `nbdinfo --list URI`"
        elif rtype == proto.REP_ERR_TLS_REQD:
            text = f"the server requires TLS{detail}"
            hint = "use an nbds:// or nbds+unix:// URI and --tls-ca"
        elif rtype == proto.REP_ERR_POLICY:
            text = f"the server refused {name} by policy{detail}"
        else:
            text = f"the server refused {name} with {proto.reply_type_name(rtype)}{detail}"
        cls = NbdExportNotFound if rtype == proto.REP_ERR_UNKNOWN and export is not None else NbdOptionError
        raise cls(text, reply_type=rtype, option=opt, hint=hint)

    def simple_option(self, opt: int, payload: bytes = b"") -> int:
        """Send an option expecting a bare ACK; return REP_ACK or an error reply type."""
        self.send_option(opt, payload)
        rtype, data = self.read_reply(opt)
        if rtype == proto.REP_ACK:
            if data:
                raise NbdProtocolError(f"ACK to {proto.option_name(opt)} carries {len(data)} bytes")
            return rtype
        if rtype & proto.REP_FLAG_ERROR:
            return rtype
        raise NbdProtocolError(f"unexpected {proto.reply_type_name(rtype)} in the reply to {proto.option_name(opt)}")

    # --- individual options ----------------------------------------------------
    def starttls(self, ctx: ssl.SSLContext, hostname: str | None):
        rtype = self.simple_option(proto.OPT_STARTTLS)
        if rtype != proto.REP_ACK:
            self.raise_for_error(proto.OPT_STARTTLS, rtype, b"")
        if not hostname:
            ctx.check_hostname = False
        try:
            self.sock = TlsStream(self.sock, ctx, hostname)
        except ssl.SSLCertVerificationError as e:
            raise NbdConnectionError(f"TLS: the server certificate was not accepted: {e.verify_message}",
                                     hint="check --tls-ca and the server's certificate name") from None
        except (ssl.SSLError, OSError) as e:
            raise NbdConnectionError(f"TLS handshake failed: {e}") from None
        self.sock.settimeout(self.timeout)
        return self.sock

    def structured_reply(self) -> bool:
        rtype = self.simple_option(proto.OPT_STRUCTURED_REPLY)
        self.structured = rtype == proto.REP_ACK
        if not self.structured and rtype != proto.REP_ERR_UNSUP:
            log.info("server refused structured replies (%s)", proto.reply_type_name(rtype))
        return self.structured

    def meta_context(self, opt: int, export: str, queries: list[str]) -> dict[str, int]:
        """SET_META_CONTEXT or LIST_META_CONTEXT; {name: id} (ids are 0 for LIST).

        Sends u32 n | export name | u32 k | k x (u32 m | query); each NBD_REP_META_CONTEXT
        answers u32 context id | context name, until NBD_REP_ACK."""
        payload = _name_payload(export) + proto.U32.pack(len(queries))
        for q in queries:
            b = q.encode()
            payload += proto.U32.pack(len(b)) + b
        self.send_option(opt, payload)
        out: dict[str, int] = {}
        while True:
            rtype, data = self.read_reply(opt)
            if rtype == proto.REP_ACK:
                return out
            if rtype == proto.REP_META_CONTEXT:
                if len(data) < 5:
                    raise NbdProtocolError(f"NBD_REP_META_CONTEXT of {len(data)} bytes is too short")
                (cid,) = proto.U32.unpack_from(data)
                name = data[4:].decode(errors="replace")
                if opt == proto.OPT_SET_META_CONTEXT and cid in out.values():
                    raise NbdProtocolError(f"server gave context id {cid} to two contexts")
                out[name] = cid
                continue
            if rtype & proto.REP_FLAG_ERROR:
                if rtype == proto.REP_ERR_UNSUP:
                    return {}
                self.raise_for_error(opt, rtype, data, export)
            raise NbdProtocolError(f"unexpected {proto.reply_type_name(rtype)} in the reply to "
                                   f"{proto.option_name(opt)}")

    def go(self, export: str, opt: int = proto.OPT_GO) -> ExportInfo | None:
        """NBD_OPT_GO (or INFO) asking for block sizes. None when the server lacks GO/INFO.

        Sends u32 n | export name | u16 1 | u16 NBD_INFO_BLOCK_SIZE; NBD_REP_INFO replies
        (see _parse_info) until NBD_REP_ACK."""
        payload = _name_payload(export) + proto.U16.pack(1) + proto.U16.pack(proto.INFO_BLOCK_SIZE)
        self.send_option(opt, payload)
        info = ExportInfo(name=export, size=-1, flags=0, structured=self.structured)
        while True:
            rtype, data = self.read_reply(opt)
            if rtype == proto.REP_ACK:
                if info.size < 0:
                    raise NbdProtocolError(f"{proto.option_name(opt)} succeeded without NBD_INFO_EXPORT")
                return info
            if rtype == proto.REP_INFO:
                self._parse_info(info, data)
                continue
            if rtype == proto.REP_ERR_UNSUP:
                return None
            self.raise_for_error(opt, rtype, data, export)

    @staticmethod
    def _parse_info(info: ExportInfo, data: bytes) -> None:
        """NBD_REP_INFO data: u16 info type, then INFO_EXPORT u64 size | u16 flags,
        INFO_BLOCK_SIZE u32 min | u32 preferred | u32 max, INFO_NAME/_DESCRIPTION text."""
        if len(data) < 2:
            raise NbdProtocolError("NBD_REP_INFO without an info type")
        (itype,) = proto.U16.unpack_from(data)
        if itype == proto.INFO_EXPORT:
            if len(data) != proto.INFO_EXPORT_STRUCT.size:
                raise NbdProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes (expected 12)")
            _, info.size, info.flags = proto.INFO_EXPORT_STRUCT.unpack(data)
        elif itype == proto.INFO_BLOCK_SIZE:
            if len(data) != proto.INFO_BLOCK_SIZE_STRUCT.size:
                raise NbdProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes (expected 14)")
            _, mn, pref, mx = proto.INFO_BLOCK_SIZE_STRUCT.unpack(data)
            if mn < 1 or mn & (mn - 1) or mn > 65536:
                raise NbdProtocolError(f"server sent an invalid minimum block size {mn}")
            if pref < mn or mx < mn:
                raise NbdProtocolError(f"server sent inconsistent block sizes min={mn} preferred={pref} max={mx}")
            info.min_block, info.preferred_block, info.max_block = mn, pref, mx
            info.block_size_negotiated = True
        elif itype == proto.INFO_NAME:
            info.name = data[2:].decode(errors="replace")
        elif itype == proto.INFO_DESCRIPTION:
            info.description = data[2:].decode(errors="replace")
        # other info types: ignore, as the spec asks

    def open_export(self, uri: NbdUri, meta_contexts) -> tuple[ExportInfo, dict[str, int]]:
        """The options that end negotiation for transmission: SET_META_CONTEXT (with
        structured replies), then GO, else EXPORT_NAME. (export info, {context name: id})."""
        contexts: dict[str, int] = {}
        meta = list(dict.fromkeys(meta_contexts))
        if meta and self.structured:
            contexts = self.meta_context(proto.OPT_SET_META_CONTEXT, uri.export, meta)
            unasked = set(contexts) - set(meta)
            if unasked:
                raise NbdProtocolError(f"server set meta contexts we did not ask for: {sorted(unasked)}")
        elif meta:
            log.info("no structured replies from %s: meta contexts %s unavailable", uri, meta)
        missing = [m for m in meta if m not in contexts]
        if missing:
            log.info("server %s does not offer meta contexts %s", uri, missing)
        info = self.go(uri.export)
        if info is None:
            log.debug("server lacks NBD_OPT_GO; falling back to NBD_OPT_EXPORT_NAME")
            info = self.export_name(uri.export)
        return info, contexts

    def export_name(self, export: str) -> ExportInfo:
        """The old way to end negotiation; the server closes on failure.

        Sends the bare name as option data; the answer has no option-reply header:
        u64 size | u16 transmission flags | 124 zero bytes unless NO_ZEROES."""
        self.send_option(proto.OPT_EXPORT_NAME, export.encode())
        n = proto.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else 124)
        try:
            data = recv_exact(self.sock, n, "the reply to NBD_OPT_EXPORT_NAME", started=False)
        except NbdConnectionError as e:
            raise NbdOptionError(f"the server refused export {export!r} (NBD_OPT_EXPORT_NAME): {e}",
                                 option=proto.OPT_EXPORT_NAME) from None
        size, flags = proto.EXPORT_NAME_REPLY.unpack_from(data)
        return ExportInfo(name=export, size=size, flags=flags, structured=self.structured)

    def list_exports(self) -> list[tuple[str, str]]:
        """[(name, description)]: each NBD_REP_SERVER is u32 n | name | description."""
        self.send_option(proto.OPT_LIST)
        out = []
        while True:
            rtype, data = self.read_reply(proto.OPT_LIST)
            if rtype == proto.REP_ACK:
                return out
            if rtype == proto.REP_SERVER:
                if len(data) < 4:
                    raise NbdProtocolError("NBD_REP_SERVER too short")
                (n,) = proto.U32.unpack_from(data)
                if n > len(data) - 4:
                    raise NbdProtocolError("NBD_REP_SERVER name runs past the reply")
                out.append((data[4:4 + n].decode(errors="replace"), data[4 + n:].decode(errors="replace")))
                continue
            self.raise_for_error(proto.OPT_LIST, rtype, data)

    def abort(self) -> None:
        """NBD_OPT_ABORT; the server may ACK or just close, both are fine."""
        try:
            self.sock.settimeout(min(self.timeout, 2.0))
            self.send_option(proto.OPT_ABORT)
            self.read_reply(proto.OPT_ABORT)
        except (NbdConnectionError, NbdProtocolError):
            pass


def open_socket(uri: NbdUri, timeout: float) -> socket.socket:
    try:
        if uri.is_unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(uri.socket_path)
            except BaseException:
                s.close()
                raise
        else:
            s = socket.create_connection((uri.host, uri.port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except socket.timeout:
        raise NbdConnectionError(f"timed out connecting to {uri}") from None
    except OSError as e:
        raise NbdConnectionError(f"cannot connect to {uri}: {e.strerror or e}",
                                 hint="is the NBD server running, and is the address right?") from None
    return s


def negotiate(uri: NbdUri, tls: TlsConfig | None, timeout: float, greeting_timeout: float | None,
              structured: bool) -> Negotiator:
    """Connect, read the greeting, upgrade to TLS, ask for structured replies."""
    sock = open_socket(uri, timeout)
    neg = Negotiator(sock, timeout=timeout, greeting_timeout=greeting_timeout)
    try:
        neg.greet()
        tcfg = tls_for_uri(uri, tls)
        if tcfg is not None:
            neg.starttls(tcfg.context(), tcfg.hostname)
        if structured:
            neg.structured_reply()
    except BaseException:
        neg.sock.close()
        raise
    return neg
