"""`nbdbackup verify`: intact repositories pass; damaged or missing data is named with byte ranges."""

from __future__ import annotations

import json
import math
import random

import pytest

from helpers.places import make_place, pack_objects, patch_object, read_object, remove_object, write_object
from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import disk_data, new_repo_path, write_backup
from helpers.support import nbdbackup, nbdbackup_on_a_tty
from nbdbackup.repo import Repository
from nbdbackup.repo import packs as P
from nbdbackup.repo.chunks import ZERO_REF

SEG = 8   # map positions per segment: several segments per backup


@pytest.fixture(params=["local", "s3+pg"])
def repo_path(request, tmp_path):
    """A repository with four backups, locally and on S3 with its index on PostgreSQL."""
    place = make_place(request, request.param, tmp_path)
    path = new_repo_path(place.spec, segment_len=SEG, pack_size=512 * 1024, **place.init_options())
    rng = random.Random(7)
    with Repository.open(path) as repo:
        a0 = disk_data(rng, 24)
        b0 = write_backup(repo, "vda", a0)
        a1 = disk_data(rng, 24, base=a0, change=0.3)
        b1 = write_backup(repo, "vda", a1, parent=b0, changed=range(24))
        a2 = a1[:CS * 20] + rng.randbytes(CS * 4)
        write_backup(repo, "vda", a2, parent=b1, changed=range(20, 24))
        write_backup(repo, "vdb", a0[:CS * 10] + rng.randbytes(CS * 6))   # shares chunks with vda
    return path


def _maps(path) -> dict[str, tuple[object, list[bytes]]]:
    """backup id -> (info, chunk refs by position)."""
    out = {}
    with Repository.open(path) as repo:
        for b in repo.list_backups():
            with repo.open_image(b) as img:
                out[b.id] = (b, [img.chunk_ref(i) for i in range(img.nchunks)])
    return out


def _expected_damage(maps, bad: set[bytes], bad_segments_of=None) -> dict[str, list[dict]]:
    """Ranges per backup: positions holding a bad chunk, or covered by a bad map segment."""
    out = {}
    for bid, (info, refs) in maps.items():
        lost_segs = bad_segments_of(bid) if bad_segments_of else set()
        ranges = []
        for i, h in enumerate(refs):
            if h in bad or i // SEG in lost_segs:
                off, n = i * CS, min(CS, info.size - i * CS)
                if ranges and ranges[-1]["offset"] + ranges[-1]["length"] == off:
                    ranges[-1]["length"] += n
                else:
                    ranges.append({"offset": off, "length": n})
        if ranges:
            out[bid] = ranges
    return out


def _verify_json(path, *args, rc):
    p = nbdbackup("verify", "--repo", path, "--json", *args, check=False)
    assert p.returncode == rc, p.stderr
    return json.loads(p.stdout), p


def test_intact_repository_passes(repo_path):
    p = nbdbackup("verify", "--repo", repo_path)
    assert "all intact" in p.stderr
    rep, _ = _verify_json(repo_path, rc=0)
    assert rep["ok"] and rep["backups_checked"] == 4 and rep["damaged"] == []
    assert rep["chunks_checked"] == rep["chunks_total"] > 0
    maps = _maps(repo_path)
    distinct = {h for _, refs in maps.values() for h in refs if h != ZERO_REF}
    assert rep["chunks_total"] == len(distinct)


def test_flipped_byte_names_backups_and_ranges(repo_path):
    maps = _maps(repo_path)
    # a chunk shared by vda's first backups and vdb: position 3 of the first full
    first = min(maps.values(), key=lambda m: m[0].created)
    victim = next(h for h in first[1][:10] if h != ZERO_REF)
    with Repository.open(repo_path) as repo:
        loc = repo.store.chunk_locations([victim])[victim]
    patch_object(repo_path, P.pack_object_name(loc.pack), loc.offset + loc.stored_len // 2, xor=0x40)
    rep, p = _verify_json(repo_path, rc=5)
    want = _expected_damage(maps, {victim})
    assert len(want) >= 1
    assert {d["id"]: d["ranges"] for d in rep["damaged"]} == want
    assert "damaged backup" in p.stderr
    # the human report names the backups and ranges too
    p = nbdbackup("verify", "--repo", repo_path, check=False)
    assert p.returncode == 5
    for bid, ranges in want.items():
        assert bid in p.stdout and bid in p.stderr
        for r in ranges:
            assert f"bytes {r['offset']}-{r['offset'] + r['length'] - 1}" in p.stdout
    # verifying only an undamaged backup passes
    clean = [bid for bid in maps if bid not in want]
    if clean:
        rep, _ = _verify_json(repo_path, clean[0], rc=0)
        assert rep["backups_checked"] == 1


def test_deleted_pack_names_every_backup_using_it(repo_path):
    maps = _maps(repo_path)
    assert len(pack_objects(repo_path)) >= 2
    with Repository.open(repo_path) as repo:
        all_refs = {h for _, refs in maps.values() for h in refs if h != ZERO_REF}
        locs = repo.store.chunk_locations(all_refs)
        seg_refs = {b.id: repo.segment_refs(b.id) for b in repo.list_backups()}
        seg_locs = repo.store.segment_locations({h for r in seg_refs.values() for h in r if h})
    # the pack holding the most chunks; map segments stored in it are lost too
    counts: dict[str, int] = {}
    for loc in locs.values():
        counts[loc.pack] = counts.get(loc.pack, 0) + 1
    gone = max(counts, key=counts.get)
    remove_object(repo_path, P.pack_object_name(gone))
    bad = {h for h, loc in locs.items() if loc.pack == gone}

    def lost_segments(bid):
        return {seq for seq, h in enumerate(seg_refs[bid]) if h and seg_locs[h].pack == gone}

    rep, _ = _verify_json(repo_path, rc=5)
    assert {d["id"]: d["ranges"] for d in rep["damaged"]} == _expected_damage(maps, bad, lost_segments)
    assert any(f"pack {gone} is missing" in pr for d in rep["damaged"] for pr in d["problems"])


def test_damaged_map_segment_marks_its_whole_range(repo_path):
    maps = _maps(repo_path)
    with Repository.open(repo_path) as repo:
        b = repo.list_backups("vdb")[0]
        seg = repo.segment_refs(b.id)[1]          # positions 8..15
        loc = repo.store.segment_locations([seg])[seg]
    patch_object(repo_path, P.pack_object_name(loc.pack), loc.offset, b"\xff\xff\xff\xff")
    rep, _ = _verify_json(repo_path, b.id, rc=5)
    (d,) = rep["damaged"]
    assert d["id"] == b.id and d["ranges"] == [{"offset": 8 * CS, "length": 8 * CS}]
    assert maps[b.id][0].size == 16 * CS


def test_sample_checks_a_fraction(repo_path):
    rep, _ = _verify_json(repo_path, "--sample", "25", rc=0)
    assert rep["chunks_checked"] == math.ceil(rep["chunks_total"] * 0.25)
    assert rep["sample_percent"] == 25
    rep, _ = _verify_json(repo_path, "--sample", "100", rc=0)
    assert rep["chunks_checked"] == rep["chunks_total"]


def test_sample_finds_damage_it_reads(repo_path):
    for name in pack_objects(repo_path):      # damage every chunk: any sample must see it
        data = bytearray(read_object(repo_path, name))
        for i in range(100, len(data) - 200, 997):
            data[i] ^= 0x01
        write_object(repo_path, name, bytes(data))
    _verify_json(repo_path, "--sample", "1", rc=5)


def test_refs_and_usage_errors(repo_path):
    rep, _ = _verify_json(repo_path, "vdb", rc=0)
    assert rep["backups_checked"] == 1
    assert nbdbackup("verify", "--repo", repo_path, "nosuchdisk", check=False).returncode == 11
    for bad in ("0", "101", "abc"):
        p = nbdbackup("verify", "--repo", repo_path, "--sample", bad, check=False)
        assert p.returncode == 2, p.stderr
    p = nbdbackup("verify", check=False)
    assert p.returncode == 2 and "no repository" in p.stderr


def test_progress_bar_only_on_a_tty(repo_path):
    err = nbdbackup_on_a_tty("verify", "--repo", repo_path)
    assert "verify:" in err and "%|" in err and "all intact" in err
    quiet = nbdbackup_on_a_tty("verify", "--repo", repo_path, "--quiet")
    assert "%|" not in quiet and quiet.strip() == ""
    p = nbdbackup("verify", "--repo", repo_path)          # not a TTY: summary only
    assert "%|" not in p.stderr and "all intact" in p.stderr
    err = nbdbackup_on_a_tty("gc", "--repo", repo_path)
    assert "gc: mark" in err and "gc: reclaimed" in err


def test_backup_being_verified_cannot_be_forgotten(repo_path, monkeypatch):
    """Was: a backup forgotten while verify runs is named, not damage. Now verify's read lease
    pins what it checks (gc runs beside it and must not reclaim that data): the forget is
    refused (exit 3) and the backup is checked."""
    import pytest

    import nbdbackup.repo.verify as V
    from nbdbackup.errors import LockedError

    with Repository.open(repo_path) as repo:
        victim = repo.list_backups("vdb")[0]
        victim_pk = next(pk for pk, _, b in V._listed(repo) if b.id == victim.id)
        real = V._segment_refs

        def forget_then_read(r, pk):
            if pk == victim_pk:
                from nbdbackup.repo.forget import forget
                with pytest.raises(LockedError, match=f"backup {victim.id} is in use by read pid"):
                    forget(r, [victim.id])
            return real(r, pk)

        monkeypatch.setattr(V, "_segment_refs", forget_then_read)
        report = V.verify(repo)
    assert report.ok and report.backups_checked == 4 and report.vanished == []


def test_named_backup_forgotten_before_its_check_is_named(repo_path, monkeypatch):
    """`verify ID` for a backup forgotten between resolving ID and reading its rows: named, not
    a silent "0 backups checked, all intact". (Its lease pins ID once taken; the forget here
    lands between verify's resolving and its pinning.)"""
    import nbdbackup.repo.leases as L
    import nbdbackup.repo.verify as V
    from nbdbackup.repo.forget import forget

    with Repository.open(repo_path) as repo:
        victim = repo.list_backups("vdb")[0]
        real = L.Lease

        def forget_then_lease(*a, **kw):
            forget(repo, [victim.id])
            return real(*a, **kw)

        monkeypatch.setattr(L, "Lease", forget_then_lease)
        report = V.verify(repo, [victim.id])
    assert report.backups_checked == 0 and [b.id for b in report.vanished] == [victim.id]
