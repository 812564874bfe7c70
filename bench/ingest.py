#!/usr/bin/env python3
"""Ingest benchmark: hash, compress and pack-write through the chunk store alone.

For each (data kind, chunk size, zstd level): a fresh repository, a writer,
writer.prepare() in a pool of 2 threads (as the engine does), put() and
commit() in the main thread. Every chunk is unique (no dedup help). The
baseline, measured in the same run, is writing the same bytes to a file in
the same file system with fsync (what any backup must at least pay on
incompressible data).

    python bench/ingest.py                     # 1 GiB, chunk 1M, levels -1 -3 -5 1
    python bench/ingest.py --chunk-sizes 256K,1M,4M --levels -3 --size 512M
Targets: >= 1 GB/s incompressible, >= 600 MB/s text-like (2 cores).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nbdbackup.repo import Repository  # noqa: E402
from nbdbackup.repo.config import parse_size  # noqa: E402

POOL = 16 << 20


def make_pool(kind: str) -> bytes:
    rnd = random.Random(42)
    if kind == "random":
        return os.urandom(POOL + (16 << 20))
    # text-like: words with a Zipf-ish distribution, numbers and punctuation (zstd -3 gets ~3x)
    words = [("".join(rnd.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rnd.randint(2, 10)))).encode()
             for _ in range(5000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    out = bytearray()
    while len(out) < 4 << 20:
        line = rnd.choices(words, weights, k=12)
        out += b" ".join(line) + (b" %d.\n" % rnd.randint(0, 99999))
    base = bytes(out[:4 << 20])
    return (base * ((POOL + (16 << 20)) // len(base) + 1))[:POOL + (16 << 20)]


def chunk_bytes(pool: bytes, i: int, cs: int) -> bytes:
    off = (i * 7_919_993) % POOL
    return i.to_bytes(8, "little") + pool[off:off + cs - 8]      # unique per index


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)     # all threads of this process
    return r.ru_utime + r.ru_stime


def run_writer(path: str, pool: bytes, size: int, cs: int, level: int) -> tuple[float, int, float]:
    repo = Repository.init(path, chunk_size=cs, compression_level=level)
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    w = repo.writer("bench", kind="full", size=size)
    n = w.nchunks
    with ThreadPoolExecutor(2) as ex:
        pending = []
        for i in range(n):
            pending.append((i, ex.submit(lambda i=i: w.prepare(chunk_bytes(pool, i, cs)))))
            if len(pending) >= 8:
                j, f = pending.pop(0)
                w.put(j, f.result())
        for j, f in pending:
            w.put(j, f.result())
    info = w.commit(read_bytes=size, duration_s=0)
    dt = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    repo.close()
    return dt, info.stored_bytes, cpu


def run_baseline(path: str, pool: bytes, size: int, cs: int) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // cs):
            os.write(fd, chunk_bytes(pool, i, cs))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--chunk-sizes", default="1M")
    ap.add_argument("--levels", default="-1,-3,-5,1")
    ap.add_argument("--data", default="random,text")
    ap.add_argument("--dir", default=None, help="where to put the scratch repositories (default: a temp dir)")
    a = ap.parse_args()
    size = parse_size(a.size)
    work = tempfile.mkdtemp(prefix="nbdbackup-ingest-", dir=a.dir)
    rows = []
    try:
        for kind in a.data.split(","):
            pool = make_pool(kind)
            for cs in [parse_size(x) for x in a.chunk_sizes.split(",")]:
                base = run_baseline(os.path.join(work, "baseline.bin"), pool, size, cs)
                os.unlink(os.path.join(work, "baseline.bin"))
                for level in [int(x) for x in a.levels.split(",")]:
                    p = os.path.join(work, f"r{kind}{cs}{level}")
                    dt, stored, cpu = run_writer(p, pool, size, cs, level)
                    shutil.rmtree(p)
                    rows.append((kind, cs >> 10, level, size / dt / 1e9, 2 * size / cpu / 1e9,
                                 size / max(stored, 1), dt / base, size / base / 1e9))
                    print(f"  {kind:6} {cs >> 10:5}K level {level:3}: {size / dt / 1e9:5.2f} GB/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ningest of {size / 2**30:.2f} GiB per row, prepare in 2 threads; baseline = write+fsync of the same bytes")
    print("GB/s = wall clock; cpuGB/s = 2 x bytes / CPU seconds of all threads (what 2 idle cores would do "
          "if CPU-bound; robust to other load)")
    print(f"{'data':6} {'chunk':>6} {'level':>5} {'GB/s':>6} {'cpuGB/s':>7} {'ratio':>6} {'time/baseline':>13} "
          f"{'baseline GB/s':>13}")
    for kind, ck, lv, gbs, cgbs, ratio, rel, bgbs in rows:
        print(f"{kind:6} {ck:>5}K {lv:>5} {gbs:6.2f} {cgbs:7.2f} {ratio:6.2f} {rel:13.2f} {bgbs:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
