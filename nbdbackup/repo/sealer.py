"""PackSealer: fills one pack and seals full ones in the background.

A sealed pack is written to tmp/, fsync'ed, renamed into packs/<xx>/ and only
then are its records indexed (one transaction per pack): the write-order
invariant of docs/design.md. The pack row and its record rows carry the
writer's lease start epoch (packs.epoch, used_epoch): gc keeps them while the
writer lives. Up to SEALS_IN_FLIGHT sealed packs are being
written at once (their fsyncs overlap the hashing of the next pack), fewer when
their buffers would pass PACK_MEMORY (large packs or chunks); until a
pack is indexed its records still count as present (has_chunk, segment), so
a chunk is never stored twice by one writer.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import insert

from .chunks import PreparedChunk
from .context import RepoContext
from .damage import heal_rows
from .dedup import upsert_rows
from .ids import now_ms, to_ms
from .indexretry import has_row, retry_write
from .packs import (
    ENTRY_SIZE,
    HEADER_SIZE,
    REC_CHUNK,
    REC_MANIFEST,
    REC_SEGMENT,
    TRAILER_SIZE,
    BufferPool,
    PackBuilder,
    pack_object_name,
    write_pack,
)
from .schema import chunks, packs, segments
from .store import record_row

log = logging.getLogger(__name__)

PACK_RECORDS = 32768     # seal a pack at this many records even if small (bounds memory and footer size)
SEALS_IN_FLIGHT = 3      # packs written + fsync'ed + indexed at once in the background (fsyncs overlap)
# Pack buffers' bound, the one being filled included: 32 MiB packs get 1 + 2 (16 MiB ones,
# on S3, 1 + 3), so that a backup stays under 256 MiB RSS at every chunk size.
PACK_MEMORY = 100 << 20


def seals_in_flight(pack_size: int, chunk_size: int) -> int:
    """Sealed packs written at once: SEALS_IN_FLIGHT, or fewer (at least 1) when their
    buffers and the one being filled would hold more than PACK_MEMORY."""
    filled = max(pack_size, HEADER_SIZE + chunk_size)   # a pack's bytes at its seal (PackSealer._add)
    return max(1, min(SEALS_IN_FLIGHT, PACK_MEMORY // filled - 1))


@dataclass
class SealJob:
    """The records of one pack: being filled (no *future* yet), or sealed and being written and
    indexed by a background thread. They count as present until *future* is done (then the
    index has them)."""
    future: Future | None = None
    chunks: set[bytes] = field(default_factory=set)
    segments: dict[bytes, bytes] = field(default_factory=dict)    # hash -> raw, for map reads meanwhile


class PackSealer:
    def __init__(self, ctx: RepoContext, chunk_size: int, epoch: int = 0):
        self._ctx = ctx
        self.epoch = epoch      # the writer's lease start epoch: stamped on its packs and rows
        self.heal: dict[str, set[bytes]] = {}   # table name -> damaged ids whose rows move to our copy
        self._pack_size = ctx.config.pack_size
        self._pack: PackBuilder | None = None         # the pack being filled
        self._filling = SealJob()                     # its chunks and segments
        self._writing: deque[SealJob] = deque()       # sealed, oldest first
        self._executor: ThreadPoolExecutor | None = None
        self._stopped = False
        # pack buffers: one being filled, self.seals being written. A pack is sealed before a
        # record would take it past pack_size (so a buffer holds at most pack_size bytes of
        # records, or one record larger than that), and its footer lists at most PACK_RECORDS
        # records (pages never touched cost nothing).
        self.seals = seals_in_flight(self._pack_size, chunk_size)
        self._buffers = BufferPool(max(self._pack_size, HEADER_SIZE + chunk_size) + PACK_RECORDS * ENTRY_SIZE
                                   + TRAILER_SIZE, keep=self.seals + 1)
        self.stored_bytes = 0     # record bytes of chunks and segments (manifests not counted)

    # -- what is stored but maybe not indexed yet -------------------------------
    def has_chunk(self, h: bytes) -> bool:
        return h in self._filling.chunks or any(h in job.chunks for job in self._writing)

    def segment(self, h: bytes) -> bytes | None:
        """The raw bytes of map segment *h* when it is in a pack not indexed yet."""
        raw = self._filling.segments.get(h)
        for job in self._writing:
            raw = raw or job.segments.get(h)
        return raw

    def has_segment(self, h: bytes) -> bool:
        return h in self._filling.segments or any(h in job.segments for job in self._writing)

    # -- adding records --------------------------------------------------------
    def add_chunk(self, p: PreparedChunk) -> None:
        self._make_room(len(p.payload))
        self._filling.chunks.add(p.hash)
        self._add(REC_CHUNK, p.hash, p.raw_len, p.compression, p.payload, p.flags)

    def add_segment(self, h: bytes, raw: bytes, compression: int, payload: bytes) -> None:
        self._make_room(len(payload))
        self._filling.segments[h] = raw
        self._add(REC_SEGMENT, h, len(raw), compression, payload, self._ctx.codec.flags)

    def add_manifest(self, h: bytes, raw_len: int, compression: int, payload: bytes) -> None:
        """The last record of a backup: never seals by itself (the set commit seals and waits)."""
        self._builder().add(REC_MANIFEST, h, raw_len, compression, payload, self._ctx.codec.flags)

    def _builder(self) -> PackBuilder:
        if self._stopped:
            raise RuntimeError("pack sealer is stopped")
        if self._pack is None:
            self._pack = PackBuilder(pool=self._buffers)
        return self._pack

    def _make_room(self, payload_len: int) -> None:
        """Seal the pack being filled if a record of *payload_len* bytes would take it past
        pack_size (before the record is counted in it: see add_chunk)."""
        pack = self._pack
        if pack is not None and len(pack) and pack.size + HEADER_SIZE + payload_len > self._pack_size:
            self.seal()

    def _add(self, rtype: int, h: bytes, raw_len: int, compression: int, payload, flags: int) -> None:
        pack = self._builder()
        pack.add(rtype, h, raw_len, compression, payload, flags)
        self.stored_bytes += HEADER_SIZE + len(payload)
        if pack.size >= self._pack_size or len(pack) >= PACK_RECORDS:
            self.seal()

    # -- sealing ---------------------------------------------------------------
    def seal(self) -> None:
        """Hand the current pack to a background thread (waiting while self.seals are busy)."""
        while len(self._writing) >= self.seals:
            self._wait_oldest()
        pack, self._pack = self._pack, None
        if pack is None or not len(pack):
            if pack is not None:
                pack.release()
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.seals, thread_name_prefix="nbdbackup-seal")
        job, self._filling = self._filling, SealJob()
        job.future = self._executor.submit(self._write_pack, pack)
        self._writing.append(job)

    def seal_and_wait(self) -> None:
        """Seal the current pack and wait until every sealed pack is durable and indexed."""
        self.seal()
        while self._writing:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        try:
            self._writing[0].future.result()
        finally:
            self._writing.popleft()    # indexed now (or failed: the writer aborts)

    def _write_pack(self, pack: PackBuilder) -> None:
        """Make the pack durable, then index its records (in that order)."""
        try:
            size = write_pack(self._ctx.backend, pack_object_name(pack.name), pack)
        finally:
            pack.release()
        def index(conn):    # redone when the connection is lost before its COMMIT (indexretry)
            pid = conn.execute(insert(packs).values(name=pack.name, size=size, created_ms=to_ms(now_ms()),
                                                    epoch=self.epoch)).inserted_primary_key[0]
            for table, rtype in ((chunks, REC_CHUNK), (segments, REC_SEGMENT)):
                recs = {r.hash: r for r in pack.records if r.type == rtype}
                # a row another writer indexed meanwhile stays and is stamped (it is used now)
                rows = [record_row(pid, h, r) for h, r in recs.items()]
                upsert_rows(conn, table, rows, self.epoch)
                healing = self.heal.get(table.name)
                if healing:     # a fresh copy of a damaged record: its row points here from now on
                    heal_rows(conn, table, [r for r in rows if r["hash"] in healing], self.epoch)
        retry_write(self._ctx.index_db, index, landed=has_row(packs.c.name, pack.name))
        for table, rtype in ((chunks, REC_CHUNK), (segments, REC_SEGMENT)):
            healing = self.heal.get(table.name)
            if healing:     # healed: later puts of the same id deduplicate against our copy
                healing.difference_update(r.hash for r in pack.records if r.type == rtype)

    # -- ending ----------------------------------------------------------------
    def discard(self) -> None:
        """Drop the pack being filled (abort: nothing of it is written)."""
        pack, self._pack = self._pack, None
        if pack is not None:
            pack.release()

    def stop(self) -> None:
        """Wait for the background seals (their packs are orphans now, or committed data) and stop
        the threads. Idempotent."""
        writing, self._writing = self._writing, deque()
        for job in writing:
            try:
                job.future.result()
            except BaseException as e:   # the failure that caused the abort is reported elsewhere
                log.debug("background pack write failed during abort: %s", e)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._buffers.close()
        self._stopped = True
