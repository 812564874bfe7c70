"""Locks and concurrency across real processes."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, pseudo, read_all, write_backup
from helpers.support import kill_if_running
from nbdbackup.errors import LockedError
from nbdbackup.repo import Repository
from nbdbackup.repo.locks import RepoLock, read_holders

WRITE_DISK = textwrap.dedent("""
    import hashlib, sys
    from nbdbackup.repo import Repository
    path, disk, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    repo = Repository.open(path, lock_wait=30)
    cs = repo.chunk_size
    data = b"".join(hashlib.shake_256(b"%d-%d" % (seed, i)).digest(cs) for i in range(n))
    w = repo.writer(disk, kind="full", size=len(data))
    for i in range(n):
        w.put(i, w.prepare(data[i * cs:(i + 1) * cs]))
        if i % 8 == 0:
            w.put(i, w.prepare(data[i * cs:(i + 1) * cs]))  # re-put the same: harmless
    print(w.commit(read_bytes=len(data), duration_s=0).id)
""")

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from nbdbackup.repo import Repository
    repo = Repository.open(sys.argv[1])
    w = repo.writer(sys.argv[2], kind="full", size=65536)
    print("held", flush=True)
    time.sleep(60)
""")


def _expected(seed, n):
    import hashlib
    return b"".join(hashlib.shake_256(b"%d-%d" % (seed, i)).digest(CS) for i in range(n))


def test_two_processes_back_up_different_disks_at_once(tmp_path):
    repo = new_repo(tmp_path / "repo", pack_size=1 << 20)       # small packs: many index transactions race
    base = pseudo(3, 20 * CS)
    write_backup(repo, "base", base)
    procs = [subprocess.Popen([sys.executable, "-c", WRITE_DISK, repo.path, disk, str(seed), "150"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for disk, seed in (("vda", 1), ("vdb", 2))]
    try:
        import time
        reads, deadline = 0, time.monotonic() + 120
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:   # a reader alongside
            assert read_all(repo, "base") == base
            repo.list_backups()
            reads += 1
        outs = [p.communicate(timeout=120) for p in procs]
        assert reads >= 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert sorted(b.disk for b in repo.list_backups()) == ["base", "vda", "vdb"]
    assert read_all(repo, "vda") == _expected(1, 150)
    assert read_all(repo, "vdb") == _expected(2, 150)


def test_same_disk_lock_names_holder_and_is_freed_when_holder_dies(repo):
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, repo.path, "vda"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as ei:
            repo.writer("vda", kind="full", size=CS)
        msg = str(ei.value)
        assert f"pid {p.pid}" in msg and "vda" in msg and "since" in msg and "HOLD" not in msg
        assert "time.sleep" in msg or "-c" in msg      # the holder's command line
        assert ei.value.exit_code == 3
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        w = repo.writer("vda", kind="full", size=CS)    # the kernel dropped the flock
        w.abort()
        # the dead holder's info file is cleaned up when seen
        assert all(h["pid"] != p.pid for h in read_holders(repo.lock_dir, "disk-vda"))
        assert not [f for f in os.listdir(repo.lock_dir) if f"@{p.pid}-" in f]
    finally:
        kill_if_running(p)


def test_lock_wait_waits_for_release(repo):
    import threading
    import time
    lk = repo.lock("writers", exclusive=True)
    threading.Timer(0.3, lk.release).start()
    t0 = time.monotonic()
    got = RepoLock(repo.lock_dir, "writers", exclusive=False, wait=5)
    assert time.monotonic() - t0 >= 0.25
    got.release()
    lk2 = repo.lock("writers", exclusive=True)
    with pytest.raises(LockedError):
        RepoLock(repo.lock_dir, "writers", exclusive=False, wait=0.2)
    lk2.release()


def test_readers_block_exclusive_gc_lock(repo):
    write_backup(repo, "vda", pseudo(1, CS))
    img = repo.open_image("vda")
    try:
        with pytest.raises(LockedError, match="readers"):
            repo.lock("readers", exclusive=True)
    finally:
        img.close()
    repo.lock("readers", exclusive=True).release()


def test_gc_lock_blocks_writers_with_lock_wait(repo):
    gc = repo.lock("writers", exclusive=True, purpose="gc")
    try:
        r2 = Repository.open(repo.path, lock_wait=0.2)
        with pytest.raises(LockedError, match="writer lock"):
            r2.writer("vda", kind="full", size=CS)
    finally:
        gc.release()


def test_open_image_waits_for_exclusive_gc_then_fails_clearly(repo):
    write_backup(repo, "vda", pseudo(2, CS))
    gc = repo.lock("readers", exclusive=True, purpose="gc")
    try:
        r2 = Repository.open(repo.path, lock_wait=0.2)
        with pytest.raises(LockedError, match="reader lock"):
            r2.open_image("vda")
    finally:
        gc.release()
    with repo.open_image("vda") as img:
        assert img.read(0, CS) == pseudo(2, CS)
