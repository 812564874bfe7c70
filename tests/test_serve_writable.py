"""Writable overlays, live catalog updates and alias binding of `nbdbackup serve`."""

from __future__ import annotations

import os
import textwrap

from helpers import support
from helpers.repo import CHUNK_SIZE as CHUNK
from helpers.repo import mixed_image, new_repo, write_backup
from helpers.serve import RawClient, serve
from nbdbackup.nbd import proto
from nbdbackup.repo import Repository

SIZE = 2 * 1024 * 1024


def _repo(tmp_path, disks=("vm1",)):
    r = new_repo(tmp_path / "repo")
    data = {}
    infos = {}
    try:
        for k, d in enumerate(disks):
            data[d] = mixed_image(tmp_path / f"{d}.raw", SIZE, 10 + k)
            infos[d] = write_backup(r, d, data[d], zero_holes=True)
    finally:
        r.close()
    return tmp_path / "repo", data, infos


def _repo_reads(path, ids) -> dict[str, bytes]:
    with Repository.open(str(path)) as r:
        out = {}
        for i in ids:
            img = r.open_image(i)
            try:
                out[i] = img.read(0, img.size)
            finally:
                img.close()
        return out


def test_writable_overlay_shared_and_discarded(tmp_path):
    path, data, infos = _repo(tmp_path)
    qemu_io = support.require_tool("qemu-io")
    qemu_img = support.require_tool("qemu-img")
    vid = infos["vm1"].id
    before = _repo_reads(path, [vid])
    support.nbdbackup("verify", "--repo", path)
    ovdir = tmp_path / "overlays"
    with serve(path, tmp_path, "--writable", "--overlay-dir", str(ovdir)) as s:
        # A guest's writes: unaligned data, zeroes, discard, flush, FUA.
        support.run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 1000 70000", "-c", "write -z 200000 150000",
                     "-c", "discard 400000 65536", "-c", "flush", "-c", "write -f -P 0x77 1048576 512",
                     "-c", "read -P 0x5a 1000 70000", s.uri("vm1")])
        # A second client of the same backup (by id, not alias) reads the same view.
        support.run([qemu_io, "-f", "raw", "-c", "read -P 0x5a 1000 70000", "-c", "read -P 0 200000 150000",
                     "-c", "read -P 0x77 1048576 512", s.uri(vid)])
        with RawClient(s) as c:
            c.greet()
            c.go(vid, meta=True)
            assert not c.flags & proto.FLAG_READ_ONLY
            assert c.flags & proto.FLAG_SEND_TRIM and c.flags & proto.FLAG_SEND_WRITE_ZEROES
            expect = bytearray(data["vm1"])
            expect[1000:71000] = b"\x5a" * 70000
            expect[200000:350000] = bytes(150000)
            expect[1048576:1049088] = b"\x77" * 512
            got = c.read(0, 1024 * 1024 + 4096)
            # the discarded range may read as anything the overlay keeps; all else is exact
            assert got[:400000] == bytes(expect[:400000])
            assert got[465536:] == bytes(expect[465536:1024 * 1024 + 4096])
            assert c.request(proto.CMD_WRITE, SIZE - 10, 20, payload=b"y" * 20).error == proto.ENOSPC
            assert c.request(proto.CMD_WRITE_ZEROES, SIZE - 10, 20).error == proto.ENOSPC
            assert c.request(proto.CMD_TRIM, SIZE - 10, 20).error == proto.EINVAL
            assert c.request(proto.CMD_WRITE_ZEROES, 0, 4096, flags=proto.CMD_FLAG_FAST_ZERO).error == 0
            assert c.read(0, 4096) == bytes(4096)
            assert c.request(proto.CMD_WRITE, 0, 0).error == 0
            # block status sees the overlay: written blocks are data, zeroed whole blocks holes
            r = c.request(proto.CMD_BLOCK_STATUS, 0, SIZE)
            body = r.chunks[0][1]
            ext = [proto.EXTENT.unpack_from(body, 4 + 8 * k) for k in range((len(body) - 4) // 8)]
            assert sum(n for n, _ in ext) == SIZE
            pos, states = 0, []
            for n, fl in ext:
                states.append((pos, pos + n, fl))
                pos += n
            def flags_at(o):
                return next(fl for a, b, fl in states if a <= o < b)
            assert flags_at(1000) == 0 and flags_at(1048576) == 0
            assert flags_at(4 * 65536) == proto.STATE_HOLE | proto.STATE_ZERO     # inside the zeroed range
            for o in range(0, SIZE, CHUNK):        # untouched blocks report the backup's own state
                if o + CHUNK <= 1000 or 400000 + 65536 <= o < 1048576 - CHUNK or o > 1049088:
                    zero = data["vm1"][o:o + CHUNK].count(0) == CHUNK
                    assert flags_at(o) == (proto.STATE_HOLE | proto.STATE_ZERO if zero else 0), o
        files = [f for d, _, fs in os.walk(ovdir) for f in fs]
        assert len(files) == 1 and files[0].endswith(".overlay") and vid not in files[0]
    assert [f for d, _, fs in os.walk(ovdir) for f in fs] == []       # discarded on stop
    # The repository is untouched.
    support.nbdbackup("verify", "--repo", path)
    assert _repo_reads(path, [vid]) == before
    with serve(path, tmp_path) as s:
        support.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(tmp_path / "vm1.raw"), s.uri("vm1")])


def test_multi_conn_consistency_nbdsh(tmp_path):
    """qemu's nbd-multiconn check: write on 1, flush on 2, read on 3."""
    path, data, infos = _repo(tmp_path)
    nbdsh = support.require_tool("nbdsh")
    with serve(path, tmp_path, "--writable") as s:
        script = textwrap.dedent(f"""
            import nbd
            uri = {s.uri('vm1')!r}
            hs = [nbd.NBD() for _ in range(3)]
            for x in hs:
                x.connect_uri(uri)
                assert x.can_multi_conn() and x.can_flush() and x.can_fua()
            for k in range(8):
                buf = bytes([0x30 + k]) * 4096
                assert hs[2].pread(4096, 8192 + k * 777) != buf
                hs[0].pwrite(buf, 8192 + k * 777)
                hs[1].flush()
                assert hs[2].pread(4096, 8192 + k * 777) == buf
            hs[1].pwrite(b"F" * 100, 50000, nbd.CMD_FLAG_FUA)
            assert hs[0].pread(100, 50000) == b"F" * 100
            for x in hs:
                x.shutdown()
            print("multiconn ok")
        """)
        env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
        p = support.run([nbdsh, "-c", script], env=env)
        assert "multiconn ok" in p.stdout


def test_new_backup_visible_and_alias_binds_at_connect(tmp_path):
    path, data, infos = _repo(tmp_path, disks=("vm1",))
    nbdinfo = support.require_tool("nbdinfo")
    with serve(path, tmp_path, "--writable") as s:
        with RawClient(s) as old_client:
            old_client.greet()
            old_client.go("vm1")
            old_client.request(proto.CMD_WRITE, 0, 5, payload=b"guest")
            # a new backup arrives while the server runs
            new = bytearray(data["vm1"])
            new[0:CHUNK] = b"N" * CHUNK
            r = Repository.open(str(path))
            try:
                info2 = write_backup(r, "vm1", bytes(new), zero_holes=True)
                write_backup(r, "vm9", bytes(CHUNK), zero_holes=True)
            finally:
                r.close()
            names = support.run([nbdinfo, "--list", s.uri("")]).stdout
            assert info2.id in names and 'export="vm9"' in names
            # the connected client still sees its backup and its own writes
            assert old_client.read(0, CHUNK) == b"guest" + data["vm1"][5:CHUNK]
            with RawClient(s) as fresh:
                fresh.greet()
                fresh.go("vm1")
                assert fresh.read(0, 100) == b"N" * 100
                assert fresh.read(CHUNK, 100) == data["vm1"][CHUNK:CHUNK + 100]
            with RawClient(s) as by_id:
                by_id.greet()
                by_id.go(infos["vm1"].id)      # the old backup's overlay is shared by id
                assert by_id.read(0, 5) == b"guest"


def test_parallel_loads_match_a_shadow_copy(tmp_path):
    """libnbd's aio-parallel and synch-parallel loads (bench/libnbd_load.py): 8 connections
    reading and writing at once, inline and in tasks, every read checked against a shadow."""
    support.require_tool("/usr/bin/python3")
    size = 8 << 20
    r = new_repo(tmp_path / "repo")
    try:
        data = mixed_image(tmp_path / "big.raw", size, 7)
        write_backup(r, "big", data, zero_holes=True)
    finally:
        r.close()
    load = os.path.join(os.path.dirname(__file__), "..", "bench", "libnbd_load.py")
    for kind in ("aio", "synch"):
        # A fresh server each time: the shadow starts as the backup's bytes.
        with serve(tmp_path / "repo", tmp_path, "--writable", "--cache-size", "4M") as s:
            p = support.run(["/usr/bin/python3", load, kind, s.uri("big"), str(tmp_path / "big.raw"),
                             "--seconds", "1"])
            assert '"ops"' in p.stdout, p.stdout


def test_batched_replies_never_wait_for_the_client(tmp_path):
    """Replies to pipelined requests go out together, but never wait for more input: not for
    a request that is not sent yet, nor for the rest of a write payload."""
    path, data, infos = _repo(tmp_path)
    with serve(path, tmp_path, "--writable") as s, RawClient(s) as c:
        c.greet()
        c.go("vm1", structured=False)
        assert c.read(0, 4096) == data["vm1"][:4096]        # chunk 0 is cached now
        req = proto.REQUEST.pack
        reads = b"".join(req(proto.REQUEST_MAGIC, 0, proto.CMD_READ, 10 + k, k * 4096, 4096) for k in range(3))
        payload = b"\xab" * 4096
        c.s.sendall(reads + req(proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 20, 8192, 4096) + payload[:2048])
        for k in range(3):         # answered while the write payload is still incomplete
            assert c.reply(10 + k, 4096).data == data["vm1"][k * 4096:(k + 1) * 4096]
        c.s.sendall(payload[2048:])
        assert c.reply(20).error == 0
        # Pipelined reads, inline writes and a FLUSH in one send: every reply comes, in order.
        c.s.sendall(reads + req(proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 21, 100, 4) + b"wxyz"
                    + req(proto.REQUEST_MAGIC, 0, proto.CMD_FLUSH, 22, 0, 0))
        expect = bytearray(data["vm1"][:3 * 4096])
        expect[8192:12288] = payload
        for k in range(3):
            assert c.reply(10 + k, 4096).data == bytes(expect[k * 4096:(k + 1) * 4096])
        assert c.reply(21).error == 0 and c.reply(22).error == 0
        expect[100:104] = b"wxyz"
        assert c.read(0, 3 * 4096) == bytes(expect)
