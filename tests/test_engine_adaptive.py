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


class _Idle:
    """A scripted machine: idle_share() returns the next figure."""

    def __init__(self, *shares):
        self.shares = list(shares)

    def idle_share(self):
        return self.shares.pop(0)


def test_core_gate_counts_busy_preparers():
    g = A.CoreGate(1, cpu=_Idle(*[0.9] * 10))
    assert g.enter() is True        # a free core: compress
    assert g.enter() is False       # the one core is busy: store raw
    g.leave()
    g.leave()
    assert g.enter() is True
    g.leave()
    always = A.CoreGate(None)
    assert all(always.enter() for _ in range(5))
    assert A.compression_cores() >= 1


def test_core_gate_compresses_only_while_the_machine_has_idle_cpu(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(B.time, "monotonic", lambda: clock[0])
    g = A.CoreGate(4, cpu=_Idle(0.5, 0.05, None, 0.3))

    def step(seconds=0.0):
        clock[0] += seconds
        ok = g.enter()
        g.leave()
        return ok

    assert step() is True                   # half the machine idle: compress
    assert step() is True                   # within SAMPLE_S: the last figure holds
    assert step(A.CoreGate.SAMPLE_S) is False      # 5 % idle (the NBD server is busy too): store raw
    assert step(A.CoreGate.SAMPLE_S) is False      # no new tick yet: keep the last decision
    assert step(A.CoreGate.SAMPLE_S) is True       # idle again


def test_cpu_times_reads_this_machine():
    cpu = A.CpuTimes()
    deadline = B.time.monotonic() + 2
    share = None
    while share is None and B.time.monotonic() < deadline:
        sum(range(200_000))                 # let a clock tick pass
        share = cpu.idle_share()
    assert share is not None and 0.0 <= share <= 1.0


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


def test_summary_line_counts_uncompressed_chunks():
    from types import SimpleNamespace

    from nbdbackup.cli.backupargs import summary_line

    info = SimpleNamespace(kind="full", id="x", disk="d", size=1 << 20, read_bytes=1 << 20,
                           stored_bytes=1 << 20, duration_s=1.0)
    st = B.DiskStats(read_bytes=1 << 20, data_bytes=1 << 20, packed_bytes=1 << 20, uncompressed_chunks=3)
    assert "3 chunks not compressed" in summary_line(SimpleNamespace(info=info, stats=st))
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
