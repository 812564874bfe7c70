"""The set commit: several disks' writers become backups in ONE index transaction.

Each writer's map is finished and its manifest (repo/manifest.py) written as
the last record of its last pack, which is sealed and indexed; only then does
one transaction insert every backup row and its map rows, with one created
time and one set id. A failure aborts every writer: nothing is committed.
Fencing: that transaction first checks (and on PostgreSQL row-locks) every
writer's lease; a lease a gc dropped as dead (the process was paused past
LEASE_TTL_S) fails the commit with LockedError, since gc may have reclaimed
records the writer relied on.
The writers are driven through their public methods (check_open,
finish_map, write_manifest, mark_committed, abort).
Copies (repo/copy.py): writers made with `preserve=` commit that backup's id,
kind, parent, created and set_id instead of new ones; a set is all copies or
none, and its members must agree on created and set_id.
"""

from __future__ import annotations

import uuid
from typing import Sequence

from ..errors import UsageError
from .backuprows import insert_backup
from .context import RepoContext
from .ids import from_ms, new_backup_id, now_ms, to_ms
from .indexerrors import write_error
from .indexretry import has_row, retry_write
from .info import BackupInfo
from .manifest import encode as encode_manifest
from .schema import backups


def commit_writers(ctx: RepoContext, writers: Sequence, *, read_bytes: Sequence[int] | None = None,
                   duration_s: Sequence[float] | float | None = None, created=None,
                   set_id: str | None = None, vm=None) -> list[BackupInfo]:
    """Commit *writers* (BackupWriter) in ONE index transaction with one created time and set id.
    *vm* (a VmDefinition): stored once, by the first writer (under its lease), and named by
    every backup of the set (`domain`, `vm`: in the manifests too)."""
    if not writers:
        return []
    for w in writers:
        w.check_open()
    if len({w.disk for w in writers}) != len(writers):
        raise UsageError("a set holds at most one backup per disk")
    n = len(writers)
    rb = list(read_bytes) if read_bytes is not None else [0] * n
    ds = list(duration_s) if isinstance(duration_s, (list, tuple)) else [float(duration_s or 0.0)] * n
    preserved = [w.preserve for w in writers if w.preserve is not None]
    if preserved:
        if len(preserved) != n or len({(p.created, p.set_id) for p in preserved}) != 1:
            raise UsageError("copied backups are committed together only as one set "
                             "(same created time and set id), never mixed with new ones")
        created, set_id = preserved[0].created, preserved[0].set_id
    created = now_ms() if created is None else from_ms(to_ms(created))   # aware UTC, whole ms (naive = UTC)
    if n > 1 and not preserved:
        set_id = set_id or next((w.set_id for w in writers if w.set_id), None) or uuid.uuid4().hex[:16]
    ids: set[str] = set()
    try:
        vm_ref = writers[0].store_vm_definition(vm.encode()) if vm is not None else None
        domain = vm.domain if vm is not None else None
        staged = []
        for i, w in enumerate(writers):
            refs = w.finish_map()
            p = w.preserve
            if p is not None:       # a copy: the source's identity, this repository's own numbers
                bid, kind, parent_id = p.id, p.kind, p.parent
            else:
                bid = new_backup_id(created)
                while bid in ids:
                    bid = new_backup_id(created)
                kind, parent_id = w.kind, w.parent.id if w.parent else None
            ids.add(bid)
            info = BackupInfo(id=bid, disk=w.disk, kind=kind, parent=parent_id,
                              created=created, size=w.size, chunk_size=w.chunk_size, read_bytes=int(rb[i]),
                              stored_bytes=w.stored_bytes, duration_s=float(ds[i]), bitmap=w.bitmap,
                              checkpoint=w.checkpoint,
                              set_id=set_id if n > 1 or preserved else (set_id or w.set_id),
                              source=w.source, domain=domain, vm=vm_ref)
            mh = w.write_manifest(encode_manifest(info, w.segment_len, refs))
            staged.append((info, refs, mh))
        def commit(conn):       # redone when the connection is lost before its COMMIT (indexretry)
            for w in writers:       # fencing: a lease a gc dropped as dead may have lost its records
                w.lease.check_held(conn)
            for info, refs, mh in staged:
                insert_backup(conn, info, refs, mh)
        retry_write(ctx.index_db, commit, landed=has_row(backups.c.id, staged[0][0].id))
    except BaseException as e:
        for w in writers:
            w.abort()
        err = write_error(e, ctx.path, ctx.index_db)
        if err is e:
            raise
        raise err from e
    for w in writers:
        w.mark_committed()
    return [info for info, _, _ in staged]
