"""A scriptable NBD server for tests: honest handshake, then whatever the test says.

Each test gives a handler(conn, srv) that runs per accepted connection. Helpers
here perform a correct fixed-newstyle handshake so a handler can then lie in
exactly one way. The server runs in a thread and is always stopped by the
context manager.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading

from nbdbackup.nbd import proto


def recv_exact(conn, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


class FakeServer:
    def __init__(self, path, handler, *, size: int = 1 << 20, flags: int = 0,
                 contexts: tuple[str, ...] = ("base:allocation",)):
        self.path = str(path)
        self.handler = handler
        self.size = size
        self.flags = proto.FLAG_HAS_FLAGS | flags
        self.offer_contexts = contexts
        self.errors: list[BaseException] = []
        self.options_seen: list[int] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def __enter__(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.1)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.vanish()

    def vanish(self) -> None:
        """Go away as a killed server does: nobody listens any more, then every connection drops
        (a second call, or __exit__ after it, does nothing more)."""
        self._stop.set()
        self._sock.close()
        self._thread.join(5)
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(10)
            self._conns.append(conn)
            threading.Thread(target=self._run_handler, args=(conn,), daemon=True).start()

    def _run_handler(self, conn):
        try:
            self.handler(conn, self)
        except (EOFError, OSError):
            pass
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.errors.append(e)

    # --- honest building blocks ------------------------------------------------
    def greet(self, conn) -> None:
        conn.sendall(proto.HANDSHAKE.pack(proto.NBDMAGIC, proto.IHAVEOPT,
                                          proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES))
        recv_exact(conn, 4)

    def read_option(self, conn) -> tuple[int, bytes]:
        magic, opt, length = proto.OPTION_REQUEST.unpack(recv_exact(conn, 16))
        assert magic == proto.IHAVEOPT
        data = recv_exact(conn, length) if length else b""
        self.options_seen.append(opt)
        return opt, data

    @staticmethod
    def reply(conn, opt: int, rtype: int, data: bytes = b"") -> None:
        conn.sendall(proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def negotiate(self, conn, *, structured: bool = True, go: bool = True, greet: bool = True) -> dict[int, str]:
        """Answer options honestly until GO / EXPORT_NAME; returns {context id: name} set.
        greet=False: the greeting is done already (e.g. we are inside TLS now)."""
        if greet:
            self.greet(conn)
        contexts: dict[int, str] = {}
        sr = False
        while True:
            opt, data = self.read_option(conn)
            if opt == proto.OPT_STRUCTURED_REPLY:
                if structured:
                    sr = True
                    self.reply(conn, opt, proto.REP_ACK)
                else:
                    self.reply(conn, opt, proto.REP_ERR_UNSUP)
            elif opt == proto.OPT_SET_META_CONTEXT and sr:
                (nlen,) = struct.unpack_from(">I", data)
                pos = 4 + nlen
                (nq,) = struct.unpack_from(">I", data, pos)
                pos += 4
                for _ in range(nq):
                    (ql,) = struct.unpack_from(">I", data, pos)
                    q = data[pos + 4:pos + 4 + ql].decode()
                    pos += 4 + ql
                    if q in self.offer_contexts:
                        cid = 10 + len(contexts)
                        contexts[cid] = q
                        self.reply(conn, opt, proto.REP_META_CONTEXT, struct.pack(">I", cid) + q.encode())
                self.reply(conn, opt, proto.REP_ACK)
            elif opt in (proto.OPT_GO, proto.OPT_INFO) and go:
                self.reply(conn, opt, proto.REP_INFO, proto.INFO_EXPORT_STRUCT.pack(
                    proto.INFO_EXPORT, self.size, self.flags))
                self.reply(conn, opt, proto.REP_INFO, proto.INFO_BLOCK_SIZE_STRUCT.pack(
                    proto.INFO_BLOCK_SIZE, 1, 4096, 1 << 20))
                self.reply(conn, opt, proto.REP_ACK)
                if opt == proto.OPT_GO:
                    return contexts
            elif opt == proto.OPT_EXPORT_NAME:
                conn.sendall(proto.EXPORT_NAME_REPLY.pack(self.size, self.flags))
                return contexts
            elif opt == proto.OPT_ABORT:
                self.reply(conn, opt, proto.REP_ACK)
                raise EOFError
            else:
                self.reply(conn, opt, proto.REP_ERR_UNSUP)

    @staticmethod
    def read_request(conn) -> tuple[int, int, int, int, int]:
        """(flags, type, cookie, offset, length); a WRITE's payload is consumed too."""
        magic, flags, cmd, cookie, offset, length = proto.REQUEST.unpack(recv_exact(conn, 28))
        assert magic == proto.REQUEST_MAGIC
        if cmd == proto.CMD_WRITE:
            recv_exact(conn, length)
        return flags, cmd, cookie, offset, length

    @staticmethod
    def chunk(conn, cookie: int, rtype: int, payload: bytes, done: bool = False, magic=None) -> None:
        conn.sendall(proto.STRUCTURED_REPLY.pack(magic or proto.STRUCTURED_REPLY_MAGIC,
                                                 proto.REPLY_FLAG_DONE if done else 0,
                                                 rtype, cookie, len(payload)) + payload)

    @staticmethod
    def simple(conn, cookie: int, error: int = 0, payload: bytes = b"") -> None:
        conn.sendall(proto.SIMPLE_REPLY.pack(proto.SIMPLE_REPLY_MAGIC, error, cookie) + payload)

    @staticmethod
    def data_chunk(conn, cookie: int, offset: int, data: bytes, done: bool = False) -> None:
        FakeServer.chunk(conn, cookie, proto.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data, done)

    @staticmethod
    def hole_chunk(conn, cookie: int, offset: int, length: int, done: bool = False) -> None:
        FakeServer.chunk(conn, cookie, proto.REPLY_TYPE_OFFSET_HOLE, 
                         proto.OFFSET_HOLE_STRUCT.pack(offset, length), done)

    @staticmethod
    def wait_disc(conn) -> None:
        """Serve nothing more: wait for NBD_CMD_DISC or the client going away."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                _, cmd, *_ = FakeServer.read_request(conn)
                if cmd == proto.CMD_DISC:
                    return
