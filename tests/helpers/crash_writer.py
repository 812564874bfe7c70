"""Crash-test helper: writes backups through the Repository API until killed.

Run as a script by tests/test_maint_crash.py (command() and environment() say how:
`python -m helpers.crash_writer` with tests/ on PYTHONPATH, so it imports helpers as tests do):

    python -m helpers.crash_writer REPO SEED COUNT
    python -m helpers.crash_writer REPO gc          (gc, repacking every pack with dead data)
    python -m helpers.crash_writer REPO rebuild-index

Disk contents are a pure function of (seed, disk, version), see content(),
so the test can rebuild what every committed backup must hold from the
backup's `source` field ("crash:<seed>:<version>"). Each run continues from
the newest committed version and writes COUNT more backups: incrementals
against the newest committed backup, every third one a full two-disk set.

NBDBACKUP_CRASH_AT="<step>:<n>" makes the process SIGKILL itself just before
the n-th call of a step: "fsync" (odd n: before a pack's data fsync; even n:
after its rename, before the directory fsync), "rename" (after the pack's
fsync, before it is moved into packs/), "commit" (before an index transaction
commits: pack rows or the final backup rows), "final" (before the commit of
the n-th transaction that inserts backup rows), "write" (pack data half written),
"unlink" (before a file is deleted: gc); on S3: "put" (after the n-th object is stored,
before the index names it), "upload" (the n-th object's body half sent), "delete" (before the
n-th object is deleted: gc).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys

from helpers.repo import CHUNK_SIZE as CHUNK

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NCHUNKS = 40
SIZE = CHUNK * NCHUNKS - 1000       # short last chunk
DISKS = ("vda", "vdb")


def command(*args) -> list[str]:
    """The command line that runs this script with *args*."""
    return [sys.executable, "-m", "helpers.crash_writer", *map(str, args)]


def environment(**variables: str) -> dict[str, str]:
    """os.environ plus *variables*, with tests/ on PYTHONPATH (where command() finds helpers)."""
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **variables)


def _h(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def changed(seed: int, disk: str, version: int, i: int) -> bool:
    return version == 0 or _h(seed, disk, version, i, "chg") % 4 == 0


def chunk_version(seed: int, disk: str, version: int, i: int) -> int:
    v = version
    while not changed(seed, disk, v, i):
        v -= 1
    return v


def chunk_bytes(seed: int, disk: str, v: int, i: int) -> bytes:
    kind = _h(seed, disk, v, i, "kind") % 5
    n = min(CHUNK, SIZE - i * CHUNK)
    if kind == 0:
        return bytes(n)
    if kind == 1:    # shared between disks and versions: dedup
        base = hashlib.blake2b(b"common%d" % (_h(seed, i) % 3), digest_size=64).digest()
        return (base * (n // 64 + 1))[:n]
    if kind == 2:    # text-like, compressible
        line = b"version %d of chunk %d on %s: lorem ipsum dolor sit amet\n" % (v, i, disk.encode())
        return (line * (n // len(line) + 1))[:n]
    return _random(seed, disk, v, i, n)


def _random(*key_and_n) -> bytes:
    *key, n = key_and_n
    out = bytearray()
    k = repr(key).encode()
    ctr = 0
    while len(out) < n:
        out += hashlib.blake2b(k + ctr.to_bytes(8, "big"), digest_size=64).digest()
        ctr += 1
    return bytes(out[:n])


def content(seed: int, disk: str, version: int) -> bytes:
    return b"".join(chunk_bytes(seed, disk, chunk_version(seed, disk, version, i), i) for i in range(NCHUNKS))


def parse_source(source: str | None) -> tuple[int, int] | None:
    if not source or not source.startswith("crash:"):
        return None
    _, seed, version = source.split(":")
    return int(seed), int(version)


def _arm_kill_point() -> None:
    spec = os.environ.get("NBDBACKUP_CRASH_AT")
    if not spec:
        return
    step, n = spec.split(":")
    count = [0]

    def tick():
        count[0] += 1
        if count[0] >= int(n):
            os.kill(os.getpid(), signal.SIGKILL)

    if step == "commit":
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "commit", lambda conn: tick())
        return
    if step == "final":                 # only the transactions that insert backup rows
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        def seen_insert(conn, cursor, statement, *a):
            if statement.lstrip().upper().startswith("INSERT INTO BACKUPS "):
                conn.info["final"] = True

        def on_commit(conn):
            if conn.info.pop("final", False):
                tick()

        event.listen(Engine, "before_cursor_execute", seen_insert)
        event.listen(Engine, "commit", on_commit)
        return
    if step in ("put", "upload", "delete"):
        _arm_s3_kill_point(step, tick)
        return
    if step not in ("fsync", "rename", "write", "unlink"):
        raise SystemExit(f"unknown kill step {step!r}")
    # Packs are written with pwrite (O_DIRECT where the file system has it), other files with write.
    # A pack moves into packs/ with link() (create-only) where it used rename().
    names = {"write": ("write", "pwrite"), "rename": ("rename", "link")}.get(step, (step,))
    for name in names:
        setattr(os, name, _killing(getattr(os, name), step, n, count, tick))


def _arm_s3_kill_point(step: str, tick) -> None:
    from nbdbackup.repo import s3backend, s3client

    cls = s3backend.S3Backend
    if step == "upload":                 # death with the body half sent: the PUT never completes
        real_read = s3client.ViewsReader.read
        armed = set()

        def read(self, n=-1):
            if id(self) not in armed and self.tell() >= len(self) // 2 and len(self) > 4096:
                armed.add(id(self))
                tick()
            return real_read(self, n)
        s3client.ViewsReader.read = read
        return
    method = "put_aligned" if step == "put" else "delete"
    real = getattr(cls, method)

    def wrapped(self, *a, **kw):
        if step == "delete":
            tick()
        out = real(self, *a, **kw)
        if step == "put":
            tick()
        return out
    setattr(cls, method, wrapped)


def _killing(real, step: str, n: str, count: list, tick):
    def wrapped(*a, **kw):
        if step == "write":
            if a[0] <= 2:                 # stdout/stderr
                return real(*a, **kw)
            count[0] += 1
            if count[0] >= int(n):        # half-written pack data, then death
                data = memoryview(a[1])
                half = len(data) // 2
                half = half - half % 4096 or half     # whole pages: an O_DIRECT write takes only those
                try:
                    real(a[0], data[:half], *a[2:])
                except OSError:
                    pass
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        tick()
        return real(*a, **kw)

    return wrapped


def write_backup(repo, seed: int, version: int, disks, latest) -> None:
    from concurrent.futures import ThreadPoolExecutor

    full = version % 3 == 0 or any(latest.get(d) is None for d in disks)
    writers = []
    for disk in disks:
        parent = None if full else latest[disk]
        w = repo.writer(disk, kind="full" if full else "incremental", size=SIZE, parent=parent,
                        source=f"crash:{seed}:{version}",
                        set_id=f"set-{seed}-{version}" if len(disks) > 1 else None)
        writers.append(w)
        prev = None if full else parse_source(parent.source)[1]
        idx = [i for i in range(NCHUNKS)
               if full or chunk_version(seed, disk, version, i) != chunk_version(seed, disk, prev, i)]
        with ThreadPoolExecutor(2) as pool:
            prepared = pool.map(lambda i: w.prepare(chunk_bytes(seed, disk, chunk_version(seed, disk, version, i), i)),
                                idx)
            for i, p in zip(idx, prepared):
                w.put(i, p)
    if len(writers) == 1:
        writers[0].commit(read_bytes=SIZE, duration_s=0.1)
    else:
        repo.commit_set(writers, read_bytes=[SIZE] * len(writers), duration_s=[0.1] * len(writers))


def main(argv: list[str]) -> int:
    from nbdbackup.repo import Repository

    if argv[1] == "gc":                 # REPO gc: a gc that may be killed
        from nbdbackup.repo.gc import collect

        _arm_kill_point()
        with Repository.open(argv[0]) as repo:
            print(collect(repo, repack_threshold=1.0).to_json(), flush=True)
        return 0
    if argv[1] == "rebuild-index":      # REPO rebuild-index
        from nbdbackup.repo.rebuild import rebuild_index

        _arm_kill_point()
        print(rebuild_index(argv[0]).to_json(), flush=True)
        return 0
    repo_path, seed, count = argv[0], int(argv[1]), int(argv[2])
    _arm_kill_point()
    with Repository.open(repo_path, lock_wait=10.0) as repo:
        for _ in range(count):
            latest = {d: repo.latest(d) for d in DISKS}
            versions = [parse_source(b.source)[1] for b in latest.values() if b is not None]
            version = max(versions, default=-1) + 1
            disks = DISKS if version % 3 == 0 else (DISKS[version % 2],)
            write_backup(repo, seed, version, disks, latest)
            print(f"committed version {version} {','.join(disks)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
