"""Full backup and restore on S3 + PostgreSQL against a local repository, in the same run.

A raw image (--data-mib, half random, half text-like) is backed up with the
installed CLI (`nbdbackup full --image IMG --format raw`) alternately into a
fresh local repository (SQLite index) and a fresh S3 repository (a throwaway
Ceph radosgw over loopback, the index on a throwaway PostgreSQL 15; both
started here by ../shared/tools), then restored from each to a raw file
(`nbdbackup restore`). Medians of the rounds are compared.
Targets: S3 speed >= 0.8x local for the full backup and for the restore;
peak RSS of the full backup into S3 < 256 MiB.

Besides wall times it prints CPU seconds: of our process (with its children)
and of the servers it talks to (radosgw + ceph-osd + ceph-mon, PostgreSQL),
read from /proc before and after each S3 run. On a machine where all of them
share the same cores, the S3 run's wall time cannot drop below that sum over the cores,
which caps the ratio (printed). And the
requests radosgw counted per S3 run (all, GET with HEAD, PUT), from its admin socket.
The package's bytecode is compiled first, as a pip install does (an editable
install under PYTHONDONTWRITEBYTECODE=1 recompiles every module each run).

    python bench/s3.py [--rounds 5] [--data-mib 512] [--workdir DIR] [--restore-only]

--restore-only (for iterating on restore): one full backup into each repository first,
not timed, then the rounds restore only; the full-backup targets are not judged.

Run it with the python of the venv nbdbackup is installed in.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import MiB, bench_workdir, nbdbackup_exe, text_like  # noqa: E402
from full_backup import timed  # noqa: E402

from helpers.ceph import CephS3, make_bucket, remove_bucket  # noqa: E402
from helpers.pg import start_pg_server  # noqa: E402


def make_image(work: Path, mib: int) -> Path:
    img = work / f"bench-{mib}m.raw"
    if img.exists():
        return img
    half = mib // 2 * MiB
    with open(img, "wb") as f:
        for _ in range(half // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    txt = work / "text.bin"
    text_like(txt, mib * MiB - half)
    with open(img, "ab") as f, open(txt, "rb") as t:
        while block := t.read(16 * MiB):
            f.write(block)
    txt.unlink()
    return img


def _ticks(pid: int) -> int:
    """CPU clock ticks of *pid*: its own (all threads) and its reaped children's; 0 when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return sum(int(x) for x in fields[11:15])      # utime stime cutime cstime


def _pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def server_cpu(ceph: CephS3, pg) -> dict[str, float]:
    """CPU seconds so far of radosgw, the OSD and monitor (one process each), and PostgreSQL
    (the postmaster, which reaps its backends, plus those alive)."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pidfile in (("radosgw", "client.rgw.pid"), ("ceph-osd", "osd.0.pid"), ("ceph-mon", "mon.a.pid")):
        pid = _pid_file(ceph.dir / "run" / pidfile)
        out[name] = _ticks(pid) / hz if pid else 0.0
    master = _pid_file(Path(pg.dir) / "data" / "postmaster.pid")
    total = 0
    if master:
        total = _ticks(master)
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rpartition(")")[2].split()[1]) == master:
                            total += _ticks(int(d))      # a backend still alive
                except (FileNotFoundError, ProcessLookupError, ValueError):
                    pass
    out["postgres"] = total / hz
    return out


def rgw_requests(ceph: CephS3) -> dict[str, int]:
    """radosgw's request counters so far (its admin socket's perf dump): all, GETs (HEADs
    included) and PUTs; {} when the socket cannot be asked."""
    import json

    try:
        out = subprocess.run(["ceph", "--admin-daemon", str(ceph.dir / "run" / "client.rgw.asok"), "perf", "dump"],
                             capture_output=True, timeout=20, check=True).stdout
        rgw = json.loads(out)["rgw"]
        return {"requests": rgw["req"], "GET": rgw["get"], "PUT": rgw["put"]}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return {}


def new_repo(exe: str, work: Path, ceph: CephS3, pg, where: str, tag: str) -> tuple[str, tuple]:
    """A fresh initialised repository: (its --repo arguments as one spec, what drop_repo takes)."""
    if where == "local":
        repo = work / f"repo-{tag}"
        subprocess.run([exe, "--repo", str(repo), "init", "-q"], check=True)
        return str(repo), ("local", repo)
    bucket = make_bucket(ceph)
    db = pg.create_database()
    subprocess.run([exe, "--repo", f"s3://{bucket}", "--index-url", pg.db_url(db), "init", "-q"], check=True)
    return f"s3://{bucket}", ("s3", bucket, db)


def drop_repo(ceph: CephS3, pg, made: tuple) -> None:
    if made[0] == "local":
        subprocess.run(["rm", "-rf", str(made[1])], check=True)
    else:
        remove_bucket(ceph, made[1])
        pg.drop_database(made[2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data-mib", type=int, default=512)
    ap.add_argument("--workdir", help="keep the image here between runs (default: a temp dir)")
    ap.add_argument("--restore-only", action="store_true",
                    help="back up once into each repository (not timed), then time only restores")
    a = ap.parse_args()
    exe = nbdbackup_exe()
    compileall.compile_dir(str(HERE.parent / "nbdbackup"), quiet=1)
    with bench_workdir(a.workdir) as work:
        img = make_image(work, a.data_mib)
        ceph = CephS3(Path(tempfile.mkdtemp(prefix="nbdbackup-bench-ceph-")) / "cluster").start()
        pg = start_pg_server()
        env = dict(os.environ, AWS_ENDPOINT_URL=ceph.endpoint, AWS_ACCESS_KEY_ID=ceph.access_key,
                   AWS_SECRET_ACCESS_KEY=ceph.secret_key, AWS_DEFAULT_REGION=ceph.region,
                   AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                   PGPASSWORD=pg.env.get("PGPASSWORD", ""))
        os.environ.update(env)
        res = {k: [] for k in ("full_local", "full_s3", "restore_local", "restore_s3", "rss_s3", "rss_local")}
        cpu: dict[str, list[dict[str, float]]] = {}     # "full_s3" ... -> per round {process: CPU s}
        reqs: dict[str, list[dict[str, int]]] = {}      # "full", "restore" -> per round radosgw's counts
        made: dict[str, tuple] = {}     # where -> what drop_repo() removes, while it exists
        try:
            full_cmd = ["full", "--image", str(img), "--format", "raw", "--disk", "bench", "--compress-all"]
            kept: dict[str, str] = {}       # --restore-only: where -> the repository backed up once
            if a.restore_only:
                for where in ("local", "s3"):
                    kept[where], made[where] = new_repo(exe, work, ceph, pg, where, "kept")
                    subprocess.run([exe, "--repo", kept[where], "-q", *full_cmd], check=True)
            for r in range(a.rounds):
                order = ("local", "s3") if r % 2 == 0 else ("s3", "local")
                for where in order:
                    if a.restore_only:
                        spec = kept[where]
                    else:
                        spec, made[where] = new_repo(exe, work, ceph, pg, where, str(r))
                    out = work / "restored.raw"
                    out.unlink(missing_ok=True)
                    ops = (("full", full_cmd), ("restore", ["restore", "bench", str(out)]))
                    for op, cmd in ops[1:] if a.restore_only else ops:
                        before, asked = server_cpu(ceph, pg), rgw_requests(ceph) if where == "s3" else {}
                        t, m, ours = timed([exe, "--repo", spec, "-q", *cmd])
                        after = server_cpu(ceph, pg)
                        if asked:
                            done = rgw_requests(ceph)
                            reqs.setdefault(op, []).append({k: done[k] - asked[k] for k in done})
                        res[f"{op}_{where}"].append(t)
                        if op == "full":
                            res[f"rss_{where}"].append(m)
                        used = {"nbdbackup": ours}
                        if where == "s3":
                            used.update({k: after[k] - before[k] for k in after})
                        cpu.setdefault(f"{op}_{where}", []).append(used)
                    if not a.restore_only:
                        drop_repo(ceph, pg, made.pop(where))
                full = "" if a.restore_only else \
                    f"full local {res['full_local'][-1]:.2f}s s3 {res['full_s3'][-1]:.2f}s  "
                rss = "" if a.restore_only else f"  RSS s3 {res['rss_s3'][-1] / MiB:.0f} MiB"
                print(f"round {r + 1}: {full}restore local {res['restore_local'][-1]:.2f}s "
                      f"s3 {res['restore_s3'][-1]:.2f}s{rss}  load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            for what in made.values():
                drop_repo(ceph, pg, what)
            ceph.stop()
            pg.stop()
        med = {k: statistics.median(v) for k, v in res.items() if k.startswith(("full", "restore")) and v}
        restore_ratio = med["restore_local"] / med["restore_s3"]
        print()
        print(f"{'measure':<40}{'value':>10}{'target':>10}")
        for k, v in med.items():
            print(f"{k + ' median (s)':<40}{v:>10.2f}")
        if not a.restore_only:
            full_ratio = med["full_local"] / med["full_s3"]
            print(f"{'full: S3 speed / local speed':<40}{full_ratio:>10.2f}{'>= 0.80':>10}")
        print(f"{'restore: S3 speed / local speed':<40}{restore_ratio:>10.2f}{'>= 0.80':>10}")
        if not a.restore_only:
            print(f"{'peak RSS, full into S3 (MiB)':<40}{max(res['rss_s3']) / MiB:>10.0f}{'< 256':>10}")
            print(f"{'peak RSS, full into local (MiB)':<40}{max(res['rss_local']) / MiB:>10.0f}")
        print()
        print("CPU seconds per run (medians; nbdbackup includes its children, e.g. qemu-nbd):")
        cores = os.cpu_count() or 1
        totals = {}
        for run, rounds in cpu.items():
            procs = rounds[0].keys()
            med_cpu = {p: statistics.median(r[p] for r in rounds) for p in procs}
            parts = "  ".join(f"{p} {v:.2f}" for p, v in med_cpu.items())
            totals[run] = sum(med_cpu.values())
            print(f"  {run:<14} {parts}  total {totals[run]:.2f}  (wall {med[run]:.2f} s, {cores} cores)")
        # the servers share our cores: an S3 run cannot take less than all its CPU over the cores
        for op in ("full", "restore"):
            if f"{op}_s3" in totals and f"{op}_local" in med:
                floor = totals[f"{op}_s3"] / cores
                print(f"  {op}: S3 run's CPU / {cores} cores = {floor:.2f} s, so S3 speed / local speed "
                      f"cannot pass {med[f'{op}_local'] / floor:.2f} on this machine")
        for op, rounds in reqs.items():
            counts = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            shown = ", ".join(f"{k} {v:.0f}" for k, v in counts.items())
            print(f"  {op + '_s3':<14} radosgw requests (medians): {shown}")
        ok = restore_ratio >= 0.8 and (a.restore_only or (full_ratio >= 0.8 and max(res["rss_s3"]) < 256 * MiB))
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
