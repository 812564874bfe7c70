"""Chunk store: dedup, zero chunks, compression skip, checked reads, damage."""


import pytest
from sqlalchemy import func, select

from helpers.places import make_place, pack_objects, patch_object, remove_object
from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, pseudo, read_all, texty, write_backup
from nbdbackup.errors import ChunkCorrupt, RepoDamaged
from nbdbackup.repo import packs as P
from nbdbackup.repo.chunks import ZERO_REF, prepare
from nbdbackup.repo.schema import chunks


def _nchunks(repo):
    with repo.index_db.connect() as c:
        return c.execute(select(func.count()).select_from(chunks)).scalar()


def test_same_bytes_in_two_disks_stored_once(repo):
    data = pseudo(1, 8 * CS)
    a = write_backup(repo, "vda", data)
    n1 = _nchunks(repo)
    b = write_backup(repo, "vdb", data)
    assert _nchunks(repo) == n1 == 8
    assert a.stored_bytes > 8 * CS and b.stored_bytes < CS   # second stores only its map/manifest
    assert read_all(repo, b.id) == data


def test_repeated_chunk_within_a_disk_stored_once(repo):
    data = pseudo(2, CS) * 6 + pseudo(3, CS)
    write_backup(repo, "vda", data)
    assert _nchunks(repo) == 2


def test_zero_chunks_get_no_row_and_read_back(repo):
    data = bytes(3 * CS) + pseudo(4, CS) + bytes(CS)
    info = write_backup(repo, "vda", data)
    assert _nchunks(repo) == 1
    with repo.open_image(info) as img:
        assert [img.is_zero(i) for i in range(5)] == [True, True, True, False, True]
        assert list(img.extents()) == [(0, 3 * CS, True), (3 * CS, CS, False), (4 * CS, CS, True)]
        assert img.read(0, len(data)) == data


def test_prepare_skips_compression_when_it_does_not_pay():
    rnd = prepare(pseudo(5, CS), -3)
    assert rnd.compression == P.COMP_NONE and rnd.payload == pseudo(5, CS)
    txt = prepare(texty(1, CS), -3)
    assert txt.compression == P.COMP_ZSTD and len(txt.payload) < CS // 2
    z = prepare(bytes(CS), -3)
    assert z.is_zero and z.hash == ZERO_REF and z.payload == b""


def test_compressed_data_reads_back(repo):
    data = texty(7, 10 * CS + 123)
    info = write_backup(repo, "vda", data)
    assert info.stored_bytes < len(data) // 2
    assert read_all(repo, info.id) == data


@pytest.fixture(params=["local", "s3+pg"])
def repo(request, tmp_path):
    """This module's repositories: locally and on S3 with the index on PostgreSQL."""
    place = make_place(request, request.param, tmp_path)
    with new_repo(place.spec, **place.init_options()) as r:
        yield r


def _flip_byte_in_chunk_payload(repo, data_chunk_hash):
    loc = repo.store.chunk_locations([data_chunk_hash])[data_chunk_hash]
    patch_object(repo.path, P.pack_object_name(loc.pack), loc.offset + 10, xor=1)


@pytest.mark.parametrize("content", ["random", "text"])
def test_damaged_pack_raises_chunk_corrupt_with_range(repo, content):
    data = (pseudo if content == "random" else texty)(8, 4 * CS)
    info = write_backup(repo, "vda", data)
    h = prepare(data[2 * CS:3 * CS], repo.compression_level).hash
    _flip_byte_in_chunk_payload(repo, h)
    repo.close()
    repo = type(repo).open(repo.path)
    with repo.open_image(info.id) as img:
        assert img.read_chunk(1) == data[CS:2 * CS]         # others still fine
        with pytest.raises(ChunkCorrupt) as ei:
            img.read_chunk(2)
        assert (ei.value.offset, ei.value.length) == (2 * CS, CS)
        assert isinstance(ei.value, RepoDamaged)
        with pytest.raises(ChunkCorrupt):
            img.read(0, len(data))


def test_missing_pack_raises_chunk_corrupt(repo):
    data = pseudo(9, 3 * CS)
    info = write_backup(repo, "vda", data)
    h = prepare(data[:CS], repo.compression_level).hash
    loc = repo.store.chunk_locations([h])[h]
    repo.close()
    remove_object(repo.path, P.pack_object_name(loc.pack))
    repo = type(repo).open(repo.path)
    with repo.open_image(info.id) as img, pytest.raises(RepoDamaged):
        img.read_chunk(0)


def test_packs_are_self_describing(repo):
    data = pseudo(10, 5 * CS)
    write_backup(repo, "vda", data)
    types = []
    for f in pack_objects(repo.path):
        name = f.rsplit("/", 1)[-1][:-5]
        types += [r.type for r in P.read_records(repo.backend, name)]
    assert types.count(P.REC_CHUNK) == 5
    assert types.count(P.REC_SEGMENT) == 1
    assert types.count(P.REC_MANIFEST) == 1


def test_index_table_lost_under_an_open_image_is_repo_damaged(repo):
    data = pseudo(11, 3 * CS)
    info = write_backup(repo, "vda", data)
    with repo.open_image(info.id) as img:
        with repo.index_db.begin() as c:
            c.exec_driver_sql("DROP TABLE chunks")
        with pytest.raises(RepoDamaged, match="index"):
            img.read_chunk(0)
    with pytest.raises(RepoDamaged):
        repo.stats()
