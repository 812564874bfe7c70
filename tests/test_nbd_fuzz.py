"""Property test: whatever a server sends in reply to a READ, the client returns exactly the right
bytes or raises an NbdError; never wrong data, never a hang, never another exception."""

from __future__ import annotations

import queue
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.fake_nbd_server import FakeServer
from nbdbackup.errors import NbdCommandError, NbdError, NbdProtocolError
from nbdbackup.nbd import proto
from nbdbackup.nbd.client import Client

pytestmark = pytest.mark.timeout(300)

LENGTH = 8192
MUTATIONS = ["none", "drop", "duplicate", "shift", "cookie", "unknown_type", "error", "truncate",
             "early_done", "bad_magic"]


def pieces_for(rnd: random.Random) -> list[tuple[str, int, int]]:
    """A random partition of [0, LENGTH) into data and hole pieces."""
    cuts = sorted(rnd.sample(range(1, LENGTH), rnd.randint(0, 6)))
    bounds = [0, *cuts, LENGTH]
    return [(rnd.choice("dh"), a, b - a) for a, b in zip(bounds, bounds[1:])]


def build(seed: int, mutation: str, image: bytes):
    """(bytes to send after reading the request, expected outcome) for a cookie placeholder."""
    rnd = random.Random(seed)
    pieces = pieces_for(rnd)
    rnd.shuffle(pieces)
    expect = "ok"
    specs = [dict(kind=k, off=o, n=n, cookie_ok=True, rtype=None, magic=None) for k, o, n in pieces]
    i = rnd.randrange(len(specs))
    if mutation == "drop" and len(specs) > 1:
        specs.pop(i)
        expect = "protocol"
    elif mutation == "duplicate":
        specs.insert(rnd.randrange(len(specs) + 1), dict(specs[i]))
        expect = "protocol"
    elif mutation == "shift":
        specs[i]["off"] += rnd.choice([-1, 1]) * rnd.randint(1, LENGTH)
        expect = "protocol"
    elif mutation == "cookie":
        specs[i]["cookie_ok"] = False
        expect = "protocol"
    elif mutation == "unknown_type":
        specs[i]["rtype"] = rnd.choice([3, 4, 7, 8, 100, 0x7FFF])
        expect = "protocol"
    elif mutation == "error":
        specs[i]["kind"] = "e"
        expect = "command"
    elif mutation == "bad_magic":
        specs[i]["magic"] = rnd.choice([0, proto.SIMPLE_REPLY_MAGIC + 1, 0xFFFFFFFF])
        expect = "protocol"
    done_at = len(specs) - 1
    if mutation == "early_done" and len(specs) > 1:
        done_at = rnd.randrange(len(specs) - 1)
        expect = "protocol"

    def encode(cookie: int) -> bytes:
        out = b""
        for j, s in enumerate(specs):
            flags = proto.REPLY_FLAG_DONE if j == done_at else 0
            c = cookie if s["cookie_ok"] else cookie + 7
            if s["kind"] == "d":
                rtype, payload = proto.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", s["off"] & (2**64 - 1)) + \
                    image[max(s["off"], 0):max(s["off"], 0) + s["n"]].ljust(s["n"], b"\x01")
            elif s["kind"] == "h":
                rtype, payload = proto.REPLY_TYPE_OFFSET_HOLE, proto.OFFSET_HOLE_STRUCT.pack(
                    s["off"] & (2**64 - 1), s["n"])
            else:
                rtype, payload = proto.REPLY_TYPE_ERROR, proto.ERROR_STRUCT.pack(proto.EIO, 0)
            rtype = s["rtype"] if s["rtype"] is not None else rtype
            magic = proto.STRUCTURED_REPLY_MAGIC if s["magic"] is None else s["magic"]
            out += proto.STRUCTURED_REPLY.pack(magic, flags, rtype, c,
                                               len(payload)) + payload
        if mutation == "truncate":
            out = out[:rnd.randrange(len(out))]
        return out

    if mutation == "truncate":
        expect = "any_error"
    # the truth a correct reply describes: data pieces carry the image, holes read as zero
    truth = bytearray(LENGTH)
    for k, o, n in pieces:
        if k == "d":
            truth[o:o + n] = image[o:o + n]
    return encode, expect, bytes(truth)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    scripts: queue.Queue = queue.Queue()

    def handler(conn, srv):
        encode, close_after = scripts.get(timeout=10)
        srv.negotiate(conn)
        _, cmd, cookie, off, n = srv.read_request(conn)
        assert (cmd, off, n) == (proto.CMD_READ, 0, LENGTH)
        conn.sendall(encode(cookie))
        if close_after:
            conn.close()
            return
        srv.wait_disc(conn)

    with FakeServer(tmp_path_factory.mktemp("fz") / "s", handler, size=LENGTH) as srv:
        yield srv, scripts


IMAGE = bytes(random.Random(1).randbytes(LENGTH)).replace(b"\0", b"\x02")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), mutation=st.sampled_from(MUTATIONS))
def test_read_reply_fuzz(fuzz_server, seed, mutation):
    srv, scripts = fuzz_server
    encode, expect, truth = build(seed, mutation, IMAGE)
    scripts.put((encode, mutation == "truncate"))
    with Client.connect(srv.uri, timeout=3) as c:
        try:
            got = c.read(0, LENGTH)
        except NbdError as e:
            assert expect != "ok", f"valid reply refused: {e}"
            if expect == "command":
                assert isinstance(e, NbdCommandError) and e.errno == proto.EIO
            elif expect == "protocol":
                assert isinstance(e, NbdProtocolError), repr(e)
            return
    assert expect == "ok", f"{mutation}: accepted a reply that should have failed"
    assert bytes(got) == truth


BLOCK = 4096
BS_SIZE = 256 * BLOCK
ALLOC, BITMAP = "base:allocation", "qemu:dirty-bitmap:b"


def runs_of(rnd: random.Random, values) -> list[int]:
    """Per-block flags made of random runs."""
    out: list[int] = []
    while len(out) < BS_SIZE // BLOCK:
        out += [rnd.choice(values)] * rnd.randint(1, 40)
    return out[:BS_SIZE // BLOCK]


def short_reply(rnd: random.Random, flags: list[int], off: int, n: int) -> list[tuple[int, int]]:
    """Extents from *off*, honest but short: runs split at random, cut after a few extents;
    the last one may run past the request."""
    ext, pos = [], off
    limit = rnd.randint(1, 5)
    while pos < off + n and len(ext) < limit:
        b = pos // BLOCK
        end_b = b
        while end_b < len(flags) and flags[end_b] == flags[b]:
            end_b += 1
        run_end = end_b * BLOCK
        cut = pos + rnd.randint(1, (run_end - pos) // BLOCK) * BLOCK   # maybe split the run
        ext.append((cut - pos, flags[b]))
        pos = cut
    return ext


@pytest.fixture(scope="module")
def bs_server(tmp_path_factory):
    scripts: queue.Queue = queue.Queue()

    def handler(conn, srv):
        rnd, alloc, dirty = scripts.get(timeout=10)
        ids = {name: cid for cid, name in srv.negotiate(conn).items()}
        while True:
            _, cmd, cookie, off, n = srv.read_request(conn)
            if cmd == proto.CMD_DISC:
                return
            assert cmd == proto.CMD_BLOCK_STATUS
            names = list(ids)
            rnd.shuffle(names)
            for j, name in enumerate(names):
                ext = short_reply(rnd, alloc if name == ALLOC else dirty, off, n)
                payload = struct.pack(">I", ids[name]) + b"".join(struct.pack(">II", *e) for e in ext)
                srv.chunk(conn, cookie, proto.REPLY_TYPE_BLOCK_STATUS, payload, done=j == len(names) - 1)

    with FakeServer(tmp_path_factory.mktemp("bs") / "s", handler, size=BS_SIZE,
                    contexts=(ALLOC, BITMAP)) as srv:
        yield srv, scripts


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), window_blocks=st.integers(1, 300), use_bitmap=st.booleans())
def test_extent_walk_with_short_replies(bs_server, seed, window_blocks, use_bitmap):
    from nbdbackup.nbd.extents import walk_extents

    srv, scripts = bs_server
    rnd = random.Random(seed)
    alloc, dirty = runs_of(rnd, [0, 3, 2]), runs_of(rnd, [0, 1])
    scripts.put((random.Random(seed + 1), alloc, dirty))
    with Client.connect(srv.uri, meta_contexts=[ALLOC, BITMAP], timeout=3) as c:
        got = [(e.offset, e.length, e.dirty, e.zero)
               for e in walk_extents(c, BITMAP if use_bitmap else None, window=window_blocks * BLOCK)]
    want: list[list] = []
    for b in range(BS_SIZE // BLOCK):
        d, z = (bool(dirty[b]) if use_bitmap else True), bool(alloc[b] & 2)
        if want and want[-1][2:] == [d, z]:
            want[-1][1] += BLOCK
        else:
            want.append([b * BLOCK, BLOCK, d, z])
    assert got == [tuple(w) for w in want]
