"""Alembic environment, configured programmatically by nbdbackup.repo.index.

The caller passes a ready SQLAlchemy engine in config.attributes["engine"];
no alembic.ini and no URL in files.
"""

from alembic import context

config = context.config
engine = config.attributes["engine"]

with engine.connect().execution_options(nbdbackup_write=True) as connection:
    context.configure(connection=connection, target_metadata=None,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
    if connection.in_transaction():
        connection.commit()
