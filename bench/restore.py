#!/usr/bin/env python3
"""Restore speed (engine.restore.restore into a sparse file), and the backend gets it issues.

    python bench/restore.py [--size-mib 512] [--rounds 5] [--latency-ms 0,2] [--code DIR] [--keep DIR]
    python bench/restore.py --s3 BUCKET ...      # packs on S3 (S3_ENDPOINT_URL, AWS_* from ceph-s3)
    python bench/restore.py --vs-nbdcopy [--rounds 5] [--size-mib 512]   # the CLI against nbdcopy --flush

Makes a disk of mixed data (half random, a third text, the rest zero, in 1 MiB runs), backs
it up (256 KiB chunks) into a local repository, then restores it --rounds times per
--latency-ms value and prints the median MB/s (of the disk size) and the backend get() count
of one restore. A latency L > 0 wraps the LocalBackend so each get() first sleeps L ms: a
model of the round trip of a ranged GET on object storage.

--s3 BUCKET puts the packs in that (existing, empty) bucket through S3Backend (the index stays
a local SQLite file beside the config): the restore then reads with real ranged GETs.

--code DIR runs the nbdbackup package found in DIR (say, an older checkout) on the same
repository: run the script alternately with and without it to compare two versions; the
repository (in --keep, or made afresh) is the same for both.

--vs-nbdcopy (bench/restore_vs_nbdcopy.py) times the installed CLI, `nbdbackup restore`, of a
default backup of the same disk against `nbdcopy --flush` copying it from qemu-nbd serving the
raw disk, into a fresh raw file and into a fresh raw file served by qemu-nbd, alternating.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-ms", default="0,2", help="comma-separated get() latencies to model")
    ap.add_argument("--code", help="import nbdbackup from this directory instead of this checkout")
    ap.add_argument("--connections", type=int, default=4, help="restore's --connections (its worker threads)")
    ap.add_argument("--s3", metavar="BUCKET", help="packs in this S3 bucket (endpoint from S3_ENDPOINT_URL)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (the repository is reused)")
    return ap.parse_args()


if "--vs-nbdcopy" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import restore_vs_nbdcopy

    sys.exit(restore_vs_nbdcopy.main([a for a in sys.argv[1:] if a != "--vs-nbdcopy"]))
args = parse_args()
sys.path.insert(0, os.path.abspath(args.code) if args.code else
                os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nbdbackup.engine.restore import restore  # noqa: E402
from nbdbackup.repo import Repository  # noqa: E402
from nbdbackup.repo.backends import LocalBackend  # noqa: E402

MiB = 1 << 20
CS = 256 * 1024


class Counted:
    """A backend whose get() sleeps *latency* seconds first, and counts its calls."""

    def __init__(self, inner, latency: float):
        self.inner = inner
        self.latency = latency
        self.gets = 0
        self._count_lock = threading.Lock()

    def get(self, name, offset=0, length=None):
        with self._count_lock:
            self.gets += 1
        if self.latency:
            time.sleep(self.latency)
        return self.inner.get(name, offset, length)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def backend(repo_path: str):
    if not args.s3:
        return LocalBackend(repo_path, os.path.join(repo_path, "tmp"))
    from nbdbackup.repo.s3backend import S3Backend

    return S3Backend(args.s3, endpoint_url=os.environ.get("S3_ENDPOINT_URL"))


def make_disk(path: str, size: int) -> None:
    rnd = random.Random(1)
    text = b"".join(f"line {i}: the quick brown fox jumps over the lazy dog\n".encode() for i in range(20000))
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            r = rnd.random()
            if r < 0.5:
                f.seek(off)
                f.write(rnd.randbytes(MiB))
            elif r < 0.83:
                f.seek(off)
                f.write((text * (MiB // len(text) + 1))[:MiB])


def make_repo(path: str, disk: str, size: int) -> None:
    repo = Repository.init(path, chunk_size=CS, backend=backend(path))
    try:
        w = repo.writer("bench", kind="full", size=size)
        with open(disk, "rb") as f:
            for i in range(-(-size // CS)):
                w.put(i, w.prepare(os.pread(f.fileno(), CS, i * CS)))
        w.commit(read_bytes=size, duration_s=0.0)
    finally:
        repo.close()


def main() -> int:
    work = args.keep or tempfile.mkdtemp(prefix="nbdbackup-bench-restore-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    size = args.size_mib * MiB
    disk, repo_path = os.path.join(work, "disk.raw"), os.path.join(work, "repo")
    if not os.path.exists(os.path.join(repo_path, "config.json")):
        make_disk(disk, size)
        make_repo(repo_path, disk, size)
    out = os.path.join(work, "out.raw")
    print(f"code: {os.path.dirname(sys.modules['nbdbackup'].__file__)}")
    for lat in (float(x) for x in args.latency_ms.split(",")):
        speeds, gets = [], 0
        for _ in range(args.rounds):
            be = Counted(backend(repo_path), lat / 1000)
            with Repository.open(repo_path, backend=be) as repo:
                info = repo.list_backups()[0]
                t = time.perf_counter()
                restore(repo, info.id, out, force=True, connections=args.connections)
                speeds.append(size / (time.perf_counter() - t) / 1e6)
                gets = be.gets
            os.unlink(out)
        print(f"latency {lat:g} ms/get: median {statistics.median(speeds):.0f} MB/s "
              f"(rounds {', '.join(f'{s:.0f}' for s in speeds)}), {gets} gets per restore")
    return 0


if __name__ == "__main__":
    sys.exit(main())
