"""Pack format: self-describing records, footer, salvage scan, damage detection."""

import pytest

from nbdbackup.repo import packs as P
from nbdbackup.repo.chunks import hash_bytes
from nbdbackup.repo.memory_backend import MemoryBackend


def _pack(records):
    b = P.PackBuilder()
    infos = [b.add(t, hash_bytes(d), len(d), P.COMP_NONE, d) for t, d in records]
    b.seal()
    data = b.data()
    b.release()
    return b, infos, data


def test_footer_lists_every_record():
    recs = [(P.REC_CHUNK, b"a" * 100), (P.REC_SEGMENT, b"b" * 64), (P.REC_MANIFEST, b"{}")]
    b, infos, data = _pack(recs)
    be = MemoryBackend()
    be.put(P.pack_object_name(b.name), [data])
    got = P.read_records(be, b.name)
    assert got == infos
    for info, (t, d) in zip(got, recs):
        assert data[info.offset:info.offset + info.stored_len] == d
        assert info.type == t and info.hash == hash_bytes(d)


def test_scan_records_matches_footer():
    recs = [(P.REC_CHUNK, bytes([i]) * (i + 1)) for i in range(10)]
    _b, infos, data = _pack(recs)
    assert list(P.scan_records(data)) == infos


def test_damaged_footer_is_detected():
    b, _infos, data = _pack([(P.REC_CHUNK, b"x" * 50)])
    bad = bytearray(data)
    bad[-P.TRAILER_SIZE - 10] ^= 0xFF        # inside the footer table
    be = MemoryBackend()
    be.put(P.pack_object_name(b.name), [bytes(bad)])
    with pytest.raises(P.PackFormatError, match="checksum"):
        P.read_records(be, b.name)
    assert len(list(P.scan_records(bytes(bad)))) == 1    # salvage still works


def test_truncated_pack_is_detected():
    b, _infos, data = _pack([(P.REC_CHUNK, b"x" * 50)])
    be = MemoryBackend()
    be.put(P.pack_object_name(b.name), [data[:-5]])
    with pytest.raises(P.PackFormatError):
        P.read_records(be, b.name)


def test_pack_object_name():
    assert P.pack_object_name("abcdef") == "packs/ab/abcdef.pack"
    assert len(P.new_pack_name()) == 32


def test_pack_builder_grows_past_its_buffer_and_reuses_buffers():
    pool = P.BufferPool(64 * 1024, keep=2)
    b = P.PackBuilder(pool=pool)
    big = bytes(range(256)) * 1024                  # 256 KiB: more than the pooled buffer holds
    small = b"s" * 1000
    i1 = b.add(P.REC_CHUNK, hash_bytes(small), len(small), P.COMP_NONE, small)
    i2 = b.add(P.REC_CHUNK, hash_bytes(big), len(big), P.COMP_NONE, memoryview(big))
    buf, size = b.seal()
    data = bytes(buf[:size])
    b.release()
    assert data[i1.offset:i1.offset + len(small)] == small
    assert data[i2.offset:i2.offset + len(big)] == big
    assert list(P.scan_records(data)) == [i1, i2]
    # the one-off bigger buffer is not pooled; a pooled one comes back
    b2 = P.PackBuilder(pool=pool)
    b2.release()
    again = pool.get()
    assert len(again) == pool.capacity
    pool.put(again)
    pool.close()
