"""A waiting gc never blocks new backups: its free-lock probe (and a both-locks attempt that
fails) holds `writers` or `readers` exclusively for an instant, and a shared lock taken at
that instant with --lock-wait 0 must still succeed (locks.SHARED_GRACE_S)."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from nbdbackup.errors import LockedError
from nbdbackup.repo import Repository
from nbdbackup.repo.exclusive import exclusive_access
from nbdbackup.repo.locks import RepoLock

CHUNK = 64 * 1024


def _flicker(path: str, stop: threading.Event) -> None:
    """Hold an exclusive flock on *path* for 2 ms in every 10, like gc's probe on a busy machine
    (the real probe holds it for two system calls)."""
    while not stop.is_set():
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            time.sleep(0.002)
        finally:
            os.close(fd)
        time.sleep(0.008)


def test_shared_lock_is_taken_between_instant_exclusive_holds(tmp_path):
    repo = Repository.init(str(tmp_path / "r"), chunk_size=CHUNK)
    stop = threading.Event()
    t = threading.Thread(target=_flicker, args=(os.path.join(repo.lock_dir, "writers"), stop))
    t.start()
    try:
        for _ in range(100):
            RepoLock(repo.lock_dir, "writers", exclusive=False, wait=0).release()
    finally:
        stop.set()
        t.join()
        repo.close()


def test_held_exclusive_lock_still_refuses_a_shared_one(tmp_path):
    repo = Repository.init(str(tmp_path / "r"), chunk_size=CHUNK)
    try:
        with repo.lock("writers", exclusive=True, purpose="exclusive access for gc"):
            t0 = time.monotonic()
            with pytest.raises(LockedError, match="held by pid"):
                repo.lock("writers", exclusive=False, wait=0)
            assert time.monotonic() - t0 < 2
    finally:
        repo.close()


def test_backups_start_while_gc_waits_for_a_reader(tmp_path):
    path = str(tmp_path / "r")
    Repository.init(path, chunk_size=CHUNK).close()
    repo = Repository.open(path)                       # --lock-wait 0, like a nightly backup
    gc_repo = Repository.open(path, lock_wait=1.5)
    outcome = []

    def gc():
        try:
            with exclusive_access(gc_repo, "gc"):
                outcome.append("ran")
        except LockedError as e:
            outcome.append(str(e))

    reader = repo.lock("readers", exclusive=False)     # a long restore: gc waits, probing
    t = threading.Thread(target=gc)
    t.start()
    try:
        started = 0
        while t.is_alive():
            repo.writer("vda", kind="full", size=CHUNK).abort()
            started += 1
        assert started > 10
    finally:
        t.join()
        reader.release()
        repo.close()
        gc_repo.close()
    assert len(outcome) == 1 and "so gc cannot run now" in outcome[0]     # it waited, then gave up
