"""Helpers for the maintenance tests: small repositories written through the API."""

from __future__ import annotations

import glob
import os
import random

from nbdbackup.repo import Repository

CS = 64 * 1024


def new_repo(path, *, pack_size: int = 32 << 20, segment_len: int = 1024) -> str:
    """Create a repository with 64 KiB chunks (small packs/segments on request); returns its path."""
    path = str(path)
    Repository.init(path, chunk_size=CS, pack_size=pack_size, segment_len=segment_len).close()
    return path


def write_backup(repo, disk: str, data: bytes, *, parent=None, changed=None, created=None, set_writers=None):
    """Back up *data* (full, or incremental putting only chunk indexes *changed*)."""
    w = repo.writer(disk, kind="incremental" if parent else "full", size=len(data), parent=parent)
    n = (len(data) + CS - 1) // CS
    for i in (range(n) if changed is None else changed):
        w.put(i, w.prepare(data[i * CS:(i + 1) * CS]))
    if set_writers is not None:
        set_writers.append(w)
        return w
    return w.commit(read_bytes=len(data), duration_s=0.1, created=created)


def read_all(repo, ref) -> bytes:
    with repo.open_image(ref) as img:
        return img.read(0, img.size)


def disk_data(rng: random.Random, nchunks: int, *, base: bytes | None = None, change: float = 1.0) -> bytes:
    """Chunks of random, repeated, text-like and zero data; with *base*, change a fraction of its chunks."""
    out = []
    for i in range(nchunks):
        if base is not None and rng.random() >= change:
            out.append(base[i * CS:(i + 1) * CS])
            continue
        kind = rng.randrange(4)
        if kind == 0:
            out.append(bytes(CS))
        elif kind == 1:
            out.append(bytes([rng.randrange(3)]) * CS)          # repeats: dedup
        elif kind == 2:
            line = f"chunk {i} line {rng.random()}\n".encode()
            out.append((line * (CS // len(line) + 1))[:CS])
        else:
            out.append(rng.randbytes(CS))
    return b"".join(out)


def pack_files(repo_path) -> list[str]:
    return sorted(glob.glob(os.path.join(str(repo_path), "packs", "*", "*.pack")))


def indexed_packs(repo) -> set[str]:
    from sqlalchemy import select

    from nbdbackup.repo.schema import packs

    with repo.engine.connect() as conn:
        return {r[0] for r in conn.execute(select(packs.c.name))}
