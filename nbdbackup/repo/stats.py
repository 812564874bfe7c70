"""Repository totals (`nbdbackup stats`): one pass of aggregate queries over the index."""

from __future__ import annotations

from sqlalchemy import func, select

from .schema import backups, chunks, packs, segments


def repo_stats(index_db) -> dict:
    """Totals over the repository (definitions: `nbdbackup stats --help`)."""
    with index_db.connect() as conn:
        nb, logical = conn.execute(select(func.count(), func.coalesce(func.sum(backups.c.size), 0))).one()
        nc, raw, stored = conn.execute(select(func.count(), func.coalesce(func.sum(chunks.c.raw_len), 0),
                                              func.coalesce(func.sum(chunks.c.stored_len), 0))).one()
        ns, seg_stored = conn.execute(select(func.count(),
                                             func.coalesce(func.sum(segments.c.stored_len), 0))).one()
        np_, pack_bytes = conn.execute(select(func.count(), func.coalesce(func.sum(packs.c.size), 0))).one()
        ndisks = conn.execute(select(func.count(func.distinct(backups.c.disk)))).scalar()
    logical, raw, stored = int(logical), int(raw), int(stored)     # PostgreSQL's SUM is a Decimal
    return {
        "backups": nb, "disks": ndisks,
        "logical_bytes": logical,
        "unique_bytes": raw,
        "stored_chunk_bytes": stored,
        "map_bytes": int(seg_stored),
        "pack_bytes": int(pack_bytes),
        "chunks": nc, "segments": ns, "packs": np_,
        "dedup_ratio": round(logical / raw, 3) if raw else None,
        "compression_ratio": round(raw / stored, 3) if stored else None,
    }
