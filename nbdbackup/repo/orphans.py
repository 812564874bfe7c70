"""gc's last sweep: objects under packs/ the index does not name, and unfinished uploads.

Both are what killed runs leave. They go only when older than the limit gc
computes (repo/gc.py): --grace before now, and before the start of the oldest
live backup lease minus CLOCK_SKEW_S, so nothing a running writer has written
but not indexed yet is touched. mtimes come from backend.list_info (the storage's
clock); unfinished uploads go through backend.remove_incomplete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sqlalchemy import select

from .packs import pack_object_name
from .schema import packs


@dataclass
class OrphanReport:
    removed: int = 0          # orphan pack objects removed
    young: int = 0            # orphan pack objects left: younger than the limit
    incomplete: int = 0       # unfinished uploads / temp files removed
    bytes: int = 0


def remove_orphans(repo, older_than: float, dry_run: bool) -> OrphanReport:
    """Remove pack objects the index does not name and unfinished uploads, both older than
    *older_than* (POSIX seconds). The objects are listed BEFORE the index is read, so a pack a
    writer indexes meanwhile is known; one it has not indexed yet is younger than its lease."""
    backend, rep = repo.backend, OrphanReport()
    listed = [o for o in _list_info(backend, "packs/") if o.name.endswith(".pack")]
    with repo.index_db.connect() as conn:
        known = {pack_object_name(r[0]) for r in conn.execute(select(packs.c.name))}
    for o in listed:
        if o.name in known:
            continue
        if o.mtime is None or o.mtime >= older_than:
            rep.young += 1
            continue
        rep.removed += 1
        rep.bytes += o.size
        if not dry_run:
            backend.delete(o.name)
    rep.incomplete, nbytes = _remove_incomplete(backend, older_than, dry_run)
    rep.bytes += nbytes
    return rep


@dataclass
class _Info:
    name: str
    size: int
    mtime: float | None


def _list_info(backend, prefix: str):
    """backend.list_info (name, size, mtime); for a backend without it, the local files' mtimes
    (or no mtime: such an object counts as young)."""
    fn = getattr(backend, "list_info", None)
    if fn is not None:
        return [_Info(o.name, o.size, o.mtime) for o in fn(prefix)]
    root = getattr(backend, "root", None)
    out = []
    for name in backend.list(prefix):
        try:
            st = os.stat(os.path.join(root, *name.split("/"))) if root else None
        except FileNotFoundError:
            continue
        out.append(_Info(name, st.st_size if st else 0, st.st_mtime if st else None))
    return out


def _remove_incomplete(backend, older_than: float, dry_run: bool) -> tuple[int, int]:
    fn = getattr(backend, "remove_incomplete", None)
    if fn is not None:
        return (0, 0) if dry_run else fn(older_than)
    tmp, n, nbytes = getattr(backend, "tmp_dir", None), 0, 0
    if not tmp or not os.path.isdir(tmp):
        return 0, 0
    for f in os.listdir(tmp):
        p = os.path.join(tmp, f)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        if os.path.isfile(p) and st.st_mtime < older_than:
            n, nbytes = n + 1, nbytes + st.st_size
            if not dry_run:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
    return n, nbytes
