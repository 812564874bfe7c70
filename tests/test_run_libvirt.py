"""issue 14's fleet test: `nbdbackup run` over libvirt domains of a real libvirtd (the shared
one, helpers.libvirt): two running domains (one with two disks) by glob and a shut-off
persistent one by name, in one job file; a fault in one domain's backup; SIGKILL of the run.
Domains are TCG with no guest OS; guest writes go through HMP qemu-io (guest_write)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import support
from helpers.engine_util import MiB, init_repo, nbb, random_file, restore_equals
from helpers.libvirt import disk_now, guest_write, libvirt_domain, libvirtd, virsh  # noqa: F401 (fixtures)
from nbdbackup.errors import ExitCode

pytestmark = pytest.mark.libvirt
KiB = 1 << 10


@pytest.fixture
def domains(libvirt_domain):  # noqa: F811 (the fixture imported above)
    """helpers.libvirt's domain factory: every domain it makes is removed after the test."""
    return libvirt_domain


def run_json(job: Path, *args, rc: int = 0) -> dict:
    p = support.nbdbackup("--json", "run", str(job), *args, check=False, timeout=900)
    assert p.returncode == rc, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return json.loads(p.stdout)


def by_disk(doc: dict) -> dict[str, dict]:
    return {b["disk"]: b for s in doc["sources"] for b in s["backups"]}


def sources(doc: dict) -> dict[str, dict]:
    return {s["source"]: s for s in doc["sources"]}


def listing(repo: Path) -> list[dict]:
    return json.loads(nbb(repo, "--json", "list").stdout)


def known_checkpoints_only(dom, repo: Path) -> None:
    """No backup job left on *dom*, and every checkpoint it has is one a backup of the
    repository records (our names end with the BackupInfo.checkpoint)."""
    assert not dom.job_running(), f"{dom.name} still has a backup job"
    recorded = {b["checkpoint"] for b in listing(repo) if b.get("checkpoint")}
    unknown = [c for c in dom.checkpoints() if not any(c.endswith(r) for r in recorded)]
    assert not unknown, f"checkpoints the repository does not know: {unknown}"


def restores_bit_exact(repo: Path, backups: dict[str, dict], images: dict[str, Path], tmp: Path) -> None:
    for disk, image in images.items():
        now = disk_now(image, tmp / f"{disk}.now.raw")
        assert restore_equals(repo, backups[disk]["id"], now, tmp), f"{disk} does not restore bit-exact"
        now.unlink()


def test_fleet_full_incremental_and_shut_off_domain(domains, tmp_path):
    web1 = domains(disks=[("qcow2", 32 * MiB)], tag="fleet")
    web2 = domains(disks=[("qcow2", 32 * MiB), ("qcow2", 16 * MiB)], tag="fleet")
    off = domains(disks=[("qcow2", 16 * MiB)], persistent=True, running=False, tag="off")
    repo = init_repo(tmp_path / "repo")
    job = tmp_path / "fleet.toml"
    job.write_text(f"""
repository = "{repo}"
concurrency = 2
[[source]]
libvirt = "nbdbackup-test-{os.getpid()}-*-fleet"
[[source]]
libvirt = "{off.name}"
""")
    images = {f"{d.name}-{t}": p for d in (web1, web2, off) for t, p in d.disks.items()}

    first = run_json(job)                                             # 1) a full run
    got = by_disk(first)
    assert set(got) == set(images)
    assert {b["kind"] for b in got.values()} == {"full"}
    assert all(b["read_bytes"] == 1 * MiB for b in got.values()), got       # the first MiB is filled
    assert set(sources(first)) == {f"libvirt:{web1.name}", f"libvirt:{web2.name}", f"libvirt:{off.name}"}
    restores_bit_exact(repo, got, images, tmp_path)

    guest_write(web1, "vda", 0x44, 4 * MiB, 64 * KiB)               # 2) guest writes
    guest_write(web2, "vdb", 0x55, 2 * MiB, 128 * KiB)
    second = run_json(job)                                            # 3) only the changes are read
    got2 = by_disk(second)
    assert {d: b["kind"] for d, b in got2.items()} == {d: "incremental" for d in images}
    assert got2[f"{web1.name}-vda"]["read_bytes"] == 64 * KiB
    assert got2[f"{web2.name}-vda"]["read_bytes"] == 0
    assert got2[f"{web2.name}-vdb"]["read_bytes"] == 128 * KiB
    assert got2[f"{off.name}-vda"]["read_bytes"] == 0
    restores_bit_exact(repo, got2, images, tmp_path)

    off.start()                                                       # 4) shut-off domain: start, write, stop
    guest_write(off, "vda", 0x66, 3 * MiB, 64 * KiB)
    off.stop()
    third = run_json(job)
    got3 = by_disk(third)
    assert got3[f"{off.name}-vda"]["kind"] == "incremental"
    assert got3[f"{off.name}-vda"]["read_bytes"] == 64 * KiB
    assert got3[f"{off.name}-vda"]["parent"] == got2[f"{off.name}-vda"]["id"]
    restores_bit_exact(repo, got3, images, tmp_path)                 # 5) every backup bit-exact
    for dom in (web1, web2):
        known_checkpoints_only(dom, repo)


def _slow_domain(domains, tmp_path, tag: str):
    """A running domain whose vda holds 192 MiB of random data: its read takes long enough
    for the test to act while it runs."""
    dom = domains(disks=[("qcow2", 256 * MiB)], persistent=True, running=False, tag=tag)
    raw = random_file(tmp_path / f"{tag}.raw", 192 * MiB)
    # -n: into the 256 MiB image as it is (a new one would have the raw file's 192 MiB)
    support.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(dom.disks["vda"])])
    raw.unlink()
    dom.start()
    return dom


def _job(tmp_path: Path, repo: Path, *doms) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(f'repository = "{repo}"\nconcurrency = 2\n'
                   + "".join(f'[[source]]\nlibvirt = "{d.name}"\nconnections = 1\n' for d in doms))
    return job


def _job_reported(dom) -> bool:
    """A backup job libvirt reports in full (while one starts, domjobinfo fails with "backup
    job data missing" for a moment)."""
    p = virsh("domjobinfo", dom.name, check=False)
    types = [ln.split(":", 1)[1].strip().lower() for ln in p.stdout.splitlines() if ln.startswith("Job type")]
    return p.returncode == 0 and bool(types) and types[0] != "none"


def _wait_for_job(dom, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not _job_reported(dom):
        assert proc.poll() is None, f"the run ended before {dom.name}'s backup job was seen"
        assert time.monotonic() < deadline, f"no backup job on {dom.name}"
        time.sleep(0.05)


def test_a_failure_in_one_domain_loses_no_change_and_spares_the_others(domains, tmp_path):
    big = _slow_domain(domains, tmp_path, "big")
    small = domains(disks=[("qcow2", 16 * MiB)], tag="small")
    repo = init_repo(tmp_path / "repo")
    job = _job(tmp_path, repo, big, small)
    run_json(job)
    checkpoints = big.checkpoints()
    guest_write(big, "vda", 0x77, 200 * MiB, 64 * KiB)          # must reach the repository in the end
    guest_write(small, "vda", 0x78, 1 * MiB, 64 * KiB)

    # a full (192 MiB of random data to read: time to act), its job aborted in the middle of the read
    prom = tmp_path / "nbdbackup.prom"
    proc = subprocess.Popen([support.nbdbackup_exe(), "--json", "run", "--full", "--metrics-file", str(prom), str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_job(big, proc)
        virsh("domjobabort", big.name)
        out, err = proc.communicate(timeout=600)
    finally:
        support.kill_if_running(proc)
    assert proc.returncode == ExitCode.SOME_SOURCES_FAILED, err
    doc = json.loads(out)
    assert sources(doc)[f"libvirt:{big.name}"]["result"] == "failed", err
    assert sources(doc)[f"libvirt:{small.name}"]["result"] == "ok", err
    assert by_disk(doc)[f"{small.name}-vda"]["kind"] == "full"
    assert big.checkpoints() == checkpoints                      # its chain is as it was
    # the metrics know the failed domain's disk from the repository (source libvirt:DOMAIN/vda)
    metrics = {(f.name, s.labels.get("disk")): s.value
               for f in text_string_to_metric_families(prom.read_text()) for s in f.samples}
    assert metrics[("nbdbackup_last_run_success", f"{big.name}-vda")] == 0
    assert metrics[("nbdbackup_last_run_success", f"{small.name}-vda")] == 1
    assert metrics[("nbdbackup_repository_backups", f"{big.name}-vda")] == 1
    assert ("nbdbackup_last_success_timestamp_seconds", f"{big.name}-vda") in metrics
    known_checkpoints_only(big, repo)

    again = by_disk(run_json(job))                               # the next run sees the earlier write
    b = again[f"{big.name}-vda"]
    assert b["kind"] == "incremental" and b["read_bytes"] >= 64 * KiB
    restores_bit_exact(repo, again, {f"{big.name}-vda": big.disks["vda"]}, tmp_path)
    known_checkpoints_only(big, repo)


def _children(pid: int) -> list[int]:
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
        except OSError:
            pass
    return out


def test_sigkill_of_run_mid_backup_is_cleaned_up_by_the_next_run(domains, tmp_path):
    big = _slow_domain(domains, tmp_path, "kill")
    repo = init_repo(tmp_path / "repo")
    job = _job(tmp_path, repo, big)
    run_json(job)
    guest_write(big, "vda", 0x79, 100 * MiB, 64 * KiB)
    proc = subprocess.Popen([support.nbdbackup_exe(), "run", "--full", str(job)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)     # a full: 192 MiB to read, time to kill it
    try:
        _wait_for_job(big, proc)
        # the run and its child at once (as an OOM kill or KillMode=control-group would): the
        # child gets no chance to end its backup job or delete its new checkpoint
        for pid in [*_children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    finally:
        support.kill_if_running(proc)
    assert big.job_running(), "the killed run's backup job should still be there for the next run to end"
    doc = run_json(job)
    b = by_disk(doc)[f"{big.name}-vda"]
    assert b["kind"] == "incremental" and b["read_bytes"] == 64 * KiB, b    # from the last good backup
    restores_bit_exact(repo, {b["disk"]: b}, {b["disk"]: big.disks["vda"]}, tmp_path)
    known_checkpoints_only(big, repo)
    guest_write(big, "vda", 0x7a, 150 * MiB, 64 * KiB)          # and the chain goes on from there
    nxt = by_disk(run_json(job))[f"{big.name}-vda"]
    assert nxt["kind"] == "incremental" and nxt["read_bytes"] == 64 * KiB
    known_checkpoints_only(big, repo)


def test_globs_expand_to_the_domains_of_the_connection(domains, tmp_path):
    a = domains(disks=[("qcow2", 16 * MiB)], tag="globa")
    b = domains(disks=[("qcow2", 16 * MiB)], persistent=True, running=False, tag="globb")
    job = tmp_path / "job.toml"
    job.write_text(f"""repository = "{tmp_path}/repo"
[[source]]
libvirt = "nbdbackup-test-{os.getpid()}-*-glob[ab]"
quiesce = true
[[source]]
libvirt = "{a.name}"            # named again: backed up once
[[source]]
libvirt = "nbdbackup-test-{os.getpid()}-*-nothing-matches"
""")
    p = support.nbdbackup("run", "--dry-run", str(job), check=False)
    assert p.returncode == ExitCode.SOME_SOURCES_FAILED, p.stderr
    cmds = [ln for ln in p.stdout.splitlines() if not ln.startswith("#")]
    assert len(cmds) == 2, p.stdout
    for cmd, dom in zip(cmds, sorted([a.name, b.name])):
        assert cmd.endswith(f" incremental --libvirt {dom} --connect qemu:///system --quiesce"), cmd
    assert "-nothing-matches: no libvirt domain on qemu:///system matches" in p.stdout
    assert f"libvirt:{a.name} is named by more than one source" in p.stderr
