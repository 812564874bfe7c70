"""Backup maps: chunk position -> chunk hash, split into shared segments.

A map segment covers `segment_len` consecutive positions (the last one may
be shorter); its raw form is 32 bytes per position: the chunk's blake3 hash,
or ZERO_REF (32 zero bytes) for an all-zero chunk. A segment is stored once
as a content-addressed REC_SEGMENT record (hash = blake3 of the raw form,
zstd-compressed so zero runs cost nearly nothing), and a backup's map is the
list of its segment hashes (None = every position zero, nothing stored).
An incremental that did not touch a segment shares its parent's segment.
"""

from __future__ import annotations

from .chunks import HASH_SIZE, ZERO_REF


def nsegments(nchunks: int, seg_len: int) -> int:
    return (nchunks + seg_len - 1) // seg_len


def segment_span(seq: int, seg_len: int, nchunks: int) -> tuple[int, int]:
    """(first position, number of positions) of segment *seq*."""
    start = seq * seg_len
    return start, max(0, min(seg_len, nchunks - start))


def chunk_len(index: int, size: int, chunk_size: int) -> int:
    """Byte length of chunk *index* of a disk of *size* bytes (the last one may be short)."""
    return max(0, min(chunk_size, size - index * chunk_size))


def entry(raw: bytes | bytearray, i: int) -> bytes:
    return bytes(raw[i * HASH_SIZE:(i + 1) * HASH_SIZE])


def is_all_zero(raw: bytes | bytearray) -> bool:
    return not any(raw)


def zero_segment(n: int) -> bytearray:
    return bytearray(n * HASH_SIZE)


def iter_entries(raw: bytes):
    """Yield the 32-byte entries of a raw segment."""
    for i in range(0, len(raw), HASH_SIZE):
        yield raw[i:i + HASH_SIZE]


__all__ = ["ZERO_REF", "HASH_SIZE", "nsegments", "segment_span", "chunk_len", "entry", "is_all_zero",
           "zero_segment", "iter_entries"]


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with touching or overlapping ones merged (the damaged
    ranges verify and restore --salvage name)."""
    out: list[list[int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]
