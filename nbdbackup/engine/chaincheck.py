"""Before an incremental: does the image still agree with the parent where the bitmap says clean?

A dirty bitmap that was cleared (or disabled for a while) by someone else makes
an incremental inherit stale entries, silently. Two checks catch many such lies,
before anything is read for the backup (so falling back to a full is still free):

- allocation: a clean chunk wholly ZERO in base:allocation where the parent has
  data is a contradiction. A clean allocated chunk the parent recorded as zero is
  only suspect (qcow2 zero clusters and written zeros are allocated too): it is
  read, and a non-zero read is the contradiction. At most CONFIRM_MAX_BYTES of
  such chunks are read (a random subset when there are more: a preallocated
  image has many).
- sample (--check-clean PERCENT): that share of the clean chunks the parent has
  data for (at least one, at most SAMPLE_MAX_BYTES) is read and hashed; a hash
  other than the parent's entry is the contradiction.

Cost: one more extent walk and the reads; memory: the chosen chunk indices.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from ..errors import NbdError, NbdProtocolError, SourceFailed
from ..nbd.extents import walk_extents
from ..nbd.proto import CONTEXT_BASE_ALLOCATION
from ..repo.chunks import HASH_SIZE, ZERO_REF
from ..repo.maps import chunk_len
from .chunkplan import CLEAN_ZERO, SKIP, chunk_runs, first_resized_chunk
from .options import BackupOptions
from .retries import RetryingBlockStatus, read_with_retries

if TYPE_CHECKING:
    from ..nbd.pool import ConnectionPool
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository
    from ..repo.store import Location
    from ..sources.base import DiskPlan

log = logging.getLogger("nbdbackup.engine.backup")     # the pipeline's name in log files, as before the split

SAMPLE_MAX_BYTES = 1 << 30
CONFIRM_MAX_BYTES = 64 << 20
READ_INFLIGHT_BYTES = 32 << 20


@dataclass
class ChainCheck:
    percent: float
    clean_chunks: int = 0       # clean chunks the parent has data for (the sample's population)
    sampled_chunks: int = 0
    sampled_bytes: int = 0
    suspect_chunks: int = 0     # clean, allocated now, zero in the parent
    confirmed_chunks: int = 0   # of those, read to confirm
    broken: str | None = None   # the contradiction found, if any

    def to_json(self) -> dict:
        return {"percent": self.percent, "clean_chunks": self.clean_chunks,
                "sampled_chunks": self.sampled_chunks, "sampled_bytes": self.sampled_bytes,
                "suspect_chunks": self.suspect_chunks, "confirmed_chunks": self.confirmed_chunks,
                "result": "mismatch" if self.broken else "ok"}


class _ParentMap:
    """The parent's map entries, one segment loaded at a time (the walk goes in order);
    segment locations are looked up LOOKAHEAD segments at a time (one query each)."""

    LOOKAHEAD = 256

    def __init__(self, repo: Repository, parent: BackupInfo):
        self.refs = repo.checked_segment_refs(parent)     # the map the writer will inherit
        self.seg_len = repo.config.segment_len
        self.store = repo.store
        self.codec = repo.codec     # a read chunk's map entry, as the writer would make it
        self._seq = -1
        self._raw = b""
        self._locs: dict[bytes, Location] = {}
        self._looked_up = 0      # segments [0, _looked_up) have their locations in _locs (or need none)

    def segment(self, seq: int) -> bytes:
        if seq != self._seq:
            ref = self.refs[seq] if seq < len(self.refs) else None
            if ref and seq >= self._looked_up:
                ahead = [r for r in self.refs[seq:seq + self.LOOKAHEAD] if r]
                self._locs = self.store.segment_locations(ahead)
                self._looked_up = seq + self.LOOKAHEAD
            self._raw = self.store.load_segment(ref, self._locs.get(ref)) if ref else b""
            self._seq = seq
        return self._raw

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(first, end, parent_has_data) runs covering chunks [start, end)."""
        while start < end:
            seq, i = divmod(start, self.seg_len)
            stop = min(end, (seq + 1) * self.seg_len)
            raw = self.segment(seq)
            j = stop - seq * self.seg_len
            if not raw:
                yield start, stop, False
            else:
                yield from ((seq * self.seg_len + a, seq * self.seg_len + b, d)
                            for a, b, d in _zero_ref_split(raw, i, j))
            start = stop


def _zero_ref_split(raw: bytes, i: int, j: int) -> Iterator[tuple[int, int, bool]]:
    """Split entries [i, j) of a raw segment into runs of (ZERO_REF) / (data), at C speed."""
    pos = i
    while pos < j:
        h = raw.find(ZERO_REF, pos * HASH_SIZE, j * HASH_SIZE)
        while h >= 0 and h % HASH_SIZE:     # zero bytes straddling two entries: not an entry
            h = raw.find(ZERO_REF, h + 1, j * HASH_SIZE)
        z = j if h < 0 else h // HASH_SIZE
        if z > pos:
            yield pos, z, True
        if z >= j:
            return
        zend = _zero_run_end(raw, z, j)
        yield z, zend, False
        pos = zend


def _all_zero(raw: bytes, i: int, j: int) -> bool:
    return raw[i * HASH_SIZE:j * HASH_SIZE] == bytes((j - i) * HASH_SIZE)   # memcmp: no byte loop


def _zero_run_end(raw: bytes, z: int, j: int) -> int:
    """The first entry in (z, j) that is not ZERO_REF (entry z is), else j: galloping, then
    bisecting, so the work stays proportional to the run's length."""
    lo, step = z + 1, 1
    while lo < j:
        hi = min(j, lo + step)
        if not _all_zero(raw, lo, hi):
            while hi - lo > 1:      # [.., lo) zero; a non-zero entry in [lo, hi)
                mid = (lo + hi) // 2
                if _all_zero(raw, lo, mid):
                    lo = mid
                else:
                    hi = mid
            return lo
        lo, step = hi, step * 2
    return j


class _Reservoir:
    """A uniform random sample of at most k chunk indices from a stream of runs
    (Vitter/Li's Algorithm L: work grows with k log(n/k), not with n)."""

    def __init__(self, k: int, rng: random.Random):
        self.k, self.rng = k, rng
        self.items: list[int] = []
        self.seen = 0
        self._w = 1.0
        self._next = 0

    def _u(self) -> float:
        return self.rng.random() or 0.5

    def _advance(self) -> None:
        self._w *= math.exp(math.log(self._u()) / self.k)
        skip = math.floor(math.log(self._u()) / math.log(max(1.0 - self._w, 1e-300)))
        self._next = self.seen + min(skip, 1 << 62)

    def add(self, start: int, end: int) -> None:
        if self.k <= 0:
            self.seen += end - start
            return
        if len(self.items) < self.k:
            take = min(end - start, self.k - len(self.items))
            self.items.extend(range(start, start + take))
            self.seen += take
            start += take
            if len(self.items) == self.k:
                self._advance()
        while start < end:
            if self._next >= self.seen + (end - start):
                self.seen += end - start
                return
            off = self._next - self.seen
            self.items[self.rng.randrange(self.k)] = start + off
            start += off + 1
            self.seen += off + 1
            self._advance()


def check_chain_or_fall_back(pool: ConnectionPool, repo: Repository, plan: DiskPlan, parent: BackupInfo,
                             size: int, opts: BackupOptions) -> ChainCheck:
    """The incremental's chain check (before anything is read for the backup); a
    contradiction turns *plan* into a full, or is ChainBroken with --no-fallback."""
    from ..sources.base import raise_if_no_fallback

    cs = repo.chunk_size
    t0 = time.monotonic()
    try:
        check = check_chain(pool, repo, plan, parent, size, cs, opts, first_resized_chunk(parent.size, size, cs))
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



def check_chain(pool: ConnectionPool, repo: Repository, plan: DiskPlan, parent: BackupInfo, size: int,
                chunk_size: int, opts: BackupOptions, force_from: int | None) -> ChainCheck:
    """Both checks for an incremental of *plan* against *parent*; ChainCheck.broken says why not."""
    cs = chunk_size
    rng = random.Random()
    check = ChainCheck(percent=opts.check_clean)
    pmap = _ParentMap(repo, parent)
    sample = _Reservoir(max(1, SAMPLE_MAX_BYTES // cs) if opts.check_clean > 0 else 0, rng)
    suspects = _Reservoir(max(1, CONFIRM_MAX_BYTES // cs), rng) if CONTEXT_BASE_ALLOCATION in pool.contexts else None
    runs = chunk_runs(walk_extents(RetryingBlockStatus(pool, opts), bitmap_context=plan.bitmap_context),
                      chunk_size=cs, size=size, force_from=force_from, clean_zero=True)
    for run in runs:
        if run.action == CLEAN_ZERO:
            for a, _, has_data in pmap.runs(run.start, run.end):
                if has_data:
                    check.broken = (f"the dirty bitmap says chunk {a} (offset {a * cs}) did not change, but the "
                                    f"image reads as zero there and the parent backup {parent.id} has data")
                    return check
        elif run.action == SKIP:
            for a, b, has_data in pmap.runs(run.start, run.end):
                if has_data:
                    sample.add(a, b)
                elif suspects is not None:
                    suspects.add(a, b)
    check.clean_chunks = sample.seen
    if suspects is not None:
        check.suspect_chunks = suspects.seen
        todo = sorted(suspects.items)
        check.confirmed_chunks = len(todo)
        bad = _first_mismatch(pool, pmap, todo, size, cs, opts)
        if bad is not None:
            check.broken = (f"the dirty bitmap says chunk {bad} (offset {bad * cs}) did not change, but it holds "
                            f"data now and the parent backup {parent.id} recorded zeros there")
            return check
    if sample.k and check.clean_chunks:
        want = min(len(sample.items), max(1, round(check.clean_chunks * opts.check_clean / 100)))
        todo = sorted(rng.sample(sample.items, want))
        check.sampled_chunks = len(todo)
        check.sampled_bytes = sum(chunk_len(i, size, cs) for i in todo)
        bad = _first_mismatch(pool, pmap, todo, size, cs, opts)
        if bad is not None:
            check.broken = (f"the dirty bitmap says chunk {bad} (offset {bad * cs}) did not change, but its "
                            f"content differs from the parent backup {parent.id} (sampled by --check-clean)")
    return check


def _first_mismatch(pool: ConnectionPool, pmap: _ParentMap, indices: list[int], size: int, cs: int,
                    opts: BackupOptions) -> int | None:
    """Read chunks *indices* (ascending) and compare them with the parent's entries; the first that differs."""
    pending: deque[tuple[int, int, Future]] = deque()     # (chunk index, bytes, future of the read)
    inflight = 0

    def settle() -> int | None:
        nonlocal inflight
        i, n, fut = pending.popleft()
        inflight -= n
        try:
            data = fut.result()
        except NbdProtocolError:
            raise
        except NbdError as e:
            data = read_with_retries(pool, i * cs, n, opts, first_error=e)
        seq, k = divmod(i, pmap.seg_len)
        raw = pmap.segment(seq)
        want = raw[k * HASH_SIZE:(k + 1) * HASH_SIZE] if raw else ZERO_REF
        return None if pmap.codec.ref(memoryview(data)) == want else i

    for i in indices:
        n = chunk_len(i, size, cs)
        while pending and inflight + n > READ_INFLIGHT_BYTES:
            bad = settle()
            if bad is not None:
                return bad
        try:
            fut = pool.submit_read(i * cs, n)
        except NbdError as e:
            fut = Future()
            fut.set_exception(e)
        pending.append((i, n, fut))
        inflight += n
    while pending:
        bad = settle()
        if bad is not None:
            return bad
    return None
