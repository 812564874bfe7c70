"""restore --salvage, self-healing of damaged chunks, verify --since (issue 15).

Real repositories with bytes flipped (or packs removed) in their storage, the way a disk or a
bucket suffers it; every command under test runs through the installed CLI.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest
from sqlalchemy import select

from helpers.places import patch_object, remove_object, stored_names
from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo_path, read_all, write_backup
from helpers.support import nbdbackup, qemu_nbd, require_tool
from nbdbackup.repo import Repository
from nbdbackup.repo import packs as P
from nbdbackup.repo.backuprows import segment_refs
from nbdbackup.repo.chunks import ZERO_REF
from nbdbackup.repo.schema import backups, chunks, damaged_records, packs
from nbdbackup.repo.verify import verify

SEG = 8                 # map positions per segment: several segments per backup
NCHUNKS = 24
ZERO_AT = (3, 11)       # all-zero chunks: never stored
REPEAT = (6, 16)        # one content at two positions (one record, two places in the map)


def disk(seed: int) -> bytes:
    rng = random.Random(seed)
    out = [rng.randbytes(CS) for _ in range(NCHUNKS)]
    for i in ZERO_AT:
        out[i] = bytes(CS)
    out[REPEAT[1]] = out[REPEAT[0]]
    return b"".join(out)


def nbb(repo, *args, check=True, **kw):
    return nbdbackup("--repo", str(repo), *args, check=check, **kw)


def refs_of(path, ref) -> tuple[object, list[bytes]]:
    """(info, chunk id by position) of backup *ref*."""
    with Repository.open(str(path)) as repo:
        info = repo.resolve(ref)
        with repo.open_image(info) as img:
            return info, [img.chunk_ref(i) for i in range(img.nchunks)]


def location(path, h: bytes, table=chunks):
    with Repository.open(str(path)) as repo:
        return (repo.store.chunk_locations if table is chunks else repo.store.segment_locations)([h])[h]


def flip(path, loc) -> None:
    """One byte in the middle of a record's payload: its hash (or AEAD tag) fails."""
    patch_object(str(path), P.pack_object_name(loc.pack), loc.offset + loc.stored_len // 2, xor=0x5A)


def ranges(positions, size: int) -> list[dict]:
    out: list[dict] = []
    for p in sorted(set(positions)):
        off, n = p * CS, min(CS, size - p * CS)
        if out and out[-1]["offset"] + out[-1]["length"] == off:
            out[-1]["length"] += n
        else:
            out.append({"offset": off, "length": n})
    return out


def salvaged_bytes(data: bytes, damaged: list[dict]) -> bytes:
    """*data* with the *damaged* ranges zeroed: what a salvage must write."""
    out = bytearray(data)
    for r in damaged:
        out[r["offset"]:r["offset"] + r["length"]] = bytes(r["length"])
    return bytes(out)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A local repository: vda full (24 chunks, 3 segments), small packs (about 4 chunks each)."""
    path = new_repo_path(tmp_path_factory.mktemp("salvage") / "repo", segment_len=SEG, pack_size=256 * 1024)
    data = disk(1)
    with Repository.open(path) as repo:
        info = write_backup(repo, "vda", data, zero_holes=True)
    return path, info, data


@pytest.fixture
def damaged_repo(pristine, tmp_path):
    import shutil

    path, info, data = pristine
    dst = tmp_path / "repo"
    shutil.copytree(path, dst)
    return dst, info, data


# --- salvage ----------------------------------------------------------------------------------

def test_salvage_zeroes_exactly_the_damaged_chunks(damaged_repo, tmp_path):
    path, info, data = damaged_repo
    _, refs = refs_of(path, info.id)
    # positions 7 and 8 (neighbours: one merged range) and the repeated content (two places)
    bad = {refs[7], refs[8], refs[REPEAT[0]]}
    for h in bad:
        flip(path, location(path, h))
    want = ranges([i for i, h in enumerate(refs) if h in bad], info.size)
    assert len(want) == 2       # 6-8 merged, 16 alone

    out = tmp_path / "plain.raw"
    p = nbb(path, "restore", info.id, str(out), check=False)          # without --salvage: unchanged
    assert p.returncode == 9 and f"offset {6 * CS}" in p.stderr and not out.exists(), p.stderr

    p = nbb(path, "--json", "restore", "--salvage", info.id, str(out), check=False)
    assert p.returncode == 5, p.stderr
    doc = json.loads(p.stdout)
    assert doc["damaged"] == want and doc["backup"]["id"] == info.id
    assert doc["data_bytes"] == sum(1 for h in refs if h != ZERO_REF and h not in bad) * CS
    assert out.read_bytes() == salvaged_bytes(data, want)
    assert "salvaged with 2 damaged ranges" in p.stderr and "Traceback" not in p.stderr

    text = tmp_path / "text.raw"
    p = nbb(path, "restore", "--salvage", info.id, str(text), check=False)
    assert p.returncode == 5 and "salvaged with 2 damaged ranges" in p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("DAMAGED")]
    assert lines == [f"DAMAGED bytes {r['offset']}-{r['offset'] + r['length'] - 1} (offset {r['offset']}, "
                     f"length {r['length']}): written as zeros" for r in want]
    assert text.read_bytes() == out.read_bytes()


def test_salvage_of_an_intact_backup_exits_0_with_an_empty_list(pristine, tmp_path):
    path, info, data = pristine
    p = nbb(path, "--json", "restore", "--salvage", info.id, str(tmp_path / "x.raw"))
    assert json.loads(p.stdout)["damaged"] == [] and (tmp_path / "x.raw").read_bytes() == data


def test_salvage_of_a_missing_pack_and_a_damaged_segment_to_qcow2(damaged_repo, tmp_path):
    """A pack of chunks removed, a map segment flipped: zeros there (the whole segment's span)."""
    path, info, data = damaged_repo
    _, refs = refs_of(path, info.id)
    with Repository.open(str(path)) as repo:
        segs = segment_refs(repo.index_db, info.id)
        seg_pack = repo.store.segment_locations([segs[2]])[segs[2]].pack
        locs = repo.store.chunk_locations([h for h in refs if h != ZERO_REF])
    # a pack holding only chunks of the first two segments (the first pack written)
    lost_pack = locs[refs[0]].pack
    assert lost_pack != seg_pack
    lost = {h for h, loc in locs.items() if loc.pack == lost_pack}
    remove_object(str(path), P.pack_object_name(lost_pack))
    flip(path, location(path, segs[2], table=None))
    positions = [i for i, h in enumerate(refs) if h in lost] + list(range(2 * SEG, NCHUNKS))
    want = ranges(positions, info.size)

    out = tmp_path / "s.qcow2"
    p = nbb(path, "--json", "restore", "--salvage", "--format", "qcow2", info.id, str(out), check=False)
    assert p.returncode == 5, p.stderr
    assert json.loads(p.stdout)["damaged"] == want
    raw = tmp_path / "s.raw"
    subprocess.run([require_tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw)], check=True)
    assert raw.read_bytes() == salvaged_bytes(data, want)


def _garbage_file(path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\xa5" * size)       # not zero: the damaged ranges must really be zeroed


def test_salvage_to_an_nbd_export_and_a_block_device_writes_the_zeros(damaged_repo, tmp_path):
    path, info, data = damaged_repo
    _, refs = refs_of(path, info.id)
    flip(path, location(path, refs[20]))
    want = ranges([20], info.size)
    img = tmp_path / "target.raw"
    _garbage_file(img, info.size)
    with qemu_nbd(img, tmp_path / "nbd.sock", fmt="raw", readonly=False) as uri:
        p = nbb(path, "--json", "restore", "--salvage", info.id, uri, check=False)
    assert p.returncode == 5 and json.loads(p.stdout)["damaged"] == want, p.stderr
    assert img.read_bytes() == salvaged_bytes(data, want)

    backing = tmp_path / "loop.img"
    _garbage_file(backing, info.size)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    assert dev.returncode == 0, f"losetup failed: {dev.stderr}"
    dev = dev.stdout.strip()
    try:
        p = nbb(path, "--json", "restore", "--salvage", "--force", info.id, dev, check=False)
    finally:
        subprocess.run(["losetup", "-d", dev])
    assert p.returncode == 5 and json.loads(p.stdout)["damaged"] == want, p.stderr
    assert backing.read_bytes() == salvaged_bytes(data, want)


# --- self-healing -----------------------------------------------------------------------------

def _init(place, *, encrypted: bool, monkeypatch) -> None:
    if encrypted:
        monkeypatch.setenv("NBDBACKUP_PASSPHRASE", "heal-test-passphrase")
        nbb(place, "init", "--encryption", "--kdf-memory", "8", "--chunk-size", "64K")
    else:
        new_repo_path(place.spec, **place.init_options())


def _verify(place, *args, rc: int) -> dict:
    p = nbb(place, "--json", "verify", *args, check=False)
    assert p.returncode == rc, p.stderr
    return json.loads(p.stdout)


def _heal_cycle(place, tmp_path, *, encrypted: bool, monkeypatch) -> None:
    """damage a chunk, verify (exit 5, recorded), back up the same disk again, verify clean
    (exit 0, names the healed chunk), restore the OLD backup bit-exact."""
    _init(place, encrypted=encrypted, monkeypatch=monkeypatch)
    data = disk(2)
    with Repository.open(place.spec) as repo:
        old = write_backup(repo, "vda", data, zero_holes=True)
    _, refs = refs_of(place.spec, old.id)
    h = refs[REPEAT[0]]
    bad_loc = location(place.spec, h)
    flip(place.spec, bad_loc)

    rep = _verify(place, rc=5)
    assert rep["damaged"][0]["ranges"] == ranges(REPEAT, old.size) and rep["healed"] == []
    [mark] = rep["damage_remaining"]
    assert (mark["kind"], mark["id"], mark["pack"], mark["offset"]) == ("chunk", h.hex(), bad_loc.pack,
                                                                        bad_loc.offset)
    with Repository.open(place.spec) as repo:
        new = write_backup(repo, "vda", data, zero_holes=True)     # the same bytes, read again
        # one fresh record stored (the chunk) besides the new map segment and manifest
        fresh = repo.store.chunk_locations([h])[h]
        with repo.index_db.connect() as conn:
            healed_ms = conn.execute(damaged_records.select()).one().healed_ms
    assert new.stored_bytes < 3 * CS and fresh.pack != bad_loc.pack and healed_ms is not None

    rep = _verify(place, rc=0)
    assert [(m["kind"], m["id"]) for m in rep["healed"]] == [("chunk", h.hex())]
    assert rep["damaged"] == [] and rep["damage_remaining"] == []
    out = tmp_path / "old.raw"
    nbb(place, "restore", old.id, str(out))
    assert out.read_bytes() == data
    p = nbb(place, "verify")                        # reported once: the mark is gone
    assert "HEALED" not in p.stdout and "all intact" in p.stderr


def test_a_damaged_chunk_heals_with_the_next_backup(place, tmp_path, monkeypatch):
    _heal_cycle(place, tmp_path, encrypted=False, monkeypatch=monkeypatch)


def test_a_damaged_sealed_record_heals_in_an_encrypted_repository(tmp_path, request, monkeypatch):
    from helpers.places import make_place

    _heal_cycle(make_place(request, "local", tmp_path), tmp_path, encrypted=True, monkeypatch=monkeypatch)


def test_a_missing_pack_heals_and_the_healed_mark_is_not_deduplicated_twice(damaged_repo, tmp_path):
    """A whole pack gone: every chunk in it is healed by one full backup; a later backup
    deduplicates against the fresh copies (nothing stored again)."""
    path, info, data = damaged_repo
    _, refs = refs_of(path, info.id)
    lost_pack = location(path, refs[0]).pack
    remove_object(str(path), P.pack_object_name(lost_pack))
    rep = _verify(path, rc=5)
    lost = {m["id"] for m in rep["damage_remaining"]}
    assert lost and all(m["pack"] == lost_pack and "missing" in m["reason"] for m in rep["damage_remaining"])
    p = nbb(path, "verify", check=False)           # still damaged: still says so, still recorded
    assert p.returncode == 5 and sorted(ln.split()[2].rstrip(":") for ln in p.stdout.splitlines()
                                        if ln.startswith("REMAINS chunk ")) == sorted(h[:16] for h in lost)
    with Repository.open(str(path)) as repo:
        b1 = write_backup(repo, "vda", data, zero_holes=True)
        b2 = write_backup(repo, "vda", data, zero_holes=True)
    assert b1.stored_bytes >= len(lost) * CS and b2.stored_bytes < CS    # b2: its manifest's segment at most
    rep = _verify(path, rc=0)
    assert {m["id"] for m in rep["healed"]} == lost
    _intact(path, info, data)


def _records_of(path, h: bytes) -> list[tuple[str, int]]:
    """(pack, offset) of every record of id *h* in the storage, by the pack footers."""
    out = []
    for obj in stored_names(str(path), "packs/"):
        with Repository.open(str(path), check=False) as repo:
            name = obj.rsplit("/", 1)[-1][:-len(".pack")]
            out += [(name, r.offset) for r in P.read_records(repo.backend, name) if r.hash == h]
    return sorted(out)


def _healed_repo(damaged_repo):
    path, info, data = damaged_repo
    _, refs = refs_of(path, info.id)
    h = refs[9]
    bad = location(path, h)
    flip(path, bad)
    with Repository.open(str(path)) as repo:       # in-process: the CLI's verify is tested above
        assert not verify(repo).ok
        write_backup(repo, "vda", data, zero_holes=True)
    good = location(path, h)
    assert _records_of(path, h) == sorted([(bad.pack, bad.offset), (good.pack, good.offset)])
    return path, info, data, h, bad, good


def test_gc_after_heal_keeps_the_fresh_copy_and_drops_the_damaged_one(damaged_repo, tmp_path):
    path, info, data, h, bad, good = _healed_repo(damaged_repo)
    # the damaged record is dead now (no row names it): its pack is sparse and repacked
    gc = json.loads(nbb(path, "--json", "gc", "--grace", "0", "--repack-threshold", "0.99").stdout)
    assert gc["packs_repacked"] >= 1 and gc["skipped_damaged"] == []   # it was not copied, nor even read
    assert _records_of(path, h) == [(good.pack, good.offset)] == [(location(path, h).pack, location(path, h).offset)]
    _intact(path, info, data)


def _intact(path, info, data) -> None:
    with Repository.open(str(path)) as repo:
        rep = verify(repo)
        assert rep.ok and rep.damage_marks == [], rep.problem_lines()
        assert read_all(repo, info.id) == data


def test_rebuild_index_after_heal_points_at_the_good_copy(damaged_repo, tmp_path):
    path, info, data, h, bad, good = _healed_repo(damaged_repo)
    # the damaged copy's pack first in listing order, so "first found wins" would pick it
    first = "00" + bad.pack[2:]
    os.makedirs(path / "packs" / "00", exist_ok=True)
    os.rename(path / P.pack_object_name(bad.pack), path / P.pack_object_name(first))
    nbb(path, "rebuild-index")
    loc = location(path, h)
    assert (loc.pack, loc.offset) == (good.pack, good.offset)
    with Repository.open(str(path)) as repo, repo.index_db.connect() as conn:
        assert conn.execute(damaged_records.select()).all() == []      # marks are index-only state
    _intact(path, info, data)


# --- verify --since ---------------------------------------------------------------------------

def _verified_ms(path) -> dict[str, int | None]:
    with Repository.open(str(path)) as repo, repo.index_db.connect() as conn:
        return {r.id: r.verified_ms for r in conn.execute(backups.select())}


def test_verify_since_checks_only_what_was_not_verified_lately(damaged_repo):
    path, info, data = damaged_repo
    with Repository.open(str(path)) as repo:
        other = write_backup(repo, "vdb", disk(3), zero_holes=True)
    assert set(_verified_ms(path).values()) == {None}
    _verify(path, "--sample", "10", rc=0)
    assert set(_verified_ms(path).values()) == {None}        # a sample proves nothing
    before = int(time.time() * 1000)
    _verify(path, rc=0)
    stamped = _verified_ms(path)
    assert all(v is not None and v >= before - 5 for v in stamped.values())
    from nbdbackup.repo.ids import from_ms, iso_ms
    listed = {b["id"]: b["verified"] for b in json.loads(nbb(path, "--json", "list").stdout)}
    assert listed == {bid: iso_ms(from_ms(ms)) for bid, ms in stamped.items()}

    rep = _verify(path, "--since", "7", rc=0)
    assert rep["backups_checked"] == 0 and rep["skipped_recent"] == 2
    with Repository.open(str(path)) as repo, repo.index_db.begin() as conn:       # verified 8 days ago
        conn.execute(backups.update().where(backups.c.id == info.id)
                     .values(verified_ms=stamped[info.id] - 8 * 86_400_000))
    rep = _verify(path, "--since", "7", rc=0)
    assert rep["backups_checked"] == 1 and rep["skipped_recent"] == 1 and rep["damaged"] == []
    assert _verified_ms(path)[info.id] >= stamped[info.id]

    # damage vdb: found once, never marked verified, and re-checked by every --since run
    _, refs = refs_of(path, other.id)
    flip(path, location(path, refs[0]))
    with Repository.open(str(path)) as repo, repo.index_db.begin() as conn:
        conn.execute(backups.update().where(backups.c.id == other.id)
                     .values(verified_ms=stamped[other.id] - 8 * 86_400_000))
    rep = _verify(path, "--since", "7", rc=5)
    assert [d["id"] for d in rep["damaged"]] == [other.id] and rep["backups_checked"] == 1
    assert _verified_ms(path)[other.id] is None     # so every --since run checks it again


def test_an_index_at_0004_is_migrated(pristine, tmp_path):
    import shutil

    from alembic import command

    from nbdbackup.repo.index import alembic_config

    path, info, data = pristine
    dst = tmp_path / "repo"
    shutil.copytree(path, dst)
    with Repository.open(str(dst)) as repo:
        command.downgrade(alembic_config(repo.index_db), "0004")
    p = nbb(dst, "list", check=False)
    assert p.returncode == 7 and "0004" in p.stderr
    assert "from revision 0004 to 0005" in nbb(dst, "migrate").stderr
    _verify(dst, rc=0)
    assert _verified_ms(dst)[info.id] is not None
    with Repository.open(str(dst)) as repo, repo.index_db.connect() as conn:
        assert conn.execute(packs.select()).all()


def test_salvage_of_a_libvirt_set_names_the_damage_per_disk(tmp_path):
    """restore --libvirt --salvage: each disk salvaged on its own, the domain XML still written."""
    from nbdbackup.repo.vmdef import VmDefinition

    xml = ("<domain type='kvm'><name>web1</name><devices>"
           + "".join(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                     f"<source file='/var/lib/libvirt/images/web1-{t}.qcow2'/><target dev='{t}' bus='virtio'/></disk>"
                     for t in ("vda", "vdb"))
           + "</devices></domain>")
    path = new_repo_path(tmp_path / "repo", segment_len=SEG)
    data = {"vda": disk(4), "vdb": disk(5)}
    with Repository.open(path) as repo:
        ws: list = []
        for t, d in data.items():
            write_backup(repo, f"web1-{t}", d, zero_holes=True, set_writers=ws, source=f"libvirt:web1/{t}")
        members = repo.commit_set(ws, vm=VmDefinition("web1", xml))
    vdb = next(b for b in members if b.disk == "web1-vdb")
    _, refs = refs_of(path, vdb.id)
    flip(path, location(path, refs[1]))
    want = ranges([1], vdb.size)
    p = nbb(path, "--json", "restore", "--libvirt", "web1", "--to-dir", str(tmp_path / "out"), "--format", "raw",
            "--salvage", check=False)
    assert p.returncode == 5 and "salvaged with 1 damaged range in 1 disk" in p.stderr, p.stderr
    got = {d["target"]: d for d in json.loads(p.stdout)["disks"]}
    assert got["vda"]["damaged"] == [] and got["vdb"]["damaged"] == want
    assert (tmp_path / "out" / "web1-vda.raw").read_bytes() == data["vda"]
    assert (tmp_path / "out" / "web1-vdb.raw").read_bytes() == salvaged_bytes(data["vdb"], want)
    assert (tmp_path / "out" / "web1.xml").exists()


def test_a_damaged_map_segment_heals_like_a_chunk(damaged_repo, tmp_path):
    """Segments are content-addressed too: the next full backup of the same disk builds the same
    segment, stores it afresh, and the old backup's map reads again."""
    path, info, data = damaged_repo
    with Repository.open(str(path)) as repo:
        seg = segment_refs(repo.index_db, info.id)[1]
    flip(path, location(path, seg, table=None))
    rep = _verify(path, rc=5)
    assert rep["damaged"][0]["ranges"] == ranges(range(SEG, 2 * SEG), info.size)
    assert [(m["kind"], m["id"]) for m in rep["damage_remaining"]] == [("segment", seg.hex())]
    with Repository.open(str(path)) as repo:
        write_backup(repo, "vda", data, zero_holes=True)
    rep = _verify(path, rc=0)
    assert [(m["kind"], m["id"]) for m in rep["healed"]] == [("segment", seg.hex())]
    _intact(path, info, data)


# -- the review's findings (heal-fix) ------------------------------------------------------------

def _shared_pair(tmp_path):
    """Backups A and B sharing their first 8 chunks, both verified clean, then one shared
    chunk flipped in its pack: (path, A, B)."""
    path = new_repo_path(str(tmp_path / "r"), segment_len=8, pack_size=256 * 1024)
    rng = random.Random(15)
    d1 = b"".join(rng.randbytes(CS) for _ in range(16))
    d2 = d1[:8 * CS] + b"".join(rng.randbytes(CS) for _ in range(8))
    with Repository.open(path) as repo:
        a, b = write_backup(repo, "vda", d1), write_backup(repo, "vdb", d2)
        assert verify(repo).ok
        h = repo.open_image(repo.resolve(a.id)).chunk_ref(0)
        loc = repo.store.chunk_locations([h])[h]
    patch_object(path, P.pack_object_name(loc.pack), loc.offset + loc.stored_len // 2, xor=0x5A)
    return path, a, b


def test_verify_since_never_skips_a_backup_known_damaged_by_a_sample(tmp_path):
    path, a, b = _shared_pair(tmp_path)
    with Repository.open(path) as repo:
        r = verify(repo, sample_percent=100)
        assert {d.backup.id for d in r.damaged} == {a.id, b.id}
        r = verify(repo, since_days=7)          # the sample's damage cleared both stamps
        assert (r.backups_checked, r.skipped_recent, r.ok) == (2, 0, False)


def test_verify_since_checks_a_clean_stamped_backup_sharing_a_marked_chunk(tmp_path):
    path, a, b = _shared_pair(tmp_path)
    with Repository.open(path) as repo:
        r = verify(repo, [b.id])                # only B checked: A keeps its clean stamp
        assert [d.backup.id for d in r.damaged] == [b.id]
        with repo.index_db.connect() as c:
            assert c.execute(select(backups.c.verified_ms).where(backups.c.id == a.id)).scalar() is not None
        r = verify(repo, since_days=7)          # A names the marked chunk: checked, not skipped
        assert r.skipped_recent == 0 and {d.backup.id for d in r.damaged} == {a.id, b.id}


def test_a_late_older_heal_neither_moves_the_row_back_nor_lowers_its_epoch(tmp_path):
    from nbdbackup.repo.damage import heal_rows, marks
    from nbdbackup.repo.dedup import upsert_rows
    from nbdbackup.repo.index import write_txn
    path, a, b = _shared_pair(tmp_path)
    with Repository.open(path) as repo:
        verify(repo, [a.id])
        (kind, h), = marks(repo.index_db)
        cols = (chunks.c.pack_id, chunks.c.offset, chunks.c.stored_len, chunks.c.raw_len, chunks.c.compression)
        with repo.index_db.connect() as c:
            pid, off, sl, rl, comp = c.execute(select(*cols).where(chunks.c.hash == h)).first()
        row = dict(hash=h, pack_id=pid, stored_len=sl, raw_len=rl, compression=comp)
        for epoch, offset in ((10, off + 1000), (3, off + 2000)):     # W2 (S=10) seals first, then W1 (S=3)
            with write_txn(repo.index_db) as c:       # as PackSealer's index transaction does
                upsert_rows(c, chunks, [dict(row, offset=offset)], epoch)
                heal_rows(c, chunks, [dict(row, offset=offset)], epoch)
        with repo.index_db.connect() as c:
            now = c.execute(select(chunks.c.offset, chunks.c.used_epoch).where(chunks.c.hash == h)).first()
            healed = c.execute(select(damaged_records.c.healed_ms)).scalar()
        assert tuple(now) == (off + 1000, 10) and healed is not None


def test_verify_beside_a_repack_marks_nothing(tmp_path):
    from nbdbackup.repo.damage import marks
    from nbdbackup.repo.forget import forget
    from nbdbackup.repo.gc import collect
    path = new_repo_path(str(tmp_path / "r"), pack_size=256 * 1024)
    rng = random.Random(3)
    xs, ys = [rng.randbytes(CS) for _ in range(8)], [rng.randbytes(CS) for _ in range(8)]
    with Repository.open(path) as repo:
        mix = write_backup(repo, "mix", b"".join(x + y for x, y in zip(xs, ys)))
        a = write_backup(repo, "vda", b"".join(xs))
        forget(repo, [mix.id])
    with Repository.open(path) as repo, Repository.open(path) as other:
        listing = repo.backend.list
        repacked = []

        def list_then_gc(prefix, *k, **kw):     # gc's repack lands between the lookup and the reads
            if prefix == "packs/" and not repacked:
                repacked.append(collect(other, repack_threshold=0.99, grace=0).packs_repacked)
            return listing(prefix, *k, **kw)
        repo.backend.list = list_then_gc
        r = verify(repo, [a.id])
        assert repacked[0] > 0 and r.ok and not marks(repo.index_db)


def test_a_pack_that_cannot_be_read_is_no_damage(tmp_path, monkeypatch):
    import errno

    from nbdbackup.errors import StorageUnreachable
    from nbdbackup.repo.damage import marks
    path, a, b = _shared_pair(tmp_path)
    with Repository.open(path) as repo:
        def eio(*_a, **_k):        # a flaky mount: the bytes are not known bad, only unread
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(repo.backend, "get", eio)
        with pytest.raises(StorageUnreachable):
            verify(repo)
        assert not marks(repo.index_db)


def test_two_verifies_recording_one_mark_at_once_both_succeed_on_postgresql(pg_url):
    import threading

    from sqlalchemy import create_engine

    from nbdbackup.repo import damage
    from nbdbackup.repo.index import write_txn
    from nbdbackup.repo.schema import metadata
    eng = create_engine(pg_url)
    try:
        metadata.create_all(eng)
        mark = damage.Mark("chunk", bytes(range(32)), "p1", 64, "hash mismatch", 1)
        inserted, done = threading.Event(), threading.Event()

        def first_verify():     # holds its insert uncommitted while the second one records
            with write_txn(eng) as conn:
                conn.execute(damaged_records.insert().values(kind="chunk", hash=mark.hash, pack="p1", offset=64,
                                                             reason="first", found_ms=1))
                inserted.set()
                done.wait(2)
        t = threading.Thread(target=first_verify)
        t.start()
        assert inserted.wait(30)
        timer = threading.Timer(1.0, done.set)
        timer.start()
        damage.record(eng, [mark])          # waits for the first, then must not hit the primary key
        t.join()
        got = damage.marks(eng)
        assert list(got) == [("chunk", mark.hash)] and got[("chunk", mark.hash)].reason == "hash mismatch"
    finally:
        eng.dispose()


def test_rebuild_index_names_an_id_whose_every_copy_is_damaged(damaged_repo):
    from nbdbackup.repo.rebuild import rebuild_index
    path, info, data, h, bad, good = _healed_repo(damaged_repo)
    flip(path, good)                    # now both copies fail their check
    rep = rebuild_index(str(path))
    assert rep.no_good_copy == [f"chunk {h.hex()}"]
    assert any(h.hex() in line and "every stored copy is damaged" in line for line in rep.problem_lines())
