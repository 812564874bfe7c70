"""`nbdbackup serve` against real NBD clients: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import support
from helpers.repo import CHUNK_SIZE as CHUNK
from helpers.repo import mixed_image, new_repo, write_backup
from helpers.serve import RawClient, serve
from nbdbackup.nbd import proto

SIZE = 4 * 1024 * 1024 + 12345       # not a multiple of the chunk size


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-repo")
    r = new_repo(d / "repo")
    imgs = {}
    try:
        a1 = mixed_image(d / "a1.raw", SIZE, 1)
        i1 = write_backup(r, "vm1", a1, zero_holes=True)
        a2 = bytearray(a1)
        a2[100000:100000 + 70000] = os.urandom(70000)
        a2[2 * CHUNK:3 * CHUNK] = bytes(CHUNK)
        (d / "a2.raw").write_bytes(a2)
        i2 = write_backup(r, "vm1", bytes(a2), zero_holes=True)
        b1 = mixed_image(d / "b1.raw", 3 * 1024 * 1024, 7)
        i3 = write_backup(r, "vm2", b1, zero_holes=True)
        imgs = {i1.id: d / "a1.raw", i2.id: d / "a2.raw", i3.id: d / "b1.raw",
                "vm1": d / "a2.raw", "vm2": d / "b1.raw"}
    finally:
        r.close()
    return d / "repo", imgs, {"old": i1, "new": i2, "other": i3}


def test_list_describes_every_export(repo, tmp_path):
    path, imgs, infos = repo
    nbdinfo = support.require_tool("nbdinfo")
    with serve(path, tmp_path) as s:
        out = support.run([nbdinfo, "--list", "--json", s.uri("")]).stdout
        exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
        assert set(exports) == set(imgs)
        old = exports[infos["old"].id]
        assert "disk vm1" in old["description"] and "full" in old["description"]
        assert infos["old"].created.strftime("%Y-%m-%d %H:%M:%S") in old["description"]
        assert infos["new"].id in exports["vm1"]["description"]
        assert exports["vm2"]["export-size"] == 3 * 1024 * 1024
        assert exports["vm1"]["export-size"] == SIZE
        assert exports["vm1"]["is_read_only"] is True
        assert exports["vm1"]["block_size_maximum"] == 32 * 1024 * 1024
        assert "base:allocation" in exports["vm1"]["contexts"]


def test_compare_and_convert_every_export(repo, tmp_path):
    path, imgs, _ = repo
    qemu_img = support.require_tool("qemu-img")
    with serve(path, tmp_path) as s:
        for name, raw in imgs.items():
            support.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(raw), s.uri(name)])
            out = tmp_path / f"{name}.out"
            support.run([qemu_img, "convert", "-f", "raw", "-O", "raw", s.uri(name), str(out)])
            got, want = out.read_bytes(), raw.read_bytes()
            # qemu-img rounds a raw target up to whole 512-byte sectors
            assert got[:len(want)] == want and got[len(want):] == bytes(len(got) - len(want)), name
            assert len(got) - len(want) < 512


def test_map_reports_zero_chunks_as_holes(repo, tmp_path):
    path, imgs, _ = repo
    nbdinfo = support.require_tool("nbdinfo")
    data = imgs["vm1"].read_bytes()
    with serve(path, tmp_path) as s:
        ext = json.loads(support.run([nbdinfo, "--map", "--json", s.uri("vm1")]).stdout)
    assert sum(e["length"] for e in ext) == len(data)
    for e in ext:
        for off in range(e["offset"], e["offset"] + e["length"], CHUNK):
            piece = data[off:off + CHUNK]
            if e["type"] == 3:
                assert piece.count(0) == len(piece), f"hole at {off} is not zero"
            else:
                assert e["type"] == 0 and piece.count(0) != len(piece), f"zero chunk {off} reported as data"


def test_multi_conn_and_nbdcopy(repo, tmp_path):
    path, imgs, infos = repo
    nbdinfo = support.require_tool("nbdinfo")
    nbdcopy = support.require_tool("nbdcopy")
    with serve(path, tmp_path) as s:
        assert subprocess.run([nbdinfo, "--can", "multi-conn", s.uri("vm1")]).returncode == 0
        out = tmp_path / "copy.raw"
        support.run([nbdcopy, "-C", "4", "-R", "16", s.uri(infos["old"].id), str(out)])
        assert out.read_bytes() == imgs[infos["old"].id].read_bytes()


def test_qemu_io_reads_and_readonly_writes_fail(repo, tmp_path):
    path, imgs, _ = repo
    qemu_io = support.require_tool("qemu-io")
    data = imgs["vm2"].read_bytes()
    with serve(path, tmp_path) as s:
        pattern = data[CHUNK - 512:CHUNK + 512]
        p = support.run([qemu_io, "-r", "-f", "raw", "-c", f"read -v {CHUNK - 512} 1024", s.uri("vm2")])
        dumped = bytes(int(x, 16) for line in p.stdout.splitlines() if ":" in line and line[:8].strip().isalnum()
                       for x in line.split(":", 1)[1].split()[:16] if len(x) == 2)
        assert dumped[:1024] == pattern
        with RawClient(s) as c:
            c.greet()
            c.go("vm2")
            assert c.flags & proto.FLAG_READ_ONLY
            r = c.request(proto.CMD_WRITE, 0, 4096, payload=b"x" * 4096)
            assert r.error == proto.EPERM
            assert c.request(proto.CMD_WRITE_ZEROES, 0, 4096).error == proto.EPERM
            assert c.request(proto.CMD_TRIM, 0, 4096).error == proto.EPERM
            assert c.read(0, 4096) == data[:4096]      # the connection survives


def test_simple_replies_for_old_clients(repo, tmp_path):
    path, imgs, _ = repo
    data = imgs["vm1"].read_bytes()
    with serve(path, tmp_path) as s:
        with RawClient(s) as c:      # no structured replies: simple replies, holes as zero bytes
            c.greet()
            c.go("vm1", structured=False)
            assert c.read(2 * CHUNK - 100, CHUNK + 200) == data[2 * CHUNK - 100:3 * CHUNK + 100]
            assert c.request(proto.CMD_BLOCK_STATUS, 0, 4096).error == proto.EINVAL
        with RawClient(s) as c:      # NBD_OPT_EXPORT_NAME, the oldest way in
            c.greet(proto.FLAG_C_FIXED_NEWSTYLE)
            c.s.sendall(proto.OPTION_REQUEST.pack(proto.IHAVEOPT, proto.OPT_EXPORT_NAME, 3) + b"vm1")
            size, flags = proto.EXPORT_NAME_REPLY.unpack(c.recv(10))
            assert c.recv(124) == bytes(124)
            assert size == len(data) and flags & proto.FLAG_READ_ONLY
            assert c.read(len(data) - 1000, 1000) == data[-1000:]


def test_structured_reads_holes_and_df(repo, tmp_path):
    path, imgs, _ = repo
    data = imgs["vm1"].read_bytes()
    with serve(path, tmp_path) as s, RawClient(s) as c:
        c.greet()
        c.go("vm1", meta=True)
        off, n = CHUNK, 3 * CHUNK              # chunk 2 is all zero in this backup
        r = c.request(proto.CMD_READ, off, n)
        assert r.data == data[off:off + n]
        types = [t for t, _ in r.chunks]
        assert proto.REPLY_TYPE_OFFSET_HOLE in types and proto.REPLY_TYPE_OFFSET_DATA in types
        r = c.request(proto.CMD_READ, off, n, flags=proto.CMD_FLAG_DF)
        assert [t for t, _ in r.chunks] == [proto.REPLY_TYPE_OFFSET_DATA] and r.data == data[off:off + n]
        # block status, with and without REQ_ONE
        r = c.request(proto.CMD_BLOCK_STATUS, 0, 4 * CHUNK)
        (t, body), = r.chunks
        assert t == proto.REPLY_TYPE_BLOCK_STATUS
        ext = [proto.EXTENT.unpack_from(body, 4 + 8 * k) for k in range((len(body) - 4) // 8)]
        assert sum(n for n, _ in ext) == 4 * CHUNK
        pos = 0
        for n, fl in ext:
            zero = data[pos:pos + n].count(0) == n
            assert (fl == proto.STATE_HOLE | proto.STATE_ZERO) == zero or (fl == 0 and not zero)
            pos += n
        r = c.request(proto.CMD_BLOCK_STATUS, 0, 4 * CHUNK, flags=proto.CMD_FLAG_REQ_ONE)
        assert (len(r.chunks[0][1]) - 4) // 8 == 1
        # CACHE, FLUSH work on a read-only export too
        assert c.request(proto.CMD_CACHE, 0, 4 * CHUNK).error == 0
        assert c.request(proto.CMD_FLUSH, 0, 0).error == 0
        c.send(proto.CMD_DISC, 0, 0)
        assert c.is_closed()


def test_many_clients_at_once(repo, tmp_path):
    """Several exports copied at the same time, each over several connections, all exact."""
    path, imgs, _ = repo
    nbdcopy = support.require_tool("nbdcopy")
    with serve(path, tmp_path, "--cache-size", "1M") as s:     # a tiny cache: most reads go to the pool
        procs = []
        for k, (name, raw) in enumerate(list(imgs.items()) * 2):
            out = tmp_path / f"many-{k}.raw"
            procs.append((subprocess.Popen([nbdcopy, "-C", "3", s.uri(name), str(out)],
                                           stderr=subprocess.PIPE), out, raw))
        for p, out, raw in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert out.read_bytes() == raw.read_bytes()
        assert s.alive()
