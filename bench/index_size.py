#!/usr/bin/env python3
"""Index and map size per backup for a simulated 1 TiB disk with 1 % daily change.

Method (simulation, no disk data): the real BackupWriter and index are used,
but chunks are PreparedChunk objects with random hashes and an empty
payload, so no 1 TiB is hashed or written. Every position is non-zero (the
worst case for the map). Day 0 is a full backup; each following day is an
incremental putting 1 % of positions with new hashes, either scattered
uniformly ("random") or in runs of 64 chunks ("clustered", closer to real
file-system writes). Reported per backup: growth of the index database
(after a WAL checkpoint), map bytes in packs (segments + manifest records),
and both per non-zero chunk position. Chunk rows (one per NEW chunk) are in
the index growth; they are the price of the new data, not of the map.

    python bench/index_size.py                       # 1 TiB, 1M chunks, 3 days each pattern
    python bench/index_size.py --disk 256G --chunk-size 256K --days 2
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nbdbackup.repo import PreparedChunk, Repository  # noqa: E402
from nbdbackup.repo import packs as P  # noqa: E402
from nbdbackup.repo.config import parse_size  # noqa: E402


def index_bytes(repo: Repository) -> int:
    with repo.index_db.connect() as c:
        c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    p = repo.index_url.removeprefix("sqlite:///")
    return sum(os.path.getsize(p + s) for s in ("", "-wal") if os.path.exists(p + s))


def map_bytes(repo: Repository) -> int:
    total = 0
    for name in repo.backend.list("packs/"):
        pack = name.rsplit("/", 1)[1][:-5]
        total += sum(P.HEADER_SIZE + r.stored_len + P.ENTRY_SIZE
                     for r in P.read_records(repo.backend, pack) if r.type in (P.REC_SEGMENT, P.REC_MANIFEST))
    return total


def fake(rnd: random.Random, cs: int) -> PreparedChunk:
    return PreparedChunk(rnd.randbytes(32), cs, P.COMP_NONE, b"")


def changed_positions(rnd, n, frac, pattern):
    k = max(1, int(n * frac))
    if pattern == "random":
        return sorted(rnd.sample(range(n), k))
    run = 64
    starts = rnd.sample(range(0, n - run, run), max(1, k // run))
    return sorted({s + j for s in starts for j in range(run)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", default="1T")
    ap.add_argument("--chunk-size", default="1M")
    ap.add_argument("--change", type=float, default=0.01)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--patterns", default="random,clustered")
    a = ap.parse_args()
    size, cs = parse_size(a.disk), parse_size(a.chunk_size)
    rnd = random.Random(1)
    work = tempfile.mkdtemp(prefix="nbdbackup-idx-")
    rows = []
    try:
        for pattern in a.patterns.split(","):
            repo = Repository.init(os.path.join(work, pattern), chunk_size=cs)
            n = (size + cs - 1) // cs
            i0, m0 = index_bytes(repo), map_bytes(repo)
            t = time.perf_counter()
            w = repo.writer("vda", kind="full", size=size)
            for i in range(n):
                w.put(i, fake(rnd, cs))
            parent = w.commit(read_bytes=size, duration_s=0)
            i1, m1 = index_bytes(repo), map_bytes(repo)
            rows.append((pattern, "full", n, i1 - i0, m1 - m0, time.perf_counter() - t))
            for day in range(1, a.days + 1):
                t = time.perf_counter()
                ch = changed_positions(rnd, n, a.change, pattern)
                w = repo.writer("vda", kind="incremental", size=size, parent=parent)
                for i in ch:
                    w.put(i, fake(rnd, cs))
                parent = w.commit(read_bytes=len(ch) * cs, duration_s=0)
                i2, m2 = index_bytes(repo), map_bytes(repo)
                rows.append((pattern, f"incr day {day}", len(ch), i2 - i1, m2 - m1, time.perf_counter() - t))
                i1, m1 = i2, m2
            repo.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = (size + cs - 1) // cs
    print(f"\nsimulated disk {size / 2**40:.2f} TiB, chunk {cs >> 10} KiB = {n} positions (all non-zero), "
          f"{a.change:.0%} change per day")
    print(f"{'pattern':10} {'backup':11} {'new chunks':>10} {'index +MiB':>10} {'maps +MiB':>10} "
          f"{'B/position':>10} {'s':>6}")
    for pattern, what, k, di, dm, dt in rows:
        print(f"{pattern:10} {what:11} {k:10} {di / 2**20:10.2f} {dm / 2**20:10.2f} {(di + dm) / n:10.2f} {dt:6.1f}")
    print("B/position = (index growth + map bytes) / positions of the backup; index growth includes one "
          "row per new chunk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
