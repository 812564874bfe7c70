"""Salvage and self-healing: damaged_records and backups.verified_ms

A verify that finds a chunk or map segment damaged records it in
damaged_records; the next backup that stores the same bytes (same id) stores
a fresh copy, points the record's row at it and stamps healed_ms; the next
verify reports it healed and drops the mark (docs/design.md "Damage and
healing"). backups.verified_ms: when a verify last found the backup clean
(verify --since).

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.add_column(sa.Column("verified_ms", sa.BigInteger))
    op.create_table(
        "damaged_records",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("pack", sa.String(32)),
        sa.Column("offset", sa.BigInteger),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("found_ms", sa.BigInteger, nullable=False),
        sa.Column("healed_ms", sa.BigInteger),
    )


def downgrade() -> None:
    op.drop_table("damaged_records")
    # plain ALTER TABLE DROP COLUMN (see 0004: a batch copy of backups would fail on its foreign key)
    op.drop_column("backups", "verified_ms")
