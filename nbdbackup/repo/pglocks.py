"""PgLocks: the lock service of a repository whose index is on PostgreSQL (many hosts).

flock only works inside one machine; hosts that share nothing but the bucket and the
database lock through PostgreSQL session advisory locks instead, with the FlockLocks API
(locks.py): lock(name, exclusive=, wait=, purpose=), probe_free(name), holders(name), close().

- Each held lock has its own, dedicated psycopg connection (autocommit, not pooled): a
  session advisory lock belongs to its session, so closing the connection is what releases
  it, and a pooled connection would keep it past close(). One connection per lock is also
  what keeps flock's meaning inside one process: two locks of one name taken by one process
  conflict as two flock'ed open files do (one session would grant itself both). Cost: one
  server connection per held lock (a backup holds two or three: writers, disk-<name>,
  image-<hash>), so max_connections must allow for the hosts' runs.
- The key is a signed 64-bit number from blake2b(f"{repo_id}:{name}"); exclusive locks are
  pg_try_advisory_lock, shared ones pg_try_advisory_lock_shared, tried in the same loop as
  locks.RepoLock (SHARED_GRACE_S for a shared lock even with wait 0), then LockedError (exit 3)
  naming the holders.
- Holders: a row in lock_holders (schema.py) is written when a lock is taken (on the lock's own
  connection: backend_pid is that session) and deleted on release. A row counts only while its
  backend_pid holds that advisory lock in pg_locks (stricter than "is in pg_stat_activity": a
  reused backend pid does not revive a dead holder's row); the others are deleted when seen.
  Rows are a courtesy: with no lock_holders table (an index before 0003) or no right to write
  it (a read-only database user) the lock is taken all the same. The command line stored is
  masked (no password of a URL in it): nothing secret reaches the index.

Scope: every lock is repository-wide (all hosts), except HOST_LOCAL ones: an image-<hash>
lock (sources/image.py) names a file by its path on one host, and the same path on two hosts
is two files, so it is keyed (and its rows named) per host, as flock scoped it.

How long a dead holder keeps a lock:
- the process dies (SIGKILL, crash, exit) on a host that lives: its kernel closes the socket,
  the server ends the session and drops its locks at once (milliseconds);
- the host vanishes (power cut, network gone): nothing closes the socket, so the server finds
  out from TCP. Each lock connection sets the server side of it: tcp_keepalives_idle 10 s,
  tcp_keepalives_interval 5 s, tcp_keepalives_count 3 (an idle connection is declared dead
  10 + 3 * 5 = 25 s after its last traffic) and tcp_user_timeout 25 s (the same bound when the
  server's last reply was never acknowledged). So the lock is free again at most about 25 s
  (LOCK_DEAD_PEER_S) after the host went away.
  A pooler in between (pgbouncer) would see those keepalives instead of the server, and its
  transaction pooling breaks session locks altogether: connect the index directly (or through
  session pooling).
- The other side of that bound: a holder cut off from the server for longer loses its lock while
  it still runs. PgLock.held() tells (a round trip on the lock's connection); a writer should ask
  it before it commits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid

from ..errors import LockedError
from .index import PG_CONNECT_ARGS, is_postgresql_url, psycopg_url
from .indexerrors import index_error, pg_where
from .indexretry import Connector
from .locks import SHARED_GRACE_S, FlockLocks, masked_command

log = logging.getLogger(__name__)

_HOST = socket.gethostname()

# server-side TCP settings of a lock connection (see the module doc): a vanished host's locks
# are freed LOCK_DEAD_PEER_S after its last traffic
KEEPALIVE = (10, 5, 3)      # tcp_keepalives_idle, _interval (seconds), _count
LOCK_DEAD_PEER_S = KEEPALIVE[0] + KEEPALIVE[1] * KEEPALIVE[2]


def _session_setup(keepalive: tuple[int, int, int]) -> str:
    idle, interval, count = (int(v) for v in keepalive)
    return (f"SET tcp_keepalives_idle = {idle}; SET tcp_keepalives_interval = {interval}; "
            f"SET tcp_keepalives_count = {count}; SET tcp_user_timeout = {(idle + interval * count) * 1000}; "
            # a lock is held by an idle session for as long as its run lasts (a serve: days): no
            # server or role default may end it
            "SET idle_session_timeout = 0; SET idle_in_transaction_session_timeout = 0")

_LIVE = """EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
             AND l.pid = h.backend_pid AND l.objsubid = 1
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND l.classid = %(hi)s::bigint::oid AND l.objid = %(lo)s::bigint::oid)"""


HOST_LOCAL = ("image-",)     # lock-name prefixes scoped to this host (see the module doc)


def scoped_name(name: str) -> str:
    """The name lock *name* has in the database: host-local ones carry this host's name."""
    return f"{name}@{_HOST}" if name.startswith(HOST_LOCAL) else name


def lock_service(index_url: str, repo_id: str, lock_dir: str):
    """The lock service of a repository: PgLocks when its index is on PostgreSQL (many hosts),
    else FlockLocks in *lock_dir*."""
    if is_postgresql_url(index_url):
        return PgLocks(index_url, repo_id)
    return FlockLocks(lock_dir)


def lock_key(repo_id: str, name: str) -> int:
    """The advisory lock key (signed 64-bit) of lock *name* of repository *repo_id*."""
    return int.from_bytes(hashlib.blake2b(f"{repo_id}:{name}".encode(), digest_size=8).digest(), "big",
                          signed=True)


def _key_halves(key: int) -> dict:
    u = key & 0xFFFF_FFFF_FFFF_FFFF     # pg_locks shows a bigint key as classid (high), objid (low)
    return {"hi": u >> 32, "lo": u & 0xFFFF_FFFF}


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _connect_kwargs(index_url: str) -> dict:
    from sqlalchemy.engine import make_url

    url = make_url(psycopg_url(index_url))
    kw = {k: v for k, v in (("host", url.host), ("port", url.port), ("user", url.username),
                            ("password", url.password), ("dbname", url.database)) if v is not None}
    kw.update({k: (v if isinstance(v, str) else v[-1]) for k, v in url.query.items()})
    for k, v in PG_CONNECT_ARGS.items():
        kw.setdefault(k, v)
    kw["application_name"] = "nbdbackup-lock" if kw["application_name"] == "nbdbackup" else kw["application_name"]
    return kw


class PgLock:
    """One held advisory lock on its own connection; release() (or the session's end) frees it."""

    def __init__(self, service: "PgLocks", name: str, *, exclusive: bool, conn, holder_id: str | None):
        self.name = name
        self.exclusive = exclusive
        self._service = service
        self._conn = conn
        self._holder_id = holder_id

    @property
    def backend_pid(self) -> int | None:
        return self._conn.info.backend_pid if self._conn is not None else None

    def held(self) -> bool:
        """Is the lock still ours (its session alive and holding it)? False after a lost connection."""
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            return bool(conn.execute(f"SELECT {_LIVE.replace('h.backend_pid', 'pg_backend_pid()')}",
                                     _key_halves(self._service.key(self.name))).fetchone()[0])
        except self._service.psycopg.Error:
            return False

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._holder_id is not None:
                conn.execute("DELETE FROM lock_holders WHERE id = %s", (self._holder_id,))
            # free now: the server ends a closed session a moment after close() returns
            conn.execute("SELECT pg_advisory_unlock_all()")
        except self._service.psycopg.Error as e:   # a lost connection: the lock went with it
            log.debug("lock %s: release on a lost connection: %s", self.name, e)
        finally:
            conn.close()     # ends the session (the lock would go with it anyway)
            self._service.forget(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class PgLocks:
    """The lock service of a repository indexed on PostgreSQL at *index_url* (see the module doc)."""

    def __init__(self, index_url: str, repo_id: str, *, command: str | None = None,
                 keepalive: tuple[int, int, int] = KEEPALIVE):
        """*command*: the holder rows' command line (default: this process's, masked);
        *keepalive*: the server-side TCP keepalive of lock connections (idle s, interval s, count)."""
        import psycopg

        self.psycopg = psycopg
        self.repo_id = repo_id
        self._kwargs = _connect_kwargs(index_url)
        self._where = pg_where(psycopg_url(index_url))
        self._command = command if command is not None else masked_command()
        self._setup = _session_setup(keepalive)
        self._connector = Connector(self._where)     # waits out a restarting server, as the index engine does
        self._mutex = threading.Lock()       # guards the service connection and _held
        self._svc = None                     # probes and holder reads (no lock is ever left on it)
        self._held: set[PgLock] = set()

    def key(self, name: str) -> int:
        return lock_key(self.repo_id, scoped_name(name))

    # -- connections ----------------------------------------------------------
    def _connect(self, what: str):
        conn = self._connector.connect(lambda: self.psycopg.connect(**self._kwargs, autocommit=True),
                                       self.psycopg.Error, what)
        try:
            conn.execute(self._setup)
        except self.psycopg.Error as e:
            conn.close()
            raise index_error(e, what, path=None, where=self._where) from None
        return conn

    def _on_service(self, what: str, fn):
        """fn(conn) on the service connection (under the mutex), once more on a new one if it was lost."""
        with self._mutex:
            for attempt in (0, 1):
                if self._svc is None or self._svc.closed:
                    self._svc = self._connect(what)
                try:
                    return fn(self._svc)
                except self.psycopg.OperationalError as e:
                    self._svc.close()
                    self._svc = None
                    if attempt:
                        raise index_error(e, what, path=None, where=self._where) from None

    def forget(self, lk: PgLock) -> None:
        with self._mutex:
            self._held.discard(lk)

    # -- the lock service API ---------------------------------------------------
    def lock(self, name: str, *, exclusive: bool, wait: float = 0.0, purpose: str | None = None) -> PgLock:
        what = f"taking the {name} lock"
        conn = self._connect(what)
        try:
            self._try_until(conn, name, exclusive=exclusive, wait=wait, purpose=purpose)
            holder_id = self._write_holder(conn, name, exclusive, purpose)
        except self.psycopg.Error as e:
            conn.close()
            raise index_error(e, what, path=None, where=self._where) from None
        except BaseException:
            conn.close()
            raise
        lk = PgLock(self, name, exclusive=exclusive, conn=conn, holder_id=holder_id)
        with self._mutex:
            self._held.add(lk)
        return lk

    def _try_until(self, conn, name: str, *, exclusive: bool, wait: float, purpose: str | None) -> None:
        fn = "pg_try_advisory_lock" if exclusive else "pg_try_advisory_lock_shared"
        key = self.key(name)
        deadline = time.monotonic() + max(wait, 0.0 if exclusive else SHARED_GRACE_S)
        while not conn.execute(f"SELECT {fn}(%s)", (key,)).fetchone()[0]:
            if time.monotonic() >= deadline:
                raise LockedError(self._blocked_message(name, purpose),
                                  hint="wait for it to finish, or pass --lock-wait SECONDS")
            pause = 0.1 if wait > 0 else 0.005    # within the short grace only, retry often
            time.sleep(min(pause, max(deadline - time.monotonic(), pause / 10)))

    def _write_holder(self, conn, name: str, exclusive: bool, purpose: str | None) -> str | None:
        hid = uuid.uuid4().hex
        try:
            conn.execute("INSERT INTO lock_holders (id, lock_name, backend_pid, host, pid, command, since_ms, mode, "
                         "purpose) VALUES (%s, %s, pg_backend_pid(), %s, %s, %s, %s, %s, %s)",
                         (hid, scoped_name(name), _HOST, os.getpid(), self._command, int(time.time() * 1000),
                          "exclusive" if exclusive else "shared", purpose))
        except (self.psycopg.errors.UndefinedTable, self.psycopg.errors.InsufficientPrivilege,
                self.psycopg.errors.ReadOnlySqlTransaction) as e:
            log.debug("lock %s taken without a holder row: %s", name, e)
            return None     # the lock is what counts; the row is a courtesy
        return hid

    def _blocked_message(self, name: str, purpose: str | None) -> str:
        what = purpose or f"lock {name}"
        try:
            hs = self.holders(name)
        except Exception as e:     # the lock is busy, whatever the holder rows say
            log.debug("holders of %s unreadable: %s", name, e)
            hs = []
        if not hs:
            return f"repository is locked: cannot take {what} (holder unknown)"
        desc = "; ".join(f"pid {h['pid']} on {h['host']} since {h['since']} ({h['mode']}): {h['command']}"
                         for h in hs)
        return f"repository is locked: cannot take {what}; held by {desc}"

    def probe_free(self, name: str) -> bool:
        """Is lock *name* free right now? A try-lock and unlock on the service connection (no row)."""
        key = self.key(name)

        def probe(c):
            if not c.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                return False
            c.execute("SELECT pg_advisory_unlock(%s)", (key,))
            return True
        try:
            return self._on_service(f"probing the {name} lock", probe)
        except Exception as e:      # let the real attempt report the problem
            log.debug("probe of lock %s failed: %s", name, e)
            return True

    def holders(self, name: str) -> list[dict]:
        """The live holders of lock *name* (pid, host, command, since, mode, purpose); rows of
        sessions that no longer hold it are deleted."""
        args = {"name": scoped_name(name), **_key_halves(self.key(name))}

        def read(c):
            try:
                rows = c.execute("SELECT h.id, h.pid, h.host, h.command, h.since_ms, h.mode, h.purpose, "
                                 f"{_LIVE} FROM lock_holders h WHERE h.lock_name = %(name)s "
                                 "ORDER BY h.since_ms, h.id", args).fetchall()
            except (self.psycopg.errors.UndefinedTable, self.psycopg.errors.InsufficientPrivilege):
                return []
            stale = [r[0] for r in rows if not r[7]]
            if stale:
                try:
                    c.execute("DELETE FROM lock_holders WHERE id = ANY(%s)", (stale,))
                except (self.psycopg.errors.InsufficientPrivilege, self.psycopg.errors.ReadOnlySqlTransaction):
                    pass
            return [{"pid": r[1], "host": r[2], "command": r[3], "since": _iso(r[4]), "mode": r[5],
                     "purpose": r[6]} for r in rows if r[7]]
        return self._on_service(f"reading the holders of the {name} lock", read)

    def close(self) -> None:
        """Release every lock this service holds and close its connections."""
        with self._mutex:
            held, self._held = list(self._held), set()
            svc, self._svc = self._svc, None
        for lk in held:
            lk.release()
        if svc is not None:
            svc.close()
