"""The NBD server: listening sockets, export views, connection lifecycle, shutdown.

One asyncio loop handles all sockets; chunk reads (decompress + check) run
in a thread pool, catalog queries (the index) in a one-thread pool of their
own. Views are shared per backup key: every connection to one backup sees
the same overlay and the same chunk cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import socket
import ssl
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import LockedError, UsageError
from . import proto
from .overlay import Overlay
from .server_conn import Connection
from .server_handshake import Disconnect, Handshake, HandshakeLimits
from .server_socket import SocketAccess, apply_socket_access, set_private_dir_access
from .server_view import ExportCatalog, ExportView

log = logging.getLogger("nbdbackup.server")

MAX_BLOCK = 32 * 1024 * 1024
PREFERRED_BLOCK = 4096
SHUTDOWN_GRACE = 10.0
SEND_BUFFER = 4 << 20
DEFAULT_MAX_HANDSHAKES = 64     # or half of max_clients when that is smaller


@dataclass(frozen=True)
class ExportSummary:
    key: str
    size: int
    writable: bool


@dataclass(frozen=True)
class ListenAddress:
    unix: str | None = None
    host: str | None = None
    port: int = proto.DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> "ListenAddress":
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise UsageError("--listen unix: needs a socket path")
            return cls(unix=os.path.abspath(path))
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise UsageError(f"--listen {text!r}: expected unix:PATH or HOST:PORT")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            p = int(port)
        except ValueError:
            p = -1
        if not 0 <= p <= 65535:
            raise UsageError(f"--listen {text!r}: bad port {port!r}")
        return cls(host=host, port=p)

    def __str__(self) -> str:
        if self.unix:
            return f"unix:{self.unix}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def tls_server_context(cert: str, key: str | None, ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key or None)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load TLS certificates: {e}",
                         hint="--tls-cert and --tls-key are PEM files; "
                              "--tls-ca is the CA for client certificates") from None
    return ctx


def clear_stale_socket(path: str) -> None:
    """Remove a dead server's socket file; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except OSError as e:
            raise UsageError(f"cannot check socket {path}: {e}") from None
    raise LockedError(f"another server is listening on {path}",
                      hint="stop it first, or choose another --listen path")


_LISTEN_HINTS = {
    errno.EADDRINUSE: "another program (another `nbdbackup serve`, qemu-nbd...) already uses that port: "
                      "stop it or choose another --listen HOST:PORT",
    errno.EADDRNOTAVAIL: "HOST is not an address of this machine: use one of its addresses, e.g. 127.0.0.1",
    errno.EACCES: "ports below 1024 need root: choose a port above 1024 (NBD's usual port is 10809)",
}


def listen_unix(path: str, access: SocketAccess = SocketAccess()) -> socket.socket:
    """A listening unix socket that appears at *path* only once it accepts
    connections and has its final group and mode (bind + listen under a
    temporary name, then rename), so a client polling for the path never gets
    ECONNREFUSED, and nobody can connect in a window before the chmod."""
    tmp = f"{path}.{os.getpid()}~"
    bound = None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)      # born 0600: never wider than asked, even for a moment
        try:
            try:
                sock.bind(tmp)
                bound = tmp
            except OSError:          # e.g. the longer name exceeds the sun_path limit
                sock.bind(path)
                bound = path
        finally:
            os.umask(old_umask)
        apply_socket_access(bound, access, path)
        sock.listen(128)
        if bound == tmp:
            os.rename(tmp, path)
    except (OSError, UsageError) as e:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(bound)
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"cannot listen on unix:{path}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


class NbdServer:
    def __init__(self, catalog: ExportCatalog, *, writable: bool = False, overlay_dir: str | None = None,
                 tls: ssl.SSLContext | None = None, workers: int = 4, max_block: int = MAX_BLOCK,
                 max_clients: int = 1000, max_handshakes: int | None = None,
                 handshake_limits: HandshakeLimits = HandshakeLimits()):
        self.catalog = catalog
        self.writable = writable
        self.overlay_dir = overlay_dir
        self.tls = tls
        self.max_block = max_block
        self.max_clients = max_clients
        # Connections still negotiating have their own, smaller bound: silent or
        # slow clients cannot take every --max-connections slot.
        if max_handshakes is None:
            max_handshakes = min(DEFAULT_MAX_HANDSHAKES, max(1, max_clients // 2))
        self.max_handshakes = max_handshakes
        self.handshake_limits = handshake_limits
        self.handshaking = 0
        self.block_sizes = (1, PREFERRED_BLOCK, max_block)
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="nbd-chunks")
        self.index_pool = ThreadPoolExecutor(1, thread_name_prefix="nbd-index")
        self.views: dict[str, ExportView] = {}
        self._opening: dict[str, asyncio.Future] = {}
        self.clients: set[asyncio.Task] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.unix_paths: list[str] = []
        self.stopping = False

    # --- catalog access (off the loop: the index may be slow) -----------------
    async def _index(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.index_pool, fn, *args)

    async def list_exports(self) -> list[tuple[str, str]]:
        return await self._index(self.catalog.list_exports)

    async def export_exists(self, name: str) -> bool:
        return await self._resolve(name) is not None

    async def describe(self, view) -> str:
        return await self._index(self.catalog.describe, view.key)

    async def _resolve(self, name: str) -> str | None:
        """The export key *name* means now, or None (an over-long name is never looked up)."""
        if len(name.encode()) > proto.MAX_NAME_LENGTH:
            return None
        return await self._index(self.catalog.resolve, name)

    async def peek(self, name: str) -> ExportSummary | None:
        """Size and mode of *name* without opening it (NBD_OPT_INFO, e.g. nbdinfo --list)."""
        key = await self._resolve(name)
        if key is None:
            return None
        view = self.views.get(key)
        if view is not None:
            return ExportSummary(key, view.size, view.writable)
        return ExportSummary(key, await self._index(self.catalog.size, key), self.writable)

    async def acquire_view(self, name: str) -> ExportView | None:
        """The shared view for *name*, resolved now (an alias binds here)."""
        key = await self._resolve(name)
        if key is None:
            return None
        view = self.views.get(key)
        if view is None:
            fut = self._opening.get(key)
            if fut is None:
                fut = asyncio.ensure_future(self._open_view(key))
                self._opening[key] = fut
                fut.add_done_callback(lambda f: self._opening.pop(key, None))
            view = await asyncio.shield(fut)
        view.refs += 1
        return view

    async def _open_view(self, key: str) -> ExportView:
        backend = await self._index(self.catalog.open, key)
        overlay = None
        if self.writable:
            # Named by a hash of the key: a client-chosen name never becomes a path.
            fname = hashlib.sha256(key.encode()).hexdigest()[:32] + ".overlay"
            overlay = Overlay(os.path.join(self.overlay_dir, fname), backend.size)
            log.info("overlay for %s: %s", key, overlay.path)
        view = ExportView(backend, self.pool, overlay)
        self.views[key] = view
        return view

    def release_view(self, view: ExportView) -> None:
        view.refs -= 1
        # Writable views keep their overlay (the guest's writes) until the server stops.
        if view.refs <= 0 and not view.writable and self.views.get(view.key) is view:
            del self.views[view.key]
            self.index_pool.submit(view.backend.close)

    def transmission_flags(self, view, structured: bool) -> int:
        f = (proto.FLAG_HAS_FLAGS | proto.FLAG_SEND_FLUSH | proto.FLAG_SEND_FUA
             | proto.FLAG_CAN_MULTI_CONN | proto.FLAG_SEND_CACHE)
        if structured:
            f |= proto.FLAG_SEND_DF
        if view.writable:
            f |= proto.FLAG_SEND_TRIM | proto.FLAG_SEND_WRITE_ZEROES | proto.FLAG_SEND_FAST_ZERO
        else:
            f |= proto.FLAG_READ_ONLY
        return f

    # --- listening ------------------------------------------------------------------
    async def start(self, addr: ListenAddress, access: SocketAccess = SocketAccess(),
                    private_dir: str | None = None) -> None:
        """Listen on *addr*; a unix socket gets *access*, and *private_dir* (the default
        socket's directory, ours) the search permission that access needs."""
        if addr.unix:
            clear_stale_socket(addr.unix)       # a live server there: exit 3 before touching anything
            if private_dir:
                set_private_dir_access(private_dir, access)
            sock = listen_unix(addr.unix, access)
            self.unix_paths.append(addr.unix)
            srv = await asyncio.start_unix_server(self._on_client, sock=sock, limit=1 << 20)
        else:
            try:
                srv = await asyncio.start_server(self._on_client, addr.host, addr.port,
                                                 limit=1 << 20, reuse_address=True)
            except OSError as e:
                raise UsageError(f"cannot listen on {addr}: {e.strerror or e}",
                                 hint=_LISTEN_HINTS.get(e.errno, "choose another --listen address")) from None
        self.listeners.append(srv)

    def bound_ports(self) -> list[int]:
        return [s.getsockname()[1] for srv in self.listeners for s in srv.sockets
                if s.family in (socket.AF_INET, socket.AF_INET6)]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.clients.add(task)
        peer = writer.get_extra_info("peername") or "unix client"
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # Room for whole read replies: fewer partial sends, fewer copies
                # into the transport's buffer.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = None
        handshake = None
        try:
            if self.stopping:
                return
            if len(self.clients) > self.max_clients:
                # Bounded fds and memory: over the limit, a new client is turned away at once.
                log.warning("client %s refused: %d connections already (--max-connections)",
                            peer, self.max_clients)
                return
            if self.handshaking >= self.max_handshakes:
                log.warning("client %s refused: %d connections still in the handshake (--max-handshakes)",
                            peer, self.max_handshakes)
                return
            self.handshaking += 1
            try:
                handshake = Handshake(self, reader, writer, self.tls, self.handshake_limits)
                session = await handshake.run()
            finally:
                self.handshaking -= 1
            view = session.view
            log.info("client %s: export %r (%s)", peer, session.name, view.key)
            await Connection(reader, writer, session, self.max_block).serve()
        except Disconnect as e:
            log.info("client %s: %s", peer, e)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, ssl.SSLError) as e:
            log.info("client %s went away: %s", peer, e)
        except asyncio.CancelledError:
            pass
        except Exception:   # a bug: drop this client, keep serving the others
            log.exception("client %s: internal error", peer)
        finally:
            if view is None and handshake is not None:
                view = handshake.s.view     # bound by EXPORT_NAME, then the reply failed
            if view is not None:
                self.release_view(view)
            writer.close()      # sends what is buffered (whole replies), then closes
            if self.stopping:
                try:
                    await asyncio.wait_for(writer.wait_closed(), 5)
                except (asyncio.TimeoutError, OSError, ssl.SSLError, asyncio.CancelledError):
                    writer.transport.abort()
            self.clients.discard(task)

    # --- shutdown ------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests (bounded), drop overlays, remove sockets."""
        self.stopping = True
        for srv in self.listeners:
            srv.close()
        for path in self.unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for t in list(self.clients):
            t.cancel()      # Connection.serve waits for its in-flight requests before closing
        if self.clients:
            await asyncio.wait(list(self.clients), timeout=SHUTDOWN_GRACE)
        for view in list(self.views.values()):
            if view.overlay is not None:
                view.overlay.close(remove=True)
            with contextlib.suppress(Exception):
                view.backend.close()
        self.views.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.index_pool.shutdown(wait=True, cancel_futures=True)
