"""BackupWriter: turns prepared chunks into packs, map segments and a backup.

Write order (the durability invariant): a pack is fsync'ed and renamed into
place before the index rows naming its records commit (at each pack seal);
the backup row and its map rows commit last, in one transaction, so a
backup is visible only when complete. A killed run leaves only orphans
(sealed packs whose chunks no backup uses), which gc reclaims.

Memory stays bounded: only the map segments near the current position are
open (32 bytes per position); segments the engine has moved past are
finalized into the pack. A late put() into a finalized segment reopens it.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from typing import TYPE_CHECKING, Sequence

from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError

from ..errors import UsageError, storage_error
from . import maps
from . import packs as P
from .chunks import HASH_SIZE, ZERO_REF, PreparedChunk, compress_blob, hash_bytes, prepare
from .ids import check_disk_name, from_ms, new_backup_id, now_ms, to_ms
from .index import write_txn
from .indexerrors import index_error, index_path
from .info import BackupInfo
from .manifest import encode as encode_manifest
from .schema import backup_segments, backups, chunks, packs, segments

if TYPE_CHECKING:
    from .repository import Repository

log = logging.getLogger(__name__)

OPEN_WINDOW = 2          # segments kept open behind the furthest one put
BATCH_COUNT = 128        # dedup lookup batch: chunks...
BATCH_BYTES = 32 << 20   # ...or bytes of payload, whichever first
PACK_RECORDS = 32768     # seal a pack at this many records even if small (bounds memory and footer size)
SEALS_IN_FLIGHT = 3      # packs written + fsync'ed + indexed at once in the background (fsyncs overlap)


class BackupWriter:
    def __init__(self, repo: "Repository", disk: str, *, kind: str, size: int,
                 parent: BackupInfo | None = None, bitmap: str | None = None,
                 checkpoint: str | None = None, set_id: str | None = None, source: str | None = None):
        check_disk_name(disk)
        if kind not in ("full", "incremental"):
            raise UsageError(f"backup kind must be 'full' or 'incremental', not {kind!r}")
        if not isinstance(size, int) or size < 0:
            raise UsageError(f"invalid disk size {size!r}")
        if kind == "incremental":
            if parent is None:
                raise UsageError("an incremental backup needs a parent backup")
            if parent.disk != disk:
                raise UsageError(f"parent {parent.id} is a backup of disk {parent.disk!r}, not {disk!r}")
            if parent.chunk_size != repo.chunk_size:
                raise UsageError(f"parent {parent.id} has chunk size {parent.chunk_size}, "
                                 f"the repository {repo.chunk_size}")
        self.repo = repo
        self.disk, self.kind, self.size, self.parent = disk, kind, size, parent
        self.bitmap, self.checkpoint, self.set_id, self.source = bitmap, checkpoint, set_id, source
        self.chunk_size = repo.chunk_size
        self.nchunks = (size + self.chunk_size - 1) // self.chunk_size
        self._level = repo.compression_level
        self._seg_len = repo.config.segment_len
        self._store = repo.store
        self._state = "open"
        self._locks = []
        self._parent_refs: list[bytes | None] = []
        # positions [0, _inherit_upto) take the parent's entry unless put
        self._inherit_upto = 0
        self._open: dict[int, bytearray] = {}
        self._done: dict[int, bytes | None] = {}
        self._max_seq = -1
        self._batch: list[PreparedChunk] = []
        self._batch_bytes = 0
        self._pack: P.PackBuilder | None = None
        self._pack_chunks: set[bytes] = set()
        self._pack_segments: dict[bytes, bytes] = {}   # hash -> raw, for segments in the unsealed pack
        # The previous packs, being written and indexed by background threads
        # (overlaps fsync with hashing); their records count as "have" meanwhile.
        # Entries: (future, chunk hashes, {segment hash: raw}), oldest first.
        self._sealer = None
        self._inflight: deque = deque()
        # pack buffers: one being filled, SEALS_IN_FLIGHT being written. A pack overshoots
        # pack_size by at most one record (a raw chunk) before it is sealed, and its footer
        # lists at most PACK_RECORDS records (pages never touched cost nothing).
        self._buffers = P.BufferPool(repo.config.pack_size + P.HEADER_SIZE + self.chunk_size
                                     + PACK_RECORDS * P.ENTRY_SIZE + P.TRAILER_SIZE,
                                     keep=SEALS_IN_FLIGHT + 1)
        self.stored_bytes = 0
        try:
            self._locks.append(repo.lock("writers", exclusive=False, purpose="the repository's writer lock"))
            self._locks.append(repo.lock(f"disk-{disk}", exclusive=True,
                                         purpose=f"the lock of disk {disk!r} (another backup of it runs)"))
            if parent is not None:
                self._parent_refs = repo.checked_segment_refs(parent)
                self._inherit_upto = _inheritable(parent.size, size, self.chunk_size)
        except BaseException:
            self._release()
            raise

    # -- worker threads -------------------------------------------------------
    def prepare(self, data, compress: bool = True) -> PreparedChunk:
        """Zero check, blake3, zstd (unless not *compress*: stored raw). Thread-safe;
        releases the GIL in blake3/zstd."""
        return prepare(data, self._level, compress)

    # -- main thread ----------------------------------------------------------
    def put(self, index: int, prepared: PreparedChunk | None) -> None:
        """Record chunk *index*. Its payload may be a view of the caller's buffer:
        keep that buffer unchanged until flush() (or commit) returns."""
        self._check_open()
        if not 0 <= index < self.nchunks:
            raise ValueError(f"chunk index {index} out of range 0..{self.nchunks - 1}")
        if prepared is None or prepared.is_zero:
            self._set(index, ZERO_REF)
            return
        want = maps.chunk_len(index, self.size, self.chunk_size)
        if prepared.raw_len != want:
            raise ValueError(f"chunk {index} has {prepared.raw_len} bytes, expected {want}")
        self._set(index, prepared.hash)
        if prepared.hash not in self._pack_chunks and not self._inflight_has_chunk(prepared.hash):
            self._batch.append(prepared)
            self._batch_bytes += len(prepared.payload)
            if len(self._batch) >= BATCH_COUNT or self._batch_bytes >= BATCH_BYTES:
                self._guard(self._flush_batch)

    def put_zero(self, index: int) -> None:
        self.put(index, None)

    def flush(self) -> None:
        """Look up and copy into the pack every chunk put so far: no payload given
        to put() is referenced any more."""
        self._check_open()
        self._guard(self._flush_batch)

    def abort(self) -> None:
        """Drop everything not committed; committed data is untouched. Idempotent."""
        if self._state == "committed":
            return
        self._state = "aborted"
        self._batch.clear()
        pack, self._pack = self._pack, None
        if pack is not None:
            pack.release()
        self._open.clear()
        try:
            self._stop_sealer()
        finally:
            self._release()

    def _stop_sealer(self) -> None:
        """Wait for the background seals (their packs are orphans now, or committed data) and stop the threads."""
        inflight, self._inflight = self._inflight, deque()
        for fut, _, _ in inflight:
            try:
                fut.result()
            except BaseException as e:   # the failure that caused the abort is reported elsewhere
                log.debug("background pack write failed during abort: %s", e)
        if self._sealer is not None:
            self._sealer.shutdown(wait=True)
            self._sealer = None
        self._buffers.close()

    def commit(self, *, read_bytes: int, duration_s: float, created=None) -> BackupInfo:
        return self.repo.commit_set([self], read_bytes=[read_bytes], duration_s=[duration_s],
                                    created=created, set_id=self.set_id)[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self._state == "open":
            self.abort()

    # -- map ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"writer is {self._state}")

    def _set(self, index: int, ref: bytes) -> None:
        seq, i = divmod(index, self._seg_len)
        buf = self._open.get(seq)
        if buf is None:
            buf = self._open_segment(seq)
        buf[i * HASH_SIZE:(i + 1) * HASH_SIZE] = ref
        if seq > self._max_seq:
            self._max_seq = seq
            for s in [s for s in self._open if s < seq - OPEN_WINDOW]:
                self._guard(self._finalize, s)

    def _open_segment(self, seq: int) -> bytearray:
        start, n = maps.segment_span(seq, self._seg_len, self.nchunks)
        if seq in self._done:                       # reopen after a late put
            ref = self._done.pop(seq)
            buf = bytearray(self._load(ref)) if ref else maps.zero_segment(n)
        else:
            buf = maps.zero_segment(n)
            m = min(n, self._inherit_upto - start)
            pref = self._parent_refs[seq] if seq < len(self._parent_refs) else None
            if m > 0 and pref is not None:
                buf[:m * HASH_SIZE] = self._load(pref)[:m * HASH_SIZE]
        self._open[seq] = buf
        return buf

    def _load(self, ref: bytes) -> bytes:
        raw = self._pack_segments.get(ref)
        for _, _, segs in self._inflight:
            raw = raw or segs.get(ref)
        return raw if raw is not None else self._store.load_segment(ref)

    def _finalize(self, seq: int) -> None:
        raw = bytes(self._open.pop(seq))
        if maps.is_all_zero(raw):
            self._done[seq] = None
            return
        h = hash_bytes(raw)
        self._done[seq] = h
        pref = self._parent_refs[seq] if seq < len(self._parent_refs) else None
        if h == pref or h in self._pack_segments or any(h in segs for _, _, segs in self._inflight) or \
                self._store.existing(segments, [h]):
            return
        comp, payload = compress_blob(raw, self._level)
        self._pack_add(P.REC_SEGMENT, h, len(raw), comp, payload)
        self._pack_segments[h] = raw

    def _finish_map(self) -> list[bytes | None]:
        """Finalize every segment; the backup's segment list."""
        self._flush_batch()
        for s in sorted(self._open):
            self._finalize(s)
        refs = []
        for seq in range(maps.nsegments(self.nchunks, self._seg_len)):
            if seq not in self._done:
                start, n = maps.segment_span(seq, self._seg_len, self.nchunks)
                pref = self._parent_refs[seq] if seq < len(self._parent_refs) else None
                if pref is not None and start + n <= self._inherit_upto and \
                        maps.segment_span(seq, self._seg_len, self.parent.nchunks)[1] == n:
                    self._done[seq] = pref          # untouched: share the parent's segment
                elif pref is None:
                    self._done[seq] = None          # nothing put, parent's segment zero: zero
                else:
                    self._open_segment(seq)
                    self._finalize(seq)
            refs.append(self._done[seq])
        return refs

    # -- packs ----------------------------------------------------------------
    def _flush_batch(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        todo = {p.hash: p for p in batch if p.hash not in self._pack_chunks and not self._inflight_has_chunk(p.hash)}
        have = self._store.existing(chunks, list(todo))
        for h, p in todo.items():
            if h not in have:
                self._pack_add(P.REC_CHUNK, h, p.raw_len, p.compression, p.payload)
                self._pack_chunks.add(h)

    def _pack_add(self, rtype: int, h: bytes, raw_len: int, comp: int, payload: bytes) -> P.RecordInfo:
        if self._pack is None:
            self._pack = P.PackBuilder(pool=self._buffers)
        rec = self._pack.add(rtype, h, raw_len, comp, payload)
        if rtype != P.REC_MANIFEST:
            self.stored_bytes += P.HEADER_SIZE + len(payload)
        if (self._pack.size >= self.repo.config.pack_size or len(self._pack) >= PACK_RECORDS) \
                and rtype != P.REC_MANIFEST:
            self._seal()
        return rec

    def _inflight_has_chunk(self, h: bytes) -> bool:
        return any(h in chs for _, chs, _ in self._inflight)

    def _seal(self) -> None:
        """Hand the current pack to a background sealer (waiting while SEALS_IN_FLIGHT are busy)."""
        while len(self._inflight) >= SEALS_IN_FLIGHT:
            self._wait_oldest()
        pack, self._pack = self._pack, None
        if pack is None or not len(pack):
            if pack is not None:
                pack.release()
            return
        if self._sealer is None:
            from concurrent.futures import ThreadPoolExecutor
            self._sealer = ThreadPoolExecutor(SEALS_IN_FLIGHT, thread_name_prefix="nbdbackup-seal")
        chs, self._pack_chunks = self._pack_chunks, set()
        segs, self._pack_segments = self._pack_segments, {}
        self._inflight.append((self._sealer.submit(self._write_pack, pack), chs, segs))

    def _wait_oldest(self) -> None:
        fut = self._inflight[0][0]
        try:
            fut.result()
        finally:
            self._inflight.popleft()    # indexed now (or failed: the writer aborts)

    def _wait_inflight(self) -> None:
        while self._inflight:
            self._wait_oldest()

    def _seal_and_wait(self) -> None:
        self._seal()
        self._wait_inflight()

    def _write_pack(self, pack: P.PackBuilder) -> None:
        """Make the pack durable, then index its records (in that order)."""
        try:
            size = P.write_pack(self.repo.backend, P.pack_object_name(pack.name), pack)
        finally:
            pack.release()
        with write_txn(self.repo.engine) as conn:
            pid = conn.execute(insert(packs).values(name=pack.name, size=size, created_ms=to_ms(now_ms()))
                               ).inserted_primary_key[0]
            for table, rtype in ((chunks, P.REC_CHUNK), (segments, P.REC_SEGMENT)):
                recs = {r.hash: r for r in pack.records if r.type == rtype}
                have = self._store.existing(table, list(recs), conn=conn)
                rows = [{"hash": h, "pack_id": pid, "offset": r.offset, "stored_len": r.stored_len,
                         "raw_len": r.raw_len, "compression": r.compression}
                        for h, r in recs.items() if h not in have]
                if rows:
                    conn.execute(insert(table), rows)

    def _guard(self, fn, *a):
        """Run a write step; any failure aborts the writer (nothing half-committed)."""
        try:
            return fn(*a)
        except BaseException as e:
            self.abort()
            raise _translate(e, self.repo) from e

    def _release(self) -> None:
        for lk in reversed(self._locks):
            lk.release()
        self._locks.clear()


def _inheritable(parent_size: int, size: int, cs: int) -> int:
    """Positions [0, n) whose byte length is the same in parent and child."""
    pn, n = (parent_size + cs - 1) // cs, (size + cs - 1) // cs
    if parent_size == size:
        return n
    k = min(pn, n)
    if k and maps.chunk_len(k - 1, parent_size, cs) != maps.chunk_len(k - 1, size, cs):
        k -= 1
    return k


def _translate(e: BaseException, repo) -> BaseException:
    """Index and OS errors met while writing -> the documented error classes (errors.storage_error
    and indexerrors.index_error: the one mapping, shared with index open, locks and rebuild)."""
    if isinstance(e, OSError):
        return storage_error(e.errno, e.filename or repo.path, "writing a backup") or e
    if isinstance(e, SQLAlchemyError):
        return index_error(e, "writing the index", path=index_path(repo.engine),
                           damaged_hint="nothing was committed; `nbdbackup verify` checks the repository")
    return e


def commit_writers(repo: "Repository", writers: Sequence[BackupWriter], *, read_bytes=None, duration_s=None,
                   created=None, set_id: str | None = None) -> list[BackupInfo]:
    """Commit *writers* in ONE index transaction with one created time and set id."""
    if not writers:
        return []
    for w in writers:
        w._check_open()
    if len({w.disk for w in writers}) != len(writers):
        raise UsageError("a set holds at most one backup per disk")
    n = len(writers)
    rb = list(read_bytes) if read_bytes is not None else [0] * n
    ds = list(duration_s) if isinstance(duration_s, (list, tuple)) else [float(duration_s or 0.0)] * n
    created = now_ms() if created is None else from_ms(to_ms(created))   # aware UTC, whole ms (naive = UTC)
    if n > 1:
        set_id = set_id or next((w.set_id for w in writers if w.set_id), None) or uuid.uuid4().hex[:16]
    ids: set[str] = set()
    try:
        staged = []
        for i, w in enumerate(writers):
            refs = w._finish_map()
            bid = new_backup_id(created)
            while bid in ids:
                bid = new_backup_id(created)
            ids.add(bid)
            info = BackupInfo(id=bid, disk=w.disk, kind=w.kind, parent=w.parent.id if w.parent else None,
                              created=created, size=w.size, chunk_size=w.chunk_size, read_bytes=int(rb[i]),
                              stored_bytes=w.stored_bytes, duration_s=float(ds[i]), bitmap=w.bitmap,
                              checkpoint=w.checkpoint, set_id=set_id if n > 1 else (set_id or w.set_id),
                              source=w.source)
            manifest = encode_manifest(info, w._seg_len, refs)
            mh = hash_bytes(manifest)
            comp, payload = compress_blob(manifest, w._level)
            w._pack_add(P.REC_MANIFEST, mh, len(manifest), comp, payload)
            w._seal_and_wait()
            staged.append((w, info, refs, mh))
        with write_txn(repo.engine) as conn:
            for w, info, refs, mh in staged:
                pk = conn.execute(insert(backups).values(
                    id=info.id, disk=info.disk, kind=info.kind, parent=info.parent,
                    created_ms=to_ms(info.created), size=info.size, chunk_size=info.chunk_size,
                    read_bytes=info.read_bytes, stored_bytes=info.stored_bytes, duration_s=info.duration_s,
                    bitmap=info.bitmap, checkpoint=info.checkpoint, set_id=info.set_id, source=info.source,
                    manifest_hash=mh)).inserted_primary_key[0]
                if refs:
                    conn.execute(insert(backup_segments),
                                 [{"backup_pk": pk, "seq": s, "segment_hash": r} for s, r in enumerate(refs)])
    except BaseException as e:
        for w in writers:
            w.abort()
        err = _translate(e, repo)
        if err is e:
            raise
        raise err from e
    for w in writers:
        w._state = "committed"
        w._stop_sealer()
        w._release()
    return [info for _, info, _, _ in staged]


__all__ = ["BackupWriter", "commit_writers"]
