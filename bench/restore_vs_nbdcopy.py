#!/usr/bin/env python3
"""Restore against nbdcopy --flush, same data, same run, into a raw file and into an NBD export.

    python bench/restore_vs_nbdcopy.py [--rounds 5] [--size-mib 512] [--connections 4] [--workdir DIR]

A raw disk of mixed data (half random, a third text-like, the rest zero, in 1 MiB runs) is
backed up with the installed CLI (`nbdbackup full --image disk.raw --format raw --compress-all`:
what a default backup on an idle machine stores, 256 KiB chunks) into a local repository.
Then, alternately (who goes first alternates too), in each round:
  file: `nbdbackup restore bench out.raw` (fsyncs) against `nbdcopy --flush SRC out.raw`,
        SRC being `qemu-nbd -r -t -f raw` serving disk.raw;
  nbd:  the same into a fresh sparse raw file served by `qemu-nbd -t -f raw` (a new one per run).
A first round is not counted: it warms the page cache of the disk, the packs and the binaries
for both sides alike. Medians are compared (speed ratio = nbdcopy's time / ours), and CPU
seconds (user+sys) of each side: our process; nbdcopy plus the qemu-nbd it reads from; and the
target's qemu-nbd for the nbd runs. Targets: >= 0.8x for both.
The package's bytecode is compiled first, as a pip install does (an editable install under
PYTHONDONTWRITEBYTECODE=1 recompiles every module each run: ~0.15 s per command here).
Run it with the python of the venv nbdbackup is installed in.
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MiB, bench_workdir, nbdbackup_exe, text_like  # noqa: E402


def make_disk(work: Path, size: int) -> Path:
    disk = work / f"disk-{size // MiB}m.raw"
    if disk.exists():
        return disk
    txt = work / "text.bin"
    text_like(txt, max(8 * MiB, -(-size // 3 // (8 * MiB)) * 8 * MiB))
    rnd = random.Random(1)
    with open(disk, "wb") as f, open(txt, "rb") as t:
        f.truncate(size)
        for off in range(0, size, MiB):
            r = rnd.random()
            if r < 0.5:
                f.seek(off)
                f.write(rnd.randbytes(MiB))
            elif r < 0.83:
                block = t.read(MiB) or (t.seek(0) or t.read(MiB))
                f.seek(off)
                f.write(block)
    txt.unlink()
    return disk


def ticks(pid: int) -> float:
    """CPU seconds (user+sys, all threads) of *pid* so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class QemuNbd:
    def __init__(self, sock: Path, image: Path, *, read_only: bool):
        sock.unlink(missing_ok=True)
        ro = ["-r"] if read_only else []
        self.proc = subprocess.Popen(["qemu-nbd", *ro, "-t", "-f", "raw", "-e", "8", "-k", str(sock), str(image)])
        self.uri = f"nbd+unix:///?socket={sock}"
        while not sock.exists():
            if self.proc.poll() is not None:
                raise SystemExit("qemu-nbd failed to start")
            time.sleep(0.01)

    def cpu(self) -> float:
        return ticks(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s user+sys) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr.read().decode()}")
    return wall, ru.ru_utime + ru.ru_stime


def one(work: Path, src: QemuNbd, side: str, target: str, exe: str, repo: Path, size: int,
        connections: int) -> tuple[float, float, float]:
    """(wall, CPU of the copier + its source, CPU of the target's qemu-nbd) of one run."""
    out = work / "out.raw"
    out.unlink(missing_ok=True)
    dst = None
    if target == "nbd":
        with open(out, "wb") as f:
            f.truncate(size)
        dst = QemuNbd(work / "dst.sock", out, read_only=False)
        where = dst.uri
    else:
        where = str(out)
    try:
        before = src.cpu()
        if side == "ours":
            cmd = [exe, "--repo", str(repo), "-q", "restore", "--connections", str(connections), "bench", where]
            wall, cpu = run(cmd)
        else:
            if target == "file":
                with open(out, "wb"):
                    pass        # nbdcopy needs the file to exist
            wall, cpu = run(["nbdcopy", "--flush", "-C", str(connections), src.uri, where])
            cpu += src.cpu() - before
        return wall, cpu, dst.cpu() if dst else 0.0
    finally:
        if dst:
            dst.stop()
        out.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--targets", default="file,nbd")
    ap.add_argument("--workdir", help="keep the disk and repository here between runs")
    a = ap.parse_args(argv)
    exe, size = nbdbackup_exe(), a.size_mib * MiB
    compileall.compile_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "nbdbackup"), quiet=1)
    targets = a.targets.split(",")
    with bench_workdir(a.workdir) as work:
        disk = make_disk(work, size)
        repo = work / "repo"
        if not (repo / "config.json").exists():
            subprocess.run([exe, "--repo", str(repo), "init", "-q"], check=True)
            subprocess.run([exe, "--repo", str(repo), "-q", "full", "--image", str(disk), "--format", "raw",
                            "--disk", "bench", "--compress-all"], check=True)
        src = QemuNbd(work / "src.sock", disk, read_only=True)
        res: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        try:
            for r in range(a.rounds + 1):
                for target in targets:
                    order = ("ours", "nbdcopy") if r % 2 else ("nbdcopy", "ours")
                    for side in order:
                        m = one(work, src, side, target, exe, repo, size, a.connections)
                        if r:
                            res.setdefault((target, side), []).append(m)
                if r:
                    print(f"round {r}: " + "  ".join(f"{t}/{s} {v[-1][0]:.2f}s" for (t, s), v in res.items())
                          + f"  load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            src.stop()
    ok = True
    print(f"\n{size // MiB} MiB disk, {a.rounds} rounds, medians (CPU s: copier+source / target qemu-nbd)")
    for target in targets:
        med = {s: [statistics.median(x[i] for x in res[(target, s)]) for i in range(3)] for s in ("ours", "nbdcopy")}
        ratio = med["nbdcopy"][0] / med["ours"][0]
        ok &= ratio >= 0.8
        print(f"  {target:<5} ours {med['ours'][0]:.2f} s (CPU {med['ours'][1]:.2f} / {med['ours'][2]:.2f})  "
              f"nbdcopy {med['nbdcopy'][0]:.2f} s (CPU {med['nbdcopy'][1]:.2f} / {med['nbdcopy'][2]:.2f})  "
              f"speed {ratio:.2f}x  (target >= 0.8x)")
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
