"""libnbd's aio-parallel and synch-parallel loads (libnbd tests/*-parallel.c), in Python.

Run by the SYSTEM python (its `nbd` module is libnbd's binding; the venv has none):

    /usr/bin/python3 bench/libnbd_load.py aio|synch URI SHADOW_FILE [--seconds 5]

The first EXPORT bytes (8 MiB) of the export must equal SHADOW_FILE's. Each
connection (8, multi-conn) does 16 KiB random reads and writes, 50/50, each
command in an area of its own; every read is compared with a shadow copy that
follows our writes. Prints one JSON line: {"ops": N, "seconds": S, "iops": R}.
A mismatch or an error exits 1.
"""

import argparse
import json
import os
import random
import sys
import threading
import time

import nbd

EXPORT = 8 << 20
CONNS = 8
IN_FLIGHT = 16      # per connection, aio only
IO = 16 << 10


class Mismatch(Exception):
    pass


def check(shadow: bytearray, off: int, got) -> None:
    if bytes(got) != bytes(shadow[off:off + IO]):
        raise Mismatch(f"read at {off} differs from the shadow copy")


def aio_conn(uri: str, shadow: bytearray, base: int, area: int, end: float, rnd: random.Random) -> int:
    """16 commands in flight on one connection; slot k owns [base + k*area, +area)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    ops = 0
    pending = {}      # cookie -> (slot, is_read, offset, buffer, data)

    def issue(slot: int) -> None:
        off = base + slot * area + rnd.randrange(0, (area - IO) // 512 + 1) * 512
        if rnd.random() < 0.5:
            buf = nbd.Buffer(IO)
            pending[h.aio_pread(buf, off)] = (slot, True, off, buf, None)
        else:
            data = bytearray(os.urandom(IO))
            buf = nbd.Buffer.from_bytearray(data)
            pending[h.aio_pwrite(buf, off)] = (slot, False, off, buf, data)

    for k in range(IN_FLIGHT):
        issue(k)
    while pending:
        h.poll(-1)
        while pending:
            cookie = h.aio_peek_command_completed()
            if not cookie:
                break
            h.aio_command_completed(cookie)        # raises on a server error
            slot, is_read, off, buf, data = pending.pop(cookie)
            if is_read:
                check(shadow, off, buf.to_bytearray())
            else:
                shadow[off:off + IO] = data
            ops += 1
            if time.monotonic() < end:
                issue(slot)
    h.shutdown()
    return ops


def synch_conn(uri: str, shadow: bytearray, base: int, area: int, end: float, rnd: random.Random) -> int:
    h = nbd.NBD()
    h.connect_uri(uri)
    ops = 0
    while time.monotonic() < end:
        off = base + rnd.randrange(0, (area - IO) // 512 + 1) * 512
        if rnd.random() < 0.5:
            check(shadow, off, h.pread(IO, off))
        else:
            data = os.urandom(IO)
            h.pwrite(data, off)
            shadow[off:off + IO] = data
        ops += 1
    h.shutdown()
    return ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("load", choices=("aio", "synch"))
    ap.add_argument("uri")
    ap.add_argument("shadow_file")
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    with open(a.shadow_file, "rb") as f:
        shadow = bytearray(f.read(EXPORT))
    if len(shadow) != EXPORT:
        sys.exit(f"{a.shadow_file} is smaller than {EXPORT} bytes")
    part = EXPORT // CONNS
    # aio: each of the 16 slots of a connection owns 1/16 of its part; synch: the whole part.
    area = part // IN_FLIGHT if a.load == "aio" else part
    fn = aio_conn if a.load == "aio" else synch_conn
    results: list = [None] * CONNS
    t0 = time.monotonic()
    end = t0 + a.seconds

    def run(k: int) -> None:
        try:
            results[k] = fn(a.uri, shadow, k * part, area, end, random.Random(k))
        except BaseException as e:    # reported below: a mismatch fails the bench
            results[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(CONNS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        sys.exit(f"{a.load}-parallel failed: {errors[0]!r}")
    ops = sum(results)
    print(json.dumps({"ops": ops, "seconds": round(dt, 3), "iops": round(ops / dt, 1)}))


if __name__ == "__main__":
    main()
