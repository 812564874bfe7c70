"""Ranged reads in runs (ObjectStore.read_records, BackupImage.read_chunks, restore), and readers
that survive a repack: a reader holding locations of a pack gc rewrote looks them up again."""

from __future__ import annotations

import contextlib
import os
import random
import threading

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import disk_data, pack_files, pseudo, texty, write_backup
from nbdbackup.engine.restore import BATCH_BYTES, restore
from nbdbackup.errors import ChunkCorrupt, LockedError
from nbdbackup.repo import Repository
from nbdbackup.repo import gc as gc_mod
from nbdbackup.repo import packs as P
from nbdbackup.repo.backends import LocalBackend
from nbdbackup.repo.chunks import prepare
from nbdbackup.repo.store import HEADER_SIZE, RUN_GAP, Location, RecordError, runs


class CountedGets:
    """Any backend, counting get() calls on pack objects."""

    def __init__(self, inner):
        self.inner = inner
        self.gets = 0
        self._n_lock = threading.Lock()
        if hasattr(inner, "get_ranges"):
            self.get_ranges = self._get_ranges

    def get(self, name, offset=0, length=None):
        if name.startswith("packs/"):
            with self._n_lock:
                self.gets += 1
        return self.inner.get(name, offset, length)

    def _get_ranges(self, name, ranges):
        """The local backend's many ranges in one call: one get of a run, as a ranged get is."""
        if name.startswith("packs/"):
            with self._n_lock:
                self.gets += 1
        return self.inner.get_ranges(name, ranges)

    def get_into(self, name, offset, buffers):
        """A get of a run into the reader's buffers (what restore uses): one get, as a ranged get is."""
        if name.startswith("packs/"):
            with self._n_lock:
                self.gets += 1
        return self.inner.get_into(name, offset, buffers)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _reopen(repo) -> tuple[Repository, CountedGets]:
    repo.close()
    be = CountedGets(LocalBackend(repo.path, os.path.join(repo.path, "tmp")))
    return Repository.open(repo.path, backend=be), be


def _distinct(n: int) -> bytes:
    """n chunks, no two alike, none zero: half incompressible, half text."""
    return b"".join(pseudo(1000 + i, CS) if i % 2 else texty(i, CS) for i in range(n))


def _hashes(repo, data: bytes, n: int) -> list[bytes]:
    """The ids of the first *n* chunks of *data* in *repo*."""
    return [prepare(data[i * CS:(i + 1) * CS], repo.compression_level).hash for i in range(n)]


def _saved(repo, n: int):
    """*n* distinct chunks backed up as vda, the repository reopened on a counting backend:
    (repository, backend, data, chunk ids)."""
    data = _distinct(n)
    write_backup(repo, "vda", data)
    hs = _hashes(repo, data, n)
    return (*_reopen(repo), data, hs)


def _flip(repo, loc: Location, at: int, mask: int) -> None:
    """Damage record *loc* in its pack: the byte *at* into its payload xor *mask*."""
    with open(os.path.join(repo.path, P.pack_object_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset + at)
        byte = f.read(1)
        f.seek(loc.offset + at)
        f.write(bytes([byte[0] ^ mask]))


# -- grouping -----------------------------------------------------------------------

def _loc(offset: int, stored: int) -> Location:
    return Location("p" * 32, offset, stored, stored, P.COMP_NONE)


def test_runs_group_neighbours_split_on_gaps_and_length():
    h = HEADER_SIZE
    a = _loc(8 + h, 1000)
    b = _loc(a.offset + 1000 + h, 500)                    # right after a
    c = _loc(b.offset + 500 + RUN_GAP + h, 10)            # RUN_GAP dead bytes after b: same run
    d = _loc(c.offset + 10 + RUN_GAP + 1 + h, 10)         # one more: a new run
    assert runs([d, b, a, c]) == [[2, 1, 3], [0]]         # positions, in pack order
    assert runs([a, a, b]) == [[0, 1, 2]]                 # the same record twice: one run
    assert runs([a, b, c], limit=1000 + h) == [[0], [1], [2]]
    big = _loc(8 + h, 10 << 20)                           # longer than a run: alone
    assert runs([big, _loc(big.offset + big.stored_len + h, 5)]) == [[0], [1]]


def test_read_records_one_get_per_run_and_damage_stays_per_record(repo):
    repo, be, data, hs = _saved(repo, 12)
    try:
        locs = repo.store.chunk_locations(hs)
        assert len({locs[h].pack for h in hs}) == 1
        bad = locs[hs[5]]
        _flip(repo, bad, 7, 0x40)
        items = [(locs[h], h) for h in reversed(hs)] + [(locs[hs[0]], hs[0])]
        be.gets = 0
        got = repo.store.read_records(items, P.REC_CHUNK)
        assert be.gets == 1
        for (loc, h), r in zip(items, got):
            if h == hs[5]:
                assert isinstance(r, RecordError) and "hash mismatch" in str(r)
            else:
                assert r == data[hs.index(h) * CS:(hs.index(h) + 1) * CS]
        # the same check read_record does, one record at a time
        with pytest.raises(RecordError, match="hash mismatch"):
            repo.store.read_record(bad, hs[5], P.REC_CHUNK)
        with pytest.raises(RecordError, match="does not match the index"):
            repo.store.read_record(locs[hs[4]], hs[4], P.REC_SEGMENT)
        with repo.open_image(repo.list_backups()[0]) as img:
            out = img.try_chunks(list(range(12)))
            assert [isinstance(r, ChunkCorrupt) for r in out] == [i == 5 for i in range(12)]
            assert (out[5].offset, out[5].length) == (5 * CS, CS)
            with pytest.raises(ChunkCorrupt) as ei:
                img.read(0, len(data))
            assert ei.value.offset == 5 * CS
    finally:
        repo.close()


def test_local_runs_read_each_header_and_payload_alone_and_skip_dead_bytes(repo):
    repo, be, data, hs = _saved(repo, 6)
    asked = []
    inner = be.get_ranges
    be.get_ranges = lambda name, ranges: asked.append(list(ranges)) or inner(name, ranges)
    try:
        locs = repo.store.chunk_locations(hs)
        pick = [hs[1], hs[3], hs[4]]          # a gap of one small text chunk between 1 and 3
        assert locs[hs[3]].offset - locs[hs[1]].offset - locs[hs[1]].stored_len <= RUN_GAP
        be.gets = 0
        got = repo.store.read_records([(locs[h], h) for h in pick], P.REC_CHUNK)
        assert got == [data[i * CS:(i + 1) * CS] for i in (1, 3, 4)]
        assert be.gets == 1 and len(asked) == 1           # one run, one call
        assert asked[0] == [r for h in pick for r in ((locs[h].offset - HEADER_SIZE, HEADER_SIZE),
                                                       (locs[h].offset, locs[h].stored_len))]
        raw = [r for h, r in zip(pick, got) if locs[h].compression == P.COMP_NONE]
        assert raw and all(type(r) is bytes for r in raw)
    finally:
        repo.close()


class LendsBuffers(CountedGets):
    """A backend that lends a buffer per run, as S3Backend.reading() does."""

    def __init__(self, inner):
        super().__init__(inner)
        self.lent = 0

    @contextlib.contextmanager
    def reading(self, name, offset, length):
        self.lent += 1
        yield bytearray(self.inner.get(name, offset, length))


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_read_records_into_buffers_raw_straight_in_and_damage_per_record(tmp_path, sealed):
    from helpers.repo import new_repo
    from nbdbackup.repo.crypto import MasterKey

    repo = new_repo(tmp_path / "repo", master_key=MasterKey.generate() if sealed else None)
    data = _distinct(8)
    write_backup(repo, "vda", data)
    with repo.open_image(repo.list_backups()[0]) as img:
        img.chunk_ref(0)
        hs = [img.chunk_ref(i) for i in range(8)]
    repo, be = _reopen(repo) if not sealed else (repo, None)
    try:
        store = repo.store
        locs = store.chunk_locations(hs)
        raw = {h for h in hs if locs[h].compression == P.COMP_NONE}
        assert raw and len(raw) < 8                       # both kinds in the run
        bad = locs[hs[3]]
        _flip(repo, bad, 11, 0x10)
        seen = []
        inner = store.backend.get_into
        store.backend.get_into = lambda name, off, bufs: seen.append(list(bufs)) or inner(name, off, bufs)
        # every record, the first one twice, the last one into no buffer (bytes of its own)
        items = [(locs[h], h) for h in hs] + [(locs[hs[0]], hs[0])]
        dests = [memoryview(bytearray(CS)) for _ in items[:-2]] + [None, memoryview(bytearray(CS))]
        got = store.read_records(items, P.REC_CHUNK, dests)
        assert len(seen) == 1                               # one run, one get
        for k, ((loc, h), r) in enumerate(zip(items, got)):
            want = data[hs.index(h) * CS:(hs.index(h) + 1) * CS]
            if h == hs[3]:
                assert isinstance(r, RecordError), r
                assert ("authentication failed" if sealed else "hash mismatch") in str(r)
            elif dests[k] is None:
                assert type(r) is bytes and r == want
            else:
                assert r is dests[k] and bytes(r) == want
        # a raw plaintext payload is read into its dest itself; compressed or sealed ones are not
        straight = [d for d in dests if d is not None and any(b is d for b in seen[0])]
        assert len(straight) == (0 if sealed else len(raw - {hs[-1]}))
        # the image reads into one buffer the same way, a damaged chunk's place named
        with repo.open_image(repo.list_backups()[0]) as img:
            whole = memoryview(bytearray(8 * CS))
            out = img.try_chunks(list(range(8)), whole)
            assert [isinstance(r, ChunkCorrupt) for r in out] == [i == 3 for i in range(8)]
            assert bytes(whole[:3 * CS]) == data[:3 * CS] and bytes(whole[4 * CS:]) == data[4 * CS:]
    finally:
        repo.close()


def test_read_records_into_buffers_from_a_lent_run_buffer(repo):
    data = _distinct(8)
    write_backup(repo, "vda", data)
    hs = _hashes(repo, data, 8)
    repo.close()
    be = LendsBuffers(LocalBackend(repo.path, os.path.join(repo.path, "tmp")))
    repo = Repository.open(repo.path, backend=be)
    try:
        locs = repo.store.chunk_locations(hs)
        bad = locs[hs[6]]
        _flip(repo, bad, 3, 1)
        items = [(locs[h], h) for h in hs] + [(locs[hs[2]], hs[2])]
        dests = [memoryview(bytearray(CS)) for _ in items]
        got = repo.store.read_records(items, P.REC_CHUNK, dests)
        assert be.lent == 1                     # one run, one lent buffer, decoded from there
        for k, ((loc, h), r) in enumerate(zip(items, got)):
            if h == hs[6]:          # a text chunk: zstd refuses its frame, or blake3 its bytes
                assert isinstance(r, RecordError) and f"at {bad.offset}: " in str(r)
            else:
                assert r is dests[k] and bytes(r) == data[hs.index(h) * CS:(hs.index(h) + 1) * CS]
    finally:
        repo.close()


def test_read_into_a_truncated_pack_is_damage_for_the_records_past_its_end(repo):
    repo, be, data, hs = _saved(repo, 6)
    try:
        locs = repo.store.chunk_locations(hs)
        cut = locs[hs[4]]
        os.truncate(os.path.join(repo.path, P.pack_object_name(cut.pack)), cut.offset + 10)
        be.close()
        dests = [memoryview(bytearray(CS)) for _ in hs]
        got = repo.store.read_records([(locs[h], h) for h in hs], P.REC_CHUNK, dests)
        assert [bytes(r) for r in got[:4]] == [data[i * CS:(i + 1) * CS] for i in range(4)]
        assert all(isinstance(r, RecordError) and "truncated" in str(r) for r in got[4:])
    finally:
        repo.close()


def test_missing_pack_of_a_run_is_damage_for_its_records_only(repo):
    a = write_backup(repo, "vda", _distinct(4))
    b_data = pseudo(77, 3 * CS)
    b = write_backup(repo, "vdb", b_data)
    h = prepare(b_data[:CS], repo.compression_level).hash
    b_pack = repo.store.chunk_locations([h])[h].pack
    repo, be = _reopen(repo)
    try:
        with repo.open_image(a) as ia, repo.open_image(b) as ib:
            before = ia.try_chunks(list(range(4)))
            ib.chunk_ref(0)                   # its map is loaded (from the pack about to go)
            os.unlink(os.path.join(repo.path, P.pack_object_name(b_pack)))
            be.close()                        # and no file of it stays open
            assert ia.try_chunks(list(range(4))) == before == [_distinct(4)[i * CS:(i + 1) * CS] for i in range(4)]
            out = ib.try_chunks([0, 1, 2])
            assert all(isinstance(r, ChunkCorrupt) and "missing" in str(r) for r in out)
            assert [(r.offset, r.length) for r in out] == [(0, CS), (CS, CS), (2 * CS, CS)]
            assert ib.relocated == 1          # asked the index again, once: the pack is really gone
    finally:
        repo.close()


# -- restore issues far fewer gets than chunks ----------------------------------------

def test_restore_of_neighbouring_chunks_issues_few_gets(repo, tmp_path):
    n = 96
    data = bytearray(_distinct(n))
    data[40 * CS:44 * CS] = bytes(4 * CS)                 # a hole: not read, not written
    info = write_backup(repo, "vda", bytes(data), zero_holes=True)
    repo, be = _reopen(repo)
    try:
        out = tmp_path / "out.raw"
        res = restore(repo, info.id, str(out))
        assert out.read_bytes() == data
        assert res.data_bytes == (n - 4) * CS and res.zero_bytes == 4 * CS
        # 92 data chunks (6 MiB) in a pack or two: a few runs, plus the map segment and manifest
        assert be.gets <= 8, be.gets
        assert be.gets < n // 10
    finally:
        repo.close()


def test_restore_of_a_damaged_chunk_fails_with_its_range(repo, tmp_path):
    data = _distinct(20)
    info = write_backup(repo, "vda", data)
    h = prepare(data[13 * CS:14 * CS], repo.compression_level).hash
    loc = repo.store.chunk_locations([h])[h]
    with open(os.path.join(repo.path, P.pack_object_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset)
        f.write(b"\xff\x00\xff")
    out = tmp_path / "out.raw"
    with pytest.raises(ChunkCorrupt) as ei:
        restore(repo, info.id, str(out))
    assert (ei.value.offset, ei.value.length) == (13 * CS, CS)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".nbdbackup-restore")]


# -- a repack beside an open image -----------------------------------------------------

def _repack_everything(path, backend=None) -> gc_mod.GcReport:
    """gc on a second Repository object, beside the open images, with a threshold that makes every
    pack holding live data 'sparse': every live record moves to a new pack, every old pack goes."""
    with Repository.open(path, backend=backend) as other:
        try:
            return gc_mod.collect(other, repack_threshold=2.0)      # gc that runs beside readers
        except LockedError:
            # a gc that still needs every reader gone: run its body without the locks, as gc
            # beside readers will
            rep = gc_mod.GcReport()
            gc_mod._collect(other, rep, 2.0, None)
            return rep


@pytest.mark.parametrize("keep_open_files", [False, True])
def test_reader_survives_a_repack_of_every_pack(repo, keep_open_files):
    rng = random.Random(5)
    base = disk_data(rng, 40)
    full = write_backup(repo, "vda", base, zero_holes=True)
    inc_data = disk_data(rng, 40, base=base, change=0.3)
    changed = [i for i in range(40) if inc_data[i * CS:(i + 1) * CS] != base[i * CS:(i + 1) * CS]]
    inc = write_backup(repo, "vda", inc_data, parent=full, changed=changed, zero_holes=True)
    other = write_backup(repo, "vdb", _distinct(10))
    repo, be = _reopen(repo)
    try:
        img_full, img_inc = repo.open_image(full), repo.open_image(inc)
        try:
            assert img_full.read(0, 5 * CS) == base[:5 * CS]          # some read before the repack
            for img in (img_full, img_inc):                             # every map segment loaded
                [img.chunk_ref(i) for i in range(0, img.nchunks, 1)]
            old = set(pack_files(repo))
            rep = _repack_everything(repo.path)
            assert rep.packs_repacked == len(old) and not rep.skipped_damaged
            assert not old & set(pack_files(repo))                     # every old pack is gone
            if not keep_open_files:
                be.close()     # object storage keeps nothing open: the reader's next get finds no pack
            assert img_full.read(0, len(base)) == base
            assert img_inc.read(0, len(inc_data)) == inc_data
            for i in range(40):
                assert img_inc.read_chunk(i) == inc_data[i * CS:(i + 1) * CS]
            if not keep_open_files:
                assert img_full.relocated >= 1 and img_inc.relocated >= 1
        finally:
            img_full.close()
            img_inc.close()
        with repo.open_image(other) as img:
            assert img.read(0, 10 * CS) == _distinct(10)
    finally:
        repo.close()


def test_stale_segment_location_is_looked_up_again(repo):
    info = write_backup(repo, "vda", _distinct(6))
    seg = repo.segment_refs(info.id)[0]
    stale = repo.store.segment_locations([seg])[seg]
    raw = repo.store.load_segment(seg, stale)
    path = repo.path
    repo.close()
    _repack_everything(path)
    with Repository.open(path) as r:
        assert r.store.segment_locations([seg])[seg].pack != stale.pack
        assert r.store.load_segment(seg, stale) == raw


# -- serve: a multi-chunk read is one batch; a sequential reader reads ahead ------------------

def _view_of(repo, info, cache_bytes=64 << 20):
    from concurrent.futures import ThreadPoolExecutor

    from nbdbackup.engine.exports import ChunkCache, RepoBackend
    from nbdbackup.nbd.server_view import ExportView

    pool = ThreadPoolExecutor(4)
    backend = RepoBackend(repo.open_image(info), info.id, ChunkCache(cache_bytes))
    return ExportView(backend, pool), pool


def _served(view, reads) -> bytes:
    import asyncio

    async def go():
        out = []
        for off, n in reads:
            pieces = view.read_cached(off, n) or await view.read(off, n)
            out.append(b"".join(bytes(p[1]) if p[2] is None else bytes(p[2]) for p in pieces))
        return b"".join(out)
    return asyncio.run(go())


def test_serve_reads_a_multi_chunk_request_in_one_batch_and_reads_ahead(repo):
    n = 64
    data = _distinct(n)
    info = write_backup(repo, "vda", data)
    repo, be = _reopen(repo)
    try:
        view, pool = _view_of(repo, info)
        try:
            be.gets = 0
            assert _served(view, [(3 * CS + 100, 10 * CS)]) == data[3 * CS + 100:13 * CS + 100]
            assert be.gets == 1                          # 11 chunks, one run, no stream yet
            be.gets = 0
            step = 16 * 1024                             # a sequential reader of small requests
            got = _served(view, [(off, step) for off in range(20 * CS, n * CS, step)])
            assert got == data[20 * CS:]
            assert be.gets <= 6, be.gets                 # 44 chunks: read ahead, 16 per batch
        finally:
            view.backend.close()
            pool.shutdown()
    finally:
        repo.close()


def test_a_steady_sequential_reader_meets_no_misses_after_the_first_two(repo, monkeypatch):
    from nbdbackup.nbd import server_view
    monkeypatch.setattr(server_view, "READ_AHEAD", 8 * CS)     # a window of 8 chunks, 40 to read
    n = 48
    data = _distinct(n)
    info = write_backup(repo, "vda", data)
    repo, _be = _reopen(repo)
    try:
        view, pool = _view_of(repo, info)
        try:
            import asyncio

            async def go():
                out = []
                for off in range(8 * CS, n * CS, CS // 2):
                    pieces = view.read_cached(off, CS // 2)
                    if pieces is None:
                        pieces = await view.read(off, CS // 2)
                    else:
                        await asyncio.sleep(0.002)      # the client's turn: read-ahead runs meanwhile
                    out.append(b"".join(bytes(p[2]) for p in pieces))
                return b"".join(out)
            assert asyncio.run(go()) == data[8 * CS:]
            # chunk 8 (no stream yet) and 9 (the stream found): then each window starts the next
            assert view.misses == 2, view.misses
        finally:
            view.backend.close()
            pool.shutdown()
    finally:
        repo.close()


def test_serve_random_reads_do_not_read_ahead_and_damage_ahead_is_not_an_error(repo):
    n = 48
    data = _distinct(n)
    info = write_backup(repo, "vda", data)
    h = prepare(data[30 * CS:31 * CS], repo.compression_level).hash
    loc = repo.store.chunk_locations([h])[h]
    with open(os.path.join(repo.path, P.pack_object_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset + 3)
        f.write(b"\x00\xff")
    repo, be = _reopen(repo)
    try:
        view, pool = _view_of(repo, info)
        try:
            order = [7, 40, 2, 19, 33, 11]
            be.gets = 0
            assert _served(view, [(i * CS, 4096) for i in order]) == \
                b"".join(data[i * CS:i * CS + 4096] for i in order)
            assert be.gets == len(order)          # one chunk each: nothing read ahead
            # a stream running into the damaged chunk 30: read ahead of 27, no error until asked for
            assert _served(view, [(26 * CS, CS), (27 * CS, CS), (28 * CS, CS)]) == data[26 * CS:29 * CS]
            import asyncio

            from nbdbackup.nbd.server_view import ChunkReadError
            with pytest.raises(ChunkReadError, match="chunk 30"):
                asyncio.run(view.read(30 * CS, 10))
            assert _served(view, [(31 * CS, 2 * CS)]) == data[31 * CS:33 * CS]
        finally:
            view.backend.close()
            pool.shutdown()
    finally:
        repo.close()


@pytest.mark.parametrize("batch_bytes", [None, 32 * CS])
def test_restore_batches_are_as_large_as_the_backend_asks(repo, tmp_path, batch_bytes):
    # S3Backend asks for 8 MiB batches (fewer GETs); a backend that says nothing gets 4 MiB ones
    n = 256
    data = _distinct(n)
    info = write_backup(repo, "vda", data)
    repo, be = _reopen(repo)
    if batch_bytes:
        be.read_batch_bytes = batch_bytes
    try:
        out = tmp_path / "out.raw"
        restore(repo, info.id, str(out))
        assert out.read_bytes() == data
        batches = -(-n * CS // (batch_bytes or BATCH_BYTES))
        assert batches <= be.gets <= batches + 4, (be.gets, batches)   # a run per batch (+ packs' ends)
    finally:
        repo.close()


# -- on a real S3 server (radosgw): ranged GETs in runs, and a repack under an open image ----------


def test_s3_restore_reads_runs_and_a_reader_survives_a_repack(ceph_s3, s3_bucket, tmp_path):
    be = CountedGets(ceph_s3.backend(s3_bucket))
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CS, backend=be)
    try:
        n = 80
        data = _distinct(n)
        info = write_backup(repo, "vda", data)
        be.gets = 0
        out = tmp_path / "out.raw"
        restore(repo, info.id, str(out))
        assert out.read_bytes() == data
        assert be.gets <= 6, be.gets                  # 80 chunks: a few ranged GETs, not 80
        with repo.open_image(info) as img:
            img.chunk_ref(0)                           # the map (and the chunks' locations) loaded
            rep = _repack_everything(repo.path, ceph_s3.backend(s3_bucket))
            assert rep.packs_repacked >= 1 and not rep.skipped_damaged
            be.gets = 0
            assert img.read(0, len(data)) == data      # the old packs are gone from the bucket
            assert img.relocated == 1 and be.gets <= 6
    finally:
        repo.close()
