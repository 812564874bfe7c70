"""The client against qemu-nbd and qemu-storage-daemon, cross-checked with qemu-img and nbdinfo."""

from __future__ import annotations

import random

import pytest

from helpers import support
from helpers.nbd_servers import merge, nbdinfo_map, qcow2_with_bitmap_and_raw, qsd_export
from helpers.support import qemu_nbd
from nbdbackup.nbd import proto
from nbdbackup.nbd.client import Client
from nbdbackup.nbd.extents import walk_context, walk_extents

pytestmark = pytest.mark.timeout(120)

BM = "qemu:dirty-bitmap:bm0"
ALLOC = "base:allocation"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return qcow2_with_bitmap_and_raw(tmp_path_factory.mktemp("qimg"))


def expected_extents(alloc_map, bitmap_map):
    """What walk_extents must give, computed independently from nbdinfo's two maps."""
    cuts = sorted({o for o, _, _ in alloc_map} | {o for o, _, _ in bitmap_map}
                  | {alloc_map[-1][0] + alloc_map[-1][1]})

    def at(m, off):
        return next(t for o, n, t in m if o <= off < o + n)
    runs = [(a, b - a, bool(at(bitmap_map, a) & 1), bool(at(alloc_map, a) & 2)) for a, b in zip(cuts, cuts[1:])]
    out: list[list] = []
    for o, n, d, z in runs:
        if out and out[-1][2:] == [d, z]:
            out[-1][1] += n
        else:
            out.append([o, n, d, z])
    return [tuple(x) for x in out]


@pytest.mark.parametrize("conns", [1, 4])
def test_qemu_nbd_read_and_maps(tmp_path, image, conns):
    img, raw = image
    with qemu_nbd(img, tmp_path / "s", connections=conns, bitmaps=("bm0",)) as uri:
        # nbdinfo first: with -e 1 qemu-nbd greets nobody else while we are connected
        maps = {ALLOC: nbdinfo_map(uri), BM: nbdinfo_map(uri, BM)}
        with Client.connect(uri, meta_contexts=[ALLOC, BM]) as c:
            assert c.size == len(raw)
            assert c.can_multi_conn == (conns > 1)
            assert c.read_only and c.info.block_size_negotiated
            assert set(c.contexts) == {ALLOC, BM}
            # many requests in flight, completed out of order is fine: compare with qemu-img convert
            futs = [(off, c.submit_read(off, 1 << 20)) for off in range(0, c.size, 1 << 20)]
            for off, f in futs:
                assert f.result() == raw[off:off + (1 << 20)], off
            assert c.read(12345, 3 << 20) == raw[12345:12345 + (3 << 20)]   # unaligned, bigger than one request
            # block status: both contexts agree with nbdinfo, with small windows forcing several calls
            for ctx, want in maps.items():
                assert list(walk_context(c, ctx)) == want
                assert list(walk_context(c, ctx, window=3 << 20)) == want
            alloc, bm = maps[ALLOC], maps[BM]
            got = [(e.offset, e.length, e.dirty, e.zero) for e in walk_extents(c, BM, window=5 << 20)]
            assert got == expected_extents(alloc, bm)
            assert any(d for _, _, d, _ in got) and any(not d for _, _, d, _ in got)
            assert any(z for _, _, _, z in got) and any(not z for _, _, _, z in got)
            # a sub-range
            sub = list(walk_extents(c, BM, offset=10 << 20, length=2 << 20))
            assert sub[0].offset == 10 << 20 and sum(e.length for e in sub) == 2 << 20
            # REQ_ONE: exactly one extent per context, the first one nbdinfo reports
            one = c.block_status(0, c.size, req_one=True)
            assert one[ALLOC] == [(alloc[0][1], alloc[0][2])]
            assert one[BM] == [(bm[0][1], bm[0][2])]


def test_walk_without_bitmap_is_all_dirty(tmp_path, image):
    img, raw = image
    with qemu_nbd(img, tmp_path / "s") as uri:
        want = [(o, n, bool(t & 2)) for o, n, t in merge((o, n, t & 2) for o, n, t in nbdinfo_map(uri))]
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            ext = list(walk_extents(c))
            assert all(e.dirty for e in ext)
            assert [(e.offset, e.length, e.zero) for e in ext] == want
            for e in ext:   # what the map calls zero really reads as zeroes
                if e.zero:
                    assert raw[e.offset:e.end].count(0) == e.length


def test_allocation_depth_context(tmp_path, image):
    img, _ = image
    ctx = proto.CONTEXT_ALLOCATION_DEPTH
    with qemu_nbd(img, tmp_path / "s", bitmaps=("bm0",), extra=("-A",)) as uri:
        info = Client.query_info(uri)
        assert {ALLOC, BM, ctx} <= set(info.contexts)
        # LIST_META_CONTEXT with queries: a namespace prefix, and several exact names
        assert Client.query_info(uri, meta_query=["qemu:dirty-bitmap:"]).contexts == [BM]
        assert sorted(Client.query_info(uri, meta_query=[ALLOC, ctx]).contexts) == sorted([ALLOC, ctx])
        want = nbdinfo_map(uri, ctx)
        with Client.connect(uri, meta_contexts=[ALLOC, BM, ctx]) as c:
            assert set(c.contexts) == {ALLOC, BM, ctx}
            assert list(walk_context(c, ctx)) == want
        # a context nobody offers is simply not negotiated
        with Client.connect(uri, meta_contexts=[ALLOC, "qemu:dirty-bitmap:nope"]) as c:
            assert set(c.contexts) == {ALLOC}


def test_writes_on_writable_qemu_nbd(tmp_path):
    raw = tmp_path / "w.raw"
    size = 8 << 20
    support.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(size)])
    rnd = random.Random(3)
    expect = bytearray(size)
    with qemu_nbd(raw, tmp_path / "s", fmt="raw", readonly=False) as uri:
        with Client.connect(uri, meta_contexts=[ALLOC]) as c:
            assert not c.read_only
            blob = rnd.randbytes(3 << 20)
            futs = [c.submit_write(off, blob[i:i + (1 << 20)]) for i, off in
                    zip(range(0, len(blob), 1 << 20), range(1 << 20, 4 << 20, 1 << 20))]
            for f in futs:
                f.result()
            expect[1 << 20:4 << 20] = blob
            c.write(0, b"\x5a" * 4096, fua=True)
            expect[0:4096] = b"\x5a" * 4096
            c.write_zeroes(2 << 20, 65536)
            expect[2 << 20:(2 << 20) + 65536] = bytes(65536)
            c.write_zeroes(3 << 20, 65536, no_hole=True)
            expect[3 << 20:(3 << 20) + 65536] = bytes(65536)
            if c.flags & proto.FLAG_SEND_FAST_ZERO:
                c.write_zeroes(5 << 20, 4096, fast=True)
            c.trim(6 << 20, 1 << 20)
            c.cache(0, 1 << 20)
            c.flush()
            assert c.read(0, size) == expect
    assert raw.read_bytes() == expect


def test_qemu_storage_daemon_export_with_bitmap(tmp_path, image):
    img, raw = image
    copy = tmp_path / "q.qcow2"
    copy.write_bytes(img.read_bytes())
    # a read-only export can only carry a disabled bitmap
    support.run(["qemu-img", "bitmap", "--disable", str(copy), "bm0"])
    with qsd_export(copy, tmp_path / "s", bitmap="bm0") as uri:
        assert Client.list_exports(uri) == [("disk", "")]
        info = Client.query_info(uri)
        assert info.size == len(raw) and BM in info.contexts and info.read_only
        with Client.connect(uri, meta_contexts=[ALLOC, BM]) as c:
            assert c.read(0, c.size) == raw
            assert list(walk_context(c, BM)) == nbdinfo_map(uri, BM)
            got = [(e.offset, e.length, e.dirty, e.zero) for e in walk_extents(c, BM)]
            assert got == expected_extents(nbdinfo_map(uri), nbdinfo_map(uri, BM))
