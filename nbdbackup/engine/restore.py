"""Restore one backup to a file, block device or NBD export, bit-exact.

Chunks are read only through BackupImage.read_chunks (decompressed and hash
checked; the NBD server uses the same path), in batches of neighbouring
chunks (BATCH_BYTES of disk: on object storage one ranged get per run of
neighbouring records, not one per chunk), several batches in flight on a
small thread pool. Each batch is decoded straight into a pooled page-aligned buffer of
its size (BackupImage.read_chunks into=) and written from there. Memory: each running
batch holds that buffer and at most a run of scratch (headers, compressed payloads), so
at most workers x (batch + 8 MiB) (local: 4 workers, 48 MiB; S3: 8, 128 MiB); batches
waiting their turn hold nothing. A backend whose reads wait on round trips asks for more workers
(read_workers): on radosgw over loopback 8 batches in flight restored ~1.4x
faster than 4; so does an NBD target (min_workers: each batch waits for its
writes' replies). On local packs the work is CPU and the target's I/O, and 8
threads only took turns at the GIL and the file's lock (in-process restore
of the 512 MiB bench disk, 4 workers and one pwritev at a time: CPU 1.3 -> 1.0 s,
medians of 10 on a busy machine).
A backend may ask for larger batches
(read_batch_bytes): S3 takes 8 MiB, since every GET costs a round trip and
CPU on both ends (512 MiB bench image: 105 GETs instead of 136, 0.1-0.4 s
less client CPU, 0.1-0.2 s less radosgw+OSD CPU); on a local repository
8 MiB batches cost more page faults than they save (sys time 0.7 -> 1.3 s),
so it stays at 4 MiB. Zero ranges are reproduced:
holes in a fresh file, BLKZEROOUT on a device, WRITE_ZEROES on NBD. Success
is reported only after the target flushed (fsync / NBD FLUSH).

salvage=True (restore --salvage) restores what can be read: a chunk that is
missing or fails its check, and every position of a map segment that cannot
be read, is written as zeros and its disk byte range listed (merged, sorted)
in RestoreResult.damaged; the caller must not call that success.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import ChunkCorrupt, NoSpaceError, is_no_space
from ..progress import NoBar
from ..repo.maps import merge_ranges
from ..repo.packs import BufferPool
from .restore_targets import open_target

if TYPE_CHECKING:
    from ..repo.image import BackupImage
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository
    from .options import ProgressBar
    from .restore_targets import Target

log = logging.getLogger(__name__)

BATCH_BYTES = 4 << 20      # disk bytes of neighbouring chunks read in one batch (unless the backend asks more)
READ_WORKERS = 4           # batches being read at once, at least (more when --connections says so)


@dataclass
class RestoreResult:
    backup: BackupInfo
    target: str
    data_bytes: int = 0     # bytes written from stored chunks
    zero_bytes: int = 0     # bytes reproduced as zeros
    duration_s: float = 0.0
    leftovers_removed: list = field(default_factory=list)   # (path, bytes) of killed restores' temp files
    damaged: list = field(default_factory=list)     # salvage: merged (offset, length) written as zeros
    salvage: bool = False


def restore(repo: Repository, ref: str, target: str, *, fmt: str = "raw", force: bool = False, connections: int = 4,
            progress: Callable[[int, str], ProgressBar] | None = None, inflight_bytes: int = 64 << 20,
            salvage: bool = False) -> RestoreResult:
    started = time.monotonic()
    info = repo.resolve(ref)
    img = repo.open_image(info)
    try:
        size, cs = img.size, img.chunk_size
        result = RestoreResult(info, target, salvage=salvage)
        t = open_target(target, size, fmt=fmt, force=force, connections=connections)
        result.leftovers_removed = getattr(t, "leftovers_removed", [])
        bar = progress(size, f"restore {info.disk}") if progress else NoBar()
        try:
            workers = max(getattr(repo.backend, "read_workers", READ_WORKERS), getattr(t, "min_workers", 0),
                          connections)
            _copy(img, t, result, bar, workers=workers, inflight=max(4, inflight_bytes // cs),
                  batch_bytes=getattr(repo.backend, "read_batch_bytes", BATCH_BYTES))
            t.finish()
            result.damaged = merge_ranges(result.damaged)
        except BaseException as e:
            t.abort()
            if is_no_space(e):
                raise NoSpaceError(f"no space left on the restore target {target}: {e.strerror}",
                                   hint="free space there and restore again; the backup is intact") from None
            raise
        finally:
            bar.close()
    finally:
        img.close()
    result.duration_s = time.monotonic() - started
    return result


def _copy(img: BackupImage, t: Target, result: RestoreResult, bar: ProgressBar, *, workers: int, inflight: int,
          batch_bytes: int = BATCH_BYTES) -> None:
    cs, size = img.chunk_size, img.size
    batch = max(1, batch_bytes // cs)
    damaged = result.damaged if result.salvage else None     # list.append is thread-safe
    lost_segments: list[int] = []

    buffers = BufferPool(batch * cs, keep=workers)     # one per batch being copied: chunks decoded into it

    def copy_batch(first: int, end: int) -> int:
        indexes = list(range(first, end))
        buf = buffers.get()
        try:
            with memoryview(buf) as whole:
                return write_batch(indexes, whole)
        finally:
            buffers.put(buf)

    def write_batch(indexes: list[int], whole: memoryview) -> int:
        n = 0
        got = img.try_chunks(indexes, whole) if damaged is not None else img.read_chunks(indexes, whole)
        run_at = indexes[0] * cs       # neighbouring good chunks, whole[lo:hi]: one write_run
        lo = hi = 0
        for i, data in zip(indexes, got):
            if isinstance(data, ChunkCorrupt):      # salvage: zeros there, and say where
                if hi > lo:
                    t.write_run(run_at, [whole[lo:hi]])
                run_at, lo = (i + 1) * cs, hi + data.length
                hi = lo
                log.warning("salvage: %s; written as zeros", data)
                damaged.append((data.offset, data.length))
                if t.needs_zeroing:
                    t.zero(data.offset, data.length)
                n += data.length
                continue
            hi += len(data)
            n += len(data)
        if hi > lo:
            t.write_run(run_at, [whole[lo:hi]])
        return n

    def segment_lost(offset: int, length: int, e) -> None:
        log.warning("salvage: %s; bytes %d-%d written as zeros", e, offset, offset + length - 1)
        damaged.append((offset, length))
        lost_segments.append(length)        # the extents loop counts the span as zero bytes

    pending: deque = deque()
    limit = max(workers, inflight // batch)      # batches queued ahead (each holds nothing until it runs)

    def drain(limit: int) -> None:
        while len(pending) > limit:
            n = pending.popleft().result()
            result.data_bytes += n
            bar.update(n)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbdbackup-restore") as ex:
        try:
            # per segment: the first batches go out once the first segment is loaded, and the
            # next segments load (a GET and a query each on S3) while those batches are read
            for offset, length, is_zero in img.extents(segment_lost if damaged is not None else None,
                                                       per_segment=True):
                if is_zero:
                    if t.needs_zeroing:
                        t.zero(offset, length)
                    result.zero_bytes += length
                    bar.update(length)
                    continue
                first, end = offset // cs, min(-(-(offset + length) // cs), -(-size // cs))
                for lo in range(first, end, batch):
                    pending.append(ex.submit(copy_batch, lo, min(end, lo + batch)))
                    drain(limit)
            drain(0)
            # data_bytes: what came from stored chunks; the damaged ranges are zeros, not data
            result.data_bytes -= sum(n for _, n in (damaged or ())) - sum(lost_segments)
            result.zero_bytes -= sum(lost_segments)
        except BaseException:
            for f in pending:
                f.cancel()
            raise
