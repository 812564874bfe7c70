#!/usr/bin/env python3
"""Cost of opening a backup for reading (Repository.open_image: restore and serve do it once
per backup), which checks the backup's index rows against its manifest.

Method: as bench/index_size.py, a full backup is written with fake chunks (random hashes,
empty payloads), so a 1 TiB map costs no 1 TiB of hashing; every position is non-zero. The
repositories are made under --dir (default /dev/shm) and kept there for repeated runs; the
1 TiB one takes a few minutes to write. Reported: median and minimum of 21 opens.

    python bench/open_image.py                       # 1 GiB and 1 TiB at 256 KiB chunks
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nbdbackup.repo import PreparedChunk, Repository  # noqa: E402
from nbdbackup.repo import packs as P  # noqa: E402

CS = 256 * 1024


def make(path: str, nchunks: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    repo = Repository.init(path, chunk_size=CS)
    rnd = random.Random(1)
    w = repo.writer("vda", kind="full", size=nchunks * CS)
    for i in range(nchunks):
        w.put(i, PreparedChunk(rnd.randbytes(32), CS, P.COMP_NONE, b""))
    w.commit(read_bytes=0, duration_s=0.0)
    repo.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    for label, n in (("1 GiB", 4096), ("1 TiB", 1 << 22)):
        path = os.path.join(args.dir, f"nbdbackup-bench-open-{n}")
        if not os.path.exists(os.path.join(path, "config.json")) or not Repository.open(path).list_backups():
            make(path, n)
        with Repository.open(path) as repo:
            info = repo.list_backups()[0]
            for _ in range(3):
                repo.open_image(info).close()
            ts = []
            for _ in range(21):
                t = time.perf_counter()
                repo.open_image(info).close()
                ts.append(time.perf_counter() - t)
            ts.sort()
            print(f"{label} at 256 KiB chunks ({len(repo.segment_refs(info.id))} segments): open_image "
                  f"median {ts[10] * 1000:.2f} ms, min {ts[0] * 1000:.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
