"""Benchmark `nbdbackup serve` against qemu-nbd serving the same disk as a raw file.

    python bench/serve.py [--size 1G] [--chunk-size 1M] [--seconds 5] [--keep DIR] [--only small,w4k]

Measured in one run, as ratios to qemu-nbd (issue 16's targets):
  streaming     nbdcopy EXPORT null:, cache smaller than the data   target >= 0.6x qemu-nbd
                the same with every chunk cached                     target >= 1.0x
  small reads   qemu-img bench, 4 KiB, depth 16                     target >= 1.0x
  aio-parallel  libnbd's load (bench/libnbd_load.py, system python3) target >= 0.8x
  synch-parallel                                                     target >= 0.8x
  writes        qemu-img bench -w, 4 KiB and 64 KiB, depth 16, to
                `serve --writable` / qemu-nbd over a qcow2 overlay   target >= 0.8x
  cold start    connect + first 4 KiB read of a freshly started server
The parallel loads and writes run on a writable export: ours an overlay over
the backup, qemu-nbd's a fresh qcow2 overlay over the raw disk, each round.
Reads of the parallel loads are checked against a shadow copy (a mismatch
fails the bench).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import nbdbackup_exe  # noqa: E402

from nbdbackup.nbd.client import Client  # noqa: E402
from nbdbackup.repo import Repository  # noqa: E402


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def make_disk(path: str, size: int, chunk: int) -> None:
    """Mixed data: half random, a third text, the rest zero (in 1 MiB runs)."""
    rnd = random.Random(1)
    text = b"".join(f"line {i}: the quick brown fox jumps over the lazy dog\n".encode() for i in range(20000))
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 1 << 20):
            n = min(1 << 20, size - off)
            r = rnd.random()
            if r < 0.5:
                f.seek(off)
                f.write(os.urandom(n))
            elif r < 0.83:
                f.seek(off)
                f.write((text * (n // len(text) + 1))[:n])


def backup(repo_path: str, disk_path: str, size: int, chunk: int) -> str:
    repo = Repository.init(repo_path, chunk_size=chunk)
    try:
        w = repo.writer("bench", kind="full", size=size)
        with open(disk_path, "rb") as f, ThreadPoolExecutor(2) as pool:
            def prep(i):
                data = os.pread(f.fileno(), chunk, i * chunk)
                return i, w.prepare(data)
            n = (size + chunk - 1) // chunk
            for i, p in pool.map(prep, range(n)):
                w.put(i, p)
        return w.commit(read_bytes=size, duration_s=0.0).id
    finally:
        repo.close()


def wait_socket(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until a connection succeeds (the path can exist before listen())."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start ({proc.returncode})")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.005)


def start_ours(repo: str, sock: str, cache: str, overlay_dir: str | None = None) -> subprocess.Popen:
    writable = ["--writable", "--overlay-dir", overlay_dir] if overlay_dir else []
    p = subprocess.Popen([nbdbackup_exe(), "serve", "--quiet", "--repo", repo, "--listen", f"unix:{sock}",
                          "--cache-size", cache, *writable],
                         stderr=subprocess.DEVNULL)
    wait_socket(sock, p)
    return p


def start_qemu(disk: str, sock: str, overlay: str | None = None) -> subprocess.Popen:
    """qemu-nbd serving *disk* read-only, or a fresh qcow2 *overlay* over it writable."""
    if overlay:
        if os.path.exists(overlay):
            os.unlink(overlay)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", os.path.abspath(disk),
                        overlay], check=True)
        args = ["-f", "qcow2", overlay]
    else:
        args = ["-r", "-f", "raw", disk]
    p = subprocess.Popen(["qemu-nbd", "-t", "-e", "16", "-x", "bench", "-k", sock, *args],
                         stderr=subprocess.DEVNULL)
    wait_socket(sock, p)
    return p


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream(uri: str, size: int, server: subprocess.Popen | None = None, cpu: list | None = None) -> float:
    c0 = cpu_seconds(server.pid) if server else 0.0
    t = time.perf_counter()
    p = subprocess.run(["nbdcopy", uri, "null:"], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"nbdcopy {uri} failed: {p.stderr}")
    dt = time.perf_counter() - t
    if server is not None and cpu is not None:
        cpu.append((cpu_seconds(server.pid) - c0) / (size / (1 << 30)))
    return size / dt / (1 << 20)


def small_reads(uri: str, count: int) -> float:
    p = subprocess.run(["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "16", "-s", "4096",
                        "-S", "4096", uri], check=True, capture_output=True, text=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    return count / float(m.group(1))


def writes(uri: str, count: int, size: int) -> float:
    """MiB/s of qemu-img bench -w: *count* sequential writes of *size* bytes, depth 16."""
    p = subprocess.run(["qemu-img", "bench", "-w", "-f", "raw", "-c", str(count), "-d", "16", "-s", str(size),
                        "-S", str(size), uri], check=True, capture_output=True, text=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    return count * size / float(m.group(1)) / (1 << 20)


LOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libnbd_load.py")


def libnbd_load(kind: str, uri: str, disk: str, seconds: float) -> float:
    """IOPS of libnbd's aio-parallel or synch-parallel load; its reads are checked."""
    p = subprocess.run(["/usr/bin/python3", LOAD, kind, uri, disk, "--seconds", str(seconds)],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{kind}-parallel on {uri} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)["iops"]


MEASURES = ("stream", "warm", "small", "aio", "synch", "w4k", "w64k", "start")


def writable_round(start, uri: str, disk: str, a, res: dict, who: str) -> None:
    """One fresh writable server per measure: each load starts from the backup's data."""
    for name, fn in (("aio", lambda: libnbd_load("aio", uri, disk, a.seconds)),
                     ("synch", lambda: libnbd_load("synch", uri, disk, a.seconds)),
                     ("w4k", lambda: writes(uri, a.count, 4096)),
                     ("w64k", lambda: writes(uri, a.count // 4, 65536))):
        if name not in a.only:
            continue
        p = start()
        try:
            key = (who, name)
            res[key] = max(res.get(key, 0.0), fn())
        finally:
            stop(p)


def ttfb(start, sock: str, export: str) -> tuple[float, float]:
    """(process start -> socket ready, connect + first 4 KiB read) in ms."""
    t0 = time.perf_counter()
    p = start()
    t1 = time.perf_counter()
    try:
        c = Client.connect(f"nbd+unix:///{export}?socket={sock}")
        try:
            c.read(0, 4096)
        finally:
            c.close()
        t2 = time.perf_counter()
    finally:
        stop(p)
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--chunk-size", default="1M")
    ap.add_argument("--count", type=int, default=40000, help="qemu-img bench requests")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measure; the best counts")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each libnbd load")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    ap.add_argument("--only", default=",".join(MEASURES),
                    help=f"comma-separated measures to run (default: all of {','.join(MEASURES)}); "
                         "small reads always follow a cold stream")
    a = ap.parse_args()
    a.only = set(a.only.split(","))
    if a.only - set(MEASURES):
        ap.error(f"unknown measures: {', '.join(sorted(a.only - set(MEASURES)))}")
    size, chunk = parse_size(a.size), parse_size(a.chunk_size)
    work = a.keep or tempfile.mkdtemp(prefix="nbdbackup-bench-")
    os.makedirs(work, exist_ok=True)
    disk, repo = os.path.join(work, "disk.raw"), os.path.join(work, "repo")
    s_ours, s_qemu = os.path.join(work, "ours.sock"), os.path.join(work, "qemu.sock")
    rows = []
    try:
        if not os.path.exists(disk):
            t = time.perf_counter()
            make_disk(disk, size, chunk)
            print(f"made {a.size} disk in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        if not os.path.exists(repo):
            t = time.perf_counter()
            backup(repo, disk, size, chunk)
            print(f"backed it up in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        u_ours = f"nbd+unix:///bench?socket={s_ours}"
        u_qemu = f"nbd+unix:///bench?socket={s_qemu}"

        # The machine may be shared: alternate the servers and keep each one's best run.
        q_stream = q_small = o_stream_cold = o_small = o_stream_warm = 0.0
        q_cpu, o_cpu, w_cpu = [], [], []
        reads = bool(a.only & {"stream", "warm", "small"})
        for _ in range(a.repeat if reads else 0):
            q = start_qemu(disk, s_qemu)
            try:
                q_stream = max(q_stream, stream(u_qemu, size, q, q_cpu))
                if "small" in a.only:
                    q_small = max(q_small, small_reads(u_qemu, a.count))
            finally:
                stop(q)
            o = start_ours(repo, s_ours, "256M")
            try:
                # cache smaller than the disk: every chunk is read, decompressed and checked
                o_stream_cold = max(o_stream_cold, stream(u_ours, size, o, o_cpu))
                if "small" in a.only:
                    o_small = max(o_small, small_reads(u_ours, a.count))
            finally:
                stop(o)
            if "warm" not in a.only:
                continue
            o = start_ours(repo, s_ours, str(2 * size))
            try:
                stream(u_ours, size)                         # fill the cache
                o_stream_warm = max(o_stream_warm, stream(u_ours, size, o, w_cpu))
            finally:
                stop(o)
        ovdir = os.path.join(work, "overlays")
        os.makedirs(ovdir, exist_ok=True)
        q_ov = os.path.join(work, "qemu-overlay.qcow2")
        wres: dict = {}
        for _ in range(a.repeat):
            writable_round(lambda: start_qemu(disk, s_qemu, q_ov), u_qemu, disk, a, wres, "q")
            writable_round(lambda: start_ours(repo, s_ours, "256M", ovdir), u_ours, disk, a, wres, "o")
        if reads:
            rows.append(("stream nbdcopy -> null: (MiB/s)", q_stream, o_stream_cold, 0.6))
        if "warm" in a.only:
            rows.append(("  same, chunks cached (MiB/s)", q_stream, o_stream_warm, 1.0))
        if reads:
            rows.append(("server CPU s per GiB streamed", min(q_cpu), min(o_cpu), None))
        if "warm" in a.only:
            rows.append(("  same, chunks cached", min(q_cpu), min(w_cpu), None))
        if "small" in a.only:
            rows.append(("4 KiB reads, depth 16 (IOPS)", q_small, o_small, 1.0))
        for name, label, unit in (("aio", "aio-parallel, writable", "IOPS"),
                                  ("synch", "synch-parallel, writable", "IOPS"),
                                  ("w4k", "4 KiB writes, depth 16", "MiB/s"),
                                  ("w64k", "64 KiB writes, depth 16", "MiB/s")):
            if name in a.only:
                rows.append((f"{label} ({unit})", wres["q", name], wres["o", name], 0.8))
        if "start" in a.only:
            t_q = [ttfb(lambda: start_qemu(disk, s_qemu), s_qemu, "bench") for _ in range(a.repeat)]
            t_o = [ttfb(lambda: start_ours(repo, s_ours, "256M"), s_ours, "bench") for _ in range(a.repeat)]
            q_start, q_first = min(t[0] for t in t_q), min(t[1] for t in t_q)
            o_start, o_first = min(t[0] for t in t_o), min(t[1] for t in t_o)
            rows.append(("start -> listening (ms)", q_start, o_start, None))
            rows.append(("connect + first 4 KiB read (ms)", q_first, o_first, None))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_rows(a, rows)


def print_rows(a, rows: list) -> None:
    print(f"\nnbdbackup serve vs qemu-nbd, {a.size} disk, chunk size {a.chunk_size}, {os.cpu_count()} CPUs, "
          f"best of {a.repeat}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (a shared machine makes wall-clock ratios noisy)")
    print(f"{'measure':<36}{'qemu-nbd':>12}{'nbdbackup':>12}{'ratio':>8}  target")
    for name, qv, ov, target in rows:
        ratio = ov / qv if qv else float("nan")
        tgt = "" if target is None else (f">= {target}x " + ("ok" if ratio >= target else "MISSED"))
        print(f"{name:<36}{qv:>12.2f}{ov:>12.2f}{ratio:>7.2f}x  {tgt}")


if __name__ == "__main__":
    main()
