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
    path = new_repo_path(tmp_path / "r", pack_size=256 * 1024)      # 4 chunks per pack
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
