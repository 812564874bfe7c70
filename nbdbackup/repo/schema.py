"""The index schema at the head revision (SQLAlchemy Core tables).

The Alembic scripts in migrations/ create and upgrade this schema; the
tables here must equal what `alembic upgrade head` produces (a test checks).
INDEX_REVISION is the head revision this code reads and writes.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

from .indexsql import INDEX_REVISION  # noqa: E402,F401  (one place: the read path needs it without SQLAlchemy)

metadata = MetaData()

packs = Table(
    "packs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(32), nullable=False, unique=True),   # 32 hex digits; object packs/<xx>/<name>.pack
    Column("size", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("epoch", BigInteger, nullable=False, server_default="0"),   # 0003: gc epoch it was indexed in
)


def _blob_table(name: str) -> Table:
    # Where a content-addressed record lives: chunks (disk data) and
    # segments (map segments) have the same shape.
    return Table(
        name, metadata,
        Column("hash", LargeBinary(32), primary_key=True),
        Column("pack_id", Integer, ForeignKey("packs.id"), nullable=False, index=True),
        Column("offset", BigInteger, nullable=False),      # payload offset in the pack
        Column("stored_len", Integer, nullable=False),
        Column("raw_len", Integer, nullable=False),
        Column("compression", SmallInteger, nullable=False),
        # 0003: the start epoch of the last writer that added or reused it (gc keeps it while that
        # writer may still commit a reference to it)
        Column("used_epoch", BigInteger, nullable=False, server_default="0"),
        sqlite_with_rowid=False,
    )


chunks = _blob_table("chunks")
segments = _blob_table("segments")

backups = Table(
    "backups", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("disk", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("parent", String(40)),
    Column("created_ms", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("chunk_size", Integer, nullable=False),
    Column("read_bytes", BigInteger, nullable=False),
    Column("stored_bytes", BigInteger, nullable=False),
    Column("duration_s", Float, nullable=False),
    Column("bitmap", String(255)),
    Column("manifest_hash", LargeBinary(32), nullable=False),   # REC_MANIFEST record in a pack
    # added in 0002:
    Column("checkpoint", String(255)),
    Column("set_id", String(64)),
    Column("source", Text),
    # added in 0004: the libvirt domain and its stored definition (repo/vmstore.py)
    Column("domain", String(255)),
    Column("vm", String(128)),
    # added in 0005: when a verify last found it clean (verify --since); NULL: never, or damaged
    Column("verified_ms", BigInteger),
    Index("ix_backups_disk_created", "disk", "created_ms"),
    Index("ix_backups_disk_checkpoint", "disk", "checkpoint"),
    Index("ix_backups_set_id", "set_id"),
    Index("ix_backups_domain_created", "domain", "created_ms"),
)

# The map of a backup: segment seq -> segment hash (NULL = all-zero segment).
backup_segments = Table(
    "backup_segments", metadata,
    Column("backup_pk", Integer, ForeignKey("backups.pk"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("segment_hash", LargeBinary(32)),
    Index("ix_backup_segments_hash", "segment_hash"),
)

# -- 0003: many hosts, gc beside everything (docs/design.md "gc beside everything") --------------

# One row (id 1): the epoch; each gc run starts a new one.
gc_state = Table(
    "gc_state", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("epoch", BigInteger, nullable=False),
)

# A running backup or reader: alive while its heartbeat is fresh.
leases = Table(
    "leases", metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False),          # "backup" or "read"
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("command", Text, nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("heartbeat_ms", BigInteger, nullable=False),
    Column("start_epoch", BigInteger, nullable=False),
)

# Backups a live lease needs (a reader's backup, a writer's parent): forget and prune leave them.
lease_pins = Table(
    "lease_pins", metadata,
    Column("lease_id", String(32), ForeignKey("leases.id", ondelete="CASCADE"), primary_key=True),
    Column("backup_id", String(40), primary_key=True),
    Index("ix_lease_pins_backup_id", "backup_id"),
)

# Who holds a lock of an index-based lock service (PostgreSQL advisory locks).
lock_holders = Table(
    "lock_holders", metadata,
    Column("id", String(32), primary_key=True),
    Column("lock_name", String(255), nullable=False),
    Column("backend_pid", Integer),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("command", Text, nullable=False),
    Column("since_ms", BigInteger, nullable=False),
    Column("mode", String(16), nullable=False),
    Column("purpose", Text),
    Index("ix_lock_holders_lock_name", "lock_name"),
)


# -- 0005: damage and healing (docs/design.md "Damage and healing") ----------------------------

# A chunk or map segment a verify found damaged: kind "chunk" or "segment", its id, where the bad
# copy was (pack name and payload offset; NULL when the index had no row), why, when. A writer
# that stores a fresh copy points the record's row at it and sets healed_ms; the next verify that
# reads it fine reports it healed and deletes the mark. Index-only state: rebuild-index drops it.
damaged_records = Table(
    "damaged_records", metadata,
    Column("kind", String(16), primary_key=True),
    Column("hash", LargeBinary(32), primary_key=True),
    Column("pack", String(32)),
    Column("offset", BigInteger),
    Column("reason", Text, nullable=False),
    Column("found_ms", BigInteger, nullable=False),
    Column("healed_ms", BigInteger),
)
