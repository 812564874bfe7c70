"""What the server serves: the export interface, and one shared view per export.

The server never sees the repository. A catalog (see ExportCatalog) names the
exports and opens backends; a backend is a read-only image cut into chunks
(ExportBackend). ExportView puts the optional copy-on-write overlay on top and
is shared by every connection to the same backup, so all of them see one
state (what CAN_MULTI_CONN promises) and no connection keeps a private cache.

Blocking backend calls (reading, decompressing, checking a chunk) run in a
thread pool; everything else runs on the event loop, so each request's
state change (overlay write, read assembly) is atomic.

Chunks a request misses are read in batches of neighbours (at most
BATCH_BYTES each) through the backend's read_chunks() when it has one: on
object storage one ranged get for a run of records, not one per chunk. When
the misses continue a sequential stream (a read starting where an earlier
one ended), READ_AHEAD bytes of the chunks after it join the batch; they land
in the backend's cache and are not waited for. At most MAX_AHEAD chunks are
being read ahead per view, so read-ahead never holds more than that. When a
reader touches the middle chunk of a read-ahead window (a cache hit, usually),
the next window starts reading: a steady sequential reader meets no misses.
Writes that need backup bytes (partial overlay blocks) read ahead alike.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Protocol

from .overlay import BACKING, DATA, Overlay
from .server_ahead import READ_AHEAD, ReadAhead
from .server_extents import view_extents

Piece = tuple  # (offset, length, memoryview | None); None means zeroes

BATCH_BYTES = 1 << 20      # neighbouring chunks read in one backend call
HOT_TOUCH_EVERY = 64       # reads from the kept chunk per cache lookup that keeps it recent


class ExportBackend(Protocol):
    key: str            # identity: connections resolving to the same key share one view
    size: int
    chunk_size: int

    def is_zero(self, i: int) -> bool: ...
    def cached_chunk(self, i: int) -> bytes | None: ...   # non-blocking cache lookup
    def read_chunk(self, i: int) -> bytes: ...            # blocking; raises on damage
    # optional: def read_chunks(self, idxs) -> list[bytes | Exception]  (blocking, one batch)
    def close(self) -> None: ...


class ExportCatalog(Protocol):
    def list_exports(self) -> list[tuple[str, str]]: ...   # (name, description), fresh each call
    def resolve(self, name: str) -> str | None: ...        # export name -> backend key, now
    def describe(self, key: str) -> str: ...
    def size(self, key: str) -> int: ...                   # without opening the backup
    def open(self, key: str) -> ExportBackend: ...


class ChunkReadError(Exception):
    """Chunk .chunk of export .key could not be read or failed its check: the range answers EIO."""

    def __init__(self, key: str, chunk: int, reason):
        super().__init__(f"chunk {chunk} of {key}: {reason}")
        self.key = key
        self.chunk = chunk


class ExportView(ReadAhead):
    def __init__(self, backend: ExportBackend, pool: Executor, overlay: Overlay | None = None):
        self.backend = backend
        self.key = backend.key
        self.size = backend.size
        self.cs = backend.chunk_size
        self.pool = pool
        self.overlay = overlay
        self.refs = 0
        self._inflight: dict[int, asyncio.Future] = {}
        self._batch = max(1, BATCH_BYTES // self.cs)
        self._ahead = max(0, READ_AHEAD // self.cs)
        self._ahead_busy = 0                  # chunks being read ahead now
        self._next: dict[int, None] = {}      # chunk indexes where a sequential stream goes on
        self._triggers: dict[int, int] = {}   # chunk in a read-ahead window -> where the next starts
        self.misses = 0                       # chunks a reader had to start reading itself
        # The chunk the last one-chunk cached read found: small reads come in runs on one
        # chunk, and its bytes never change (checked once, when the cache was filled).
        self._hot_i, self._hot = -1, b""
        self._hot_hits = 0

    @property
    def writable(self) -> bool:
        return self.overlay is not None

    def chunk_len(self, i: int) -> int:
        return min(self.cs, self.size - i * self.cs)

    # --- chunk fetching -----------------------------------------------------
    def _read_checked(self, i: int) -> bytes:
        try:
            data = self.backend.read_chunk(i)
        except Exception as e:  # damaged pack, missing file, bad hash: all are EIO here
            raise ChunkReadError(self.key, i, e) from e
        if len(data) != self.chunk_len(i):
            raise ChunkReadError(self.key, i, f"{len(data)} bytes, expected {self.chunk_len(i)}")
        return data

    def _read_batch(self, idxs: list[int]) -> list:
        """Chunks *idxs* (neighbours) in a pool thread: bytes or ChunkReadError for each."""
        many = getattr(self.backend, "read_chunks", None)
        if many is None or len(idxs) == 1:
            out = []
            for i in idxs:
                try:
                    out.append(self._read_checked(i))
                except ChunkReadError as e:
                    out.append(e)
            return out
        try:
            got = many(idxs)
        except Exception as e:
            got = [e] * len(idxs)
        out = []
        for i, r in zip(idxs, got):
            if isinstance(r, BaseException):
                out.append(ChunkReadError(self.key, i, r))
            elif len(r) != self.chunk_len(i):
                out.append(ChunkReadError(self.key, i, f"{len(r)} bytes, expected {self.chunk_len(i)}"))
            else:
                out.append(r)
        return out

    def _start(self, idxs: list[int], loop, ahead: frozenset = frozenset()) -> None:
        """Read chunks *idxs* (sorted, none cached or in flight) in batches of neighbours; each
        gets a future in _inflight until its batch is read. *ahead*: those read ahead."""
        groups: list[list[int]] = []
        for i in idxs:
            if groups and i == groups[-1][-1] + 1 and len(groups[-1]) < self._batch:
                groups[-1].append(i)
            else:
                groups.append([i])
        for g in groups:
            futs = [loop.create_future() for _ in g]
            for i, f in zip(g, futs):
                self._inflight[i] = f
            n_ahead = sum(1 for i in g if i in ahead)
            self._ahead_busy += n_ahead

            def done(job, g=g, futs=futs, n_ahead=n_ahead):
                self._ahead_busy -= n_ahead
                try:
                    res = job.result()
                except BaseException as e:     # the pool is shutting down, or a bug
                    res = [ChunkReadError(self.key, i, e) for i in g]
                for i, f, r in zip(g, futs, res):
                    if self._inflight.get(i) is f:
                        del self._inflight[i]
                    if f.cancelled():
                        continue
                    if isinstance(r, BaseException):
                        f.set_exception(r)
                        if i in ahead:
                            f.exception()      # read ahead, maybe never asked for: no warning
                    else:
                        f.set_result(r)
            loop.run_in_executor(self.pool, self._read_batch, g).add_done_callback(done)

    async def fetch(self, idxs, *, read_ahead: bool = False) -> dict[int, bytes]:
        """Chunk bytes for *idxs* (non-zero chunks, sorted), reading missing ones in the pool.

        Concurrent requests for one chunk share a single read; with *read_ahead*, misses that
        continue a sequential stream start reading the chunks after them too."""
        out: dict[int, bytes] = {}
        waits = []
        missing = []
        loop = asyncio.get_running_loop()
        for i in idxs:
            data = self.backend.cached_chunk(i)
            if data is not None:
                out[i] = data
                continue
            fut = self._inflight.get(i)
            if fut is None or fut.cancelled():
                missing.append(i)
        ahead = self._read_ahead_of(missing) if read_ahead else []
        if missing:
            self.misses += len(missing)
            self._start(missing + ahead, loop, frozenset(ahead))
        for i in idxs:
            if i not in out:
                waits.append((i, self._inflight[i]))
        if waits:
            results = await asyncio.gather(*(f for _, f in waits), return_exceptions=True)
            for (i, _), r in zip(waits, results):
                if isinstance(r, BaseException):
                    if isinstance(r, ChunkReadError):
                        raise r
                    raise ChunkReadError(self.key, i, r) from r
                out[i] = r
        return out

    def chunk_range(self, lo: int, hi: int) -> range:
        return range(lo // self.cs, (hi - 1) // self.cs + 1)

    def _backing_pieces(self, lo: int, hi: int, chunks: dict[int, bytes], out: list) -> None:
        cs = self.cs
        for i in self.chunk_range(lo, hi):
            c0 = i * cs
            a = max(lo, c0)
            b = min(hi, c0 + cs)
            if self.backend.is_zero(i):
                out.append((a, b - a, None))
            else:
                out.append((a, b - a, memoryview(chunks[i])[a - c0:b - c0]))

    def segments(self, lo: int, hi: int):
        """(start, end, overlay state) runs over [lo, hi)."""
        ov = self.overlay
        if ov is None or ov.written == 0:
            yield lo, hi, BACKING
            return
        bs = ov.block
        p = lo
        while p < hi:
            b = p // bs
            st = ov.state[b]
            e = min(hi, (b + 1) * bs)
            while e < hi and ov.state[e // bs] == st:
                e = min(hi, e + bs)
            yield p, e, st
            p = e

    def _cached_chunks(self, lo: int, hi: int) -> dict[int, bytes] | None:
        """The non-zero chunks under [lo, hi) when all are cached, else None."""
        chunks = {}
        for i in self.chunk_range(lo, hi):
            if not self.backend.is_zero(i):
                data = self.backend.cached_chunk(i)
                if data is None:
                    return None
                chunks[i] = data
        return chunks

    # --- reads ----------------------------------------------------------------
    def read_cached(self, off: int, length: int) -> list | None:
        """Fast path: the pieces of a read served from cache and overlay alone, or None."""
        if self._triggers:
            self._touch(off // self.cs, (off + length - 1) // self.cs)
        ov = self.overlay
        if ov is not None and ov.written:
            return self._read_cached_overlay(off, length)
        cs = self.cs
        i = off // cs
        if (off + length - 1) // cs == i:   # the common case: inside one chunk
            if self._hot_i == i:
                data = self._hot
                self._hot_hits += 1
                # reads from the kept chunk skip the cache's lookup: now and then make one, or
                # the LRU sees the busiest chunk as idle, evicts it, and spanning reads and
                # read-ahead fetch it from the packs again
                if not self._hot_hits % HOT_TOUCH_EVERY:
                    self.backend.cached_chunk(i)
            elif self.backend.is_zero(i):
                return [(off, length, None)]
            else:
                data = self.backend.cached_chunk(i)
                if data is None:
                    return None
                self._hot_i, self._hot = i, data
            a = off - i * cs
            return [(off, length, memoryview(data)[a:a + length])]
        chunks = self._cached_chunks(off, off + length)
        if chunks is None:
            return None
        out: list = []
        self._backing_pieces(off, off + length, chunks, out)
        return out

    def _read_cached_overlay(self, off: int, length: int) -> list | None:
        segs = list(self.segments(off, off + length))
        found = []
        for a, b, st in segs:
            chunks = self._cached_chunks(a, b) if st == BACKING else None
            if st == BACKING and chunks is None:
                return None
            found.append(chunks)
        out: list = []
        for (a, b, st), chunks in zip(segs, found):
            self._segment_pieces(a, b, st, chunks, out)
        return out

    def _segment_pieces(self, a: int, b: int, st: int, chunks: dict[int, bytes] | None, out: list) -> None:
        """The pieces of segment [a, b) in overlay state *st*; *chunks*: its backup chunks (BACKING)."""
        if st == BACKING:
            self._backing_pieces(a, b, chunks, out)
        elif st == DATA:
            out.append((a, b - a, memoryview(self.overlay.pread(a, b - a))))
        else:
            out.append((a, b - a, None))

    async def read(self, off: int, length: int) -> list:
        """Pieces covering [off, off+length) in order. Raises ChunkReadError."""
        need = set()
        for a, b, st in self.segments(off, off + length):
            if st == BACKING:
                need.update(i for i in self.chunk_range(a, b) if not self.backend.is_zero(i))
        chunks = await self.fetch(sorted(need), read_ahead=True)
        # Assemble after the await: the overlay may have changed meanwhile, and
        # what we return must be one consistent state.
        out: list = []
        for a, b, st in self.segments(off, off + length):
            if st == BACKING:
                missing = [i for i in self.chunk_range(a, b) if not self.backend.is_zero(i) and i not in chunks]
                if missing:   # block was BACKING before the await too: states never return to it
                    chunks.update(await self.fetch(missing))
            self._segment_pieces(a, b, st, chunks, out)
        return out

    async def prefetch(self, off: int, length: int) -> None:
        await self.fetch([i for i in self.chunk_range(off, off + length) if not self.backend.is_zero(i)])

    # --- writes (overlay only) -----------------------------------------------
    def _spans(self, blocks: list[int]) -> list[tuple[int, int]]:
        ov = self.overlay
        return [(b * ov.block, b * ov.block + ov.block_len(b)) for b in blocks]

    def _join_blocks(self, blocks: list[int], spans: list, chunks: dict[int, bytes]) -> dict[int, bytes]:
        out = {}
        for b, (lo, hi) in zip(blocks, spans):
            pieces: list = []
            self._backing_pieces(lo, hi, chunks, pieces)
            out[b] = b"".join(bytes(p[1]) if p[2] is None else p[2] for p in pieces)
        return out

    async def _backing_blocks(self, blocks: list[int]) -> dict[int, bytes]:
        spans = self._spans(blocks)
        need = sorted({i for lo, hi in spans for i in self.chunk_range(lo, hi) if not self.backend.is_zero(i)})
        # Read-ahead too: a sequential writer of partial blocks needs each chunk's bytes in turn.
        return self._join_blocks(blocks, spans, await self.fetch(need, read_ahead=True))

    def _cached_blocks(self, blocks: list[int]) -> dict[int, bytes] | None:
        spans = self._spans(blocks)
        chunks: dict[int, bytes] = {}
        for lo, hi in spans:
            got = self._cached_chunks(lo, hi)
            if got is None:
                return None
            chunks.update(got)
        return self._join_blocks(blocks, spans, chunks)

    def write_cached(self, off: int, data) -> bool:
        """Fast path: apply a write at once when the backup bytes it needs are cached (or none
        are); False (nothing done) when they must be read first: then use write()."""
        if self.overlay.write_in_place(off, data):     # the common small write
            return True
        if self._triggers:
            self._touch(off // self.cs, (off + len(data) - 1) // self.cs)
        backing = self._cached_blocks(self.overlay.backing_blocks_needed(off, len(data)))
        if backing is None:
            return False
        self.overlay.write(off, data, backing)
        return True

    def zero_cached(self, off: int, length: int) -> bool:
        """zero() when no backup read is needed; False (nothing done) otherwise."""
        backing = self._cached_blocks(self.overlay.backing_blocks_needed(off, length))
        if backing is None:
            return False
        self.overlay.zero(off, length, backing)
        return True

    async def write(self, off: int, data) -> None:
        backing = await self._backing_blocks(self.overlay.backing_blocks_needed(off, len(data)))
        missing = [b for b in self.overlay.backing_blocks_needed(off, len(data)) if b not in backing]
        if missing:
            backing.update(await self._backing_blocks(missing))
        self.overlay.write(off, data, backing)

    async def zero(self, off: int, length: int) -> None:
        backing = await self._backing_blocks(self.overlay.backing_blocks_needed(off, length))
        missing = [b for b in self.overlay.backing_blocks_needed(off, length) if b not in backing]
        if missing:
            backing.update(await self._backing_blocks(missing))
        self.overlay.zero(off, length, backing)

    # --- block status ---------------------------------------------------------
    def extents(self, off: int, length: int, max_extents: int) -> list[tuple[int, int]]:
        """base:allocation extents (length, flags) from *off*, clamped to the request."""
        return view_extents(self, off, length, max_extents)
