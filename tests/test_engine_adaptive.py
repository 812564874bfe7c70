"""Adaptive compression: chunks left raw when the CPU is busy are counted and restore exactly."""

import random
from contextlib import contextmanager

from helpers import support
from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo
from nbdbackup.engine import adaptive as A
from nbdbackup.engine import backup as B
from nbdbackup.engine.backup import BackupOptions, run_backup
from nbdbackup.repo.repository import Repository
from nbdbackup.sources.nbd_uri import NbdUriSource

WORDS = b"the block device backup snapshot bitmap extent export server client".split()


def _text(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(WORDS, k=12)) + b".\n"
    return bytes(out[:n])


@contextmanager
def _served(tmp_path, data: bytes):
    img = tmp_path / "disk.raw"
    img.write_bytes(data)
    with support.qemu_nbd(img, tmp_path / "s.sock", fmt="raw") as uri:
        yield uri


def _backup_and_read(tmp_path, uri, name: str, adaptive: bool):
    with new_repo(tmp_path / name) as repo:
        [res] = run_backup(repo, NbdUriSource(uri, "d"), "full", BackupOptions(connections=2, adaptive=adaptive))
        img = repo.open_image(res.info.id)
        try:
            back = b"".join(img.read_chunk(i) for i in range(img.nchunks))
        finally:
            img.close()
    return res, back


class _Others:
    """A scripted machine: other_cores() returns the next figure (cores other processes took)."""

    def __init__(self, *loads):
        self.loads = list(loads)

    def other_cores(self):
        return self.loads.pop(0)


def test_the_backups_own_threads_never_stop_compression():
    """Many chunks prepared at once on a 2-core machine nobody else uses: every one is
    compressed (the old gate stored the second concurrent chunk raw)."""
    g = A.CoreGate(2, cpu=_Others(*[0.0] * 10))
    assert all(g.enter() for _ in range(8))
    for _ in range(8):
        g.leave()
    always = A.CoreGate(None)
    assert all(always.enter() for _ in range(5))
    never = A.CoreGate(0)
    assert not any(never.enter() for _ in range(3)) and never.raw_reason() == "no CPU to spare"
    assert A.compression_cores() >= 1


def test_core_gate_leaves_chunks_raw_only_while_others_take_every_core(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(A.time, "monotonic", lambda: clock[0])
    g = A.CoreGate(2, cpu=_Others(1.0, 1.7, None, 1.4, 0.2))

    def step(seconds=0.0):
        clock[0] += seconds
        ok = g.enter()
        g.leave()
        return ok

    assert step() is True                   # the others leave a whole core: compress
    assert step() is True                   # within SAMPLE_S: the last figure holds
    assert step(A.CoreGate.SAMPLE_S) is False      # 1.7 of 2 cores taken by others: store raw
    assert step(A.CoreGate.SAMPLE_S) is False      # no new tick yet: keep the last decision
    assert step(A.CoreGate.SAMPLE_S) is True       # 1.4 taken: 0.6 free is enough
    assert step(A.CoreGate.SAMPLE_S) is True
    assert g.raw_reason() == "other processes kept 1.7 of 2 cores busy"


def test_cpu_times_leaves_this_process_out():
    """This process burns CPU for a while; the figure for the OTHER processes must not see it:
    it stays below the whole machine's busy time by about what we burned."""
    import os
    import time

    cpu = A.CpuTimes()
    before = os.times()
    start = time.monotonic()
    def machine_busy():
        with open("/proc/stat") as f:
            t = [int(x) for x in f.readline().split()[1:9]]
        return sum(t), sum(t) - t[3] - t[4]

    m0 = machine_busy()
    while time.monotonic() - start < 0.6:
        sum(range(100_000))
    others = cpu.other_cores()
    m1 = machine_busy()
    after = os.times()
    assert others is not None
    ours = (after.user + after.system - before.user - before.system) / (time.monotonic() - start)
    busy_machine = (m1[1] - m0[1]) / (m1[0] - m0[0]) * (os.cpu_count() or 1)
    assert ours > 0.3, ours                 # the loop really ran on a core
    # the machine's figure includes our burn, the others' figure does not (ticks are 10 ms: slack)
    assert others <= busy_machine - ours + 0.25, (others, busy_machine, ours)


def test_busy_cpu_leaves_chunks_raw_and_they_restore_exactly(tmp_path, monkeypatch):
    data = _text(24 * CS, seed=1) + bytes(8 * CS)      # 24 text chunks, 8 zero chunks
    with _served(tmp_path, data) as uri:
        res_c, back_c = _backup_and_read(tmp_path, uri, "always", adaptive=False)
        monkeypatch.setattr(A, "compression_cores", lambda: 0)     # no core ever free: nothing is compressed
        res_r, back_r = _backup_and_read(tmp_path, uri, "raw", adaptive=True)
    assert back_c == data and back_r == data
    assert res_c.stats.uncompressed_chunks == 0
    assert res_c.stats.packed_bytes < res_c.stats.data_bytes // 2    # text compresses when tried
    assert res_r.stats.uncompressed_chunks == 24                     # zero chunks are not counted
    assert res_r.stats.packed_bytes == res_r.stats.data_bytes == 24 * CS


def test_a_backup_compresses_every_chunk_unless_others_take_the_cores(tmp_path, monkeypatch):
    """A real backup over 2 connections: with the other processes idle (scripted), every chunk
    is compressed however many are in flight; with them taking both cores, none is, and the
    summary says why."""
    from nbdbackup.cli.backupargs import summary_line

    data = _text(32 * CS, seed=2)
    monkeypatch.setattr(A, "compression_cores", lambda: 2)
    with _served(tmp_path, data) as uri:
        for name, load in (("idle", 0.0), ("busy", 2.0)):
            monkeypatch.setattr(A, "CpuTimes", lambda load=load: _Others(*[load] * 10_000))
            res, back = _backup_and_read(tmp_path, uri, name, adaptive=True)
            assert back == data
            if load == 0.0:
                assert res.stats.uncompressed_chunks == 0
                assert res.stats.packed_bytes < res.stats.data_bytes // 2
                assert "not compressed" not in summary_line(res)
            else:
                assert res.stats.uncompressed_chunks == 32
                assert "32 chunks not compressed: other processes kept 2.0 of 2 cores busy" in summary_line(res)


def test_summary_line_counts_uncompressed_chunks():
    from types import SimpleNamespace

    from nbdbackup.cli.backupargs import summary_line

    info = SimpleNamespace(kind="full", id="x", disk="d", size=1 << 20, read_bytes=1 << 20,
                           stored_bytes=1 << 20, duration_s=1.0)
    st = B.DiskStats(read_bytes=1 << 20, data_bytes=1 << 20, packed_bytes=1 << 20, uncompressed_chunks=3)
    assert "3 chunks not compressed: CPU busy" in summary_line(SimpleNamespace(info=info, stats=st))
    st.raw_reason = "other processes kept 1.9 of 2 cores busy"
    assert "3 chunks not compressed: other processes kept 1.9 of 2 cores busy" in \
        summary_line(SimpleNamespace(info=info, stats=st))
    st.uncompressed_chunks = 0
    assert "not compressed" not in summary_line(SimpleNamespace(info=info, stats=st))


def test_compress_all_option_compresses_every_chunk(tmp_path, monkeypatch):
    """`full --compress-all` turns adaptive compression off, even with no core free."""
    from nbdbackup.cli.main import main

    data = _text(32 * CS, seed=3)
    monkeypatch.setattr(A, "compression_cores", lambda: 0)     # adaptive would store every chunk raw
    stored = {}
    with _served(tmp_path, data) as uri:
        for name, extra in (("adaptive", []), ("all", ["--compress-all"])):
            repo = str(tmp_path / name)
            assert main(["init", "--repo", repo, "--chunk-size", "64K", "-q"]) == 0
            assert main(["full", "--repo", repo, "--source", uri, "--disk", "d", "-q", *extra]) == 0
            with Repository.open(repo) as r:
                [info] = r.list_backups()
                img = r.open_image(info.id)
                try:
                    assert b"".join(img.read_chunk(i) for i in range(img.nchunks)) == data
                finally:
                    img.close()
                stored[name] = info.stored_bytes
    assert stored["adaptive"] >= len(data)          # raw (plus the map)
    assert stored["all"] < len(data) // 2           # every text chunk went through zstd


def test_interrupt_after_the_commit_keeps_the_backup_and_says_so(tmp_path, capsys):
    """A SIGTERM/Ctrl-C that lands after the index commit (while the source does its bitmap
    bookkeeping) must not be reported as "nothing committed": the backup is there."""
    import argparse

    import pytest

    from nbdbackup.cli import main as M

    class LateInterrupt(NbdUriSource):
        def committed(self, plans, infos):
            raise KeyboardInterrupt

    data = _text(8 * CS, seed=5)
    with _served(tmp_path, data) as uri:
        with new_repo(tmp_path / "r") as repo:
            with pytest.raises(KeyboardInterrupt) as ei:
                run_backup(repo, LateInterrupt(uri, "d"), "full", BackupOptions(connections=1))
            [info] = repo.list_backups()
    assert ei.value.committed_backups == [info.id]
    M._interrupted(argparse.Namespace(command="full"), ei.value)
    err = capsys.readouterr().err
    assert f"after backup {info.id} was committed: it is complete and usable" in err, err
    assert "nothing half-done" not in err and "run it again" not in err, err
