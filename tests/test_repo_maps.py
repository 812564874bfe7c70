"""Backup maps: complete point-in-time maps, shared segments, resizes, bit-exact reads."""

import threading

import pytest
from sqlalchemy import func, select

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, pseudo, read_all, write_backup
from nbdbackup.errors import LockedError, NotFound, UsageError
from nbdbackup.repo import Repository
from nbdbackup.repo.schema import segments

SEG = 4   # map positions per segment in these tests


def _repo(tmp_path, **kw):
    return new_repo(tmp_path / "repo", segment_len=SEG, **kw)


def _mutate(data: bytes, idx: int, seed: int) -> bytes:
    return data[:idx * CS] + pseudo(seed, CS) + data[(idx + 1) * CS:]


def test_incremental_shares_untouched_segments(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(1, 16 * CS)           # 4 segments
    full = write_backup(repo, "vda", data)
    d2 = _mutate(data, 5, 99)           # segment 1 only
    inc = write_backup(repo, "vda", d2, parent=full, changed=[5])
    a, b = repo.segment_refs(full.id), repo.segment_refs(inc.id)
    assert [x == y for x, y in zip(a, b)] == [True, False, True, True]
    assert read_all(repo, inc.id) == d2
    assert read_all(repo, full.id) == data
    # unchanged data re-put gives the very same segment (content addressed)
    inc2 = write_backup(repo, "vda", d2, parent=inc, changed=[0, 1, 2, 3])
    assert repo.segment_refs(inc2.id) == b


def test_backups_are_independent_of_their_parents_rows(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(2, 8 * CS)
    full = write_backup(repo, "vda", data)
    d2 = _mutate(data, 7, 3)
    inc = write_backup(repo, "vda", d2, parent=full, changed=[7])
    # reading the incremental never consults the parent: drop the parent's backup rows
    from nbdbackup.repo.index import write_txn
    from nbdbackup.repo.schema import backup_segments, backups
    with write_txn(repo.index_db) as c:
        pk = c.execute(select(backups.c.pk).where(backups.c.id == full.id)).scalar()
        c.execute(backup_segments.delete().where(backup_segments.c.backup_pk == pk))
        c.execute(backups.delete().where(backups.c.pk == pk))
    assert read_all(repo, inc.id) == d2


def test_short_last_chunk_bit_exact(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(4, 5 * CS + 4097)
    info = write_backup(repo, "vda", data)
    with repo.open_image(info) as img:
        assert img.nchunks == 6 and len(img.read_chunk(5)) == 4097
        assert img.read(0, len(data)) == data
        for off, n in [(0, 1), (CS - 3, 7), (3 * CS + 5, 2 * CS), (len(data) - 10, 10), (len(data), 0)]:
            assert img.read(off, n) == data[off:off + n]
        with pytest.raises(ValueError):
            img.read(len(data) - 1, 2)
        assert sum(n for _, n, _ in img.extents()) == len(data)


@pytest.mark.parametrize("new_size", [9 * CS + 100, 12 * CS, 5 * CS + 7, 3 * CS])
def test_resized_incremental(tmp_path, new_size):
    repo = _repo(tmp_path)
    data = pseudo(5, 9 * CS + 100)
    full = write_backup(repo, "vda", data)
    new = (data + pseudo(6, max(0, new_size - len(data))))[:new_size]
    if new_size == len(data):
        new = _mutate(new, 2, 7)
        changed = [2]
    else:
        # the engine's contract: every chunk from the parent's last (short) chunk on is put
        first = min(len(data), new_size) // CS
        if min(len(data), new_size) % CS == 0:
            first -= 1
        changed = range(max(first, 0), (new_size + CS - 1) // CS)
    inc = write_backup(repo, "vda", new, parent=full, changed=list(changed))
    assert inc.size == new_size
    assert read_all(repo, inc.id) == new


def test_late_put_reopens_a_finalized_segment(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(8, 40 * CS)
    w = repo.writer("vda", kind="full", size=len(data))
    order = list(range(1, 40)) + [0]        # chunk 0 arrives after its segment was finalized
    for i in order:
        w.put(i, w.prepare(data[i * CS:(i + 1) * CS]))
    info = w.commit(read_bytes=len(data), duration_s=0)
    assert read_all(repo, info.id) == data


def test_full_backup_unput_positions_are_zero(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(9, 12 * CS)
    w = repo.writer("vda", kind="full", size=len(data))
    w.put(6, w.prepare(data[6 * CS:7 * CS]))
    info = w.commit(read_bytes=CS, duration_s=0)
    expect = bytes(6 * CS) + data[6 * CS:7 * CS] + bytes(5 * CS)
    assert read_all(repo, info.id) == expect
    assert repo.segment_refs(info.id)[0] is None and repo.segment_refs(info.id)[2] is None


def test_incremental_put_zero_overrides_parent(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(10, 8 * CS)
    full = write_backup(repo, "vda", data)
    w = repo.writer("vda", kind="incremental", size=len(data), parent=full)
    w.put_zero(3)
    inc = w.commit(read_bytes=0, duration_s=0)
    assert read_all(repo, inc.id) == data[:3 * CS] + bytes(CS) + data[4 * CS:]


def test_segments_stored_once(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(11, 8 * CS)
    write_backup(repo, "vda", data)
    write_backup(repo, "vdb", data)
    with repo.index_db.connect() as c:
        assert c.execute(select(func.count()).select_from(segments)).scalar() == 2


def test_concurrent_reads_from_threads(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(12, 24 * CS + 5)
    info = write_backup(repo, "vda", data)
    errors = []
    with repo.open_image(info) as img:
        def worker(k):
            try:
                for j in range(60):
                    off = (k * 7919 + j * 104729) % (len(data) - 1)
                    n = min(3 * CS, len(data) - off)
                    if img.read(off, n) != data[off:off + n]:
                        errors.append((off, n))
            except Exception as e:   # noqa: BLE001 - report in the main thread
                errors.append(e)
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert errors == []


def test_commit_set_one_transaction_same_set_and_time(tmp_path):
    repo = _repo(tmp_path)
    a, b = pseudo(13, 3 * CS), pseudo(14, 5 * CS)
    ws = []
    for disk, d in (("vda", a), ("vdb", b)):
        write_backup(repo, disk, d, set_writers=ws)
    infos = repo.commit_set(ws, read_bytes=[len(a), len(b)], duration_s=[1.5, 2.5])
    assert infos[0].set_id and infos[0].set_id == infos[1].set_id
    assert infos[0].created == infos[1].created and infos[0].id != infos[1].id
    assert (infos[0].read_bytes, infos[1].duration_s) == (len(a), 2.5)
    assert read_all(repo, "vda") == a and read_all(repo, "vdb") == b


def test_abort_commits_nothing_and_frees_the_disk(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(15, 20 * CS)
    with pytest.raises(RuntimeError):
        with repo.writer("vda", kind="full", size=len(data)) as w:
            for i in range(w.nchunks):
                w.put(i, w.prepare(data[i * CS:(i + 1) * CS]))
            raise RuntimeError("source died")
    assert repo.list_backups() == []
    write_backup(repo, "vda", data)           # the disk lock was released
    assert len(repo.list_backups()) == 1


def test_refs_resolve_latest_checkpoint(tmp_path):
    repo = _repo(tmp_path)
    d = pseudo(16, 2 * CS)
    f = write_backup(repo, "vda", d, checkpoint="cp1", bitmap="b0")
    i = write_backup(repo, "vda", d, parent=f, changed=[])
    write_backup(repo, "vdb", d)
    assert repo.resolve("vda") == i == repo.latest("vda")
    assert repo.resolve(f.id) == f
    assert repo.find_by_checkpoint("vda", "cp1") == f
    assert repo.find_by_checkpoint("vda", "nope") is None
    assert repo.latest("nodisk") is None
    assert [b.id for b in repo.list_backups()] == sorted(b.id for b in repo.list_backups())
    assert [b.disk for b in repo.list_backups("vda")] == ["vda", "vda"]
    with pytest.raises(NotFound):
        repo.resolve("nodisk")
    with pytest.raises(NotFound):
        repo.resolve("20991231T000000000Z-abcd")
    assert f.created < i.created or f.id < i.id


def test_bad_disk_names_and_kinds(tmp_path):
    repo = _repo(tmp_path)
    for bad in ("", "a/b", "a b", "a?b", "#x", "-x", "20261126T054001123Z-3fa9", "x" * 65):
        with pytest.raises(UsageError):
            repo.writer(bad, kind="full", size=CS)
    with pytest.raises(UsageError):
        repo.writer("vda", kind="incremental", size=CS)
    with pytest.raises(UsageError):
        repo.writer("vda", kind="diff", size=CS)


def test_second_writer_of_same_disk_is_locked(tmp_path):
    repo = _repo(tmp_path)
    w = repo.writer("vda", kind="full", size=CS)
    try:
        with pytest.raises(LockedError, match="pid"):
            repo.writer("vda", kind="full", size=CS)
        w2 = repo.writer("vdb", kind="full", size=CS)   # other disks are fine
        w2.abort()
    finally:
        w.abort()


def test_memory_backend_repository(tmp_path):
    from nbdbackup.repo.memory_backend import MemoryBackend
    be = MemoryBackend()
    repo = new_repo(tmp_path / "r", segment_len=SEG, backend=be)
    data = pseudo(17, 6 * CS + 1)
    info = write_backup(repo, "vda", data)
    assert read_all(repo, info.id) == data
    assert list(be.list("packs/"))


def test_extents_merge_across_zero_segments(tmp_path):
    repo = _repo(tmp_path)
    data = bytes(9 * CS) + pseudo(20, 2 * CS) + bytes(4 * CS) + pseudo(21, 100)
    info = write_backup(repo, "vda", data)
    with repo.open_image(info) as img:
        assert list(img.extents()) == [(0, 9 * CS, True), (9 * CS, 2 * CS, False), (11 * CS, 4 * CS, True),
                                       (15 * CS, 100, False)]
    empty = write_backup(repo, "vdb", bytes(10 * CS + 1))
    with repo.open_image(empty) as img:
        assert list(img.extents()) == [(0, 10 * CS + 1, True)]


def test_extents_per_segment_end_at_each_segment_and_come_as_it_loads(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(23, 10 * CS) + bytes(6 * CS) + pseudo(24, 3 * CS + 100)     # segments of SEG = 4
    info = write_backup(repo, "vda", data)
    with repo.open_image(info) as img:
        runs = img.extents(per_segment=True)
        assert next(runs) == (0, 4 * CS, False)
        assert list(img._cache) == [0]          # the first run came before segment 1 was loaded
        assert list(runs) == [(4 * CS, 4 * CS, False), (8 * CS, 2 * CS, False), (10 * CS, 2 * CS, True),
                              (12 * CS, 4 * CS, True), (16 * CS, 3 * CS + 100, False)]
        assert list(img.extents()) == [(0, 10 * CS, False), (10 * CS, 6 * CS, True), (16 * CS, 3 * CS + 100, False)]


def test_writer_keeps_few_segments_open(tmp_path):
    repo = _repo(tmp_path)
    data = pseudo(22, 64 * CS)
    w = repo.writer("vda", kind="full", size=len(data))
    most = 0
    for i in range(w.nchunks):
        w.put(i, w.prepare(data[i * CS:(i + 1) * CS]))
        most = max(most, len(w._open))
    info = w.commit(read_bytes=len(data), duration_s=0)
    assert most <= 4          # of 16 segments: memory does not grow with the disk
    assert read_all(repo, info.id) == data


def test_damaged_map_segment_is_repo_damaged(tmp_path):
    import os

    from nbdbackup.errors import RepoDamaged
    from nbdbackup.repo import packs as P
    repo = _repo(tmp_path)
    data = pseudo(23, 8 * CS)
    info = write_backup(repo, "vda", data)
    h = repo.segment_refs(info.id)[1]
    loc = repo.store.segment_locations([h])[h]
    with open(os.path.join(repo.path, P.pack_object_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset + 3)
        f.write(b"\xff\xfe")
    repo.close()
    repo = Repository.open(repo.path)
    with repo.open_image(info.id) as img:
        assert img.read(0, 4 * CS) == data[:4 * CS]
        with pytest.raises(RepoDamaged, match="segment"):
            img.read_chunk(5)


def test_created_is_utc_ms_whatever_is_passed(tmp_path):
    from datetime import datetime, timedelta, timezone
    repo = _repo(tmp_path)
    w = repo.writer("vda", kind="full", size=CS)
    naive = datetime(2026, 1, 2, 3, 4, 5, 678901)
    info = w.commit(read_bytes=0, duration_s=0, created=naive)
    assert info.created == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    assert info.to_json()["created"] == "2026-01-02T03:04:05.678Z" and info.id.startswith("20260102T030405678Z-")
    w = repo.writer("vdb", kind="full", size=CS)
    other = datetime(2026, 1, 2, 5, 4, 5, 1000, tzinfo=timezone(timedelta(hours=2)))
    info2 = w.commit(read_bytes=0, duration_s=0, created=other)
    assert info2.to_json()["created"] == "2026-01-02T03:04:05.001Z"
    assert repo.get_backup(info2.id) == info2
