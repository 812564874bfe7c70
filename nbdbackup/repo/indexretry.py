"""Riding out a lost index connection (PostgreSQL): bounded retries where they are safe.

A PostgreSQL server can restart, fail over or drop a connection under a running backup.
Three levels, each bounded (about 30 s in all, with back-off):

- connecting (install_connect_retry, on every PostgreSQL engine): a connect that is refused,
  times out or meets a server "starting up"/"shutting down" is tried again. Nothing was sent, so
  this is always safe. An engine that never connected gives up after FIRST_CONNECT_S (a wrong
  host or port is reported in seconds, exit 17); once it has connected, a server that went away
  is waited for up to RECONNECT_S. With pool_pre_ping (index.make_engine) a pooled connection
  that died while idle is replaced at checkout, so the next query simply works.
- a read (retry_read): a read that lost its connection is run again on a new one.
- a write transaction (retry_write): the lead's rule is that a transaction whose COMMIT may
  have reached the server is NOT retried blindly. A connection lost before COMMIT was sent
  rolled the transaction back on the server: it is redone. A connection lost DURING the COMMIT
  leaves the outcome unknown: retry_write then asks *landed(conn)* (a read that tells whether the
  transaction's effect is there, e.g. the pack's row by its unique name) and redoes the body only
  when it is not; without *landed* it raises (StorageUnreachable at the caller's index_errors).

Errors other than a lost connection (a constraint, a refused password, a missing database) are
never retried. The PostgreSQL-only parts do nothing for SQLite engines' errors (pg_failure is
None for them).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, TypeVar

from .indexerrors import index_error, is_index_error, pg_failure, pg_where

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

FIRST_CONNECT_S = 2.0       # an engine that never connected: a misconfiguration is reported fast
RECONNECT_S = 30.0          # a server that was there and went away (restart, failover)
BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)    # then 4 s each

T = TypeVar("T")


def connection_lost(e: BaseException) -> bool:
    """Is *e* a lost or refused connection (safe to retry when nothing may have been committed)?"""
    return pg_failure(e) == "unreachable"


def _pause(attempt: int) -> float:
    return BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]


def install_connect_retry(eng: Engine) -> None:
    """Retry the DB-API connect of *eng* while the server is unreachable (see the module doc);
    when it stays so, raise the documented error (StorageUnreachable, CredentialsError...) at
    once: every caller, wrapped in index_errors or not, then reports it the same way."""
    from sqlalchemy import event

    connector = Connector(pg_where(eng))

    @event.listens_for(eng, "do_connect")
    def _connect(dialect, _rec, cargs, cparams):
        return connector.connect(lambda: dialect.connect(*cargs, **cparams), dialect.loaded_dbapi.Error)


class Connector:
    """Connects with connect_fn(), retrying an unreachable server: FIRST_CONNECT_S until it
    once worked, RECONNECT_S after. Other errors, and the last one, are raised mapped
    (index_error: StorageUnreachable, CredentialsError, RepoDamaged for a missing database)."""

    def __init__(self, where: str):
        self.where = where
        self.connected = False

    def connect(self, connect_fn: Callable[[], T], errors, what: str = "connecting to the index") -> T:
        budget = RECONNECT_S if self.connected else FIRST_CONNECT_S
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            try:
                conn = connect_fn()
            except errors as e:
                pause = _pause(attempt)
                if not connection_lost(e) or time.monotonic() + pause > deadline:
                    raise index_error(e, what, path=None, where=self.where) from None
                if attempt == 0:    # a server that went away is news; a first connect that fails is told below
                    say = log.warning if self.connected else log.debug
                    say("index database at %s unreachable (%s); retrying for up to %.0f s",
                        self.where, _first_line(e), budget)
                time.sleep(pause)
                attempt += 1
                continue
            self.connected = True
            return conn


def retry_read(fn: Callable[[], T], *, budget: float = RECONNECT_S) -> T:
    """fn() (a read that opens its own connection), run again while its connection is lost."""
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_index_error(e):
                raise
            pause = _pause(attempt)
            if not connection_lost(e) or time.monotonic() + pause > deadline:
                raise
            log.warning("index connection lost while reading (%s); reading again", _first_line(e))
            time.sleep(pause)
            attempt += 1


def retry_write(eng: Engine, body: Callable[[Connection], T], *,
                landed: Callable[[Connection], bool] | None = None, budget: float = RECONNECT_S) -> T:
    """body(conn) in a write transaction (as index.write_txn: queued behind other writers),
    committed; redone on a new connection when the connection was lost before COMMIT. When it
    was lost during COMMIT, *landed(conn)* decides (True: it was committed, body's result is
    returned; False: redone); without *landed* the error is raised: never a blind retry."""
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        committing = False
        try:
            with eng.connect().execution_options(nbdbackup_write=True) as conn:
                trans = conn.begin()
                try:
                    result = body(conn)
                except BaseException:
                    trans.rollback()
                    raise
                committing = True
                trans.commit()
            return result
        except Exception as e:
            if not is_index_error(e):
                raise
            pause = _pause(attempt)
            if not connection_lost(e) or time.monotonic() + pause > deadline:
                raise
            if committing:
                if landed is None:
                    raise
                if retry_read(lambda: _landed(eng, landed), budget=max(deadline - time.monotonic(), 1.0)):
                    log.warning("index connection lost during COMMIT; the transaction had landed")
                    return result
            log.warning("index connection lost before the commit (%s); the transaction is redone", _first_line(e))
            time.sleep(pause)
            attempt += 1


def _landed(eng: Engine, landed: Callable[[Connection], bool]) -> bool:
    with eng.connect() as conn:
        return bool(landed(conn))


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def has_row(column, value) -> Callable[[Connection], bool]:
    """A *landed* check for retry_write: does a row with *column* == *value* exist (a unique
    name the transaction inserted, e.g. packs.c.name)?"""
    from sqlalchemy import select

    def check(conn: Connection) -> bool:
        return conn.execute(select(column).where(column == value).limit(1)).first() is not None
    return check
