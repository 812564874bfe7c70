#!/usr/bin/env python3
"""Maintenance benchmark: verify and gc against plain reads of the same pack files.

Builds a repository (half incompressible, half text-like chunks, 1 MiB
chunks by default) through the writer API, then in the same run, alternating
and taking medians:

  baseline   read every pack file and blake3 it in big buffers on all cores: a floor (verify
             must also decompress and hash each chunk's raw bytes, which are more than the pack's)
  api        verify() in-process (no interpreter start-up)
  verify     `nbdbackup verify` (the CLI: reads, decompresses, hashes each chunk)
  verify10   `nbdbackup verify --sample 10`

then forgets every other backup (each shares half its chunks with the next)
and times `nbdbackup gc --repack-threshold 0.6`: mark, sweep, and the repack
of the half-live packs.

    python bench/maint.py                    # 256 MiB of chunks, 4 backups
    python bench/maint.py --size 1G --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import blake3  # noqa: E402

from nbdbackup.repo import Repository  # noqa: E402
from nbdbackup.repo.config import parse_size  # noqa: E402
from nbdbackup.repo.verify import verify  # noqa: E402

EXE = os.path.join(os.path.dirname(sys.executable), "nbdbackup")


def text_chunk(rng: random.Random, n: int) -> bytes:
    words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"backup", b"qemu", b"disk", b"%d" % rng.randrange(10**6)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(words, k=16)) + b".\n"
    return bytes(out[:n])


def build(path: str, size: int, cs: int, backups: int) -> None:
    """Backup b shares half its chunks with backup b-1 (alternating positions), so forgetting
    every other backup leaves packs about half live: gc has to repack them."""
    per = size // backups // cs

    def origin(b: int, i: int) -> int:
        return b if b == 0 or (i + b) % 2 == 0 else origin(b - 1, i)

    def chunk(b: int, i: int) -> bytes:
        rng = random.Random(origin(b, i) * 1_000_003 + i)
        return rng.randbytes(cs) if i % 4 < 2 else text_chunk(rng, cs)

    with Repository.open(path) as repo:
        for b in range(backups):
            w = repo.writer("vda", kind="full", size=per * cs)
            for i in range(per):
                w.put(i, w.prepare(chunk(b, i)))
            w.commit(read_bytes=per * cs, duration_s=0)


def pack_paths(path: str) -> list[str]:
    out = []
    for d, _, files in os.walk(os.path.join(path, "packs")):
        out += [os.path.join(d, f) for f in files]
    return out


def baseline(path: str) -> float:
    # warm page cache for every run (no cache dropping: needs root and disturbs others), so the
    # comparison is CPU and syscalls, which is what nbdbackup controls
    t = time.perf_counter()
    for p in pack_paths(path):
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        with open(p, "rb") as f:
            while True:
                b = f.read(4 << 20)
                if not b:
                    break
                h.update(b)
        h.digest()
    return time.perf_counter() - t


def cli(*args) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run([EXE, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{args} failed: {p.stderr}")
    return time.perf_counter() - t, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--chunk-size", default="1M")
    ap.add_argument("--backups", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to build the repository (default: a temp dir)")
    a = ap.parse_args()
    size, cs = parse_size(a.size), parse_size(a.chunk_size)
    work = tempfile.mkdtemp(prefix="nbdbackup-bench-maint-", dir=a.dir)
    try:
        repo = os.path.join(work, "repo")
        Repository.init(repo, chunk_size=cs).close()
        build(repo, size, cs, a.backups)
        pack_bytes = sum(os.path.getsize(p) for p in pack_paths(repo))
        times: dict[str, list[float]] = {"baseline": [], "api": [], "verify": [], "verify10": []}
        for _ in range(a.repeat):
            times["baseline"].append(baseline(repo))
            with Repository.open(repo) as r:
                t = time.perf_counter()
                assert verify(r).ok
                times["api"].append(time.perf_counter() - t)
            times["verify"].append(cli("verify", "--repo", repo, "-q")[0])
            times["verify10"].append(cli("verify", "--repo", repo, "-q", "--sample", "10")[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        with Repository.open(repo) as r:
            victims = [b.id for b in r.list_backups()][::2]
        cli("forget", "--repo", repo, "-q", *victims)
        t_gc, out = cli("gc", "--repo", repo, "--json", "--repack-threshold", "0.6")
        gc = json.loads(out)
        mib = pack_bytes / 2**20
        with Repository.open(repo) as r:
            logical = r.stats()["unique_bytes"] / 2**20
        print(f"repository: {logical:.0f} MiB of distinct chunks, {mib:.0f} MiB in packs, chunk size "
              f"{cs // 1024} KiB, {a.backups} backups; medians of {a.repeat}")
        print(f"{'step':<30} {'seconds':>8} {'pack MiB/s':>10} {'chunk MiB/s':>11} {'x baseline':>10}")
        for k, label in (("baseline", "read + blake3 pack files"), ("api", "verify() in-process"),
                         ("verify", "nbdbackup verify"),
                         ("verify10", "nbdbackup verify --sample 10")):
            print(f"{label:<30} {med[k]:>8.2f} {mib / med[k]:>10.0f} {logical / med[k]:>11.0f} "
                  f"{med[k] / med['baseline']:>10.2f}")
        print(f"{'nbdbackup gc (half forgotten)':<30} {t_gc:>8.2f} {mib / t_gc:>10.0f} {logical / t_gc:>11.0f} "
              f"{t_gc / med['baseline']:>10.2f}")
        print(f"gc: reclaimed {gc['bytes_reclaimed'] / 2**20:.0f} MiB, {gc['packs_deleted']} packs deleted, "
              f"{gc['packs_repacked']} repacked")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
