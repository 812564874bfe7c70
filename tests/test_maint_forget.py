"""`nbdbackup forget`: ids and disk names, sets whole, and forget+gc never harms another backup."""

from __future__ import annotations

import json
import os
import random

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import disk_data, indexed_packs, new_repo_path, pack_files, read_all, write_backup
from helpers.support import nbdbackup
from nbdbackup.repo import Repository
from nbdbackup.repo.chunks import ZERO_REF


def _ids(path, disk=None):
    with Repository.open(path) as repo:
        return [b.id for b in repo.list_backups(disk)]


def test_forget_by_id_and_by_disk_name(tmp_path):
    path = new_repo_path(tmp_path / "r")
    rng = random.Random(1)
    with Repository.open(path) as repo:
        d = disk_data(rng, 4)
        b1 = write_backup(repo, "vda", d)
        b2 = write_backup(repo, "vda", d)
        b3 = write_backup(repo, "vda", d)
        c1 = write_backup(repo, "vdb", d)
    p = nbdbackup("forget", "--repo", path, b2.id)
    assert b2.id in p.stdout and "gc" in p.stderr
    assert _ids(path) == [b1.id, b3.id, c1.id]
    # a disk name means that disk's latest backup
    p = nbdbackup("forget", "--repo", path, "vda", "--json")
    out = json.loads(p.stdout)
    assert [b["id"] for b in out["forgotten"]] == [b3.id]
    assert _ids(path) == [b1.id, c1.id]
    with Repository.open(path) as repo:
        assert read_all(repo, b1.id) == d and read_all(repo, c1.id) == d


def test_unknown_ref_deletes_nothing(tmp_path):
    path = new_repo_path(tmp_path / "r")
    with Repository.open(path) as repo:
        b1 = write_backup(repo, "vda", bytes(CS) + b"x" * CS)
    p = nbdbackup("forget", "--repo", path, b1.id, "20261126T000000000Z-abcd", check=False)
    assert p.returncode == 11 and "20261126T000000000Z-abcd" in p.stderr
    p = nbdbackup("forget", "--repo", path, "no/such", check=False)
    assert p.returncode == 11
    assert _ids(path) == [b1.id]
    assert nbdbackup("forget", "--repo", path, check=False).returncode == 2   # BACKUP required


def test_forgetting_one_member_forgets_the_set(tmp_path):
    path = new_repo_path(tmp_path / "r")
    rng = random.Random(2)
    with Repository.open(path) as repo:
        solo = write_backup(repo, "vda", disk_data(rng, 3))
        ws = []
        write_backup(repo, "vda", disk_data(rng, 3), set_writers=ws)
        write_backup(repo, "vdb", disk_data(rng, 5), set_writers=ws)
        a, b = repo.commit_set(ws, read_bytes=[0, 0], duration_s=[0.1, 0.1])
        assert a.set_id and a.set_id == b.set_id
    p = nbdbackup("forget", "--repo", path, b.id)
    assert a.id in p.stdout and b.id in p.stdout
    assert f"same set {a.set_id}" in p.stderr and "never half a VM" in p.stderr
    assert _ids(path) == [solo.id]


def test_forget_then_gc_keeps_every_other_backup_bit_exact(tmp_path):
    path = new_repo_path(tmp_path / "r", pack_size=256 * 1024, segment_len=4)
    rng = random.Random(3)
    expect: dict[str, bytes] = {}
    with Repository.open(path) as repo:
        for disk in ("vda", "vdb"):
            data = disk_data(rng, 12)
            parent = write_backup(repo, disk, data)
            expect[parent.id] = data
            for _ in range(4):
                new = disk_data(rng, 12, base=data, change=0.3)
                changed = [i for i in range(12) if new[i * CS:(i + 1) * CS] != data[i * CS:(i + 1) * CS]]
                parent = write_backup(repo, disk, new, parent=parent, changed=changed)
                expect[parent.id], data = new, new
    order = list(expect)
    rng.shuffle(order)
    for round_, victims in enumerate((order[:3], order[3:6], order[6:9])):
        nbdbackup("forget", "--repo", path, *victims)
        for v in victims:
            del expect[v]
        threshold = ("1.0", "0.5", "0")[round_]
        out = json.loads(nbdbackup("gc", "--repo", path, "--json", "--repack-threshold", threshold).stdout)
        assert out["skipped_damaged"] == []
        with Repository.open(path) as repo:
            assert sorted(b.id for b in repo.list_backups()) == sorted(expect)
            live = set()
            for bid, data in expect.items():
                assert read_all(repo, bid) == data, f"round {round_}: {bid} changed"
                with repo.open_image(bid) as img:
                    live.update(img.chunk_ref(i) for i in range(img.nchunks))
            live.discard(ZERO_REF)
            # nothing unreferenced is left in the index, and every pack file is indexed
            assert repo.stats()["chunks"] == len(live) == out["live_chunks"]
            assert set(indexed_packs(repo)) == {os.path.basename(p)[:-5] for p in pack_files(path)}
        nbdbackup("verify", "--repo", path)


def test_forget_while_a_backup_of_the_disk_runs(tmp_path):
    """The parent of a running incremental is pinned by its lease: forget refuses it (exit 3, naming
    the backup), the incremental commits right, and afterwards the parent can go."""
    path = new_repo_path(tmp_path / "r", segment_len=4)
    rng = random.Random(4)
    with Repository.open(path) as repo:
        d0 = disk_data(rng, 10)
        b0 = write_backup(repo, "vda", d0)
        d1 = disk_data(rng, 10, base=d0, change=0.3)
        w = repo.writer("vda", kind="incremental", size=len(d1), parent=b0)
        w.put(0, w.prepare(d1[:CS]))
        p = nbdbackup("forget", "--repo", path, b0.id, check=False)     # while the writer runs
        assert p.returncode == 3, p.stderr
        assert f"backup {b0.id} is in use by backup pid {os.getpid()}" in p.stderr, p.stderr
        assert "nothing was forgotten" in p.stderr
        nbdbackup("gc", "--repo", path, "--grace", "0")       # gc beside the writer takes nothing it needs
        for i in range(1, 10):
            if d1[i * CS:(i + 1) * CS] != d0[i * CS:(i + 1) * CS]:
                w.put(i, w.prepare(d1[i * CS:(i + 1) * CS]))
        b1 = w.commit(read_bytes=0, duration_s=0.1)
    nbdbackup("forget", "--repo", path, b0.id)                  # released with the writer's lease
    nbdbackup("gc", "--repo", path)
    with Repository.open(path) as repo:
        assert [b.id for b in repo.list_backups()] == [b1.id]
        assert read_all(repo, b1.id) == d1
