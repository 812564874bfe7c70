"""The client against nbdkit plugins and filters, and the reference nbd-server."""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import pytest

from helpers import support
from helpers.nbd_servers import nbd_server, nbdinfo_map, nbdkit
from nbdbackup.errors import NbdCommandError, NbdConnectionError
from nbdbackup.nbd import proto
from nbdbackup.nbd.client import Client
from nbdbackup.nbd.extents import walk_context, walk_extents
from nbdbackup.nbd.pool import ConnectionPool

pytestmark = pytest.mark.timeout(120)

ALLOC = "base:allocation"


def pattern(offset: int, length: int) -> bytes:
    """nbdkit-pattern-plugin: every 8-byte word holds its own offset, big-endian."""
    start = offset - offset % 8
    words = range(start, offset + length + 8, 8)
    data = struct.pack(f">{len(words)}Q", *words)
    return data[offset - start:offset - start + length]


def test_memory_plugin_write_read_and_map(tmp_path):
    with nbdkit(tmp_path / "s", "memory", "16M") as uri:
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            assert c.size == 16 << 20 and not c.read_only
            c.write(0, b"A" * 65536)
            c.write(1 << 20, b"B" * 12345)
            c.write_zeroes(0, 4096)
            c.write_zeroes(8 << 20, 1 << 20, no_hole=True)
            if c.flags & proto.FLAG_SEND_FAST_ZERO:
                c.write_zeroes(9 << 20, 1 << 20, fast=True)
            c.trim(4096, 4096)
            c.cache(0, 1 << 20)
            c.flush()
            data = c.read(0, 2 << 20)
            assert data[:8192] == bytes(8192)
            assert data[8192:65536] == b"A" * (65536 - 8192)
            assert data[1 << 20:(1 << 20) + 12345] == b"B" * 12345
            assert data[(1 << 20) + 12345:] == bytes(len(data) - (1 << 20) - 12345)
            got = list(walk_context(c, ALLOC))
        # after our connection closed nbdkit forgets nothing (one process), so compare now
        assert got == nbdinfo_map(uri)
        assert any(f == 0 for _, _, f in got) and any(f & 2 for _, _, f in got)


def test_sparse_random_matches_nbdcopy(tmp_path):
    exe = support.require_tool("nbdcopy")
    with nbdkit(tmp_path / "s", "sparse-random", "size=64M", "seed=42") as uri:
        out = tmp_path / "copy.raw"
        support.run([exe, uri, str(out)])
        want = out.read_bytes()
        with ConnectionPool(uri, connections=4, meta_contexts=[ALLOC]) as pool:
            assert pool.connections == 4
            futs = [(off, pool.submit_read(off, 4 << 20)) for off in range(0, pool.size, 4 << 20)]
            for off, f in futs:
                assert f.result() == want[off:off + (4 << 20)]
            assert list(walk_context(pool, ALLOC)) == nbdinfo_map(uri)
            for e in walk_extents(pool):
                if e.zero:
                    assert want[e.offset:e.end].count(0) == e.length


def test_data_plugin(tmp_path):
    with nbdkit(tmp_path / "s", "data", "1 2 3 @4096 0x41 0x42 @8191 9", "size=16384") as uri:
        with Client.connect(uri) as c:
            d = c.read(0, c.size)
    want = bytearray(16384)
    want[0:3] = b"\x01\x02\x03"
    want[4096:4098] = b"AB"
    want[8191] = 9
    assert d == want


def test_error_filter_eio(tmp_path):
    """EIO on every read: a command error per request, the connection stays usable."""
    with nbdkit(tmp_path / "s", "pattern", "size=1M", "error-pread-rate=100%", "error=EIO",
                filters=("error",)) as uri:
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            for _ in range(3):
                with pytest.raises(NbdCommandError, match="EIO") as ei:
                    c.read(0, 4096)
                assert ei.value.errno == proto.EIO
            assert c.alive
            assert c.block_status(0, 4096)     # other commands still work


def test_error_filter_at_a_rate_never_gives_wrong_data(tmp_path):
    with nbdkit(tmp_path / "s", "pattern", "size=4M", "error-pread-rate=30%", "error=EIO",
                filters=("error",)) as uri:
        with Client.connect(uri) as c:
            ok = bad = 0
            futs = [(off, c.submit_read(off, 65536)) for off in range(0, c.size, 65536)]
            for off, f in futs:
                try:
                    assert f.result() == pattern(off, 65536)
                    ok += 1
                except NbdCommandError as e:
                    assert e.errno == proto.EIO
                    bad += 1
            assert ok and bad


def test_delay_filter_many_in_flight_and_timeout(tmp_path):
    with nbdkit(tmp_path / "s", "pattern", "size=4M", "rdelay=200ms", filters=("delay",)) as uri:
        with Client.connect(uri) as c:
            futs = [(off, c.submit_read(off, 4096)) for off in range(0, 64 * 4096, 4096)]
            assert c.in_flight > 1
            for off, f in futs:
                assert f.result() == pattern(off, 4096)
        with Client.connect(uri, timeout=0.05) as c:
            with pytest.raises(NbdConnectionError, match="no reply within"):
                c.read(0, 4096)
            assert not c.alive


def test_blocksize_policy_is_obeyed(tmp_path):
    """With min 4 KiB / max 64 KiB and errors for violations, unaligned and big reads still work."""
    with nbdkit(tmp_path / "s", "pattern", "size=1M", "blocksize-minimum=4096", "blocksize-preferred=16384",
                "blocksize-maximum=65536", "blocksize-error-policy=error",
                filters=("blocksize-policy",)) as uri:
        with Client.connect(uri) as c:
            assert (c.min_block, c.preferred_block, c.max_block) == (4096, 16384, 65536)
            assert c.read(1000, 100) == pattern(1000, 100)
            assert c.read(4095, 300000) == pattern(4095, 300000)
            assert c.read(0, c.size) == pattern(0, c.size)


def test_blocksize_filter(tmp_path):
    with nbdkit(tmp_path / "s", "pattern", "size=1M", "minblock=4096", "maxdata=65536",
                filters=("blocksize",)) as uri:
        with Client.connect(uri) as c:
            assert c.read(7, 200000) == pattern(7, 200000)


def test_noextents_filter(tmp_path):
    with nbdkit(tmp_path / "s", "memory", "8M", filters=("noextents",)) as uri:
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            assert list(walk_context(c, ALLOC)) == [(0, 8 << 20, 0)] == nbdinfo_map(uri)
            assert [(e.dirty, e.zero) for e in walk_extents(c)] == [(True, False)]


def test_simple_replies_only(tmp_path):
    """nbdkit --no-sr: no structured replies, so no meta contexts: everything is data to read."""
    with nbdkit(tmp_path / "s", "pattern", "size=2M", options=("--no-sr",)) as uri:
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            assert not c.structured and c.contexts == {}
            ext = list(walk_extents(c))
            assert [(e.offset, e.length, e.dirty, e.zero) for e in ext] == [(0, 2 << 20, True, False)]
            futs = [(off, c.submit_read(off, 65536)) for off in range(0, c.size, 65536)]
            for off, f in futs:
                assert f.result() == pattern(off, 65536)


def test_walk_16t_export_in_constant_memory(tmp_path):
    size = 16 << 40
    with nbdkit(tmp_path / "s", "memory", str(size)) as uri:
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            c.write(5 << 40, b"x" * 65536)
            tracemalloc.start()
            try:
                n = 0
                ext = []
                for e in walk_extents(c):
                    n += 1
                    ext.append(e)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert [(e.offset, e.length, e.zero) for e in ext] == [
                (0, 5 << 40, True), (5 << 40, 65536, False), ((5 << 40) + 65536, size - (5 << 40) - 65536, True)]
            assert peak < 2 << 20, peak
    # sparse-random builds its map at start-up (16T takes ~30 s); 64G has plenty of extents too
    with nbdkit(tmp_path / "s2", "sparse-random", "size=64G", "seed=3", "runlength=65536") as uri:
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            tracemalloc.start()
            try:   # lazy: the first extents arrive without walking 16 TiB
                first = list(itertools.islice(walk_extents(c), 2000))
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert len(first) == 2000 and first[0].offset == 0
            assert all(a.end == b.offset for a, b in zip(first, first[1:]))
            assert peak < 64 << 20, peak


def test_nbd_server_reference(tmp_path):
    img = tmp_path / "ns.raw"
    data = bytearray(pattern(0, 4 << 20))
    img.write_bytes(data)
    with nbd_server(img, tmp_path) as uri:
        assert Client.list_exports(uri) == [("disk", "")]
    with nbd_server(img, tmp_path) as uri:   # it serves one client per run in the foreground
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            assert c.size == len(data) and not c.read_only
            assert c.read(0, c.size) == data
            c.write(4096, b"Z" * 8192, fua=True)
            data[4096:4096 + 8192] = b"Z" * 8192
            c.write_zeroes(1 << 20, 65536)
            data[1 << 20:(1 << 20) + 65536] = bytes(65536)
            c.trim(3 << 20, 4096)
            c.flush()
            got = c.read(0, 2 << 20)
            assert got == data[:2 << 20]
    assert img.read_bytes()[:2 << 20] == data[:2 << 20]
