"""Backup manifests: the one encoder and decoder of pack record type 3.

A manifest is JSON: {"format": 1, "info": BackupInfo, "segment_len": n,
"segments": [hex or null, ...]}. The writer stores it in a pack at commit and
the index keeps its id (the codec's hash) as backups.manifest_hash, so the manifest is what
authenticates a backup's index rows: re-encoding the rows must give the same
bytes (`rows_match`, no record read), and verify compares a decoded manifest
field by field (`disagreements`). rebuild-index recreates rows from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from ..errors import RepoDamaged
from .info import BackupInfo
from .packs import REC_MANIFEST, PackFormatError, pack_object_name, read_records, scan_records
from .store import Location, RecordError

FORMAT = 1


class ManifestError(ValueError):
    """A manifest record that does not parse (message says why)."""


@dataclass(frozen=True)
class Manifest:
    info: BackupInfo
    segment_len: int
    refs: list[bytes | None]      # segment hashes in order, None = all-zero segment


def encode(info: BackupInfo, segment_len: int, refs: list[bytes | None]) -> bytes:
    return json.dumps({"format": FORMAT, "info": info.to_json(), "segment_len": segment_len,
                       "segments": [r.hex() if r else None for r in refs]},
                      separators=(",", ":")).encode()


def decode(raw: bytes) -> Manifest:
    """Parse a manifest (its record hash already checked); ManifestError when malformed."""
    try:
        m = json.loads(raw)
        info = BackupInfo.from_json(m["info"])
        seg_len = m["segment_len"]
        refs = [bytes.fromhex(s) if s else None for s in m["segments"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"manifest does not parse: {e.__class__.__name__}: {e}") from None
    if not isinstance(seg_len, int) or any(r is not None and len(r) != 32 for r in refs):
        raise ManifestError("manifest does not parse: bad segment length or segment hash")
    return Manifest(info, seg_len, refs)


def rows_match(codec, info: BackupInfo, segment_len: int, refs: list[bytes | None],
               manifest_hash: bytes | None) -> bool:
    """Whether the index rows (*info*, *refs*) re-encode to the manifest the index names (its id
    under *codec*, the repository's: keyed in an encrypted one, so the index cannot forge it)."""
    return manifest_hash is not None and codec.hash(encode(info, segment_len, refs)) == bytes(manifest_hash)


def disagreements(m: Manifest, info: BackupInfo, segment_len: int, refs: list[bytes | None]) -> list[str]:
    """The fields where the index rows differ from manifest *m*, each named with both values."""
    out = [f"{f.name} (index {getattr(info, f.name)!r}, manifest {getattr(m.info, f.name)!r})"
           for f in fields(BackupInfo) if getattr(info, f.name) != getattr(m.info, f.name)]
    if segment_len != m.segment_len:
        out.append(f"segment_len (repository {segment_len}, manifest {m.segment_len})")
    if refs != m.refs:
        if len(refs) != len(m.refs):
            out.append(f"segment list (index {len(refs)} segments, manifest {len(m.refs)})")
        else:
            diff = [i for i, (a, b) in enumerate(zip(refs, m.refs)) if a != b]
            out.append(f"segment list ({len(diff)} segment(s) differ, first at seq {diff[0]})")
    return out


def locate(repo, hashes: set[bytes]) -> tuple[dict[bytes, Location], list[str]]:
    """Where the manifest records *hashes* are: every indexed pack's footer is read (its record
    headers walked when the footer is damaged). Returns (hash -> location, packs unreadable)."""
    from sqlalchemy import select

    from .schema import packs

    found: dict[bytes, Location] = {}
    unreadable: list[str] = []
    if not hashes:
        return found, unreadable
    with repo.index_db.connect() as conn:
        names = [r[0] for r in conn.execute(select(packs.c.name).order_by(packs.c.id))]
    for name in names:
        try:
            try:
                recs = read_records(repo.backend, name)
            except PackFormatError:
                recs = list(scan_records(repo.backend.get(pack_object_name(name))))
        except (PackFormatError, OSError) as e:
            unreadable.append(f"pack {name} ({e})")
            continue
        for rec in recs:
            if rec.type == REC_MANIFEST and rec.hash in hashes:
                found.setdefault(rec.hash, Location(name, rec.offset, rec.stored_len, rec.raw_len,
                                                    rec.compression))
    return found, unreadable


def read(repo, loc: Location, h: bytes) -> Manifest:
    """Read, hash-check and decode one manifest record (RecordError / ManifestError)."""
    return decode(repo.store.read_record(loc, h, REC_MANIFEST))


def check_rows(repo, info: BackupInfo, refs: list[bytes | None], manifest_hash: bytes | None) -> None:
    """RepoDamaged unless the index rows of *info* agree with its manifest. Re-encoding the rows
    reads nothing; only when that differs (damage, or a manifest an older version encoded
    differently) is the record looked for in the packs and compared field by field."""
    if rows_match(repo.codec, info, repo.config.segment_len, refs, manifest_hash):
        return
    hint = ("run `nbdbackup verify` for the details; `nbdbackup rebuild-index` recreates the index "
            "from the manifests in the packs")
    if manifest_hash is None:
        raise RepoDamaged(f"backup {info.id}: the index names no manifest for it (manifest_hash is NULL); "
                          "its index rows cannot be trusted", hint=hint)
    h = bytes(manifest_hash)
    loc = locate(repo, {h})[0].get(h)
    if loc is None:
        raise RepoDamaged(f"backup {info.id}: its index rows do not match the manifest the index names, and "
                          f"that manifest ({h.hex()[:16]}) is in no pack: the index is damaged", hint=hint)
    try:
        m = read(repo, loc, h)
    except (RecordError, ManifestError) as e:
        raise RepoDamaged(f"backup {info.id}: its manifest cannot be read: {e}", hint=hint) from None
    bad = disagreements(m, info, repo.config.segment_len, refs)
    if bad:
        raise RepoDamaged(f"backup {info.id}: the index disagrees with the backup's manifest in: "
                          + "; ".join(bad), hint=hint)
