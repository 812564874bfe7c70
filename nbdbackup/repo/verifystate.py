"""What verify records in the index: damage marks (repo/damage.py) and backups.verified_ms.

Both are written after the checks, each in its own transaction; on a read-only
index (an offsite copy mounted read-only) verify still checks everything and
notes what it could not record.
"""

from __future__ import annotations

from sqlalchemy import update

from ..errors import PermissionDenied, ReadOnlyError
from . import damage
from .index import write_txn
from .indexerrors import index_errors
from .schema import backups


def update_marks(repo, report, marks, bad_chunks, checked_chunks, chunk_locs, bad_segments, good_segments,
                  now: int) -> None:
    """Mark what was found bad (the next backup storing it heals it); report and unmark the
    marked records that read fine now."""
    seg_locs = repo.store.segment_locations(bad_segments) if bad_segments else {}
    found = []
    for kind, bad, locs in (("chunk", bad_chunks, chunk_locs), ("segment", bad_segments, seg_locs)):
        for h, why in bad.items():
            loc = locs.get(h)
            old = marks.get((kind, h))
            found.append(damage.Mark(kind, h, loc.pack if loc else None, loc.offset if loc else None, why,
                                     old.found_ms if old else now))
    healed = [m for (kind, h), m in marks.items()
              if (kind == "chunk" and h in checked_chunks and h not in bad_chunks)
              or (kind == "segment" and h in good_segments)]
    report.damage_marks = sorted(found, key=lambda m: (m.kind, m.hash))
    report.healed = sorted(healed, key=lambda m: (m.kind, m.hash))

    def write():
        damage.record(repo.index_db, found)
        damage.clear(repo.index_db, [(m.kind, m.hash) for m in healed])
    index_write(repo, report, "damage marks", write)


def record_verified(repo, report, targets, pk_of, now: int) -> None:
    """backups.verified_ms: NULL on each damaged backup, whatever the run (a sample that found
    damage proves it: `verify --since` must not skip it); now on each backup found clean, but
    only by a whole run (a sample proves nothing about the chunks it did not read)."""
    bad = {d.backup.id for d in report.damaged}
    damaged = sorted(pk_of[b.id] for b in targets if b.id in bad)
    whole = report.sample_percent is None and not report.index_problems
    clean = sorted(pk_of[b.id] for b in targets if b.id not in bad) if whole else []
    if not clean and not damaged:
        return

    def write():
        with write_txn(repo.index_db) as conn:
            for pks, value in ((clean, now), (damaged, None)):
                for i in range(0, len(pks), 500):
                    conn.execute(update(backups).where(backups.c.pk.in_(pks[i:i + 500])).values(verified_ms=value))
    index_write(repo, report, "verified times", write)


def index_write(repo, report, what: str, fn) -> None:
    """Run verify's index write *fn*; on a read-only index say what was not recorded."""
    try:
        with index_errors(f"recording verify's {what}", repo):
            fn()
    except (ReadOnlyError, PermissionDenied) as e:
        report.notes.append(f"{what} not recorded: {e}")
