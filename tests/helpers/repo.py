"""Repositories written through the API, and deterministic disk data to put in them.

new_repo() is the one way a test makes a repository (restic's TestRepository);
write_backup() the one way it writes a backup through the writer API.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import time

from nbdbackup.repo import Repository

CHUNK_SIZE = 64 * 1024      # small chunks keep test disks small; the default is 256 KiB

# The storage backends conftest's repo fixture runs each test on; S3 or PostgreSQL
# become one more name here and one more branch in backend_options().
REPO_BACKENDS = ("local",)


def backend_options(backend: str, workdir) -> dict:
    """The new_repo() keywords that put a repository on *backend* (scratch space in *workdir*)."""
    if backend == "local":
        return {}           # Repository's default: LocalBackend in the repository's directory
    raise ValueError(f"unknown test backend {backend!r}")


def new_repo(path, **options) -> Repository:
    """A new, open repository at *path* with CHUNK_SIZE chunks unless *options* say otherwise
    (any Repository.init keyword: pack_size, segment_len, backend, index_url, ...)."""
    options.setdefault("chunk_size", CHUNK_SIZE)
    return Repository.init(str(path), **options)


def new_repo_path(path, **options) -> str:
    """new_repo(), closed again: its path, for tests that open it themselves or run the CLI."""
    new_repo(path, **options).close()
    return str(path)


def write_backup(repo, disk: str, data: bytes, *, parent=None, changed=None, zero_holes: bool = False,
                 created=None, read_bytes: int | None = None, duration_s: float = 0.0,
                 set_writers: list | None = None, **writer_options):
    """Back up *data* as *disk*: full, or (with *parent*) incremental putting only the chunk
    indexes *changed* (default: every chunk). zero_holes=True puts all-zero chunks as holes,
    as the engine does. With *set_writers* the writer is appended there uncommitted (for
    Repository.commit_set) and returned; otherwise the committed BackupInfo is."""
    cs = repo.chunk_size
    w = repo.writer(disk, kind="incremental" if parent else "full", size=len(data), parent=parent,
                    **writer_options)
    for i in (range(w.nchunks) if changed is None else changed):
        piece = data[i * cs:(i + 1) * cs]
        if zero_holes and piece.count(0) == len(piece):
            w.put_zero(i)
        else:
            w.put(i, w.prepare(piece))
    if set_writers is not None:
        set_writers.append(w)
        return w
    info = w.commit(read_bytes=len(data) if read_bytes is None else read_bytes, duration_s=duration_s,
                    created=created)
    time.sleep(0.002)    # distinct creation times (ms resolution) keep "latest" unambiguous
    return info


def read_all(repo, ref) -> bytes:
    """The whole disk of backup *ref*, read back through the image reader."""
    with repo.open_image(ref) as img:
        return img.read(0, img.size)


def pack_files(repo, *, in_progress: bool = False) -> list[str]:
    """Sorted paths of the pack files of *repo* (a Repository or its path); in_progress=True
    adds the files in tmp/ (packs still being written)."""
    root = getattr(repo, "path", repo)
    files = glob.glob(os.path.join(str(root), "packs", "*", "*.pack"))
    if in_progress:
        files += glob.glob(os.path.join(str(root), "tmp", "*"))
    return sorted(files)


def indexed_packs(repo) -> set[str]:
    """The pack names the index knows."""
    from sqlalchemy import select

    from nbdbackup.repo.schema import packs

    with repo.index_db.connect() as conn:
        return {r[0] for r in conn.execute(select(packs.c.name))}


# --- disk data ------------------------------------------------------------------------

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


def disk_data(rng: random.Random, nchunks: int, *, base: bytes | None = None, change: float = 1.0) -> bytes:
    """Chunks of random, repeated, text-like and zero data; with *base*, change a fraction of its chunks."""
    cs = CHUNK_SIZE
    out = []
    for i in range(nchunks):
        if base is not None and rng.random() >= change:
            out.append(base[i * cs:(i + 1) * cs])
            continue
        kind = rng.randrange(4)
        if kind == 0:
            out.append(bytes(cs))
        elif kind == 1:
            out.append(bytes([rng.randrange(3)]) * cs)          # repeats: dedup
        elif kind == 2:
            line = f"chunk {i} line {rng.random()}\n".encode()
            out.append((line * (cs // len(line) + 1))[:cs])
        else:
            out.append(rng.randbytes(cs))
    return b"".join(out)


def mixed_image(path, size: int, seed: int, *, deep: dict[int, bytes] | None = None) -> bytes:
    """A raw image file of mixed content: random chunks, text chunks, zero chunks, chunks
    zero but for one byte, an unaligned tail; *deep* overwrites {offset: bytes}. Returns its bytes."""
    cs = CHUNK_SIZE
    rnd = random.Random(seed)
    buf = bytearray(size)
    for off in range(0, size, cs):
        kind = rnd.choice(["random", "text", "zero", "zero", "partial"])
        n = min(cs, size - off)
        if kind == "random":
            buf[off:off + n] = rnd.randbytes(n)
        elif kind == "text":
            line = f"seed {seed} chunk at {off} says hello\n".encode()
            buf[off:off + n] = (line * (n // len(line) + 1))[:n]
        elif kind == "partial":
            k = rnd.randrange(1, n)
            buf[off + k - 1] = rnd.randrange(1, 256)
    for off, data in (deep or {}).items():
        buf[off:off + len(data)] = data
    path.write_bytes(bytes(buf))
    return bytes(buf)


def repo_with_vm1(d, size: int, seed: int):
    """d/repo holding one full backup of disk vm1 (whose bytes are also in d/vm1.raw): (data, info)."""
    with new_repo(d / "repo") as r:
        data = mixed_image(d / "vm1.raw", size, seed)
        return data, write_backup(r, "vm1", data, zero_holes=True)
