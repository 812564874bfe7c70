"""The one translation of index (database) errors into the documented error classes.

SQLite reports a full disk as "disk I/O error" or "database or disk is full" and a
read-only mount as "unable to open database file" or "attempt to write a readonly
database"; which one it was is read from the file system (fsutil.write_blocker), so
that a full, read-only or forbidden repository is never reported as a damaged index
with the harmful hint to rebuild it.
"""

from __future__ import annotations

import contextlib
import sqlite3

from sqlalchemy.exc import SQLAlchemyError

from ..errors import LockedError, NbdBackupError, NoSpaceError, RepoDamaged, storage_error
from ..fsutil import write_blocker

REBUILD_HINT = ("an interrupted step leaves at most orphans for the next gc; "
                "`nbdbackup rebuild-index` recreates the index from the packs")

# SQLite result codes where the file system, not the file's contents, may be the cause
_FS_CODES = ("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_FULL", "SQLITE_PERM")


def index_path(engine_or_url) -> str | None:
    """The SQLite index file of an engine or URL, None for other databases (and :memory:)."""
    url = getattr(engine_or_url, "url", engine_or_url)
    url = url.render_as_string(hide_password=False) if hasattr(url, "render_as_string") else str(url)
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return None
    return url.removeprefix("sqlite:///").split("?", 1)[0]


def index_error(e: Exception, what: str, *, path: str | None,
                damaged_hint: str = REBUILD_HINT) -> NbdBackupError:
    """*e* (a SQLAlchemy or DB-API error), met while *what* ("reading the index") on the index
    file *path*, as the error to report: NoSpaceError, ReadOnlyError, PermissionDenied,
    LockedError or RepoDamaged."""
    orig = getattr(e, "orig", None) or e
    msg = str(orig)
    code = getattr(orig, "sqlite_errorname", "") or ""
    low = msg.lower() if isinstance(orig, sqlite3.Error) else ""   # dialect check: SQLite's words only
    if "database is locked" in low or code.startswith("SQLITE_BUSY"):
        return LockedError(f"the index stayed locked by other runs for too long while {what}: {msg}",
                           hint="nothing was committed; run again when the repository is less busy")
    file_level = code.startswith(_FS_CODES) or any(
        s in low for s in ("disk i/o error", "unable to open", "readonly database", "disk is full"))
    if file_level:
        blocker = write_blocker(path) if path else None
        found = storage_error(blocker, path or "the index", what) if blocker else None
        if found is not None:
            return found
        if code.startswith("SQLITE_FULL") or "disk is full" in low:
            return NoSpaceError(f"no space left for the index while {what}: {msg}",
                                hint="free space and run again; committed backups are intact")
    return RepoDamaged(f"{what}: the index is damaged or unreadable: {e.__class__.__name__}: {msg}",
                       hint=damaged_hint)


@contextlib.contextmanager
def index_errors(what: str, repo=None, *, index_db=None, damaged_hint: str = REBUILD_HINT):
    """Run an index step; an index error becomes index_error()'s class (RepoDamaged when the
    index itself is at fault). *repo* (or *index_db*, its SQLAlchemy engine) lets it tell a
    full or read-only file system apart."""
    try:
        yield
    except SQLAlchemyError as e:
        index_db = index_db if index_db is not None else getattr(repo, "index_db", None)
        path = index_path(index_db) if index_db is not None else None
        raise index_error(e, what, path=path, damaged_hint=damaged_hint) from None


def write_error(e: BaseException, repo_path: str, engine) -> BaseException:
    """An index or OS error met while writing a backup, as the documented error class (*e*
    itself when it is neither): the one mapping shared with index open, locks and rebuild."""
    if isinstance(e, OSError):
        return storage_error(e.errno, e.filename or repo_path, "writing a backup") or e
    if isinstance(e, SQLAlchemyError):
        return index_error(e, "writing the index", path=index_path(engine),
                           damaged_hint="nothing was committed; `nbdbackup verify` checks the repository")
    return e
