"""BackupWriter: turns prepared chunks into packs, map segments and a backup.

Write order (the durability invariant): a pack is fsync'ed and renamed into
place before the index rows naming its records commit (at each pack seal,
repo/sealer.py); the backup row and its map rows commit last, in one
transaction (repo/setcommit.py), so a backup is visible only when complete.
A killed run leaves only orphans (sealed packs whose chunks no backup uses),
which gc reclaims.

gc runs beside it (docs/design.md "gc beside everything"): the writer holds a
lease (repo/leases.py) pinning its parent, and stamps its lease's start epoch
on every chunk and segment row it adds (repo/sealer.py) or reuses by dedup
(repo/dedup.py stamp_existing); the set commit checks the lease still exists.

Memory stays bounded: only the map segments near the current position are
open (repo/mapbuilder.py); dedup lookups are batched (repo/dedup.py); one
pack is filled while a few sealed ones are written.
"""

from __future__ import annotations

from ..errors import UsageError
from . import maps, vmstore
from .backuprows import checked_segment_refs
from .chunks import ZERO_REF, PreparedChunk
from .context import RepoContext
from .damage import marked_ids
from .dedup import DedupBatch, stamp_existing
from .ids import check_disk_name
from .indexerrors import write_error
from .info import BackupInfo
from .leases import Lease
from .mapbuilder import MapBuilder, inheritable_positions
from .packs import REC_MANIFEST, REC_SEGMENT
from .schema import chunks, segments
from .sealer import PackSealer
from .setcommit import commit_writers


class BackupWriter:
    def __init__(self, ctx: RepoContext, disk: str, *, kind: str, size: int,
                 parent: BackupInfo | None = None, bitmap: str | None = None,
                 checkpoint: str | None = None, set_id: str | None = None, source: str | None = None,
                 preserve: BackupInfo | None = None):
        """*preserve* (nbdbackup copy): the backup this one copies; its id, kind, parent, created and
        set_id are committed instead of new ones (*parent* is then only what the map inherits from)."""
        check_disk_name(disk)
        if kind not in ("full", "incremental"):
            raise UsageError(f"backup kind must be 'full' or 'incremental', not {kind!r}")
        if not isinstance(size, int) or size < 0:
            raise UsageError(f"invalid disk size {size!r}")
        chunk_size = ctx.config.chunk_size
        if kind == "incremental":
            if parent is None:
                raise UsageError("an incremental backup needs a parent backup")
            if parent.disk != disk:
                raise UsageError(f"parent {parent.id} is a backup of disk {parent.disk!r}, not {disk!r}")
            if parent.chunk_size != chunk_size:
                raise UsageError(f"parent {parent.id} has chunk size {parent.chunk_size}, "
                                 f"the repository {chunk_size}")
        self.ctx = ctx
        self.disk, self.kind, self.size, self.parent = disk, kind, size, parent
        self.bitmap, self.checkpoint, self.set_id, self.source = bitmap, checkpoint, set_id, source
        self.preserve = preserve
        self.chunk_size = chunk_size
        self.nchunks = (size + chunk_size - 1) // chunk_size
        self.segment_len = ctx.config.segment_len
        self.compression_level = ctx.config.compression_level
        self.codec = ctx.codec      # every id, record and blob of this backup goes through it
        self._state = "open"        # open -> committed | aborted
        self._locks = []
        self._sealer = PackSealer(ctx, chunk_size)
        self._batch = DedupBatch(is_pending=self._sealer.has_chunk, indexed=self._stamp_chunks,
                                 store=self._sealer.add_chunk)
        self.lease: Lease | None = None
        try:
            self._locks.append(ctx.lock("writers", exclusive=False, purpose="the repository's writer lock"))
            self._locks.append(ctx.lock(f"disk-{disk}", exclusive=True,
                                        purpose=f"the lock of disk {disk!r} (another backup of it runs)"))
            # the lease (with the parent pinned: no forget, so no gc, takes it from us) before the parent's map
            # is read; its start epoch is stamped on every record this writer adds or reuses
            self.lease = Lease(ctx.index_db, "backup", pins=[parent.id] if parent is not None else [])
            self._locks.append(self.lease)
            self._sealer.epoch = self.lease.start_epoch
            # ids a verify found damaged: never deduplicated against, so a fresh copy heals them
            # (one query per writer; the table is nearly always empty)
            self._damaged = marked_ids(ctx.index_db)
            self._sealer.heal = {chunks.name: self._damaged["chunk"], segments.name: self._damaged["segment"]}
            parent_refs = checked_segment_refs(ctx, parent) if parent is not None else []
        except BaseException:
            self._sealer.stop()
            self._release()
            raise
        self._map = MapBuilder(
            self.nchunks, self.segment_len, parent_refs=parent_refs,
            parent_nchunks=parent.nchunks if parent is not None else 0,
            inherit_upto=inheritable_positions(parent.size, size, chunk_size) if parent is not None else 0,
            load=self._load_segment, is_stored=self._segment_stored, store=self._store_segment,
            hash=self.codec.hash)
        self._open = self._map.open     # the open segments (tests watch their number)

    @property
    def stored_bytes(self) -> int:
        """Record bytes of the chunks and map segments this writer stored."""
        return self._sealer.stored_bytes

    # -- worker threads -------------------------------------------------------
    def prepare(self, data, compress: bool = True) -> PreparedChunk:
        """Zero check, id, zstd (unless not *compress*: stored raw), sealing when the repository
        is encrypted: the codec's prepare. Thread-safe; releases the GIL in blake3/zstd/AES-GCM."""
        return self.codec.prepare(data, self.compression_level, compress)

    # -- main thread ----------------------------------------------------------
    def put(self, index: int, prepared: PreparedChunk | None) -> None:
        """Record chunk *index*. Its payload may be a view of the caller's buffer:
        keep that buffer unchanged until flush() (or commit) returns."""
        self.check_open()
        if not 0 <= index < self.nchunks:
            raise ValueError(f"chunk index {index} out of range 0..{self.nchunks - 1}")
        if prepared is None or prepared.is_zero:
            self._set(index, ZERO_REF)
            return
        want = maps.chunk_len(index, self.size, self.chunk_size)
        if prepared.raw_len != want:
            raise ValueError(f"chunk {index} has {prepared.raw_len} bytes, expected {want}")
        if prepared.flags != self.codec.flags:      # its id and record are another codec's
            raise ValueError(f"chunk {index} was prepared by another repository's codec")
        self._set(index, prepared.hash)
        if self._batch.add(prepared):
            self._guard(self._batch.flush)

    def put_zero(self, index: int) -> None:
        self.put(index, None)

    def flush(self) -> None:
        """Look up and copy into the pack every chunk put so far: no payload given
        to put() is referenced any more."""
        self.check_open()
        self._guard(self._batch.flush)

    def abort(self) -> None:
        """Drop everything not committed; committed data is untouched. Idempotent."""
        if self._state == "committed":
            return
        self._state = "aborted"
        self._batch.clear()
        self._sealer.discard()
        self._map.clear()
        try:
            self._sealer.stop()
        finally:
            self._release()

    def commit(self, *, read_bytes: int, duration_s: float, created=None, vm=None) -> BackupInfo:
        """*vm*: the VmDefinition to store with it (repo/vmstore.py), or None."""
        return commit_writers(self.ctx, [self], read_bytes=[read_bytes], duration_s=[duration_s],
                              created=created, set_id=self.set_id, vm=vm)[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self._state == "open":
            self.abort()

    # -- the set commit's steps (repo/setcommit.py) ----------------------------
    def check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"writer is {self._state}")

    def finish_map(self) -> list[bytes | None]:
        """Store every chunk put and finalize every segment; the backup's segment list."""
        self._batch.flush()
        return self._map.finish()

    def write_manifest(self, manifest: bytes) -> bytes:
        """Store *manifest* as the last record and wait until every pack is durable and
        indexed; the manifest's hash."""
        h, comp, payload = self.codec.encode_blob(REC_MANIFEST, manifest, self.compression_level)
        self._sealer.add_manifest(h, len(manifest), comp, payload)
        self._sealer.seal_and_wait()
        return h

    def store_vm_definition(self, encoded: bytes) -> str:
        """Store a VM definition's encoding as chunk records listed by one segment record
        (repo/vmstore.py), deduplicated and stamped with this writer's lease like its own
        chunks; the `vm` reference naming it."""
        self.check_open()
        return self._guard(self._store_pieces, encoded)

    def mark_committed(self) -> None:
        """The set commit's transaction committed: stop the sealer and release the locks."""
        self._state = "committed"
        self._sealer.stop()
        self._release()

    # -- internals ------------------------------------------------------------
    def _set(self, index: int, ref: bytes) -> None:
        for seq in self._map.set(index, ref):
            self._guard(self._map.finalize, seq)

    def _load_segment(self, h: bytes) -> bytes:
        raw = self._sealer.segment(h)
        return raw if raw is not None else self.ctx.store.load_segment(h)

    def _segment_stored(self, h: bytes) -> bool:
        if self._sealer.has_segment(h):
            return True
        return h not in self._damaged["segment"] and bool(stamp_existing(self.ctx.index_db, segments, [h],
                                                                         self.lease.start_epoch))

    def _stamp_chunks(self, hashes: list[bytes]) -> set[bytes]:
        have = stamp_existing(self.ctx.index_db, chunks, hashes, self.lease.start_epoch)
        return have - self._damaged["chunk"] if self._damaged["chunk"] else have

    def _store_segment(self, h: bytes, raw: bytes) -> None:
        h2, comp, payload = self.codec.encode_blob(REC_SEGMENT, raw, self.compression_level)
        assert h2 == h, "segment id computed by another codec"
        self._sealer.add_segment(h, raw, comp, payload)

    def _store_pieces(self, encoded: bytes) -> str:
        entries = bytearray()
        for piece in vmstore.pieces(encoded, self.chunk_size):
            p = self.codec.prepare(piece, self.compression_level)
            entries += p.hash
            if not p.is_zero and self._batch.add(p):
                self._batch.flush()
        self._batch.flush()
        raw = bytes(entries)
        h = self.codec.hash(raw)
        if not self._segment_stored(h):
            self._store_segment(h, raw)
        return vmstore.ref_of(h)

    def _guard(self, fn, *a):
        """Run a write step; any failure aborts the writer (nothing half-committed)."""
        try:
            return fn(*a)
        except BaseException as e:
            self.abort()
            raise write_error(e, self.ctx.path, self.ctx.index_db) from e

    def _release(self) -> None:
        for lk in reversed(self._locks):
            lk.release()
        self._locks.clear()


__all__ = ["BackupWriter", "commit_writers"]
