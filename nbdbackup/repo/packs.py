"""Pack files: append-only containers of self-describing records.

Layout (all integers little-endian):

    b"NBDPACK1"                              8-byte file magic
    record*                                  header (48 bytes) + payload
    footer entry*                            one per record (52 bytes)
    trailer                                  count, footer length, blake3(footer), b"NBPKEND1"

Record header: magic b"NBRC", type u8, compression u8, 2 reserved bytes,
raw length u32, stored length u32, blake3 hash of the raw bytes (32 bytes).
The footer repeats every header with its offset, so the index can be rebuilt
from packs alone; if the footer is damaged, scan_records() walks the headers.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Iterator

import blake3

FILE_MAGIC = b"NBDPACK1"
END_MAGIC = b"NBPKEND1"
RECORD_MAGIC = b"NBRC"

REC_CHUNK = 1      # disk data
REC_SEGMENT = 2    # a backup map segment (see maps.py)
REC_MANIFEST = 3   # a backup's metadata + segment list, JSON (see manifest in writer.py)

COMP_NONE = 0
COMP_ZSTD = 1

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


def pack_object_name(pack: str) -> str:
    """Backend object name of pack *pack* (a 32-hex-digit name)."""
    return f"packs/{pack[:2]}/{pack}.pack"


def new_pack_name() -> str:
    return uuid.uuid4().hex


class PackBuilder:
    """Collects records in memory; seal() returns the parts of the finished file."""

    def __init__(self, name: str | None = None):
        self.name = name or new_pack_name()
        self._parts: list[bytes] = [FILE_MAGIC]
        self._entries: list[bytes] = []
        self.records: list[RecordInfo] = []
        self.size = len(FILE_MAGIC)

    def add(self, rtype: int, h: bytes, raw_len: int, compression: int, payload: bytes) -> RecordInfo:
        hdr = _HEADER.pack(RECORD_MAGIC, rtype, compression, 0, raw_len, len(payload), h)
        off = self.size + HEADER_SIZE
        self._parts.append(hdr)
        self._parts.append(payload)
        self._entries.append(_ENTRY.pack(rtype, compression, 0, raw_len, len(payload), off, h))
        self.size += HEADER_SIZE + len(payload)
        info = RecordInfo(rtype, compression, raw_len, len(payload), off, h)
        self.records.append(info)
        return info

    def __len__(self) -> int:
        return len(self.records)

    def seal(self) -> list[bytes]:
        footer = b"".join(self._entries)
        trailer = _TRAILER.pack(len(self._entries), len(footer), blake3.blake3(footer).digest(), END_MAGIC)
        return [*self._parts, footer, trailer]


def parse_header(data: bytes) -> RecordInfo:
    """Parse a 48-byte record header (offset is left 0)."""
    if len(data) < HEADER_SIZE:
        raise PackFormatError("truncated record header")
    magic, rtype, comp, _r, raw_len, stored_len, h = _HEADER.unpack_from(data)
    if magic != RECORD_MAGIC:
        raise PackFormatError("bad record magic")
    return RecordInfo(rtype, comp, raw_len, stored_len, 0, h)


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
        rtype, comp, _r, raw_len, stored_len, off, h = _ENTRY.unpack_from(footer, i * ENTRY_SIZE)
        if off + stored_len > limit:
            raise PackFormatError("footer entry points past the records")
        out.append(RecordInfo(rtype, comp, raw_len, stored_len, off, h))
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
        yield RecordInfo(info.type, info.compression, info.raw_len, info.stored_len, off, info.hash)
        pos = off + info.stored_len
