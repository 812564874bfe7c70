"""The narrow SQL interface of the read path and the lease protocol: text SQL, no SQLAlchemy.

A reader (restore, serve, verify) needs a few statements: the backup's row, its map, where
its records are, the revision check and its read lease. Each is written once here or in its
module as text with named parameters (:name), and runs on an IndexSql:

- SqliteIndex: a local SQLite index through the stdlib's sqlite3, with the connect settings
  SQLAlchemy's engine gets (index.make_engine: WAL, busy_timeout, foreign keys, BEGIN
  IMMEDIATE for writes). A restore then never imports SQLAlchemy, which costs 0.15 s here,
  a third of restoring a 512 MiB disk.
- EngineIndex: any index (PostgreSQL) through its SQLAlchemy engine; write() is
  index.write_txn, so PostgreSQL writers take the same advisory lock as every other writer.

Both hand out SqlConn: rows(sql, params) -> tuples, run(sql, params) -> rowcount. Errors are
the drivers' own (sqlite3.Error or SQLAlchemy's); index_errors() maps either.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from typing import Iterator, Sequence
from urllib.parse import quote

INDEX_REVISION = "0005"     # the head revision this code reads and writes (schema.py, migrations/)
BUSY_TIMEOUT_MS = 60_000
# what every read-write SQLite connection runs first (a read-only one keeps the file's journal mode)
SQLITE_PRAGMAS = (f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}", "PRAGMA foreign_keys=ON")
SQLITE_RW_PRAGMAS = ("PRAGMA journal_mode=WAL",) + SQLITE_PRAGMAS


def sqlite_uri(path: str, mode: str | None) -> str:
    """A sqlite3 URI for *path*: read-write (mode None), "ro", or "immutable" (read-only medium)."""
    query = {None: "", "ro": "?mode=ro", "immutable": "?mode=ro&immutable=1"}[mode]
    return f"file:{quote(os.path.abspath(path))}{query}"


def sqlite_connect(path: str, mode: str | None) -> sqlite3.Connection:
    """A connection to the SQLite index at *path* set up as index.make_engine's are; the caller
    begins its transactions (isolation_level None)."""
    conn = sqlite3.connect(sqlite_uri(path, mode), uri=True, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    for pragma in (SQLITE_RW_PRAGMAS if mode is None else SQLITE_PRAGMAS):
        conn.execute(pragma)
    return conn


def in_list(name: str, values: Sequence) -> tuple[str, dict]:
    """(":name0, :name1, ...", {name0: ...}) for an IN (...) of *values*."""
    params = {f"{name}{i}": v for i, v in enumerate(values)}
    return ", ".join(f":{k}" for k in params), params


class SqlConn:
    dialect: str

    def rows(self, sql: str, params: dict | None = None) -> list[tuple]:
        raise NotImplementedError

    def run(self, sql: str, params: dict | None = None) -> int:
        """Execute a statement that returns no rows; its rowcount."""
        raise NotImplementedError

    def scalar(self, sql: str, params: dict | None = None):
        got = self.rows(sql, params)
        return got[0][0] if got else None


class LiteConn(SqlConn):
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def rows(self, sql, params=None):
        return self._conn.execute(sql, params or {}).fetchall()

    def run(self, sql, params=None):
        return self._conn.execute(sql, params or {}).rowcount


class EngineConn(SqlConn):
    """A SQLAlchemy Connection (already in its transaction or not) behind SqlConn."""

    def __init__(self, conn):
        from sqlalchemy import text

        self._conn, self._text = conn, text
        self.dialect = conn.dialect.name

    def rows(self, sql, params=None):
        return [tuple(r) for r in self._conn.execute(self._text(sql), params or {})]

    def run(self, sql, params=None):
        return self._conn.execute(self._text(sql), params or {}).rowcount


def sql_conn(conn) -> SqlConn:
    """*conn* as a SqlConn: ours as it is, a SQLAlchemy Connection wrapped."""
    return conn if isinstance(conn, SqlConn) else EngineConn(conn)


class IndexSql:
    dialect: str
    read_only: bool = False     # a SQLite file this process cannot write (no lease can be taken)
    error_target: object        # what index_errors() is told: an engine or the SQLite URL

    def read(self) -> contextlib.AbstractContextManager[SqlConn]:
        """A read transaction (one snapshot for its statements)."""
        raise NotImplementedError

    def write(self) -> contextlib.AbstractContextManager[SqlConn]:
        """A write transaction, committed when the block ends without an error."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class SqliteIndex(IndexSql):
    """The SQLite index file *path* through sqlite3; *mode*: index.read_only_mode(). Each
    transaction takes an idle connection or opens one, and gives it back (at most KEEP_IDLE
    kept), as SQLAlchemy's pool does: threads that come and go (a serve's) leave nothing open."""

    dialect = "sqlite"
    KEEP_IDLE = 8

    def __init__(self, path: str, mode: str | None = None):
        self.path, self.mode = path, mode
        self.read_only = mode is not None
        self.error_target = f"sqlite:///{path}"
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _txn(self, begin: str) -> Iterator[SqlConn]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = sqlite_connect(self.path, self.mode)
        try:
            conn.execute(begin)
            try:
                yield LiteConn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except BaseException:
            conn.close()        # whatever state it is in, it is not handed out again
            raise
        with self._lock:
            if len(self._idle) < self.KEEP_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def read(self):
        return self._txn("BEGIN")

    def write(self):
        return self._txn("BEGIN IMMEDIATE")

    def close(self) -> None:
        with self._lock:
            conns, self._idle = self._idle, []
        for c in conns:
            c.close()


@contextlib.contextmanager
def write_txn(eng):
    """A write transaction on SQLAlchemy engine *eng* (BEGIN IMMEDIATE on SQLite, the writers'
    advisory lock on PostgreSQL: index.make_engine's begin hooks); commits on success."""
    with eng.connect().execution_options(nbdbackup_write=True) as conn:
        with conn.begin():
            yield conn


class EngineIndex(IndexSql):
    """An index through its SQLAlchemy engine."""

    def __init__(self, engine):
        self.engine = self.error_target = engine
        self.dialect = engine.dialect.name

    @contextlib.contextmanager
    def read(self):
        with self.engine.connect() as conn:
            yield EngineConn(conn)

    @contextlib.contextmanager
    def write(self):
        with write_txn(self.engine) as conn:
            yield EngineConn(conn)


def index_sql(index) -> IndexSql:
    """*index* (an IndexSql or a SQLAlchemy engine) as an IndexSql."""
    return index if isinstance(index, IndexSql) else EngineIndex(index)


def current_revision(conn: SqlConn) -> str | None:
    """The index's Alembic revision, None for an empty database."""
    if conn.dialect == "sqlite":
        found = conn.scalar("SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'")
    else:
        found = conn.scalar("SELECT 1 FROM information_schema.tables WHERE table_name = 'alembic_version' "
                            "AND table_schema = current_schema()")
    if not found:
        return None
    return conn.scalar("SELECT version_num FROM alembic_version")
