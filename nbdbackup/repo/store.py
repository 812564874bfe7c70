"""Object store: where records live (index lookups) and checked record reads.

Used by the writer (dedup lookups, loading parent segments) and by images
(chunk reads). Thread-safe: each call takes its own pooled connection.

read_records() reads many records of a pack in runs: neighbouring records
(at most RUN_GAP dead bytes apart, a run at most RUN_MAX long) come in ONE
ranged backend.get(), then each record is split off and checked by the same
code read_record() uses. On object storage a get is a round trip (1-5 ms), so
a restore reading 32 neighbouring chunks pays one instead of 32. A backend with
reading() (S3) lends a reused buffer for the run while its records are decoded.
A backend with get_ranges() (local files) reads each header and payload of a run
into bytes of their own in one call: a raw chunk's payload is then returned as
read, not copied out of the run (and dead bytes between records are not read).
Given buffers to decode into (dests), a run is one get_into() instead: raw
plaintext payloads are read into their buffers, the rest into a per-thread
scratch buffer, and each record is decoded into its buffer (codec.decode_into).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from ..errors import RepoDamaged, StorageUnreachable, storage_error
from ..fsutil import anonymous_map
from .chunks import DecodeError
from .codec import RecordCodec
from .indexerrors import index_errors
from .indexsql import in_list
from .packs import COMP_NONE, HEADER_SIZE, REC_SEGMENT, PackFormatError, RecordInfo, pack_object_name, parse_header

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .index import IndexHandle

_IN_BATCH = 500   # bound on bound parameters per IN (...) query
RUN_GAP = 64 * 1024         # dead bytes a run reads through rather than start another get
RUN_MAX = 8 * 1024 * 1024   # longest run one get fetches (bounds a reader's buffer)


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
    def __init__(self, index: IndexHandle, backend, codec: RecordCodec, segment_cache: int = 256):
        self.index = index
        self.backend = backend
        self.codec = codec
        self._seg_cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._seg_cache_max = segment_cache
        self._lock = threading.Lock()

    @property
    def index_db(self) -> Engine:
        return self.index.engine

    # -- lookups --------------------------------------------------------------
    def _locations(self, table: str, hashes: Iterable[bytes]) -> dict[bytes, Location]:
        hs = list(dict.fromkeys(hashes))
        out: dict[bytes, Location] = {}
        if not hs:
            return out
        sql = self.index.sql
        with index_errors("reading the index", index_db=sql,
                          damaged_hint="`nbdbackup rebuild-index` recreates the index from the packs"):
            with sql.read() as conn:
                for i in range(0, len(hs), _IN_BATCH):
                    marks, params = in_list("h", hs[i:i + _IN_BATCH])
                    for row in conn.rows(f'SELECT t.hash, p.name, t."offset", t.stored_len, t.raw_len, '
                                         f't.compression FROM {table} t JOIN packs p ON p.id = t.pack_id '
                                         f'WHERE t.hash IN ({marks})', params):
                        out[bytes(row[0])] = Location(*row[1:])
        return out

    def chunk_locations(self, hashes: Iterable[bytes]) -> dict[bytes, Location]:
        return self._locations("chunks", hashes)

    def segment_locations(self, hashes: Iterable[bytes]) -> dict[bytes, Location]:
        return self._locations("segments", hashes)

    # -- reads ----------------------------------------------------------------
    def read_record(self, loc: Location, expected: bytes, rtype: int) -> bytes:
        """Read, decompress and verify one record; RecordError on any damage."""
        data = self._get(loc.pack, loc.offset - HEADER_SIZE, HEADER_SIZE + loc.stored_len)
        return check_record(loc, expected, rtype, data, self.codec)

    def read_records(self, items: list[tuple[Location, bytes]], rtype: int,
                     dests: list[memoryview | None] | None = None) -> list[bytes | memoryview | RecordError]:
        """Records (location, expected hash) of type *rtype*, each checked as read_record() checks
        it: its bytes, or the RecordError saying what is wrong with that one record. Records
        of one pack are read in runs, one backend get per run (see the module docstring).
        *dests*: per item, a writable buffer of exactly its raw length to decode it into (then
        that buffer is its result), or None for bytes of its own."""
        out: list[bytes | memoryview | RecordError] = [RecordError("not read")] * len(items)
        by_pack: dict[str, list[int]] = {}
        for k, (loc, _h) in enumerate(items):
            by_pack.setdefault(loc.pack, []).append(k)
        ranged = getattr(self.backend, "get_ranges", None)
        for pack, ks in by_pack.items():
            for run in runs([items[k][0] for k in ks]):
                if dests is not None:
                    self._read_run_into(pack, [ks[j] for j in run], items, rtype, dests, out)
                    continue
                if ranged is not None:
                    self._read_ranged(pack, [ks[j] for j in run], items, rtype, out)
                    continue
                first, last = items[ks[run[0]]][0], items[ks[run[-1]]][0]
                start = first.offset - HEADER_SIZE
                try:
                    with self._reading(pack, start, last.offset + last.stored_len - start) as data:
                        view = memoryview(data)
                        for j in run:
                            loc, h = items[ks[j]]
                            a = loc.offset - HEADER_SIZE - start
                            try:
                                out[ks[j]] = check_record(loc, h, rtype, view[a:a + HEADER_SIZE + loc.stored_len],
                                                            self.codec)
                            except RecordError as e:
                                out[ks[j]] = e
                except RecordError as e:        # the run could not be read
                    for j in run:
                        out[ks[j]] = e
        return out

    def _read_ranged(self, pack: str, ks: list[int], items, rtype: int, out: list) -> None:
        """Records *ks* of *items* (one run of *pack*) through get_ranges(): one call."""
        ranges = []
        for k in ks:
            loc = items[k][0]
            ranges += [(loc.offset - HEADER_SIZE, HEADER_SIZE), (loc.offset, loc.stored_len)]
        try:
            got = self.backend.get_ranges(pack_object_name(pack), ranges)
        except FileNotFoundError:
            got = RecordError(f"pack {pack} is missing")
        except OSError as e:
            raise _read_error(pack, e) from None
        for n, k in enumerate(ks):
            loc, h = items[k]
            try:
                if isinstance(got, RecordError):
                    raise got
                out[k] = check_record(loc, h, rtype, got[2 * n], self.codec, payload=got[2 * n + 1])
            except RecordError as e:
                out[k] = e

    def _read_run_into(self, pack: str, ks: list[int], items, rtype: int, dests: list, out: list) -> None:
        """Records *ks* of *items* (one run of *pack*, in pack order) read with one get_into():
        a raw plaintext record's payload lands in its dest, everything else (headers, the dead
        bytes between records, compressed or sealed payloads) in this thread's scratch buffer."""
        start = items[ks[0]][0].offset - HEADER_SIZE
        if getattr(self.backend, "reading", None) is not None:
            self._decode_run_into(pack, start, ks, items, rtype, dests, out)
            return
        direct = not self.codec.encrypted
        parts: list[tuple[int, int, int, bool]] = []       # item, header at, payload at, payload in dest
        pos = fill = 0                                      # pack offset - start; bytes of scratch used
        spans: list[tuple[int, int]] = []                  # scratch (at, length) of each view, -1: a dest
        for k in ks:
            loc = items[k][0]
            a = loc.offset - HEADER_SIZE - start
            if a < pos:             # the same record twice: read once, copied below
                parts.append((k, -1, -1, False))
                continue
            if a > pos:
                spans.append((fill, a - pos))
                fill += a - pos
            spans.append((fill, HEADER_SIZE))
            hdr_at, fill = fill, fill + HEADER_SIZE
            dest = dests[k]
            if direct and dest is not None and loc.compression == COMP_NONE and len(dest) == loc.stored_len:
                spans.append((-1, k))
                parts.append((k, hdr_at, -1, True))
            else:
                spans.append((fill, loc.stored_len))
                parts.append((k, hdr_at, fill, False))
                fill += loc.stored_len
            pos = a + HEADER_SIZE + loc.stored_len
        scratch = _scratch(fill)
        views = [dests[n] if at < 0 else scratch[at:at + n] for at, n in spans]
        try:
            got = self.backend.get_into(pack_object_name(pack), start, views)
        except FileNotFoundError:
            for k, *_ in parts:
                out[k] = RecordError(f"pack {pack} is missing")
            return
        except OSError as e:
            raise _read_error(pack, e) from None
        first: dict[int, int] = {}         # record offset -> item it was read for
        for k, hdr_at, body_at, in_dest in parts:
            loc, h = items[k]
            try:
                if hdr_at < 0:
                    if loc.offset not in first:
                        raise RecordError(f"pack {pack} at {loc.offset}: overlaps the record before it")
                    done = out[first[loc.offset]]
                    if isinstance(done, RecordError):
                        raise done
                    out[k] = _copy_to(done, dests[k])
                    continue
                first[loc.offset] = k
                if loc.offset + loc.stored_len - start > got:
                    raise RecordError(f"pack {pack} is truncated")
                hdr = scratch[hdr_at:hdr_at + HEADER_SIZE]
                payload = None if in_dest else scratch[body_at:body_at + loc.stored_len]
                out[k] = check_record(loc, h, rtype, hdr, self.codec, payload=payload, dest=dests[k])
            except RecordError as e:
                out[k] = e

    def _decode_run_into(self, pack: str, start: int, ks: list[int], items, rtype: int, dests: list,
                         out: list) -> None:
        """_read_run_into() through a backend that lends a buffer for the run (S3): each record
        decoded from there into its dest, with no scratch copy between."""
        end = max(items[k][0].offset + items[k][0].stored_len for k in ks)
        try:
            with self._reading(pack, start, end - start) as data:
                view = memoryview(data)
                for k in ks:
                    loc, h = items[k]
                    a = loc.offset - HEADER_SIZE - start
                    try:
                        out[k] = check_record(loc, h, rtype, view[a:a + HEADER_SIZE], self.codec,
                                              payload=view[a + HEADER_SIZE:a + HEADER_SIZE + loc.stored_len],
                                              dest=dests[k])
                    except RecordError as e:
                        out[k] = e
        except RecordError as e:        # the run could not be read
            for k in ks:
                out[k] = e

    @contextmanager
    def _reading(self, pack: str, start: int, length: int):
        """A run's bytes for the with block: from the backend's reusable buffers where it has
        them (S3Backend.reading: every record is decoded before the block ends), else get()."""
        reading = getattr(self.backend, "reading", None)
        if reading is None:
            yield self._get(pack, start, length)
            return
        try:
            cm = reading(pack_object_name(pack), start, length)
            data = cm.__enter__()
        except FileNotFoundError:
            raise RecordError(f"pack {pack} is missing") from None
        except OSError as e:
            raise _read_error(pack, e) from None
        try:
            yield data
        finally:
            cm.__exit__(None, None, None)

    def _get(self, pack: str, start: int, length: int) -> bytes:
        try:
            return self.backend.get(pack_object_name(pack), start, length)
        except FileNotFoundError:
            raise RecordError(f"pack {pack} is missing") from None
        except OSError as e:
            raise _read_error(pack, e) from None

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
            # gc may have moved the segment to a new pack (and deleted the old) since *loc*
            # was looked up: ask the index again, and retry once where it now points
            again = self.segment_locations([h]).get(h)
            try:
                if again is None or again == loc:
                    raise e
                raw = self.read_record(again, h, REC_SEGMENT)
            except RecordError as e2:
                raise RepoDamaged(f"map segment {h.hex()[:16]} is damaged: {e2}",
                                  hint="run `nbdbackup verify`") from None
        with self._lock:
            self._seg_cache[h] = raw
            while len(self._seg_cache) > self._seg_cache_max:
                self._seg_cache.popitem(last=False)
        return raw


def _read_error(pack: str, e: OSError):
    """A pack that exists but cannot be read (EACCES, EIO or ETIMEDOUT of a flaky mount) says
    nothing about its bytes: not a RecordError (that is damage: verify marks it, salvage
    zero-fills it) but the storage's own error, which aborts the command."""
    return (storage_error(e.errno, f"pack {pack}", "reading the repository")
            or StorageUnreachable(f"cannot read pack {pack}: {e.strerror or e}",
                                  hint="check the repository's file system (mount, disk) and run the command again"))


def check_record(loc: Location, expected: bytes, rtype: int, data, codec: RecordCodec,
                 payload=None, dest: memoryview | None = None):
    """The payload of record *loc* (header + payload bytes in *data*, or the header there and
    the payload in *payload*), decoded by *codec* (opened, decompressed, its id checked against
    *expected*) after checking its header against the index; RecordError on any damage.
    *dest*: decoded into that buffer (exactly raw_len bytes), which is returned; *payload* None
    with a *dest*: the raw payload was read into *dest* itself."""
    if dest is not None and payload is None:
        if len(data) != HEADER_SIZE or len(dest) != loc.stored_len:
            raise RecordError(f"pack {loc.pack} is truncated")
    elif payload is None:
        if len(data) != HEADER_SIZE + loc.stored_len:
            raise RecordError(f"pack {loc.pack} is truncated")
        payload = memoryview(data)[HEADER_SIZE:]
    elif len(data) != HEADER_SIZE or len(payload) != loc.stored_len:
        raise RecordError(f"pack {loc.pack} is truncated")
    try:
        hdr = parse_header(data[:HEADER_SIZE])
    except PackFormatError as e:
        raise RecordError(f"pack {loc.pack} at {loc.offset}: {e}") from None
    if (hdr.type, hdr.hash, hdr.stored_len, hdr.raw_len, hdr.compression) != \
            (rtype, expected, loc.stored_len, loc.raw_len, loc.compression):
        raise RecordError(f"pack {loc.pack} at {loc.offset}: record header does not match the index")
    try:
        if dest is not None:
            return codec.decode_into(rtype, loc.compression, loc.raw_len, expected, payload, dest, flags=hdr.flags)
        return codec.decode(rtype, loc.compression, loc.raw_len, expected, payload, flags=hdr.flags)
    except DecodeError as e:
        raise RecordError(f"pack {loc.pack} at {loc.offset}: {e}") from None


_tls = threading.local()


def _scratch(n: int) -> memoryview:
    """This thread's scratch buffer, at least *n* bytes (kept between calls: a run's headers
    and compressed payloads land in the same pages each time, not in fresh ones)."""
    buf = getattr(_tls, "scratch", None)
    if buf is None or len(buf) < n:
        buf = _tls.scratch = memoryview(anonymous_map(max(n, 1 << 20)))
    return buf


def _copy_to(data, dest: memoryview | None):
    """A duplicate's result: *data* itself (bytes) or copied into its own *dest*."""
    if dest is None:
        return bytes(data)
    dest[:] = data
    return dest


def runs(locs: list[Location], gap: int = RUN_GAP, limit: int = RUN_MAX) -> list[list[int]]:
    """Positions in *locs* (records of one pack) grouped into runs in pack order: records at most
    *gap* bytes apart, a run spanning at most *limit* bytes (a longer record is a run alone).
    Duplicates (the same record twice) share a run."""
    order = sorted(range(len(locs)), key=lambda k: locs[k].offset)
    out: list[list[int]] = []
    start = end = 0
    for k in order:
        a = locs[k].offset - HEADER_SIZE
        b = locs[k].offset + locs[k].stored_len
        if out and a - end <= gap and max(end, b) - start <= limit:
            out[-1].append(k)
            end = max(end, b)
        else:
            out.append([k])
            start, end = a, b
    return out
