"""The backup pipeline: extents -> chunk actions -> parallel reads -> prepare -> put -> commit.

The main thread walks extents and sends READs of up to READ_SPAN bytes (several
chunks each) over a connection pool. Each connection's receiver thread takes
the data straight into a reused buffer and prepares its chunks right there
(blake3, zero check, adaptive zstd: these release the GIL). The main thread
puts prepared chunks into the writer in disk order (dedup lookups are batched
there; raw chunks are copied into the pack from the read buffer, not before).
At most `inflight_bytes` are in flight, so memory does not depend on the disk
size. Nothing is committed unless every chunk was read; the source learns the
outcome (committed/failed) so it can advance or keep its bitmaps.
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

from ..errors import NbdCommandError, NbdConnectionError, NbdError, NbdProtocolError, SourceFailed
from ..nbd.futures import resolve
from ..nbd.proto import EINVAL
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
    inflight_bytes: int = 32 << 20          # bound on chunk data being read or prepared
    adaptive: bool = True                   # compress only with CPU to spare, else store raw (see _CoreGate)
    check_clean: float = 0.5                # incremental: % of clean chunks read to test the bitmap (chaincheck.py)


@dataclass
class DiskStats:
    read_bytes: int = 0         # bytes read from the source
    data_bytes: int = 0         # of those, bytes in non-zero chunks
    packed_bytes: int = 0       # their size after compression, before dedup
    zero_chunks: int = 0
    read_chunks: int = 0
    inherited_chunks: int = 0
    uncompressed_chunks: int = 0    # stored raw without trying zstd: the CPU was busy (adaptive)
    chain_check: object = None      # chaincheck.ChainCheck of an asked-for incremental


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
        try:
            source.committed(plans, infos)
        finally:
            source.close()
    except BaseException as e:    # an interrupt or a bookkeeping failure after the commit: say what is safe
        e.committed_backups = [i.id for i in infos]
        raise
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
        check = None
        if parent is not None:
            check = _check_chain_or_fall_back(pool, repo, plan, parent, size, opts)
            if check.broken:
                parent = None
        w = repo.writer(plan.disk, kind=plan.kind, size=size, parent=parent, bitmap=plan.bitmap,
                        checkpoint=plan.checkpoint, set_id=set_id, source=plan.extra.get("source"))
        try:
            stats = _pipeline(pool, w, plan, parent, size, opts)
            stats.chain_check = check
        except BaseException:
            _abort_quietly(w)
            raise
    finally:
        pool.close()
    return w, stats, started


def _check_chain_or_fall_back(pool, repo, plan, parent, size: int, opts: BackupOptions):
    """The incremental's chain check (before anything is read for the backup); a
    contradiction turns *plan* into a full, or is ChainBroken with --no-fallback."""
    from ..sources.base import raise_if_no_fallback
    from .chaincheck import check_chain

    cs = repo.chunk_size
    t0 = time.monotonic()
    try:
        check = check_chain(pool, repo, plan, parent, size, cs, opts, _force_from(parent, size, cs))
    except NbdProtocolError:
        raise
    except NbdError as e:   # the extent walk failed (block status is retried below it)
        raise SourceFailed(f"source {plan.disk} failed while checking the bitmap: {e}",
                           hint="nothing was committed; check the NBD server and retry") from None
    log.debug("chain check of %s took %.3fs: %s", plan.disk, time.monotonic() - t0, check)
    if check.broken:
        raise_if_no_fallback(plan.disk, check.broken, opts.no_fallback)
        log.warning("%s: the chain cannot be trusted; taking a full backup instead", check.broken)
        plan.kind, plan.fallback_reason = "full", check.broken
        plan.parent_id = plan.bitmap = plan.bitmap_context = None
    return check


def _force_from(parent, size: int, chunk_size: int) -> int | None:
    """First chunk whose length or existence changed with a resize (read from there on)."""
    if parent is None or parent.size == size:
        return None
    return min(parent.size, size) // chunk_size


# Bytes per READ request: several chunks, so per-request work is amortised.
# Measured against qemu-nbd: 512 KiB requests are served fastest by a fresh
# server; at 1 MiB and above it page-faults in a new buffer for most requests.
READ_SPAN = 512 << 10
FLUSH_BYTES = 32 << 20  # chunk data put between writer flushes (one batched dedup lookup each)


def _pipeline(pool, w, plan, parent, size: int, opts: BackupOptions) -> DiskStats:
    from ..nbd.extents import walk_extents

    cs = w.chunk_size
    full = plan.kind == "full"
    stats = DiskStats()
    bar = opts.progress(size, f"{plan.kind} {plan.disk}") if opts.progress else NoBar()
    # One READ covers up to `span` chunks of a READ run; its chunks are prepared
    # together on the receiver thread and handed to the main thread as one list.
    span = max(1, min(READ_SPAN, pool.max_payload) // cs)
    inflight_max = max(2 * len(pool.clients) * span, opts.inflight_bytes // cs)   # in chunks
    flush_chunks = max(span, FLUSH_BYTES // cs)
    pending: deque = deque()    # (first index, length, buffer, future of [(PreparedChunk, compressed?)]), in disk order
    queued = 0                  # chunks in *pending*
    gate = _CoreGate(_cores() if opts.adaptive else None)
    lost: list = []             # (offset, length, error) of a read whose connection is gone for good
    max_reads = -(-inflight_max // span)    # READs in flight (short runs make short READs)
    # Read buffers: slices of one anonymous map, reused (warm pages: no page faults, no
    # zeroing). Enough for every READ in flight plus those held until the next flush.
    free: list = _read_buffers(max_reads + -(-flush_chunks // span) + 1, span * cs)
    held: list = []             # read buffers put, but maybe still referenced by the writer's batch

    def submit(first: int, count: int) -> None:
        nonlocal queued
        off = first * cs
        length = min(count * cs, size - off)
        out: Future = Future()
        # (empty only after failed reads, whose buffers are not reused)
        buf = free.pop() if free else memoryview(bytearray(span * cs))
        view = buf[:length]
        try:
            rf = pool.submit_read_into(off, view)
        except NbdError as e:
            rf = Future()
            rf.set_exception(e)
        rf.add_done_callback(lambda f: _prepare_on_arrival(f, out, w, view, cs, gate, lost, off))
        pending.append((first, length, buf, out))
        queued += count

    def put_done(block: bool) -> None:
        nonlocal queued
        while pending and (block or pending[0][3].done()):
            while not pending[0][3].done():
                if lost:    # stop at once: reads queued behind reconnect attempts fail now, not one by one
                    pool.close()
                    off, length, e = lost[0]
                    _read_with_retries(pool, off, length, opts, first_error=e)
                    raise AssertionError("unreachable")
                _wait(pending[0][3], 0.05)
            first, length, buf, fut = pending.popleft()
            try:
                results = fut.result()
            except NbdProtocolError:
                raise       # a misbehaving server: its own exit code, no retry
            except NbdError as e:
                # Retries (and their back-off) run here, in order; other reads carry on meanwhile.
                data = memoryview(_read_with_retries(pool, first * cs, length, opts, first_error=e))
                results = [(w.prepare(data[k:k + cs]), True) for k in range(0, length, cs)]
                buf = None      # not reused: the pool may have resent this READ into it on another connection
            queued -= len(results)
            for k, (prepared, tried) in enumerate(results):
                if prepared.is_zero:
                    stats.zero_chunks += 1
                else:
                    stats.data_bytes += prepared.raw_len
                    stats.packed_bytes += len(prepared.payload)
                    if not tried:
                        stats.uncompressed_chunks += 1
                w.put(first + k, prepared)
            if buf is not None:
                # Raw payloads are views of the read buffer: reuse it only once the
                # writer has copied them into its pack (flush), a batch at a time.
                held.append(buf)
                if len(held) * span >= flush_chunks:
                    w.flush()
                    free.extend(held)
                    held.clear()
            stats.read_chunks += len(results)
            stats.read_bytes += length
            bar.update(length)
            block = False

    extents = walk_extents(RetryingBlockStatus(pool, opts), bitmap_context=plan.bitmap_context)
    runs = chunk_runs(extents, chunk_size=cs, size=size, all_dirty=full,
                      force_from=None if full else _force_from(parent, size, cs))
    # The pipeline makes no reference cycles worth collecting; a collection
    # pass would walk every object of the process for nothing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
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
            for i in range(run.start, run.end, span):
                n = min(span, run.end - i)
                while (queued + n > inflight_max or len(pending) >= max_reads) and pending:
                    put_done(block=True)
                submit(i, n)
                put_done(block=False)
        while pending:
            put_done(block=True)
    except NbdProtocolError:
        raise
    except NbdError as e:   # the extent walk failed (the pool already retried with reconnect)
        raise SourceFailed(f"source {plan.disk} failed during the backup: {e}",
                           hint="nothing was committed; check the NBD server and retry") from None
    finally:
        if gc_was_enabled:
            gc.enable()
        bar.close()
    return stats


def _read_buffers(n: int, size: int) -> list[memoryview]:
    from ..repo.packs import anonymous_map

    slab = memoryview(anonymous_map(n * size))
    return [slab[i * size:(i + 1) * size] for i in range(n)]


def _wait(f: Future, timeout: float) -> None:
    try:
        f.exception(timeout)
    except (FuturesTimeout, CancelledError):
        pass


def _prepare_on_arrival(f: Future, out: Future, w, view: memoryview, cs: int, gate: "_CoreGate", lost: list,
                        offset: int) -> None:
    """Done-callback of a read (on the connection's receiver thread): hash and compress
    its chunks right there, so they change threads once (to the main thread's put)
    instead of three times. blake3/zstd release the GIL, so receivers of different
    connections prepare in parallel."""
    try:
        e = f.exception()
        if isinstance(e, NbdConnectionError):   # the pool gave up reconnecting: tell the main thread now
            lost.append((offset, len(view), e))
        f.result()
        results = []
        for k in range(0, len(view), cs):
            compress = gate.enter()
            try:
                results.append((w.prepare(view[k:k + cs], compress), compress))
            finally:
                gate.leave()
        resolve(out, results)
    except BaseException as e:  # noqa: BLE001 - surfaced through *out*
        resolve(out, exc=e)


class _CoreGate:
    """Adaptive compression (like `zstd --adapt`): compress a chunk only with CPU to
    spare, else hash it and store it raw. Two signals, both needed:

    - fewer than `cores` chunks are being prepared (`cores` is the CPU count less one,
      kept for the read/write path: socket copies, pack writes, our main thread);
    - the machine's CPUs were at least MIN_IDLE idle over the last SAMPLE_S (Linux
      /proc/stat). This sees the NBD server and every other process too: on a busy
      box compressing would only slow the backup; on a box with idle cores every
      chunk gets compressed.

    The price is a worse ratio when CPU is short (DiskStats.uncompressed_chunks
    counts those chunks; docs/design.md has the figures). cores=None: always compress."""

    SAMPLE_S = 0.05
    MIN_IDLE = 0.20

    def __init__(self, cores: int | None, cpu: "_CpuTimes | None" = None):
        self.cores = cores
        self.busy = 0
        self.lock = threading.Lock()
        self._cpu = cpu or (_CpuTimes() if cores is not None else None)
        self._spare = True
        self._next_sample = 0.0

    def enter(self) -> bool:
        with self.lock:
            self.busy += 1
            if self.cores is None:
                return True
            if self.busy > self.cores:
                return False
            now = time.monotonic()
            if self._cpu is not None and now >= self._next_sample:
                self._next_sample = now + self.SAMPLE_S
                idle = self._cpu.idle_share()
                if idle is not None:
                    self._spare = idle >= self.MIN_IDLE
            return self._spare

    def leave(self) -> None:
        with self.lock:
            self.busy -= 1


class _CpuTimes:
    """Share of CPU time the whole machine spent idle between two calls (/proc/stat)."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", "rb") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if len(fields) < 6 or fields[0] != b"cpu":
            return None
        ticks = [int(x) for x in fields[1:9]]    # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[3] + ticks[4]

    def idle_share(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None         # unreadable, or no tick yet: keep the previous decision
        return (now[1] - last[1]) / (now[0] - last[0])


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
    def read():
        data = pool.read(offset, length)
        if len(data) != length:
            raise NbdProtocolError(f"read of {length} bytes at {offset} returned {len(data)}")
        return data
    return _with_retries("reading", pool, offset, length, read, opts, first_error)


class RetryingBlockStatus:
    """The pool as walk_extents sees it, with block status retried like reads."""

    def __init__(self, pool, opts: BackupOptions):
        self.pool, self.opts = pool, opts

    size = property(lambda self: self.pool.size)
    contexts = property(lambda self: self.pool.contexts)

    def block_status(self, offset: int, length: int):
        return _with_retries("block status of", self.pool, offset, length,
                             lambda: self.pool.block_status(offset, length), self.opts)


def _with_retries(what: str, pool, offset: int, length: int, request, opts: BackupOptions,
                  first_error: NbdError | None = None):
    """request(), again after a server error (EIO...), opts.retries times with back-off.
    A protocol violation is raised as it is; EINVAL (the server calls the request
    invalid: no retry changes that) and the last failure become SourceFailed."""
    delay = opts.retry_delay
    for attempt in range(opts.retries + 1):
        try:
            if attempt == 0 and first_error is not None:
                raise first_error
            return request()
        except NbdProtocolError:
            raise       # a misbehaving server: its own exit code, no retry
        except NbdError as e:
            if isinstance(e, NbdCommandError) and e.errno == EINVAL:
                raise _invalid_request(what, pool, offset, length, e) from None
            if attempt == opts.retries or isinstance(e, NbdConnectionError):
                raise SourceFailed(
                    f"{what} {length} bytes at offset {offset} failed after {attempt + 1} attempt(s): {e}",
                    hint="nothing was committed; check the NBD server and retry") from None
            log.warning("%s %d bytes at offset %d failed (%s); retrying in %.1fs", what, length, offset, e, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _invalid_request(what: str, pool, offset: int, length: int, e: NbdError) -> SourceFailed:
    """What was asked, what the server allows, and why it cannot be asked otherwise."""
    size, mb = pool.size, pool.min_block
    allows = (f"the export (size {size}) takes requests aligned to {mb} bytes (preferred "
              f"{pool.preferred_block}, at most {pool.max_block})")
    if size % mb and offset + length == size:
        why = (f"its size is not a multiple of its minimum block size, so the last {size % mb} bytes "
               "cannot be asked for in an aligned request")
        hint = (f"nothing was committed; make the export's size a multiple of {mb} bytes, "
                "or have the server accept unaligned tails")
    else:
        why = "a retry would be refused the same way"
        hint = "nothing was committed; check the server's block-size limits and log"
    return SourceFailed(f"{what} {length} bytes at offset {offset} was refused as invalid (EINVAL): {allows}; "
                        f"{why} (server said: {e})", hint=hint)
