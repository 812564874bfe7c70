"""Many hosts, one repository: hosts that share only the bucket and the index database.

Three "hosts" (processes with their own state, temp and runtime directories,
tests/helpers/fleet_host.py) back up their own qcow2 disks in a loop, while
another runs prune and gc in a loop and another serves a backup that qemu
reads again and again. At the end every remaining backup verifies and
restores bit-exact against the disk content it was taken from. The same
test runs on a local repository: gc beside everything there too.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers.fleet_host import host_env
from helpers.nbd_servers import slow_source
from helpers.places import make_place
from helpers.support import kill_if_running, nbdbackup, nbdbackup_exe

pytestmark = pytest.mark.slow

TESTS = os.path.dirname(os.path.abspath(__file__))
SECONDS = 25
HOSTS = ("h0", "h1", "h2")


def _lines(path) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(x) for x in f if x.strip()]
    except FileNotFoundError:
        return []


def _start_host(place, host: str, workdir) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=TESTS)
    return subprocess.Popen([sys.executable, "-m", "helpers.fleet_host", place.spec, host, str(workdir), str(SECONDS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_backup(workdir, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _lines(workdir / "backups.jsonl")
        if got:
            return got[0]
        time.sleep(0.2)
    raise AssertionError("the first host committed no backup")


def _serve(place, workdir) -> tuple[subprocess.Popen, str]:
    env = host_env(str(workdir))
    sock = str(workdir / "serve.sock")
    proc = subprocess.Popen([nbdbackup_exe(), "--repo", place.spec, "serve", "--listen", f"unix:{sock}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no socket"
        time.sleep(0.05)
    return proc, sock


@pytest.mark.parametrize("mode", ["s3+pg", "local"])
def test_fleet_backs_up_beside_prune_gc_and_a_served_backup(request, tmp_path, mode):
    place = make_place(request, mode, tmp_path)
    nbdbackup("--repo", place, "init", "--chunk-size", "64K", "-q")
    hosts = {h: _start_host(place, h, tmp_path / h) for h in HOSTS}
    served = _wait_for_first_backup(tmp_path / "h0")
    server, sock = _serve(place, tmp_path / "reader")
    # a client that stays connected, as a VM booted from the backup does: its backup is in use
    # (Debian's python has libnbd's binding: python3-libnbd)
    holder = subprocess.Popen(["/usr/bin/python3", "-c", "import nbd, sys, time; h = nbd.NBD(); "
                               "h.connect_uri(sys.argv[1]); h.pread(4096, 0); print('connected', flush=True); "
                               "time.sleep(900)", f"nbd+unix:///{served['id']}?socket={sock}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "connected", holder.stderr.read()
    stop = threading.Event()
    maint_runs, reads, problems = [], [], []

    def maintain():
        env = host_env(str(tmp_path / "maint"))
        while not stop.is_set():
            for cmd in (["prune", "--keep-last", "2"], ["gc", "--grace", "0"]):
                p = nbdbackup("--repo", place, "--json", "--lock-wait", "30", *cmd, env=env, check=False,
                              timeout=300)
                maint_runs.append((cmd[0], p.returncode))
                if p.returncode != 0:
                    problems.append(f"{cmd[0]} exited {p.returncode}: {p.stderr[-1500:]}")
            time.sleep(0.5)

    def read_served():
        out = tmp_path / "reader" / "read.raw"
        while not stop.is_set():
            out.unlink(missing_ok=True)
            p = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                f"nbd+unix:///{served['id']}?socket={sock}", str(out)],
                               capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                problems.append(f"qemu-img convert from the served backup failed: {p.stderr}")
            elif hashlib.sha256(out.read_bytes()).hexdigest() != served["sha256"]:
                problems.append("qemu read different bytes from the served backup")
            reads.append(p.returncode)

    threads = [threading.Thread(target=maintain), threading.Thread(target=read_served)]
    for t in threads:
        t.start()
    try:
        for h, proc in hosts.items():
            _, err = proc.communicate(timeout=SECONDS + 240)
            assert proc.returncode == 0, f"host {h} failed: {err}"
        stop.set()
        for t in threads:
            t.join(timeout=300)
        # the hosts are done; the serve still runs: its backup stays whatever the policy says
        nbdbackup("--repo", place, "prune", "--keep-last", "1")
        nbdbackup("--repo", place, "gc", "--grace", "0")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
        for proc in (*hosts.values(), holder):
            kill_if_running(proc)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        finally:
            kill_if_running(server)
    assert not problems, "\n".join(problems)
    assert ("gc", 0) in maint_runs and ("prune", 0) in maint_runs and reads.count(0) >= 2, (maint_runs, reads)
    runs = [r for h in HOSTS for r in _lines(tmp_path / h / "runs.jsonl")]
    failed = [r for r in runs if r["rc"] != 0]
    assert not failed, failed
    made = {b["id"]: b for h in HOSTS for b in _lines(tmp_path / h / "backups.jsonl")}
    assert len(made) >= 3 * len(HOSTS), f"only {len(made)} backups in {SECONDS} s"

    listed = {b["id"]: b for b in json.loads(nbdbackup("--repo", place, "--json", "list").stdout)}
    assert served["id"] in listed, "the backup being served was forgotten under the serve"
    assert set(listed) <= set(made), "a backup nobody made is listed"
    assert len(listed) < len(made), "prune forgot nothing"
    assert len(listed) <= 1 + 2 * len(HOSTS), f"prune --keep-last 1 kept {len(listed)}"   # one per disk + served
    nbdbackup("--repo", place, "verify")
    stats = json.loads(nbdbackup("--repo", place, "--json", "stats").stdout)
    assert stats["dedup_ratio"] > 1.0, stats       # the hosts' shared base content is stored once
    for bid in listed:
        out = tmp_path / "restored.raw"
        out.unlink(missing_ok=True)
        nbdbackup("--repo", place, "restore", bid, out)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == made[bid]["sha256"], f"{bid} differs"
    # nothing is left that the index does not name, once gc runs with nothing else beside it
    nbdbackup("--repo", place, "gc", "--grace", "0")
    with_repo_objects_named_by_index(place)


def with_repo_objects_named_by_index(place) -> None:
    from sqlalchemy import select

    from nbdbackup.repo import Repository
    from nbdbackup.repo.schema import packs

    with Repository.open(place.spec) as repo:
        with repo.index_db.connect() as conn:
            indexed = {r[0] for r in conn.execute(select(packs.c.name))}
        stored = {n.rsplit("/", 1)[-1][:-5] for n in repo.backend.list("packs/") if n.endswith(".pack")}
    assert stored == indexed, (sorted(stored - indexed)[:5], sorted(indexed - stored)[:5])


@pytest.mark.parametrize("mode", ["s3+pg", "local+pg"])
def test_same_disk_from_two_hosts_and_a_dead_host(request, tmp_path, mode):
    place = make_place(request, mode, tmp_path)
    nbdbackup("--repo", place, "init", "--chunk-size", "64K", "-q")
    src, uri = slow_source(tmp_path, "slow", "pattern", "8M", "250ms")
    try:
        cmd = [nbdbackup_exe(), "--repo", place.spec, "full", "--source", uri, "--disk", "web1-vda",
               "--connections", "1"]
        a = subprocess.Popen(cmd, env=host_env(str(tmp_path / "A")), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        time.sleep(1.0)                                   # A holds the disk's lock now (it reads for seconds)
        assert a.poll() is None, a.stderr.read()
        b = subprocess.run(cmd, env=host_env(str(tmp_path / "B")), capture_output=True, text=True, timeout=120)
        assert b.returncode == 3, b.stderr
        assert f"pid {a.pid}" in b.stderr and "web1-vda" in b.stderr and "since" in b.stderr, b.stderr
        assert "Traceback" not in b.stderr
        a.send_signal(signal.SIGKILL)                     # the host dies holding the lock
        a.wait(10)
        t0 = time.monotonic()
        c = subprocess.run(cmd, env=host_env(str(tmp_path / "C")), capture_output=True, text=True, timeout=300)
        assert c.returncode == 0, c.stderr                # the dead holder's lock is gone at once
        assert time.monotonic() - t0 < 60
    finally:
        kill_if_running(src)
    listed = json.loads(nbdbackup("--repo", place, "--json", "list").stdout)
    assert [b["disk"] for b in listed] == ["web1-vda"]    # A's half-done backup is not listed
    nbdbackup("--repo", place, "verify")
