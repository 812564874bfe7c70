"""Alembic environment, configured programmatically by nbdbackup.repo.index.

The caller passes a ready SQLAlchemy engine in config.attributes["engine"],
or a connection inside the caller's own transaction in
config.attributes["connection"] (rebuild-index on PostgreSQL: the whole
rebuild is one transaction); no alembic.ini and no URL in files.
"""

from alembic import context

config = context.config
given = config.attributes.get("connection")

if given is not None:
    context.configure(connection=given, target_metadata=None, render_as_batch=False)
    context.run_migrations()        # inside the caller's transaction; the caller commits
else:
    engine = config.attributes["engine"]
    with engine.connect().execution_options(nbdbackup_write=True) as connection:
        context.configure(connection=connection, target_metadata=None,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        if connection.in_transaction():
            connection.commit()
