#!/usr/bin/env python3
"""Live-backup benchmark: what fleecing through QMP costs, against nbdcopy.

A real qemu-system-x86_64 (CPU stopped, no guest OS) runs a qcow2 disk of
--size, 3/4 filled with random data. In one process run it measures:

  setup+teardown   QmpSource.prepare() + close() alone (transaction, overlay,
                   NBD server, export, and removing all of it)
  nbdcopy          baseline: `nbdcopy URI null:` of the same fleecing export
  full             `run_backup` full (setup, read, hash, compress, commit, teardown)
  incremental      after the guest rewrote --dirty bytes in 64 KiB writes

    python bench/qmp_fleece.py                   # 256 MiB disk, 8 MiB dirty
    python bench/qmp_fleece.py --size 1G --dirty 64M
Ratios are against nbdcopy of the whole disk; setup+teardown should stay well
under a second so that small incrementals are dominated by their data.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from helpers.qmp_vm import MiB, Vm  # noqa: E402
from nbdbackup.engine.backup import BackupOptions, run_backup  # noqa: E402
from nbdbackup.repo.repository import Repository  # noqa: E402
from nbdbackup.sources.qmp import QmpSource  # noqa: E402


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    return int(t[:-1]) * units[t[-1]] if t[-1:] in units else int(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size_arg, default=256 * MiB)
    ap.add_argument("--dirty", type=size_arg, default=8 * MiB)
    ap.add_argument("--connections", type=int, default=4)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-qmp-") as tmp:
        tmp = Path(tmp)
        os.environ["NBDBACKUP_STATE_DIR"] = str(tmp / "state")
        vm = Vm(tmp, {"vda": a.size}, start=False)
        fill = tmp / "fill.bin"
        fill.write_bytes(os.urandom(a.size * 3 // 4))
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -s {fill} 0 {a.size * 3 // 4}",
                        vm.images["vda"]], check=True, capture_output=True)
        fill.unlink()
        vm.start()
        rows = []
        try:
            repo = Repository.init(str(tmp / "repo"))
            t = time.perf_counter()
            src = QmpSource(vm.qmp_sock, ["vda"])
            plans = src.prepare(repo, "full", False)
            t_prep = time.perf_counter() - t
            t = time.perf_counter()
            subprocess.run(["nbdcopy", "-C", str(a.connections), plans[0].uri, "null:"],
                           check=True, capture_output=True)
            t_copy = time.perf_counter() - t
            t = time.perf_counter()
            src.failed(None)
            src.close()
            t_close = time.perf_counter() - t
            rows.append(("setup+teardown", t_prep + t_close, None))
            rows.append(("nbdcopy (baseline)", t_copy, a.size))

            opts = BackupOptions(connections=a.connections)
            t = time.perf_counter()
            run_backup(repo, QmpSource(vm.qmp_sock, ["vda"]), "full", opts)
            rows.append(("full", time.perf_counter() - t, a.size))

            rnd = random.Random(1)
            for _ in range(a.dirty // 65536):
                off = rnd.randrange(a.size // 65536) * 65536
                vm.cmd("human-monitor-command",
                       **{"command-line": f'qemu-io -d vda "write -P {rnd.randrange(1, 255)} {off} 65536"'})
            t = time.perf_counter()
            r = run_backup(repo, QmpSource(vm.qmp_sock, ["vda"]), "incremental", opts)
            rows.append((f"incremental ({r[0].stats.read_bytes // MiB} MiB read)",
                         time.perf_counter() - t, r[0].stats.read_bytes))
            repo.close()
        finally:
            vm.stop()

    print(f"disk {a.size // MiB} MiB (3/4 random), {a.connections} connections, qemu fleecing export")
    print(f"{'step':32} {'seconds':>8} {'MiB/s':>8} {'x nbdcopy':>10}")
    for name, secs, nbytes in rows:
        rate = f"{nbytes / MiB / secs:8.1f}" if nbytes else f"{'-':>8}"
        print(f"{name:32} {secs:8.3f} {rate} {secs / t_copy:10.2f}")


if __name__ == "__main__":
    main()
