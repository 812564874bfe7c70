"""Pack files: append-only containers of self-describing records.

Layout (all integers little-endian):

    b"NBDPACK1"                              8-byte file magic
    record*                                  header (48 bytes) + payload
    footer entry*                            one per record (52 bytes)
    trailer                                  count, footer length, blake3(footer), b"NBPKEND1"

Record header: magic b"NBRC", type u8, compression u8, flags u16 (0, or
FLAG_SEALED for an encrypted record: repo/codec.py), raw length u32, stored
length u32, the record's id (32 bytes: blake3 of the raw bytes, keyed in an
encrypted repository).
The footer repeats every header with its offset, so the index can be rebuilt
from packs alone; if the footer is damaged, scan_records() walks the headers.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Iterator

import blake3

from ..fsutil import anonymous_map

FILE_MAGIC = b"NBDPACK1"
END_MAGIC = b"NBPKEND1"
RECORD_MAGIC = b"NBRC"

REC_CHUNK = 1      # disk data
REC_SEGMENT = 2    # a backup map segment (see maps.py)
REC_MANIFEST = 3   # a backup's metadata + segment list, JSON (see repo/manifest.py)

COMP_NONE = 0
COMP_ZSTD = 1

FLAG_SEALED = 1    # payload = nonce || AES-256-GCM(compressed bytes) || tag (repo/codec.py SealedCodec)

_HEADER = struct.Struct("<4sBBHII32s")
_ENTRY = struct.Struct("<BBHIIQ32s")
_TRAILER = struct.Struct("<II32s8s")
HEADER_SIZE = _HEADER.size      # 48
ENTRY_SIZE = _ENTRY.size        # 52
TRAILER_SIZE = _TRAILER.size    # 48


class PackFormatError(ValueError):
    """A pack or record does not parse (callers turn this into RepoDamaged)."""


@dataclass(frozen=True)
class RecordInfo:
    type: int
    compression: int
    raw_len: int
    stored_len: int
    offset: int          # offset of the PAYLOAD in the pack (header is HEADER_SIZE before it)
    hash: bytes
    flags: int = 0       # FLAG_SEALED or 0


def pack_object_name(pack: str) -> str:
    """Backend object name of pack *pack* (a 32-hex-digit name)."""
    return f"packs/{pack[:2]}/{pack}.pack"


def new_pack_name() -> str:
    return uuid.uuid4().hex


PAGE = mmap.PAGESIZE


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class BufferPool:
    """Page-aligned buffers (anonymous mmaps) for packs, handed back after their write.

    Reuse keeps their pages mapped: a fresh page costs a fault (in a VM with free
    page reporting, a host fault too), which made pack writes through the page
    cache slow and erratic. Page alignment lets the local backend write a pack
    with O_DIRECT. At most *keep* idle buffers are kept."""

    def __init__(self, capacity: int, keep: int):
        self.capacity = _round_up(capacity, PAGE)
        self.keep = keep
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def get(self, at_least: int = 0) -> mmap.mmap:
        with self._lock:
            if self._idle and at_least <= self.capacity:
                return self._idle.pop()
        return anonymous_map(max(self.capacity, _round_up(at_least, PAGE)))

    def put(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(buf) == self.capacity and len(self._idle) < self.keep:
                self._idle.append(buf)
                return
        _unmap(buf)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for buf in idle:
            _unmap(buf)


def _unmap(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:     # a view of it is still alive (say, in a traceback): unmapped when that goes
        pass


class PackBuilder:
    """Builds a pack in one page-aligned buffer: records are copied in as they are
    added (a payload may be a view of the caller's buffer), so the finished pack is
    one contiguous write. Call release() once it is written (or abandoned)."""

    def __init__(self, name: str | None = None, pool: BufferPool | None = None):
        self.name = name or new_pack_name()
        self._pool = pool or BufferPool(1 << 20, keep=0)
        self._buf: mmap.mmap | None = self._pool.get()
        self._buf[:len(FILE_MAGIC)] = FILE_MAGIC
        self._entries: list[bytes] = []
        self.records: list[RecordInfo] = []
        self.size = len(FILE_MAGIC)

    def _reserve(self, n: int) -> mmap.mmap:
        """Room for *n* more bytes, plus a page (O_DIRECT writes whole pages)."""
        buf = self._buf
        if buf is None:
            raise ValueError("pack buffer already released")
        need = self.size + n + PAGE
        if need > len(buf):
            bigger = self._pool.get(max(need, 2 * len(buf)))
            bigger[:self.size] = buf[:self.size]
            self._pool.put(buf)
            buf = self._buf = bigger
        return buf

    def add(self, rtype: int, h: bytes, raw_len: int, compression: int, payload, flags: int = 0) -> RecordInfo:
        n = len(payload)
        buf = self._reserve(HEADER_SIZE + n)
        _HEADER.pack_into(buf, self.size, RECORD_MAGIC, rtype, compression, flags, raw_len, n, h)
        off = self.size + HEADER_SIZE
        _copy_into(buf, off, payload)
        self._entries.append(_ENTRY.pack(rtype, compression, flags, raw_len, n, off, h))
        self.size = off + n
        info = RecordInfo(rtype, compression, raw_len, n, off, h, flags)
        self.records.append(info)
        return info

    def __len__(self) -> int:
        return len(self.records)

    def seal(self) -> tuple[mmap.mmap, int]:
        """Append footer and trailer; (buffer, size): the pack is buffer[:size]."""
        footer = b"".join(self._entries)
        trailer = _TRAILER.pack(len(self._entries), len(footer), blake3.blake3(footer).digest(), END_MAGIC)
        buf = self._reserve(len(footer) + len(trailer))
        end = self.size + len(footer)
        buf[self.size:end] = footer
        buf[end:end + len(trailer)] = trailer
        self.size = end + len(trailer)
        self._entries = []
        return buf, self.size

    def data(self) -> bytes:
        """A copy of the pack so far (after seal(): the whole file)."""
        return self._buf[:self.size]

    def release(self) -> None:
        """Give the buffer back to its pool."""
        buf, self._buf = self._buf, None
        if buf is not None:
            self._pool.put(buf)


_BIG_COPY = 64 * 1024


def _copy_into(buf: mmap.mmap, off: int, payload) -> None:
    """buf[off:off+len(payload)] = payload, without holding the GIL for big payloads:
    ctypes.memmove releases it, so the receiver threads hashing and compressing the
    next chunks are not held up by the writer's copies (768 MiB for a full of 768)."""
    n = len(payload)
    if n >= _BIG_COPY:
        try:
            # addresses only: the exports these make are dropped at once (an mmap with a
            # live export cannot be unmapped); *buf* and *payload* stay referenced here
            dst = ctypes.addressof(ctypes.c_char.from_buffer(buf, off))
            src = payload if isinstance(payload, bytes) else ctypes.addressof(ctypes.c_char.from_buffer(payload))
        except TypeError:           # a read-only view: copy with the GIL held
            pass
        else:
            ctypes.memmove(dst, src, n)
            return
    buf[off:off + n] = payload


def write_pack(backend, name: str, builder: PackBuilder) -> int:
    """Seal *builder* and store it as object *name*, durably; its size in bytes."""
    buf, size = builder.seal()
    backend.put_aligned(name, buf, size)
    return size


def header_bytes(rtype: int, compression: int, flags: int, raw_len: int, stored_len: int, h: bytes) -> bytes:
    """The 48 header bytes PackBuilder.add writes for such a record (a sealed record's AAD)."""
    return _HEADER.pack(RECORD_MAGIC, rtype, compression, flags, raw_len, stored_len, h)


def parse_header(data: bytes) -> RecordInfo:
    """Parse a 48-byte record header (offset is left 0)."""
    if len(data) < HEADER_SIZE:
        raise PackFormatError("truncated record header")
    magic, rtype, comp, flags, raw_len, stored_len, h = _HEADER.unpack_from(data)
    if magic != RECORD_MAGIC:
        raise PackFormatError("bad record magic")
    return RecordInfo(rtype, comp, raw_len, stored_len, 0, h, flags)


def parse_footer(tail: bytes, pack_size: int) -> list[RecordInfo]:
    """Records listed in the footer; *tail* is the end of the pack (footer + trailer)."""
    if len(tail) < TRAILER_SIZE:
        raise PackFormatError("pack too short for a trailer")
    count, flen, fhash, magic = _TRAILER.unpack_from(tail, len(tail) - TRAILER_SIZE)
    if magic != END_MAGIC:
        raise PackFormatError("bad pack trailer magic")
    if flen != count * ENTRY_SIZE or flen + TRAILER_SIZE > len(tail):
        raise PackFormatError("bad pack footer length")
    footer = tail[len(tail) - TRAILER_SIZE - flen: len(tail) - TRAILER_SIZE]
    if blake3.blake3(footer).digest() != fhash:
        raise PackFormatError("pack footer checksum mismatch")
    out = []
    limit = pack_size - TRAILER_SIZE - flen
    for i in range(count):
        rtype, comp, flags, raw_len, stored_len, off, h = _ENTRY.unpack_from(footer, i * ENTRY_SIZE)
        if off + stored_len > limit:
            raise PackFormatError("footer entry points past the records")
        out.append(RecordInfo(rtype, comp, raw_len, stored_len, off, h, flags))
    return out


def footer_size(tail: bytes) -> int:
    """Bytes of footer + trailer, read from the trailer at the end of *tail*."""
    count, flen, _h, magic = _TRAILER.unpack_from(tail, len(tail) - TRAILER_SIZE)
    if magic != END_MAGIC:
        raise PackFormatError("bad pack trailer magic")
    return flen + TRAILER_SIZE


def read_records(backend, name: str) -> list[RecordInfo]:
    """All records of pack *name* from its footer (PackFormatError when damaged)."""
    obj = pack_object_name(name)
    size = backend.size(obj)
    if size < len(FILE_MAGIC) + TRAILER_SIZE:
        raise PackFormatError("pack too short")
    tail = backend.get(obj, size - TRAILER_SIZE, TRAILER_SIZE)
    total = footer_size(tail)
    if total > size - len(FILE_MAGIC):
        raise PackFormatError("bad pack footer length")
    return parse_footer(backend.get(obj, size - total, total), size)


def scan_records(data: bytes) -> Iterator[RecordInfo]:
    """Walk record headers from the start of a whole pack (for salvage when the footer is bad)."""
    if data[:len(FILE_MAGIC)] != FILE_MAGIC:
        raise PackFormatError("bad pack magic")
    pos = len(FILE_MAGIC)
    while pos + HEADER_SIZE <= len(data) and data[pos:pos + 4] == RECORD_MAGIC:
        info = parse_header(data[pos:pos + HEADER_SIZE])
        off = pos + HEADER_SIZE
        if off + info.stored_len > len(data):
            return
        yield RecordInfo(info.type, info.compression, info.raw_len, info.stored_len, off, info.hash, info.flags)
        pos = off + info.stored_len
