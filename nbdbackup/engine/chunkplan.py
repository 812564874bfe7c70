"""Turn an extent stream into per-chunk actions.

Extents (offset, length, dirty, zero) come from the walker in order; chunks
are fixed-size and aligned. A chunk is re-put when any byte of it is dirty
(rounding can only grow the dirty set, never shrink it). A dirty chunk that
is wholly zero is recorded as zero without reading; a partly zero one is read.
Output is merged runs, so memory does not grow with the disk size.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

SKIP = "skip"   # inherit from the parent's map
ZERO = "zero"   # record as zero, do not read
READ = "read"   # read, hash, store
CLEAN_ZERO = "clean-zero"   # like SKIP, and wholly zero now (only with clean_zero=True: the chain check)


class Run(NamedTuple):
    start: int      # first chunk index
    end: int        # one past the last chunk index
    action: str


def _action(dirty: bool, zero: bool, clean_zero: bool = False) -> str:
    if not dirty:
        return CLEAN_ZERO if zero and clean_zero else SKIP
    return ZERO if zero else READ


def _filled(extents: Iterable, size: int) -> Iterator[tuple[int, int, bool, bool]]:
    """Extents clipped to [0, size); any gap is reported dirty and non-zero (read it)."""
    pos = 0
    for e in extents:
        off, length, dirty, zero = e.offset, e.length, e.dirty, e.zero
        end = min(off + length, size)
        if off > pos:
            yield pos, off - pos, True, False
            pos = off
        if end > pos:
            yield pos, end - pos, bool(dirty), bool(zero)
            pos = end
        if pos >= size:
            return
    if pos < size:
        yield pos, size - pos, True, False


def chunk_runs(extents: Iterable, *, chunk_size: int, size: int, all_dirty: bool = False,
               force_from: int | None = None, clean_zero: bool = False) -> Iterator[Run]:
    """Merged runs of chunk actions covering every chunk of a *size*-byte disk.

    all_dirty: a full backup (every chunk is put). force_from: chunks at or
    after this index are dirty whatever the bitmap says (the disk was resized).
    clean_zero: clean chunks wholly covered by ZERO extents are CLEAN_ZERO, not SKIP.
    """
    cs = chunk_size
    nchunks = (size + cs - 1) // cs
    out: list[Run] = []     # at most one pending run (merged before emitting)

    def emit(start: int, end: int, action: str):
        if force_from is not None and action in (SKIP, CLEAN_ZERO) and end > force_from:
            if start < force_from:
                yield from emit(start, force_from, action)
                start = force_from
            action = READ       # unknown content: read (zero data is detected after reading)
        if out and out[0].end == start and out[0].action == action:
            out[0] = Run(out[0].start, end, action)
            return
        if out:
            yield out[0]
        out[:] = [Run(start, end, action)]

    pend_idx = -1           # chunk currently being assembled from partial extents
    pend_dirty = False
    pend_zero = True
    for off, length, dirty, zero in _filled(extents, size):
        dirty = dirty or all_dirty
        end = off + length
        while off < end:
            ci = off // cs
            cstart, cend = ci * cs, min(ci * cs + cs, size)
            if off == cstart and end >= cend:
                # whole chunks: from ci up to the last chunk fully inside [off, end)
                last = nchunks if end >= size else end // cs
                yield from emit(ci, last, _action(dirty, zero, clean_zero))
                off = min(last * cs, size)
                continue
            if pend_idx != ci:
                pend_idx, pend_dirty, pend_zero = ci, False, True
            pend_dirty |= dirty
            pend_zero &= zero
            off = min(end, cend)
            if off == cend:
                yield from emit(ci, ci + 1, _action(pend_dirty, pend_zero, clean_zero))
                pend_idx = -1
    if out:
        yield out[0]


def bytes_of(run: Run, chunk_size: int, size: int) -> int:
    return min(run.end * chunk_size, size) - run.start * chunk_size


def first_resized_chunk(parent_size: int | None, size: int, chunk_size: int) -> int | None:
    """First chunk whose length or existence changed with a resize from *parent_size*
    (read from there on); None without a parent or a resize."""
    if parent_size is None or parent_size == size:
        return None
    return min(parent_size, size) // chunk_size
