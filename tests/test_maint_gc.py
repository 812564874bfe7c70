"""`nbdbackup gc`: reclaims, repacks, cleans orphans, and runs beside writers and readers
(the rules of docs/design.md "gc beside everything", one by one; the stress test is
tests/test_gc_concurrent.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from contextlib import contextmanager

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import disk_data, indexed_packs, new_repo_path, pack_files, read_all, write_backup
from helpers.support import kill_if_running, nbdbackup, nbdbackup_exe
from nbdbackup.repo import Repository
from nbdbackup.repo import packs as P
from nbdbackup.repo.chunks import ZERO_REF


def _gc(path, *args, rc=0):
    p = nbdbackup("gc", "--repo", path, "--json", *args, check=False)
    assert p.returncode == rc, p.stderr
    return json.loads(p.stdout) if rc == 0 else p


def _pack_bytes(path) -> int:
    return sum(os.path.getsize(p) for p in pack_files(path))


@contextmanager
def _waiting_gc(path, *args):
    """`gc --lock-wait 30` started in the background; killed if the test leaves it running."""
    proc = subprocess.Popen([nbdbackup_exe(), "gc", "--repo", path, "--lock-wait", "30", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        kill_if_running(proc)


def _two_backups(path, rng):
    with Repository.open(path) as repo:
        a = rng.randbytes(CS * 20)
        ba = write_backup(repo, "vda", a)
        b = a[:CS * 4] + rng.randbytes(CS * 2)          # shares 4 chunks with a
        bb = write_backup(repo, "vdb", b)
    return (ba, a), (bb, b)


def test_gc_reclaims_after_forget_and_dry_run_changes_nothing(tmp_path):
    path = new_repo_path(tmp_path / "r")
    (ba, a), (bb, b) = _two_backups(path, random.Random(1))
    assert _gc(path)["bytes_reclaimed"] == 0                  # nothing to do yet
    nbdbackup("forget", "--repo", path, ba.id)
    before_files = {p: os.path.getsize(p) for p in pack_files(path)}
    dry = _gc(path, "--dry-run")
    assert dry["dry_run"] and dry["chunks_deleted"] == 16 and dry["bytes_reclaimed"] > 15 * CS
    assert {p: os.path.getsize(p) for p in pack_files(path)} == before_files
    with Repository.open(path) as repo:
        assert repo.stats()["chunks"] == 22
    before = _pack_bytes(path)
    out = _gc(path)
    assert out["chunks_deleted"] == 16 and out["live_chunks"] == 6
    assert out["bytes_reclaimed"] == before - _pack_bytes(path) > 15 * CS
    assert abs(out["bytes_reclaimed"] - dry["bytes_reclaimed"]) < 4096
    with Repository.open(path) as repo:
        assert repo.stats()["chunks"] == 6
        assert read_all(repo, bb.id) == b
    nbdbackup("verify", "--repo", path)
    p = nbdbackup("gc", "--repo", path)
    assert "gc: reclaimed 0 B" in p.stderr


def test_repack_threshold(tmp_path):
    # 512 KiB packs: a's 20 chunks fill packs of 8, 8 and 4 (+ its map and manifest); b shares
    # a's first 4 chunks, so after forgetting a the first pack is about half live and holds no manifest
    for threshold, repacked in (("0", 0), ("0.6", 1)):
        path = new_repo_path(tmp_path / f"r{threshold}", pack_size=512 * 1024)
        (ba, _), (bb, b) = _two_backups(path, random.Random(2))
        nbdbackup("forget", "--repo", path, ba.id)
        old = set(pack_files(path))
        assert len(old) == 4
        out = _gc(path, "--repack-threshold", threshold)
        assert out["chunks_deleted"] == 16 and out["packs_deleted"] == 2
        assert out["packs_repacked"] == repacked and out["packs_written"] == repacked
        new = set(pack_files(path))
        assert len(old - new) == 2 + repacked and len(new - old) == repacked
        with Repository.open(path) as repo:
            assert read_all(repo, bb.id) == b
            assert set(indexed_packs(repo)) == {os.path.basename(p)[:-5] for p in new}
        nbdbackup("verify", "--repo", path)
    for bad in ("1.5", "-0.1", "half"):
        assert nbdbackup("gc", "--repo", path, "--repack-threshold", bad, check=False).returncode == 2


def test_forgotten_backups_do_not_come_back_after_gc_and_rebuild(tmp_path):
    path = new_repo_path(tmp_path / "r")
    (ba, _), (bb, b) = _two_backups(path, random.Random(3))
    nbdbackup("forget", "--repo", path, ba.id)
    _gc(path, "--repack-threshold", "0")                      # dead manifests are dropped regardless
    nbdbackup("rebuild-index", "--repo", path)
    with Repository.open(path) as repo:
        assert [x.id for x in repo.list_backups()] == [bb.id]
        assert read_all(repo, bb.id) == b


def test_rebuild_before_gc_names_the_forgotten_backups_that_come_back(tmp_path):
    """Without a gc, a forgotten backup's manifest is still in its pack: rebuild-index
    brings it back, and says so (by id) instead of doing it silently."""
    path = new_repo_path(tmp_path / "r")
    (ba, a), (bb, b) = _two_backups(path, random.Random(4))
    nbdbackup("forget", "--repo", path, ba.id)
    p = nbdbackup("rebuild-index", "--repo", path)
    assert "came back" in p.stderr and ba.id in p.stderr and bb.id not in p.stderr
    with Repository.open(path) as repo:
        assert [x.id for x in repo.list_backups()] == [ba.id, bb.id]
        assert read_all(repo, ba.id) == a
    nbdbackup("forget", "--repo", path, ba.id)
    out = json.loads(nbdbackup("rebuild-index", "--repo", path, "--json").stdout)
    assert out["returned_backups"] == [ba.id]


def test_orphan_pack_files_and_temp_files_are_removed(tmp_path):
    path = new_repo_path(tmp_path / "r")
    (ba, a), _ = _two_backups(path, random.Random(4))
    src = pack_files(path)[0]
    orphan = os.path.join(path, "packs", "ff", "ff" + "0" * 30 + ".pack")
    os.makedirs(os.path.dirname(orphan), exist_ok=True)
    shutil.copy(src, orphan)
    with open(os.path.join(path, "tmp", "dead.tmp"), "wb") as f:
        f.write(b"x" * 1000)
    size = os.path.getsize(orphan)
    out = _gc(path)                                      # younger than the default grace (1 h): left
    assert out["orphan_packs"] == 0 and out["tmp_files"] == 0 and out["young_orphans"] == 1
    assert os.path.exists(orphan) and os.listdir(os.path.join(path, "tmp")) == ["dead.tmp"]
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    out = _gc(path, "--dry-run")                         # older than the grace: would go
    assert out["orphan_packs"] == 1 and os.path.exists(orphan)
    out = _gc(path, "--grace", "0")
    assert out["orphan_packs"] == 1 and out["tmp_files"] == 1
    assert out["bytes_reclaimed"] == size + 1000
    assert not os.path.exists(orphan) and os.listdir(os.path.join(path, "tmp")) == []
    with Repository.open(path) as repo:
        assert read_all(repo, ba.id) == a


def test_gc_runs_beside_a_running_backup(tmp_path):
    """Was: gc refuses while a backup runs. Now gc runs; the chunk the writer holds survives."""
    path = new_repo_path(tmp_path / "r")
    _two_backups(path, random.Random(5))
    with Repository.open(path) as repo:
        w = repo.writer("vdc", kind="full", size=CS)
        w.put(0, w.prepare(b"y" * CS))
        w.flush()
        out = _gc(path, "--grace", "0")
        assert len(out["live_leases"]) == 1 and f"backup pid {os.getpid()}" in out["live_leases"][0]
        info = w.commit(read_bytes=CS, duration_s=0.1)
        assert read_all(repo, info.id) == b"y" * CS        # the chunk it had just written survived
    nbdbackup("verify", "--repo", path)


# A real `nbdbackup gc` held inside its exclusive section until *release* exists.
_HELD_GC = """
import os, sys, time
import nbdbackup.repo.gc as gc
from nbdbackup.cli.main import main
collect, release = gc._collect, sys.argv[1]
def held(*a, **kw):
    print("holding", flush=True)
    while not os.path.exists(release):
        time.sleep(0.05)
    return collect(*a, **kw)
gc._collect = held
sys.argv = ["nbdbackup", *sys.argv[2:]]
sys.exit(main(sys.argv[1:]))
"""


def test_two_gcs_the_loser_says_another_gc_is_running(tmp_path):
    import sys

    path = new_repo_path(tmp_path / "r")
    _two_backups(path, random.Random(11))
    release = tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", _HELD_GC, str(release), "gc", "--repo", path],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "holding\n", first.communicate()
        for what in ("gc", "rebuild-index"):         # rebuild-index takes the gc lock too
            p = nbdbackup(what, "--repo", path, check=False)
            assert p.returncode == 3, p.stderr
            assert f"another gc is running, so {what} cannot run now" in p.stderr, p.stderr
            assert f"pid {first.pid}" in p.stderr and "gc --repo" in p.stderr
            assert "a backup is running" not in p.stderr and "Traceback" not in p.stderr
        release.touch()
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
    finally:
        kill_if_running(first)


def test_gc_runs_beside_a_reader_whose_backup_is_pinned(tmp_path):
    """Was: gc waits for readers. Now gc runs beside an open image; the image's backup is pinned
    (forget refuses it with exit 3, prune keeps it and says why) and reads stay right."""
    path = new_repo_path(tmp_path / "r")
    (ba, a), (bb, b) = _two_backups(path, random.Random(6))
    nbdbackup("forget", "--repo", path, ba.id)
    with Repository.open(path) as repo:
        img = repo.open_image(bb.id)                           # a running restore / serve
        try:
            p = nbdbackup("forget", "--repo", path, bb.id, check=False)
            assert p.returncode == 3, p.stderr
            assert f"backup {bb.id} is in use by read pid {os.getpid()} on " in p.stderr, p.stderr
            p = nbdbackup("prune", "--repo", path, "--keep-last", "1", "--disk", "vdb", "--json")
            assert json.loads(p.stdout)["removed"] == 0
            out = _gc(path, "--grace", "0")
            assert out["chunks_deleted"] > 0                   # ba's own chunks went, beside the reader
            assert img.read(0, img.size) == b
        finally:
            img.close()
        assert [x.id for x in repo.list_backups()] == [bb.id]
        assert read_all(repo, bb.id) == b
    assert _pack_bytes(path) < 10 * CS
    nbdbackup("forget", "--repo", path, bb.id)                # the lease went with close()


def test_gc_refuses_to_sweep_when_a_live_segment_is_unreadable(tmp_path):
    path = new_repo_path(tmp_path / "r")
    (ba, a), (bb, b) = _two_backups(path, random.Random(7))
    nbdbackup("forget", "--repo", path, ba.id)
    with Repository.open(path) as repo:
        seg = repo.segment_refs(bb.id)[0]
        loc = repo.store.segment_locations([seg])[seg]
        chunks_before = repo.stats()["chunks"]
    with open(os.path.join(path, P.pack_object_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset)
        f.write(b"\0\0\0\0\0\0")
    before = {p: os.path.getsize(p) for p in pack_files(path)}
    p = _gc(path, rc=9)
    assert "will not delete" in p.stderr
    assert {p: os.path.getsize(p) for p in pack_files(path)} == before
    with Repository.open(path) as repo:
        assert repo.stats()["chunks"] == chunks_before


def test_gc_keeps_chunks_shared_across_disks_and_zero_maps(tmp_path):
    path = new_repo_path(tmp_path / "r", segment_len=4, pack_size=128 * 1024)
    rng = random.Random(8)
    with Repository.open(path) as repo:
        data = disk_data(rng, 16)
        keep = write_backup(repo, "vda", data)
        drop = write_backup(repo, "vdb", data)                 # same chunks, other disk
        zero = write_backup(repo, "vdc", bytes(16 * CS))
    nbdbackup("forget", "--repo", path, drop.id)
    out = _gc(path, "--repack-threshold", "1")
    assert out["chunks_deleted"] == 0
    with Repository.open(path) as repo:
        assert read_all(repo, keep.id) == data and read_all(repo, zero.id) == bytes(16 * CS)
        with repo.open_image(keep.id) as img:
            live = {img.chunk_ref(i) for i in range(16)} - {ZERO_REF}
        assert repo.stats()["chunks"] == len(live)
    nbdbackup("verify", "--repo", path)


def test_gc_leaves_a_missing_pack_alone_and_says_so(tmp_path):
    path = new_repo_path(tmp_path / "r", pack_size=256 * 1024)
    (ba, a), (bb, b) = _two_backups(path, random.Random(9))
    nbdbackup("forget", "--repo", path, bb.id)
    with Repository.open(path) as repo:
        with repo.open_image(ba.id) as img:
            ref = img.chunk_ref(0)
        gone = repo.store.chunk_locations([ref])[ref].pack
    os.unlink(os.path.join(path, P.pack_object_name(gone)))
    p = nbdbackup("gc", "--repo", path)
    assert f"pack {gone} is missing but still holds live data" in p.stderr and "verify" in p.stderr
    with Repository.open(path) as repo:
        assert gone in indexed_packs(repo)                    # its rows stay: verify names the damage
    p = nbdbackup("verify", "--repo", path, check=False)
    assert p.returncode == 5 and ba.id in p.stdout


def test_backups_and_readers_start_and_finish_while_gc_runs(tmp_path):
    """Was: a gc waiting for a reader does not block backups. Now gc does not wait at all: while
    one is inside its run (held), backups start and commit and images open and close."""
    import sys

    path = new_repo_path(tmp_path / "r")
    (ba, a), _ = _two_backups(path, random.Random(10))
    release = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", _HELD_GC, str(release), "gc", "--repo", path, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "holding\n", proc.communicate()
        with Repository.open(path) as repo:
            for _ in range(3):
                info = write_backup(repo, "vdc", b"z" * CS)
            assert read_all(repo, ba.id) == a
            release.touch()
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert read_all(repo, info.id) == b"z" * CS
    finally:
        kill_if_running(proc)


def test_threshold_one_repacks_only_packs_with_dead_records(tmp_path):
    path = new_repo_path(tmp_path / "r", pack_size=4 * (CS + 128))     # 4 chunks per pack
    rng = random.Random(11)
    with Repository.open(path) as repo:
        a = rng.randbytes(CS * 12)
        ba = write_backup(repo, "vda", a)
        b = a[:CS * 3] + rng.randbytes(CS * 2)                   # 3 of the first pack's 4 chunks
        bb = write_backup(repo, "vdb", b)
    assert _gc(path, "--repack-threshold", "1")["packs_repacked"] == 0     # everything live: nothing to do
    nbdbackup("forget", "--repo", path, ba.id)
    out = _gc(path, "--repack-threshold", "1")
    assert out["packs_repacked"] == 1                 # the first pack, 3/4 live: rewritten at 1, kept at 0.5
    again = _gc(path, "--repack-threshold", "1")
    assert again["packs_repacked"] == 0 and again["bytes_reclaimed"] == 0   # no endless rewriting
    with Repository.open(path) as repo:
        assert read_all(repo, bb.id) == b


# -- the rules of "gc beside everything", one at a time (two Repository objects, one repository) ----

def _collect(path, **kw):
    from nbdbackup.repo.gc import collect

    with Repository.open(path) as r:
        return collect(r, grace=0, **kw)


def _forgotten_base(tmp_path, seed):
    """A repository with small packs whose one backup (8 random chunks) is forgotten: its
    chunks are referenced by nothing, so only a running writer's stamp can keep them."""
    path = new_repo_path(tmp_path / "r", pack_size=128 * 1024)
    rng = random.Random(seed)
    old = rng.randbytes(CS * 8)
    with Repository.open(path) as repo:
        b0 = write_backup(repo, "vda", old)
    _gc(path)          # a new epoch: b0's rows are stamped older than any writer starting now
    nbdbackup("forget", "--repo", path, b0.id)
    return path, old, old[:CS * 4] + rng.randbytes(CS * 8)      # 4 dedup hits, 8 new chunks


def _put_all(w, data):
    for i in range(len(data) // CS):
        w.put(i, w.prepare(data[i * CS:(i + 1) * CS]))
    w.flush()


def test_gc_mid_backup_keeps_the_writers_packs_and_its_dedup_hits(tmp_path):
    path, old, new = _forgotten_base(tmp_path, 21)
    with Repository.open(path) as repo:
        w = repo.writer("vdb", kind="full", size=len(new))
        _put_all(w, new)                          # dedup decided (stamped), some packs sealed and indexed
        out = _gc(path, "--grace", "0")
        assert out["chunks_deleted"] == 4         # only the forgotten chunks nobody reuses
        assert out["young_packs"] >= 1 and out["kept_in_use"] >= 4
        info = w.commit(read_bytes=len(new), duration_s=0.1)
        assert read_all(repo, info.id) == new
    nbdbackup("verify", "--repo", path)


def test_a_stamp_between_gcs_scan_and_its_delete_wins(tmp_path, monkeypatch):
    """gc has judged the forgotten chunks dead; the writer's dedup decision (its stamp) lands before
    gc's DELETE: the guard in the DELETE itself keeps the 4 rows the writer now relies on."""
    import nbdbackup.repo.gc as gc_mod

    path, old, new = _forgotten_base(tmp_path, 22)
    with Repository.open(path) as repo:
        w = repo.writer("vdb", kind="full", size=len(new))
        real = gc_mod._delete_rows

        def racing(eng, dead_rows, *a):
            assert len(dead_rows[gc_mod.chunks]) == 8       # all 8 looked dead to gc's scan
            _put_all(w, new)
            return real(eng, dead_rows, *a)
        monkeypatch.setattr(gc_mod, "_delete_rows", racing)
        rep = _collect(path)
        assert rep.chunks_deleted == 4
        info = w.commit(read_bytes=len(new), duration_s=0.1)
        assert read_all(repo, info.id) == new
    nbdbackup("verify", "--repo", path)


def test_a_row_gc_deletes_before_the_stamp_is_stored_again(tmp_path, monkeypatch):
    """The writer's cheap SELECT saw the rows (stamped older); a whole gc deletes them before its
    stamping transaction: that transaction finds them gone and the writer stores them again."""
    from contextlib import contextmanager as cm

    import nbdbackup.repo.dedup as dedup_mod

    path, old, new = _forgotten_base(tmp_path, 23)
    ran = []
    real_txn = dedup_mod.write_txn

    @cm
    def gc_first(eng):
        if not ran:
            ran.append(_collect(path))
        with real_txn(eng) as conn:
            yield conn
    with Repository.open(path) as repo:
        w = repo.writer("vdb", kind="full", size=len(new))
        monkeypatch.setattr(dedup_mod, "write_txn", gc_first)
        _put_all(w, new)
        monkeypatch.undo()
        assert ran and ran[0].chunks_deleted == 8
        info = w.commit(read_bytes=len(new), duration_s=0.1)
        assert read_all(repo, info.id) == new
    nbdbackup("verify", "--repo", path)


def test_prune_keeps_a_backup_being_read_and_says_by_whom(tmp_path):
    path = new_repo_path(tmp_path / "r")
    rng = random.Random(24)
    with Repository.open(path) as repo:
        older = write_backup(repo, "vda", rng.randbytes(CS * 2))
        write_backup(repo, "vda", rng.randbytes(CS * 2))
        with repo.open_image(older.id):
            p = nbdbackup("prune", "--repo", path, "--keep-last", "1", "--json")
            d = {x["id"]: x for x in json.loads(p.stdout)["decisions"]}[older.id]
            assert d["action"] == "keep" and d["reasons"][0].startswith(f"kept, in use by read pid {os.getpid()}")
            p = nbdbackup("prune", "--repo", path, "--keep-last", "1")
            assert "kept, in use by read pid" in p.stdout
            assert older.id in {b.id for b in repo.list_backups()}
    p = nbdbackup("prune", "--repo", path, "--keep-last", "1", "--json")
    assert json.loads(p.stdout)["removed"] == 1


_KILLED_WRITER = """
import sys, time
from nbdbackup.repo import Repository
repo = Repository.open(sys.argv[1])
data = bytes(range(256)) * 256 * 8
w = repo.writer("vdk", kind="full", size=len(data))
for i in range(8):
    w.put(i, w.prepare(bytes([i + 1]) + data[1 + i * 65536:(i + 1) * 65536]))
w.write_manifest(b"not committed")          # every pack durable and indexed, stamped with its epoch
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_writers_lease_dies_and_stops_holding_back_reclamation(tmp_path):
    import signal
    import sys

    path = new_repo_path(tmp_path / "r", pack_size=128 * 1024)
    _two_backups(path, random.Random(25))
    _gc(path)          # a new epoch: only what the writer makes is stamped with it
    before = set(pack_files(path))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        made = set(pack_files(path)) - before
        assert made
        out = _gc(path, "--grace", "0")              # alive: its packs and rows stay
        assert out["young_packs"] == len(made) and out["dead_leases"] == 0
        assert made <= set(pack_files(path))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        kill_if_running(proc)
    out = _gc(path, "--grace", "0")                  # its pid is gone on this host: dead at once
    assert out["dead_leases"] == 1 and out["young_packs"] == 0 and out["packs_deleted"] == len(made)
    assert set(pack_files(path)) == before
    nbdbackup("verify", "--repo", path)


def test_leases_of_other_hosts_live_by_their_heartbeat(tmp_path):
    from sqlalchemy import insert

    from nbdbackup.repo.leases import LEASE_TTL_S, db_now_ms
    from nbdbackup.repo.schema import leases

    path = new_repo_path(tmp_path / "r")
    with Repository.open(path) as repo:
        with repo.index_db.begin() as conn:
            now = db_now_ms(conn)
            for lid, beat in (("fresh", now), ("stale", now - int(LEASE_TTL_S * 1000) - 1000)):
                conn.execute(insert(leases).values(id=lid, kind="backup", host="elsewhere", pid=1, command="x",
                                                   started_ms=now, heartbeat_ms=beat, start_epoch=1))
    out = _gc(path, "--grace", "0")
    assert out["dead_leases"] == 1 and out["cutoff"] == 1 and out["epoch"] == 2   # fresh holds C back
    assert out["live_leases"] == [out["live_leases"][0]] and "on elsewhere" in out["live_leases"][0]


def test_commit_fencing_a_writer_whose_lease_gc_dropped_commits_nothing(tmp_path):
    from sqlalchemy import update

    from nbdbackup.errors import LockedError
    from nbdbackup.repo.schema import leases

    path = new_repo_path(tmp_path / "r")
    with Repository.open(path) as repo:
        w = repo.writer("vda", kind="full", size=CS * 2)
        _put_all(w, random.Random(26).randbytes(CS * 2))
        with repo.index_db.begin() as conn:            # as if the process had been paused past the TTL
            conn.execute(update(leases).values(heartbeat_ms=0))
        assert _gc(path, "--grace", "0")["dead_leases"] == 1
        try:
            w.commit(read_bytes=0, duration_s=0.1)
            raise AssertionError("the commit went through without its lease")
        except LockedError as e:
            assert "lease" in str(e) and "nothing was committed" in str(e)
        assert repo.list_backups() == []
    p = nbdbackup("verify", "--repo", path)
    assert p.returncode == 0


def test_a_dropped_read_lease_is_taken_again_a_dropped_backup_lease_is_lost(tmp_path):
    from sqlalchemy import delete, select

    from nbdbackup.repo.leases import Lease
    from nbdbackup.repo.schema import lease_pins, leases

    path = new_repo_path(tmp_path / "r")
    with Repository.open(path) as repo:
        b = write_backup(repo, "vda", b"q" * CS)
        reader = Lease(repo.index_db, "read", pins=[b.id], renew_s=0.1)
        writer = Lease(repo.index_db, "backup", renew_s=0.1)
        try:
            with repo.index_db.begin() as conn:          # what a gc does to leases it judged dead
                conn.execute(delete(lease_pins))
                conn.execute(delete(leases))
            deadline = time.time() + 10
            while time.time() < deadline and not writer.lost:
                time.sleep(0.05)
            time.sleep(0.3)
            with repo.index_db.connect() as conn:
                assert [r[0] for r in conn.execute(select(leases.c.id))] == [reader.id]
                assert [r[0] for r in conn.execute(select(lease_pins.c.backup_id))] == [b.id]
            assert writer.lost and not reader.lost
            p = nbdbackup("forget", "--repo", path, b.id, check=False)
            assert p.returncode == 3                     # pinned again
        finally:
            reader.release()
            writer.release()
