"""DedupBatch: chunks put since the last index lookup, looked up together.

One `existing` query per BATCH_COUNT chunks or BATCH_BYTES of payload,
whichever comes first, instead of one per chunk; a chunk the index does not
have is then copied into the pack. Until flush() the batch references the
caller's payload buffers.
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import select, update

from .chunks import PreparedChunk
from .index import write_txn

BATCH_COUNT = 128        # dedup lookup batch: chunks...
BATCH_BYTES = 32 << 20   # ...or bytes of payload, whichever first
_IN_BATCH = 500


class DedupBatch:
    def __init__(self, *, is_pending: Callable[[bytes], bool], indexed: Callable[[list[bytes]], set[bytes]],
                 store: Callable[[PreparedChunk], None]):
        """*is_pending*(hash): in a pack this writer has not indexed yet; *indexed*(hashes): those
        the index has; *store*(chunk): copy one into the pack."""
        self._is_pending, self._indexed, self._store = is_pending, indexed, store
        self._chunks: list[PreparedChunk] = []
        self._bytes = 0

    def add(self, p: PreparedChunk) -> bool:
        """Queue *p* unless this writer stores it already; True when the batch is full."""
        if self._is_pending(p.hash):
            return False
        self._chunks.append(p)
        self._bytes += len(p.payload)
        return len(self._chunks) >= BATCH_COUNT or self._bytes >= BATCH_BYTES

    def flush(self) -> None:
        """Look the batch up and store the chunks nobody has; the batch is empty afterwards."""
        if not self._chunks:
            return
        batch, self._chunks, self._bytes = self._chunks, [], 0
        todo = {p.hash: p for p in batch if not self._is_pending(p.hash)}
        have = self._indexed(list(todo))
        for h, p in todo.items():
            if h not in have:
                self._store(p)

    def clear(self) -> None:
        self._chunks.clear()


# -- used epochs (docs/design.md "gc beside everything") --------------------------------------

def stamp_existing(eng, table, hashes: list[bytes], epoch: int) -> set[bytes]:
    """Which of *hashes* the index has, each stamped used_epoch >= *epoch* (so no gc whose cutoff
    is <= epoch deletes it). Cheap path: one plain SELECT; only rows stamped older need the write
    transaction, which stamps them and then re-reads which still exist (a row a gc deleted
    meanwhile is missing from the answer: the caller stores the record again)."""
    hs = sorted(set(hashes))      # one lock order for every writer (no deadlocks on PostgreSQL)
    fresh: set[bytes] = set()
    stale: list[bytes] = []
    if not hs:
        return fresh
    with eng.connect() as conn:
        for i in range(0, len(hs), _IN_BATCH):
            for h, used in conn.execute(select(table.c.hash, table.c.used_epoch).where(
                    table.c.hash.in_(hs[i:i + _IN_BATCH]))):
                (fresh.add if used >= epoch else stale.append)(bytes(h))
    if not stale:
        return fresh
    stale.sort()
    with write_txn(eng) as conn:
        for i in range(0, len(stale), _IN_BATCH):
            part = stale[i:i + _IN_BATCH]
            conn.execute(update(table).where(table.c.hash.in_(part), table.c.used_epoch < epoch)
                         .values(used_epoch=epoch))
            fresh.update(bytes(r[0]) for r in conn.execute(select(table.c.hash).where(table.c.hash.in_(part))))
    return fresh


def upsert_rows(conn, table, rows: list[dict], epoch: int) -> None:
    """Insert record rows stamped *epoch*; a row another writer inserted first (same hash) is
    kept as it is and stamped instead (the record is then stored twice, harmless)."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(table)
    stmt = stmt.on_conflict_do_update(index_elements=[table.c.hash], set_={"used_epoch": stmt.excluded.used_epoch},
                                      where=table.c.used_epoch < stmt.excluded.used_epoch)
    # sorted: writers sharing chunks lock their rows in one order (no deadlock on PostgreSQL)
    conn.execute(stmt, [dict(r, used_epoch=epoch) for r in sorted(rows, key=lambda r: r["hash"])])
