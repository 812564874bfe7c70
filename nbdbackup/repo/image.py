"""BackupImage: checked random-access reads of one backup.

Its segment list comes from backuprows.checked_segment_refs (index rows
checked against the backup's manifest); it gets a RepoContext, not the
Repository. Thread-safe: the segment list is
loaded up front; map segments (with the
pack locations of their chunks, one batched query per segment) are loaded
on demand into a small LRU cache under a lock; chunk data is read with
ranged backend reads and verified (the codec: opened, decompressed, its id
checked) before it is returned.

read_chunks() reads many chunks at once: records neighbouring in a pack come
in one ranged get (ObjectStore.read_records). gc may run beside a reader and
move live records to a new pack (deleting the old one): a read that finds
its pack missing, or a record not where the cached location said, drops the
cached locations of that map segment, asks the index again and retries once
where the record now is; only then is the chunk reported damaged.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterator

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
READ_BATCH = 32      # chunks per read_chunks() call in read(): 8 MiB of 256 KiB chunks


def _zero_fill(place: memoryview) -> memoryview:
    place[:] = zeros(len(place))
    return place


def _copy_into(data, place: memoryview):
    """*data* (a chunk read for another position, or as bytes) put in its *place*; a chunk of
    the wrong length stays as it is, for the length check to refuse."""
    if len(data) != len(place):
        return data
    place[:] = data
    return place


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
        self.relocated = 0      # map segments whose chunk locations were asked again (gc moved them)
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

    def _relocate(self, seq: int, stale: dict[bytes, Location]) -> dict[bytes, Location]:
        """The chunk locations of map segment *seq* asked from the index again (the cached
        ones, *stale*, failed: a repack may have moved the records); replaces the cached ones."""
        with self._lock:
            hit = self._cache.pop(seq, None)
            if hit is not None and hit[1] is not stale:      # another thread refreshed them meanwhile
                self._cache[seq] = hit
                return hit[1]
            self.relocated += 1
        return self._segment(seq)[1]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.nchunks:
            raise IndexError(f"chunk index {index} out of range 0..{self.nchunks - 1}")

    def chunk_ref(self, index: int) -> bytes:
        """The map entry of chunk *index*: its id, or ZERO_REF."""
        self._check_index(index)
        seq, i = divmod(index, self._seg_len)
        seg = self._segment(seq)
        return ZERO_REF if seg is None else maps.entry(seg[0], i)

    def is_zero(self, index: int) -> bool:
        return self.chunk_ref(index) == ZERO_REF

    # -- data -----------------------------------------------------------------
    def read_chunk(self, index: int) -> bytes:
        """Chunk *index*, decompressed and verified; zeros for a zero chunk."""
        return self.read_chunks([index])[0]

    def read_chunks(self, indexes: list[int], into: memoryview | None = None) -> list[bytes | memoryview]:
        """Chunks *indexes*, each as read_chunk() returns it; raises the ChunkCorrupt of the first
        damaged one. Neighbouring records come in one ranged read. *into*: see try_chunks()."""
        out = self.try_chunks(indexes, into)
        for r in out:
            if isinstance(r, ChunkCorrupt):
                raise r
        return out      # type: ignore[return-value]

    def try_chunks(self, indexes: list[int], into: memoryview | None = None) -> list[bytes | memoryview | ChunkCorrupt]:
        """Like read_chunks(), but a damaged chunk's ChunkCorrupt takes its place in the list.
        *into*: a writable buffer the chunks are decoded into back to back (it must hold them
        all); each good chunk is then a memoryview of its place there, and a damaged one's
        place holds no data to rely on."""
        out: list = [None] * len(indexes)
        places: list = [None] * len(indexes)                # each chunk's part of *into*
        want: dict[bytes, tuple[int, list[int]]] = {}      # hash -> (segment, positions in out)
        segs: dict[int, dict[bytes, Location]] = {}
        at = 0
        for k, index in enumerate(indexes):
            self._check_index(index)
            n = maps.chunk_len(index, self.size, self.chunk_size)
            if into is not None:
                places[k], at = into[at:at + n], at + n
            seq, i = divmod(index, self._seg_len)
            seg = self._segment(seq)
            ref = ZERO_REF if seg is None else maps.entry(seg[0], i)
            if ref == ZERO_REF:
                out[k] = zeros(n) if into is None else _zero_fill(places[k])
                continue
            segs[seq] = seg[1]
            want.setdefault(ref, (seq, []))[1].append(k)
        errors: dict[bytes, str] = {}        # hash -> why it could not be read
        pending = list(want)
        for attempt in range(2):
            tried = {h: segs[want[h][0]].get(h) for h in pending}
            items = [(loc, h) for h, loc in tried.items() if loc is not None]
            for h, loc in tried.items():
                if loc is None:
                    errors[h] = "is missing from the index"
            dests = None
            if into is not None:    # a record of another length than its place: read as bytes, refused below
                dests = [places[want[h][1][0]] for _, h in items]
                dests = [d if d is not None and len(d) == loc.raw_len else None
                         for d, (loc, _) in zip(dests, items)]
            for (_loc, h), r in zip(items, self._store.read_records(items, REC_CHUNK, dests) if items else []):
                if isinstance(r, RecordError):
                    errors[h] = f"is damaged: {r}"
                else:
                    errors.pop(h, None)
                    for k in want[h][1]:
                        out[k] = r if into is None or r is places[k] else _copy_into(r, places[k])
            if attempt or not errors:
                break
            # a repack may have moved them: ask the index again, retry those it now places elsewhere
            for seq in {want[h][0] for h in errors}:
                segs[seq] = self._relocate(seq, segs[seq])
            pending = [h for h in errors if segs[want[h][0]].get(h) != tried[h]]
            if not pending:
                break
        for h, reason in errors.items():
            for k in want[h][1]:
                out[k] = self._damage(indexes[k], h, reason)
        for k, index in enumerate(indexes):
            n = maps.chunk_len(index, self.size, self.chunk_size)
            if not isinstance(out[k], ChunkCorrupt) and len(out[k]) != n:
                off = index * self.chunk_size
                out[k] = ChunkCorrupt(f"backup {self.info.id}: chunk at disk offset {off} has {len(out[k])} "
                                      f"bytes, expected {n}", offset=off, length=n)
        return out

    def _damage(self, index: int, h: bytes, reason: str) -> ChunkCorrupt:
        off = index * self.chunk_size
        n = maps.chunk_len(index, self.size, self.chunk_size)
        what = f"chunk {h.hex()[:16]}" if reason.startswith("is missing") else "data"
        return ChunkCorrupt(f"backup {self.info.id}: {what} at disk offset {off} (length {n}) {reason}",
                            offset=off, length=n, hint="run `nbdbackup verify`")

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the disk, from verified chunks."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside the disk (size {self.size})")
        if length == 0:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        out = []
        for lo in range(first, last + 1, READ_BATCH):
            for idx, data in zip(range(lo, min(last + 1, lo + READ_BATCH)),
                                 self.read_chunks(list(range(lo, min(last + 1, lo + READ_BATCH))))):
                base = idx * cs
                a, b = max(offset, base) - base, min(offset + length, base + len(data)) - base
                out.append(data if (a, b) == (0, len(data)) else data[a:b])
        return b"".join(out)

    def extents(self, on_damaged: Callable[[int, int, RepoDamaged], None] | None = None, *,
                per_segment: bool = False) -> Iterator[tuple[int, int, bool]]:
        """Merged (offset, length, is_zero) runs covering the disk. *on_damaged* (restore
        --salvage): a map segment that cannot be read is reported to it as (offset, length,
        error) and its span yielded as zero, instead of raising. *per_segment* (restore): runs
        end at each map segment's end, so a run is yielded as soon as its segment is loaded,
        not once the first segment that differs is (one long data run: after every segment)."""
        cs, L = self.chunk_size, self._seg_len
        run_start, run_zero = 0, None
        for seq in range(len(self._refs)):
            start, n = maps.segment_span(seq, L, self.nchunks)
            try:
                seg = self._segment(seq)
            except RepoDamaged as e:
                if on_damaged is None:
                    raise
                end = min((start + n) * cs, self.size)
                on_damaged(start * cs, end - start * cs, e)
                seg = None
            if seg is None:          # all-zero segment: one piece, nothing loaded
                pieces = [(start, True)]
            else:
                pieces = [(start + i, e == ZERO_REF) for i, e in enumerate(maps.iter_entries(seg[0]))]
            for pos, z in pieces:
                if z != run_zero:
                    if run_zero is not None:
                        yield run_start, pos * cs - run_start, run_zero
                    run_start, run_zero = pos * cs, z
            if per_segment and run_zero is not None:
                yield run_start, min((start + n) * cs, self.size) - run_start, run_zero
                run_zero = None
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
