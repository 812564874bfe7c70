"""DedupBatch: chunks put since the last index lookup, looked up together.

One `existing` query per BATCH_COUNT chunks or BATCH_BYTES of payload,
whichever comes first, instead of one per chunk; a chunk the index does not
have is then copied into the pack. Until flush() the batch references the
caller's payload buffers.
"""

from __future__ import annotations

from typing import Callable

from .chunks import PreparedChunk

BATCH_COUNT = 128        # dedup lookup batch: chunks...
BATCH_BYTES = 32 << 20   # ...or bytes of payload, whichever first


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
