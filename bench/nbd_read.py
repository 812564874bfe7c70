"""Read throughput of the NBD client pool against nbdcopy, on the same qemu-nbd export.

    python bench/nbd_read.py [--size-mib 2048] [--runs 3] [--connections 4]

Makes a raw image of random (incompressible, non-zero) data, serves it with
qemu-nbd over a unix socket, then alternates: `nbdcopy URI null:` and our
ConnectionPool reading every byte (512 KiB requests, 4 in flight per
connection, reused buffers) and hashing it with blake3 on 2 threads
(nothing kept).
Prints the median of each and the ratio (target: ours >= 0.6x nbdcopy), and
the CPU both sides used. Why 512 KiB: with 1 MiB requests qemu-nbd 7.2 spent
about twice the CPU per byte (an mmap/munmap'ed bounce buffer per request,
seen with strace -c), which on 2 busy cores cost more than it saved.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import blake3  # noqa: E402
from _common import wait_for_socket  # noqa: E402

from nbdbackup.nbd.pool import ConnectionPool  # noqa: E402

MiB = 1 << 20


def make_image(path: Path, size: int) -> None:
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        for off in range(0, size, len(block)):
            # vary each block a little so no two are equal
            f.write(off.to_bytes(8, "little") + block[8:min(len(block), size - off)])
        f.flush()
        os.fsync(f.fileno())   # no writeback of 2 GiB of dirty pages during the timed runs


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process *pid*."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_nbdcopy(uri: str, connections: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", f"--connections={connections}", uri, "null:"], check=True)
    return time.perf_counter() - t0


def hash_chunk(buf) -> tuple[bytes, bytearray]:
    return blake3.blake3(buf).digest(), buf     # blake3 releases the GIL while hashing


def run_ours(uri: str, connections: int, request: int, in_flight: int, hashers: int) -> tuple[float, str]:
    """Read everything through the pool into a ring of reused buffers; hash each on worker threads.

    That is the backup engine's shape: reads land on the receiver threads,
    hashing runs on a thread pool, nothing is kept.
    """
    t0 = time.perf_counter()
    summary = blake3.blake3()
    with ConnectionPool(uri, connections=connections) as pool, ThreadPoolExecutor(hashers) as ex:
        size = pool.size
        offsets = iter(range(0, size, request))
        free = deque(bytearray(request) for _ in range(in_flight * pool.connections + 2 * hashers))
        reads: deque = deque()
        hashes: deque = deque()

        def refill() -> None:
            while free:
                off = next(offsets, None)
                if off is None:
                    return
                n = min(request, size - off)
                reads.append(pool.submit_read_into(off, free.popleft() if n == request else bytearray(n)))

        def collect(keep: int) -> None:
            while len(hashes) > keep:
                digest, buf = hashes.popleft().result()
                summary.update(digest)          # in read order: the summary is deterministic
                if len(buf) == request:
                    free.append(buf)

        refill()
        while reads:
            hashes.append(ex.submit(hash_chunk, reads.popleft().result()))
            collect(2 * hashers)
            refill()
        collect(0)
    return time.perf_counter() - t0, summary.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--request-kib", type=int, default=512)
    ap.add_argument("--in-flight", type=int, default=4, help="requests in flight per connection")
    ap.add_argument("--hashers", type=int, default=2, help="hashing threads")
    a = ap.parse_args()
    for tool in ("qemu-nbd", "nbdcopy"):
        if not shutil.which(tool):
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    size = a.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="nbd-read-bench-") as d:
        img, sock = Path(d) / "disk.raw", Path(d) / "s.sock"
        make_image(img, size)
        proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", str(a.connections + 1), "-k", str(sock),
                                 "-f", "raw", str(img)], stderr=subprocess.DEVNULL)
        try:
            wait_for_socket(proc, sock)
            uri = f"nbd+unix:///?socket={sock}"
            run_nbdcopy(uri, a.connections)       # warm the page cache for both sides
            theirs, ours, digests = [], [], set()
            cpu = {"nbdcopy": [], "ours": [], "qemu-nbd/nbdcopy": [], "qemu-nbd/ours": []}
            for _ in range(a.runs):
                q0, c0 = proc_cpu(proc.pid), child_cpu()
                theirs.append(run_nbdcopy(uri, a.connections))
                q1, c1, s1 = proc_cpu(proc.pid), child_cpu(), self_cpu()
                t, h = run_ours(uri, a.connections, a.request_kib * 1024, a.in_flight, a.hashers)
                q2, s2 = proc_cpu(proc.pid), self_cpu()
                ours.append(t)
                digests.add(h)
                cpu["nbdcopy"].append(c1 - c0)
                cpu["ours"].append(s2 - s1)
                cpu["qemu-nbd/nbdcopy"].append(q1 - q0)
                cpu["qemu-nbd/ours"].append(q2 - q1)
        finally:
            proc.terminate()
            proc.wait()
    if len(digests) != 1:
        print(f"hashes differ between runs: {digests}", file=sys.stderr)
        return 1
    mt, mo = statistics.median(theirs), statistics.median(ours)
    rate = lambda t: size / t / MiB  # noqa: E731
    print(f"export {a.size_mib} MiB random data, qemu-nbd unix socket, {a.connections} connections, "
          f"{a.runs} alternating runs, medians")
    print(f"{'reader':<52} {'seconds':>8} {'MiB/s':>8}")
    print(f"{'nbdcopy URI null:':<52} {mt:>8.2f} {rate(mt):>8.0f}")
    label = f'pool + blake3 ({a.request_kib} KiB x {a.in_flight}/conn, {a.hashers} hashers)'
    print(f"{label:<52} {mo:>8.2f} {rate(mo):>8.0f}")
    print(f"ratio ours/nbdcopy throughput: {mt / mo:.2f}x (target >= 0.60x)")
    med = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"CPU seconds per run (medians): nbdcopy {med['nbdcopy']:.2f} + qemu-nbd {med['qemu-nbd/nbdcopy']:.2f}; "
          f"ours (incl. hashing) {med['ours']:.2f} + qemu-nbd {med['qemu-nbd/ours']:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(wall-clock ratios need a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
