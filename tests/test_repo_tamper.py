"""A tampered or bit-rotten index: verify says so, restore and serve never hand out wrong bytes.

SQL edits that keep SQLite consistent (a NULL segment hash, a segment hash of another backup, a
changed size) are caught by the manifest check; random bit flips and page corruption of
index.sqlite by integrity_check, the manifest check or the checked reads. The rule every case
keeps: verify exits non-zero, or every restore is bit-exact; a restore that exits 0 wrote the
backup's exact bytes; no traceback.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import disk_data, new_repo_path, write_backup
from helpers.serve import serve
from helpers.support import nbdbackup, require_tool, run
from nbdbackup.errors import RepoDamaged
from nbdbackup.repo import Repository

SEG = 8            # map positions per segment: every backup has several segments
PAGE = 4096


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A repository with three backups (vda full + incremental, vdb full) and their exact bytes.
    Each disk ends with a zero chunk, so a shorter size still reads a full last chunk."""
    path = new_repo_path(tmp_path_factory.mktemp("tamper") / "repo", segment_len=SEG, pack_size=256 * 1024)
    rng = random.Random(10)
    expected = {}
    with Repository.open(path) as repo:
        a0 = disk_data(rng, 20) + bytes(CS)
        b0 = write_backup(repo, "vda", a0)
        a1 = disk_data(rng, 20, base=a0, change=0.3) + bytes(CS)
        b1 = write_backup(repo, "vda", a1, parent=b0, changed=range(21))
        c0 = disk_data(rng, 20) + bytes(CS)
        c = write_backup(repo, "vdb", c0)
        expected = {b0.id: a0, b1.id: a1, c.id: c0}
    _checkpoint(path)
    return path, expected


def _checkpoint(path) -> None:
    """Fold the WAL into index.sqlite, so the file holds everything an edit or a flip can reach."""
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


@pytest.fixture
def repo_copy(pristine, tmp_path):
    path, expected = pristine
    dst = str(tmp_path / "repo")
    shutil.copytree(path, dst)
    return dst, expected


def _sql(path, stmt: str, *params):
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    try:
        rows = con.execute(stmt, params).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def _pk(path, bid) -> int:
    return _sql(path, "SELECT pk FROM backups WHERE id = ?", bid)[0][0]


def _restore(path, ref, out):
    return nbdbackup("restore", "--repo", path, ref, out, "--force", check=False)


def _no_traceback(p) -> None:
    assert "Traceback" not in p.stderr, p.stderr


# --- the three SQL edits --------------------------------------------------------

def _null_segment(path, victim, other):
    _sql(path, "UPDATE backup_segments SET segment_hash = NULL WHERE backup_pk = ? AND seq = 0", _pk(path, victim))
    return "segment list"


def _foreign_segment(path, victim, other):
    (h,) = _sql(path, "SELECT segment_hash FROM backup_segments WHERE backup_pk = ? AND seq = 0", _pk(path, other))[0]
    _sql(path, "UPDATE backup_segments SET segment_hash = ? WHERE backup_pk = ? AND seq = 0", h, _pk(path, victim))
    return "segment list"


def _smaller_size(path, victim, other):
    _sql(path, "UPDATE backups SET size = size - 512 WHERE id = ?", victim)   # same chunk and segment count
    return "size (index"


def _other_disk(path, victim, other):
    _sql(path, "UPDATE backups SET disk = 'vdc' WHERE id = ?", victim)
    return "disk (index 'vdc', manifest 'vda')"


def _double_chunk_size(path, victim, other):
    _sql(path, "UPDATE backups SET chunk_size = chunk_size * 2 WHERE id = ?", victim)
    return f"chunk_size (index {2 * CS}, manifest {CS})"


EDITS = {"null segment hash": _null_segment, "segment hash of another backup": _foreign_segment,
         "size changed": _smaller_size, "disk changed": _other_disk, "chunk size changed": _double_chunk_size}


@pytest.mark.parametrize("edit", list(EDITS))
def test_consistent_sql_edit_is_damage_and_restore_refuses(repo_copy, tmp_path, edit):
    path, expected = repo_copy
    vda_full, _, vdb = list(expected)
    field = EDITS[edit](path, vda_full, vdb)
    assert _sql(path, "PRAGMA integrity_check") == [("ok",)]     # SQLite itself sees nothing wrong

    p = nbdbackup("verify", "--repo", path, "--json", check=False)
    assert p.returncode == 5, p.stderr
    rep = json.loads(p.stdout)
    assert rep["index_check"] == "ok"
    (d,) = rep["damaged"]
    assert d["id"] == vda_full and d["index_rows_bad"]
    assert any("disagrees with its manifest" in pr and field in pr for pr in d["problems"]), d["problems"]
    p = nbdbackup("verify", "--repo", path, check=False)
    assert p.returncode == 5 and vda_full in p.stdout and field in p.stdout
    assert "rebuild-index" in p.stderr
    _no_traceback(p)

    out = str(tmp_path / "out.raw")
    p = _restore(path, vda_full, out)
    assert p.returncode == 9, p.stderr
    assert "manifest" in p.stderr and "hint:" in p.stderr and "rebuild-index" in p.stderr
    _no_traceback(p)
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".nbdbackup-restore-")]
    # the untouched backups restore exactly
    for bid in (vdb, list(expected)[1]):
        assert _restore(path, bid, out).returncode == 0
        assert open(out, "rb").read() == expected[bid]
    # and the hint works: the rows come back from the manifest, nothing was lost
    nbdbackup("rebuild-index", "--repo", path)
    nbdbackup("verify", "--repo", path)
    assert _restore(path, vda_full, out).returncode == 0
    assert open(out, "rb").read() == expected[vda_full]


def test_null_manifest_hash_is_damage(repo_copy, tmp_path):
    """manifest_hash is NOT NULL in the schema, but an index edited to drop it is damage too."""
    path, expected = repo_copy
    vdb = list(expected)[2]
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    con.execute("PRAGMA writable_schema = ON")      # drop the NOT NULL, as a careless hand edit could
    con.execute("UPDATE sqlite_master SET sql = replace(sql, 'manifest_hash BLOB NOT NULL', 'manifest_hash BLOB') "
                "WHERE name = 'backups'")
    con.commit()
    con.close()
    _sql(path, "UPDATE backups SET manifest_hash = NULL WHERE id = ?", vdb)
    p = nbdbackup("verify", "--repo", path, "--json", check=False)
    assert p.returncode == 5, p.stderr
    (d,) = json.loads(p.stdout)["damaged"]
    assert d["id"] == vdb and any("manifest_hash is NULL" in pr for pr in d["problems"])
    p = _restore(path, vdb, str(tmp_path / "out.raw"))
    assert p.returncode == 9 and "no manifest" in p.stderr, p.stderr


def test_incremental_refuses_a_tampered_parent(repo_copy):
    """An incremental inherits its parent's map from the index: a tampered one must not be copied
    into a new backup (whose own manifest would then vouch for the wrong map)."""
    path, expected = repo_copy
    vda_full, vda_incr, vdb = list(expected)
    _null_segment(path, vda_incr, vdb)
    with Repository.open(path) as repo:
        parent = repo.get_backup(vda_incr)
        with pytest.raises(RepoDamaged, match="manifest"):
            repo.writer("vda", kind="incremental", size=parent.size, parent=parent)
        assert len(repo.list_backups("vda")) == 2


def test_serve_refuses_a_tampered_backup(repo_copy, tmp_path):
    """Through the server: the export of a tampered backup fails to open; nothing is read from it."""
    require_tool("nbdcopy")
    require_tool("qemu-img")
    path, expected = repo_copy
    vda_full, _, vdb = list(expected)
    _foreign_segment(path, vda_full, vdb)
    with serve(path, tmp_path) as s:
        out = tmp_path / "copy.raw"
        p = run(["nbdcopy", s.uri(vda_full), str(out)], check=False)
        assert p.returncode != 0, "nbdcopy read a tampered export"
        p = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri(vda_full), str(out) + ".2"], check=False)
        assert p.returncode != 0, "qemu-img read a tampered export"
        # the intact backup of the other disk is still served, exactly
        p = run(["nbdcopy", s.uri(vdb), str(tmp_path / "vdb.raw")])
        assert (tmp_path / "vdb.raw").read_bytes() == expected[vdb]
        assert "manifest" in s.log()


# --- bit rot --------------------------------------------------------------------

def test_bit_flip_changing_a_backup_id_is_not_all_intact(repo_copy, tmp_path):
    """The issue's case: one flipped bit turns a backup's id into another valid-looking id. verify
    used to drop it as "forgotten while we ran" and say "all intact". The id is stored twice: in
    the table row (the manifest check names the field) and in the unique index on it (only
    SQLite's integrity_check sees that the index and the table disagree)."""
    path, expected = repo_copy
    victim = list(expected)[0]
    db = os.path.join(path, "index.sqlite")
    data = open(db, "rb").read()
    owner = _page_owners(db)
    pos = [i for i in range(len(data)) if data.startswith(victim.encode(), i)]
    # the row, the unique index on id, and the incremental's parent column
    assert sorted(owner[i // PAGE + 1] for i in pos) == ["backups", "backups", "sqlite_autoindex_backups_1"]
    digit = max(i for i, ch in enumerate(victim) if ch.isdigit())    # a digit: one bit away from another digit
    for at in pos:
        d = f"{path}-{at}"
        shutil.copytree(path, d)
        flipped = bytearray(data)
        flipped[at + digit] ^= 0x01
        open(os.path.join(d, "index.sqlite"), "wb").write(bytes(flipped))
        p = nbdbackup("verify", "--repo", d, check=False)
        assert p.returncode == 5 and "all intact" not in p.stderr, (p.stdout, p.stderr)
        _no_traceback(p)
        rep = json.loads(nbdbackup("verify", "--repo", d, "--json", check=False).stdout)
        if owner[at // PAGE + 1] == "backups":
            (dmg,) = rep["damaged"]
            assert any(("id (index" in pr or "parent (index" in pr) and victim in pr for pr in dmg["problems"]), dmg
        else:
            assert rep["index_check"] == "damaged" and rep["index_problems"], rep
            assert "INDEX DAMAGED: integrity_check" in p.stdout
        _check_restores(d, expected, tmp_path, verify_rc=p.returncode)


def _page_owners(db) -> dict[int, str]:
    """Page number -> the table or index it belongs to (SQLite's dbstat)."""
    con = sqlite3.connect(db)
    try:
        return {p: n for n, p in con.execute("SELECT name, pageno FROM dbstat")}
    finally:
        con.close()


def _check_restores(path, expected, tmp_path, *, verify_rc: int) -> list[int]:
    """Restore every backup (by id and its disk's latest); exit 0 must mean exact bytes, and a
    verify that passed means every restore worked."""
    rcs = []
    out = str(tmp_path / "r.raw")
    for bid, data in expected.items():
        p = _restore(path, bid, out)
        _no_traceback(p)
        rcs.append(p.returncode)
        if p.returncode == 0:
            assert open(out, "rb").read() == data, f"restore of {bid} exited 0 with wrong bytes"
        else:
            assert p.returncode in (9, 11), p.stderr     # damaged / not found, never a crash (1)
        if verify_rc == 0:
            assert p.returncode == 0, f"verify passed but restore of {bid} failed: {p.stderr}"
    return rcs


def _table_pages(db) -> list[int]:
    """Page numbers of the backups and backup_segments tables and their indexes."""
    con = sqlite3.connect(db)
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE tbl_name IN "
                                           "('backups', 'backup_segments')")}
    finally:
        con.close()
    return sorted(p for p, n in _page_owners(db).items() if n in names)


@pytest.mark.parametrize("mode", ["bit", "page"])
def test_random_index_corruption_never_restores_wrong_bytes(pristine, tmp_path, mode):
    path, expected = pristine
    db_file = os.path.join(path, "index.sqlite")
    size = os.path.getsize(db_file)
    meta_pages = _table_pages(db_file)
    detected = 0
    for seed in range(6):
        rng = random.Random(seed)
        d = str(tmp_path / f"repo-{seed}")
        shutil.copytree(path, d)
        db = bytearray(open(db_file, "rb").read())
        # half the seeds anywhere in the file, half in the backup/map tables where edits matter most
        page = rng.choice(meta_pages) if seed % 2 else rng.randrange(1, size // PAGE + 1)
        start = (page - 1) * PAGE
        if mode == "bit":     # a byte in use (most of a page is often free space, all zeros)
            at = rng.choice([i for i in range(start, start + PAGE) if db[i]] or [start])
            db[at] ^= 1 << rng.randrange(8)
        else:
            db[start:start + PAGE] = rng.randbytes(PAGE)
        open(os.path.join(d, "index.sqlite"), "wb").write(bytes(db))
        p = nbdbackup("verify", "--repo", d, check=False)
        _no_traceback(p)
        assert p.returncode in (0, 5, 9), p.stderr
        rcs = _check_restores(d, expected, tmp_path, verify_rc=p.returncode)
        detected += p.returncode != 0 or any(rcs)
        shutil.rmtree(d)
    print(f"{mode}: {detected} of 6 corruptions detected (the rest were harmless)")


def test_manifest_encoded_differently_still_opens(repo_copy, tmp_path):
    """A manifest whose bytes differ from what this version would encode (an older version's
    key order and spacing) but whose fields agree with the index: the fast re-encoding check
    misses, the record is found in the packs and compared field by field, and the backup opens."""
    from sqlalchemy import update

    from nbdbackup.repo import packs as P
    from nbdbackup.repo import schema
    from nbdbackup.repo.chunks import hash_bytes
    from nbdbackup.repo.ids import now_ms, to_ms
    from nbdbackup.repo.index import write_txn
    from nbdbackup.repo.manifest import encode

    path, expected = repo_copy
    vdb = list(expected)[2]
    with Repository.open(path) as repo:
        info = repo.get_backup(vdb)
        m = json.loads(encode(info, SEG, repo.segment_refs(vdb)))
        raw = json.dumps({"segments": m["segments"], "segment_len": m["segment_len"],
                          "info": dict(reversed(list(m["info"].items()))), "format": 1}).encode()
        h = hash_bytes(raw)
        builder = P.PackBuilder()
        try:
            builder.add(P.REC_MANIFEST, h, len(raw), P.COMP_NONE, raw)
            buf, size = builder.seal()
            repo.backend.put_aligned(P.pack_object_name(builder.name), buf, size)
        finally:
            builder.release()
        with write_txn(repo.index_db) as conn:
            conn.execute(schema.packs.insert().values(name=builder.name, size=size, created_ms=to_ms(now_ms())))
            conn.execute(update(schema.backups).where(schema.backups.c.id == vdb).values(manifest_hash=h))
    out = str(tmp_path / "out.raw")
    assert _restore(path, vdb, out).returncode == 0
    assert open(out, "rb").read() == expected[vdb]
    p = nbdbackup("verify", "--repo", path, "--json")
    assert json.loads(p.stdout)["manifests_checked"] == 3


def test_damaged_manifest_record_is_damage_but_restore_is_exact(repo_copy, tmp_path):
    """Bit rot in a manifest record loses no disk bytes (the index rows still re-encode to its
    hash), but rebuild-index could no longer recover the backup: verify reports it."""
    from nbdbackup.repo import manifest as M
    from nbdbackup.repo import packs as P

    path, expected = repo_copy
    vdb = list(expected)[2]
    (mh,) = _sql(path, "SELECT manifest_hash FROM backups WHERE id = ?", vdb)[0]
    with Repository.open(path) as repo:
        loc = M.locate(repo, {mh})[0][mh]
    with open(os.path.join(path, P.pack_object_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset + loc.stored_len // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    p = nbdbackup("verify", "--repo", path, "--json", check=False)
    assert p.returncode == 5, p.stderr
    (d,) = json.loads(p.stdout)["damaged"]
    assert d["id"] == vdb and d["ranges"] == [] and not d["index_rows_bad"]
    assert any("its manifest is damaged" in pr for pr in d["problems"]), d
    out = str(tmp_path / "out.raw")
    assert _restore(path, vdb, out).returncode == 0
    assert open(out, "rb").read() == expected[vdb]
