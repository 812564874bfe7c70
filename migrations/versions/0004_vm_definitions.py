"""VM definitions: backups.domain and backups.vm

A libvirt source's backups name their domain and the VM definition stored with
their set (docs/design.md "VM definitions"); latest_domain_set looks backups
up by domain, newest first.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.add_column(sa.Column("domain", sa.String(255)))
        b.add_column(sa.Column("vm", sa.String(128)))
    op.create_index("ix_backups_domain_created", "backups", ["domain", "created_ms"])


def downgrade() -> None:
    op.drop_index("ix_backups_domain_created", "backups")
    # plain ALTER TABLE DROP COLUMN (SQLite >= 3.35, PostgreSQL): a batch "move and copy" of
    # backups would fail on the foreign key backup_segments holds on it
    op.drop_column("backups", "vm")
    op.drop_column("backups", "domain")
