"""Killed restores leave temp files; the next restore to the same target removes them and says so,
but never the temp file of a restore that is still running."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import time

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo_path, write_backup
from helpers.support import nbdbackup, nbdbackup_exe
from nbdbackup.repo import Repository

NCHUNKS = 768          # 48 MiB: a restore runs long enough to be caught mid-copy


@pytest.fixture(scope="module")
def backup(tmp_path_factory):
    path = new_repo_path(tmp_path_factory.mktemp("leftovers") / "repo")
    data = random.Random(8).randbytes(NCHUNKS * CS)
    with Repository.open(path) as repo:
        info = write_backup(repo, "vda", data)
    return path, info.id, data


def _temps(d) -> list[str]:
    return sorted(glob.glob(os.path.join(str(d), ".nbdbackup-restore-*")))


def _start_restore(repo, bid, target) -> subprocess.Popen:
    return subprocess.Popen([nbdbackup_exe(), "restore", "--repo", repo, bid, str(target), "--force"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_writing(proc, d, known: set[str], timeout=30.0) -> str | None:
    """The new temp file of *proc* once data is in it (None if the restore finished first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in _temps(d):
            if t not in known:
                try:
                    if os.stat(t).st_blocks > 0:
                        return t
                except FileNotFoundError:
                    pass
        if proc.poll() is not None:
            return None
        time.sleep(0.001)
    raise AssertionError("the restore wrote no temp file")


def test_leftovers_of_killed_restores_are_removed_by_the_next(backup, tmp_path):
    """Four SIGKILLed restores to one target: each run removes the leftover of the run before it
    (the issue saw four kills leave four files, 1.7 GiB), and a last one leaves nothing."""
    repo, bid, data = backup
    target = tmp_path / "disk.raw"
    kills, attempts, prev = 0, 0, None
    while kills < 4:
        attempts += 1
        assert attempts < 20, "could not catch a restore mid-copy"
        proc = _start_restore(repo, bid, target)
        t = _wait_writing(proc, tmp_path, {prev} if prev else set())
        if t is not None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        proc.stderr.close()
        if t is None or not os.path.exists(t):
            continue                     # it finished before the kill: try again
        kills += 1
        assert _temps(tmp_path) == [t], f"kill {kills}: leftovers pile up"
        if prev is not None:
            assert f"removed 1 temporary file(s) left by killed restores to {target}" in err
            assert os.path.basename(prev) in err
        prev = t
    on_disk = os.stat(prev).st_blocks * 512
    assert on_disk > 0
    # not ours to remove: another target's temp file, and one an older nbdbackup named
    other = tmp_path / ".nbdbackup-restore-other.raw-0123abcd"
    older = tmp_path / ".nbdbackup-restore-k2j_x9zq"
    other.write_bytes(b"x")
    older.write_bytes(b"y")

    p = nbdbackup("restore", "--repo", repo, bid, target, "--force", "--json")
    assert _temps(tmp_path) == sorted([str(other), str(older)])
    assert target.read_bytes() == data
    out = json.loads(p.stdout)
    assert out["leftovers_removed"] == [{"path": prev, "bytes": on_disk}]
    assert f"removed 1 temporary file(s) left by killed restores to {target} ({on_disk} bytes on disk)" in p.stderr
    assert other.exists() and older.exists()
    assert older.name in p.stderr and "older nbdbackup" in p.stderr


def test_temp_file_of_a_running_restore_is_kept(backup, tmp_path):
    repo, bid, data = backup
    target = tmp_path / "disk.raw"
    for _ in range(20):
        first = _start_restore(repo, bid, target)
        t = _wait_writing(first, tmp_path, set())
        if t is not None:
            break
        first.wait()
        first.stderr.close()
    else:
        raise AssertionError("could not catch a restore mid-copy")
    first.send_signal(signal.SIGSTOP)          # still running, holding its temp file's lock
    try:
        p = nbdbackup("restore", "--repo", repo, bid, target, "--force")
        assert "removed" not in p.stderr, p.stderr
        assert os.path.exists(t), "the running restore's temp file was removed"
        assert target.read_bytes() == data
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    first.stderr.close()
    assert _temps(tmp_path) == []
    assert target.read_bytes() == data


def test_help_says_where_temp_files_are():
    p = nbdbackup("restore", "--help")
    assert ".nbdbackup-restore-<target name>-" in p.stdout and "killed" in p.stdout


def test_target_too_large_for_its_file_system_leaves_nothing(backup, tmp_path):
    """A file size cap (here RLIMIT_FSIZE; on disk e.g. FAT's 4 GiB) refuses the temp file's
    size: a clear error (exit 4), and no temp file left behind."""
    import resource

    repo, bid, _ = backup

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of a kill

    p = subprocess.run([nbdbackup_exe(), "restore", "--repo", repo, bid, str(tmp_path / "disk.raw")],
                       preexec_fn=cap, capture_output=True, text=True, timeout=120)
    assert p.returncode == 4, p.stderr
    assert f"cannot make a file of {NCHUNKS * CS} bytes" in p.stderr and "hint:" in p.stderr
    assert os.listdir(tmp_path) == []
