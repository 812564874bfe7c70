"""verify: re-read and re-hash what backups need; name the damage.

Under the shared readers lock (so gc cannot delete a pack under us): (0) on
SQLite, the index's own `PRAGMA integrity_check`; (1) every map segment of
the chosen backups (listed by a table scan, their maps read by row key: a
damaged id index must not hide a backup) is loaded and checked, collecting
the distinct chunk hashes, and each backup's index rows are compared with
its manifest record (repo/manifest.py, one record read per backup); (2) each distinct chunk (or a
random sample) is read once, decompressed and hashed, packs that are gone
are noticed without reading; (3) each backup's map is walked again and the
positions whose segment or chunk is bad become disk byte ranges. A backup
forgotten while verify runs is named in the report, never skipped silently.
Memory: the set of distinct chunk hashes, not the maps.

Damage marks (repo/damage.py): every chunk or map segment found bad is
recorded, so that the next backup storing the same bytes heals it; a marked
record this run reads fine is reported healed and its mark deleted. Marked
chunks are always read, whatever the sample. A full (unsampled) run stamps
backups.verified_ms on each backup it found clean; every run clears it on each
damaged one; `since_days` checks only backups not verified clean within that
many days, and always those naming a record with an unhealed mark (verify
--since). Chunks found bad are looked up again (gc may have moved them) before
they count as damage.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ..errors import RepoDamaged
from . import damage, maps, vmstore
from . import manifest as M
from .backuprows import info_columns, info_from_row, refs_from_rows
from .chunks import HASH_SIZE, ZERO_REF
from .ids import now_ms, to_ms
from .indexerrors import index_errors
from .info import BackupInfo
from .leases import Holds, reader_lease
from .packs import REC_CHUNK, pack_object_name
from .schema import backup_segments, backups
from .store import Location, RecordError
from .verifyreport import DamagedBackup, VerifyReport
from .verifystate import record_verified, update_marks

_BATCH = 1024        # chunk checks handed to the thread pool at once (in _READ_BATCH groups)
_THREADS = 4        # checks in flight: decoding needs the cores, S3 needs requests in flight


def verify(repo, refs: Iterable[str] | None = None, *, sample_percent: float | None = None,
           progress: Callable[[int], object] | None = None, rng: random.Random | None = None,
           since_days: float | None = None) -> VerifyReport:
    """Check the backups *refs* (ids or disk names; None = all). *progress*(total_bytes)
    returns an object with update(n), called as chunks are read. *since_days*: skip the
    backups a verify found clean within that many days."""
    lock = repo.lock("readers", exclusive=False, purpose="the repository's reader lock (rebuild-index runs)")
    try:
        with index_errors("verify", repo):    # a read lease pinning what is checked: gc keeps their data
            refs = [repo.resolve(r) for r in refs] if refs else None      # NotFound (exit 11) first
            lock = Holds(lock, reader_lease(repo.index_db, [b.id for b in refs or repo.list_backups()],
                                            missing_ok=True))
            return _verify(repo, refs, sample_percent, progress, rng or random.Random(), since_days)
    finally:
        lock.release()


def _verify(repo, refs, sample_percent, progress, rng, since_days=None) -> VerifyReport:
    report = VerifyReport(sample_percent=sample_percent, since_days=since_days)
    _integrity_check(repo, report)
    try:
        _verify_backups(repo, refs, sample_percent, progress, rng, report)
    except (RepoDamaged, SQLAlchemyError) as e:
        if not report.index_problems:
            raise           # an unreadable index: exit 9, pointing at rebuild-index
        report.index_problems.append(f"reading the index failed: {e}")   # the damage integrity_check named
    return report


def _integrity_check(repo, report: VerifyReport) -> None:
    """SQLite's own check of the index file (b-trees, indexes agree with their tables, NOT NULLs)."""
    dialect = repo.index_db.dialect.name
    if dialect != "sqlite":
        report.index_check = f"skipped ({dialect})"   # the manifest checks below still guard every backup
        return
    try:
        with repo.index_db.connect() as conn:
            rows = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check")]
    except SQLAlchemyError as e:
        rows = [f"{e.__class__.__name__}: {getattr(e, 'orig', None) or e}"]
    if rows == ["ok"]:
        report.index_check = "ok"
    else:
        report.index_check = "damaged"
        report.index_problems.extend(f"integrity_check: {r}" for r in rows)


def _listed(repo) -> list[tuple[int, bytes | None, BackupInfo]]:
    """(pk, manifest_hash, info) of every backup, by a scan of the table (no lookup by id)."""
    q = select(backups.c.pk, backups.c.manifest_hash, *info_columns()).order_by(
        backups.c.created_ms, backups.c.disk, backups.c.id)
    with repo.index_db.connect() as conn:
        return [(r[0], bytes(r[1]) if r[1] is not None else None, info_from_row(r[2:])) for r in conn.execute(q)]


def _naming_marks(repo, pks: list[int], marks) -> set[int]:
    """pks of *pks* whose map names a segment or chunk with an unhealed mark, or whose map
    cannot be read (that is damage too): their maps are read (small), not their chunks."""
    bad_segs = {h for (kind, h), m in marks.items() if kind == "segment" and m.healed_ms is None}
    bad_chunks = {h for (kind, h), m in marks.items() if kind == "chunk" and m.healed_ms is None}
    if not bad_segs and not bad_chunks:
        return set()
    out: set[int] = set()
    for pk in pks:
        refs = _segment_refs(repo, pk)
        if refs is None:
            out.add(pk)
            continue
        for h in refs:
            if h is None:
                continue
            if h in bad_segs:
                out.add(pk)
                break
            if bad_chunks:
                try:
                    raw = repo.store.load_segment(h)
                except RepoDamaged:
                    out.add(pk)
                    break
                if any(e in bad_chunks for e in maps.iter_entries(raw)):
                    out.add(pk)
                    break
    return out


def _verified_since(repo, cutoff_ms: int) -> set[int]:
    """pks of the backups a verify found clean at or after *cutoff_ms*."""
    with repo.index_db.connect() as conn:
        return {r[0] for r in conn.execute(select(backups.c.pk).where(backups.c.verified_ms >= cutoff_ms))}


def _verify_backups(repo, refs, sample_percent, progress, rng, report: VerifyReport) -> None:
    if refs:
        chosen = {}
        for r in refs:
            info = repo.resolve(r)      # NotFound (exit 11) for a backup that does not exist
            chosen[info.id] = info
        # listed after resolving: one missing now was forgotten meanwhile, not committed later
        rows = [row for row in _listed(repo) if row[2].id in chosen]
        found = {row[2].id for row in rows}
        report.vanished.extend(b for bid, b in chosen.items() if bid not in found)
    else:
        rows = _listed(repo)
    started_ms = to_ms(now_ms())
    marks = damage.marks(repo.index_db)
    if report.since_days is not None:     # a nightly slice: what was not verified clean lately
        cutoff = started_ms - int(report.since_days * 86_400_000)
        recent = _verified_since(repo, cutoff)
        # a backup naming a record still marked damaged is known bad: checked every time,
        # whatever its stamp (another backup's verify found the shared record bad)
        recent -= _naming_marks(repo, [row[0] for row in rows if row[0] in recent], marks)
        report.skipped_recent = sum(1 for row in rows if row[0] in recent)
        rows = [row for row in rows if row[0] not in recent]
    seg_len = repo.config.segment_len
    store = repo.store

    # pass 1: maps and segments
    maps_of: dict[str, list[bytes | None]] = {}
    problem_of: dict[str, list[str]] = {}        # whole backup unrestorable: the index cannot be trusted
    note_of: dict[str, list[str]] = {}           # damage that loses no disk bytes
    bad_segments: dict[bytes, str] = {}
    seg_len_ok: dict[bytes, int] = {}
    chunk_hashes: set[bytes] = set()
    targets: list[BackupInfo] = []
    manifest_of: dict[str, tuple[bytes | None, list[bytes | None] | None]] = {}
    pk_of: dict[str, int] = {}
    for pk, mh, b in rows:
        refs_b = _segment_refs(repo, pk)      # an unreadable index raises (exit 9), not "damaged"
        expected = maps.nsegments(b.nchunks, seg_len)
        if (refs_b is None or len(refs_b) != expected) and not _still_listed(repo, pk):
            report.vanished.append(b)         # forgotten while we ran (forget needs no lock)
            continue
        targets.append(b)
        pk_of[b.id] = pk
        manifest_of[b.id] = (mh, refs_b)
        if refs_b is None:
            problem_of[b.id] = ["map rows in the index are not contiguous"]
            continue
        if len(refs_b) != expected:
            problem_of[b.id] = [f"map has {len(refs_b)} segments, expected {expected}"]
            continue
        maps_of[b.id] = refs_b
        for h in refs_b:
            if h is None or h in bad_segments or h in seg_len_ok:
                continue
            try:
                raw = store.load_segment(h)
            except RepoDamaged as e:
                bad_segments[h] = str(e)
                continue
            report.segments_checked += 1
            seg_len_ok[h] = len(raw) // HASH_SIZE
            chunk_hashes.update(e for e in maps.iter_entries(raw) if e != ZERO_REF)
    chunk_hashes.discard(ZERO_REF)
    report.backups_checked = len(targets)
    _check_manifests(repo, targets, manifest_of, seg_len, report, problem_of, note_of)

    # pass 2: chunks
    report.chunks_total = len(chunk_hashes)
    marked_chunks = {h for kind, h in marks if kind == "chunk"}
    bad_chunks, checked, chunk_locs = _check_chunks(repo, chunk_hashes, sample_percent, progress, rng, report,
                                                    always=marked_chunks)

    # pass 3: damage per backup, as disk byte ranges
    for b in targets:
        if b.id in problem_of:
            report.damaged.append(DamagedBackup(b, [(0, b.size)] if b.size else [],
                                                problem_of[b.id] + note_of.get(b.id, []), index_rows_bad=True))
            continue
        d = _damage(b, maps_of[b.id], seg_len, store, bad_segments, seg_len_ok, bad_chunks)
        d.problems += note_of.get(b.id, [])
        if d.ranges or d.problems:
            report.damaged.append(d)
    _check_vm_definitions(repo, targets, report)
    update_marks(repo, report, marks, bad_chunks, checked, chunk_locs, bad_segments, set(seg_len_ok), started_ms)
    record_verified(repo, report, targets, pk_of, started_ms)


def _check_vm_definitions(repo, targets: list[BackupInfo], report: VerifyReport) -> None:
    """Read and decode every VM definition the backups name (each distinct one once, whatever
    the sample: it is small); a bad one damages every backup naming it (no disk bytes lost)."""
    bad: dict[str, str] = {}
    for ref in dict.fromkeys(b.vm for b in targets if b.vm is not None):
        try:
            vmstore.load(repo.context, ref)
            report.vm_definitions_checked += 1
        except RepoDamaged as e:
            bad[ref] = str(e)
    damaged = {d.backup.id: d for d in report.damaged}
    for b in targets:
        if b.vm in bad:
            d = damaged.get(b.id)
            if d is None:
                d = damaged[b.id] = DamagedBackup(b)
                report.damaged.append(d)
            d.problems.append(f"its VM definition cannot be read: {bad[b.vm]}")


def _check_manifests(repo, targets, manifest_of, seg_len, report, problem_of, note_of) -> None:
    """Each backup's index rows against its manifest record: one record read per backup."""
    wanted = {mh for mh, _ in manifest_of.values() if mh is not None}
    locs, unreadable = M.locate(repo, wanted)
    where = f" (unreadable: {', '.join(unreadable)})" if unreadable else ""
    for b in targets:
        mh, refs_b = manifest_of[b.id]
        if mh is None:
            problem_of.setdefault(b.id, []).append("the index names no manifest for it (manifest_hash is NULL)")
            continue
        loc = locs.get(mh)
        matches = refs_b is not None and M.rows_match(repo.codec, b, seg_len, refs_b, mh)
        if loc is None:
            msg = f"its manifest record {mh.hex()[:16]} is in no pack{where}"
            # rows that re-encode to the hash are intact (restore works); rebuild-index would lose it
            (note_of if matches else problem_of).setdefault(b.id, []).append(msg)
            continue
        try:
            m = M.read(repo, loc, mh)
        except (RecordError, M.ManifestError) as e:
            (note_of if matches else problem_of).setdefault(b.id, []).append(f"its manifest is damaged: {e}")
            continue
        report.manifests_checked += 1
        bad = M.disagreements(m, b, seg_len, refs_b if refs_b is not None else [])
        if bad:
            problem_of.setdefault(b.id, []).append("the index disagrees with its manifest in: " + "; ".join(bad))


def _segment_refs(repo, pk: int) -> list[bytes | None] | None:
    """The backup's segment hashes in order; None when its rows have gaps."""
    q = (select(backup_segments.c.seq, backup_segments.c.segment_hash)
         .where(backup_segments.c.backup_pk == pk).order_by(backup_segments.c.seq))
    with repo.index_db.connect() as conn:
        return refs_from_rows(conn.execute(q).all())


def _still_listed(repo, pk: int) -> bool:
    with repo.index_db.connect() as conn:
        return conn.execute(select(backups.c.pk).where(backups.c.pk == pk)).first() is not None


def _check_chunks(repo, hashes: set[bytes], sample_percent, progress, rng, report, always=frozenset()):
    """(bad: id -> why, the ids read, their locations). *always*: ids read whatever the sample."""
    store = repo.store
    locs = store.chunk_locations(hashes)
    bad: dict[bytes, str] = {h: f"chunk {h.hex()[:16]} is missing from the index" for h in hashes if h not in locs}
    packs_used = {loc.pack for loc in locs.values()}
    stored = set(repo.backend.list("packs/"))         # one listing, not one request per pack
    gone = {p for p in packs_used if pack_object_name(p) not in stored}
    for h, loc in locs.items():
        if loc.pack in gone:
            bad[h] = f"pack {loc.pack} is missing"
    todo = sorted(((loc.pack, loc.offset, h) for h, loc in locs.items() if loc.pack not in gone))
    if sample_percent is not None and todo:
        k = min(len(todo), max(1, math.ceil(len(todo) * sample_percent / 100)))
        marked = [t for t in todo if t[2] in always]      # marked damaged: was it healed?
        todo = sorted(set(rng.sample(todo, k)) | set(marked))
    total = sum(locs[h].stored_len for _, _, h in todo)
    bar = progress(total) if progress else None

    def check(batch: list[bytes]) -> list[tuple[bytes, Location, str | None]]:
        """Neighbouring records of one pack, read in runs (store.read_records), each checked."""
        got = store.read_records([(locs[h], h) for h in batch], REC_CHUNK)
        return [(h, locs[h], str(r) if isinstance(r, RecordError) else None) for h, r in zip(batch, got)]

    with ThreadPoolExecutor(_THREADS) as pool:
        for i in range(0, len(todo), _BATCH):
            for results in pool.map(check, _batches(todo[i:i + _BATCH], locs)):
                for h, loc, err in results:
                    report.chunks_checked += 1
                    report.bytes_checked += loc.stored_len
                    if err:
                        bad[h] = err
                    if bar is not None:
                        bar.update(loc.stored_len)
    read = {h for _, _, h in todo}
    _recheck_moved(store, bad, locs, read)
    return bad, read, locs


def _recheck_moved(store, bad: dict[bytes, str], locs: dict[bytes, Location], read: set[bytes]) -> None:
    """gc's repack may have moved records (and deleted their old pack) since *locs* was looked
    up, as restore's read path knows (image.try_chunks): ask the index again for the ids found
    bad and read once more those it now places elsewhere. Only what still fails is damage."""
    if not bad:
        return
    again = store.chunk_locations(list(bad))
    moved = sorted(h for h in bad if again.get(h) is not None and again[h] != locs.get(h))
    if not moved:
        return
    for h in moved:
        locs[h] = again[h]
    got = store.read_records([(locs[h], h) for h in moved], REC_CHUNK)
    for h, r in zip(moved, got):
        read.add(h)
        if isinstance(r, RecordError):
            bad[h] = str(r)
        else:
            del bad[h]


_READ_BATCH = 4 << 20     # bytes of neighbouring records one check reads (a few ranged gets at most)


def _batches(todo: list[tuple[str, int, bytes]], locs: dict[bytes, Location]):
    """(pack, offset, hash), sorted -> lists of hashes of one pack, about _READ_BATCH bytes each."""
    batch: list[bytes] = []
    pack, size = None, 0
    for p, _off, h in todo:
        if batch and (p != pack or size >= _READ_BATCH):
            yield batch
            batch, size = [], 0
        batch.append(h)
        pack = p
        size += locs[h].stored_len
    if batch:
        yield batch


def _damage(b: BackupInfo, refs, seg_len, store, bad_segments, seg_len_ok, bad_chunks) -> DamagedBackup:
    d = DamagedBackup(b)
    positions: list[int] = []
    causes: dict[str, None] = {}
    for seq, h in enumerate(refs):
        if h is None:
            continue
        start, n = maps.segment_span(seq, seg_len, b.nchunks)
        if h in bad_segments or seg_len_ok.get(h) != n:
            positions.extend(range(start, start + n))
            causes[bad_segments.get(h) or f"map segment {h.hex()[:16]} has the wrong length"] = None
            continue
        if not bad_chunks:
            continue
        raw = store.load_segment(h)
        for i, e in enumerate(maps.iter_entries(raw)):
            if e in bad_chunks:
                positions.append(start + i)
                causes[bad_chunks[e]] = None
    d.ranges = maps.merge_ranges((p * b.chunk_size, maps.chunk_len(p, b.size, b.chunk_size)) for p in positions)
    d.problems = list(causes)
    return d
