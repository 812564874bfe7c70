"""The one translation of index (database) errors into the documented error classes.

SQLite reports a full disk as "disk I/O error" or "database or disk is full" and a
read-only mount as "unable to open database file" or "attempt to write a readonly
database"; which one it was is read from the file system (fsutil.write_blocker), so
that a full, read-only or forbidden repository is never reported as a damaged index
with the harmful hint to rebuild it.

PostgreSQL (psycopg 3): libpq's connection failures carry no SQLSTATE, so they are
told apart by libpq's own words (pg_failure()): refused credentials are
CredentialsError (16), an unreachable or vanished server StorageUnreachable (17,
naming host:port, never the password), a missing database RepoDamaged (9): the
repository (config.json) was found, its index was not; that is what a missing
SQLite index file is too, and NotARepository would send the user to `init`, which
would make a second, empty repository instead of finding the first one's index.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import sys

from ..errors import (
    CredentialsError,
    LockedError,
    NbdBackupError,
    NoSpaceError,
    RepoDamaged,
    StorageUnreachable,
    storage_error,
)
from ..fsutil import write_blocker

REBUILD_HINT = ("an interrupted step leaves at most orphans for the next gc; "
                "`nbdbackup rebuild-index` recreates the index from the packs")

# SQLite result codes where the file system, not the file's contents, may be the cause
_FS_CODES = ("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_FULL", "SQLITE_PERM")


def is_index_error(e: BaseException) -> bool:
    """Is *e* a database error: sqlite3's own, or SQLAlchemy's (only when it was imported: a
    restore from a local SQLite index never imports it)?"""
    if isinstance(e, sqlite3.Error):
        return True
    exc = sys.modules.get("sqlalchemy.exc")
    return exc is not None and isinstance(e, exc.SQLAlchemyError)


def index_path(engine_or_url) -> str | None:
    """The SQLite index file of an engine, IndexSql or URL, None for other databases (and :memory:)."""
    engine_or_url = getattr(engine_or_url, "error_target", engine_or_url)
    url = getattr(engine_or_url, "url", engine_or_url)
    url = url.render_as_string(hide_password=False) if hasattr(url, "render_as_string") else str(url)
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return None
    return url.removeprefix("sqlite:///").split("?", 1)[0]


# libpq's words (it gives connection failures no SQLSTATE); SQLSTATEs where the server sends one
_PG_CREDENTIALS = ("password authentication failed", "no password supplied", "no pg_hba.conf entry",
                   "authentication failed", "role \"", "permission denied for database")
_PG_UNREACHABLE = ("connection refused", "timeout expired", "timed out", "server closed the connection",
                   "could not connect", "could not translate host name", "no route to host",
                   "network is unreachable", "connection reset", "terminating connection", "the database system is",
                   "could not receive data", "could not send data", "ssl syscall error", "eof detected",
                   "consuming input failed", "sending query failed", "connection is lost", "connection is closed",
                   "the connection is closed", "no connection to the server", "host is down", "broken pipe")
_PG_UNREACHABLE_STATES = ("08", "57P01", "57P02", "57P03")
# libpq's words when TLS itself is refused (not "SSL SYSCALL error", a connection lost mid-TLS)
_PG_TLS = ("server does not support ssl", "certificate verify failed", "ssl error:", "root certificate file",
           "certificate present, but not private key", "could not load private key file",
           "could not read certificate file")
# pg_hba.conf's words for a connection refused because it is not TLS ("..., no encryption")
_PG_TLS_REQUIRED = "no encryption"


def pg_failure(e: BaseException) -> str | None:
    """What a PostgreSQL (psycopg) error *e* (or the SQLAlchemy error wrapping it) means:
    "credentials", "tls" (TLS asked for and refused: retrying cannot change it), "unreachable"
    (refused, timed out, lost, server shutting down), "no-database", "busy" (lock_timeout) or
    None (anything else: a query's own error)."""
    orig = getattr(e, "orig", None) or e
    if not type(orig).__module__.startswith("psycopg"):
        return None
    state = getattr(orig, "sqlstate", None) or ""
    low = str(orig).lower()
    if not state and low.rstrip().rstrip(".").endswith(_PG_TLS_REQUIRED):
        return "tls"        # before "no pg_hba.conf entry": the server takes only TLS from here
    if state.startswith("28") or (not state and any(s in low for s in _PG_CREDENTIALS)):
        return "credentials"
    if state == "3D000" or (not state and "database" in low and "does not exist" in low):
        return "no-database"
    if state == "55P03":
        return "busy"
    if not state and any(t in low for t in _PG_TLS):
        return "tls"
    if state.startswith(_PG_UNREACHABLE_STATES) or any(s in low for s in _PG_UNREACHABLE):
        return "unreachable"
    if getattr(e, "connection_invalidated", False):
        return "unreachable"
    if not state and type(orig).__name__ == "OperationalError":
        # a failure of the connection itself in words we do not know (another language?): never
        # "the index is damaged" with its hint to rebuild it
        return "unreachable"
    return None


def pg_where(engine_or_url) -> str:
    """host:port (or the socket directory) of a PostgreSQL engine or URL, for messages."""
    from sqlalchemy.engine import make_url

    engine_or_url = getattr(engine_or_url, "error_target", engine_or_url)
    url = getattr(engine_or_url, "url", engine_or_url)
    try:
        url = make_url(url)
    except Exception:
        return "the index database"
    host = url.host or url.query.get("host") or "localhost"
    host = host if isinstance(host, str) else ",".join(host)
    port = url.port or url.query.get("port") or 5432
    return f"{host}:{port}" + (f"/{url.database}" if url.database else "")


def _pg_error(kind: str, e: BaseException, what: str, where: str | None) -> NbdBackupError:
    orig = getattr(e, "orig", None) or e
    # libpq's first line says it (no password is ever in it); drop the repeated "connection failed:" words
    detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    detail = re.sub(r"^connection failed: (connection to server at [^:]*: )?", "", detail).strip()
    detail = re.sub(r"\s+", " ", re.sub(r"^(FATAL|ERROR):\s*", "", detail))
    at = where or "the index database"
    if kind == "credentials":
        return CredentialsError(f"the index database at {at} refused the credentials while {what}: {detail}",
                                hint="check the user and password: PGPASSWORD, ~/.pgpass (PGPASSFILE) or "
                                     "--index-url postgresql+psycopg://USER:PASSWORD@HOST/DB (the password "
                                     "is never stored in the repository)")
    if kind == "no-database":
        return RepoDamaged(f"the index database at {at} does not exist ({what}): {detail}",
                           hint="check the database name in --index-url (NBDBACKUP_INDEX_URL); if the index "
                                "was lost, create the database and run `nbdbackup rebuild-index`")
    if kind == "busy":
        return LockedError(f"the index stayed locked by other runs for too long while {what}: {detail}",
                           hint="nothing was committed; run again when the repository is less busy")
    if kind == "tls":
        return StorageUnreachable(f"TLS with the index database at {at} failed while {what}: {detail}",
                                  hint="check sslmode and sslrootcert in --index-url (libpq's names: a server "
                                       "that takes only TLS needs sslmode=require or verify-full, and "
                                       "verify-full the CA that signed the server's certificate) and that the "
                                       "server has ssl = on; nothing half-done was committed")
    return StorageUnreachable(f"cannot reach the index database at {at} while {what}: {detail}",
                              hint="check that PostgreSQL runs and that host and port in --index-url are right; "
                                   "nothing half-done was committed")


def index_error(e: Exception, what: str, *, path: str | None,
                damaged_hint: str = REBUILD_HINT, where: str | None = None) -> NbdBackupError:
    """*e* (a SQLAlchemy or DB-API error), met while *what* ("reading the index") on the index
    file *path* (SQLite) or the database at *where* (pg_where(): host:port), as the error to
    report: NoSpaceError, ReadOnlyError, PermissionDenied, LockedError, CredentialsError,
    StorageUnreachable or RepoDamaged."""
    orig = getattr(e, "orig", None) or e
    kind = pg_failure(e)
    if kind is not None:
        return _pg_error(kind, e, what, where)
    msg = str(orig)
    code = getattr(orig, "sqlite_errorname", "") or ""
    low = msg.lower() if isinstance(orig, sqlite3.Error) else ""   # dialect check: SQLite's words only
    if "database is locked" in low or code.startswith("SQLITE_BUSY"):
        return LockedError(f"the index stayed locked by other runs for too long while {what}: {msg}",
                           hint="nothing was committed; run again when the repository is less busy")
    file_level = code.startswith(_FS_CODES) or any(
        s in low for s in ("disk i/o error", "unable to open", "readonly database", "disk is full"))
    if file_level:
        blocker = write_blocker(path) if path else None
        found = storage_error(blocker, path or "the index", what) if blocker else None
        if found is not None:
            return found
        if code.startswith("SQLITE_FULL") or "disk is full" in low:
            return NoSpaceError(f"no space left for the index while {what}: {msg}",
                                hint="free space and run again; committed backups are intact")
    return RepoDamaged(f"{what}: the index is damaged or unreadable: {e.__class__.__name__}: {msg}",
                       hint=damaged_hint)


@contextlib.contextmanager
def index_errors(what: str, repo=None, *, index_db=None, damaged_hint: str = REBUILD_HINT):
    """Run an index step; an index error becomes index_error()'s class (RepoDamaged when the
    index itself is at fault). *repo* (or *index_db*, its SQLAlchemy engine) lets it tell a
    full or read-only file system apart."""
    try:
        yield
    except Exception as e:
        if not is_index_error(e):
            raise
        index_db = index_db if index_db is not None else getattr(repo, "index", None) or getattr(repo, "index_db", None)
        path = index_path(index_db) if index_db is not None else None
        where = pg_where(index_db) if index_db is not None and path is None else None
        raise index_error(e, what, path=path, damaged_hint=damaged_hint, where=where) from None


def write_error(e: BaseException, repo_path: str, engine) -> BaseException:
    """An index or OS error met while writing a backup, as the documented error class (*e*
    itself when it is neither): the one mapping shared with index open, locks and rebuild."""
    if isinstance(e, OSError):
        return storage_error(e.errno, e.filename or repo_path, "writing a backup") or e
    if is_index_error(e):
        path = index_path(engine)
        return index_error(e, "writing the index", path=path, where=None if path else pg_where(engine),
                           damaged_hint="nothing was committed; `nbdbackup verify` checks the repository")
    return e
