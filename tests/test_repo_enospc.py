"""A full disk in the middle of a backup: NoSpaceError, clean abort, committed data intact."""

import errno
import json
import os
import threading

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, new_repo_path, pseudo, read_all, write_backup
from helpers.support import fill_up, nbdbackup, tmpfs
from nbdbackup.errors import ExitCode, NoSpaceError
from nbdbackup.repo import Repository
from nbdbackup.repo.backends import LocalBackend

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
    write_backup(repo, "vdb", data1[:2 * CS])                        # lock released, repo usable


def test_enospc_in_backend_aborts_cleanly(tmp_path, filling):
    path = str(tmp_path / "r")
    new_repo_path(path, pack_size=256 * 1024)
    be = FillingBackend(path, os.path.join(path, "tmp"))
    repo = Repository.open(path, backend=be)
    data1 = pseudo(1, 8 * CS)
    first = write_backup(repo, "vda", data1)
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
    with tmpfs(tmp_path / "mnt", "6m") as mnt:
        yield mnt


def test_enospc_on_a_real_full_filesystem(small_tmpfs):
    path = str(small_tmpfs / "r")
    repo = new_repo(path, pack_size=512 * 1024)
    data1 = pseudo(3, 8 * CS)
    first = write_backup(repo, "vda", data1)
    data2 = pseudo(4, 160 * CS)          # 10 MiB into a 6 MiB file system
    with pytest.raises(NoSpaceError):
        write_backup(repo, "vda", data2)
    repo.close()
    # free the space the aborted run left in sealed packs (gc's job) by reopening and checking reads
    repo = Repository.open(path)
    assert [b.id for b in repo.list_backups()] == [first.id]
    assert read_all(repo, first.id) == data1
    assert os.listdir(os.path.join(path, "tmp")) == []


# --- the CLI on a full file system: exit 8 and the truth, never "damaged, rebuild-index" ---------

def _assert_no_space(p, *needles):
    assert p.returncode == ExitCode.NO_SPACE, f"exit {p.returncode}:\n{p.stderr}"
    assert "no space left" in p.stderr and "Traceback" not in p.stderr and "internal error" not in p.stderr, \
        p.stderr
    assert "damaged" not in p.stderr and "rebuild-index` recreates" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_full_filesystem_is_reported_as_no_space_and_rebuild_leaves_nothing(tmp_path):
    # Issue 10 item 7: every command said "cannot read the index ... disk I/O error" (exit 9) with the
    # hint to run rebuild-index, which then died with an internal error and left index.sqlite.rebuilding.
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        path = str(mnt / "r")
        with new_repo(path, pack_size=256 * 1024) as repo:
            data = pseudo(7, 8 * CS)
            first = write_backup(repo, "vda", data)
        index_before = open(os.path.join(path, "index.sqlite"), "rb").read()
        filler = fill_up(mnt)
        for args in (["list"], ["verify"], ["stats"], ["restore", "vda", tmp_path / "out.raw"], ["gc"]):
            _assert_no_space(nbdbackup("--repo", path, *args, check=False, timeout=120), "free space")
        p = nbdbackup("--repo", path, "rebuild-index", check=False, timeout=120)
        _assert_no_space(p, "the old index is untouched", "needs room")
        assert not [f for f in os.listdir(path) if ".rebuilding" in f or ".damaged-" in f], os.listdir(path)
        assert open(os.path.join(path, "index.sqlite"), "rb").read() == index_before
        os.unlink(filler)
        listed = json.loads(nbdbackup("--repo", path, "--json", "list").stdout)
        assert [b["id"] for b in listed] == [first.id]
        nbdbackup("--repo", path, "restore", "vda", tmp_path / "out.raw")
        assert (tmp_path / "out.raw").read_bytes() == data


def test_rebuild_index_removes_a_killed_runs_half_made_index(tmp_path):
    path = str(tmp_path / "r")
    with new_repo(path) as repo:
        first = write_backup(repo, "vda", pseudo(8, 4 * CS))
    for suffix in ("", "-wal", "-shm", "-journal"):      # what a run killed at any step leaves
        with open(os.path.join(path, "index.sqlite.rebuilding" + suffix), "wb") as f:
            f.write(b"half made")
    nbdbackup("--repo", path, "-q", "rebuild-index")
    assert not [f for f in os.listdir(path) if ".rebuilding" in f], os.listdir(path)
    assert [b["id"] for b in json.loads(nbdbackup("--repo", path, "--json", "list").stdout)] == [first.id]


def test_gc_out_of_room_while_repacking_says_threshold_0_needs_none(tmp_path):
    # A forgotten backup whose chunks are half shared: gc --repack-threshold 1 must rewrite its packs
    # and needs room for their live half, which the disk no longer has.
    with tmpfs(tmp_path / "mnt", "24m") as mnt:
        path = str(mnt / "r")
        shared = pseudo(9, 48 * CS)
        with new_repo(path, pack_size=4 << 20) as repo:
            old = write_backup(repo, "vda", shared + pseudo(10, 16 * CS))       # 4 MiB, one pack
            keep = write_backup(repo, "vdb", shared)                            # dedups onto old's pack
        nbdbackup("--repo", path, "forget", old.id)
        filler = fill_up(mnt, leave=2 << 20)      # the live 3 MiB of old's pack cannot be copied
        p = nbdbackup("--repo", path, "gc", "--repack-threshold", "1", check=False, timeout=120)
        _assert_no_space(p, "--repack-threshold 0", "already deleted every unreferenced pack")
        os.unlink(filler)
        with Repository.open(path) as repo:
            assert [b.id for b in repo.list_backups()] == [keep.id]
            assert read_all(repo, keep.id) == shared          # nothing committed was harmed
        assert os.listdir(os.path.join(path, "tmp")) == []
