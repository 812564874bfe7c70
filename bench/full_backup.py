"""Full backup throughput against nbdcopy, same export, same run.

A 2 GiB qcow2 holding 384 MiB of random and 384 MiB of text-like data is
served by qemu-nbd (-r -e 4) on a unix socket. Alternately, `nbdbackup full
--source URI` (a fresh repository each time, the CLI process as a user runs
it) and `nbdcopy URI sparse.raw` copy it; medians are compared.
Targets: wall time <= 2.0x nbdcopy's (adaptive compression), <= 2.3x with --compress-all
(issue 16: every chunk compressed); peak RSS of the nbdbackup process < 256 MiB.

It also prints what bounds the result from below on this machine: the CPU seconds of our
run plus qemu-nbd's for it, spread over every core (a run that never waits), and zstd's
own CPU time for the text half at the repository's level, plus qemu-nbd's, over the cores:
no backup that compresses every chunk (in any language) is faster than that.

    python bench/full_backup.py [--rounds 3] [--workdir DIR] [--chunk-size 1M] [--compression-level -3] [--compress-all]

Run it with the python of the venv nbdbackup is installed in: it times the
console script beside that python.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MiB, bench_workdir, nbdbackup_exe, text_like, wait_for_socket  # noqa: E402


def make_image(work: Path) -> Path:
    img = work / "bench-2g.qcow2"
    if img.exists():
        return img
    rnd, txt = work / "random.bin", work / "text.bin"
    with open(rnd, "wb") as f:
        for _ in range(384 // 16):
            f.write(os.urandom(16 * MiB))
    text_like(txt, 384 * MiB)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "2G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {rnd} 0 384M",
                    "-c", f"write -q -s {txt} 1G 384M", str(img)], check=True)
    rnd.unlink()
    txt.unlink()
    return img


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process *pid* has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def zstd_floor(work: Path, level: int, chunk_size: int) -> float:
    """CPU seconds zstd alone takes for the image's text half, in chunks, at *level*: what no
    backup that compresses every chunk can go below (the random half costs it ~nothing)."""
    import zstandard

    txt = work / "text.bin"
    text_like(txt, 384 * MiB)
    data = txt.read_bytes()
    txt.unlink()
    c = zstandard.ZstdCompressor(level=level)
    t = time.process_time()
    for i in range(0, len(data), chunk_size):
        c.compress(data[i:i + chunk_size])
    return time.process_time() - t


def timed(cmd: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS in bytes, CPU seconds user+sys) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.read().decode()}")
    return wall, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", help="keep the image here between runs (default: a temp dir)")
    ap.add_argument("--chunk-size", default=None, help="repository chunk size (default: the repo default)")
    ap.add_argument("--compression-level", default=None,
                    help="zstd level of the repository (default: the repo default)")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--compress-all", action="store_true", help="pass --compress-all (no adaptive compression)")
    a = ap.parse_args()
    nbdbackup = nbdbackup_exe()
    with bench_workdir(a.workdir) as work:
        img = make_image(work)
        sock = work / "nbd.sock"
        srv = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "4", "-k", str(sock), "-f", "qcow2", str(img)])
        try:
            wait_for_socket(srv, sock)
            uri = f"nbd+unix:///?socket={sock}"
            ours, theirs, rss, cpu_ours, cpu_theirs, loads, cpu_server = [], [], [], [], [], [], []
            for r in range(a.rounds):
                repo = work / "repo"
                shutil.rmtree(repo, ignore_errors=True)
                init = [nbdbackup, "--repo", str(repo), "init"] \
                    + (["--chunk-size", a.chunk_size] if a.chunk_size else []) \
                    + ([f"--compression-level={a.compression_level}"] if a.compression_level else [])
                subprocess.run(init, check=True, stdout=subprocess.DEVNULL)
                out = work / "copy.raw"
                out.unlink(missing_ok=True)
                loads.append(os.getloadavg()[0])
                t, _, c = timed(["nbdcopy", "--connections", str(a.connections), uri, str(out)])
                theirs.append(t)
                cpu_theirs.append(c)
                server_before = proc_cpu(srv.pid)
                t, m, c = timed([nbdbackup, "--repo", str(repo), "--quiet", "full", "--source", uri,
                                 "--disk", "bench", "--connections", str(a.connections)]
                                + (["--compress-all"] if a.compress_all else []))
                cpu_server.append(proc_cpu(srv.pid) - server_before)
                ours.append(t)
                rss.append(m)
                cpu_ours.append(c)
                print(f"round {r + 1}: nbdcopy {theirs[-1]:.2f}s ({cpu_theirs[-1]:.2f} CPU-s)  "
                      f"nbdbackup full {ours[-1]:.2f}s ({c:.2f} CPU-s)  peak RSS {m / MiB:.0f} MiB  "
                      f"load {loads[-1]:.1f}", flush=True)
            stored = subprocess.run([nbdbackup, "--repo", str(repo), "--json", "list"], capture_output=True,
                                    text=True, check=True).stdout
            config = json.loads((repo / "config.json").read_text())
        finally:
            srv.terminate()
            srv.wait()
        info = json.loads(stored)[-1]
        zstd_cpu = zstd_floor(work, config["compression_level"], config["chunk_size"])
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print()
        print(f"{'measure':<34}{'value':>12}{'target':>12}")
        print(f"{'nbdcopy median (s)':<34}{mt:>12.2f}")
        print(f"{'nbdbackup full median (s)':<34}{mo:>12.2f}")
        limit = 2.3 if a.compress_all else 2.0
        print(f"{'ratio nbdbackup / nbdcopy':<34}{mo / mt:>12.2f}{f'<= {limit:.2f}':>12}")
        print(f"{'peak RSS nbdbackup (MiB)':<34}{max(rss) / MiB:>12.0f}{'< 256':>12}")
        print(f"{'CPU-s nbdcopy / nbdbackup':<34}{statistics.median(cpu_theirs):>6.2f}/"
              f"{statistics.median(cpu_ours):<5.2f}")
        cores, server = os.cpu_count() or 1, statistics.median(cpu_server)
        print(f"{'CPU-s qemu-nbd, serving our run':<34}{server:>12.2f}")
        print(f"{'all CPU-s of our run / cores (s)':<34}{(statistics.median(cpu_ours) + server) / cores:>12.2f}"
              f"{'(no wait)':>12}")
        print(f"{'CPU-s zstd alone, text half':<34}{zstd_cpu:>12.2f}")
        floor = (zstd_cpu + server) / cores
        print(f"{'(zstd + qemu-nbd) / cores (s)':<34}{floor:>12.2f}{f'{floor / mt:.2f}x':>12}")
        print(f"{'1-min load average (median)':<34}{statistics.median(loads):>12.1f}{'(2 cores)':>12}")
        print(f"{'data read (MiB)':<34}{info['read_bytes'] / MiB:>12.0f}")
        print(f"{'stored (MiB)':<34}{info['stored_bytes'] / MiB:>12.1f}")
        print(f"{'throughput (MiB/s)':<34}{info['read_bytes'] / MiB / mo:>12.0f}")
        ok = mo / mt <= limit and max(rss) < 256 * MiB
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
