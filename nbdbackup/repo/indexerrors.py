"""Turn database errors met during maintenance into RepoDamaged (exit 9), not tracebacks."""

from __future__ import annotations

import contextlib

from sqlalchemy.exc import SQLAlchemyError

from ..errors import RepoDamaged


@contextlib.contextmanager
def index_errors(what: str):
    """Run a maintenance step; an index that cannot be read or written becomes RepoDamaged."""
    try:
        yield
    except SQLAlchemyError as e:
        raise RepoDamaged(f"{what}: the index is damaged or unreadable: {e.__class__.__name__}: "
                          f"{getattr(e, 'orig', None) or e}",
                          hint="an interrupted step leaves at most orphans for the next gc; "
                               "`nbdbackup rebuild-index` recreates the index from the packs") from None
