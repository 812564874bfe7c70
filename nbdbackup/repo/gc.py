"""gc: mark and sweep, with repacking of sparse packs, beside running backups and readers.

The invariants (docs/design.md "gc beside everything"): gc holds only the gc lock
(one gc at a time); it first bumps gc_state.epoch to G and, after deleting dead
leases, takes the cutoff C = min(G, start epoch of every live backup lease)
(repo/leases.py begin_gc). Live = referenced by a committed backup (read AFTER
that step) OR a row with used_epoch >= C OR in a pack with epoch >= C: what a
running writer added or reused carries its start epoch S >= C. Every delete of a
row repeats the guard `used_epoch < C` in the statement itself, so a writer that
stamps a row meanwhile wins (row locks on PostgreSQL, serialised writes on
SQLite); a pack row goes only when no row names it (same transaction), its
object only after that commit. Orphan objects (unknown to the index) and
unfinished uploads go only when older than --grace and than the oldest live
backup lease (minus CLOCK_SKEW_S). Every removal is ordered so a crash leaves
only orphans: index rows first, objects after; a repacked pack is durable and
the index switched to it before an old pack is deleted. gc refuses to sweep when
it cannot read a live map segment; it never deletes a pack whose footer it
cannot read while the index still points into it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, exists, select, update

from ..errors import LockedError, NoSpaceError, RepoDamaged
from ..progress import NoBar
from . import maps, vmstore
from .chunks import ZERO_REF, DecodeError
from .damage import forget_deleted
from .ids import now_ms, to_ms
from .index import write_txn
from .indexerrors import index_errors
from .leases import CLOCK_SKEW_S, begin_gc
from .orphans import remove_orphans
from .packs import (
    HEADER_SIZE,
    REC_CHUNK,
    REC_MANIFEST,
    REC_SEGMENT,
    BufferPool,
    PackBuilder,
    PackFormatError,
    RecordInfo,
    pack_object_name,
    read_records,
)
from .schema import backup_segments, backups, chunks, packs, segments

log = logging.getLogger(__name__)

_IN_BATCH = 500
# Orphans (objects the index does not name) and unfinished uploads younger than this stay. Leases
# already protect what a live writer writes; the grace covers what leases cannot see: clocks
# further apart than CLOCK_SKEW_S, an upload a killed host's storage finishes late, or a user
# copying packs in by hand. One hour costs at most an hour of a killed run's leftovers.
DEFAULT_GRACE_S = 3600.0


@dataclass
class GcReport:
    dry_run: bool = False
    live_chunks: int = 0
    live_segments: int = 0
    chunks_deleted: int = 0
    segments_deleted: int = 0
    packs_deleted: int = 0            # packs with nothing live
    packs_repacked: int = 0           # rewritten because sparse or holding dead manifests
    packs_written: int = 0
    orphan_packs: int = 0             # pack files the index does not know (killed runs)
    tmp_files: int = 0
    bytes_reclaimed: int = 0
    skipped_damaged: list[str] = field(default_factory=list)
    epoch: int = 0                    # G: this run's epoch
    cutoff: int = 0                   # C: rows/packs with an epoch >= C were kept as in use
    dead_leases: int = 0              # leases of killed runs deleted
    live_leases: list[str] = field(default_factory=list)
    kept_in_use: int = 0              # rows kept only because a running writer stamped them
    young_packs: int = 0              # packs kept (not deleted or repacked) because a running writer made them
    young_orphans: int = 0            # orphan objects left because younger than the grace or a live writer
    incomplete_uploads: int = 0       # unfinished uploads / temp files removed

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Pack:
    id: int
    name: str
    size: int
    epoch: int = 0
    records: list[RecordInfo] | None = None   # from the footer; None when unreadable
    live_bytes: int = 0
    record_bytes: int = 0        # headers + payloads of every record (the footer is overhead)
    dead_manifests: int = 0


def collect(repo, *, repack_threshold: float = 0.5, dry_run: bool = False, progress=None,
            grace: float = DEFAULT_GRACE_S) -> GcReport:
    """Run gc on *repo* (waits up to repo.lock_wait for the gc lock; backups and readers may run).

    *progress*(total, desc, unit), when given, returns a bar (update(n), close()) for a phase.
    *grace*: seconds an orphan object or unfinished upload is left alone (0: reclaim at once)."""
    rep = GcReport(dry_run=dry_run)
    try:
        lk = repo.lock("gc", exclusive=True, purpose="exclusive access for gc (one gc at a time)")
    except LockedError as e:
        raise LockedError(f"another gc is running, so gc cannot run now: {e}", hint=e.hint) from None
    try:
        with lk, index_errors("gc", repo):
            return _collect(repo, rep, repack_threshold, progress, max(grace, 0.0))
    except NoSpaceError as e:
        if not rep.packs_repacked:
            raise
        # the sweep ran first, so what was unreferenced is gone; only a repack needs room
        hint = ("a repack writes the live data of sparse packs into a new pack before it deletes them, "
                "so it needs room for one pack; `nbdbackup gc --repack-threshold 0` rewrites no sparse pack "
                "and so needs no room for them (only a pack holding a forgotten backup's manifest is still "
                "rewritten)")
        if repack_threshold == 0:
            hint = ("even with --repack-threshold 0 a pack holding a forgotten backup's manifest is rewritten "
                    "(so that rebuild-index cannot bring the backup back); free room for one pack "
                    f"(about {repo.config.pack_size:,} bytes) and run gc again")
        raise NoSpaceError(f"{e}; gc had already deleted every unreferenced pack "
                           f"({rep.bytes_reclaimed} bytes reclaimed) when a repack ran out of room",
                           hint=hint) from None


def _collect(repo, rep: GcReport, threshold: float, progress, grace: float) -> GcReport:
    dry_run = rep.dry_run
    eng, backend, store = repo.index_db, repo.backend, repo.store

    # -- a new epoch; dead leases go; the cutoff (before the mark: see the module docstring) ----
    st = begin_gc(eng, dry_run=dry_run)
    cut = st["cutoff"]
    rep.epoch, rep.cutoff, rep.dead_leases, rep.live_leases = st["epoch"], cut, st["dead_leases"], st["live_leases"]
    older_than = (st["now_ms"] / 1000) - grace         # orphans: by the grace...
    if st["oldest_writer_ms"] is not None:            # ...and never what a live writer may be writing
        older_than = min(older_than, st["oldest_writer_ms"] / 1000 - CLOCK_SKEW_S)

    # -- mark ---------------------------------------------------------------
    with eng.connect() as conn:
        live_manifests = {bytes(r[0]) for r in conn.execute(select(backups.c.manifest_hash))}
        live_segs = {bytes(r[0]) for r in conn.execute(
            select(backup_segments.c.segment_hash).where(backup_segments.c.segment_hash.is_not(None)).distinct())}
        # a VM definition is a segment listing chunks (repo/vmstore.py): marked like a map's
        live_segs.update(vmstore.segment_of(r[0]) for r in conn.execute(
            select(backups.c.vm).where(backups.c.vm.is_not(None)).distinct()))
    live_chunks: set[bytes] = set()
    bar = _bar(progress, len(live_segs), "gc: mark", "segment")
    for h in live_segs:
        try:
            raw = store.load_segment(h)
        except RepoDamaged as e:
            raise RepoDamaged(f"gc cannot read live map segment {h.hex()[:16]} ({e}); it will not delete "
                              "anything while it cannot tell which chunks are live",
                              hint="run `nbdbackup verify`, forget the damaged backups or run "
                                   "`nbdbackup rebuild-index`, then gc again") from None
        live_chunks.update(maps.iter_entries(raw))
        bar.update(1)
    bar.close()
    live_chunks.discard(ZERO_REF)
    rep.live_chunks, rep.live_segments = len(live_chunks), len(live_segs)

    # -- what the index holds ---------------------------------------------------
    live_of = {"chunks": set(), "segments": set()}          # live rows: referenced or in use (stamped)
    with eng.connect() as conn:
        pack_rows = {r[0]: _Pack(r[0], r[1], r[2], r[3])
                     for r in conn.execute(select(packs.c.id, packs.c.name, packs.c.size, packs.c.epoch))}
        dead_rows: dict = {chunks: [], segments: []}
        for table, live in ((chunks, live_chunks), (segments, live_segs)):
            q = select(table.c.hash, table.c.pack_id, table.c.stored_len, table.c.used_epoch)
            for h, pid, sl, used in conn.execute(q):
                h = bytes(h)
                pk = pack_rows.get(pid)
                if h in live or used >= cut:
                    live_of[table.name].add(h)
                    rep.kept_in_use += h not in live
                    if pk is not None:
                        pk.live_bytes += HEADER_SIZE + sl
                else:
                    dead_rows[table].append(h)
    rep.chunks_deleted, rep.segments_deleted = len(dead_rows[chunks]), len(dead_rows[segments])
    young = {pk.id for pk in pack_rows.values() if pk.epoch >= cut}   # a running writer's: left alone
    rep.young_packs = len(young)

    # footers: find manifest records (live ones must survive, dead ones go)
    for pk in pack_rows.values():
        if pk.id in young:
            continue
        try:
            pk.records = read_records(backend, pk.name)
        except FileNotFoundError:
            if pk.live_bytes:
                rep.skipped_damaged.append(f"pack {pk.name} is missing but still holds live data")
            continue
        except (PackFormatError, OSError) as e:
            rep.skipped_damaged.append(f"pack {pk.name}: unreadable footer ({e}); left as it is")
            continue
        pk.record_bytes = sum(HEADER_SIZE + r.stored_len for r in pk.records)
        for rec in pk.records:
            if rec.type == REC_MANIFEST:
                if rec.hash in live_manifests:
                    pk.live_bytes += HEADER_SIZE + rec.stored_len
                else:
                    pk.dead_manifests += 1

    # a pack whose footer is unreadable may hold live manifests: never deleted
    old = [pk for pk in pack_rows.values() if pk.id not in young]
    dead_packs = [pk for pk in old if pk.live_bytes == 0 and
                  (pk.records is not None or not backend.exists(pack_object_name(pk.name)))]
    sparse = [pk for pk in old if pk.live_bytes and pk.records is not None and
              (pk.live_bytes < threshold * pk.record_bytes or pk.dead_manifests)]

    # -- sweep the index, then the files it no longer names ----------------------
    if not dry_run:
        gone = _delete_rows(eng, dead_rows, [pk.id for pk in dead_packs], cut, rep)
        dead_packs = [pk for pk in dead_packs if pk.id in gone]
    rep.packs_deleted = len(dead_packs)
    for pk in dead_packs:
        rep.bytes_reclaimed += _remove(backend, pack_object_name(pk.name), dry_run)

    # -- orphans: objects the index does not know (killed runs), old enough -------------
    o = remove_orphans(repo, older_than, dry_run)
    rep.orphan_packs, rep.young_orphans, rep.incomplete_uploads = o.removed, o.young, o.incomplete
    rep.tmp_files = o.incomplete
    rep.bytes_reclaimed += o.bytes

    # -- repack ---------------------------------------------------------------------
    bar = _bar(progress, sum(pk.live_bytes for pk in sparse), "gc: repack", "B")
    rows = _live_rows(eng, [pk.id for pk in sparse], live_of)
    for group in _groups(sparse, repo.config.pack_size):
        rep.bytes_reclaimed += _repack(repo, group, rows, live_manifests, dry_run, rep, bar, cut)
    bar.close()
    return rep


def _bar(progress, total: int, desc: str, unit: str):
    return progress(total, desc, unit) if progress is not None else NoBar()


def _live_rows(eng, pack_ids: list[int], live_of: dict[str, set[bytes]]) -> dict:
    """(table name, hash) -> (pack id, offset) of the live rows in packs *pack_ids*."""
    rows = {}
    with eng.connect() as conn:
        for table in (chunks, segments):
            live = live_of[table.name]
            for i in range(0, len(pack_ids), _IN_BATCH):
                q = select(table.c.hash, table.c.pack_id, table.c.offset).where(
                    table.c.pack_id.in_(pack_ids[i:i + _IN_BATCH]))
                for h, pid, off in conn.execute(q):
                    if bytes(h) in live:
                        rows[(table.name, bytes(h))] = (pid, off)
    return rows


def _delete_unnamed_packs(conn, pack_ids: list[int]) -> set[int]:
    """Delete the pack rows of *pack_ids* that no chunk or segment row names; the ids deleted."""
    gone: set[int] = set()
    for i in range(0, len(pack_ids), _IN_BATCH):
        part = pack_ids[i:i + _IN_BATCH]
        unnamed = and_(packs.c.id.in_(part), ~exists().where(chunks.c.pack_id == packs.c.id),
                       ~exists().where(segments.c.pack_id == packs.c.id))
        gone.update(r[0] for r in conn.execute(select(packs.c.id).where(unnamed)))
        conn.execute(delete(packs).where(unnamed))
    return gone


def _delete_rows(eng, dead_rows: dict, pack_ids: list[int], cut: int, rep: GcReport) -> set[int]:
    """Delete the dead rows (guarded: a row a writer stamped meanwhile stays; the report counts
    the rows really deleted) and the pack rows of *pack_ids* nothing names any more, in one
    transaction; the pack ids deleted."""
    with write_txn(eng) as conn:
        n = {}
        for table, hashes in dead_rows.items():
            n[table.name] = 0
            for i in range(0, len(hashes), _IN_BATCH):
                n[table.name] += conn.execute(delete(table).where(table.c.hash.in_(hashes[i:i + _IN_BATCH]),
                                                                  table.c.used_epoch < cut)).rowcount
            forget_deleted(conn, table, hashes)      # a deleted record's damage mark means nothing now
        gone = _delete_unnamed_packs(conn, pack_ids)
    rep.chunks_deleted, rep.segments_deleted = n["chunks"], n["segments"]
    return gone


def _remove(backend, obj: str, dry_run: bool) -> int:
    try:
        n = backend.size(obj)
    except FileNotFoundError:
        return 0
    if not dry_run:
        backend.delete(obj)
    return n


def _groups(sparse: list[_Pack], target: int):
    """Batch sparse packs so each new pack holds about *target* live bytes."""
    group, size = [], 0
    for pk in sorted(sparse, key=lambda p: p.id):
        if group and size + pk.live_bytes > target:
            yield group
            group, size = [], 0
        group.append(pk)
        size += pk.live_bytes
    if group:
        yield group


def _repack(repo, group: list[_Pack], rows: dict, live_manifests: set[bytes], dry_run: bool,
            rep: GcReport, bar, cut: int) -> int:
    """Copy the live records of *group* into one new pack; switch the index; delete the old packs."""
    old_bytes = sum(pk.size for pk in group)
    builder = PackBuilder(pool=BufferPool(repo.config.pack_size + (1 << 20), keep=0))
    try:
        return _repack_into(repo, builder, group, rows, live_manifests, dry_run, rep, bar, old_bytes, cut)
    finally:
        builder.release()


def _repack_into(repo, builder: PackBuilder, group: list[_Pack], rows: dict, live_manifests: set[bytes],
                 dry_run: bool, rep: GcReport, bar, old_bytes: int, cut: int) -> int:
    backend = repo.backend
    moved: list[tuple[str, bytes, RecordInfo]] = []     # (table name, hash, new record)
    seen_manifests: set[bytes] = set()
    for pk in group:
        obj = pack_object_name(pk.name)
        for rec in pk.records:
            if rec.type == REC_CHUNK:
                table = "chunks"
            elif rec.type == REC_SEGMENT:
                table = "segments"
            elif rec.type == REC_MANIFEST:
                table = None
                if rec.hash not in live_manifests or rec.hash in seen_manifests:
                    continue
                seen_manifests.add(rec.hash)
            else:
                continue
            if table is not None and rows.get((table, rec.hash)) != (pk.id, rec.offset):
                continue                          # dead, or a duplicate the index does not use
            payload = backend.get(obj, rec.offset, rec.stored_len)
            try:
                # opened (encrypted) and checked, never re-sealed: the record is copied byte for byte,
                # its header (the AAD) with it, so it opens in the new pack as in the old
                repo.codec.decode(rec.type, rec.compression, rec.raw_len, rec.hash, payload, flags=rec.flags)
            except DecodeError as e:
                rep.skipped_damaged.append(f"pack {pk.name} record at {rec.offset}: {e}; pack not repacked")
                return 0                        # keep every old pack of this group as it is
            new = builder.add(rec.type, rec.hash, rec.raw_len, rec.compression, payload, rec.flags)
            if table is not None:
                moved.append((table, rec.hash, new))
            bar.update(HEADER_SIZE + rec.stored_len)
    ids = {pk.id for pk in group}
    expected = {key for key, (pid, _off) in rows.items() if pid in ids}
    if expected != {(t, h) for t, h, _ in moved}:
        rep.skipped_damaged.append(f"packs {', '.join(pk.name for pk in group)}: footer and index disagree; "
                                   "not repacked (run `nbdbackup verify`)")
        return 0
    buf, new_size = builder.seal()
    rep.packs_repacked += len(group)
    if dry_run:
        return old_bytes - new_size
    backend.put_aligned(pack_object_name(builder.name), buf, new_size)   # durable before the index names it
    with write_txn(repo.index_db) as conn:
        pid = conn.execute(packs.insert().values(name=builder.name, size=new_size, created_ms=to_ms(now_ms()),
                                                 epoch=rep.epoch)).inserted_primary_key[0]
        tables = {"chunks": chunks, "segments": segments}
        old_ids = [pk.id for pk in group]
        for tname, h, new in moved:
            t = tables[tname]
            was = rows[(tname, h)]
            conn.execute(update(t).where(t.c.hash == h, t.c.pack_id == was[0], t.c.offset == was[1])
                         .values(pack_id=pid, offset=new.offset))
        for t in tables.values():     # rows still naming the old packs: dead, unless a writer stamped one
            conn.execute(delete(t).where(t.c.pack_id.in_(old_ids), t.c.used_epoch < cut))
        gone = _delete_unnamed_packs(conn, old_ids)
    rep.packs_written += 1
    for pk in group:
        if pk.id in gone:
            backend.delete(pack_object_name(pk.name))
    return sum(pk.size for pk in group if pk.id in gone) - new_size
