"""How a restore writes a file: one pwritev per run of neighbouring chunks, writeback started
right after it (sync_file_range), zero chunks never written; seen by strace and SEEK_DATA."""

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


def test_writes_runs_starts_writeback_and_leaves_zeros_unwritten(saved, tmp_path):
    repo, info, raw = saved
    out, trace = tmp_path / "out.raw", tmp_path / "strace.log"
    strace = support.require_tool("strace")
    # -ff: one log per thread, so no call is split by another thread's; -s 0: no data in it
    support.run([strace, "-ff", "-qq", "-s", "0", "-e", "trace=pwrite64,pwritev,pwritev2,sync_file_range",
                 "-o", str(trace), support.nbdbackup_exe(), "--repo", str(repo), "restore", info["id"], str(out)])
    assert same_file(out, raw)
    log = "".join(p.read_text() for p in tmp_path.glob("strace.log.*"))
    calls = re.findall(r"pwritev2?\((\d+), \[.*?\], \d+, (\d+)(?:, 0)?\)\s+= (\d+)", log)
    fds = {fd for fd, _, _ in calls}
    assert len(fds) == 1, calls
    writes = [(int(o), int(n)) for _, o, n in calls]
    assert not re.search(rf"pwrite64\({fds.pop()},", log)          # SQLite's own writes aside
    # 4 MiB batches of 64 KiB chunks: the 3 MiB run is one pwritev, not 48 writes
    assert (0, 3 * MiB) in writes and len(writes) == 3, writes
    started = {(int(o), int(n)) for o, n in re.findall(r"sync_file_range\(\d+, (\d+), (\d+), SYNC_FILE_RANGE_WRITE\)",
                                                        log)}
    assert set(writes) <= started
    # nothing written where the disk is zero: the file's only data is the three runs
    assert _data_extents(out) == [(0, 3 * MiB), (8 * MiB, 9 * MiB), (12 * MiB, 12 * MiB + 64 * 1024)]


def test_write_run_of_more_buffers_than_one_pwritev_takes(tmp_path):
    out = tmp_path / "many.raw"
    pieces = [bytes([i % 251]) * 512 for i in range(3000)]       # > IOV_MAX (1024) buffers
    t = FileTarget(str(out), 4096 + 3000 * 512)
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
