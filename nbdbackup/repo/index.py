"""The index database: engine set-up, revision checks, and Alembic upgrades.

The index is reached through a SQLAlchemy URL; the SQLite file inside the
repository is the default. SQLite-only settings (WAL, busy_timeout, BEGIN
IMMEDIATE for writes) sit behind a dialect check so other databases work.

PostgreSQL (psycopg 3; any postgresql:// URL is driven through psycopg): a connect
timeout, client TCP keepalives, application_name "nbdbackup", pool_pre_ping (a
restarted server's dead pooled connections are replaced at checkout) and a connect
that waits out a restarting server (indexretry.install_connect_retry). A write
transaction (write_txn, migrations) takes a transaction-scoped advisory lock first,
so index writers queue one after another as SQLite's BEGIN IMMEDIATE makes them do:
the read-then-insert of a pack's records (sealer) stays atomic between hosts.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.resources
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RepoDamaged, RepoFormatError
from ..fsutil import write_blocker
from . import indexsql
from .indexerrors import index_errors
from .indexsql import (  # noqa: F401  (write_txn: its home for callers)
    BUSY_TIMEOUT_MS,
    INDEX_REVISION,
    EngineIndex,
    IndexSql,
    SqliteIndex,
    index_sql,
    write_txn,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"
KNOWN_REVISIONS = ("0001", "0002", "0003", "0004", "0005")   # oldest first; the last one is INDEX_REVISION

# libpq connection parameters for PostgreSQL (a URL's own ?key=value wins): a dead or unreachable
# server is found in seconds, not in TCP's minutes
PG_CONNECT_ARGS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                   "keepalives_count": 3, "tcp_user_timeout": 30_000, "application_name": "nbdbackup"}
# the transaction-scoped advisory lock every PostgreSQL index writer takes (write_txn)
PG_WRITE_LOCK_KEY = int.from_bytes(hashlib.blake2b(b"nbdbackup:index-writer", digest_size=8).digest(),
                                   "big", signed=True)


def default_url(repo_path: str) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join(repo_path, INDEX_FILE))}"


class IndexHandle:
    """The index of an open repository: its URL, the SQLAlchemy engine (made when first asked
    for: a restore from a local SQLite index never needs it) and the IndexSql the read path and
    the leases use (indexsql: sqlite3 itself for a SQLite file, else the engine)."""

    def __init__(self, url: str, *, read_only: str | None = None):
        self.url, self.read_only = url, read_only
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        path = _sqlite_file(url)
        self.sql: IndexSql = SqliteIndex(path, read_only) if path else EngineIndex(self.engine)
        self.dialect = self.sql.dialect

    @property
    def error_target(self):
        return self.sql.error_target

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = make_engine(self.url, read_only=self.read_only)
            return self._engine

    def dispose(self) -> None:
        self.sql.close()
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()


class IndexAccess:
    """index_db and sql for a holder of an IndexHandle in .index (Repository, RepoContext)."""

    index: IndexHandle

    @property
    def index_db(self) -> Engine:
        """The index's SQLAlchemy engine (not the engine/ package), made when first asked for."""
        return self.index.engine

    @property
    def sql(self) -> IndexSql:
        """The index for the read path's text statements and the leases (indexsql)."""
        return self.index.sql


def make_engine(url: str, *, read_only: str | None = None) -> Engine:
    """An engine for *url*. read_only ("ro", or "immutable" on a read-only file system) opens a
    SQLite index file read-only: a reading command then works where nothing can be written."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    is_sqlite = url.startswith("sqlite")
    kw = {"connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}} if is_sqlite else {}
    url = psycopg_url(url)
    if url.startswith("postgresql+psycopg:"):
        kw = _pg_engine_args(url)
    path = _sqlite_file(url)
    if read_only and path:
        kw = {"creator": _read_only_creator(path, immutable=read_only == "immutable")}
    try:
        eng = create_engine(url, **kw)
    except (SQLAlchemyError, ValueError, ImportError) as e:
        from ..errors import UsageError
        hint = (f"install the database driver ({e.name}) for this URL, or leave --index-url out for SQLite"
                if isinstance(e, ImportError) else None)
        if isinstance(e, ImportError) and (e.name or "").startswith("psycopg"):
            hint = "install nbdbackup's PostgreSQL extra: pip install 'nbdbackup[postgresql]' (psycopg 3)"
        raise UsageError(f"invalid index URL {_shown(url)!r}: {e}", hint=hint) from None
    if eng.dialect.name == "sqlite":
        _sqlite_setup(eng, read_only=bool(read_only and path))
    elif eng.dialect.name == "postgresql":
        _pg_setup(eng)
    return eng


def is_postgresql_url(url: str) -> bool:
    """Does *url* name a PostgreSQL index (any driver: psycopg_url() drives them all with psycopg)?"""
    return url.partition("://")[0].partition("+")[0] in ("postgresql", "postgres")


def psycopg_url(url: str) -> str:
    """*url* with any PostgreSQL driver replaced by psycopg (3), the one nbdbackup ships and whose
    errors it knows: postgresql:// and postgres:// quietly, another named driver with a warning."""
    scheme, sep, rest = url.partition("://")
    driver = scheme.partition("+")[2]
    if not sep or not is_postgresql_url(url) or driver == "psycopg":
        return url
    new = f"postgresql+psycopg://{rest}"
    if driver:
        log.warning("index URL %s names the %s driver; nbdbackup uses psycopg 3: connecting as %s",
                    _shown(url), driver, _shown(new))
    return new


def _pg_engine_args(url: str) -> dict:
    from sqlalchemy.engine import make_url

    try:
        query = make_url(url).query
    except Exception:       # create_engine reports the bad URL
        query = {}
    return {"pool_pre_ping": True,
            "connect_args": {k: v for k, v in PG_CONNECT_ARGS.items() if k not in query}}


def _pg_setup(eng: Engine) -> None:
    from sqlalchemy import event

    from .indexretry import install_connect_retry

    install_connect_retry(eng)

    @event.listens_for(eng, "begin")
    def _on_begin(conn):
        if conn.get_execution_options().get("nbdbackup_write", False):
            # writers queue like SQLite's BEGIN IMMEDIATE; lock_timeout bounds the wait as busy_timeout does
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {BUSY_TIMEOUT_MS}")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK_KEY})")


def _sqlite_file(url: str) -> str | None:
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:" or "?" in url:
        return None
    return url.removeprefix("sqlite:///")


def read_only_mode(url: str) -> str | None:
    """How to open the SQLite index at *url*: None (read-write) where it can be written;
    "ro" where this user may not write it (others may: WAL readers still share its -shm);
    "immutable" on a read-only file system, where nobody can write, so no -shm is needed
    (with a leftover -wal SQLite must still read it: then "ro")."""
    path = _sqlite_file(url)
    if path is None:
        return None
    blocker = write_blocker(path)
    if blocker == errno.EROFS:
        return "ro" if os.path.exists(path + "-wal") else "immutable"
    return "ro" if blocker == errno.EACCES else None


def _read_only_creator(path: str, *, immutable: bool):
    import sqlite3

    uri = indexsql.sqlite_uri(path, "immutable" if immutable else "ro")

    def connect():
        return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    return connect


def _shown(url) -> str:
    """*url* fit for messages and logs: the password masked (in a ?password= too)."""
    try:
        from sqlalchemy.engine import make_url
        u = make_url(url)
        if "password" in u.query:
            u = u.update_query_dict({"password": "***"})
        return u.render_as_string(hide_password=True)
    except Exception:   # unparseable: it has no password part we could find either
        return str(url)


shown_url = _shown     # the public name, for other modules


def url_without_password(url: str) -> str:
    """*url* without its password (user:PASSWORD@ and ?password=), e.g. to store it in the
    repository: libpq then finds the password in PGPASSWORD or ~/.pgpass. Other URLs unchanged."""
    from sqlalchemy.engine import URL, make_url

    try:
        u = make_url(url)
    except Exception:
        return url
    if u.password is None and "password" not in u.query:
        return url
    u = URL.create(u.drivername, username=u.username, password=None, host=u.host, port=u.port,
                   database=u.database, query={k: v for k, v in u.query.items() if k != "password"})
    return u.render_as_string(hide_password=False)


def _sqlite_setup(eng: Engine, *, read_only: bool = False) -> None:
    from sqlalchemy import event

    # pysqlite's own transaction handling defers BEGIN and cannot do BEGIN
    # IMMEDIATE; take it over so writers queue on busy_timeout instead of
    # failing with "database is locked" on a read->write upgrade.
    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn, _rec):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # the settings of indexsql's own connections; a read-only one keeps the file's journal mode
        for pragma in indexsql.SQLITE_PRAGMAS if read_only else indexsql.SQLITE_RW_PRAGMAS:
            cur.execute(pragma)
        cur.close()

    @event.listens_for(eng, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get("nbdbackup_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def current_revision(conn: Connection) -> str | None:
    """The index's Alembic revision, None for an empty database."""
    return indexsql.current_revision(indexsql.sql_conn(conn))


def check_revision(index, where: str) -> None:
    """RepoFormatError unless the index (an IndexSql or an engine) is at INDEX_REVISION."""
    index = index_sql(index)
    with index_errors(f"reading the index of {where}", index_db=index,
                      damaged_hint="check --index-url; `nbdbackup rebuild-index` recreates it from the packs"):
        with index.read() as conn:
            rev = indexsql.current_revision(conn)
    if rev == INDEX_REVISION:
        return
    if rev is None:
        raise RepoDamaged(f"the index of {where} has no schema version (empty or not an nbdbackup index)",
                          hint="`nbdbackup rebuild-index` recreates it from the packs")
    if rev in KNOWN_REVISIONS:
        raise RepoFormatError(f"the index of {where} is at revision {rev}, older than this tool's {INDEX_REVISION}",
                              hint="run `nbdbackup migrate` to upgrade it")
    raise RepoFormatError(f"the index of {where} is at revision {rev!r}, newer than this tool understands "
                          f"({INDEX_REVISION})", hint="upgrade nbdbackup")


# --- Alembic -----------------------------------------------------------------

def migrations_dir() -> str:
    """The Alembic script folder: installed as nbdbackup._migrations, else the source tree's migrations/."""
    try:
        p = importlib.resources.files("nbdbackup._migrations")
        if (Path(str(p)) / "env.py").exists():
            return str(p)
    except ModuleNotFoundError:
        pass
    src = Path(__file__).resolve().parents[2] / "migrations"
    if (src / "env.py").exists():
        return str(src)
    raise RepoDamaged("cannot find the index migration scripts (nbdbackup._migrations); reinstall nbdbackup")


def alembic_config(eng: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", migrations_dir())
    cfg.attributes["engine"] = eng
    return cfg


def upgrade_in(conn: Connection, revision: str = "head") -> None:
    """Upgrade the index reached by *conn* to *revision* inside the caller's open transaction
    (PostgreSQL: DDL is transactional, so the caller's commit or rollback decides)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", migrations_dir())
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


def upgrade(eng: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade the index to *revision*; returns (from, to)."""
    from alembic import command

    with eng.connect() as conn:
        before = current_revision(conn)
    command.upgrade(alembic_config(eng), revision)
    with eng.connect() as conn:
        after = current_revision(conn)
    return before, after
