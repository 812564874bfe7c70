"""BackupImage: checked random-access reads of one backup.

Its segment list comes from backuprows.checked_segment_refs (index rows
checked against the backup's manifest); it gets a RepoContext, not the
Repository. Thread-safe: the segment list is
loaded up front; map segments (with the
pack locations of their chunks, one batched query per segment) are loaded
on demand into a small LRU cache under a lock; chunk data is read with
pread-style backend reads and verified (blake3) before it is returned.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Iterator

from ..errors import ChunkCorrupt, RepoDamaged
from . import maps
from .chunks import HASH_SIZE, ZERO_REF, zeros
from .info import BackupInfo
from .packs import REC_CHUNK
from .store import Location, RecordError

if TYPE_CHECKING:
    from .context import RepoContext
    from .locks import RepoLock

SEGMENT_CACHE = 64   # decoded segments + chunk locations per image (~200 KB each); a miss costs ~5 ms


class BackupImage:
    def __init__(self, ctx: "RepoContext", info: BackupInfo, refs: list[bytes | None], reader_lock: "RepoLock"):
        self.info = info
        self.size = info.size
        self.chunk_size = info.chunk_size
        self.nchunks = info.nchunks
        self._refs = refs
        self._seg_len = ctx.config.segment_len
        self._store = ctx.store
        self._cache: OrderedDict[int, tuple[bytes, dict[bytes, Location]]] = OrderedDict()
        self._lock = threading.Lock()
        self._reader_lock = reader_lock
        if len(refs) != maps.nsegments(self.nchunks, self._seg_len):
            reader_lock.release()
            raise RepoDamaged(f"backup {info.id}: map has {len(refs)} segments, expected "
                              f"{maps.nsegments(self.nchunks, self._seg_len)}",
                              hint="run `nbdbackup verify`")

    # -- map ------------------------------------------------------------------
    def _segment(self, seq: int) -> tuple[bytes, dict[bytes, Location]] | None:
        ref = self._refs[seq]
        if ref is None:
            return None
        with self._lock:
            hit = self._cache.get(seq)
            if hit is not None:
                self._cache.move_to_end(seq)
                return hit
        raw = self._store.load_segment(ref)
        _, n = maps.segment_span(seq, self._seg_len, self.nchunks)
        if len(raw) != n * HASH_SIZE:
            raise RepoDamaged(f"backup {self.info.id}: map segment {seq} has the wrong length",
                              hint="run `nbdbackup verify`")
        wanted = {e for e in maps.iter_entries(raw) if e != ZERO_REF}
        locs = self._store.chunk_locations(wanted)
        hit = (raw, locs)
        with self._lock:
            self._cache[seq] = hit
            while len(self._cache) > SEGMENT_CACHE:
                self._cache.popitem(last=False)
        return hit

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.nchunks:
            raise IndexError(f"chunk index {index} out of range 0..{self.nchunks - 1}")

    def chunk_ref(self, index: int) -> bytes:
        """The map entry of chunk *index*: its blake3 hash, or ZERO_REF."""
        self._check_index(index)
        seq, i = divmod(index, self._seg_len)
        seg = self._segment(seq)
        return ZERO_REF if seg is None else maps.entry(seg[0], i)

    def is_zero(self, index: int) -> bool:
        return self.chunk_ref(index) == ZERO_REF

    # -- data -----------------------------------------------------------------
    def read_chunk(self, index: int) -> bytes:
        """Chunk *index*, decompressed and verified; zeros for a zero chunk."""
        self._check_index(index)
        n = maps.chunk_len(index, self.size, self.chunk_size)
        seq, i = divmod(index, self._seg_len)
        seg = self._segment(seq)
        if seg is None:
            return zeros(n)
        ref = maps.entry(seg[0], i)
        if ref == ZERO_REF:
            return zeros(n)
        off = index * self.chunk_size
        loc = seg[1].get(ref)
        if loc is None:
            raise ChunkCorrupt(f"backup {self.info.id}: chunk {ref.hex()[:16]} at disk offset {off} "
                               f"(length {n}) is missing from the index", offset=off, length=n,
                               hint="run `nbdbackup verify`")
        try:
            data = self._store.read_record(loc, ref, REC_CHUNK)
        except RecordError as e:
            raise ChunkCorrupt(f"backup {self.info.id}: data at disk offset {off} (length {n}) is damaged: {e}",
                               offset=off, length=n, hint="run `nbdbackup verify`") from None
        if len(data) != n:
            raise ChunkCorrupt(f"backup {self.info.id}: chunk at disk offset {off} has {len(data)} bytes, "
                               f"expected {n}", offset=off, length=n)
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the disk, from verified chunks."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside the disk (size {self.size})")
        cs = self.chunk_size
        out = []
        pos, end = offset, offset + length
        while pos < end:
            idx = pos // cs
            base = idx * cs
            take = min(end, base + cs) - pos
            data = self.read_chunk(idx)
            out.append(data[pos - base:pos - base + take] if take != len(data) else data)
            pos += take
        return b"".join(out)

    def extents(self) -> Iterator[tuple[int, int, bool]]:
        """Merged (offset, length, is_zero) runs covering the disk."""
        cs, L = self.chunk_size, self._seg_len
        run_start, run_zero = 0, None
        for seq in range(len(self._refs)):
            start, n = maps.segment_span(seq, L, self.nchunks)
            seg = self._segment(seq)
            if seg is None:          # all-zero segment: one piece, nothing loaded
                pieces = [(start, True)]
            else:
                pieces = [(start + i, e == ZERO_REF) for i, e in enumerate(maps.iter_entries(seg[0]))]
            for pos, z in pieces:
                if z != run_zero:
                    if run_zero is not None:
                        yield run_start, pos * cs - run_start, run_zero
                    run_start, run_zero = pos * cs, z
        if run_zero is not None:
            yield run_start, self.size - run_start, run_zero

    def close(self) -> None:
        self._reader_lock.release()
        with self._lock:
            self._cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
