"""Damage marks: what a verify found damaged, so that the next backup heals it.

A verify that finds a chunk or map segment damaged (missing from the index,
its pack gone, unreadable, failing its hash or AEAD tag) records a mark in
`damaged_records` (kind, id, where the bad copy was, why, when). A writer
loads the marked ids once when it starts (the table is nearly always empty:
one cheap query, nothing per dedup lookup) and does not deduplicate against
them: the next backup that reads the same bytes stores a fresh copy, and the
sealer's index transaction points the record's row at it (maps name ids, so
no backup is rewritten) and stamps the mark healed_ms. The next verify that
reads the record fine reports the mark healed and deletes it; one that still
finds it bad keeps it ("remains"). Marks are index-only state: rebuild-index
starts without them, and gc deletes the marks of records it deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, exists, select, update

from .ids import now_ms, to_ms
from .index import write_txn
from .schema import chunks, damaged_records, packs, segments

KINDS = {"chunk": chunks, "segment": segments}
_IN_BATCH = 500


@dataclass(frozen=True)
class Mark:
    kind: str                 # "chunk" or "segment"
    hash: bytes
    pack: str | None          # where the bad copy was (None: the index had no row)
    offset: int | None
    reason: str
    found_ms: int
    healed_ms: int | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "id": self.hash.hex(), "pack": self.pack, "offset": self.offset,
                "reason": self.reason, "found_ms": self.found_ms, "healed_ms": self.healed_ms}


def marks(eng) -> dict[tuple[str, bytes], Mark]:
    """Every mark, by (kind, id)."""
    with eng.connect() as conn:
        rows = conn.execute(select(damaged_records.c.kind, damaged_records.c.hash, damaged_records.c.pack,
                                   damaged_records.c.offset, damaged_records.c.reason,
                                   damaged_records.c.found_ms, damaged_records.c.healed_ms)).all()
    return {(r[0], bytes(r[1])): Mark(r[0], bytes(r[1]), *r[2:]) for r in rows}


def marked_ids(eng) -> dict[str, set[bytes]]:
    """The ids a writer must not deduplicate against: kind -> ids not healed yet."""
    out: dict[str, set[bytes]] = {k: set() for k in KINDS}
    with eng.connect() as conn:
        for kind, h in conn.execute(select(damaged_records.c.kind, damaged_records.c.hash)
                                    .where(damaged_records.c.healed_ms.is_(None))):
            if kind in out:
                out[kind].add(bytes(h))
    return out


def record(eng, found: list[Mark]) -> None:
    """Record (or refresh) the marks *found*: a mark already there keeps its found_ms and is
    un-healed (a fresh copy that is itself bad heals nothing). One upsert: two verifies that
    find the same damage at once (PostgreSQL, READ COMMITTED) both succeed."""
    if not found:
        return
    with write_txn(eng) as conn:
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        t = damaged_records
        stmt = dialect_insert(t)
        stmt = stmt.on_conflict_do_update(index_elements=[t.c.kind, t.c.hash], set_={
            "pack": stmt.excluded.pack, "offset": stmt.excluded.offset, "reason": stmt.excluded.reason,
            "healed_ms": None})
        # sorted: concurrent verifies lock the marks in one order (no deadlock on PostgreSQL)
        conn.execute(stmt, [{"kind": m.kind, "hash": m.hash, "pack": m.pack, "offset": m.offset,
                             "reason": m.reason, "found_ms": m.found_ms, "healed_ms": None}
                            for m in sorted(found, key=lambda m: (m.kind, m.hash))])


def clear(eng, keys: list[tuple[str, bytes]]) -> None:
    """Delete the marks *keys* (kind, id): verify read them fine."""
    if not keys:
        return
    with write_txn(eng) as conn:
        for kind, h in sorted(keys):
            conn.execute(delete(damaged_records).where(damaged_records.c.kind == kind,
                                                        damaged_records.c.hash == h))


def heal_rows(conn, table, rows: list[dict], epoch: int) -> None:
    """In a sealer's index transaction, after upsert_rows stamped *epoch* (never lowering a
    row's used_epoch): point the rows of marked records at the fresh copies *rows* (record_row
    dicts of the pack just written) and mark them healed. Only a row still at the damaged
    location the mark names moves: one another writer healed meanwhile stays where it is (our
    copy is garbage), so a late writer never undoes a newer heal, and used_epoch is left to the
    upsert's max() (a lower epoch would let gc delete a row a newer backup relies on)."""
    if not rows:
        return
    kind = "chunk" if table is chunks else "segment"
    t = damaged_records
    wanted = [r["hash"] for r in rows]
    where: dict[bytes, tuple[str, int]] = {}
    for i in range(0, len(wanted), _IN_BATCH):
        for h, pack, offset in conn.execute(select(t.c.hash, t.c.pack, t.c.offset).where(
                t.c.kind == kind, t.c.hash.in_(wanted[i:i + _IN_BATCH]), t.c.healed_ms.is_(None))):
            where[bytes(h)] = (pack, offset)
    stamp = to_ms(now_ms())
    for r in sorted(rows, key=lambda r: r["hash"]):
        if r["hash"] not in where:      # healed by another writer, or cleared by a verify
            continue
        bad_pack, bad_offset = where[r["hash"]]
        if bad_pack is None:    # the index had no row: healed if the upsert's row is our copy
            healed = conn.execute(select(table.c.hash).where(
                table.c.hash == r["hash"], table.c.pack_id == r["pack_id"], table.c.offset == r["offset"])).first()
        else:
            damaged_pack = select(packs.c.id).where(packs.c.name == bad_pack).scalar_subquery()
            healed = conn.execute(update(table).where(
                table.c.hash == r["hash"], table.c.pack_id == damaged_pack, table.c.offset == bad_offset).values(
                pack_id=r["pack_id"], offset=r["offset"], stored_len=r["stored_len"], raw_len=r["raw_len"],
                compression=r["compression"])).rowcount
        if healed:
            conn.execute(update(t).where(t.c.kind == kind, t.c.hash == r["hash"]).values(healed_ms=stamp))


def forget_deleted(conn, table, hashes: list[bytes]) -> None:
    """In gc's sweep transaction: delete the marks of the records *hashes* of *table* whose row
    is gone now (nothing refers to them any more)."""
    kind = "chunk" if table is chunks else "segment"
    t = damaged_records
    for i in range(0, len(hashes), _IN_BATCH):
        part = hashes[i:i + _IN_BATCH]
        conn.execute(delete(t).where(t.c.kind == kind, t.c.hash.in_(part),
                                     ~exists().where(table.c.hash == t.c.hash)))
