"""MapBuilder: the map of one backup being written, segment by segment.

A map is one entry per chunk position (its chunk id or ZERO_REF), split
into segments of segment_len positions (repo/maps.py). Only the segments near
the furthest position put are open (32 bytes per position); those the engine
has moved OPEN_WINDOW segments past are finalized, and a late put reopens one.

Inheritance (an incremental): positions [0, inherit_upto) that are not put
take the parent's entry, i.e. those whose chunk has the same byte length in
parent and child (inheritable_positions); every other position not put is
zero. A segment nothing was put into shares the parent's segment when it
covers the same positions.
"""

from __future__ import annotations

from typing import Callable

from . import maps
from .chunks import HASH_SIZE

OPEN_WINDOW = 2          # segments kept open behind the furthest one put


def inheritable_positions(parent_size: int, size: int, cs: int) -> int:
    """Positions [0, n) whose byte length is the same in parent and child."""
    pn, n = (parent_size + cs - 1) // cs, (size + cs - 1) // cs
    if parent_size == size:
        return n
    k = min(pn, n)
    if k and maps.chunk_len(k - 1, parent_size, cs) != maps.chunk_len(k - 1, size, cs):
        k -= 1
    return k


class MapBuilder:
    def __init__(self, nchunks: int, segment_len: int, *, parent_refs: list[bytes | None],
                 parent_nchunks: int, inherit_upto: int, load: Callable[[bytes], bytes],
                 is_stored: Callable[[bytes], bool], store: Callable[[bytes, bytes], None],
                 hash: Callable[[bytes], bytes]):
        """*parent_refs*: the parent's segment list ([] for a full). *load*(hash) -> raw segment;
        *is_stored*(hash): whether that segment is stored already; *store*(hash, raw) stores one;
        *hash*(raw): a segment's id (the repository codec's)."""
        self.nchunks = nchunks
        self.segment_len = segment_len
        self._parent_refs = parent_refs
        self._parent_nchunks = parent_nchunks
        self._inherit_upto = inherit_upto
        self._load, self._is_stored, self._store, self._hash = load, is_stored, store, hash
        self.open: dict[int, bytearray] = {}          # seq -> raw segment being filled
        self._done: dict[int, bytes | None] = {}      # seq -> finalized segment hash (None = zero)
        self._max_seq = -1

    def set(self, index: int, ref: bytes) -> list[int]:
        """Record entry *ref* at position *index*; the open segments now behind the window,
        which the caller finalizes (each one a write step it guards)."""
        seq, i = divmod(index, self.segment_len)
        buf = self.open.get(seq)
        if buf is None:
            buf = self._open_segment(seq)
        buf[i * HASH_SIZE:(i + 1) * HASH_SIZE] = ref
        if seq <= self._max_seq:
            return []
        self._max_seq = seq
        return [s for s in self.open if s < seq - OPEN_WINDOW]

    def _parent_ref(self, seq: int) -> bytes | None:
        return self._parent_refs[seq] if seq < len(self._parent_refs) else None

    def _open_segment(self, seq: int) -> bytearray:
        start, n = maps.segment_span(seq, self.segment_len, self.nchunks)
        if seq in self._done:                       # reopen after a late put
            ref = self._done.pop(seq)
            buf = bytearray(self._load(ref)) if ref else maps.zero_segment(n)
        else:
            buf = maps.zero_segment(n)
            m = min(n, self._inherit_upto - start)
            pref = self._parent_ref(seq)
            if m > 0 and pref is not None:
                buf[:m * HASH_SIZE] = self._load(pref)[:m * HASH_SIZE]
        self.open[seq] = buf
        return buf

    def finalize(self, seq: int) -> None:
        """Close open segment *seq*: stored (unless zero, the parent's or already stored)."""
        raw = bytes(self.open.pop(seq))
        if maps.is_all_zero(raw):
            self._done[seq] = None
            return
        h = self._hash(raw)
        self._done[seq] = h
        if h == self._parent_ref(seq) or self._is_stored(h):
            return
        self._store(h, raw)

    def finish(self) -> list[bytes | None]:
        """Finalize every segment; the backup's segment list."""
        for s in sorted(self.open):
            self.finalize(s)
        refs = []
        for seq in range(maps.nsegments(self.nchunks, self.segment_len)):
            if seq not in self._done:
                start, n = maps.segment_span(seq, self.segment_len, self.nchunks)
                pref = self._parent_ref(seq)
                if pref is not None and start + n <= self._inherit_upto and \
                        maps.segment_span(seq, self.segment_len, self._parent_nchunks)[1] == n:
                    self._done[seq] = pref          # untouched: share the parent's segment
                elif pref is None:
                    self._done[seq] = None          # nothing put, parent's segment zero: zero
                else:
                    self._open_segment(seq)
                    self.finalize(seq)
            refs.append(self._done[seq])
        return refs

    def clear(self) -> None:
        self.open.clear()
