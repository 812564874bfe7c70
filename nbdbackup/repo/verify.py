"""verify: re-read and re-hash what backups need; name the damage.

Three passes under the shared readers lock (so gc cannot delete a pack
under us): (1) every map segment of the chosen backups is loaded and
checked, collecting the distinct chunk hashes; (2) each distinct chunk (or a
random sample) is read once, decompressed and hashed, packs that are gone
are noticed without reading; (3) each backup's map is walked again and the
positions whose segment or chunk is bad become disk byte ranges.
Memory: the set of distinct chunk hashes, not the maps.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from sqlalchemy import select

from ..errors import RepoDamaged
from . import maps
from . import packs as P
from .chunks import HASH_SIZE, ZERO_REF
from .indexerrors import index_errors
from .info import BackupInfo
from .schema import backup_segments, backups
from .store import Location, RecordError

_BATCH = 64          # chunk reads handed to the thread pool at once
_THREADS = 2


@dataclass
class DamagedBackup:
    backup: BackupInfo
    ranges: list[tuple[int, int]] = field(default_factory=list)   # (offset, length) disk bytes
    problems: list[str] = field(default_factory=list)

    @property
    def damaged_bytes(self) -> int:
        return sum(n for _, n in self.ranges)

    def to_json(self) -> dict:
        return {"id": self.backup.id, "disk": self.backup.disk, "damaged_bytes": self.damaged_bytes,
                "ranges": [{"offset": o, "length": n} for o, n in self.ranges], "problems": self.problems}


@dataclass
class VerifyReport:
    backups_checked: int = 0
    chunks_total: int = 0          # distinct non-zero chunks the backups reference
    chunks_checked: int = 0        # read and hashed (all, or the sample)
    bytes_checked: int = 0         # stored bytes read
    segments_checked: int = 0
    sample_percent: float | None = None
    damaged: list[DamagedBackup] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def problem_lines(self) -> list[str]:
        out = []
        for d in self.damaged:
            out.append(f"DAMAGED {d.backup.id} (disk {d.backup.disk}): {d.damaged_bytes} bytes in "
                       f"{len(d.ranges)} range(s)")
            for o, n in d.ranges[:50]:
                out.append(f"  bytes {o}-{o + n - 1} (offset {o}, length {n})")
            if len(d.ranges) > 50:
                out.append(f"  ... {len(d.ranges) - 50} more range(s) (see --json)")
            for p in d.problems[:10]:
                out.append(f"  cause: {p}")
        return out

    def to_json(self) -> dict:
        return {"ok": self.ok, "backups_checked": self.backups_checked, "chunks_total": self.chunks_total,
                "chunks_checked": self.chunks_checked, "bytes_checked": self.bytes_checked,
                "segments_checked": self.segments_checked, "sample_percent": self.sample_percent,
                "damaged": [d.to_json() for d in self.damaged]}


def verify(repo, refs: Iterable[str] | None = None, *, sample_percent: float | None = None,
           progress: Callable[[int], object] | None = None, rng: random.Random | None = None) -> VerifyReport:
    """Check the backups *refs* (ids or disk names; None = all). *progress*(total_bytes)
    returns an object with update(n), called as chunks are read."""
    lock = repo.lock("readers", exclusive=False, purpose="the repository's reader lock (gc runs)")
    try:
        with index_errors("verify"):
            return _verify(repo, refs, sample_percent, progress, rng or random.Random())
    finally:
        lock.release()


def _verify(repo, refs, sample_percent, progress, rng) -> VerifyReport:
    if refs:
        chosen = {}
        for r in refs:
            info = repo.resolve(r)
            chosen[info.id] = info
        targets = sorted(chosen.values(), key=lambda b: (b.created, b.id))
    else:
        targets = repo.list_backups()
    report = VerifyReport(backups_checked=len(targets), sample_percent=sample_percent)
    seg_len = repo.config.segment_len
    store = repo.store

    # pass 1: maps and segments
    maps_of: dict[str, list[bytes | None]] = {}
    map_problem: dict[str, str] = {}
    bad_segments: dict[bytes, str] = {}
    seg_len_ok: dict[bytes, int] = {}
    chunk_hashes: set[bytes] = set()
    gone: list[BackupInfo] = []
    for b in targets:
        refs_b = _segment_refs(repo, b.id)      # an unreadable index raises (exit 9), not "damaged"
        if refs_b is None:
            map_problem[b.id] = "map rows in the index are not contiguous"
            continue
        if len(refs_b) != maps.nsegments(b.nchunks, seg_len):
            if not _still_listed(repo, b.id):   # forgotten while we ran (forget needs no lock)
                gone.append(b)
                continue
            map_problem[b.id] = f"map has {len(refs_b)} segments, expected {maps.nsegments(b.nchunks, seg_len)}"
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

    # pass 2: chunks
    report.chunks_total = len(chunk_hashes)
    bad_chunks = _check_chunks(repo, chunk_hashes, sample_percent, progress, rng, report)

    # pass 3: damage per backup, as disk byte ranges
    targets = [b for b in targets if b not in gone]
    report.backups_checked = len(targets)
    for b in targets:
        if b.id in map_problem:
            report.damaged.append(DamagedBackup(b, [(0, b.size)] if b.size else [], [map_problem[b.id]]))
            continue
        d = _damage(b, maps_of[b.id], seg_len, store, bad_segments, seg_len_ok, bad_chunks)
        if d.ranges or d.problems:
            report.damaged.append(d)
    return report


def _segment_refs(repo, backup_id: str) -> list[bytes | None] | None:
    """The backup's segment hashes in order; None when its rows have gaps."""
    q = (select(backup_segments.c.seq, backup_segments.c.segment_hash)
         .join(backups, backups.c.pk == backup_segments.c.backup_pk)
         .where(backups.c.id == backup_id).order_by(backup_segments.c.seq))
    with repo.engine.connect() as conn:
        rows = conn.execute(q).all()
    if [s for s, _ in rows] != list(range(len(rows))):
        return None
    return [bytes(h) if h is not None else None for _, h in rows]


def _still_listed(repo, backup_id: str) -> bool:
    with repo.engine.connect() as conn:
        return conn.execute(select(backups.c.id).where(backups.c.id == backup_id)).first() is not None


def _check_chunks(repo, hashes: set[bytes], sample_percent, progress, rng, report) -> dict[bytes, str]:
    store = repo.store
    locs = store.chunk_locations(hashes)
    bad: dict[bytes, str] = {h: f"chunk {h.hex()[:16]} is missing from the index" for h in hashes if h not in locs}
    packs_used = {loc.pack for loc in locs.values()}
    gone = {p for p in packs_used if not repo.backend.exists(P.pack_object_name(p))}
    for h, loc in locs.items():
        if loc.pack in gone:
            bad[h] = f"pack {loc.pack} is missing"
    todo = sorted(((loc.pack, loc.offset, h) for h, loc in locs.items() if loc.pack not in gone))
    if sample_percent is not None and todo:
        k = min(len(todo), max(1, math.ceil(len(todo) * sample_percent / 100)))
        todo = sorted(rng.sample(todo, k))
    total = sum(locs[h].stored_len for _, _, h in todo)
    bar = progress(total) if progress else None

    def check(item) -> tuple[bytes, Location, str | None]:
        _, _, h = item
        loc = locs[h]
        try:
            store.read_record(loc, h, P.REC_CHUNK)
            return h, loc, None
        except RecordError as e:
            return h, loc, str(e)

    with ThreadPoolExecutor(_THREADS) as pool:
        for i in range(0, len(todo), _BATCH):
            for h, loc, err in pool.map(check, todo[i:i + _BATCH]):
                report.chunks_checked += 1
                report.bytes_checked += loc.stored_len
                if err:
                    bad[h] = err
                if bar is not None:
                    bar.update(loc.stored_len)
    return bad


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
    d.ranges = _ranges(positions, b.size, b.chunk_size)
    d.problems = list(causes)
    return d


def _ranges(positions: list[int], size: int, cs: int) -> list[tuple[int, int]]:
    """Chunk positions -> merged (offset, length) disk byte ranges."""
    out: list[list[int]] = []
    for p in sorted(set(positions)):
        off, n = p * cs, maps.chunk_len(p, size, cs)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]
