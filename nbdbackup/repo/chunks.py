"""Chunk preparation (worker threads) and checked decoding: plaintext records.

These functions are PlainCodec's implementation (repo/codec.py); everything
else goes through a repository's codec, which may be a SealedCodec.
A chunk id is blake3 of its uncompressed bytes. prepare() runs in worker
threads: blake3 and zstd release the GIL, so two threads use two cores.
zstd compressor objects are not thread-safe: one per thread and level.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import blake3
import zstandard

from .packs import COMP_NONE, COMP_ZSTD

HASH_SIZE = 32
ZERO_REF = bytes(HASH_SIZE)     # map entry of an all-zero chunk (no blake3 output is all zero in practice)

# Store raw unless zstd saves at least 1/32 of the chunk: decompressing costs
# more than reading a few percent more bytes.
_MIN_SAVING_SHIFT = 5

_tls = threading.local()
_zero_cache: dict[int, bytes] = {}
_zero_hashes: dict[int, bytes] = {}


@dataclass(frozen=True, slots=True)
class PreparedChunk:
    hash: bytes          # blake3 of the raw bytes (ZERO_REF for an all-zero chunk)
    raw_len: int
    compression: int     # packs.COMP_NONE / COMP_ZSTD
    # what goes into the pack (empty for a zero chunk); raw: the caller's data, not a copy
    payload: bytes | bytearray | memoryview
    flags: int = 0       # the record header's flags (packs.FLAG_SEALED for an encrypted record)

    @property
    def is_zero(self) -> bool:
        return self.hash == ZERO_REF


def zeros(n: int) -> bytes:
    z = _zero_cache.get(n)
    if z is None:
        z = bytes(n)
        if len(_zero_cache) < 8:
            _zero_cache[n] = z
    return z


def _compressor(level: int) -> zstandard.ZstdCompressor:
    comps = getattr(_tls, "comps", None)
    if comps is None:
        comps = _tls.comps = {}
    c = comps.get(level)
    if c is None:
        c = comps[level] = zstandard.ZstdCompressor(level=level, write_checksum=False)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "dec", None)
    if d is None:
        d = _tls.dec = zstandard.ZstdDecompressor()
    return d


def hash_bytes(data) -> bytes:
    return blake3.blake3(data).digest()


def zero_hash(n: int) -> bytes:
    """blake3 of *n* zero bytes (cached per length)."""
    h = _zero_hashes.get(n)
    if h is None:
        h = hash_bytes(zeros(n))
        if len(_zero_hashes) < 8:
            _zero_hashes[n] = h
    return h


def prepare(data, level: int, compress: bool = True) -> PreparedChunk:
    """Zero check, hash, compress (when it pays and *compress*). Thread-safe.

    *data* may be a memoryview slice of a larger read. The zero check rides on
    the hash (comparing a memoryview with bytes goes byte by byte in Python);
    a chunk whose first or last byte is set is decided without it."""
    n = len(data)
    h = hash_bytes(data)
    if not (data[0] or data[n - 1]) and h == zero_hash(n):
        return PreparedChunk(ZERO_REF, n, COMP_NONE, b"")
    comp, body = compress_chunk(data, level) if compress else (COMP_NONE, data)
    return PreparedChunk(h, n, comp, body)


def compress_chunk(data, level: int):
    """(compression, body) of a chunk: zstd when that saves enough, else *data* itself."""
    n = len(data)
    c = _compressor(level).compress(data)
    if len(c) <= n - (n >> _MIN_SAVING_SHIFT):
        return COMP_ZSTD, c
    return COMP_NONE, data


def compress_blob(data: bytes, level: int) -> tuple[int, bytes]:
    """(compression, payload) for metadata blobs (map segments, manifests)."""
    c = _compressor(level).compress(data)
    return (COMP_ZSTD, c) if len(c) < len(data) else (COMP_NONE, data)


class DecodeError(ValueError):
    pass


def decode(payload: bytes, compression: int, raw_len: int, expected: bytes, hasher=hash_bytes) -> bytes:
    """Decompress and verify against *expected* (*hasher*: blake3, or a codec's keyed blake3);
    DecodeError on any mismatch."""
    if compression == COMP_NONE:
        data = payload
    elif compression == COMP_ZSTD:
        try:
            data = _decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as e:
            raise DecodeError(f"zstd: {e}") from None
    else:
        raise DecodeError(f"unknown compression {compression}")
    if len(data) != raw_len:
        raise DecodeError(f"length {len(data)} != {raw_len}")
    if hasher(data) != expected:
        raise DecodeError("hash mismatch")
    return data.tobytes() if isinstance(data, memoryview) else data


def decode_into(payload, compression: int, raw_len: int, expected: bytes, dest: memoryview,
                hasher=hash_bytes) -> memoryview:
    """decode() into *dest* (exactly *raw_len* writable bytes), which it returns once checked.
    *payload* None: a raw record's bytes were read into *dest* already (no copy at all).
    zstd decompresses straight into *dest*: a restore's buffers are reused, so it pays no
    page faults for fresh output (a third of its decompression's CPU when measured)."""
    if len(dest) != raw_len:
        raise DecodeError(f"length {len(dest)} != {raw_len}")
    if compression == COMP_NONE:
        if payload is not None:
            if len(payload) != raw_len:
                raise DecodeError(f"length {len(payload)} != {raw_len}")
            dest[:] = payload
    elif compression == COMP_ZSTD:
        if payload is None:
            raise DecodeError("compressed record read as raw")
        try:
            with _decompressor().stream_reader(payload, read_across_frames=False) as r:
                got = 0
                while got < raw_len:
                    n = r.readinto(dest[got:])
                    if not n:
                        break
                    got += n
                extra = r.read(1)
        except zstandard.ZstdError as e:
            raise DecodeError(f"zstd: {e}") from None
        if got != raw_len or extra:
            raise DecodeError(f"zstd gave {got}{'+' * bool(extra)} bytes, expected {raw_len}")
    else:
        raise DecodeError(f"unknown compression {compression}")
    if hasher(dest) != expected:
        raise DecodeError("hash mismatch")
    return dest
