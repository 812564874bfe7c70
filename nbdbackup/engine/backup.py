"""The backup pipeline: extents -> chunk actions -> parallel reads -> prepare -> put -> commit.

Reads are spread over a connection pool by worker threads; each worker reads
one chunk and prepares it (zero check, blake3, zstd: these release the GIL).
The main thread walks extents, submits work, and puts prepared chunks into
the writer (dedup lookups are batched there). At most `inflight` chunks are
in flight, so memory does not depend on the disk size. Nothing is committed
unless every chunk was read; the source learns the outcome (committed/failed)
so it can advance or keep its bitmaps.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import Callable

from ..errors import NbdConnectionError, NbdError, NbdProtocolError, SourceFailed
from ..nbd.futures import resolve
from ..progress import NoBar
from .chunkplan import READ, SKIP, ZERO, bytes_of, chunk_runs

log = logging.getLogger(__name__)

BASE_ALLOCATION = "base:allocation"


@dataclass
class BackupOptions:
    connections: int = 4
    no_fallback: bool = False
    progress: Callable | None = None        # (total_bytes, description) -> bar with update()/close()
    retries: int = 3                        # per chunk after a server error (EIO...), before SourceFailed
    reconnects: int = 2                     # pool: reconnect attempts (and resends) after a dropped connection
    retry_delay: float = 0.2                # first back-off, doubled each time
    workers: int | None = None              # default: 2 per connection
    inflight_bytes: int = 64 << 20          # bound on chunk data held in memory
    adaptive: bool = True                   # store a chunk raw when the compression cores are busy (see _CoreGate)


@dataclass
class DiskStats:
    read_bytes: int = 0         # bytes read from the source
    data_bytes: int = 0         # of those, bytes in non-zero chunks
    packed_bytes: int = 0       # their size after compression, before dedup
    zero_chunks: int = 0
    read_chunks: int = 0
    inherited_chunks: int = 0
    uncompressed_chunks: int = 0    # stored raw without trying zstd: the CPU was busy (adaptive)


@dataclass
class BackupResult:
    info: object                # repo BackupInfo
    stats: DiskStats = field(default_factory=DiskStats)
    fallback_reason: str | None = None


def run_backup(repo, source, kind: str, opts: BackupOptions) -> list[BackupResult]:
    """Back up every disk the source plans; commit them together; tell the source."""
    plans = []
    writers = []
    try:
        plans = source.prepare(repo, kind, opts.no_fallback)
        results = []
        for plan in plans:
            w, stats, started = _backup_disk(repo, plan, opts, set_id=None)
            writers.append((w, stats, started))
            results.append(BackupResult(None, stats, plan.fallback_reason))
        infos = _commit(repo, writers)
        for r, info in zip(results, infos):
            r.info = info
    except BaseException as exc:
        for w, _, _ in writers:
            _abort_quietly(w)
        try:
            source.failed(exc)
        finally:
            source.close()
        raise
    try:
        source.committed(plans, infos)
    finally:
        source.close()
    return results


def _commit(repo, writers) -> list:
    if len(writers) == 1:
        w, stats, started = writers[0]
        return [w.commit(read_bytes=stats.read_bytes, duration_s=time.monotonic() - started)]
    now = time.monotonic()
    return repo.commit_set([w for w, _, _ in writers],
                           read_bytes=[s.read_bytes for _, s, _ in writers],
                           duration_s=[now - t for _, _, t in writers])


def _abort_quietly(w) -> None:
    try:
        w.abort()
    except Exception as e:  # the original failure matters more
        log.debug("abort failed: %s", e)


def _backup_disk(repo, plan, opts: BackupOptions, set_id):
    from ..nbd.pool import ConnectionPool

    started = time.monotonic()
    contexts = [BASE_ALLOCATION] + ([plan.bitmap_context] if plan.bitmap_context else [])
    pool = ConnectionPool(plan.uri, connections=opts.connections, meta_contexts=contexts,
                          retries=opts.reconnects)
    try:
        if plan.bitmap_context and plan.bitmap_context not in pool.contexts:
            raise SourceFailed(f"the export stopped offering {plan.bitmap_context}")
        size = pool.size
        parent = repo.resolve(plan.parent_id) if plan.kind == "incremental" else None
        w = repo.writer(plan.disk, kind=plan.kind, size=size, parent=parent, bitmap=plan.bitmap,
                        checkpoint=plan.checkpoint, set_id=set_id, source=plan.extra.get("source"))
        try:
            stats = _pipeline(pool, w, plan, parent, size, opts)
        except BaseException:
            _abort_quietly(w)
            raise
    finally:
        pool.close()
    return w, stats, started


def _force_from(parent, size: int, chunk_size: int) -> int | None:
    """First chunk whose length or existence changed with a resize (read from there on)."""
    if parent is None or parent.size == size:
        return None
    return min(parent.size, size) // chunk_size


def _pipeline(pool, w, plan, parent, size: int, opts: BackupOptions) -> DiskStats:
    from ..nbd.extents import walk_extents

    cs = w.chunk_size
    full = plan.kind == "full"
    stats = DiskStats()
    bar = opts.progress(size, f"{plan.kind} {plan.disk}") if opts.progress else NoBar()
    workers = opts.workers or max(2, 2 * len(pool.clients))
    inflight_max = max(workers + 2, opts.inflight_bytes // cs)
    pending: deque = deque()    # (index, length, future of (PreparedChunk, compressed?)), in disk order
    gate = _CoreGate(_cores() if opts.adaptive else None)
    lost: list = []             # (index, length, error) of a read whose connection is gone for good
    free: list = []             # read buffers to reuse (warm pages: no page faults, no zeroing)

    def submit(index: int) -> None:
        off = index * cs
        length = min(cs, size - off)
        out: Future = Future()
        try:
            buf = free.pop()
        except IndexError:
            buf = bytearray(cs)
        view = memoryview(buf)[:length]
        try:
            rf = pool.submit_read_into(off, view)
        except NbdError as e:
            rf = Future()
            rf.set_exception(e)
        rf.add_done_callback(lambda f: _prepare_on_arrival(f, out, w, view, gate, lost, index, buf, free))
        pending.append((index, length, out))

    def put_done(block: bool) -> None:
        while pending and (block or pending[0][2].done()):
            while not pending[0][2].done():
                if lost:    # stop at once: reads queued behind reconnect attempts fail now, not one by one
                    pool.close()
                    index, length, e = lost[0]
                    _read_with_retries(pool, index * cs, length, opts, first_error=e)
                    raise AssertionError("unreachable")
                _wait(pending[0][2], 0.05)
            index, length, fut = pending.popleft()
            try:
                prepared, tried = fut.result()
            except NbdProtocolError:
                raise       # a misbehaving server: its own exit code, no retry
            except NbdError as e:
                # Retries (and their back-off) run here, in order; other reads carry on meanwhile.
                prepared, tried = w.prepare(_read_with_retries(pool, index * cs, length, opts, first_error=e)), True
            if not tried and not prepared.is_zero:
                stats.uncompressed_chunks += 1
            stats.read_bytes += length
            stats.read_chunks += 1
            if prepared.is_zero:
                stats.zero_chunks += 1
            else:
                stats.data_bytes += prepared.raw_len
                stats.packed_bytes += len(prepared.payload)
            w.put(index, prepared)
            bar.update(length)
            block = False

    extents = walk_extents(pool, bitmap_context=plan.bitmap_context)
    runs = chunk_runs(extents, chunk_size=cs, size=size, all_dirty=full,
                      force_from=None if full else _force_from(parent, size, cs))
    gc.freeze()     # collections during the pipeline need not walk the start-up objects again
    try:
        for run in runs:
            if run.action == SKIP:
                stats.inherited_chunks += run.end - run.start
                bar.update(bytes_of(run, cs, size))
                continue
            if run.action == ZERO:
                stats.zero_chunks += run.end - run.start
                if not full:       # a full's unput positions are zero already
                    for i in range(run.start, run.end):
                        w.put_zero(i)
                bar.update(bytes_of(run, cs, size))
                continue
            assert run.action == READ
            for i in range(run.start, run.end):
                while len(pending) >= inflight_max:
                    put_done(block=True)
                submit(i)
                put_done(block=False)
        while pending:
            put_done(block=True)
    except NbdProtocolError:
        raise
    except NbdError as e:   # the extent walk failed (the pool already retried with reconnect)
        raise SourceFailed(f"source {plan.disk} failed during the backup: {e}",
                           hint="nothing was committed; check the NBD server and retry") from None
    finally:
        gc.unfreeze()
        bar.close()
    return stats


def _wait(f: Future, timeout: float) -> None:
    try:
        f.exception(timeout)
    except (FuturesTimeout, CancelledError):
        pass


def _prepare_on_arrival(f: Future, out: Future, w, view: memoryview, gate: "_CoreGate", lost: list,
                        index: int, buf: bytearray, free: list) -> None:
    """Done-callback of a read (on the connection's receiver thread): hash and compress
    right there, so a chunk changes threads once (to the main thread's put) instead of
    three times. blake3/zstd release the GIL, so receivers of different connections
    prepare in parallel."""
    try:
        e = f.exception()
        if isinstance(e, NbdConnectionError):   # the pool gave up reconnecting: tell the main thread now
            lost.append((index, len(view), e))
        f.result()
        compress = gate.enter()
        try:
            # bytearray compares with memcmp (a memoryview byte by byte); a short last chunk is rare
            data = buf if len(view) == len(buf) else bytes(view)
            prepared = w.prepare(data, compress)   # copies what it keeps: *buf* can be reused
        finally:
            gate.leave()
        free.append(buf)    # only after a completed read: nothing writes into it any more
        resolve(out, (prepared, compress))
    except BaseException as e:  # noqa: BLE001 - surfaced through *out*
        resolve(out, exc=e)


class _CoreGate:
    """Adaptive compression (like `zstd --adapt`): a chunk that arrives while `cores`
    chunks are already being prepared is hashed and stored raw instead of waiting for a
    core to compress it. `cores` is the CPU count less one, kept for the read/write path
    (socket copies, pack writes and fsync, often the NBD server too). So compression uses
    spare CPU only and does not slow the backup below what reading, hashing and writing
    allow; the price is a worse ratio when CPU is short (DiskStats.uncompressed_chunks
    counts them; docs/design.md has the figures). cores=None: always compress."""

    def __init__(self, cores: int | None):
        self.cores = cores
        self.busy = 0
        self.lock = threading.Lock()

    def enter(self) -> bool:
        with self.lock:
            self.busy += 1
            return self.cores is None or self.busy <= self.cores

    def leave(self) -> None:
        with self.lock:
            self.busy -= 1


def _cores() -> int:
    """CPUs for compression: all we may run on but one (at least one)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n - 1)


def _read_with_retries(pool, offset: int, length: int, opts: BackupOptions, first_error: NbdError | None = None):
    """pool.read, again after a server error (EIO...); the pool itself already
    reconnects and resends after a dropped connection. *first_error*: how the
    first attempt (made asynchronously) failed."""
    delay = opts.retry_delay
    for attempt in range(opts.retries + 1):
        try:
            if attempt == 0 and first_error is not None:
                raise first_error
            data = pool.read(offset, length)
            if len(data) != length:
                raise NbdProtocolError(f"read of {length} bytes at {offset} returned {len(data)}")
            return data
        except NbdProtocolError:
            raise       # a misbehaving server: its own exit code, no retry
        except NbdError as e:
            if attempt == opts.retries or isinstance(e, NbdConnectionError):
                raise SourceFailed(
                    f"reading {length} bytes at offset {offset} failed after {attempt + 1} attempt(s): {e}",
                    hint="nothing was committed; check the NBD server and retry") from None
            log.warning("read at offset %d failed (%s); retrying in %.1fs", offset, e, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
