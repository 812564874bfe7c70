"""`nbdbackup rebuild-index`: damaged or lost index -> clear error, then full recovery from the packs."""

from __future__ import annotations

import glob
import json
import os
import random

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import disk_data, new_repo_path, pack_files, read_all, write_backup
from helpers.support import nbdbackup
from nbdbackup.repo import Repository
from nbdbackup.repo import packs as P


@pytest.fixture
def repo_with_backups(tmp_path):
    path = new_repo_path(tmp_path / "r", pack_size=256 * 1024, segment_len=4)
    rng = random.Random(11)
    expect = {}
    with Repository.open(path) as repo:
        d = disk_data(rng, 10)
        b = write_backup(repo, "vda", d)
        expect[b.id] = d
        d2 = disk_data(rng, 10, base=d, change=0.4)
        expect[write_backup(repo, "vda", d2, parent=b, changed=range(10)).id] = d2
        ws = []
        e1, e2 = disk_data(rng, 6), disk_data(rng, 3)
        write_backup(repo, "vdb", e1, set_writers=ws)
        write_backup(repo, "vdc", e2, set_writers=ws)
        x, y = repo.commit_set(ws, read_bytes=[1, 2], duration_s=[0.5, 0.5])
        expect[x.id], expect[y.id] = e1, e2
    listing = nbdbackup("list", "--repo", path, "--json").stdout
    return path, expect, json.loads(listing)


def _check_recovered(path, expect, listing):
    assert json.loads(nbdbackup("list", "--repo", path, "--json").stdout) == listing
    with Repository.open(path) as repo:
        for bid, data in expect.items():
            assert read_all(repo, bid) == data
    nbdbackup("verify", "--repo", path)


def test_damaged_index_is_reported_then_rebuilt(repo_with_backups):
    path, expect, listing = repo_with_backups
    index = os.path.join(path, "index.sqlite")
    with open(index, "r+b") as f:
        f.seek(0)
        f.write(os.urandom(512))
    damaged = open(index, "rb").read()
    p = nbdbackup("list", "--repo", path, check=False)
    assert p.returncode == 9 and "rebuild-index" in p.stderr and "Traceback" not in p.stderr
    p = nbdbackup("verify", "--repo", path, check=False)
    assert p.returncode == 9
    p = nbdbackup("rebuild-index", "--repo", path)
    assert f"{len(expect)} backup(s)" in p.stderr and "0 backup(s) lost" in p.stderr
    aside = glob.glob(index + ".damaged-*")
    assert len(aside) == 1 and open(aside[0], "rb").read()[:512] == damaged[:512]   # kept, not deleted
    _check_recovered(path, expect, listing)


def test_lost_index_is_rebuilt(repo_with_backups):
    path, expect, listing = repo_with_backups
    os.unlink(os.path.join(path, "index.sqlite"))
    p = nbdbackup("list", "--repo", path, check=False)
    assert p.returncode == 9 and "missing" in p.stderr
    out = json.loads(nbdbackup("rebuild-index", "--repo", path, "--json").stdout)
    assert sorted(out["backups"]) == sorted(expect) and out["old_index"] is None
    _check_recovered(path, expect, listing)


def test_damaged_pack_footer_is_salvaged_from_record_headers(repo_with_backups):
    path, expect, listing = repo_with_backups
    for pack in pack_files(path):                         # break every footer checksum
        with open(pack, "r+b") as f:
            f.seek(-P.TRAILER_SIZE - 5, os.SEEK_END)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0xFF]))       # flipped: writing 0xff was a no-op where the byte was 0xff
    out = json.loads(nbdbackup("rebuild-index", "--repo", path, "--json").stdout)
    assert len(out["packs_salvaged"]) == len(pack_files(path))
    _check_recovered(path, expect, listing)


def test_lost_pack_loses_only_what_was_in_it(repo_with_backups):
    path, expect, listing = repo_with_backups
    # the pack holding vdc's manifest (and its new chunks): vdc's backup is lost, the rest comes back.
    # vdc was committed last in its set, so no other backup references that pack.
    with Repository.open(path) as repo:
        vdc = repo.list_backups("vdc")[0]
    (victim,) = [p for p in pack_files(path) if _manifest_names(path, os.path.basename(p)[:-5], vdc.id)]
    os.unlink(victim)
    out = json.loads(nbdbackup("rebuild-index", "--repo", path, "--json").stdout)
    assert sorted(out["backups"]) == sorted(set(expect) - {vdc.id})
    assert out["backups_lost"] == [] and out["backups_incomplete"] == []   # vdc's manifest is simply gone
    del expect[vdc.id]
    _check_recovered(path, expect, [b for b in listing if b["id"] != vdc.id])


def _manifest_names(path, pack_name, backup_id) -> bool:
    from nbdbackup.repo.chunks import decode

    with Repository.open(path) as repo:
        for r in P.read_records(repo.backend, pack_name):
            if r.type == P.REC_MANIFEST:
                raw = decode(repo.backend.get(P.pack_object_name(pack_name), r.offset, r.stored_len),
                             r.compression, r.raw_len, r.hash)
                if json.loads(raw)["info"]["id"] == backup_id:
                    return True
    return False


def test_rebuild_needs_a_repository(tmp_path):
    p = nbdbackup("rebuild-index", "--repo", tmp_path / "nothing", check=False)
    assert p.returncode == 6


def test_rebuild_waits_for_writers(tmp_path):
    path = new_repo_path(tmp_path / "r")
    with Repository.open(path) as repo:
        w = repo.writer("vda", kind="full", size=CS)
        p = nbdbackup("rebuild-index", "--repo", path, check=False)
        assert p.returncode == 3 and f"pid {os.getpid()}" in p.stderr
        w.abort()
    assert os.path.exists(os.path.join(path, "index.sqlite"))


def test_lost_chunk_pack_is_reported_as_incomplete(tmp_path):
    path = new_repo_path(tmp_path / "r", pack_size=4 * (CS + 128), segment_len=4)
    rng = random.Random(12)
    with Repository.open(path) as repo:
        d0 = rng.randbytes(10 * CS)                      # incompressible: 4 chunks per pack
        b0 = write_backup(repo, "vda", d0)
        d1 = d0[:8 * CS] + rng.randbytes(2 * CS)
        b1 = write_backup(repo, "vda", d1, parent=b0, changed=[8, 9])
        with repo.open_image(b0) as img:
            first4 = {img.chunk_ref(i) for i in range(4)}
        victim = next(name for name in (os.path.basename(p)[:-5] for p in pack_files(path))
                      if {r.hash for r in P.read_records(repo.backend, name)} == first4)
    os.unlink(os.path.join(path, P.pack_object_name(victim)))
    os.unlink(os.path.join(path, "index.sqlite"))
    out = json.loads(nbdbackup("rebuild-index", "--repo", path, "--json").stdout)
    assert sorted(out["backups"]) == sorted([b0.id, b1.id])          # maps are intact: both come back
    assert {b["id"]: b["missing_chunks"] for b in out["backups_incomplete"]} == {b0.id: 4, b1.id: 4}
    p = nbdbackup("rebuild-index", "--repo", path)                    # human output names them too
    assert b0.id in p.stdout and "4 chunk(s) missing" in p.stdout
    p = nbdbackup("verify", "--repo", path, "--json", check=False)
    assert p.returncode == 5
    assert {d["id"]: d["ranges"] for d in json.loads(p.stdout)["damaged"]} == \
        {b0.id: [{"offset": 0, "length": 4 * CS}], b1.id: [{"offset": 0, "length": 4 * CS}]}
    with Repository.open(path) as repo, repo.open_image(b1) as img:
        assert img.read(4 * CS, 6 * CS) == d1[4 * CS:]                 # the rest still restores


@pytest.mark.parametrize("table,commands", [
    ("chunks", [["verify"], ["gc"]]),
    ("backup_segments", [["verify"], ["gc"], ["forget", "vda"]]),
    ("backups", [["verify"], ["gc"], ["forget", "vda"], ["prune", "--keep-last", "1"]]),
])
def test_partly_damaged_index_is_a_clear_error_then_rebuilt(repo_with_backups, table, commands):
    import sqlite3

    path, expect, listing = repo_with_backups
    con = sqlite3.connect(os.path.join(path, "index.sqlite"))
    con.execute(f"DROP TABLE {table}")
    con.commit()
    con.close()
    for cmd in commands:
        p = nbdbackup(*cmd, "--repo", path, check=False)
        assert p.returncode == 9, (cmd, p.stderr)
        assert "rebuild-index" in p.stderr and "internal error" not in p.stderr, p.stderr
    nbdbackup("rebuild-index", "--repo", path)
    _check_recovered(path, expect, listing)


# new index fsync, before moving the old aside, before renaming the new in, dir fsync after
@pytest.mark.parametrize("point", ["fsync:1", "rename:1", "rename:2", "fsync:2"])
def test_sigkill_during_rebuild_keeps_the_old_index_and_can_be_rerun(repo_with_backups, point):
    import signal
    import subprocess

    import helpers.crash_writer as W

    path, expect, listing = repo_with_backups
    index = os.path.join(path, "index.sqlite")
    with open(index, "r+b") as f:
        f.write(b"garbage!" * 64)
    damaged = open(index, "rb").read()
    p = subprocess.run(W.command(path, "rebuild-index"), capture_output=True, text=True,
                       timeout=120, env=W.environment(NBDBACKUP_CRASH_AT=point))
    assert p.returncode == -signal.SIGKILL, p.stderr
    # the damaged index still exists, under its name or moved aside, byte for byte
    copies = [index] + glob.glob(index + ".damaged-*")
    assert any(os.path.exists(c) and open(c, "rb").read() == damaged for c in copies)
    p = nbdbackup("list", "--repo", path, "--json", check=False)
    if p.returncode == 0:                       # the new index was complete when it took the name
        assert json.loads(p.stdout) == listing
    else:
        assert p.returncode == 9 and "rebuild-index" in p.stderr
    nbdbackup("rebuild-index", "--repo", path)
    _check_recovered(path, expect, listing)


def test_only_the_newest_damaged_copies_are_kept_and_the_removed_ones_named(repo_with_backups):
    # Issue 10 item 9: every run kept a full index.sqlite.damaged-<UTC> copy, forever.
    path, expect, listing = repo_with_backups

    def copies():
        return sorted(f for f in os.listdir(path) if ".damaged-" in f)

    made = []
    for run in range(5):
        out = json.loads(nbdbackup("rebuild-index", "--repo", path, "--json").stdout)
        made.append(os.path.basename(out["old_index"]))
        removed = [os.path.basename(p) for p in out["damaged_removed"]]
        assert removed == ([made[-4]] if len(made) > 3 else []), (run, removed)   # the one that fell off
        assert copies() == sorted(made[-3:]), (run, copies())      # the newest 3, this run's included
    p = nbdbackup("rebuild-index", "--repo", path, "--keep-damaged", "1")
    gone = sorted(made[-3:])
    assert "removed older copies" in p.stderr and all(g in p.stderr for g in gone), p.stderr
    assert len(copies()) == 1 and copies()[0] not in gone
    _check_recovered(path, expect, listing)
