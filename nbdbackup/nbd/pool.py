"""Several connections to one export, used as one.

Opens N connections only when the server advertises CAN_MULTI_CONN (without
it, writes on one connection need not be visible on another, so one job must
stay on one connection). Block status goes over the same connections, so the
total never exceeds what was asked for. A connection that drops is replaced
and the requests it lost are sent again.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from ..errors import GreetingTimeout, NbdConnectionError, NbdOptionError, NbdProtocolError, TruncatedReply, UsageError
from .client import Client
from .futures import resolve
from .tls import TlsConfig
from .uri import parse_uri

log = logging.getLogger(__name__)

DEFAULT_CONNECTIONS = 4
# Requests lost with a dropped connection are retried this often.
DEFAULT_RETRIES = 3
RETRYABLE = (NbdConnectionError, TruncatedReply)


class ConnectionPool:
    def __init__(self, uri, connections: int = DEFAULT_CONNECTIONS, meta_contexts=(), tls: TlsConfig | None = None,
                 *, timeout: float = 30.0, greeting_timeout: float = 3.0, retries: int = DEFAULT_RETRIES,
                 structured: bool = True):
        if connections < 1:
            raise UsageError(f"connections must be at least 1, not {connections}")
        self.uri = parse_uri(uri)
        self.asked = connections
        self.retries = retries
        self._connect_args = dict(meta_contexts=list(meta_contexts), tls=tls, timeout=timeout, structured=structured)
        self._greeting_timeout = greeting_timeout
        self._lock = threading.Lock()
        self._next = 0
        self._closed = False
        # why a full round of reconnect attempts failed: the server is gone, for every connection
        self._gave_up: NbdConnectionError | None = None
        first = Client.connect(self.uri, **self._connect_args)
        self.clients: list[Client] = [first]
        self.notes: list[str] = []      # why there are fewer connections than asked (for summaries)
        try:
            self._open_more(connections - 1)
        except BaseException:
            self.close()
            raise

    def _open_more(self, n: int) -> None:
        if n <= 0:
            return
        first = self.clients[0]
        if not first.can_multi_conn:
            self._note(f"{self.uri} does not advertise multi-conn: using 1 connection instead of {self.asked}")
            return
        for _ in range(n):
            try:
                self.clients.append(Client.connect(self.uri, greeting_timeout=self._greeting_timeout,
                                                   **self._connect_args))
            except GreetingTimeout:
                self._note(f"{self.uri} did not greet connection {len(self.clients) + 1} within "
                           f"{self._greeting_timeout:g}s (server full?): carrying on with {len(self.clients)}")
                return
            except (NbdConnectionError, NbdOptionError) as e:   # e.g. a server-side connection limit
                self._note(f"connection {len(self.clients) + 1} to {self.uri} failed ({e}): "
                           f"carrying on with {len(self.clients)}")
                return

    def _note(self, msg: str) -> None:
        log.warning("%s", msg)
        self.notes.append(msg)

    # --- what the export looks like (same on every connection) -----------------
    @property
    def primary(self) -> Client:
        return self.clients[0]

    size = property(lambda self: self.primary.size)
    flags = property(lambda self: self.primary.flags)
    info = property(lambda self: self.primary.info)
    read_only = property(lambda self: self.primary.read_only)
    can_multi_conn = property(lambda self: self.primary.can_multi_conn)
    min_block = property(lambda self: self.primary.min_block)
    preferred_block = property(lambda self: self.primary.preferred_block)
    max_block = property(lambda self: self.primary.max_block)
    max_payload = property(lambda self: self.primary.max_payload)
    contexts = property(lambda self: self.primary.contexts)

    @property
    def connections(self) -> int:
        return len(self.clients)

    # --- choosing and replacing connections ------------------------------------
    def _pick(self) -> Client:
        with self._lock:
            if self._closed:
                raise NbdConnectionError(f"connection pool for {self.uri} is closed")
            alive = [c for c in self.clients if c.alive]
            dead = [c for c in self.clients if not c.alive]
        if alive and dead:
            self._replace_or_drop(dead[0])
            with self._lock:
                alive = [c for c in self.clients if c.alive]
        with self._lock:
            if alive:
                # round robin, but skip a connection that is much busier than the idlest
                self._next = (self._next + 1) % len(alive)
                c = alive[self._next]
                best = min(alive, key=lambda x: x.in_flight)
                return best if c.in_flight > best.in_flight + 2 else c
            dead = self.clients[0]
        return self._replace(dead)

    def _replace_or_drop(self, dead: Client) -> None:
        """Replace one dead connection while others still work; if that fails, shrink."""
        try:
            self._replace(dead, retries=0)
        except NbdConnectionError as e:
            with self._lock:
                if dead in self.clients and len(self.clients) > 1:
                    self.clients.remove(dead)
            self._note(f"could not replace a dropped connection to {self.uri} ({e}): "
                       f"carrying on with {len(self.clients)}")

    def _replace(self, dead: Client, retries: int | None = None) -> Client:
        """A new connection in place of *dead* (or whatever already replaced it)."""
        with self._lock:
            if self._closed:
                raise NbdConnectionError(f"connection pool for {self.uri} is closed")
            if dead not in self.clients:
                alive = [c for c in self.clients if c.alive]
                if alive:
                    return alive[0]
            if self._gave_up is not None:
                # Every request lost with any dropped connection lands here: one round of reconnect
                # attempts is enough (a round each took minutes with many requests in flight).
                raise NbdConnectionError(str(self._gave_up))
            last: Exception | None = None
            for attempt in range((self.retries if retries is None else retries) + 1):
                if attempt:
                    time.sleep(min(0.25 * 2 ** attempt, 4.0))
                if self._closed:
                    raise NbdConnectionError(f"connection pool for {self.uri} is closed")
                try:
                    new = Client.connect(self.uri, greeting_timeout=self._greeting_timeout, **self._connect_args)
                    break
                except NbdConnectionError as e:
                    last = e
            else:
                err = NbdConnectionError(f"lost the connection to {self.uri} and could not reconnect: {last}")
                if retries is None:     # a full round failed (not a quick try by _replace_or_drop)
                    self._gave_up = err
                raise err
            if new.size != dead.size or set(new.contexts) != set(dead.contexts):
                new.close()
                what = (f"size from {dead.size} to {new.size}" if new.size != dead.size else
                        f"meta contexts from {sorted(dead.contexts)} to {sorted(new.contexts)}")
                raise NbdProtocolError(f"{self.uri} changed {what} across a reconnect")
            log.warning("reconnected to %s after a dropped connection", self.uri)
            idx = self.clients.index(dead) if dead in self.clients else None
            if idx is not None:
                self.clients[idx] = new
            else:
                self.clients.append(new)
        try:
            dead.close()
        except Exception:  # noqa: BLE001 - it is already broken
            pass
        return new

    # --- requests with retry ---------------------------------------------------
    def _submit(self, op) -> Future:
        out: Future = Future()
        self._attempt(out, op, self.retries)
        return out

    def _attempt(self, out: Future, op, left: int) -> None:
        try:
            c = self._pick()
            f = op(c)
        except RETRYABLE as e:
            f, c = Future(), None
            f.set_exception(e)
        except BaseException as e:  # noqa: BLE001 - surfaced through the future
            resolve(out, exc=e)
            return
        f.add_done_callback(lambda g: self._done(g, out, op, left, c))

    def _done(self, f: Future, out: Future, op, left: int, c: Client | None) -> None:
        e = f.exception()
        if e is None:
            resolve(out, f.result())
        elif isinstance(e, RETRYABLE) and left > 0 and not self._closed:
            # Not on the receiver thread that called us: reconnecting blocks.
            threading.Thread(target=self._retry, args=(out, op, left - 1, c), daemon=True,
                             name="nbd-pool-retry").start()
        else:
            resolve(out, exc=e)

    def _retry(self, out: Future, op, left: int, c: Client | None) -> None:
        try:
            if c is not None and not c.alive:
                self._replace(c)
        except BaseException as e:  # noqa: BLE001
            resolve(out, exc=e)
            return
        self._attempt(out, op, left)

    def submit_read(self, offset: int, length: int) -> Future:
        return self._submit(lambda c: c.submit_read(offset, length))

    def submit_read_into(self, offset: int, buf) -> Future:
        return self._submit(lambda c: c.submit_read_into(offset, buf))

    def read(self, offset: int, length: int):
        return self.submit_read(offset, length).result()

    def submit_write(self, offset: int, data, *, fua: bool = False) -> Future:
        return self._submit(lambda c: c.submit_write(offset, data, fua=fua))

    def write(self, offset: int, data, fua: bool = False) -> None:
        self.submit_write(offset, data, fua=fua).result()

    def submit_write_zeroes(self, offset: int, length: int, **kw) -> Future:
        return self._submit(lambda c: c.submit_write_zeroes(offset, length, **kw))

    def write_zeroes(self, offset: int, length: int, **kw) -> None:
        self.submit_write_zeroes(offset, length, **kw).result()

    def submit_flush(self) -> Future:
        return self._submit(lambda c: c.submit_flush())

    def flush(self) -> None:
        """With multi-conn one flush covers writes completed on every connection."""
        self.submit_flush().result()

    def submit_block_status(self, offset: int, length: int, req_one: bool = False) -> Future:
        return self._submit(lambda c: c.submit_block_status(offset, length, req_one))

    def block_status(self, offset: int, length: int, req_one: bool = False):
        return self.submit_block_status(offset, length, req_one).result()

    # --- closing ---------------------------------------------------------------
    def close(self) -> None:
        self._closed = True     # first, without the lock: a reconnect loop holding it stops sooner
        with self._lock:
            self._closed = True
            clients, self.clients = self.clients, list(self.clients)
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing must not mask the real error
                log.debug("error closing a connection", exc_info=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
