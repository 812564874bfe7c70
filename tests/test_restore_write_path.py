"""How a restore writes a file: one pwritev per run of neighbouring chunks, its writeback started
right after it (sync_file_range WRITE) and waited for a window behind, then dropped from the page
cache (fsutil.WritebackWindow, as nbdcopy writes a file); zero chunks never written; seen by
strace and SEEK_DATA."""

import os
import re

import pytest

from helpers import support
from helpers.engine_util import MiB, backup, init_repo, make_image, nbb, qio, random_file, same_file, snapshot_raw
from nbdbackup.engine.restore_targets import FileTarget


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 16 MiB disk, 64 KiB chunks: data at 0-3 MiB and 8-9 MiB, 64 KiB at 12 MiB, zeros elsewhere."""
    tmp = tmp_path_factory.mktemp("write-path")
    img = make_image(tmp / "disk.qcow2", 16 * MiB)
    rnd = random_file(tmp / "r.bin", 3 * MiB, seed=5)
    qio(img, f"write -q -s {rnd} 0 3M", "write -q -P 0x7 8M 1M", "write -q -P 0x9 12M 64k")
    repo = init_repo(tmp / "repo", "64K")
    info = backup(repo, "full", "--image", str(img))
    return repo, info, snapshot_raw(img, tmp / "expected.raw")


def _data_extents(path):
    """(start, end) of the allocated ranges of *path* (SEEK_DATA / SEEK_HOLE)."""
    out, fd = [], os.open(path, os.O_RDONLY)
    try:
        end, pos = os.fstat(fd).st_size, 0
        while pos < end:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:         # ENXIO: no data after pos
                break
            b = os.lseek(fd, a, os.SEEK_HOLE)
            out.append((a, b))
            pos = b
    finally:
        os.close(fd)
    return out


def _strace_restore(repo, info, out, trace):
    """The restore's writes to its temp file, by strace: (buffered, writeback started, waited
    for, dropped from the page cache), each a list of (offset, length)."""
    strace = support.require_tool("strace")
    # -ff: one log per thread, so no call is split by another thread's; -s 0: no data in it
    support.run([strace, "-ff", "-qq", "-s", "0", "-e",
                 "trace=openat,pwrite64,pwritev,pwritev2,sync_file_range,fadvise64",
                 "-o", str(trace), support.nbdbackup_exe(), "--repo", str(repo), "restore", info["id"], str(out)])
    log = "".join(p.read_text() for p in trace.parent.glob(trace.name + ".*"))
    fd = re.search(r'openat\(AT_FDCWD, "[^"]*/\.nbdbackup-restore-[^"]*", O_RDWR\|O_CREAT\|O_EXCL[^)]*\) = (\d+)',
                   log).group(1)
    assert not re.search(r"O_DIRECT[|)]", log)
    buffered = [(int(o), int(n)) for o, n in
                re.findall(rf"pwritev2?\({fd}, \[.*?\], \d+, (\d+)(?:, 0)?\)\s+= (\d+)", log)]
    assert not re.search(rf"pwrite64\({fd},", log)
    started = [(int(o), int(n)) for o, n in
               re.findall(rf"sync_file_range\({fd}, (\d+), (\d+), SYNC_FILE_RANGE_WRITE\)", log)]
    waited = [(int(o), int(n)) for o, n in re.findall(
        rf"sync_file_range\({fd}, (\d+), (\d+), SYNC_FILE_RANGE_WAIT_BEFORE\|SYNC_FILE_RANGE_WRITE\|"
        r"SYNC_FILE_RANGE_WAIT_AFTER\) = 0", log)]
    dropped = [(int(o), int(n)) for o, n in
               re.findall(rf"fadvise64\({fd}, (\d+), (\d+), POSIX_FADV_DONTNEED\) = 0", log)]
    return buffered, started, waited, dropped


SAVED_RUNS = [(0, 3 * MiB), (8 * MiB, 1 * MiB), (12 * MiB, 64 * 1024)]


def test_writes_runs_starts_their_writeback_and_leaves_zeros_unwritten(saved, tmp_path):
    repo, info, raw = saved
    out = tmp_path / "out.raw"
    buffered, started, waited, dropped = _strace_restore(repo, info, out, tmp_path / "strace.log")
    assert same_file(out, raw)
    # 4 MiB batches of 64 KiB chunks: the 3 MiB run is one pwritev, not 48 writes, and its
    # writeback starts right after it; 4 MiB in all is well inside one window: no waits
    assert sorted(buffered) == SAVED_RUNS and sorted(started) == SAVED_RUNS, (buffered, started)
    assert waited == [] and dropped == []
    # nothing written where the disk is zero: the file's only data is the three runs
    assert _data_extents(out) == [(0, 3 * MiB), (8 * MiB, 9 * MiB), (12 * MiB, 12 * MiB + 64 * 1024)]


def test_writeback_is_waited_for_a_window_behind_and_dropped_from_the_cache(tmp_path, monkeypatch):
    from nbdbackup import fsutil

    calls, fadvised = [], []
    real = fsutil._libc_sync_file_range()
    assert real, "this machine's libc should have sync_file_range"
    monkeypatch.setattr(fsutil, "_sync_file_range",
                        lambda fd, off, n, flags: calls.append((off, n, flags)) or real(fd, off, n, flags))
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: fadvised.append((off, n, advice))
                        or real_fadvise(fd, off, n, advice))
    out = tmp_path / "window.raw"
    t = FileTarget(str(out), 8 * MiB)
    t._writeback.window = 2 * MiB
    pieces = [bytes([i + 1]) * MiB for i in range(8)]
    try:
        for i, p in enumerate(pieces):
            t.write_run(i * MiB, [p])
        t.finish()
    except BaseException:
        t.abort()
        raise
    assert out.read_bytes() == b"".join(pieces)
    wait = 1 | 2 | 4
    assert [(o, n) for o, n, f in calls if f == 2] == [(i * MiB, MiB) for i in range(8)]
    # with 2 MiB in flight at most, each write past the third waits for the oldest one
    assert [(o, n) for o, n, f in calls if f == wait] == [(i * MiB, MiB) for i in range(6)]
    assert fadvised == [(i * MiB, MiB, os.POSIX_FADV_DONTNEED) for i in range(6)]


def test_a_failed_writeback_wait_fails_the_restore(tmp_path, monkeypatch):
    """A writeback error is reported once per descriptor: the wait that sees it must raise,
    as a later fsync would not see it again."""
    import ctypes
    import errno

    from nbdbackup import fsutil

    def failing(fd, off, n, flags):
        if flags & 4:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0

    monkeypatch.setattr(fsutil, "_sync_file_range", failing)
    t = FileTarget(str(tmp_path / "eio.raw"), 4 * MiB)
    t._writeback.window = MiB
    try:
        t.write_run(0, [bytes(MiB)])
        with pytest.raises(OSError) as ei:
            t.write_run(MiB, [b"\1" * MiB])
        assert ei.value.errno == errno.EIO
    finally:
        t.abort()
    assert list(tmp_path.iterdir()) == []


def test_write_run_of_more_buffers_than_one_pwritev_takes(tmp_path):
    out = tmp_path / "many.raw"
    pieces = [bytes([i % 251]) * 512 for i in range(3001)]       # > IOV_MAX (1024) buffers, not whole pages
    t = FileTarget(str(out), 4096 + 3001 * 512)
    try:
        t.write_run(4096, pieces)
        t.finish()
    except BaseException:
        t.abort()
        raise
    assert out.read_bytes() == bytes(4096) + b"".join(pieces)


def test_nbd_target_gets_every_run(saved, tmp_path):
    repo, info, raw = saved
    target = make_image(tmp_path / "target.raw", info["size"], fmt="raw")
    qio(target, f"write -q -P 0x5a 0 {info['size']}", fmt="raw")         # garbage everywhere
    with support.qemu_nbd(target, tmp_path / "t.sock", readonly=False, connections=4, fmt="raw") as uri:
        nbb(repo, "restore", "--connections", "4", info["id"], uri)
    assert same_file(target, raw)



def test_nbd_target_gets_early_flushes_then_a_last_one(saved, tmp_path, monkeypatch):
    from helpers.nbd_servers import nbdkit
    from nbdbackup.engine import restore_targets
    from nbdbackup.engine.restore import restore
    from nbdbackup.repo import Repository

    repo, info, raw = saved
    monkeypatch.setattr(restore_targets, "FLUSH_EVERY", 1 * MiB)      # the fixture writes 4 MiB of data
    log = tmp_path / "nbdkit.log"
    with nbdkit(tmp_path / "t.sock", "memory", f"size={info['size']}", f"logfile={log}",
                filters=("log",)) as uri:
        with Repository.open(str(repo)) as r:
            restore(r, info["id"], uri, connections=2)
        support.run(["nbdcopy", uri, str(tmp_path / "back.raw")])
    assert same_file(tmp_path / "back.raw", raw)
    ops = re.findall(r"connection=\d+ (Write|Flush|Zero) ", log.read_text())
    assert ops.count("Flush") >= 2, ops
    assert ops[-1] == "Flush"                                   # the last one after every write
    assert "Write" in ops[ops.index("Flush"):]                  # an early one, data still to come
