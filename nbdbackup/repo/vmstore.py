"""Where a VM definition lives in the repository, and how it is read back.

A definition's encoding (repo/vmdef.py) is stored like a tiny disk: split at the repository's
chunk size into ordinary chunk records (type 1; an all-zero piece is ZERO_REF and stored
nowhere), listed in order by one map-segment record (type 2). `BackupInfo.vm` is that
segment's id in hex. So it is content-addressed and deduplicated (an unchanged VM's next set
stores nothing new), sealed by the codec in an encrypted repository, stamped under the
writer's lease, and every path that handles chunks and segments (gc's mark and repack,
rebuild-index, verify's reads) handles it once it follows the reference. The manifest holds
`vm` and `domain`, so the index cannot swap one VM's definition for another's.
The writing side is BackupWriter.store_vm_definition (repo/writer.py).
"""

from __future__ import annotations

from ..errors import RepoDamaged
from . import maps
from .chunks import HASH_SIZE, ZERO_REF, zeros
from .packs import REC_CHUNK
from .store import RecordError
from .vmdef import VmDefinition, VmDefinitionError, encoded_length

MAX_ENCODED = 64 << 20      # a domain XML is KiBs, an OVMF variable store at most a few MiB
_HINT = "run `nbdbackup verify` for the details"


def ref_of(segment_hash: bytes) -> str:
    return segment_hash.hex()


def segment_of(ref: str) -> bytes:
    """The segment id a `vm` reference names; RepoDamaged when it is not one."""
    try:
        h = bytes.fromhex(ref)
    except (ValueError, TypeError):
        h = b""
    if len(h) != HASH_SIZE:
        raise RepoDamaged(f"VM definition reference {str(ref)[:80]!r} is not a record id", hint=_HINT)
    return h


def pieces(encoded: bytes, chunk_size: int) -> list[bytes]:
    """*encoded* split at the chunk size (the last piece may be short)."""
    if len(encoded) > MAX_ENCODED:
        raise ValueError(f"VM definition of {len(encoded)} bytes is larger than {MAX_ENCODED}")
    return [encoded[i:i + chunk_size] for i in range(0, len(encoded), chunk_size)]


def chunk_ids(ctx, ref: str) -> list[bytes]:
    """The non-zero chunk ids the definition *ref* lists (its segment loaded and checked)."""
    raw = ctx.store.load_segment(segment_of(ref))
    return [e for e in maps.iter_entries(raw) if e != ZERO_REF]


def load(ctx, ref: str) -> VmDefinition:
    """Read, check (every record's id; the encoding's lengths) and decode definition *ref*.
    RepoDamaged when anything is missing, damaged or fails authentication."""
    try:
        return _load(ctx, ref)
    except RepoDamaged as e:
        raise RepoDamaged(f"VM definition {ref[:16]}: {e}", hint=e.hint or _HINT) from None


def _load(ctx, ref: str) -> VmDefinition:
    entries = list(maps.iter_entries(ctx.store.load_segment(segment_of(ref))))
    if not entries or entries[0] == ZERO_REF:
        raise RepoDamaged("its record list is empty or starts with a zero piece", hint=_HINT)
    data = _read_chunks(ctx.store, [e for e in entries if e != ZERO_REF])
    cs = ctx.config.chunk_size
    try:
        total = encoded_length(data[entries[0]])
    except VmDefinitionError as e:
        raise RepoDamaged(str(e), hint=_HINT) from None
    if (total + cs - 1) // cs != len(entries):
        raise RepoDamaged(f"it lists {len(entries)} pieces for {total} bytes", hint=_HINT)
    parts = []
    for i, e in enumerate(entries):
        n = maps.chunk_len(i, total, cs)
        part = zeros(n) if e == ZERO_REF else data[e]
        if len(part) != n:
            raise RepoDamaged(f"piece {i} has {len(part)} bytes, expected {n}", hint=_HINT)
        parts.append(part)
    try:
        return VmDefinition.decode(b"".join(parts))
    except VmDefinitionError as e:
        raise RepoDamaged(str(e), hint=_HINT) from None


def _read_chunks(store, hashes: list[bytes]) -> dict[bytes, bytes]:
    want = list(dict.fromkeys(hashes))
    out: dict[bytes, bytes] = {}
    for attempt in (0, 1):      # gc may move a record between the lookup and the read: ask again once
        todo = [h for h in want if h not in out]
        if not todo:
            break
        locs = store.chunk_locations(todo)
        missing = [h for h in todo if h not in locs]
        if missing:
            raise RepoDamaged(f"chunk {missing[0].hex()[:16]} is missing from the index", hint=_HINT)
        got = store.read_records([(locs[h], h) for h in todo], REC_CHUNK)
        errors = []
        for h, r in zip(todo, got):
            if isinstance(r, RecordError):
                errors.append((h, r))
            else:
                out[h] = bytes(r)
        if errors and attempt:
            h, r = errors[0]
            raise RepoDamaged(f"chunk {h.hex()[:16]} is damaged: {r}", hint=_HINT)
    return out
