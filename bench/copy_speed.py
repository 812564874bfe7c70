#!/usr/bin/env python3
"""Speed of `nbdbackup copy` (repo/copy.py), local to local, plaintext or encrypted destination.

Method: a 256 MiB disk of 256 KiB chunks (a third random, a third text, a third zero) is written
into a fresh source repository; it is copied into a fresh destination (full copy: every non-zero
chunk read, checked, prepared for the destination), then an incremental changing every 20th chunk
is written and copied (read against the base both hold). --encrypted makes the destination
encrypted (Repository's master_key), so every chunk is re-hashed in its id space and sealed.
Repositories live under --dir (default /var/tmp) and are removed afterwards.

    python bench/copy_speed.py [--encrypted]
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

from nbdbackup.repo import Repository  # noqa: E402
from nbdbackup.repo.copy import copy_backups, select_backups  # noqa: E402
from nbdbackup.repo.crypto import MasterKey  # noqa: E402

CS = 256 * 1024
N = 1024        # chunks: 256 MiB


def chunk(rng: random.Random, i: int) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(CS)
    if kind == 1:
        line = b"text line %d of the disk\n" % i
        return (line * (CS // len(line) + 1))[:CS]
    return bytes(CS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encrypted", action="store_true", help="an encrypted destination")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    d = tempfile.mkdtemp(dir=args.dir, prefix="bench-copy-")
    try:
        rng = random.Random(3)
        key = MasterKey.generate() if args.encrypted else None
        with Repository.init(os.path.join(d, "src"), chunk_size=CS) as src, \
                Repository.init(os.path.join(d, "dst"), chunk_size=CS, master_key=key) as dst:
            w = src.writer("vm1", kind="full", size=N * CS)
            for i in range(N):
                w.put(i, w.prepare(chunk(rng, i)))
            full = w.commit(read_bytes=N * CS, duration_s=0)
            t = time.monotonic()
            r = copy_backups(src, dst, select_backups(src, everything=True))
            dt = time.monotonic() - t
            print(f"full copy: {r.bytes_read / 2**20:.0f} MiB read, {r.bytes_sent / 2**20:.0f} MiB sent, "
                  f"{dt:.2f} s, {r.bytes_read / 2**20 / dt:.0f} MiB/s read")
            w = src.writer("vm1", kind="incremental", size=N * CS, parent=full)
            for i in range(0, N, 20):
                w.put(i, w.prepare(rng.randbytes(CS)))
            inc = w.commit(read_bytes=0, duration_s=0)
            t = time.monotonic()
            r = copy_backups(src, dst, select_backups(src, everything=True))
            dt = time.monotonic() - t
            print(f"incremental copy: {r.copied[0].chunks_read} chunks read, {r.bytes_sent / 2**20:.1f} MiB sent "
                  f"(the source stored {inc.stored_bytes / 2**20:.1f} MiB), {dt:.2f} s")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
