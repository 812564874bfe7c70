"""gc beside everything, the stress test on a local repository (docs/design.md "gc beside everything").

For a bounded time, WRITERS processes each back up their own disk in a loop (fulls and
incrementals, sharing data across disks so they deduplicate against each other and against
backups being forgotten), one process forgets/prunes and runs gc (--grace 0, repacking) in a
loop, and one reads backups continuously through open_image and compares them with the data
they were taken from. At the end verify passes, every remaining backup restores bit-exact,
and a last gc with nothing running leaves only the objects the index names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo_path, pack_files, read_all
from helpers.support import kill_if_running, nbdbackup
from nbdbackup.repo import Repository

pytestmark = pytest.mark.slow

WRITERS = 3
DURATION_S = 20.0
NCHUNKS = 12

_WORKER = r'''
import hashlib, json, os, random, sys, time, traceback
from nbdbackup.repo import Repository

role, path, out, seed, until = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
CS, N = int(sys.argv[6]), int(sys.argv[7])
rng = random.Random(seed)
log = {"role": role, "errors": [], "done": 0}

def shared(k):                       # chunks every disk may hold: cross-disk dedup
    return hashlib.blake2b(b"shared%d" % k, digest_size=64).digest() * (CS // 64)

def writer(repo, disk):
    data, parent = None, None
    while time.time() < until:
        if data is None or rng.random() < 0.25:
            data = b"".join(shared(rng.randrange(8)) if rng.random() < 0.4 else rng.randbytes(CS) for _ in range(N))
            parent, changed = None, range(N)
        else:
            changed = sorted(rng.sample(range(N), rng.randrange(1, 4)))
            buf = bytearray(data)
            for i in changed:
                buf[i * CS:(i + 1) * CS] = shared(rng.randrange(8)) if rng.random() < 0.3 else rng.randbytes(CS)
            data = bytes(buf)
        try:
            parent = repo.get_backup(parent.id) if parent is not None else None
        except Exception:
            parent, changed = None, range(N)          # pruned meanwhile (after our last commit): a full
        w = repo.writer(disk, kind="incremental" if parent else "full", size=len(data), parent=parent)
        for i in changed:
            w.put(i, w.prepare(data[i * CS:(i + 1) * CS]))
        info = w.commit(read_bytes=len(data), duration_s=0.0)
        with open(os.path.join(out, info.id + ".img.tmp"), "wb") as f:
            f.write(data)
        os.rename(os.path.join(out, info.id + ".img.tmp"), os.path.join(out, info.id + ".img"))
        parent = info
        log["done"] += 1

def maint(repo):
    from nbdbackup.repo.forget import forget_ids
    from nbdbackup.repo.gc import collect
    from nbdbackup.repo.prune import KeepPolicy, plan
    log["reclaimed"] = log["kept_in_use"] = log["young_packs"] = log["repacked"] = log["deleted"] = 0
    while time.time() < until:
        remove = [d.backup.id for d in plan(repo.list_backups(), KeepPolicy(last=2)) if not d.keep]
        if remove:
            log.setdefault("forgotten", 0)
            log["forgotten"] += len(forget_ids(repo, remove).forgotten)
        rep = collect(repo, grace=0, repack_threshold=0.6)
        log["reclaimed"] += rep.bytes_reclaimed
        log["kept_in_use"] += rep.kept_in_use
        log["young_packs"] += rep.young_packs
        log["repacked"] += rep.packs_repacked
        log["deleted"] += rep.chunks_deleted
        log["done"] += 1
        time.sleep(0.2)

def reader(repo):
    from nbdbackup.errors import NotFound
    while time.time() < until:
        have = [f[:-4] for f in os.listdir(out) if f.endswith(".img")]
        if not have:
            time.sleep(0.1)
            continue
        bid = rng.choice(have)
        try:
            img = repo.open_image(bid)
        except NotFound:
            continue                      # forgotten before we pinned it: fine
        try:
            got = img.read(0, img.size)
        finally:
            img.close()
        with open(os.path.join(out, bid + ".img"), "rb") as f:
            if got != f.read():
                log["errors"].append(f"backup {bid} read back different")
        log["done"] += 1

try:
    with Repository.open(path, lock_wait=30) as repo:
        {"writer": lambda r: writer(r, f"disk{seed}"), "maint": maint, "reader": reader}[role](repo)
except BaseException:
    log["errors"].append(traceback.format_exc())
print(json.dumps(log), flush=True)
'''


def test_gc_beside_backups_readers_forget_and_prune(tmp_path):
    path = new_repo_path(tmp_path / "r", pack_size=256 * 1024, segment_len=4)
    out = tmp_path / "data"
    out.mkdir()
    until = time.time() + DURATION_S
    roles = [("writer", i) for i in range(WRITERS)] + [("maint", 100), ("reader", 200)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, role, path, str(out), str(seed), str(until),
                               str(CS), str(NCHUNKS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role, seed in roles]
    logs = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=DURATION_S + 120)
            assert p.returncode == 0, e
            logs.append(json.loads(o.strip().splitlines()[-1]))
    finally:
        for p in procs:
            kill_if_running(p)
    for lg in logs:
        assert lg["errors"] == [], f"{lg['role']}: {lg['errors']}"
    writers, maint, reader = logs[:WRITERS], logs[WRITERS], logs[WRITERS + 1]
    print("stress:", [w["done"] for w in writers], "backups;", maint["done"], "gc runs,", maint.get("forgotten"),
          "forgotten,", maint["reclaimed"], "bytes reclaimed,", maint["repacked"],
          "packs repacked,", maint["deleted"], "chunk rows deleted,", maint["kept_in_use"], "rows kept in use;",
          reader["done"], "images read")
    assert all(w["done"] >= 3 for w in writers)
    assert maint["done"] >= 3 and maint.get("forgotten", 0) > 0 and maint["reclaimed"] > 0
    assert maint["repacked"] > 0 and maint["deleted"] > 0 and maint["kept_in_use"] > 0
    assert reader["done"] >= 3

    # the end: verify, every remaining backup bit-exact, a last gc leaves only what the index names
    nbdbackup("verify", "--repo", path)
    with Repository.open(path) as repo:
        remaining = repo.list_backups()
        assert len(remaining) >= WRITERS
        for b in remaining:
            assert read_all(repo, b.id) == (out / f"{b.id}.img").read_bytes(), b.id
    nbdbackup("gc", "--repo", path, "--grace", "0")
    with Repository.open(path) as repo:
        with repo.index_db.connect() as conn:
            from sqlalchemy import select

            from nbdbackup.repo.packs import pack_object_name
            from nbdbackup.repo.schema import leases, packs
            named = {os.path.join(path, pack_object_name(r[0])) for r in conn.execute(select(packs.c.name))}
            assert list(conn.execute(select(leases))) == []
        assert set(pack_files(path)) == named
        assert os.listdir(os.path.join(path, "tmp")) == []
        for b in remaining:
            assert read_all(repo, b.id) == (out / f"{b.id}.img").read_bytes(), b.id
    nbdbackup("verify", "--repo", path)
