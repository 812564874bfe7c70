"""Helpers for the repository tests: small repositories and deterministic disk data."""

from __future__ import annotations

import hashlib
import os

from nbdbackup.repo import Repository

CS = 64 * 1024


def new_repo(tmp_path, name="repo", chunk_size=CS, **kw) -> Repository:
    return Repository.init(str(tmp_path / name), chunk_size=chunk_size, **kw)


def pseudo(seed: int, n: int) -> bytes:
    """n incompressible bytes determined by seed (fast: shake_256)."""
    return hashlib.shake_256(seed.to_bytes(8, "little")).digest(n)


def texty(seed: int, n: int) -> bytes:
    words = [b"backup", b"qemu", b"disk", b"chunk", b"block", b"kernel", b"nbd", b"zstd", b"%d" % seed]
    out = bytearray()
    i = seed
    while len(out) < n:
        out += words[i % len(words)] + b" "
        i = (i * 7 + 3) % 1009
    return bytes(out[:n])


def write_full(repo, disk: str, data: bytes, **kw):
    cs = repo.chunk_size
    w = repo.writer(disk, kind="full", size=len(data), **kw)
    for i in range(w.nchunks):
        w.put(i, w.prepare(data[i * cs:(i + 1) * cs]))
    return w.commit(read_bytes=len(data), duration_s=0.0)


def write_incr(repo, disk: str, parent, data: bytes, changed):
    cs = repo.chunk_size
    w = repo.writer(disk, kind="incremental", size=len(data), parent=parent)
    for i in changed:
        w.put(i, w.prepare(data[i * cs:(i + 1) * cs]))
    return w.commit(read_bytes=len(changed) * cs, duration_s=0.0)


def read_all(repo, ref) -> bytes:
    with repo.open_image(ref) as img:
        return img.read(0, img.size)


def pack_files(repo) -> list[str]:
    out = []
    for d, _, fs in os.walk(os.path.join(repo.path, "packs")):
        out += [os.path.join(d, f) for f in fs]
    return sorted(out)
