"""Requests the server answers inline (cached reads, overlay writes): bounded memory for a
client that reads no replies, and the overlay's I/O errors answered, not a dropped client."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from helpers.repo import new_repo, write_backup
from helpers.serve import RawClient, assemble_read, serve, serve_in_process, wait_until
from nbdbackup.errors import is_no_space
from nbdbackup.nbd import proto

MiB = 1 << 20


def _random_backup(tmp_path, size: int, chunk: int) -> tuple:
    data = os.urandom(size)
    with new_repo(tmp_path / "repo", chunk_size=chunk) as r:
        write_backup(r, "vm1", data)
    return tmp_path / "repo", data


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_reads_no_replies_holds_bounded_memory(tmp_path):
    """Cached 1 MiB reads (one chunk each: the reply path that writes header and data
    without a copy), 400 of them pipelined, replies never read: the server stops reading
    that client's requests once about a MiB of replies waits, instead of queueing 400 MiB."""
    path, data = _random_backup(tmp_path, 2 * MiB, MiB)
    with serve(path, tmp_path, "--cache-size", "16M") as s:
        with RawClient(s) as warm:
            warm.greet()
            warm.go("vm1")
            assert warm.read(0, 2 * MiB) == data       # both chunks cached now
        base = _rss(s.proc.pid)
        c = RawClient(s)
        try:
            c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            c.greet()
            c.go("vm1")
            reqs = b"".join(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_READ, k, (k % 2) * MiB, MiB)
                            for k in range(400))

            def send():
                try:
                    c.s.sendall(reqs)      # blocks once the server stops reading: that is the point
                except OSError:
                    pass
            t = threading.Thread(target=send, daemon=True)
            t.start()
            time.sleep(3)
            grown = _rss(s.proc.pid) - base
            assert grown < 64 * MiB, f"server RSS grew {grown / MiB:.0f} MiB for a client that reads nothing"
        finally:
            c.close()
        assert wait_until(lambda: not t.is_alive())
        with RawClient(s) as ok:       # the server goes on serving
            ok.greet()
            ok.go("vm1")
            assert ok.read(MiB - 10, 20) == data[MiB - 10:MiB + 10]
        assert s.alive() and "Traceback" not in s.log()


def test_overlay_write_error_on_the_inline_path_is_answered(tmp_path):
    """A small write into an overlay block already written goes straight to the overlay file
    on the event loop. When that file's disk is full (its fd pointed at /dev/full) the write
    gets ENOSPC, as a write in a task does, and the client stays connected."""
    path, data = _random_backup(tmp_path, 2 * MiB, 64 << 10)
    with serve_in_process(path, tmp_path, writable=True, overlay_dir=str(tmp_path)) as s, RawClient(s) as c:
        c.greet()
        c.go("vm1")
        assert c.request(proto.CMD_WRITE, 0, 65536, payload=b"a" * 65536).error == 0   # block 0: DATA
        (view,) = s.server.views.values()
        full = os.open("/dev/full", os.O_RDWR)
        saved = os.dup(view.overlay.fd)
        try:
            os.dup2(full, view.overlay.fd)
            try:
                os.pwrite(full, b"x", 0)
                raise AssertionError("/dev/full accepted a write")
            except OSError as e:
                assert is_no_space(e)
            assert c.request(proto.CMD_WRITE, 4096, 4096, payload=b"b" * 4096).error == proto.ENOSPC
            # a partial write of a block whose backup bytes are not cached yet runs as a task: same answer
            assert c.request(proto.CMD_WRITE, 65536 + 100, 100, payload=b"t" * 100).error == proto.ENOSPC
            assert c.request(proto.CMD_FLUSH, 0, 0).error == 0                             # still connected
        finally:
            os.dup2(saved, view.overlay.fd)
            os.close(saved)
            os.close(full)
        assert c.read(0, 8192) == b"a" * 8192        # the failed writes changed nothing
        assert c.read(65536, 4096) == data[65536:65536 + 4096]
        assert c.request(proto.CMD_WRITE, 4096, 4096, payload=b"c" * 4096).error == 0
        assert c.read(4096, 4096) == b"c" * 4096


def _assemble(r, off: int, length: int) -> bytes:
    return assemble_read(r.chunks, off, length)


def test_pipelined_small_reads_answered_in_one_pass_see_writes_in_between(tmp_path):
    """Hundreds of requests sent in one go, all answerable from cache and overlay: small reads
    (inside a chunk, across chunks, over zero chunks, over overlay blocks), a few bigger reads,
    writes and a bad request in between. Each read must see exactly the writes sent before
    it, and every request gets its own answer, in order."""
    import random
    cs = 64 << 10
    data = bytearray(os.urandom(16 * cs))
    data[3 * cs:5 * cs] = bytes(2 * cs)                  # zero chunks: holes
    with new_repo(tmp_path / "repo", chunk_size=cs) as r:
        write_backup(r, "vm1", bytes(data))
    model = bytearray(data)
    rnd = random.Random(7)
    with serve(tmp_path / "repo", tmp_path, "--writable", "--cache-size", "16M") as s, RawClient(s) as c:
        c.greet()
        c.go("vm1")
        assert c.read(0, len(data)) == data               # every chunk cached
        reqs, expect = [], []
        for k in range(600):
            cookie = k + 1
            pick = rnd.random()
            if pick < 0.08:
                off, n = rnd.randrange(len(data) - 5000), rnd.randrange(1, 5000)
                payload = os.urandom(n)
                reqs.append(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, cookie, off, n) + payload)
                model[off:off + n] = payload
                expect.append((cookie, None, 0))
            elif pick < 0.1:
                reqs.append(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_READ, cookie, len(data) - 10, 4096))
                expect.append((cookie, None, proto.EINVAL))
            else:
                n = rnd.choice([1, 512, 4096, 4096, 32768, 32769, 200000])
                off = rnd.randrange(len(data) - n)
                reqs.append(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_READ, cookie, off, n))
                expect.append((cookie, (off, n, bytes(model[off:off + n])), 0))
        c.s.sendall(b"".join(reqs))
        for cookie, read, err in expect:
            rep = c.reply(cookie, read[1] if read else 0)
            assert rep.error == err, (cookie, rep.error)
            if read:
                assert _assemble(rep, read[0], read[1]) == read[2], cookie
        assert s.alive() and "Traceback" not in s.log()


def test_many_small_reads_of_a_chunk_being_read_and_a_client_that_leaves(tmp_path):
    """Hundreds of 4 KiB reads land on chunks not yet cached (each chunk's first read starts
    it, the others wait for that read): bit-exact answers for a client that takes them, and
    a client that sends the same and hangs up mid-way leaves the server serving."""
    cs = MiB
    path, data = _random_backup(tmp_path, 8 * cs, cs)
    reqs = b"".join(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_READ, k + 1, (k * 4096 * 37) % (8 * cs), 4096)
                    for k in range(1000))
    with serve(path, tmp_path, "--cache-size", "4M") as s:
        with RawClient(s) as gone:                       # leaves with its replies unread
            gone.greet()
            gone.go("vm1")
            gone.s.sendall(reqs)
            gone.recv(100)
        with RawClient(s) as c:
            c.greet()
            c.go("vm1")
            c.s.sendall(reqs)
            got = {}
            for _ in range(1000):
                magic, flags, typ, ck, ln = struct.unpack(">IHHQI", c.recv(20))
                assert magic == proto.STRUCTURED_REPLY_MAGIC and typ == proto.REPLY_TYPE_OFFSET_DATA, typ
                body = c.recv(ln)
                got[ck] = (proto.U64.unpack_from(body)[0], body[8:])
            for k in range(1000):
                off = (k * 4096 * 37) % (8 * cs)
                assert got[k + 1] == (off, data[off:off + 4096]), k
        assert s.alive() and "Traceback" not in s.log()


def test_pipelined_writes_in_written_blocks_land_in_order_and_in_any_order(tmp_path):
    """Batches of small writes into overlay blocks already written, all here at once: neighbours
    sent out of order (as qemu sends them) become one pwritev, overlapping ones must land
    in the order sent, FUA writes too, and reads between them see exactly what came before."""
    import random
    cs = 64 << 10
    data = os.urandom(8 * cs)
    with new_repo(tmp_path / "repo", chunk_size=cs) as r:
        write_backup(r, "vm1", data)
    model = bytearray(data)
    rnd = random.Random(3)
    with serve(tmp_path / "repo", tmp_path, "--writable") as s, RawClient(s) as c:
        c.greet()
        c.go("vm1")
        fill = os.urandom(len(data))
        for off in range(0, len(data), cs):              # every block written: DATA
            assert c.request(proto.CMD_WRITE, off, cs, payload=fill[off:off + cs]).error == 0
        model[:] = fill
        cookie = 0
        for _round in range(20):
            reqs, expect = [], []
            base = rnd.randrange(0, len(data) - 64 * 1024, 4096)
            offs = [base + 4096 * k for k in range(16)]
            rnd.shuffle(offs)
            for off in offs[:12] + [base + 100, base + 100, base + 5000] + offs[12:]:
                cookie += 1
                n = 4096 if off % 4096 == 0 else 3000
                payload = os.urandom(n)
                flags = proto.CMD_FLAG_FUA if cookie % 5 == 0 else 0
                reqs.append(proto.REQUEST.pack(proto.REQUEST_MAGIC, flags, proto.CMD_WRITE, cookie, off, n) + payload)
                model[off:off + n] = payload
                expect.append((cookie, None))
                if cookie % 7 == 0:
                    cookie += 1
                    reqs.append(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.CMD_READ, cookie, base, 65536))
                    expect.append((cookie, bytes(model[base:base + 65536])))
            c.s.sendall(b"".join(reqs))
            for ck, want in expect:
                rep = c.reply(ck, 65536 if want else 0)
                assert rep.error == 0, (ck, rep.error)
                if want is not None:
                    assert _assemble(rep, base, 65536) == want, ck
        assert c.read(0, len(data)) == model
        assert s.alive() and "Traceback" not in s.log()
