"""How a restore writes a file: one O_DIRECT pwrite per run of neighbouring chunks (where that
is refused, one pwritev, writeback started right after it by
sync_file_range), zero chunks never written; seen by strace and SEEK_DATA."""

import os
import random
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
    """The restore's writes to its temp file, by strace: (direct, buffered, writeback started),
    each a list of (offset, length); direct = pwrite64 on the O_DIRECT descriptor."""
    strace = support.require_tool("strace")
    # -ff: one log per thread, so no call is split by another thread's; -s 0: no data in it
    support.run([strace, "-ff", "-qq", "-s", "0", "-e",
                 "trace=openat,pwrite64,pwritev,pwritev2,sync_file_range",
                 "-o", str(trace), support.nbdbackup_exe(), "--repo", str(repo), "restore", info["id"], str(out)])
    log = "".join(p.read_text() for p in trace.parent.glob(trace.name + ".*"))
    temp_fd = re.search(r'openat\(AT_FDCWD, "[^"]*/\.nbdbackup-restore-[^"]*", O_RDWR\|O_CREAT\|O_EXCL[^)]*\) = (\d+)',
                        log).group(1)
    direct_fd = re.search(rf'openat\(AT_FDCWD, "/proc/self/fd/{temp_fd}", O_WRONLY\|O_DIRECT[^)]*\) = (\d+)', log)
    direct_fd = direct_fd.group(1) if direct_fd else None
    direct = [(int(o), int(n)) for o, n in re.findall(rf'pwrite64\({direct_fd}, ""\.\.\., \d+, (\d+)\)\s+= (\d+)',
                                                       log)] if direct_fd else []
    buffered = [(int(o), int(n)) for o, n in
                re.findall(rf"pwritev2?\({temp_fd}, \[.*?\], \d+, (\d+)(?:, 0)?\)\s+= (\d+)", log)]
    assert not re.search(rf"pwrite64\({temp_fd},", log)
    started = [(int(o), int(n)) for o, n in
               re.findall(rf"sync_file_range\({temp_fd}, (\d+), (\d+), SYNC_FILE_RANGE_WRITE\)", log)]
    return direct, buffered, started


SAVED_RUNS = [(0, 3 * MiB), (8 * MiB, 1 * MiB), (12 * MiB, 64 * 1024)]


def test_writes_runs_past_the_page_cache_and_leaves_zeros_unwritten(saved, tmp_path):
    repo, info, raw = saved
    out = tmp_path / "out.raw"
    direct, buffered, started = _strace_restore(repo, info, out, tmp_path / "strace.log")
    assert same_file(out, raw)
    # O_DIRECT from an aligned buffer: one pwrite per run (the 3 MiB run is one, not 48),
    # nothing through the page cache, so no writeback to start
    assert sorted(direct) == SAVED_RUNS, direct
    assert buffered == [] and started == []
    # nothing written where the disk is zero: the file's only data is the three runs
    assert _data_extents(out) == [(0, 3 * MiB), (8 * MiB, 9 * MiB), (12 * MiB, 12 * MiB + 64 * 1024)]


def test_where_o_direct_is_refused_writes_runs_and_starts_writeback(saved, tmp_path, monkeypatch):
    from nbdbackup.engine import restore_direct, restore_targets
    from nbdbackup.engine.restore import restore
    from nbdbackup.repo import Repository

    repo, info, raw = saved
    monkeypatch.setattr(restore_direct, "_O_DIRECT", 0)        # as where the open is refused
    writes, started = [], []
    pwritev_all, start_writeback = restore_targets.pwritev_all, restore_targets.start_writeback
    monkeypatch.setattr(restore_targets, "pwritev_all",
                        lambda fd, off, bufs: writes.append((off, sum(map(len, bufs)))) or pwritev_all(fd, off, bufs))
    monkeypatch.setattr(restore_targets, "start_writeback",
                        lambda fd, off, n: started.append((off, n)) or start_writeback(fd, off, n))
    out = tmp_path / "out.raw"
    with Repository.open(str(repo)) as r:
        restore(r, info["id"], str(out))
    assert same_file(out, raw)
    # 4 MiB batches of 64 KiB chunks: the 3 MiB run is one pwritev, not 48 writes
    assert sorted(writes) == SAVED_RUNS and sorted(started) == SAVED_RUNS, (writes, started)
    assert _data_extents(out) == [(0, 3 * MiB), (8 * MiB, 9 * MiB), (12 * MiB, 12 * MiB + 64 * 1024)]


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


def test_direct_runs_longer_than_a_buffer_and_an_unaligned_tail(tmp_path):
    from nbdbackup.engine import restore_direct

    out = tmp_path / "direct.raw"
    rnd = random.Random(3)
    # 5 buffers of odd sizes (summing to whole pages) across 2.5 aligned buffers' worth
    sizes = [restore_direct.UNIT - 4096, 8192 + 100, restore_direct.UNIT // 2 - 100, 4096, restore_direct.UNIT]
    pieces = [rnd.randbytes(n) for n in sizes]
    tail = rnd.randbytes(4096 + 100)                  # the disk's last chunk: not whole pages
    size = 8192 + sum(sizes) + len(tail)
    t = FileTarget(str(out), size)
    try:
        assert t._direct is not None, "the test's file system should take O_DIRECT"
        assert t._direct.write_run(8192, pieces)
        assert not t._direct.write_run(8192 + sum(sizes), [tail])      # the caller writes it buffered
        t.write_run(8192 + sum(sizes), [tail])
        t.finish()
    except BaseException:
        t.abort()
        raise
    assert out.read_bytes() == bytes(8192) + b"".join(pieces) + tail


def test_a_run_in_an_aligned_buffer_is_written_from_it_and_others_are_copied(tmp_path):
    from nbdbackup.engine.restore_direct import UNIT
    from nbdbackup.fsutil import anonymous_map

    out = tmp_path / "aligned.raw"
    rnd = random.Random(4)
    reader_buf = anonymous_map(2 * UNIT)             # what restore decodes a batch into
    reader_buf[:] = rnd.randbytes(2 * UNIT)
    odd = bytearray(rnd.randbytes(8192 + 1))         # a run not on a page boundary in memory
    t = FileTarget(str(out), 3 * UNIT)
    try:
        with memoryview(reader_buf) as whole:
            assert t._direct.write_run(0, [whole[4096:4096 + UNIT + 8192]])
        assert t._direct._buffers._free == []        # written from the reader's buffer, no copy
        assert t._direct.write_run(2 * UNIT, [memoryview(odd)[1:]])
        assert len(t._direct._buffers._free) == 1     # copied into an aligned one first
        t.finish()
    except BaseException:
        t.abort()
        raise
    got = out.read_bytes()
    assert got[:UNIT + 8192] == reader_buf[4096:4096 + UNIT + 8192]
    assert got[2 * UNIT:2 * UNIT + 8192] == odd[1:]


def test_a_failing_direct_reopen_falls_back_and_leaks_nothing(tmp_path, monkeypatch):
    """Any error reopening the file O_DIRECT (here EMFILE) leaves the target buffered: the
    restore goes on, and no descriptor or temporary file is left behind."""
    import errno

    out = tmp_path / "fallback.raw"
    real_open = os.open

    def no_fd_for_proc(path, *a, **kw):
        if str(path).startswith("/proc/self/fd/"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *a, **kw)

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "open", no_fd_for_proc)
    t = FileTarget(str(out), 2 * MiB)
    try:
        assert t._direct is None
        t.write_run(0, [b"\x5a" * MiB])
        t.finish()
    except BaseException:
        t.abort()
        raise
    monkeypatch.setattr(os, "open", real_open)
    assert out.read_bytes() == b"\x5a" * MiB + bytes(MiB)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fallback.raw"]


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
