#!/usr/bin/env python3
"""Encryption's cost: full backup (ingest) and restore, plaintext vs encrypted repository.

    python bench/encryption.py [--rounds 5] [--size-mib 512] [--workdir DIR]

A raw image, half random and half text-like (bench/_common.text_like), is backed up
(`nbdbackup full --image IMG --format raw`: qemu-nbd, 4 connections, 256 KiB chunks)
into a fresh repository, once with the default adaptive compression and once with
--compress-all, then restored (`nbdbackup restore`) into a sparse raw file: the CLI
as a user runs it. The encrypted repository is made by `init --encryption
--kdf-memory 8` with NBDBACKUP_PASSPHRASE: the small KDF keeps the once-per-command
key unlock (~40 ms; ~0.6 s at the default 128 MiB) out of a measure of the record
codec (keyed blake3 + AES-256-GCM). Plaintext and encrypted runs alternate (which
goes first alternates too, so drift on a shared machine hits both alike). Medians
per measure; target: encrypted throughput >= 0.85x plaintext's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MiB, bench_workdir, nbdbackup_exe, text_like  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers.engine_util import same_file  # noqa: E402

TARGET = 0.85
# the passphrase of the encrypted runs (a plaintext repository asks for nothing)
ENV = dict(os.environ, NBDBACKUP_PASSPHRASE="bench passphrase")


def make_image(work: Path, size_mib: int) -> Path:
    img = work / f"bench-{size_mib}m.raw"
    if img.exists():
        return img
    half = size_mib // 2 * MiB
    txt = work / "text.bin"
    text_like(txt, half)
    with open(img, "wb") as f:
        for _ in range(half // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
        with open(txt, "rb") as t:
            shutil.copyfileobj(t, f, 16 * MiB)
    txt.unlink()
    return img


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.read().decode()}")
    return wall, ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--workdir", help="keep the image here between runs (default: a temp dir)")
    a = ap.parse_args()
    nbdbackup = nbdbackup_exe()
    with bench_workdir(a.workdir) as work:
        img = make_image(work, a.size_mib)
        size = img.stat().st_size
        res: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(a.rounds):
            modes = ("plaintext", "encrypted") if r % 2 == 0 else ("encrypted", "plaintext")
            for mode in modes:
                for comp in ("adaptive", "all"):
                    repo = work / "repo"
                    shutil.rmtree(repo, ignore_errors=True)
                    nbb = [nbdbackup, "--repo", str(repo), "--quiet"]
                    subprocess.run(nbb + ["init"] + (["--encryption", "--kdf-memory", "8"] if mode == "encrypted"
                                                     else []), check=True, stdout=subprocess.DEVNULL, env=ENV)
                    runs = [(f"backup {comp}", nbb + ["full", "--image", str(img), "--format", "raw", "--disk",
                                                      "bench"] + (["--compress-all"] if comp == "all" else []))]
                    out = work / "restored.raw"
                    if comp == "all":
                        out.unlink(missing_ok=True)
                        runs.append(("restore", nbb + ["restore", "bench", str(out)]))
                    for what, cmd in runs:
                        res.setdefault((mode, what), []).append(timed(cmd))
                        wall, cpu = res[(mode, what)][-1]
                        print(f"round {r + 1}: {mode:<9} {what:<15} {wall:6.2f} s  {cpu:6.2f} CPU-s  "
                              f"load {os.getloadavg()[0]:.1f}", flush=True)
                    if comp == "all" and r == 0 and not same_file(img, out):
                        raise SystemExit(f"{mode} restore differs from the image")
    print()
    print(f"{'measure (median of ' + str(a.rounds) + ')':<26}{'plain MiB/s':>12}{'enc MiB/s':>11}"
          f"{'ratio':>7}{'plain CPU-s':>12}{'enc CPU-s':>10}{'CPU ratio':>10}")
    ok = True
    for what in ("backup adaptive", "backup all", "restore"):
        p, e = res[("plaintext", what)], res[("encrypted", what)]
        tp, te = statistics.median(x[0] for x in p), statistics.median(x[0] for x in e)
        cp, ce = statistics.median(x[1] for x in p), statistics.median(x[1] for x in e)
        ratio = tp / te
        ok = ok and ratio >= TARGET
        label = {"backup adaptive": "full backup (default)", "backup all": "full --compress-all"}.get(what, what)
        print(f"{label:<26}{size / MiB / tp:>12.0f}{size / MiB / te:>11.0f}{ratio:>7.2f}{cp:>12.2f}{ce:>10.2f}"
              f"{cp / ce:>10.2f}")
    # on a shared machine the CPU ratio (plaintext CPU-s / encrypted CPU-s) is the steadier figure:
    # the runs are CPU-bound on two cores, so on an idle machine the throughput ratio follows it
    print(f"target: encrypted >= {TARGET}x plaintext throughput; 1-min load {os.getloadavg()[0]:.1f} (2 cores)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
