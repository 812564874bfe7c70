"""many hosts, gc beside everything: leases, pins, gc epochs, lock holders

gc no longer excludes writers and readers. A running backup or reader holds
a lease (heartbeat); a lease pins the backups it needs (a reader's backup, a
writer's parent) so forget/prune leave them; each gc starts a new epoch, and a
record a writer reuses or adds carries the writer's start epoch, so gc keeps it
while that writer lives (docs/design.md "gc beside everything"). lock_holders
says who holds a lock of an index-based lock service (PostgreSQL).

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("chunks", "segments"):
        with op.batch_alter_table(table) as b:
            b.add_column(sa.Column("used_epoch", sa.BigInteger, nullable=False, server_default="0"))
    with op.batch_alter_table("packs") as b:
        b.add_column(sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"))
    gc_state = op.create_table(
        "gc_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(gc_state, [{"id": 1, "epoch": 1}])
    op.create_table(
        "leases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("started_ms", sa.BigInteger, nullable=False),
        sa.Column("heartbeat_ms", sa.BigInteger, nullable=False),
        sa.Column("start_epoch", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "lease_pins",
        sa.Column("lease_id", sa.String(32), sa.ForeignKey("leases.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("backup_id", sa.String(40), primary_key=True),
    )
    op.create_index("ix_lease_pins_backup_id", "lease_pins", ["backup_id"])
    op.create_table(
        "lock_holders",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("lock_name", sa.String(255), nullable=False),
        sa.Column("backend_pid", sa.Integer),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("since_ms", sa.BigInteger, nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("purpose", sa.Text),
    )
    op.create_index("ix_lock_holders_lock_name", "lock_holders", ["lock_name"])


def downgrade() -> None:
    op.drop_index("ix_lock_holders_lock_name", "lock_holders")
    op.drop_table("lock_holders")
    op.drop_index("ix_lease_pins_backup_id", "lease_pins")
    op.drop_table("lease_pins")
    op.drop_table("leases")
    op.drop_table("gc_state")
    with op.batch_alter_table("packs") as b:
        b.drop_column("epoch")
    for table in ("segments", "chunks"):
        with op.batch_alter_table(table) as b:
            b.drop_column("used_epoch")
