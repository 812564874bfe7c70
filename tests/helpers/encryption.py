"""Encrypted repositories in tests: a disk holding a marker, and a search of everything stored."""

from __future__ import annotations

import os
import random
import subprocess

import blake3

from helpers.places import object_names, read_object
from helpers.repo import CHUNK_SIZE as CS

PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"

MARKER = b"nbdbackup-marker:7c1e-secret-payroll-2026"


def marked_disk(seed: int = 1, nchunks: int = 24) -> bytes:
    """Chunks 0-7 text holding the marker (compressible), 8-15 random holding it (stored raw
    unless encrypted), 16-19 zero, 20-23 random."""
    rng = random.Random(seed)
    out = []
    for i in range(nchunks):
        if i < 8:
            words = b" ".join(rng.choice([b"alpha", b"beta", b"gamma", b"delta", MARKER]) for _ in range(CS // 4))
            piece = (MARKER + b" " + words)[:CS]
        elif i < 16:
            r = bytearray(rng.randbytes(CS))
            at = rng.randrange(0, CS - len(MARKER))
            r[at:at + len(MARKER)] = MARKER
            piece = bytes(r)
        elif i < 20:
            piece = bytes(CS)
        else:
            piece = rng.randbytes(CS)
        out.append(piece)
    return b"".join(out)


def haystacks(place, repo) -> dict[str, bytes]:
    """Every stored byte of the repository: its objects (packs, config.json...), the files of a
    local repository (the SQLite index with its -wal and -shm), and a PostgreSQL index's dump."""
    out = {name: read_object(place.spec, name) for name in object_names(repo, "")}
    if not place.on_s3:
        for root, _dirs, files in os.walk(place.spec):
            for f in files:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[p] = fh.read()
    if place.index_url:
        url = place.index_url.replace("postgresql+psycopg://", "postgresql://")
        dump = subprocess.run([PG_DUMP, "--data-only", url], check=True, capture_output=True, timeout=120).stdout
        assert b"COPY public.chunks" in dump and b"COPY public.backups" in dump, dump[:2000]
        out["pg_dump"] = dump
    return out


def needles(data: bytes) -> dict[str, bytes]:
    """The marker, and the plaintext blake3 of the marker and of every non-zero chunk: raw and hex."""
    out = {"marker": MARKER, "marker hex": MARKER.hex().encode()}
    hashes = {"blake3(marker)": blake3.blake3(MARKER).digest()}
    for i in range(0, len(data), CS):
        piece = data[i:i + CS]
        if piece.count(0) != len(piece):
            hashes[f"blake3(chunk {i // CS})"] = blake3.blake3(piece).digest()
    for name, h in hashes.items():
        out[name] = h
        out[name + " hex"] = h.hex().encode()
    return out


def qemu_io_read(uri: str, offset: int, length: int, pattern: int | None = None) -> subprocess.CompletedProcess:
    """qemu-io's read of *length* bytes at *offset* of NBD export *uri* (with -P: each byte *pattern*)."""
    from helpers.support import require_tool

    check = f"-P {pattern} " if pattern is not None else ""
    return subprocess.run([require_tool("qemu-io"), "-f", "raw", "-r", "-c", f"read {check}{offset} {length}", uri],
                          capture_output=True, text=True, timeout=60)

