"""The backup pipeline: extents -> chunk actions -> parallel reads -> prepare -> put -> commit.

The main thread walks extents and sends READs of up to READ_SPAN bytes (several
chunks each) over a connection pool. Each connection's receiver thread takes
the data straight into a reused buffer and prepares its chunks right there
(blake3, zero check, adaptive zstd: these release the GIL). The main thread
puts prepared chunks into the writer in disk order (dedup lookups are batched
there; raw chunks are copied into the pack from the read buffer, not before).
At most `inflight_bytes` are in flight (or two READs, when that is more),
so memory depends neither on the disk size nor on the chunk size beyond that. Nothing is
committed unless every chunk was read; the source learns the outcome
(committed/failed) so it can advance or keep its bitmaps.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from .. import collector
from ..errors import (
    CommittedThenFailed,
    CommittedThenInterrupted,
    Interrupted,
    NbdConnectionError,
    NbdError,
    NbdProtocolError,
    SourceFailed,
)
from ..fsutil import anonymous_map
from ..nbd.futures import resolve
from ..nbd.proto import CONTEXT_BASE_ALLOCATION
from ..progress import NoBar
from .adaptive import CoreGate, compression_gate
from .chaincheck import ChainCheck, check_chain_or_fall_back
from .chunkplan import READ, SKIP, ZERO, bytes_of, chunk_runs, first_resized_chunk
from .options import BackupOptions
from .retries import RetryingBlockStatus, gave_up, read_with_retries

if TYPE_CHECKING:
    from ..nbd.pool import ConnectionPool
    from ..repo.chunks import PreparedChunk
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository
    from ..repo.writer import BackupWriter
    from ..sources.base import DiskPlan, Source

log = logging.getLogger(__name__)

__all__ = ["BackupOptions", "BackupResult", "DiskStats", "run_backup"]


@dataclass
class DiskStats:
    read_bytes: int = 0         # bytes read from the source
    data_bytes: int = 0         # of those, bytes in non-zero chunks
    packed_bytes: int = 0       # their size after compression, before dedup
    zero_chunks: int = 0
    read_chunks: int = 0
    inherited_chunks: int = 0
    uncompressed_chunks: int = 0    # stored raw without trying zstd: the CPU was busy (adaptive)
    raw_reason: str = ""            # why they were, for the summary line
    chain_check: ChainCheck | None = None   # the chain check of an asked-for incremental


@dataclass
class BackupResult:
    info: BackupInfo | None     # None until the commit
    stats: DiskStats = field(default_factory=DiskStats)
    fallback_reason: str | None = None


def run_backup(repo: Repository, source: Source, kind: str, opts: BackupOptions) -> list[BackupResult]:
    """Back up every disk the source plans; commit them together; tell the source.
    A failure after the commit is CommittedThenFailed / CommittedThenInterrupted: the
    backups it names are complete and usable."""
    plans: list[DiskPlan] = []
    writers: list[tuple[BackupWriter, DiskStats, float]] = []
    try:
        plans = source.prepare(repo, kind, opts.no_fallback)
        vm = source.vm_definition()     # stored once with the set, named by every member
        results = []
        for plan in plans:
            w, stats, started = _backup_disk(repo, plan, opts)
            writers.append((w, stats, started))
            results.append(BackupResult(None, stats, plan.fallback_reason))
        infos = _commit(repo, writers, vm)
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
        try:
            source.committed(plans, infos)
        finally:
            source.close()
    except Exception as e:      # a bookkeeping failure after the commit: say what is safe
        raise CommittedThenFailed([i.id for i in infos], e) from e
    except (KeyboardInterrupt, Interrupted) as e:
        raise CommittedThenInterrupted([i.id for i in infos]) from e
    return results


def _commit(repo: Repository, writers: list[tuple[BackupWriter, DiskStats, float]], vm) -> list[BackupInfo]:
    if len(writers) == 1:
        w, stats, started = writers[0]
        return [w.commit(read_bytes=stats.read_bytes, duration_s=time.monotonic() - started, vm=vm)]
    now = time.monotonic()
    return repo.commit_set([w for w, _, _ in writers],
                           read_bytes=[s.read_bytes for _, s, _ in writers],
                           duration_s=[now - t for _, _, t in writers], vm=vm)


def _abort_quietly(w: BackupWriter) -> None:
    try:
        w.abort()
    except Exception as e:  # the original failure matters more
        log.debug("abort failed: %s", e)


def _backup_disk(repo: Repository, plan: DiskPlan, opts: BackupOptions) -> tuple[BackupWriter, DiskStats, float]:
    """Read the disk of *plan* into a new writer (not committed); (writer, stats, start time)."""
    from ..nbd.pool import ConnectionPool

    started = time.monotonic()
    contexts = [CONTEXT_BASE_ALLOCATION] + ([plan.bitmap_context] if plan.bitmap_context else [])
    pool = ConnectionPool(plan.uri, connections=opts.connections, meta_contexts=contexts,
                          retries=opts.reconnects)
    try:
        if plan.bitmap_context and plan.bitmap_context not in pool.contexts:
            raise SourceFailed(f"the export stopped offering {plan.bitmap_context}")
        size = pool.size
        parent = repo.resolve(plan.parent_id) if plan.kind == "incremental" else None
        check = None
        if parent is not None:
            check = check_chain_or_fall_back(pool, repo, plan, parent, size, opts)
            if check.broken:
                parent = None
        w = repo.writer(plan.disk, kind=plan.kind, size=size, parent=parent, bitmap=plan.bitmap,
                        checkpoint=plan.checkpoint, set_id=None, source=plan.extra.get("source"))
        try:
            stats = DiskPipeline(pool, w, plan, parent, size, opts).run()
            stats.chain_check = check
        except BaseException:
            _abort_quietly(w)
            raise
    finally:
        pool.close()
    return w, stats, started


# Bytes per READ request: several chunks, so per-request work is amortised.
# Measured against qemu-nbd: 512 KiB requests are served fastest by a fresh
# server; at 1 MiB and above it page-faults in a new buffer for most requests.
READ_SPAN = 512 << 10
FLUSH_BYTES = 32 << 20  # chunk data put between writer flushes (one batched dedup lookup each)

Prepared = list[tuple["PreparedChunk", bool]]   # a READ's chunks, prepared: (chunk, compression tried?)


class InFlightRead(NamedTuple):
    """One READ of up to `span` chunks, from submit until its chunks are put."""
    first: int                  # index of its first chunk
    length: int                 # bytes
    buffer: memoryview          # the read buffer it fills (a slab slice, or a fresh one)
    prepared: Future            # of Prepared, resolved on the receiver thread


class LostRead(NamedTuple):
    """A read whose connection is gone for good (the pool gave up reconnecting)."""
    offset: int
    length: int
    error: NbdConnectionError


class DiskPipeline:
    """Reads the chunks of one disk into its writer, in disk order.

    The main thread submits READs (up to `span` chunks each); each connection's receiver
    thread prepares a READ's chunks as it arrives (_prepare_on_arrival), and the main
    thread puts them, oldest READ first. Bounds, in chunks: `inflight_max` in READs not
    yet put (inflight_bytes, or two READs when that is more: not two per connection, which
    with 16 MiB chunks would be 128 MiB; 32 MiB in flight keep a server busy), in at most
    `max_reads` READs; read buffers put are held until the writer's next flush (every
    `flush_chunks`)."""

    def __init__(self, pool: ConnectionPool, writer: BackupWriter, plan: DiskPlan, parent: BackupInfo | None,
                 size: int, opts: BackupOptions):
        self.pool, self.writer, self.plan, self.parent, self.size, self.opts = pool, writer, plan, parent, size, opts
        self.cs = cs = writer.chunk_size
        self.full = plan.kind == "full"
        self.stats = DiskStats()
        self.span = span = max(1, min(READ_SPAN, pool.max_payload) // cs)
        self.inflight_max = max(2 * span, opts.inflight_bytes // cs)
        self.flush_chunks = max(span, FLUSH_BYTES // cs)
        self.max_reads = -(-self.inflight_max // span)     # short runs make short READs
        self.pending: deque[InFlightRead] = deque()        # in disk order
        self.queued = 0                                     # chunks in *pending*
        self.gate: CoreGate = compression_gate(opts.adaptive)
        self.lost: list[LostRead] = []                      # appended on receiver threads
        # Read buffers: slices of one anonymous map, reused (warm pages: no page faults, no
        # zeroing). Enough for every READ in flight plus those held until the next flush.
        self.free = _read_buffers(self.max_reads + -(-self.flush_chunks // span) + 1, span * cs)
        self.held: list[memoryview] = []    # read buffers put, but maybe still referenced by the writer's batch
        self.bar = opts.progress(size, f"{plan.kind} {plan.disk}") if opts.progress else NoBar()

    def run(self) -> DiskStats:
        from ..nbd.extents import walk_extents

        cs, size, full, stats, span = self.cs, self.size, self.full, self.stats, self.span
        bar = self.bar
        extents = walk_extents(RetryingBlockStatus(self.pool, self.opts), bitmap_context=self.plan.bitmap_context)
        runs = chunk_runs(extents, chunk_size=cs, size=size, all_dirty=full,
                          force_from=None if full or self.parent is None
                          else first_resized_chunk(self.parent.size, size, cs))
        pending, inflight_max, max_reads = self.pending, self.inflight_max, self.max_reads
        # The pipeline makes no reference cycles worth collecting; a collection
        # pass would walk every object of the process for nothing.
        collector.hold()
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
                            self.writer.put_zero(i)
                    bar.update(bytes_of(run, cs, size))
                    continue
                assert run.action == READ
                for i in range(run.start, run.end, span):
                    n = min(span, run.end - i)
                    while (self.queued + n > inflight_max or len(pending) >= max_reads) and pending:
                        self._put_arrived(block=True)
                    self._submit(i, n)
                    self._put_arrived(block=False)
            while pending:
                self._put_arrived(block=True)
        except NbdProtocolError:
            raise
        except NbdError as e:   # the extent walk failed (the pool already retried with reconnect)
            raise SourceFailed(f"source {self.plan.disk} failed during the backup: {e}",
                               hint="nothing was committed; check the NBD server and retry") from None
        finally:
            collector.release()
            bar.close()
        if stats.uncompressed_chunks:
            stats.raw_reason = self.gate.raw_reason()
        return stats

    def _submit(self, first: int, count: int) -> None:
        cs = self.cs
        off = first * cs
        length = min(count * cs, self.size - off)
        out: Future = Future()
        # (empty only after failed reads, whose buffers are not reused)
        buf = self.free.pop() if self.free else memoryview(bytearray(self.span * cs))
        view = buf[:length]
        try:
            rf = self.pool.submit_read_into(off, view)
        except NbdError as e:
            rf = Future()
            rf.set_exception(e)
        rf.add_done_callback(lambda f: self._prepare_on_arrival(f, out, view, off))
        self.pending.append(InFlightRead(first, length, buf, out))
        self.queued += count

    def _put_arrived(self, block: bool) -> None:
        """Put the READs at the head of *pending* that have arrived (with *block*: at least one)."""
        pending = self.pending
        while pending and (block or pending[0].prepared.done()):
            while not pending[0].prepared.done():
                if self.lost:   # stop at once: reads queued behind reconnect attempts fail now, not one by one
                    self.pool.close()
                    lost = self.lost[0]
                    raise gave_up("reading", lost.offset, lost.length, 1, lost.error) from None
                _wait(pending[0].prepared, 0.05)
            read = pending.popleft()
            results, reusable = self._prepared(read)
            self.queued -= len(results)
            self._put(read.first, results)
            if reusable:
                # Raw payloads are views of the read buffer: reuse it only once the
                # writer has copied them into its pack (flush), a batch at a time.
                self.held.append(read.buffer)
                if len(self.held) * self.span >= self.flush_chunks:
                    self.writer.flush()
                    self.free.extend(self.held)
                    self.held.clear()
            self.stats.read_chunks += len(results)
            self.stats.read_bytes += read.length
            self.bar.update(read.length)
            block = False

    def _prepared(self, read: InFlightRead) -> tuple[Prepared, bool]:
        """The READ's prepared chunks, read again after a server error (EIO...); and
        whether its buffer may be reused."""
        try:
            return read.prepared.result(), True
        except NbdProtocolError:
            raise       # a misbehaving server: its own exit code, no retry
        except NbdError as e:
            # Retries (and their back-off) run here, in order; other reads carry on meanwhile.
            # The buffer is not reused: the pool may have resent this READ into it on another connection.
            cs = self.cs
            data = memoryview(read_with_retries(self.pool, read.first * cs, read.length, self.opts, first_error=e))
            return [(self.writer.prepare(data[k:k + cs]), True) for k in range(0, read.length, cs)], False

    def _put(self, first: int, results: Prepared) -> None:
        stats, put = self.stats, self.writer.put
        for k, (prepared, tried) in enumerate(results):
            if prepared.is_zero:
                stats.zero_chunks += 1
            else:
                stats.data_bytes += prepared.raw_len
                stats.packed_bytes += len(prepared.payload)
                if not tried:
                    stats.uncompressed_chunks += 1
            put(first + k, prepared)

    def _prepare_on_arrival(self, f: Future, out: Future, view: memoryview, offset: int) -> None:
        """Done-callback of a read (on the connection's receiver thread): hash and compress
        its chunks right there, so they change threads once (to the main thread's put)
        instead of three times. The writer's prepare is the repository codec's: blake3/zstd
        (and AES-GCM, encrypted) release the GIL, so receivers of different connections
        prepare in parallel."""
        try:
            e = f.exception()
            if isinstance(e, NbdConnectionError):   # the pool gave up reconnecting: tell the main thread now
                self.lost.append(LostRead(offset, len(view), e))
            f.result()
            cs, gate, prepare = self.cs, self.gate, self.writer.prepare
            results = []
            for k in range(0, len(view), cs):
                compress = gate.enter()
                try:
                    results.append((prepare(view[k:k + cs], compress), compress))
                finally:
                    gate.leave()
            resolve(out, results)
        except BaseException as e:  # noqa: BLE001 - surfaced through *out*
            resolve(out, exc=e)


def _read_buffers(n: int, size: int) -> list[memoryview]:
    slab = memoryview(anonymous_map(n * size))
    return [slab[i * size:(i + 1) * size] for i in range(n)]


def _wait(f: Future, timeout: float) -> None:
    try:
        f.exception(timeout)
    except (FuturesTimeout, CancelledError):
        pass
