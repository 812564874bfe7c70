"""initial index: packs, chunks, map segments, backups and their maps

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _blob_table(name: str) -> None:
    op.create_table(
        name,
        sa.Column("hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("pack_id", sa.Integer, sa.ForeignKey("packs.id"), nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("stored_len", sa.Integer, nullable=False),
        sa.Column("raw_len", sa.Integer, nullable=False),
        sa.Column("compression", sa.SmallInteger, nullable=False),
        sqlite_with_rowid=False,   # the 32-byte hash is the key: stored once, not twice (ignored elsewhere)
    )
    op.create_index(f"ix_{name}_pack_id", name, ["pack_id"])


def upgrade() -> None:
    op.create_table(
        "packs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(32), nullable=False, unique=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
    )
    _blob_table("chunks")
    _blob_table("segments")
    op.create_table(
        "backups",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("disk", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("parent", sa.String(40)),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("chunk_size", sa.Integer, nullable=False),
        sa.Column("read_bytes", sa.BigInteger, nullable=False),
        sa.Column("stored_bytes", sa.BigInteger, nullable=False),
        sa.Column("duration_s", sa.Float, nullable=False),
        sa.Column("bitmap", sa.String(255)),
        sa.Column("manifest_hash", sa.LargeBinary(32), nullable=False),
    )
    op.create_index("ix_backups_disk_created", "backups", ["disk", "created_ms"])
    op.create_table(
        "backup_segments",
        sa.Column("backup_pk", sa.Integer, sa.ForeignKey("backups.pk"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("segment_hash", sa.LargeBinary(32)),
    )
    op.create_index("ix_backup_segments_hash", "backup_segments", ["segment_hash"])


def downgrade() -> None:
    for t in ("backup_segments", "backups", "segments", "chunks", "packs"):
        op.drop_table(t)
