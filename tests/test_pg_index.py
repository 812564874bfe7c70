"""The index on a real PostgreSQL 15: migrations, schema equality, errors, lost connections."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from sqlalchemy import inspect, select, text

from helpers.pg import free_port
from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, pseudo, read_all, write_backup
from helpers.support import nbdbackup
from nbdbackup.errors import CredentialsError, ExitCode, RepoDamaged, StorageUnreachable
from nbdbackup.repo import Repository
from nbdbackup.repo.index import (
    check_revision,
    current_revision,
    make_engine,
    psycopg_url,
    shown_url,
    upgrade,
    url_without_password,
    write_txn,
)
from nbdbackup.repo.indexerrors import index_errors
from nbdbackup.repo.indexretry import has_row, retry_read, retry_write
from nbdbackup.repo.schema import INDEX_REVISION, metadata, packs

# PostgreSQL's spelling of the same type (FLOAT without precision is double precision there)
_SAME_TYPE = {"FLOAT": "DOUBLE PRECISION"}


def _type(t, dialect) -> str:
    s = str(t.compile(dialect=dialect))
    return _SAME_TYPE.get(s, s) if dialect.name == "postgresql" else s


@pytest.fixture(params=["sqlite", "postgresql"])
def any_index_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/x.sqlite"
    else:
        yield request.getfixturevalue("pg_url")


def test_migrated_schema_equals_code_schema_everywhere(any_index_url):
    """`alembic upgrade head` on SQLite and on PostgreSQL makes exactly schema.py's tables:
    columns with their types and nullability, primary and foreign keys, unique constraints, indexes."""
    eng = make_engine(any_index_url)
    assert upgrade(eng) == (None, INDEX_REVISION)
    insp = inspect(eng)
    d = eng.dialect
    assert set(insp.get_table_names()) == {t.name for t in metadata.sorted_tables} | {"alembic_version"}
    for t in metadata.sorted_tables:
        got = {c["name"]: c for c in insp.get_columns(t.name)}
        assert set(got) == {c.name for c in t.columns}, t.name
        for c in t.columns:
            assert _type(got[c.name]["type"], d) == _type(c.type, d), (t.name, c.name)
            assert got[c.name]["nullable"] == c.nullable, (t.name, c.name)
        assert set(insp.get_pk_constraint(t.name)["constrained_columns"]) == {c.name for c in t.primary_key}
        fks = {(tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
               for f in insp.get_foreign_keys(t.name)}
        assert fks == {((f.parent.name,), f.column.table.name, (f.column.name,)) for f in t.foreign_keys}, t.name
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints(t.name)}
        uniques |= {tuple(i["column_names"]) for i in insp.get_indexes(t.name) if i["unique"]}
        assert {(c.name,) for c in t.columns if c.unique} <= uniques, t.name
        got_ix = {i["name"]: tuple(i["column_names"]) for i in insp.get_indexes(t.name)}
        for i in t.indexes:
            assert got_ix.get(i.name) == tuple(c.name for c in i.columns), (t.name, i.name)
    with eng.connect() as c:
        assert c.execute(text("SELECT epoch FROM gc_state WHERE id = 1")).scalar() == 1
    eng.dispose()


def test_stepwise_migrations_on_postgresql(pg_url):
    eng = make_engine(pg_url)
    assert upgrade(eng, "0001") == (None, "0001")
    assert upgrade(eng, "0002") == ("0001", "0002")
    assert upgrade(eng) == ("0002", INDEX_REVISION)
    check_revision(eng, "here")
    eng.dispose()


def test_repository_with_postgresql_index(tmp_path, pg_url):
    """A local repository on a PostgreSQL index: back up, read back, reopen from a stored URL
    without the password (libpq finds it in PGPASSWORD)."""
    repo = new_repo(tmp_path / "repo", index_url=pg_url)
    data = pseudo(3, 5 * CS)
    info = write_backup(repo, "vda", data)
    again = write_backup(repo, "vdb", data)          # deduplicated against vda
    assert again.stored_bytes < len(data) // 4
    repo.close()
    bare = url_without_password(pg_url)
    assert "testpass" not in bare
    os.environ["PGPASSWORD"] = "testpass"
    with Repository.open(str(tmp_path / "repo"), index_url=bare) as r:
        assert [b.id for b in r.list_backups()] == [info.id, again.id]
        assert read_all(r, info.id) == data
        assert r.stats()["backups"] == 2


def test_any_postgresql_driver_url_is_driven_through_psycopg(pg_url, caplog):
    bare = pg_url.replace("postgresql+psycopg://", "postgresql://")
    assert psycopg_url(bare) == pg_url
    eng = make_engine(pg_url.replace("postgresql+psycopg://", "postgresql+psycopg2://"))
    assert eng.url.drivername == "postgresql+psycopg"
    assert "psycopg2" in caplog.text and "testpass" not in caplog.text
    with eng.connect() as c:
        assert c.execute(text("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                         ).scalar() == "nbdbackup"
        params = c.connection.driver_connection.info.get_parameters()
        assert params["keepalives_idle"] == "10" and params["connect_timeout"] == "5"
    eng.dispose()
    assert psycopg_url("sqlite:///x") == "sqlite:///x"


def test_password_is_masked_and_never_stored():
    url = "postgresql+psycopg://alice:s3cr%40t@db.example:6543/idx?sslmode=require&password=other"
    assert url_without_password(url) == "postgresql+psycopg://alice@db.example:6543/idx?sslmode=require"
    shown = shown_url(url)
    assert "s3cr" not in shown and "other" not in shown and "alice" in shown and "6543" in shown
    assert url_without_password("sqlite:////r/index.sqlite") == "sqlite:////r/index.sqlite"


def test_wrong_password_is_credentials_error(pg_server, pg_url):
    bad = pg_url.replace(":testpass@", ":n0tTheRightOne@")
    eng = make_engine(bad)
    t0 = time.monotonic()
    with pytest.raises(CredentialsError) as ei:
        check_revision(eng, "repo")
    assert time.monotonic() - t0 < 2.0                 # never retried
    msg = ei.value.user_message()
    assert f"127.0.0.1:{pg_server.port}" in msg and "PGPASSWORD" in msg and ".pgpass" in msg
    assert "n0tTheRightOne" not in msg and ei.value.exit_code == ExitCode.CREDENTIALS


def test_closed_port_is_storage_unreachable_fast():
    port = free_port()
    eng = make_engine(f"postgresql+psycopg://test:pw123secret@127.0.0.1:{port}/test")
    t0 = time.monotonic()
    with pytest.raises(StorageUnreachable) as ei:
        check_revision(eng, "repo")
    took = time.monotonic() - t0
    assert 1.0 < took < 6.0, took            # retried a little (FIRST_CONNECT_S), then told
    msg = ei.value.user_message()
    assert f"127.0.0.1:{port}" in msg and "pw123secret" not in msg and "refused" in msg.lower()


def test_missing_database_is_repo_damaged_with_hint(pg_server):
    eng = make_engine(pg_server.db_url("no_such_db"))
    with pytest.raises(RepoDamaged) as ei:
        check_revision(eng, "repo")
    msg = ei.value.user_message()
    assert "no_such_db" in msg and "does not exist" in msg and "--index-url" in msg and "testpass" not in msg


def _cli_repo(tmp_path, pg_url) -> str:
    path = str(tmp_path / "repo")
    new_repo(path, index_url=pg_url).close()
    return path


def test_cli_exit_codes_and_no_password(tmp_path, pg_server, pg_url):
    path = _cli_repo(tmp_path, pg_url)
    r = nbdbackup("list", "--repo", path, "--index-url", pg_url.replace(":testpass@", ":Wr0ngPass@"),
                  check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == ExitCode.CREDENTIALS, r.stderr
    assert "Wr0ngPass" not in r.stderr + r.stdout and "Traceback" not in r.stderr and "hint:" in r.stderr
    port = free_port()
    r = nbdbackup("list", "--repo", path, "--json", "--index-url",
                  f"postgresql+psycopg://test:Wr0ngPass@127.0.0.1:{port}/x", check=False, capture_output=True,
                  text=True, timeout=60)
    assert r.returncode == ExitCode.STORAGE_UNREACHABLE, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "Wr0ngPass" not in r.stderr + r.stdout
    assert '"exit_code": 17' in r.stdout


def test_restart_between_two_queries(pg_server, pg_url):
    """pool_pre_ping + the connect retry: after a server restart the next read simply works."""
    eng = make_engine(pg_url)
    upgrade(eng)
    with eng.connect() as c:
        before = c.execute(text("SELECT pg_backend_pid()")).scalar()
    pg_server.restart()
    with eng.connect() as c:
        assert current_revision(c) == INDEX_REVISION
        assert c.execute(text("SELECT pg_backend_pid()")).scalar() != before
    eng.dispose()


def test_connect_waits_for_a_server_coming_back(pg_server, pg_url):
    """A server down for a moment (stopped, started 2 s later): the next read waits for it."""
    eng = make_engine(pg_url)
    upgrade(eng)
    pg_server.stop()
    t = threading.Timer(2.0, pg_server.start)
    t.start()
    try:
        t0 = time.monotonic()
        assert retry_read(lambda: _revision(eng)) == INDEX_REVISION
        assert time.monotonic() - t0 >= 1.5
    finally:
        t.join()
    eng.dispose()


def _revision(eng):
    with eng.connect() as c:
        return current_revision(c)


def _kill_sessions(pg_server, app="nbdbackup"):
    with pg_server.admin() as a:
        a.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                  "AND pid <> pg_backend_pid()", (app,))


def test_write_lost_before_commit_is_redone(pg_server, pg_url):
    eng = make_engine(pg_url)
    upgrade(eng)
    calls = []

    def body(conn):
        calls.append(1)
        conn.execute(packs.insert().values(name=f"{len(calls):032x}", size=1, created_ms=1))
        if len(calls) == 1:
            _kill_sessions(pg_server)          # the connection dies inside the transaction
            conn.execute(text("SELECT 1"))
        return len(calls)

    assert retry_write(eng, body) == 2
    with eng.connect() as c:
        assert [r[0] for r in c.execute(select(packs.c.name))] == [f"{2:032x}"]   # the first never landed
    eng.dispose()


def test_write_transactions_queue_like_sqlite(pg_url):
    """Two index writers on PostgreSQL run one after the other (the advisory write lock), so a
    read-then-insert inside write_txn is atomic, as BEGIN IMMEDIATE makes it on SQLite."""
    eng = make_engine(pg_url)
    upgrade(eng)
    order = []

    def writer(tag):
        with write_txn(eng) as c:
            n = c.execute(text("SELECT count(*) FROM packs")).scalar()
            order.append((tag, "in"))
            time.sleep(0.3)
            c.execute(packs.insert().values(name=f"{n:032x}", size=1, created_ms=1))   # unique name: n
            order.append((tag, "out"))

    ths = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert [s for _, s in order] == ["in", "out"] * 3
    with eng.connect() as c:
        assert c.execute(text("SELECT count(*) FROM packs")).scalar() == 3
    eng.dispose()


class CommitCutter:
    """A TCP proxy to PostgreSQL that cuts the first connection sending COMMIT: "before" drops
    the COMMIT (the server never commits), "after" forwards it, waits for the server's answer
    and drops that (committed, but the client cannot know)."""

    def __init__(self, port: int, mode: str):
        self.port, self.mode, self.cut = port, mode, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listen_port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src, dst, upstream):
        try:
            while data := src.recv(65536):
                if upstream and b"COMMIT" in data and not self.cut.is_set():
                    self.cut.set()
                    if self.mode == "after":
                        dst.sendall(data)
                        dst.recv(65536)          # the server's answer: committed
                    for s in (src, dst):
                        s.shutdown(socket.SHUT_RDWR)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("mode", ["before", "after"])
def test_write_lost_during_commit_asks_whether_it_landed(pg_server, pg_url, mode):
    eng = make_engine(pg_url)
    upgrade(eng)
    proxy = CommitCutter(pg_server.port, mode)
    via = make_engine(pg_url.replace(f":{pg_server.port}/", f":{proxy.listen_port}/"))
    calls = []

    def body(conn):
        calls.append(1)
        conn.execute(packs.insert().values(name="ab" * 16, size=len(calls), created_ms=1))
        return len(calls)

    try:
        assert retry_write(via, body, landed=has_row(packs.c.name, "ab" * 16)) == (2 if mode == "before" else 1)
        assert proxy.cut.is_set()
    finally:
        proxy.close()
        via.dispose()
    with eng.connect() as c:
        assert c.execute(select(packs.c.size)).all() == [(len(calls),)]
    eng.dispose()


def test_write_lost_during_commit_is_not_retried_blindly(pg_server, pg_url):
    eng = make_engine(pg_url)
    upgrade(eng)
    proxy = CommitCutter(pg_server.port, "after")
    via = make_engine(pg_url.replace(f":{pg_server.port}/", f":{proxy.listen_port}/"))
    calls = []

    def body(conn):
        calls.append(1)
        conn.execute(packs.insert().values(name="cd" * 16, size=1, created_ms=1))

    try:
        with pytest.raises(StorageUnreachable):
            with index_errors("writing the index", index_db=via):
                retry_write(via, body)
    finally:
        proxy.close()
        via.dispose()
    assert len(calls) == 1
    with eng.connect() as c:
        assert c.execute(select(packs.c.name)).scalars().all() == ["cd" * 16]    # it had landed
    eng.dispose()


def test_concurrent_writers_of_the_same_data(tmp_path, pg_url):
    """Two writers (two repository handles, as two hosts would be) store the same chunks at the
    same time: the pack index transactions queue (the advisory write lock), so no duplicate-key
    failure; the index keeps one row per chunk and both backups read back."""
    path = tmp_path / "repo"
    new_repo(path, index_url=pg_url, pack_size=4 * CS).close()
    data = pseudo(7, 64 * CS)
    repos = [Repository.open(str(path), index_url=pg_url) for _ in range(2)]
    out, errors = {}, []

    def run(i):
        try:
            out[i] = write_backup(repos[i], f"vd{'ab'[i]}", data)
        except Exception as e:     # reported below
            errors.append(e)

    ths = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors, errors
    with repos[0].index_db.connect() as c:
        assert c.execute(text("SELECT count(*) FROM chunks")).scalar() == 64
    for i in range(2):
        assert read_all(repos[0], out[i].id) == data
        repos[i].close()


def test_read_lost_mid_query_is_read_again(pg_server, pg_url):
    eng = make_engine(pg_url)
    upgrade(eng)
    calls = []

    def read():
        calls.append(1)
        with eng.connect() as c:
            if len(calls) == 1:
                threading.Timer(0.3, _kill_sessions, args=(pg_server,)).start()
                c.execute(text("SELECT pg_sleep(5)"))
            return current_revision(c)

    t0 = time.monotonic()
    assert retry_read(read) == INDEX_REVISION and len(calls) == 2
    assert time.monotonic() - t0 < 3
    eng.dispose()


@pytest.mark.parametrize("delay", [0.2, 0.6])
def test_postgresql_restarted_during_a_backup(tmp_path, pg_server, pg_url, delay):
    """The server restarts (fast shutdown: every session cut) while packs are being indexed: the
    backup completes (pack transactions redone, connections made anew) or fails with exit 17
    and commits nothing; what is committed reads back bit-exact."""
    repo = new_repo(tmp_path / "repo", index_url=pg_url, pack_size=4 * CS)
    # big enough that the backup still runs at the later restart on a quiet, fast machine
    # (400 chunks once took under 0.6 s there)
    data = pseudo(11, 1600 * CS)
    marks = {}

    def restart():
        marks["restart"] = time.monotonic()
        pg_server.restart()

    t = threading.Timer(delay, restart)
    t.start()
    try:
        try:
            info = write_backup(repo, "vda", data)
        except StorageUnreachable:
            info = None
        marks["done"] = time.monotonic()
    finally:
        t.join()
    assert marks["restart"] < marks["done"], "the backup ended before the restart: make it bigger"
    assert [b.id for b in repo.list_backups()] == ([info.id] if info else [])
    if info:
        assert read_all(repo, info.id) == data
    repo.close()
