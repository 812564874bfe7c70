"""--libvirt DOMAIN against the shared libvirtd: running domains backed up in pull mode with
the repository's own checkpoints (sources/libvirt.py), and the plumbing under it.

Domains are TCG guests without an OS (helpers.libvirt); their "guest writes" are HMP
qemu-io on the disk's device. Runs that must fail in the middle of a read are caught by
their private run dir (the NBD socket libvirt made) and stopped with SIGSTOP, so the fault
lands mid-read every time, not by luck of timing.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import support
from helpers.engine_util import init_repo, nbb, restore_equals
from helpers.libvirt import MiB, disk_now, guest_write, virsh
from nbdbackup.cli.backupargs import DEFAULT_CONNECTIONS
from nbdbackup.errors import NotFound, UsageError
from nbdbackup.repo.repository import Repository
from nbdbackup.sources import libvirt_domain as ld

CHUNK = 256 * 1024


def _run(repo: Path, kind: str, dom, *args, code: int = 0) -> tuple[list[dict], str]:
    """`nbdbackup --json KIND --libvirt DOMAIN ARGS`: (the backups, stderr); asserts the exit code."""
    p = nbb(repo, "--json", kind, "--libvirt", dom.name, *args, check=False)
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    if code:
        return [], p.stderr
    out = json.loads(p.stdout)
    return (out if isinstance(out, list) else [out]), p.stderr


def _by_target(dom, backups: list[dict]) -> dict[str, dict]:
    return {b["disk"][len(dom.name) + 1:]: b for b in backups}


def _repo_id(repo: Path) -> str:
    return json.loads((repo / "config.json").read_text())["repo_id"]


def _ours(repo: Path, dom) -> list[str]:
    """The domain's checkpoints that belong to *repo*."""
    prefix = ld.checkpoint_prefix(_repo_id(repo))
    return [c for c in dom.checkpoints() if c.startswith(prefix)]


def _run_dirs(dom) -> list[str]:
    uuid = virsh("domuuid", dom.name).stdout.strip()
    found = []
    for d in glob.glob("/run/nbdbackup-libvirt-*"):
        try:
            if Path(d, "domain").read_text().strip() == uuid:
                found.append(d)
        except OSError:
            pass
    return found


def _stopped_mid_read(repo: Path, kind: str, dom, *args, connected: bool = False) -> subprocess.Popen:
    """Start a run and SIGSTOP it as soon as libvirt's NBD socket for it exists (backupBegin
    returned, the read has begun or is about to); with *connected*, only once its connections
    to that socket are up and past their handshakes. With Debian 12's qemu 7.2 and libvirt 9.0,
    a job that ends while a client still negotiates never finishes its teardown (libvirt's
    qemu-event worker holds the domain's job until qemu dies; seen here, cause not traced): a
    test that ends the job under a reader must stop it after the handshakes."""
    cmd = [support.nbdbackup_exe(), "--repo", str(repo), "--json", kind, "--libvirt", dom.name, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60

    def ready() -> bool:
        if not any(os.path.exists(os.path.join(d, "nbd.sock")) for d in _run_dirs(dom)):
            return False
        # one socket is the libvirt connection; the rest are the pool's, each connected
        # before it negotiates: a short wait after the last covers its handshake
        return not connected or _sockets(proc.pid) >= 1 + DEFAULT_CONNECTIONS
    while not ready():
        assert proc.poll() is None, ("the run ended before its read began", proc.communicate())
        assert time.monotonic() < deadline, "the run never started libvirt's backup job"
        time.sleep(0.005)
    if connected:
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)
    assert dom.job_running(), "the backup job is not running"
    return proc


def _sockets(pid: int) -> int:
    fds = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(os.path.join(fds, fd)).startswith("socket:")
        except FileNotFoundError:
            pass
    return count


def _assert_clean(repo: Path, dom, committed_checkpoint: str | None) -> None:
    """No job, no run dir, and of this repository's checkpoints only the latest committed one."""
    assert not dom.job_running()
    assert _run_dirs(dom) == []
    prefix = ld.checkpoint_prefix(_repo_id(repo))
    assert _ours(repo, dom) == ([prefix + committed_checkpoint] if committed_checkpoint else [])


# --- the plumbing -----------------------------------------------------------------------

def test_plumbing_and_helpers(libvirt_domain, libvirtd, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB), ("raw", 8 * MiB)], cdrom=True, persistent=True)
    assert dom.is_active() and dom.checkpoints() == [] and not dom.job_running()
    guest_write(dom, "vdb", 0x55, 2 * MiB, 64 * 1024)
    raw = disk_now(dom.disks["vdb"], tmp_path / "vdb.raw").read_bytes()
    assert raw[:MiB] == b"\x11" * MiB and raw[2 * MiB:2 * MiB + 65536] == b"\x55" * 65536
    conn = ld.open_connection(libvirtd)
    d = ld.lookup_domain(conn, dom.name)
    disks, skipped = ld.backup_disks(d.XMLDesc(0))
    assert [(x.target, x.fmt, x.path, x.disk_type) for x in disks] == [
        ("vda", "qcow2", str(dom.disks["vda"]), "file"), ("vdb", "raw", str(dom.disks["vdb"]), "file")]
    assert skipped == ["hdc (cdrom)"]
    assert ld.backup_disks(d.XMLDesc(0), ["vdb"])[1] == ["vdb (--exclude-disk)", "hdc (cdrom)"]
    with pytest.raises(UsageError, match="vdz"):
        ld.backup_disks(d.XMLDesc(0), ["vdz"])
    with pytest.raises(NotFound, match="qemu:///system"):
        ld.lookup_domain(conn, dom.name + "-nope")
    assert dom.name in ld.domain_names(conn, "nbdbackup-test-*")
    assert ld.domain_names(conn, dom.name) == [dom.name]
    assert ld.checkpoint_prefix("abc") == "nbdbackup-abc-" and ld.disk_name("web1", "vda") == "web1-vda"
    dom.stop()
    assert not dom.is_active() and virsh("domstate", dom.name).stdout.strip() == "shut off"


def test_backup_disks_skips_what_cannot_be_backed_up():
    xml = """<domain><devices>
      <disk type='file' device='disk'><driver type='qcow2'/><source file='/a.qcow2'/><target dev='vda'/></disk>
      <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/sdz'/><target dev='vdb'/></disk>
      <disk type='file' device='disk'><source file='/ro'/><target dev='vdc'/><readonly/></disk>
      <disk type='file' device='disk'><source file='/sh'/><target dev='vdd'/><shareable/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='p/x'/><target dev='vde'/></disk>
      <disk type='file' device='cdrom'><target dev='hdc'/><readonly/></disk>
      <disk type='file' device='floppy'><source file='/f'/><target dev='fda'/></disk>
    </devices></domain>"""
    disks, skipped = ld.backup_disks(xml)
    assert disks == [ld.DomainDisk("vda", "/a.qcow2", "qcow2", "file"),
                     ld.DomainDisk("vdb", "/dev/sdz", "raw", "block")]
    assert skipped == ["vdc (read-only)", "vdd (shareable)", "vde (network disk: not supported)", "hdc (cdrom)",
                       "fda (floppy)"]


# --- backups of a running domain ------------------------------------------------------------

def test_full_incremental_restore_bit_exact(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 32 * MiB), ("qcow2", 16 * MiB), ("raw", 8 * MiB)], cdrom=True)
    repo = init_repo(tmp_path / "repo", "256K")

    full, err = _run(repo, "full", dom)
    by = _by_target(dom, full)
    assert sorted(by) == ["vda", "vdb", "vdc"]                        # hdc, the CD-ROM, is not there
    assert "hdc (cdrom)" in err and "vdc is raw, not qcow2" in err and "full every time" in err, err
    assert len({b["created"] for b in full}) == 1 and len({b["set_id"] for b in full}) == 1
    assert full[0]["set_id"] is not None and all(b["kind"] == "full" for b in full)
    assert by["vda"]["checkpoint"] == by["vdb"]["checkpoint"] is not None and by["vdc"]["checkpoint"] is None
    assert all(b["source"] == f"libvirt:{dom.name}/{t}" for t, b in by.items())
    _assert_clean(repo, dom, by["vda"]["checkpoint"])
    # the set carries the domain's definition: a transient domain's live XML, stored once
    assert {b["domain"] for b in full} == {dom.name} and len({b["vm"] for b in full}) == 1
    with Repository.open(str(repo)) as r:
        vm = r.vm_definition(r.get_backup(by["vda"]["id"]))
    assert vm.domain == dom.name and f"<name>{dom.name}</name>" in vm.xml and "<alias name=" in vm.xml
    assert vm.nvram is None and vm.nvram_path is None
    first = {t: disk_now(p, tmp_path / f"first-{t}.raw") for t, p in dom.disks.items()}

    guest_write(dom, "vda", 0x33, 5 * MiB, 64 * 1024)
    guest_write(dom, "vdb", 0x44, 10 * MiB + 4096, 8192)
    guest_write(dom, "vdc", 0x55, 3 * MiB, 4096)
    inc, err = _run(repo, "incremental", dom)
    iby = _by_target(dom, inc)
    assert [iby[t]["kind"] for t in ("vda", "vdb", "vdc")] == ["incremental", "incremental", "full"]
    assert iby["vda"]["parent"] == by["vda"]["id"] and iby["vdb"]["parent"] == by["vdb"]["id"]
    # one dirty chunk each (the chain check's sample of clean chunks is not counted as read)
    assert iby["vda"]["read_bytes"] == CHUNK and iby["vdb"]["read_bytes"] == CHUNK, iby
    assert iby["vdc"]["read_bytes"] >= MiB                              # the raw disk, whole again
    assert "vdc is raw" in err and "taking a full" not in err, err
    assert len({b["set_id"] for b in inc}) == 1 and inc[0]["set_id"] != full[0]["set_id"]
    _assert_clean(repo, dom, iby["vda"]["checkpoint"])
    second = {t: disk_now(p, tmp_path / f"second-{t}.raw") for t, p in dom.disks.items()}

    for t in dom.disks:
        assert first[t].read_bytes() != second[t].read_bytes()
        assert restore_equals(repo, by[t]["id"], first[t], tmp_path), t
        assert restore_equals(repo, iby[t]["id"], second[t], tmp_path), t


def test_exclude_disk_and_disk_names(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB), ("qcow2", 16 * MiB)])
    repo = init_repo(tmp_path / "repo", "256K")
    _, err = _run(repo, "full", dom, "--exclude-disk", "vdz", code=2)
    assert "vdz" in err and "vda, vdb" in err, err
    _, err = _run(repo, "full", dom, "--disk", "vda", code=2)
    assert "TARGET=NAME" in err, err
    [only], err = _run(repo, "full", dom, "--exclude-disk", "vdb", "--disk", "vda=root-disk")
    assert only["disk"] == "root-disk" and "vdb (--exclude-disk)" in err, err
    guest_write(dom, "vda", 0x66, 2 * MiB, 4096)
    [inc], _ = _run(repo, "incremental", dom, "--exclude-disk", "vdb", "--disk", "vda=root-disk")
    assert inc["kind"] == "incremental" and inc["parent"] == only["id"] and inc["read_bytes"] == CHUNK
    # now with vdb: it has no backup yet, so the set's chain is not whole: a full, with a warning
    both, err = _run(repo, "incremental", dom, "--disk", "vda=root-disk")
    assert sorted((b["disk"], b["kind"]) for b in both) == sorted([("root-disk", "full"), (f"{dom.name}-vdb", "full")])
    assert f"disk {dom.name}-vdb has no backup" in err and "taking a full backup instead" in err, err
    _assert_clean(repo, dom, both[0]["checkpoint"])


def test_failure_mid_read_keeps_the_chain(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 96 * MiB), ("qcow2", 16 * MiB)], busy=64 * MiB)
    repo = init_repo(tmp_path / "repo", "256K")
    full, _ = _run(repo, "full", dom)
    ckpt = full[0]["checkpoint"]
    guest_write(dom, "vda", 0x33, 16 * MiB, 64 * MiB)    # a read that lasts beyond the stop
    guest_write(dom, "vdb", 0x34, 1 * MiB, 4096)
    before = dom.checkpoints()

    # the job ends under the reader (as an admin's domjobabort would): the run fails
    proc = _stopped_mid_read(repo, "incremental", dom, connected=True)
    virsh("domjobabort", dom.name)
    proc.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (4, 10, 12), (proc.returncode, out, err)
    assert "Traceback" not in err and "nbdbackup: error" in err, err
    # one round of reconnect attempts decides for every lost read (not a round per read)
    assert time.monotonic() - resumed < 30, err
    assert (dom.checkpoints(), dom.job_running(), _run_dirs(dom)) == (before, False, []), err
    assert [b["id"] for b in json.loads(nbb(repo, "--json", "list").stdout)] == [b["id"] for b in full]

    guest_write(dom, "vdb", 0x35, 2 * MiB, 4096)
    inc, _ = _run(repo, "incremental", dom)
    iby = _by_target(dom, inc)
    assert all(b["kind"] == "incremental" for b in inc) and iby["vdb"]["read_bytes"] == 2 * CHUNK
    assert iby["vda"]["read_bytes"] == 64 * MiB
    _assert_clean(repo, dom, iby["vda"]["checkpoint"])
    assert iby["vda"]["checkpoint"] != ckpt
    for t, p in dom.disks.items():       # every write, from before and after the failed run
        assert restore_equals(repo, iby[t]["id"], disk_now(p, tmp_path / f"{t}.raw"), tmp_path), t


def test_sigkill_mid_read_then_rerun(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 96 * MiB)], busy=64 * MiB, persistent=True)
    repo = init_repo(tmp_path / "repo", "256K")
    [full], _ = _run(repo, "full", dom)
    guest_write(dom, "vda", 0x77, 80 * MiB, 4096)

    proc = _stopped_mid_read(repo, "incremental", dom)
    proc.kill()
    proc.communicate()
    # what the killed run left: its job, its checkpoint (no backup records it), its run dir
    assert dom.job_running() and len(dom.checkpoints()) == 2 and _run_dirs(dom)

    guest_write(dom, "vda", 0x78, 81 * MiB, 4096)
    [inc], err = _run(repo, "incremental", dom)
    assert "left by an interrupted run" in err and "no committed backup of this repository records" in err, err
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"] and inc["read_bytes"] == 2 * CHUNK
    _assert_clean(repo, dom, inc["checkpoint"])
    assert restore_equals(repo, inc["id"], disk_now(dom.disks["vda"], tmp_path / "vda.raw"), tmp_path)


def test_other_checkpoints_are_never_touched(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB)])
    a = init_repo(tmp_path / "a", "256K")
    b = init_repo(tmp_path / "b", "256K")
    # another tool's checkpoint, made the way it would (libvirt's own API, through virsh)
    virsh("checkpoint-create-as", dom.name, "othertool-1")
    [fa], _ = _run(a, "full", dom)
    [fb], _ = _run(b, "full", dom)
    guest_write(dom, "vda", 0x21, 3 * MiB, 4096)
    [ia], _ = _run(a, "incremental", dom)
    [ib], _ = _run(b, "incremental", dom)
    assert (ia["kind"], ia["parent"], ib["kind"], ib["parent"]) == ("incremental", fa["id"], "incremental", fb["id"])
    pa, pb = (ld.checkpoint_prefix(_repo_id(r)) for r in (a, b))
    assert sorted(dom.checkpoints()) == sorted(["othertool-1", pa + ia["checkpoint"], pb + ib["checkpoint"]])
    # a new full of A drops A's older checkpoint, and only that one
    [fa2], _ = _run(a, "full", dom)
    assert sorted(dom.checkpoints()) == sorted(["othertool-1", pa + fa2["checkpoint"], pb + ib["checkpoint"]])
    [ib2], _ = _run(b, "incremental", dom)
    assert ib2["kind"] == "incremental" and ib2["parent"] == ib["id"]


def test_no_fallback_after_the_checkpoint_was_deleted(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB)])
    repo = init_repo(tmp_path / "repo", "256K")
    [full], _ = _run(repo, "full", dom)
    [ckpt] = _ours(repo, dom)
    virsh("checkpoint-delete", dom.name, ckpt)
    _, err = _run(repo, "incremental", dom, "--no-fallback", code=13)
    assert f"libvirt no longer knows checkpoint {ckpt}" in err, err
    assert dom.checkpoints() == [] and not dom.job_running() and _run_dirs(dom) == []
    [again], err = _run(repo, "incremental", dom)
    assert again["kind"] == "full" and "taking a full backup instead" in err, err
    _assert_clean(repo, dom, again["checkpoint"])


def test_refusals(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB)])
    repo = init_repo(tmp_path / "repo", "256K")
    p = nbb(repo, "full", "--libvirt", dom.name + "-missing", check=False)
    assert p.returncode == 11 and "no libvirt domain named" in p.stderr and "qemu:///system" in p.stderr, p.stderr
    p = nbb(repo, "full", "--libvirt", dom.name, "--connect", "qemu+unix:///system?socket=/nonexistent.sock",
            check=False)
    assert p.returncode == 4 and "cannot connect to libvirt" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = nbb(repo, "full", "--image", "/x.qcow2", "--exclude-disk", "vda", check=False)
    assert p.returncode == 2 and "only with --libvirt" in p.stderr, p.stderr

    # --quiesce without a guest agent: refused before anything is made
    _, err = _run(repo, "full", dom, "--quiesce", code=4)
    assert "cannot freeze" in err and "guest agent" in err, err
    assert dom.checkpoints() == [] and not dom.job_running() and _run_dirs(dom) == []

    # another backup job (not ours) runs on the domain: exit 3, naming it, and it is left alone
    other = dom.dir / "other"           # qemu's user must reach it: not under tmp_path (0700)
    other.mkdir()
    qemu_user = pwd.getpwnam("libvirt-qemu")
    os.chown(other, qemu_user.pw_uid, qemu_user.pw_gid)
    bx = tmp_path / "backup.xml"
    bx.write_text(f"<domainbackup mode='pull'><server transport='unix' socket='{other}/s.sock'/>"
                  f"<disks><disk name='vda' backup='yes' type='file'><scratch file='{other}/vda.s'/></disk>"
                  "</disks></domainbackup>")
    virsh("backup-begin", dom.name, "--backupxml", str(bx))
    try:
        _, err = _run(repo, "full", dom, code=3)
        assert f"{other}/s.sock" in err and "not this repository's" in err, err
        assert dom.job_running()
    finally:
        virsh("domjobabort", dom.name, check=False)
    assert nbb(repo, "--json", "list").stdout.strip() == "[]"


def test_persistent_definition_and_nvram(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB)], persistent=True, nvram=True)
    repo = init_repo(tmp_path / "repo", "256K")
    [full], _ = _run(repo, "full", dom)
    with Repository.open(str(repo)) as r:
        vm = r.vm_definition(r.get_backup(full["id"]))
    # the persistent (inactive) definition: no run-time aliases or labels; and the NVRAM bytes
    assert vm.domain == dom.name and "<alias name=" not in vm.xml and f"<nvram>{dom.nvram}</nvram>" in vm.xml
    assert vm.nvram_path == str(dom.nvram) and vm.nvram == dom.nvram.read_bytes() and len(vm.nvram) == 128 * 1024


def test_a_killed_runs_freeze_is_thawed_by_the_next_run(libvirt_domain, tmp_path):
    """A run killed between fsFreeze and fsThaw leaves its run dir with `frozen`: the next run
    thaws (here libvirt refuses, the domain has no guest agent) and keeps the marker until a
    thaw succeeds; the backup itself goes on."""
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB)])
    repo = init_repo(tmp_path / "repo", "256K")
    left = Path(f"/run/nbdbackup-libvirt-{_repo_id(repo)}-killed00")
    left.mkdir(mode=0o700)
    try:
        (left / "domain").write_text(virsh("domuuid", dom.name).stdout.strip() + "\n")
        (left / "frozen").touch()
        [full], err = _run(repo, "full", dom)
        assert "thawing the guest file systems" in err and "could not thaw" in err and "guest agent" in err, err
        assert full["kind"] == "full" and (left / "frozen").exists()
        (left / "frozen").unlink()          # as after a successful thaw: the dir goes
        _run(repo, "full", dom)
        assert not left.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)


def test_every_repository_place(place, libvirt_domain, tmp_path):
    """local+SQLite, local+PostgreSQL, S3+PostgreSQL: the host lock, the chain queries and the
    set commit of a --libvirt run are the same everywhere."""
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB), ("qcow2", 8 * MiB)])
    support.nbdbackup("--repo", place, "init", "--chunk-size", "256K")
    with Repository.open(place.spec) as r:
        prefix = ld.checkpoint_prefix(r.repo_id)
    full = json.loads(support.nbdbackup("--repo", place, "--json", "full", "--libvirt", dom.name).stdout)
    guest_write(dom, "vdb", 0x5a, 3 * MiB, 4096)
    inc = json.loads(support.nbdbackup("--repo", place, "--json", "incremental", "--libvirt", dom.name).stdout)
    iby = _by_target(dom, inc)
    assert [iby[t]["kind"] for t in ("vda", "vdb")] == ["incremental", "incremental"]
    assert iby["vda"]["read_bytes"] == 0 and iby["vdb"]["read_bytes"] == CHUNK
    assert len({b["set_id"] for b in full}) == 1 and len({b["set_id"] for b in inc}) == 1
    assert dom.checkpoints() == [prefix + iby["vda"]["checkpoint"]] and not dom.job_running()
    out = tmp_path / "vdb.raw"
    support.nbdbackup("--repo", place, "restore", iby["vdb"]["id"], out)
    assert out.read_bytes() == disk_now(dom.disks["vdb"], tmp_path / "now.raw").read_bytes()


def test_untrustworthy_chains_fall_back(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB), ("qcow2", 8 * MiB)])
    repo = init_repo(tmp_path / "repo", "256K")
    _run(repo, "full", dom)
    # a run without vdb moves vda's chain on: the disks' latest backups now disagree
    [vda_only], _ = _run(repo, "incremental", dom, "--exclude-disk", "vdb")
    assert vda_only["kind"] == "incremental"
    _, err = _run(repo, "incremental", dom, "--no-fallback", code=13)
    assert "different checkpoints" in err and "not one set" in err, err
    both, err = _run(repo, "incremental", dom)
    assert all(b["kind"] == "full" for b in both) and "taking a full backup instead" in err, err
    # the latest set forgotten: the latest backups are older ones whose checkpoint is gone
    guest_write(dom, "vda", 0x42, 4 * MiB, 4096)
    inc, _ = _run(repo, "incremental", dom)
    assert all(b["kind"] == "incremental" for b in inc)
    nbb(repo, "forget", inc[0]["id"])
    again, err = _run(repo, "incremental", dom)
    assert all(b["kind"] == "full" for b in again) and "libvirt no longer knows checkpoint" in err, err
    _assert_clean(repo, dom, again[0]["checkpoint"])
    by = _by_target(dom, again)
    assert restore_equals(repo, by["vda"]["id"], disk_now(dom.disks["vda"], tmp_path / "vda.raw"), tmp_path)


def test_without_the_binding_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "libvirt", None)      # what `import libvirt` meets when not installed
    with pytest.raises(UsageError) as e:
        ld.open_connection()
    assert "pip install 'nbdbackup[libvirt]'" in e.value.user_message()
