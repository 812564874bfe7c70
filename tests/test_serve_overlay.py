"""ExportView + Overlay against a plain bytearray model (hypothesis): reads,
unaligned writes, zeroing and block status must always agree with the model."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdbackup.nbd import proto
from nbdbackup.nbd.overlay import Overlay
from nbdbackup.nbd.server_view import ChunkReadError, ExportView

CS = 4096           # backend chunk size
BLOCK = 1024        # overlay block: smaller than a chunk, so partial blocks and chunks interleave
SIZE = 10 * CS + 777


class MemBackend:
    key = "mem"

    def __init__(self, data: bytes, bad: set[int] = frozenset()):
        self.data = data
        self.size = len(data)
        self.chunk_size = CS
        self.bad = bad
        self.cache: dict[int, bytes] = {}

    def is_zero(self, i):
        c = self.data[i * CS:(i + 1) * CS]
        return c.count(0) == len(c)

    def cached_chunk(self, i):
        return self.cache.get(i)

    def read_chunk(self, i):
        if i in self.bad:
            raise ValueError("checksum mismatch")
        d = self.data[i * CS:(i + 1) * CS]
        self.cache[i] = d
        return d

    def close(self):
        pass


def base_image(seed: int) -> bytes:
    import random

    rnd = random.Random(seed)
    out = bytearray(SIZE)
    for i in range(0, SIZE, CS):
        if rnd.random() < 0.6:
            n = min(CS, SIZE - i)
            out[i:i + n] = rnd.randbytes(n)
    return bytes(out)


def join(pieces, off, length) -> bytes:
    buf = bytearray()
    pos = off
    for o, n, d in pieces:
        assert o == pos and n > 0          # in order, contiguous, non-empty
        buf += bytes(n) if d is None else bytes(d)
        pos += n
    assert pos == off + length
    return bytes(buf)


ranges = st.integers(0, SIZE - 1).flatmap(lambda o: st.tuples(st.just(o), st.integers(1, min(3 * CS, SIZE - o))))
# *_now: the server's inline paths (write_cached/zero_cached), falling back as the server does
ops = st.lists(st.tuples(st.sampled_from(["write", "zero", "read", "write_now", "zero_now"]), ranges,
                         st.integers(0, 255)), max_size=25)


@settings(max_examples=150, deadline=None, database=None)
@given(seed=st.integers(0, 1000), ops=ops)
def test_view_matches_model(tmp_path_factory, seed, ops):
    data = base_image(seed)
    model = bytearray(data)
    d = tmp_path_factory.mktemp("ov")
    pool = ThreadPoolExecutor(2)
    ov = Overlay(str(d / "x.overlay"), SIZE, block=BLOCK)
    view = ExportView(MemBackend(data), pool, ov)

    async def run():
        for op, (off, n), byte in ops:
            if op == "write":
                payload = bytes([byte]) * n
                await view.write(off, payload)
                model[off:off + n] = payload
            elif op == "write_now":
                payload = bytes([byte]) * n
                if not view.write_cached(off, payload):
                    await view.write(off, payload)
                model[off:off + n] = payload
            elif op == "zero":
                await view.zero(off, n)
                model[off:off + n] = bytes(n)
            elif op == "zero_now":
                if not view.zero_cached(off, n):
                    await view.zero(off, n)
                model[off:off + n] = bytes(n)
            else:
                fast = view.read_cached(off, n)
                if fast is not None:
                    assert join(fast, off, n) == model[off:off + n]
                assert join(await view.read(off, n), off, n) == model[off:off + n]
        assert join(await view.read(0, SIZE), 0, SIZE) == model
        ext = view.extents(0, SIZE, 1 << 20)
        pos = 0
        for n, flags in ext:
            if flags & proto.STATE_ZERO:
                assert model[pos:pos + n] == bytes(n), (pos, n)
            pos += n
        assert pos == SIZE
        one = view.extents(5, SIZE - 5, 1)
        assert len(one) == 1 and 0 < one[0][0] <= SIZE - 5

    try:
        asyncio.run(run())
    finally:
        ov.close()
        pool.shutdown()
    assert not (d / "x.overlay").exists()


def test_damaged_chunk_raises_not_wrong_bytes(tmp_path):
    data = base_image(3)
    bad = next(i for i in range(SIZE // CS) if data[i * CS:(i + 1) * CS].count(0) != CS)
    pool = ThreadPoolExecutor(2)
    view = ExportView(MemBackend(data, bad={bad}), pool, None)

    async def run():
        try:
            await view.read(bad * CS + 10, 100)
        except ChunkReadError as e:
            return str(e)
        raise AssertionError("a damaged chunk was served")

    try:
        assert "checksum mismatch" in asyncio.run(run())
        other = next(i for i in range(SIZE // CS) if i != bad)
        assert join(asyncio.run(view.read(other * CS, CS)), other * CS, CS) == data[other * CS:(other + 1) * CS]
    finally:
        pool.shutdown()


def test_a_sequential_writer_of_partial_blocks_reads_ahead(tmp_path, monkeypatch):
    """Each first write into a block needs the backup's bytes of that block: a steady
    sequential writer starts read-ahead as a reader does, so only its first two chunks
    are misses (each miss would hold up every write behind it), and the bytes are right."""
    from nbdbackup.nbd import server_view
    monkeypatch.setattr(server_view, "READ_AHEAD", 8 * CS)
    rnd = __import__("random").Random(5)
    data = rnd.randbytes(48 * CS)                 # no zero chunks: every block needs a read
    model = bytearray(data)
    pool = ThreadPoolExecutor(2)
    ov = Overlay(str(tmp_path / "x.overlay"), len(data), block=BLOCK)
    view = ExportView(MemBackend(data), pool, ov)

    async def run():
        for off in range(8 * CS, len(data), BLOCK // 2):
            payload = bytes([off // BLOCK % 251]) * (BLOCK // 4)     # a quarter of the half-block
            if view.write_cached(off, payload):
                await asyncio.sleep(0.002)        # the client's turn: read-ahead runs meanwhile
            else:
                await view.write(off, payload)
            model[off:off + len(payload)] = payload
        misses = view.misses
        return misses, join(await view.read(0, len(data)), 0, len(data))

    try:
        misses, got = asyncio.run(run())
        assert got == model
        assert misses == 2, misses      # chunk 8 (no stream yet) and 9 (the stream found)
    finally:
        ov.close()
        pool.shutdown()


def test_the_kept_chunk_stays_recent_in_the_cache():
    """Small reads of the chunk the view keeps (the hot chunk) skip the cache's lookup; the view
    still touches it now and then, so the busiest chunk is not the one the LRU evicts."""
    import os

    from nbdbackup.engine.exports import ChunkCache

    class LruBackend(MemBackend):
        def __init__(self, data):
            super().__init__(data)
            self.lru = ChunkCache(2 * CS)       # room for two chunks

        def cached_chunk(self, i):
            return self.lru.get(i.to_bytes(8, "big"))

        def read_chunk(self, i):
            d = self.data[i * CS:(i + 1) * CS]
            self.lru.put(i.to_bytes(8, "big"), d)
            return d

    data = os.urandom(20 * CS)
    backend = LruBackend(data)
    pool = ThreadPoolExecutor(2)
    view = ExportView(backend, pool, None)
    hot = 0

    async def run():
        await view.read(hot * CS, 4096)                 # a miss: the chunk enters the cache
        for other in (4, 8, 12):                        # apart: no read-ahead
            for n in range(200):
                pieces = view.read_cached(hot * CS + n * 16, 16)
                assert pieces is not None and bytes(pieces[0][2]) == data[n * 16:n * 16 + 16]
            assert join(await view.read(other * CS, CS), other * CS, CS) == data[other * CS:(other + 1) * CS]

    try:
        asyncio.run(run())
    finally:
        pool.shutdown()
    assert backend.cached_chunk(hot) is not None, "the busiest chunk was evicted"
    assert backend.cached_chunk(4) is None          # the one the LRU let go instead
