"""The read path's text SQL (repo/indexsql.py): one text of each statement on sqlite3 itself and
on SQLAlchemy's engine (SQLite and PostgreSQL), and a restore from a local SQLite index that
never imports SQLAlchemy."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from helpers.places import make_place
from helpers.repo import new_repo, pseudo, write_backup
from nbdbackup.errors import RepoDamaged
from nbdbackup.repo import Repository, leases
from nbdbackup.repo.index import check_revision, make_engine
from nbdbackup.repo.indexsql import EngineIndex, SqliteIndex

# a python that refuses to import SQLAlchemy, then runs the CLI with the arguments after "--"
_NO_SQLALCHEMY = textwrap.dedent("""
    import sys
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "sqlalchemy":
                raise ImportError(f"this run must not import {name}")
    sys.meta_path.insert(0, Refuse())
    sys.argv = ["nbdbackup"] + sys.argv[1:]
    from nbdbackup.cli.main import run
    run()
""")


def _cli_without_sqlalchemy(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_SQLALCHEMY, *args], capture_output=True, text=True,
                          timeout=120)


def test_restore_and_list_from_a_local_sqlite_index_import_no_sqlalchemy(tmp_path):
    data = pseudo(1, 3 * 64 * 1024) + bytes(64 * 1024) + pseudo(2, 64 * 1024)
    with new_repo(tmp_path / "repo") as repo:
        info = write_backup(repo, "vda", data, zero_holes=True)
    out = tmp_path / "out.raw"
    p = _cli_without_sqlalchemy("--repo", str(tmp_path / "repo"), "restore", "vda", str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == data
    # by id too, and a bad id is the documented NotFound (exit 11), still without SQLAlchemy
    out.unlink()
    assert _cli_without_sqlalchemy("--repo", str(tmp_path / "repo"), "restore", info.id, str(out)).returncode == 0
    assert out.read_bytes() == data
    p = _cli_without_sqlalchemy("--repo", str(tmp_path / "repo"), "restore", "nosuchdisk", str(tmp_path / "x"))
    assert p.returncode == 11 and "no backup id or disk named 'nosuchdisk'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    # list reads through the same statements
    p = _cli_without_sqlalchemy("--repo", str(tmp_path / "repo"), "--json", "list")
    assert p.returncode == 0 and [b["id"] for b in json.loads(p.stdout)] == [info.id], p.stderr
    # the guard itself works: a command that needs SQLAlchemy (stats: Core aggregates) fails under it
    assert _cli_without_sqlalchemy("--repo", str(tmp_path / "repo"), "stats").returncode != 0


def test_a_junk_sqlite_index_is_damage_through_sqlite3(tmp_path):
    new_repo(tmp_path / "repo").close()
    (tmp_path / "repo" / "index.sqlite").write_bytes(b"not a database at all" * 100)
    for wal in ("index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / "repo" / wal).unlink(missing_ok=True)
    with pytest.raises(RepoDamaged, match="damaged or unreadable"):
        check_revision(SqliteIndex(str(tmp_path / "repo" / "index.sqlite")), "here")
    p = _cli_without_sqlalchemy("--repo", str(tmp_path / "repo"), "restore", "vda", str(tmp_path / "out"))
    assert p.returncode == 9 and "rebuild-index" in p.stderr and "Traceback" not in p.stderr, p.stderr


def _index_pair(request, mode, tmp_path):
    """(the index a reader uses, the SQLAlchemy engine gc and writers use) of a new repository
    holding one backup, and that backup's id."""
    place = make_place(request, mode, tmp_path)
    with Repository.init(place.spec, chunk_size=64 * 1024, **place.init_options()) as repo:
        info = write_backup(repo, "vda", pseudo(3, 128 * 1024))
    engine = make_engine(place.index_url or f"sqlite:///{place.spec}/index.sqlite")
    reader = EngineIndex(engine) if place.index_url else SqliteIndex(f"{place.spec}/index.sqlite")
    return reader, engine, info.id


@pytest.mark.parametrize("mode", ["local", "local+pg"])
def test_a_lease_taken_on_one_driver_is_seen_and_ended_on_the_other(request, tmp_path, mode):
    reader, engine, bid = _index_pair(request, mode, tmp_path)
    try:
        lease = leases.reader_lease(reader, [bid])
        assert lease is not None and lease.pins == [bid]
        with engine.connect() as conn:
            held = leases.pinned_by(conn, [bid, "no-such-backup"])
        assert list(held) == [bid] and held[bid].startswith(f"read pid {os.getpid()} on {leases.HOST}")
        first = leases.begin_gc(engine, dry_run=True)
        assert first["live_leases"] == [held[bid]] and first["dead_leases"] == 0
        assert lease.start_epoch <= first["epoch"]
        assert lease.renew() and not lease.lost

        # a gc that finds it dead (its heartbeat older than the TTL) drops it and its pins;
        # the holder's next heartbeat says so
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE leases SET heartbeat_ms = heartbeat_ms - "
                                 f"{int(leases.LEASE_TTL_S * 1000) + 1000}")
        gone = leases.begin_gc(engine)
        assert gone["dead_leases"] == 1 and gone["live_leases"] == []
        assert gone["epoch"] == first["epoch"]      # dry_run showed the epoch this gc got
        assert not lease.renew() and lease.lost
        lease._reinstate()      # a reader takes it again, pins and all
        with engine.connect() as conn:
            assert list(leases.pinned_by(conn, [bid])) == [bid]
        lease.release()
        with engine.connect() as conn:
            assert leases.pinned_by(conn, [bid]) == {}
            assert conn.exec_driver_sql("SELECT count(*) FROM lease_pins").scalar() == 0
    finally:
        reader.close()
        engine.dispose()


def test_a_failed_write_on_sqlite3_rolls_back(tmp_path):
    with new_repo(tmp_path / "repo") as repo:
        info = write_backup(repo, "vda", pseudo(4, 64 * 1024))
    index = SqliteIndex(str(tmp_path / "repo" / "index.sqlite"))
    try:
        with pytest.raises(sqlite3.IntegrityError):
            with index.write() as conn:
                conn.run("INSERT INTO lease_pins (lease_id, backup_id) VALUES ('nobody', :b)", {"b": info.id})
        with index.read() as conn:      # the pin named no lease (foreign keys on) and left nothing
            assert conn.rows("SELECT * FROM lease_pins") == []
        lease = leases.Lease(index, "read", pins=[info.id])
        with pytest.raises(Exception, match="forgotten meanwhile"):
            lease.pin(["20200101T000000000Z-dead"])
        assert lease.pins == [info.id]
        lease.release()
        with index.read() as conn:
            assert conn.rows("SELECT * FROM leases") == []
    finally:
        index.close()


def test_a_read_only_sqlite_index_gives_no_lease(tmp_path):
    """(restores from a read-only repository: test_repo_readonly.py)"""
    with new_repo(tmp_path / "repo") as repo:
        info = write_backup(repo, "vda", pseudo(5, 64 * 1024))
    index = SqliteIndex(str(tmp_path / "repo" / "index.sqlite"), "ro")
    try:
        assert index.read_only and leases.reader_lease(index, [info.id]) is None
        with index.read() as conn:
            assert conn.scalar("SELECT id FROM backups") == info.id
    finally:
        index.close()


def test_sqlite_connections_are_pooled_not_kept_per_thread(tmp_path):
    """Threads that come and go (a serve's clients) leave at most KEEP_IDLE connections open."""
    import threading

    new_repo(tmp_path / "repo").close()
    index = SqliteIndex(str(tmp_path / "repo" / "index.sqlite"))
    gate = threading.Barrier(12)

    def read():
        with index.read() as conn:
            gate.wait(timeout=30)       # all twelve at once: twelve connections
            assert conn.scalar("SELECT count(*) FROM backups") == 0
    threads = [threading.Thread(target=read) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(index._idle) == SqliteIndex.KEEP_IDLE
    kept = list(index._idle)
    index.close()
    assert index._idle == []
    with pytest.raises(sqlite3.ProgrammingError):
        kept[0].execute("SELECT 1")
