"""rebuild-index on PostgreSQL: the old index moved aside and the new one built, in ONE transaction.

PostgreSQL's DDL is transactional, so the SQLite way (build a file beside,
then rename) becomes: move the old index's tables into a schema
`nbdbackup_damaged_<UTC>` (ALTER TABLE ... SET SCHEMA: nothing is copied,
nothing deleted), create the head schema in their place, fill it, commit.
A crash or an error before the commit leaves the old index exactly as it
was; after it, the new one. Of the moved-aside schemas the newest
keep_damaged stay (older ones are dropped). Tables in the database that are
not nbdbackup's are refused, not moved.
"""

from __future__ import annotations

import time

from sqlalchemy import inspect, text

from ..errors import UsageError
from .index import make_engine, shown_url, upgrade_in
from .schema import metadata

DAMAGED_PREFIX = "nbdbackup_damaged_"
OURS = frozenset(metadata.tables) | {"alembic_version"}


def rebuild_in_place(url: str, fill, keep_damaged: int) -> tuple[str | None, list[str]]:
    """Move the index at *url* aside and build a new one filled by *fill(conn)*, in one
    transaction. Returns (the schema the old index went to or None, schemas dropped)."""
    eng = make_engine(url)
    try:
        with eng.connect() as conn, conn.begin():
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('nbdbackup rebuild-index'))"))
            names = set(inspect(conn).get_table_names())
            foreign = sorted(names - OURS)
            if foreign:
                raise UsageError(f"the index database {shown_url(url)} holds tables that are not nbdbackup's "
                                 f"({', '.join(foreign[:5])}); rebuild-index moves only its own aside",
                                 hint="give --index-url a database of its own")
            moved_to = None
            if names:
                moved_to = _free_schema(conn)
                conn.execute(text(f'CREATE SCHEMA "{moved_to}"'))
                for name in sorted(names):       # indexes, constraints and owned sequences move along
                    conn.execute(text(f'ALTER TABLE "{name}" SET SCHEMA "{moved_to}"'))
            upgrade_in(conn, "head")
            fill(conn)
            dropped = _drop_old(conn, keep_damaged)
        return moved_to, dropped
    finally:
        eng.dispose()


def _free_schema(conn) -> str:
    stamp = time.strftime("%Y%m%dt%H%M%Sz", time.gmtime())
    existing = set(inspect(conn).get_schema_names())
    name, n = DAMAGED_PREFIX + stamp, 1
    while name in existing:
        n += 1
        name = f"{DAMAGED_PREFIX}{stamp}_{n}"
    return name


def _drop_old(conn, keep: int) -> list[str]:
    """Drop all but the newest *keep* moved-aside schemas (this run's included)."""
    old = sorted(s for s in inspect(conn).get_schema_names() if s.startswith(DAMAGED_PREFIX))
    gone = old[:max(len(old) - keep, 0)]
    for s in gone:
        conn.execute(text(f'DROP SCHEMA "{s}" CASCADE'))
    return gone
