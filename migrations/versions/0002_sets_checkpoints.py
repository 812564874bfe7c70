"""backup sets and bitmap checkpoints: set_id, checkpoint, source

Multi-disk VM backups share a set_id; incremental chain integrity looks a
backup up by the bitmap generation (checkpoint) it opened.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.add_column(sa.Column("checkpoint", sa.String(255)))
        b.add_column(sa.Column("set_id", sa.String(64)))
        b.add_column(sa.Column("source", sa.Text))
    op.create_index("ix_backups_disk_checkpoint", "backups", ["disk", "checkpoint"])
    op.create_index("ix_backups_set_id", "backups", ["set_id"])


def downgrade() -> None:
    op.drop_index("ix_backups_set_id", "backups")
    op.drop_index("ix_backups_disk_checkpoint", "backups")
    with op.batch_alter_table("backups") as b:
        b.drop_column("source")
        b.drop_column("set_id")
        b.drop_column("checkpoint")
