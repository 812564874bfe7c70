"""Incremental backup cost against the full backup, managed-image mode.

A 64 GiB qcow2 holds 1 GiB of data (16 scattered 64 MiB regions, half random,
half text-like). Measured as a user runs it (CLI wall time, `--image`):
  full      `nbdbackup full --image IMG`
  idle      `nbdbackup incremental --image IMG` with nothing dirty
  dirty     the same after 64 scattered 64 KiB writes
Rounds alternate idle and dirty; medians. Targets:
  work = dirty - idle <= 10 % of full;   idle <= 50 % of full.

    python bench/incremental.py [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MiB, bench_workdir, nbdbackup_exe, text_like  # noqa: E402

GiB = 1 << 30


def make_image(work: Path) -> Path:
    img = work / "bench-64g.qcow2"
    if img.exists():
        return img
    rnd, txt = work / "random.bin", work / "text.bin"
    with open(rnd, "wb") as f:
        f.write(os.urandom(64 * MiB))
    text_like(txt, 64 * MiB, seed=3)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64G"], check=True)
    cmds = []
    for i in range(16):     # 16 x 64 MiB = 1 GiB, spread over the disk
        src = rnd if i % 2 else txt
        cmds += ["-c", f"write -q -s {src} {i * 4}G 64M"]
        # the same bytes again would dedup: vary each region's first block
        cmds += ["-c", f"write -q -P {i + 1} {i * 4}G 4k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(img)], check=True)
    rnd.unlink()
    txt.unlink()
    return img


def run(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr}")
    return wall, json.loads(p.stdout)


def scatter_writes(img: Path, rng: random.Random) -> None:
    cmds = []
    for _ in range(64):
        off = rng.randrange(0, 64 * GiB // (64 * 1024)) * 64 * 1024
        cmds += ["-c", f"write -q -P {rng.randrange(1, 255)} {off} 64k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(img)], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir")
    a = ap.parse_args()
    nbdbackup = nbdbackup_exe()
    rng = random.Random(64)
    with bench_workdir(a.workdir) as work:
        img = make_image(work)
        repo = work / "repo-inc"
        shutil.rmtree(repo, ignore_errors=True)
        subprocess.run([nbdbackup, "--repo", str(repo), "init"], check=True, stdout=subprocess.DEVNULL)
        base = [nbdbackup, "--repo", str(repo), "--json"]
        t_full, full = run([*base, "full", "--image", str(img)])
        print(f"full: {t_full:.2f}s, read {full['read_bytes'] / MiB:.0f} MiB", flush=True)
        idle, dirty, dirty_read = [], [], []
        for r in range(a.rounds):
            t, info = run([*base, "incremental", "--image", str(img)])
            assert info["kind"] == "incremental" and info["read_bytes"] == 0, info
            idle.append(t)
            scatter_writes(img, rng)
            t, info = run([*base, "incremental", "--image", str(img)])
            assert info["kind"] == "incremental", info
            dirty.append(t)
            dirty_read.append(info["read_bytes"])
            print(f"round {r + 1}: idle {idle[-1]:.2f}s  dirty {dirty[-1]:.2f}s "
                  f"(read {info['read_bytes'] / MiB:.1f} MiB)", flush=True)
        mi, md = statistics.median(idle), statistics.median(dirty)
        work_s = md - mi
        print()
        print(f"{'measure':<40}{'value':>10}{'target':>10}")
        print(f"{'full backup, 1 GiB of 64 GiB (s)':<40}{t_full:>10.2f}")
        print(f"{'incremental, nothing dirty (s)':<40}{mi:>10.2f}")
        print(f"{'incremental, 64 x 64 KiB dirty (s)':<40}{md:>10.2f}")
        print(f"{'  read per dirty incremental (MiB)':<40}{statistics.median(dirty_read) / MiB:>10.1f}")
        print(f"{'work / full':<40}{work_s / t_full:>10.1%}{'<= 10%':>10}")
        print(f"{'idle / full':<40}{mi / t_full:>10.1%}{'<= 50%':>10}")
        ok = work_s <= 0.10 * t_full and mi <= 0.50 * t_full
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
