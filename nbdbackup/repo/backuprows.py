"""The `backups` and `backup_segments` rows: the one mapping between them and BackupInfo.

Reads (listing, lookups, a backup's map checked against its manifest) and the
insert of a committed backup (set commit, rebuild-index) all go through here.
"""

from __future__ import annotations

from sqlalchemy import insert, select

from ..errors import NotFound, RepoDamaged
from .ids import from_ms, to_ms
from .indexerrors import index_errors
from .info import BackupInfo
from .manifest import check_rows as check_manifest_rows
from .schema import backup_segments, backups

INFO_COLUMNS = (backups.c.id, backups.c.disk, backups.c.kind, backups.c.parent, backups.c.created_ms,
                backups.c.size, backups.c.chunk_size, backups.c.read_bytes, backups.c.stored_bytes,
                backups.c.duration_s, backups.c.bitmap, backups.c.checkpoint, backups.c.set_id,
                backups.c.source, backups.c.domain, backups.c.vm)

READ_HINT = "run `nbdbackup verify`; `nbdbackup rebuild-index` recreates the index"


def info_from_row(r) -> BackupInfo:
    """A row selected with INFO_COLUMNS, as a BackupInfo."""
    return BackupInfo(id=r[0], disk=r[1], kind=r[2], parent=r[3], created=from_ms(r[4]), size=r[5],
                      chunk_size=r[6], read_bytes=r[7], stored_bytes=r[8], duration_s=r[9], bitmap=r[10],
                      checkpoint=r[11], set_id=r[12], source=r[13], domain=r[14], vm=r[15])


def insert_backup(conn, info: BackupInfo, refs: list[bytes | None], manifest_hash: bytes) -> None:
    """Insert a backup's row and its map rows (seq -> segment hash) on *conn*."""
    pk = conn.execute(insert(backups).values(
        id=info.id, disk=info.disk, kind=info.kind, parent=info.parent, created_ms=to_ms(info.created),
        size=info.size, chunk_size=info.chunk_size, read_bytes=info.read_bytes, stored_bytes=info.stored_bytes,
        duration_s=info.duration_s, bitmap=info.bitmap, checkpoint=info.checkpoint, set_id=info.set_id,
        source=info.source, domain=info.domain, vm=info.vm, manifest_hash=manifest_hash)).inserted_primary_key[0]
    if refs:
        conn.execute(insert(backup_segments),
                     [{"backup_pk": pk, "seq": s, "segment_hash": r} for s, r in enumerate(refs)])


def query(engine, stmt) -> list:
    """All rows of *stmt*; an index error becomes index_error()'s class."""
    with index_errors("reading the index", index_db=engine, damaged_hint=READ_HINT):
        with engine.connect() as conn:
            return conn.execute(stmt).all()


def refs_from_rows(rows) -> list[bytes | None] | None:
    """(seq, segment hash) map rows in seq order as the segment list (None = all-zero segment);
    None when the seqs have gaps."""
    if [s for s, _ in rows] != list(range(len(rows))):
        return None
    return [bytes(h) if h is not None else None for _, h in rows]


def segment_refs(engine, backup_id: str) -> list[bytes | None]:
    """The map of a backup: segment hashes in order (None = all-zero segment)."""
    refs = refs_from_rows(query(engine, select(backup_segments.c.seq, backup_segments.c.segment_hash)
                                .join(backups, backups.c.pk == backup_segments.c.backup_pk)
                                .where(backups.c.id == backup_id).order_by(backup_segments.c.seq)))
    if refs is None:
        raise RepoDamaged(f"backup {backup_id}: map rows are not contiguous", hint="run `nbdbackup verify`")
    return refs


def set_members(engine, info: BackupInfo) -> list[BackupInfo]:
    """Every backup of *info*'s set, ordered by disk (`[info]` when it has no set id)."""
    if info.set_id is None:
        return [info]
    return [info_from_row(r) for r in query(engine, select(*INFO_COLUMNS).where(
        backups.c.set_id == info.set_id).order_by(backups.c.disk, backups.c.id))]


def latest_domain_set(engine, domain: str) -> list[BackupInfo]:
    """The members of the newest set whose backups name libvirt domain *domain*; [] when none."""
    rows = query(engine, select(*INFO_COLUMNS).where(backups.c.domain == domain)
                 .order_by(backups.c.created_ms.desc(), backups.c.id.desc()).limit(1))
    return set_members(engine, info_from_row(rows[0])) if rows else []


def checked_segment_refs(repo, info: BackupInfo) -> list[bytes | None]:
    """The map of *info*, once its index rows (size, chunk size, segment list...) are checked
    against the backup's manifest: RepoDamaged when they disagree. Readers and incremental
    writers use this, so a consistent SQL edit of the index cannot turn into wrong bytes.
    *repo*: a Repository or RepoContext (config, index_db, backend, store)."""
    refs = segment_refs(repo.index_db, info.id)
    rows = query(repo.index_db, select(backups.c.manifest_hash).where(backups.c.id == info.id))
    if not rows:
        raise NotFound(f"backup {info.id} is no longer in the index (forgotten meanwhile?)",
                       hint="see `nbdbackup list`")
    check_manifest_rows(repo, info, refs, rows[0][0])
    return refs
