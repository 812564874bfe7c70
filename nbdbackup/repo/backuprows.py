"""The `backups` and `backup_segments` rows: the one mapping between them and BackupInfo.

Reads (listing, lookups, a backup's map checked against its manifest) and the
insert of a committed backup (set commit, rebuild-index) all go through here.
What readers and `list` need (a backup by id, a disk's latest, the listing, a map and
its manifest hash) is text SQL on an IndexSql (indexsql: no SQLAlchemy for a local
SQLite index); set and domain lookups and the insert are Core.
"""

from __future__ import annotations

from ..errors import NotFound, RepoDamaged
from .ids import from_ms, to_ms
from .indexerrors import index_errors
from .indexsql import index_sql
from .info import BackupInfo
from .manifest import check_rows as check_manifest_rows

INFO_NAMES = ("id", "disk", "kind", "parent", "created_ms", "size", "chunk_size", "read_bytes", "stored_bytes",
              "duration_s", "bitmap", "checkpoint", "set_id", "source", "domain", "vm")
_SELECT_INFO = f"SELECT {', '.join(INFO_NAMES)} FROM backups"

READ_HINT = "run `nbdbackup verify`; `nbdbackup rebuild-index` recreates the index"


def info_columns() -> tuple:
    """The backups columns of INFO_NAMES, for Core selects that info_from_row() reads."""
    from .schema import backups

    return tuple(backups.c[n] for n in INFO_NAMES)


def info_from_row(r) -> BackupInfo:
    """A row selected with INFO_NAMES (info_columns()), as a BackupInfo."""
    return BackupInfo(id=r[0], disk=r[1], kind=r[2], parent=r[3], created=from_ms(r[4]), size=r[5],
                      chunk_size=r[6], read_bytes=r[7], stored_bytes=r[8], duration_s=r[9], bitmap=r[10],
                      checkpoint=r[11], set_id=r[12], source=r[13], domain=r[14], vm=r[15])


def insert_backup(conn, info: BackupInfo, refs: list[bytes | None], manifest_hash: bytes) -> None:
    """Insert a backup's row and its map rows (seq -> segment hash) on *conn*."""
    from sqlalchemy import insert

    from .schema import backup_segments, backups

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


def read_rows(index, sql: str, params: dict) -> list[tuple]:
    """All rows of text *sql* on *index* (an IndexSql or an engine), errors as query()'s."""
    index = index_sql(index)
    with index_errors("reading the index", index_db=index, damaged_hint=READ_HINT):
        with index.read() as conn:
            return conn.rows(sql, params)


def get_backup(index, backup_id: str) -> BackupInfo | None:
    rows = read_rows(index, f"{_SELECT_INFO} WHERE id = :id", {"id": backup_id})
    return info_from_row(rows[0]) if rows else None


def latest(index, disk: str) -> BackupInfo | None:
    """The newest backup of *disk* (None when it has none)."""
    rows = read_rows(index, f"{_SELECT_INFO} WHERE disk = :disk ORDER BY created_ms DESC, id DESC LIMIT 1",
                     {"disk": disk})
    return info_from_row(rows[0]) if rows else None


def list_backups(index, disk: str | None = None) -> list[BackupInfo]:
    """Committed backups (of *disk*, or all), oldest first."""
    where, params = (" WHERE disk = :disk", {"disk": disk}) if disk is not None else ("", {})
    return [info_from_row(r) for r in read_rows(index, f"{_SELECT_INFO}{where} ORDER BY created_ms, disk, id",
                                                params)]


def verified_times(index) -> dict[str, int]:
    """backup id -> when a verify last found it clean (ms); backups never found clean are absent."""
    return dict(read_rows(index, "SELECT id, verified_ms FROM backups WHERE verified_ms IS NOT NULL", {}))


def find_by_checkpoint(index, disk: str, checkpoint: str) -> BackupInfo | None:
    """The (latest) backup of *disk* that opened bitmap generation *checkpoint*."""
    rows = read_rows(index, f"{_SELECT_INFO} WHERE disk = :disk AND checkpoint = :checkpoint "
                            "ORDER BY created_ms DESC LIMIT 1", {"disk": disk, "checkpoint": checkpoint})
    return info_from_row(rows[0]) if rows else None


def disks(index) -> list[str]:
    return [r[0] for r in read_rows(index, "SELECT DISTINCT disk FROM backups ORDER BY disk", {})]


def refs_from_rows(rows) -> list[bytes | None] | None:
    """(seq, segment hash) map rows in seq order as the segment list (None = all-zero segment);
    None when the seqs have gaps."""
    if [s for s, _ in rows] != list(range(len(rows))):
        return None
    return [bytes(h) if h is not None else None for _, h in rows]


def segment_refs(index, backup_id: str) -> list[bytes | None]:
    """The map of a backup: segment hashes in order (None = all-zero segment); *index*: an
    IndexSql or an engine."""
    refs = refs_from_rows(read_rows(index, "SELECT s.seq, s.segment_hash FROM backup_segments s JOIN backups b "
                                           "ON b.pk = s.backup_pk WHERE b.id = :id ORDER BY s.seq", {"id": backup_id}))
    if refs is None:
        raise RepoDamaged(f"backup {backup_id}: map rows are not contiguous", hint="run `nbdbackup verify`")
    return refs


def set_members(engine, info: BackupInfo) -> list[BackupInfo]:
    """Every backup of *info*'s set, ordered by disk (`[info]` when it has no set id)."""
    from sqlalchemy import select

    from .schema import backups

    if info.set_id is None:
        return [info]
    return [info_from_row(r) for r in query(engine, select(*info_columns()).where(
        backups.c.set_id == info.set_id).order_by(backups.c.disk, backups.c.id))]


def latest_domain_set(engine, domain: str) -> list[BackupInfo]:
    """The members of the newest set whose backups name libvirt domain *domain*; [] when none."""
    from sqlalchemy import select

    from .schema import backups

    rows = query(engine, select(*info_columns()).where(backups.c.domain == domain)
                 .order_by(backups.c.created_ms.desc(), backups.c.id.desc()).limit(1))
    return set_members(engine, info_from_row(rows[0])) if rows else []


def checked_segment_refs(repo, info: BackupInfo) -> list[bytes | None]:
    """The map of *info*, once its index rows (size, chunk size, segment list...) are checked
    against the backup's manifest: RepoDamaged when they disagree. Readers and incremental
    writers use this, so a consistent SQL edit of the index cannot turn into wrong bytes.
    *repo*: a Repository or RepoContext (config, sql, backend, store)."""
    refs = segment_refs(repo.sql, info.id)
    rows = read_rows(repo.sql, "SELECT manifest_hash FROM backups WHERE id = :id", {"id": info.id})
    if not rows:
        raise NotFound(f"backup {info.id} is no longer in the index (forgotten meanwhile?)",
                       hint="see `nbdbackup list`")
    check_manifest_rows(repo, info, refs, rows[0][0])
    return refs
