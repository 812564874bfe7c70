"""Helpers for the serve tests: a running `nbdbackup serve` (or its server in-process),
and a small raw NBD client that can misbehave on purpose."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from helpers import support
from nbdbackup.nbd import proto


# --- the server ----------------------------------------------------------------
class Served:
    def __init__(self, proc: subprocess.Popen, sock: str | None, port: int | None, stderr_path: Path):
        self.proc = proc
        self.sock = sock
        self.port = port
        self.stderr_path = stderr_path

    def uri(self, export: str) -> str:
        if self.sock:
            return f"nbd+unix:///{export}?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def json_report(self) -> dict:
        """The --json start-up report: one pretty-printed JSON document on stdout."""
        import json

        text = ""
        while True:
            line = self.proc.stdout.readline()
            assert line, f"no JSON on stdout: {self.log()}"
            text += line
            if line.startswith("}"):
                return json.loads(text)

    def fd_count(self, *, index: bool | None = None) -> int:
        """Open fds of the server; index=False: those not on the SQLite index (its pooled
        connections, at most the pool's size, come and go with concurrency); True: only those."""
        d = f"/proc/{self.proc.pid}/fd"
        n = 0
        for fd in os.listdir(d):
            try:
                on_index = "index.sqlite" in os.readlink(os.path.join(d, fd))
            except OSError:
                continue
            n += index is None or on_index == index
        return n

    def thread_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def serve(repo_path: Path, tmp: Path, *args: str, sock: str | None = None, port: int | None = None,
          expect_rc: int | None = 0, env: dict | None = None, listen: str | None = None):
    """Run the installed `nbdbackup serve`; stop it with SIGTERM and check it exited cleanly.

    listen="" passes no --listen at all (the default socket, which *sock* must then name).
    TCP (port=) needs TLS arguments or "--insecure-tcp" in *args*."""
    if port is None and sock is None:
        sock = str(tmp / f"nbd-{os.getpid()}-{time.monotonic_ns()}.sock")
    if listen is None:
        listen = f"unix:{sock}" if sock else f"127.0.0.1:{port}"
    listen_args = ["--listen", listen] if listen else []
    errp = tmp / f"serve-{time.monotonic_ns()}.log"
    errf = open(errp, "w")
    e = dict(os.environ, **(env or {}))     # conftest keeps NBDBACKUP_* out of os.environ
    proc = subprocess.Popen([support.nbdbackup_exe(), "-v", "serve", "--repo", str(repo_path),
                             *listen_args, *args], stdout=subprocess.PIPE, stderr=errf, env=e, text=True)
    s = Served(proc, sock, port, errp)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}: {s.log()}")
            if "listening on" in s.log():
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"serve did not start: {s.log()}")
        yield s
    finally:
        support.stop(proc, timeout=30)
        errf.close()
        if proc.stdout:
            proc.stdout.close()
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"serve exited with {proc.returncode}: {s.log()}"
        if sock:
            assert not os.path.exists(sock), "the socket file was left behind"


class InProcessServer:
    """The NbdServer class itself, on a unix socket, its loop in a thread of its own: for
    tests that inject bounds (short timeouts) the command line does not offer."""

    port = None

    def __init__(self, sock: str, server, loop):
        self.sock = sock
        self.server = server
        self.loop = loop

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"


@contextlib.contextmanager
def serve_in_process(repo_path: Path, tmp: Path, *, repo_options: dict | None = None, **server_kwargs):
    """The server of `nbdbackup serve` on a thread of this process; *repo_options*: more
    Repository.open keywords (an encrypted repository's master_key)."""
    import asyncio
    import threading

    from nbdbackup.engine.exports import ChunkCache, RepoCatalog
    from nbdbackup.nbd.server import ListenAddress, NbdServer
    from nbdbackup.repo import Repository

    repo = Repository.open(str(repo_path), **(repo_options or {}))
    sock = str(tmp / f"inproc-{time.monotonic_ns()}.sock")
    server = NbdServer(RepoCatalog(repo, ChunkCache(16 << 20)), **server_kwargs)
    loop = asyncio.new_event_loop()
    started, failed = threading.Event(), []

    def run():
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start(ListenAddress(unix=sock)))
        except BaseException as e:   # noqa: BLE001 - reported to the test
            failed.append(e)
            return
        finally:
            started.set()
        loop.run_forever()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        assert started.wait(20) and not failed, failed
        yield InProcessServer(sock, server, loop)
    finally:
        if not failed:
            asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
        th.join(10)
        loop.close()
        repo.close()


# --- a raw client ----------------------------------------------------------------
class NbdReply:
    def __init__(self, error: int, data: bytes = b"", chunks=None):
        self.error = error
        self.data = data
        self.chunks = chunks or []


class RawClient:
    """Speaks NBD by hand; every method can be pushed outside the spec."""

    def __init__(self, served: Served, timeout: float = 10.0):
        if served.sock:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(timeout)
            self.s.connect(served.sock)
        else:
            self.s = socket.create_connection(("127.0.0.1", served.port), timeout=timeout)
        self.size = None
        self.flags = None
        self.structured = False
        self.cookie = 0

    def close(self):
        with contextlib.suppress(OSError):
            self.s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            d = self.s.recv(n - len(buf))
            if not d:
                raise ConnectionError(f"server closed the connection ({len(buf)}/{n} bytes)")
            buf += d
        return bytes(buf)

    def is_closed(self, timeout: float = 5.0) -> bool:
        self.s.settimeout(timeout)
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def greet(self, cflags: int = proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES) -> None:
        magic, opt, hflags = proto.HANDSHAKE.unpack(self.recv(18))
        assert magic == proto.NBDMAGIC and opt == proto.IHAVEOPT
        self.s.sendall(proto.CLIENT_FLAGS.pack(cflags))

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; collect replies up to ACK or an error."""
        self.s.sendall(proto.OPTION_REQUEST.pack(proto.IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, ropt, rtype, ln = proto.OPTION_REPLY.unpack(self.recv(20))
            assert magic == proto.OPTION_REPLY_MAGIC and ropt == opt
            payload = self.recv(ln)
            out.append((rtype, payload))
            if rtype == proto.REP_ACK or rtype & proto.REP_FLAG_ERROR:
                return out

    def go(self, name: str, structured: bool = True, meta: bool = False) -> None:
        if structured:
            assert self.option(proto.OPT_STRUCTURED_REPLY)[-1][0] == proto.REP_ACK
            self.structured = True
        if meta:
            q = proto.CONTEXT_BASE_ALLOCATION.encode()
            n = name.encode()
            rep = self.option(proto.OPT_SET_META_CONTEXT,
                              struct.pack(">I", len(n)) + n + struct.pack(">II", 1, len(q)) + q)
            assert rep[-1][0] == proto.REP_ACK, rep
        n = name.encode()
        reps = self.option(proto.OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">HH", 1, proto.INFO_BLOCK_SIZE))
        assert reps[-1][0] == proto.REP_ACK, reps
        for rtype, payload in reps:
            if rtype == proto.REP_INFO and proto.U16.unpack_from(payload)[0] == proto.INFO_EXPORT:
                _, self.size, self.flags = proto.INFO_EXPORT_STRUCT.unpack(payload)

    def send(self, typ: int, off: int, length: int, flags: int = 0, payload: bytes = b"") -> int:
        self.cookie += 1
        self.s.sendall(proto.REQUEST.pack(proto.REQUEST_MAGIC, flags, typ, self.cookie, off, length) + payload)
        return self.cookie

    def reply(self, cookie: int, read_len: int = 0) -> NbdReply:
        """One reply; for simple replies to reads, *read_len* bytes of data follow on success."""
        magic = proto.U32.unpack(self.recv(4))[0]
        if magic == proto.SIMPLE_REPLY_MAGIC:
            err, ck = struct.unpack(">IQ", self.recv(12))
            assert ck == cookie
            return NbdReply(err, self.recv(read_len) if err == 0 else b"")
        assert magic == proto.STRUCTURED_REPLY_MAGIC, hex(magic)
        data = bytearray(read_len)
        chunks, error = [], 0
        while True:
            if chunks:
                assert proto.U32.unpack(self.recv(4))[0] == proto.STRUCTURED_REPLY_MAGIC
            flags, typ, ck, ln = struct.unpack(">HHQI", self.recv(16))
            assert ck == cookie
            body = self.recv(ln)
            chunks.append((typ, body))
            if typ & proto.REPLY_TYPE_ERROR_BIT:
                error = proto.U32.unpack_from(body)[0]
            if flags & proto.REPLY_FLAG_DONE:
                if typ == proto.REPLY_TYPE_NONE:
                    assert ln == 0
                return NbdReply(error, bytes(data), chunks)

    def request(self, typ: int, off: int, length: int, flags: int = 0, payload: bytes = b"",
                base: int = 0) -> NbdReply:
        ck = self.send(typ, off, length, flags, payload)
        r = self.reply(ck, length if typ == proto.CMD_READ else 0)
        if typ == proto.CMD_READ and r.error == 0 and r.chunks:
            r.data = assemble_read(r.chunks, off, length)
        return r

    def read(self, off: int, length: int, flags: int = 0) -> bytes:
        r = self.request(proto.CMD_READ, off, length, flags)
        assert r.error == 0, proto.errno_name(r.error)
        return r.data


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def sigterm(proc) -> None:
    proc.send_signal(signal.SIGTERM)


def assemble_read(chunks, off: int, length: int) -> bytes:
    """The bytes a structured READ reply's (type, body) *chunks* give for [off, off+length)."""
    buf = bytearray(length)
    for t, body in chunks:
        if t == proto.REPLY_TYPE_OFFSET_DATA:
            o = proto.U64.unpack_from(body)[0] - off
            buf[o:o + len(body) - 8] = body[8:]
        elif t == proto.REPLY_TYPE_OFFSET_HOLE:
            o, n = proto.OFFSET_HOLE_STRUCT.unpack(body)
            buf[o - off:o - off + n] = bytes(n)
    return bytes(buf)
