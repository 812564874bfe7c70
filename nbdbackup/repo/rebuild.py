"""rebuild-index: recreate the index from the self-describing packs.

Order: scan every pack (read-only: footers, or record headers when a footer
is damaged; manifests are read and hash-checked), then build a fresh index
at the head revision beside the old one (`index.sqlite.rebuilding`, filled
in one transaction), then move the old index aside and rename the new one
into place; of the moved-aside copies the newest few are kept. A failed
build (a full disk, say) removes its half-made index; the old one stays.
Runs under the writers and readers locks taken exclusively, like gc. A
backup comes back when its manifest and all its map segments are found;
missing chunks are reported (verify names the ranges).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field

from sqlalchemy import insert, inspect
from sqlalchemy.exc import SQLAlchemyError

from ..errors import NoSpaceError, RepoDamaged, UsageError
from ..fsutil import fsync_path
from . import maps, vmstore
from .backuprows import insert_backup
from .chunks import ZERO_REF, DecodeError
from .exclusive import exclusive_access
from .ids import now_ms, to_ms
from .index import make_engine, shown_url, upgrade, write_txn
from .indexerrors import index_error
from .manifest import ManifestError
from .manifest import decode as decode_manifest
from .packs import (
    REC_CHUNK,
    REC_MANIFEST,
    REC_SEGMENT,
    PackFormatError,
    RecordInfo,
    pack_object_name,
    read_records,
    scan_records,
)
from .schema import chunks, packs, segments
from .store import record_row

_BATCH = 2000
KEEP_DAMAGED = 3        # index.sqlite.damaged-<UTC> copies kept by default (the newest)
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass
class RebuildReport:
    packs: int = 0
    packs_salvaged: list[str] = field(default_factory=list)     # footer damaged, headers walked
    packs_unreadable: list[str] = field(default_factory=list)
    chunks: int = 0
    segments: int = 0
    backups: list[str] = field(default_factory=list)
    backups_lost: list[dict] = field(default_factory=list)      # {"id", "reason"}
    backups_incomplete: list[dict] = field(default_factory=list)  # {"id", "missing_chunks"}
    old_index: str | None = None
    damaged_removed: list[str] = field(default_factory=list)    # older moved-aside copies deleted
    no_good_copy: list[str] = field(default_factory=list)       # "chunk ID": every duplicate failed its check

    def problem_lines(self) -> list[str]:
        out = [f"pack {p}: footer damaged, records recovered from their headers" for p in self.packs_salvaged]
        out += [f"pack {p}: unreadable, skipped" for p in self.packs_unreadable]
        out += [f"backup {b['id']} cannot be recovered: {b['reason']}" for b in self.backups_lost]
        out += [f"backup {b['id']} recovered with {b['missing_chunks']} chunk(s) missing "
                "(run `nbdbackup verify` for the byte ranges)" for b in self.backups_incomplete]
        out += [f"{r}: every stored copy is damaged; the first is indexed (run `nbdbackup verify`)"
                for r in self.no_good_copy]
        return out

    def summary_line(self) -> str:
        moved = f"; old index kept as {self.old_index}" if self.old_index else ""
        if self.damaged_removed:
            moved += f"; removed older copies {', '.join(os.path.basename(p) for p in self.damaged_removed)}"
        return (f"rebuilt the index from {self.packs} pack(s): {len(self.backups)} backup(s), {self.chunks} chunk(s), "
                f"{self.segments} map segment(s); {len(self.backups_lost)} backup(s) lost{moved}")

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Found:
    pack_rows: list[dict] = field(default_factory=list)
    blobs: dict = field(default_factory=lambda: {REC_CHUNK: {}, REC_SEGMENT: {}})  # type -> hash -> (pack, rec)
    manifests: dict[str, dict] = field(default_factory=dict)     # backup id -> (manifest, hash)
    # the same chunk or segment id in more than one record (a healed damaged copy and its fresh
    # copy, or two writers that stored it at once): (type, hash) -> the other candidates
    duplicates: dict = field(default_factory=dict)


def rebuild_index(path: str, *, index_url: str | None = None, lock_wait: float = 0.0,
                  progress=None, keep_damaged: int = KEEP_DAMAGED, s3_endpoint: str | None = None,
                  **open_kw) -> RebuildReport:
    """Rebuild the index of the repository at *path*; *progress*(total_packs) returns a bar.
    Of the old indexes moved aside (this run's included) the newest *keep_damaged* stay.
    *open_kw* go to Repository.open (an encrypted repository's key: manifests and segments
    are opened with it, so a record another key sealed is not taken)."""
    from .repository import Repository

    if keep_damaged < 1:
        raise UsageError("rebuild-index keeps at least the copy of the index it moves aside")
    repo = Repository.open(path, index_url=index_url, lock_wait=lock_wait, check=False, s3_endpoint=s3_endpoint,
                           **open_kw)
    try:
        with exclusive_access(repo, "rebuild-index"):
            return _rebuild(repo, progress, keep_damaged)
    finally:
        repo.close()


def _rebuild(repo, progress, keep_damaged: int) -> RebuildReport:
    rep = RebuildReport()
    found = _scan(repo.backend, repo.codec, rep, progress)
    repo.index.dispose()        # the old index file's connections (engine and sqlite3) closed
    url = repo.index_url
    if repo.index.dialect == "postgresql":
        from .rebuild_pg import rebuild_in_place

        try:
            rep.old_index, rep.damaged_removed = rebuild_in_place(
                url, lambda conn: _fill_in(conn, repo, found, rep), keep_damaged)
        except SQLAlchemyError as e:
            raise index_error(e, "writing the new index",
                              damaged_hint="the new index could not be written; the old one is untouched") from None
        return rep
    if not url.startswith("sqlite:///"):
        _require_empty(url)
        _build(url, repo, found, rep)
        return rep
    # SQLite: build beside, then swap, so a crash leaves the old index or the complete new one
    # (or, between the two renames, none: `open` then says so and rebuild-index runs again)
    db = url.removeprefix("sqlite:///")
    tmp = db + ".rebuilding"
    _remove_sqlite_files(tmp)       # a killed run's half-made index
    try:
        _build("sqlite:///" + tmp, repo, found, rep, single_file=True)
    except BaseException as e:
        _remove_sqlite_files(tmp)   # never leave a half-made index behind; the old one is untouched
        if isinstance(e, NoSpaceError):
            raise NoSpaceError(f"{e}; the old index is untouched",
                               hint="rebuild-index builds the new index beside the old one and needs room "
                                    f"for it (about the size of {os.path.basename(db)}); free that much and "
                                    "run it again") from None
        raise
    rep.old_index = _move_aside(db)
    os.rename(tmp, db)
    fsync_path(os.path.dirname(db), directory=True)
    rep.damaged_removed = _prune_damaged(db, keep_damaged)
    return rep


def _remove_sqlite_files(path: str) -> None:
    for suffix in ("", *_SQLITE_SIDE_FILES):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def _prune_damaged(db: str, keep: int) -> list[str]:
    """Delete all but the newest *keep* <db>.damaged-<UTC>[-n] copies; the paths deleted."""
    d, prefix = os.path.dirname(db), os.path.basename(db) + ".damaged-"

    def age(name: str):
        stamp, _, n = name[len(prefix):].partition("-")
        return stamp, int(n) if n.isdigit() else 1

    copies = sorted((f for f in os.listdir(d) if f.startswith(prefix) and not f.endswith(_SQLITE_SIDE_FILES)),
                    key=age)
    removed = []
    for name in copies[:max(len(copies) - keep, 0)]:
        _remove_sqlite_files(os.path.join(d, name))
        removed.append(os.path.join(d, name))
    return removed


def _build(url: str, repo, found: "_Found", rep: RebuildReport, *, single_file: bool = False) -> None:
    eng = make_engine(url)
    try:
        upgrade(eng, "head")
        _fill(eng, repo, found, rep)
        if single_file:   # fold the WAL into the file so that renaming the file moves everything
            raw = eng.raw_connection()      # outside any transaction (the driver is in autocommit)
            try:
                cur = raw.cursor()
                cur.execute("PRAGMA journal_mode=DELETE")
                cur.close()
            finally:
                raw.close()
    except (SQLAlchemyError, sqlite3.Error) as e:
        raise index_error(e, "writing the new index", path=url.removeprefix("sqlite:///") if single_file else None,
                          damaged_hint="the new index could not be written; the old one is untouched") from None
    finally:
        eng.dispose()
    if single_file:
        fsync_path(url.removeprefix("sqlite:///"))


def _scan(backend, codec, rep: RebuildReport, progress) -> _Found:
    found = _Found()
    objs = [o for o in backend.list("packs/") if o.endswith(".pack")]
    bar = progress(len(objs)) if progress is not None else None
    for obj in objs:
        name = obj.rsplit("/", 1)[-1][:-len(".pack")]
        rep.packs += 1
        try:
            size = backend.size(obj)
            try:
                recs = read_records(backend, name)
            except PackFormatError:
                recs = list(scan_records(backend.get(obj)))
                rep.packs_salvaged.append(name)
        except (PackFormatError, OSError) as e:
            rep.packs_unreadable.append(f"{name} ({e})")
            if bar is not None:
                bar.update(1)
            continue
        pidx = len(found.pack_rows)
        found.pack_rows.append({"name": name, "size": size})
        for rec in recs:
            if rec.type in found.blobs:
                first = found.blobs[rec.type].setdefault(rec.hash, (pidx, rec))
                if first[0] != pidx or first[1].offset != rec.offset:
                    found.duplicates.setdefault((rec.type, rec.hash), []).append((pidx, rec))
            elif rec.type == REC_MANIFEST:
                _read_manifest(backend, codec, obj, rec, found)
        if bar is not None:
            bar.update(1)
    rep.no_good_copy = _choose_readable(backend, codec, found)
    return found


def _choose_readable(backend, codec, found: _Found) -> list[str]:
    """For an id held by several records, index one that reads and checks fine (the first in
    scan order otherwise): a damaged copy beside a healed one must not win by pack order.
    Only duplicates are read, which are rare. Returns the ids ("chunk ID") no copy of which
    checked fine: reported, not silently indexed."""
    no_good: list[str] = []
    for (rtype, h), others in found.duplicates.items():
        for pidx, rec in [found.blobs[rtype][h], *others]:
            obj = pack_object_name(found.pack_rows[pidx]["name"])
            try:
                codec.decode(rtype, rec.compression, rec.raw_len, h, backend.get(obj, rec.offset, rec.stored_len),
                             flags=rec.flags)
            except (DecodeError, OSError):
                continue
            found.blobs[rtype][h] = (pidx, rec)
            break
        else:
            no_good.append(f"{'chunk' if rtype == REC_CHUNK else 'map segment'} {h.hex()}")
    return sorted(no_good)


def _read_manifest(backend, codec, obj: str, rec: RecordInfo, found: _Found) -> None:
    try:
        raw = codec.decode(REC_MANIFEST, rec.compression, rec.raw_len, rec.hash,
                           backend.get(obj, rec.offset, rec.stored_len), flags=rec.flags)
        m = decode_manifest(raw)
    except (DecodeError, ManifestError, OSError):
        return      # a damaged manifest: its backup is reported lost unless a copy is found elsewhere
    found.manifests.setdefault(m.info.id, {"manifest": m, "hash": rec.hash})


def _move_aside(db: str) -> str | None:
    """Rename the SQLite index file (with its -wal/-shm) to <db>.damaged-<UTC time>; never delete it."""
    if not os.path.exists(db):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{db}.damaged-{stamp}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{db}.damaged-{stamp}-{n}"
    for suffix in ("-wal", "-shm", ""):       # the main file last: it is what marks the index
        if os.path.exists(db + suffix):
            os.rename(db + suffix, target + suffix)
    return target


def _require_empty(url: str) -> None:
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            tables = inspect(conn).get_table_names()
    finally:
        eng.dispose()
    if tables:
        raise UsageError(f"the index database {shown_url(url)} is not empty; rebuild-index only moves "
                         "SQLite index files aside by itself",
                         hint="give --index-url a new, empty database (or drop the old one's tables), then run again")


def _fill(eng, repo, found: _Found, rep: RebuildReport) -> None:
    with write_txn(eng) as conn:
        _fill_in(conn, repo, found, rep)


def _fill_in(conn, repo, found: _Found, rep: RebuildReport) -> None:
    """The new index's rows, in the caller's transaction *conn*."""
    seg_len = repo.config.segment_len
    ids = []
    for row in found.pack_rows:
        ids.append(conn.execute(insert(packs).values(name=row["name"], size=row["size"],
                                                     created_ms=to_ms(now_ms()))).inserted_primary_key[0])
    for rtype, table in ((REC_CHUNK, chunks), (REC_SEGMENT, segments)):
        rows = [record_row(ids[pidx], h, rec) for h, (pidx, rec) in found.blobs[rtype].items()]
        for i in range(0, len(rows), _BATCH):
            conn.execute(insert(table), rows[i:i + _BATCH])
    rep.chunks, rep.segments = len(found.blobs[REC_CHUNK]), len(found.blobs[REC_SEGMENT])
    for bid, entry in sorted(found.manifests.items()):
        _add_backup(conn, repo, bid, entry, seg_len, found, rep)


def _add_backup(conn, repo, bid: str, entry: dict, seg_len: int, found: _Found, rep: RebuildReport) -> None:
    m = entry["manifest"]
    info, refs = m.info, m.refs
    try:
        if m.segment_len != seg_len or info.chunk_size != repo.chunk_size:
            raise ValueError("segment length or chunk size differs from the repository's")
        if len(refs) != maps.nsegments(info.nchunks, seg_len):
            raise ValueError("segment list has the wrong length")
    except ValueError as e:
        rep.backups_lost.append({"id": bid, "reason": f"manifest does not parse: {e}"})
        return
    segs = found.blobs[REC_SEGMENT]
    missing = [r for r in refs if r is not None and r not in segs]
    if missing:
        rep.backups_lost.append({"id": bid, "reason": f"{len(missing)} map segment(s) not found in any pack"})
        return
    missing_chunks = _missing_chunks(repo.backend, repo.codec, refs, found)
    if missing_chunks is None:
        rep.backups_lost.append({"id": bid, "reason": "a map segment is damaged"})
        return
    if info.vm is not None:     # its VM definition (repo/vmstore.py): no disk bytes depend on it
        try:
            vm_seg = vmstore.segment_of(info.vm)
        except RepoDamaged:
            vm_seg = b""
        vm_missing = _missing_chunks(repo.backend, repo.codec, [vm_seg], found) if vm_seg in segs else None
        missing_chunks += 1 if vm_missing is None else vm_missing
    insert_backup(conn, info, refs, entry["hash"])
    rep.backups.append(info.id)
    if missing_chunks:
        rep.backups_incomplete.append({"id": info.id, "missing_chunks": missing_chunks})


def _missing_chunks(backend, codec, refs, found: _Found) -> int | None:
    """Chunks the backup's map names that no pack holds (None: a segment is unreadable)."""
    chunk_recs = found.blobs[REC_CHUNK]
    n = 0
    for h in {r for r in refs if r is not None}:
        pidx, rec = found.blobs[REC_SEGMENT][h]
        obj = pack_object_name(found.pack_rows[pidx]["name"])
        try:
            raw = codec.decode(REC_SEGMENT, rec.compression, rec.raw_len, h,
                               backend.get(obj, rec.offset, rec.stored_len), flags=rec.flags)
        except (DecodeError, OSError):
            return None
        n += sum(1 for e in maps.iter_entries(raw) if e != ZERO_REF and e not in chunk_recs)
    return n
