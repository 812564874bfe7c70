#!/usr/bin/env python3
"""`nbdbackup list` with 10,000 backups: must stay under a second.

Creates a repository, inserts N backup rows directly into the index (fast
insertion: rows only, their maps are not needed by `list`), then times the
installed CLI: `list`, `list --json`, `list --disk`, against the baseline of
`nbdbackup --version` (interpreter start-up) in the same run. The package's
bytecode is compiled first, as a pip install does (an editable install under
PYTHONDONTWRITEBYTECODE=1 would recompile every module in each run: ~0.1 s).

    python bench/list_speed.py            # 10,000 backups over 20 disks
    python bench/list_speed.py --backups 50000
    python bench/list_speed.py --postgresql     # the index on a throwaway PostgreSQL 15 (local)
    python bench/list_speed.py --s3             # an S3 repository (radosgw) with its PostgreSQL index
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import nbdbackup_exe  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from nbdbackup.repo import Repository  # noqa: E402
from nbdbackup.repo.ids import from_ms, new_backup_id, now_ms, to_ms  # noqa: E402
from nbdbackup.repo.index import write_txn  # noqa: E402
from nbdbackup.repo.schema import backups  # noqa: E402


def fill(repo: Repository, n: int, disks: int) -> None:
    t0 = to_ms(now_ms()) - n * 60_000
    rows = []
    for i in range(n):
        created = from_ms(t0 + i * 60_000)
        rows.append(dict(id=new_backup_id(created), disk=f"disk{i % disks}",
                         kind="incremental" if i >= disks else "full",
                         parent=None, created_ms=to_ms(created), size=100 << 30, chunk_size=repo.chunk_size,
                         read_bytes=1 << 30, stored_bytes=(300 << 20) + i * 4099,  # sizes vary, as real ones
                         duration_s=12.5, bitmap="b", checkpoint=f"c{i}",
                         set_id=None, source="bench", manifest_hash=i.to_bytes(32, "little")))
    with write_txn(repo.index_db) as c:
        c.execute(insert(backups), rows)


def timed(cmd: list[str], env: dict, reps: int) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds (user+sys) of *reps* runs: on a shared machine
    the wall time says how busy the others were, the CPU time what the command costs."""
    best = best_cpu = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed")
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, ru.ru_utime + ru.ru_stime)
    return best, best_cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backups", type=int, default=10_000)
    ap.add_argument("--disks", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--postgresql", action="store_true", help="the index on PostgreSQL (started here)")
    ap.add_argument("--s3", action="store_true", help="an S3 repository on radosgw (started here), index on PostgreSQL")
    a = ap.parse_args()
    exe = nbdbackup_exe()
    compileall.compile_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "nbdbackup"), quiet=1)
    work = tempfile.mkdtemp(prefix="nbdbackup-list-")
    servers = []
    try:
        spec, url, env = os.path.join(work, "r"), None, dict(os.environ)
        if a.postgresql or a.s3:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
            from helpers.pg import start_pg_server

            pg = start_pg_server()
            servers.append(pg)
            url = pg.db_url(pg.create_database())
            env["PGPASSWORD"] = pg.env.get("PGPASSWORD", "")
        if a.s3:
            from pathlib import Path

            from helpers.ceph import CephS3, make_bucket

            ceph = CephS3(Path(tempfile.mkdtemp(prefix="nbdbackup-list-ceph-")) / "cluster").start()
            servers.append(ceph)
            spec = f"s3://{make_bucket(ceph)}"
            env.update(AWS_ENDPOINT_URL=ceph.endpoint, AWS_ACCESS_KEY_ID=ceph.access_key,
                       AWS_SECRET_ACCESS_KEY=ceph.secret_key, AWS_DEFAULT_REGION=ceph.region)
            os.environ.update(env)
        repo = Repository.init(spec, index_url=url)
        fill(repo, a.backups, a.disks)
        repo.close()
        env["NBDBACKUP_REPO"] = spec
        base = timed([exe, "--version"], env, a.reps)
        rows = [("nbdbackup --version (baseline)", base)]
        for args in (["list"], ["list", "--json"], ["list", "--disk", "disk3"]):
            rows.append((f"nbdbackup {' '.join(args)}", timed([exe, *args], env, a.reps)))
        out = subprocess.run([exe, "list", "--json"], env=env, capture_output=True, text=True, check=True).stdout
        assert out.count('"id"') == a.backups, "list --json did not return every backup"
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    where = "S3 + PostgreSQL" if a.s3 else "PostgreSQL index" if a.postgresql else "SQLite index"
    print(f"\n{a.backups} backups over {a.disks} disks ({where}); best of {a.reps} runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'command':34} {'seconds':>8} {'x baseline':>10} {'CPU s':>8}")
    for name, (t, cpu) in rows:
        print(f"{name:34} {t:8.3f} {t / base[0]:10.2f} {cpu:8.3f}")
    worst = max(t for _, (t, _cpu) in rows[1:])
    print(f"target: every list < 1.000 s -> {'OK' if worst < 1.0 else 'MISSED'} (worst {worst:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
