"""Object store: where records live (index lookups) and checked record reads.

Used by the writer (dedup lookups, loading parent segments) and by images
(chunk reads). Thread-safe: each call takes its own pooled connection.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import select
from sqlalchemy.engine import Engine

from ..errors import RepoDamaged
from .chunks import DecodeError, decode
from .indexerrors import index_errors
from .packs import HEADER_SIZE, REC_SEGMENT, PackFormatError, RecordInfo, pack_object_name, parse_header
from .schema import chunks, packs, segments

_IN_BATCH = 500   # bound on bound parameters per IN (...) query


@dataclass(frozen=True, slots=True)
class Location:
    pack: str
    offset: int
    stored_len: int
    raw_len: int
    compression: int


class RecordError(Exception):
    """A record could not be read or failed its check (message says why)."""


def record_row(pack_id: int, h: bytes, rec: RecordInfo) -> dict:
    """The chunks or segments row naming record *rec* (hash *h*) of pack *pack_id*."""
    return {"hash": h, "pack_id": pack_id, "offset": rec.offset, "stored_len": rec.stored_len,
            "raw_len": rec.raw_len, "compression": rec.compression}


class ObjectStore:
    def __init__(self, engine: Engine, backend, segment_cache: int = 256):
        self.index_db = engine
        self.backend = backend
        self._seg_cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._seg_cache_max = segment_cache
        self._lock = threading.Lock()

    # -- lookups --------------------------------------------------------------
    def _locations(self, table, hashes: Iterable[bytes]) -> dict[bytes, Location]:
        hs = list(dict.fromkeys(hashes))
        out: dict[bytes, Location] = {}
        if not hs:
            return out
        q = select(table.c.hash, packs.c.name, table.c.offset, table.c.stored_len, table.c.raw_len,
                   table.c.compression).join(packs, packs.c.id == table.c.pack_id)
        with index_errors("reading the index", index_db=self.index_db,
                          damaged_hint="`nbdbackup rebuild-index` recreates the index from the packs"):
            with self.index_db.connect() as conn:
                for i in range(0, len(hs), _IN_BATCH):
                    for row in conn.execute(q.where(table.c.hash.in_(hs[i:i + _IN_BATCH]))):
                        out[bytes(row[0])] = Location(*row[1:])
        return out

    def chunk_locations(self, hashes: Iterable[bytes]) -> dict[bytes, Location]:
        return self._locations(chunks, hashes)

    def segment_locations(self, hashes: Iterable[bytes]) -> dict[bytes, Location]:
        return self._locations(segments, hashes)

    def existing(self, table, hashes: list[bytes], conn=None) -> set[bytes]:
        """Which of *hashes* have a row in *table* (chunks or segments)."""
        found: set[bytes] = set()
        hs = list(dict.fromkeys(hashes))

        def run(c):
            for i in range(0, len(hs), _IN_BATCH):
                found.update(bytes(r[0]) for r in c.execute(select(table.c.hash).where(
                    table.c.hash.in_(hs[i:i + _IN_BATCH]))))
        if conn is not None:
            run(conn)
        elif hs:
            with self.index_db.connect() as c:
                run(c)
        return found

    # -- reads ----------------------------------------------------------------
    def read_record(self, loc: Location, expected: bytes, rtype: int) -> bytes:
        """Read, decompress and verify one record; RecordError on any damage."""
        obj = pack_object_name(loc.pack)
        try:
            data = self.backend.get(obj, loc.offset - HEADER_SIZE, HEADER_SIZE + loc.stored_len)
        except FileNotFoundError:
            raise RecordError(f"pack {loc.pack} is missing") from None
        except OSError as e:
            raise RecordError(f"cannot read pack {loc.pack}: {e}") from None
        if len(data) != HEADER_SIZE + loc.stored_len:
            raise RecordError(f"pack {loc.pack} is truncated")
        try:
            hdr = parse_header(data)
        except PackFormatError as e:
            raise RecordError(f"pack {loc.pack} at {loc.offset}: {e}") from None
        if (hdr.type, hdr.hash, hdr.stored_len, hdr.raw_len, hdr.compression) != \
                (rtype, expected, loc.stored_len, loc.raw_len, loc.compression):
            raise RecordError(f"pack {loc.pack} at {loc.offset}: record header does not match the index")
        try:
            return decode(memoryview(data)[HEADER_SIZE:], loc.compression, loc.raw_len, expected)
        except DecodeError as e:
            raise RecordError(f"pack {loc.pack} at {loc.offset}: {e}") from None

    def load_segment(self, h: bytes, loc: Location | None = None) -> bytes:
        """Raw map segment *h*, verified (RepoDamaged when missing or bad). *loc*: its
        location, when the caller looked up many at once (one query, not one each)."""
        with self._lock:
            raw = self._seg_cache.get(h)
            if raw is not None:
                self._seg_cache.move_to_end(h)
                return raw
        if loc is None:
            loc = self.segment_locations([h]).get(h)
        if loc is None:
            raise RepoDamaged(f"map segment {h.hex()[:16]} is missing from the index",
                              hint="run `nbdbackup verify`; `nbdbackup rebuild-index` may recover it")
        try:
            raw = self.read_record(loc, h, REC_SEGMENT)
        except RecordError as e:
            raise RepoDamaged(f"map segment {h.hex()[:16]} is damaged: {e}",
                              hint="run `nbdbackup verify`") from None
        with self._lock:
            self._seg_cache[h] = raw
            while len(self._seg_cache) > self._seg_cache_max:
                self._seg_cache.popitem(last=False)
        return raw
