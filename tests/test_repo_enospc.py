"""A full disk in the middle of a backup: NoSpaceError, clean abort, committed data intact."""

import errno
import os
import subprocess
import threading

import pytest

from nbdbackup.errors import NoSpaceError
from nbdbackup.repo import Repository
from nbdbackup.repo.backends import LocalBackend

from repohelp import CS, pseudo, read_all, write_full


_full = threading.local()       # per thread: bytes the "disk" still takes (None: no limit)


def _limited(real):
    """os.write/os.pwrite as on a disk that fills up, for the calling thread only (packs
    are sealed on several threads at once: a global swap of os.pwrite would race)."""
    def write(fd, data, *offset):
        left = getattr(_full, "left", None)
        if left is None:
            return real(fd, data, *offset)
        if left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        k = min(left, len(data))
        k = k - k % 4096 or k       # whole pages, as an O_DIRECT write needs
        k = real(fd, memoryview(data)[:k], *offset)
        _full.left = 0 if k < 4096 else left - k
        return k
    return write


@pytest.fixture
def filling(monkeypatch):
    monkeypatch.setattr(os, "write", _limited(os.write))
    monkeypatch.setattr(os, "pwrite", _limited(os.pwrite))


class FillingBackend(LocalBackend):
    """A local backend whose file system 'fills up' after *budget* more bytes of pack
    writes (needs the `filling` fixture)."""

    budget: int | None = None
    _lock = threading.Lock()

    def put(self, name, parts):
        parts = [bytes(p) for p in parts]
        return self._filling(sum(map(len, parts)), lambda: super(FillingBackend, self).put(name, parts))

    def put_aligned(self, name, buf, length):       # packs: pwrite, O_DIRECT where it can
        return self._filling(length, lambda: super(FillingBackend, self).put_aligned(name, buf, length))

    def _filling(self, n, store):
        with self._lock:
            budget = self.budget
            if budget is not None and n <= budget:
                self.budget -= n
        if budget is None or n <= budget:
            return store()
        # what a real full disk does: a partial temporary file, then ENOSPC
        _full.left = budget
        try:
            return store()
        finally:
            _full.left = None


def _check_after_enospc(repo, first, data1):
    assert [b.id for b in repo.list_backups()] == [first.id]       # nothing half committed
    assert read_all(repo, first.id) == data1                       # committed data untouched
    assert os.listdir(os.path.join(repo.path, "tmp")) == []        # no temporary left behind
    write_full(repo, "vdb", data1[:2 * CS])                        # lock released, repo usable


def test_enospc_in_backend_aborts_cleanly(tmp_path, filling):
    path = str(tmp_path / "r")
    Repository.init(path, chunk_size=CS, pack_size=256 * 1024).close()
    be = FillingBackend(path, os.path.join(path, "tmp"))
    repo = Repository.open(path, backend=be)
    data1 = pseudo(1, 8 * CS)
    first = write_full(repo, "vda", data1)
    be.budget = 600 * 1024
    data2 = pseudo(2, 40 * CS)
    w = repo.writer("vda", kind="full", size=len(data2))
    with pytest.raises(NoSpaceError) as ei:
        for i in range(w.nchunks):
            w.put(i, w.prepare(data2[i * CS:(i + 1) * CS]))
        w.commit(read_bytes=len(data2), duration_s=0)
    assert ei.value.exit_code == 8 and "no space" in str(ei.value).lower()
    be.budget = None
    with pytest.raises(RuntimeError):
        w.put(0, None)              # the writer is aborted, not half-alive
    _check_after_enospc(repo, first, data1)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {p.stderr.strip()}; "
                    "test_enospc_in_backend_aborts_cleanly covers the same path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_on_a_real_full_filesystem(small_tmpfs):
    path = str(small_tmpfs / "r")
    repo = Repository.init(path, chunk_size=CS, pack_size=512 * 1024)
    data1 = pseudo(3, 8 * CS)
    first = write_full(repo, "vda", data1)
    data2 = pseudo(4, 160 * CS)          # 10 MiB into a 6 MiB file system
    w = repo.writer("vda", kind="full", size=len(data2))
    with pytest.raises(NoSpaceError):
        for i in range(w.nchunks):
            w.put(i, w.prepare(data2[i * CS:(i + 1) * CS]))
        w.commit(read_bytes=len(data2), duration_s=0)
    repo.close()
    # free the space the aborted run left in sealed packs (gc's job) by reopening and checking reads
    repo = Repository.open(path)
    assert [b.id for b in repo.list_backups()] == [first.id]
    assert read_all(repo, first.id) == data1
    assert os.listdir(os.path.join(path, "tmp")) == []
