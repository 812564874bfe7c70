"""Copying backups into another repository (`nbdbackup copy`; docs/design.md "copy").

A copied backup keeps its id, disk, kind, created time, parent and set id; sets
are committed whole (one commit_set). The work per backup:

- base: the newest backup of the same disk that both repositories hold (same
  id), created before it; its parent when the destination has that. Maps are
  complete, so a position whose source entry equals the source base's entry
  takes the destination base's entry: the destination writer is an incremental
  on the destination base (it inherits every position not put, and pins the
  base against gc) and only the differing positions are read and put.
- every chunk read comes through BackupImage's checked reads (hash-checked,
  and authenticated when encrypted); it is then prepared by the destination's
  own codec, so a copy between id spaces (other key, plaintext -> encrypted)
  re-encrypts and maps ids; the writer's dedup stores only what the
  destination lacks.
- crash safety is the writer's: packs before rows, the set commit last. An
  interrupted copy leaves nothing listed; its rerun dedups against the packs
  that arrived (their rows were indexed at each pack seal).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from sqlalchemy import select

from ..errors import ChunkCorrupt, LockedError, NbdBackupError, RepoDamaged, UsageError
from ..progress import NoBar
from . import backuprows, maps
from .backuprows import info_columns, info_from_row
from .chunks import ZERO_REF
from .info import BackupInfo
from .mapbuilder import inheritable_positions
from .schema import backups, chunks

log = logging.getLogger("nbdbackup")

READ_BATCH = 32         # chunks per checked read: neighbours in a pack come in one ranged get
_IN_BATCH = 500


class CopyConflict(NbdBackupError):
    """The destination holds a backup with this id that is not a copy of the source's."""


@dataclass
class CopiedBackup:
    info: BackupInfo
    base: str | None            # the backup both hold that the copy was built on
    chunks_read: int = 0        # source chunks read (positions differing from the base)
    chunks_present: int = 0     # of those, already in the destination (not sent)
    bytes_read: int = 0         # plaintext bytes read from the source
    bytes_sent: int = 0         # record bytes written to the destination (chunks + map segments)
    duration_s: float = 0.0
    committed: BackupInfo | None = None     # the destination's row (its own read/stored bytes, duration)

    def to_json(self) -> dict:
        return {"id": self.info.id, "disk": self.info.disk, "kind": self.info.kind, "parent": self.info.parent,
                "base": self.base, "chunks_read": self.chunks_read, "chunks_skipped": self.chunks_present,
                "bytes_read": self.bytes_read, "bytes_sent": self.bytes_sent,
                "duration_s": round(self.duration_s, 3)}


@dataclass
class CopyFailure:
    ids: list[str]
    error: NbdBackupError

    def to_json(self) -> dict:
        return {"ids": self.ids, "error": str(self.error), "exit_code": int(self.error.exit_code)}


@dataclass
class CopyResult:
    copied: list[CopiedBackup] = field(default_factory=list)
    skipped: list[BackupInfo] = field(default_factory=list)      # the destination has them already
    failed: list[CopyFailure] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self.copied)

    @property
    def bytes_read(self) -> int:
        return sum(c.bytes_read for c in self.copied)

    @property
    def chunks_skipped(self) -> int:
        return sum(c.chunks_present for c in self.copied)

    def to_json(self) -> dict:
        return {"copied": [c.to_json() for c in self.copied], "skipped": [b.id for b in self.skipped],
                "failed": [f.to_json() for f in self.failed],
                "backups_copied": len(self.copied), "backups_skipped": len(self.skipped),
                "backups_failed": sum(len(f.ids) for f in self.failed),
                "bytes_read": self.bytes_read, "bytes_sent": self.bytes_sent,
                "chunks_skipped": self.chunks_skipped, "duration_s": round(self.duration_s, 3)}


def check_compatible(src, dst) -> None:
    """Refuse a destination that cannot hold the source's backups as they are (before any write)."""
    if src.config.chunk_size != dst.config.chunk_size:
        raise UsageError(f"the destination {dst.path} has chunk size {dst.config.chunk_size} bytes, the source "
                         f"{src.path} {src.config.chunk_size} bytes: a copy needs the same chunk size",
                         hint=f"create the destination with `nbdbackup init --chunk-size "
                              f"{src.config.chunk_size}`")
    if src.config.repo_id == dst.config.repo_id and _same_place(src, dst):
        raise UsageError(f"the destination {dst.path} is the source repository itself")


def _same_place(src, dst) -> bool:
    return src.path == dst.path and src.index_url == dst.index_url


def is_encrypted(repo) -> bool:
    return repo.codec.encrypted


def select_backups(src, refs: Sequence[str] = (), *, disk: str | None = None,
                   everything: bool = False) -> list[BackupInfo]:
    """The source backups named (ids or disk names = their latest), of *disk*, or all;
    with every other member of their sets; oldest first."""
    if everything:
        chosen = src.list_backups()
    elif disk is not None:
        chosen = src.list_backups(disk)
        if not chosen:
            from ..errors import NotFound
            raise NotFound(f"the source repository has no backup of disk {disk!r}", hint="see `nbdbackup list`")
    else:
        chosen = [src.resolve(r) for r in refs]
    by_id = {b.id: b for b in chosen}
    set_ids = {b.set_id for b in by_id.values() if b.set_id}
    if set_ids and not everything:
        for b in src.list_backups():
            if b.set_id in set_ids:
                by_id.setdefault(b.id, b)
    return sorted(by_id.values(), key=lambda b: (b.created, b.disk, b.id))


def _groups(infos: list[BackupInfo]) -> list[list[BackupInfo]]:
    """Commit units: a set's members together, every other backup alone; oldest first."""
    groups: dict[str, list[BackupInfo]] = {}
    out: list[list[BackupInfo]] = []
    for b in infos:
        if b.set_id:
            g = groups.get(b.set_id)
            if g is None:
                g = groups[b.set_id] = []
                out.append(g)
            g.append(b)
        else:
            out.append([b])
    return out


def copy_backups(src, dst, infos: list[BackupInfo], *,
                 progress: Callable[[int, str], object] | None = None,
                 on_done: Callable[[object], None] | None = None) -> CopyResult:
    """Copy *infos* (select_backups) from repository *src* into *dst*. A damaged source backup
    (ChunkCorrupt, RepoDamaged) or a held disk lock fails its set only (recorded in
    result.failed); any other error stops the copy."""
    check_compatible(src, dst)
    t0 = time.monotonic()
    result = CopyResult()
    dst_ids = _dst_backups(dst, {b.disk for b in infos}, [b.id for b in infos])
    src_by_disk: dict[str, list[BackupInfo]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="copy-read") as reader, \
            ThreadPoolExecutor(2, thread_name_prefix="copy-prepare") as pool:
        for group in _groups(infos):
            todo = []
            try:
                for b in group:
                    have = dst_ids.get(b.id)
                    if have is None:
                        todo.append(b)
                    elif (have.disk, have.size, have.chunk_size) != (b.disk, b.size, b.chunk_size):
                        raise CopyConflict(
                            f"the destination's backup {b.id} is of disk {have.disk!r} ({have.size} bytes), "
                            f"the source's of disk {b.disk!r} ({b.size} bytes): not a copy of it",
                            hint="two different backups share an id; this one is not copied")
                    else:
                        result.skipped.append(b)
                        if on_done:
                            on_done(b)
                if not todo:
                    continue
                for b in todo:
                    src_by_disk.setdefault(b.disk, None)
                    if src_by_disk[b.disk] is None:
                        src_by_disk[b.disk] = src.list_backups(b.disk)
                copied = _copy_set(src, dst, todo, src_by_disk, dst_ids, (reader, pool), progress)
            except _ArrivedMeanwhile:
                dst_ids.update(_dst_backups(dst, {b.disk for b in group}))
                for b in todo:
                    result.skipped.append(b)
                    if on_done:
                        on_done(b)
                continue
            except (ChunkCorrupt, RepoDamaged, LockedError, CopyConflict) as e:
                log.error("copy of %s failed: %s", ", ".join(b.id for b in group), e)
                result.failed.append(CopyFailure([b.id for b in todo or group], e))
                continue
            for c in copied:
                dst_ids[c.info.id] = c.committed      # a later backup's writer checks it as its parent
                result.copied.append(c)
                if on_done:
                    on_done(c)
    result.duration_s = time.monotonic() - t0
    return result


def _dst_backups(dst, disks: Iterable[str], ids: Iterable[str] = ()) -> dict[str, BackupInfo]:
    """The destination's backups of *disks* (bases), and those with one of *ids* whatever their disk
    (a backup there under another disk is a conflict, not a copy to make)."""
    out: dict[str, BackupInfo] = {}
    for d in sorted(set(disks)):
        out.update((b.id, b) for b in dst.list_backups(d))
    rest = sorted(set(ids) - set(out))
    for k in range(0, len(rest), _IN_BATCH):
        rows = backuprows.query(dst.index_db, select(*info_columns()).where(backups.c.id.in_(rest[k:k + _IN_BATCH])))
        out.update((b.id, b) for b in map(info_from_row, rows))
    return out


def pick_base(b: BackupInfo, src_backups: list[BackupInfo], dst_ids: dict[str, BackupInfo]) -> BackupInfo | None:
    """The source backup to build *b*'s copy on: its parent when the destination holds it, else the
    newest backup of its disk created before it that the destination holds (same id, same size
    class: disk and chunk size), else None (a full read of its non-zero positions)."""
    both = [s for s in src_backups
            if s.id in dst_ids and s.id != b.id and s.disk == b.disk and s.chunk_size == b.chunk_size
            and (dst_ids[s.id].disk, dst_ids[s.id].size) == (s.disk, s.size)
            and (s.created, s.id) < (b.created, b.id)]
    for s in both:
        if s.id == b.parent:
            return s
    return max(both, key=lambda s: (s.created, s.id)) if both else None


def _copy_set(src, dst, group: list[BackupInfo], src_by_disk, dst_ids, pools, progress) -> list[CopiedBackup]:
    """Write every member of *group* into *dst* and commit them as one set."""
    writers, jobs = [], []
    try:
        for b in group:
            t0 = time.monotonic()
            base = pick_base(b, src_by_disk[b.disk], dst_ids)
            w = dst.writer(b.disk, kind="incremental" if base else "full", size=b.size,
                           parent=dst_ids[base.id] if base else None, source=b.source, preserve=b)
            writers.append(w)
            if _arrived(dst, b):
                raise _ArrivedMeanwhile(b)
            job = CopiedBackup(b, base.id if base else None)
            _fill(src, dst, w, b, base, job, pools, progress)
            job.duration_s = time.monotonic() - t0
            jobs.append(job)
        # the set's VM definition: read and checked in the source, stored anew by DEST's codec
        vm = src.vm_definition(next((b for b in group if b.vm), group[0]))
        committed = dst.commit_set(writers, read_bytes=[j.bytes_read for j in jobs],
                                   duration_s=[j.duration_s for j in jobs], vm=vm)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for j, w, info in zip(jobs, writers, committed):
        j.bytes_sent = w.stored_bytes
        j.committed = info
    return jobs


class _ArrivedMeanwhile(Exception):
    """Another copy run committed this backup while we waited for its disk lock."""


def _arrived(dst, b: BackupInfo) -> bool:
    """Whether *dst* holds *b* by now; asked once its writer holds the disk lock, so a copy run that
    waited (--lock-wait) behind another one copying the same backup skips it instead of failing."""
    from ..errors import NotFound
    try:
        dst.get_backup(b.id)
    except NotFound:
        return False
    return True


def _fill(src, dst, w, b: BackupInfo, base: BackupInfo | None, job: CopiedBackup, pools, progress) -> None:
    """Put into writer *w* every position of *b* that differs from *base* (all non-zero ones without).
    One batch is read (reader thread) while the previous one is prepared (pool) and put (here)."""
    reader, pool = pools
    cs = b.chunk_size
    seg_len = src.config.segment_len
    same_ids = src.codec.id_space == dst.codec.id_space       # the same bytes have the same id in both
    bar = progress(b.size, f"copy {b.disk}") if progress else NoBar()
    images = []
    pending = None      # the batch being read: a future of (indexes, data, ids, present)

    def read_next(todo: list[int]) -> None:
        nonlocal pending
        fut = reader.submit(_read_batch, dst, img, todo, None if same_ids else pool)
        if pending is not None:
            _put_batch(dst, w, img, pending.result(), job, pool)
        pending = fut

    try:
        img = src.open_image(b)       # pins b (no forget, so no gc, while it is read)
        images.append(img)
        refs = src.checked_segment_refs(b)
        base_img = base_refs = None
        inherit_upto = 0
        if base is not None:
            base_img = src.open_image(base)
            images.append(base_img)
            base_refs = src.checked_segment_refs(base)
            inherit_upto = inheritable_positions(base.size, b.size, cs)
        todo: list[int] = []
        for seq in range(len(refs)):
            start, n = maps.segment_span(seq, seg_len, b.nchunks)
            # a whole segment that is the base's (same content hash) is inherited without being read
            if (base_refs is not None and start + n <= inherit_upto and seq < len(base_refs)
                    and refs[seq] == base_refs[seq]):
                bar.update(_span_bytes(start, n, b.size, cs))
                continue
            for i in range(start, start + n):
                ref = ZERO_REF if refs[seq] is None else img.chunk_ref(i)
                if i < inherit_upto and ref == base_img.chunk_ref(i):
                    continue        # the destination base's entry is this one's
                if ref == ZERO_REF:
                    w.put_zero(i)
                    continue
                todo.append(i)
                if len(todo) >= READ_BATCH:
                    read_next(todo)
                    todo = []
            bar.update(_span_bytes(start, n, b.size, cs))
        if todo:
            read_next(todo)
        if pending is not None:
            batch, pending = pending.result(), None
            _put_batch(dst, w, img, batch, job, pool)
        w.flush()
    finally:
        if pending is not None:      # failed meanwhile: let the reader finish with the image first
            pending.exception()
        for im in images:
            im.close()
        bar.close()


def _span_bytes(start: int, n: int, size: int, cs: int) -> int:
    return min(size, (start + n) * cs) - start * cs


def _read_batch(dst, img, indexes: list[int], hash_pool):
    """Chunks *indexes* read and checked (the first damaged one raises ChunkCorrupt, naming its disk
    byte range), their ids in the destination's space (hashed in *hash_pool* unless None: the same
    space, the source's entries), and which of those it has already."""
    data = img.read_chunks(indexes)
    ids = [img.chunk_ref(i) for i in indexes] if hash_pool is None else list(hash_pool.map(dst.codec.hash, data))
    return indexes, data, ids, _present(dst, ids)


def _put_batch(dst, w, img, batch, job: CopiedBackup, pool) -> None:
    """Prepare a read batch for the destination (compressing only what it lacks) and put it."""
    indexes, data, ids, present = batch
    level = dst.config.compression_level
    prepare = dst.codec.prepare
    prepared = list(pool.map(lambda d, h: prepare(d, level, h not in present), data, ids))
    for i, d, h, p in zip(indexes, data, ids, prepared):
        if p.hash != h:      # the source's id of these bytes is the destination's: a mismatch is a bug
            raise RepoDamaged(f"backup {img.info.id}: chunk at disk offset {i * img.chunk_size} hashes "
                              "differently on its way to the destination")
        w.put(i, p)
        job.chunks_read += 1
        job.bytes_read += len(d)
        job.chunks_present += h in present


def _present(dst, ids: list[bytes]) -> set[bytes]:
    """Which of *ids* the destination's index holds (those are put uncompressed: dedup drops them)."""
    hs = sorted(set(ids))
    out: set[bytes] = set()
    with dst.index_db.connect() as conn:
        for k in range(0, len(hs), _IN_BATCH):
            out.update(bytes(r[0]) for r in conn.execute(select(chunks.c.hash).where(
                chunks.c.hash.in_(hs[k:k + _IN_BATCH]))))
    return out
