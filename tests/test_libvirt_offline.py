"""Shut-off libvirt domains backed up from their images (sources/libvirt_offline.py), and the
checkpoint chain across start and stop (sources/libvirt_checkpoints.py), against the real
libvirtd of qemu:///system.

A running domain's guest writes go through HMP qemu-io on its virtio disk; a shut-off
domain's images are written with qemu-io on the file, as an admin (or another tool) might.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import support
from helpers.engine_util import MiB, init_repo, nbb, qio, random_file, restore_equals, snapshot_raw
from helpers.libvirt import guest_write, virsh

pytestmark = pytest.mark.libvirt

URI = "qemu:///system"


def _virsh(*args, check=True) -> subprocess.CompletedProcess:
    return virsh(*args, check=check)


@pytest.fixture
def shut_off(libvirt_domain):
    """shut_off(disks) -> TestDomain: a persistent domain, defined but not running."""
    return lambda disks=(("qcow2", 64 * MiB),): libvirt_domain(disks, persistent=True, running=False)


# --- driving a shut-off backup -----------------------------------------------------------------

def _offline(repo: Path, name: str, kind: str, *flags: str, check: bool = True, popen: bool = False):
    """One backup of shut-off domain *name* through OfflineDomainSource, in a child process
    (this file's __main__), as LibvirtSource hands it over."""
    cmd = [sys.executable, __file__, str(repo), name, kind, *flags]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
        return {b["disk"].rsplit("-", 1)[1]: b for b in json.loads(p.stdout)}, p.stderr
    return p


def _main(argv: list[str]) -> int:
    import logging

    import libvirt

    from nbdbackup.engine.backup import run_backup
    from nbdbackup.engine.options import BackupOptions
    from nbdbackup.errors import NbdBackupError
    from nbdbackup.repo.repository import Repository
    from nbdbackup.sources.libvirt_domain import backup_disks, disk_name
    from nbdbackup.sources.libvirt_offline import OfflineDomainSource

    logging.basicConfig(level=logging.WARNING, format="nbdbackup: warning: %(message)s", stream=sys.stderr)
    repo_path, name, kind, *flags = argv
    conn = libvirt.open(URI)
    dom = conn.lookupByName(name)
    disks, _ = backup_disks(dom.XMLDesc(0))
    try:
        with Repository.open(repo_path) as repo:
            source = OfflineDomainSource(dom, name, disks, {d.target: disk_name(name, d.target) for d in disks},
                                         connections=2)
            results = run_backup(repo, source, kind,
                                 BackupOptions(connections=2, no_fallback="--no-fallback" in flags))
    except NbdBackupError as e:
        print(f"nbdbackup: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    print(json.dumps([r.info.to_json() for r in results]))
    return 0


# --- looking at the state ----------------------------------------------------------------------

def _repo_id(repo: Path) -> str:
    return json.loads((repo / "config.json").read_text())["repo_id"]


def _bitmaps(img: Path) -> dict[str, list[str]]:
    out = json.loads(support.run(["qemu-img", "info", "-U", "--output=json", str(img)]).stdout)
    return {b["name"]: b["flags"] for b in (out.get("format-specific") or {}).get("data", {}).get("bitmaps", [])}


def _checkpoints(name: str) -> list[str]:
    return sorted(_virsh("checkpoint-list", name, "--name").stdout.split())


def _checkpoint_disks(name: str, checkpoint: str) -> dict[str, str]:
    xml = ET.fromstring(_virsh("checkpoint-dumpxml", name, checkpoint, "--no-domain").stdout)
    return {d.get("name"): d.get("checkpoint") for d in xml.findall("./disks/disk")}


def _reconcile(name: str, repo: Path, want: str | None) -> str | None:
    import libvirt

    from nbdbackup.sources.libvirt_checkpoints import reconcile_checkpoints
    from nbdbackup.sources.libvirt_domain import backup_disks

    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
        return reconcile_checkpoints(dom, _repo_id(repo), backup_disks(dom.XMLDesc(0))[0], want)
    finally:
        conn.close()


# --- tests -------------------------------------------------------------------------------------

def test_chain_goes_on_across_start_and_stop(shut_off, tmp_path):
    dom = shut_off([("qcow2", 64 * MiB)])
    name, images = dom.name, dom.disks
    img = images["vda"]
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    snaps = {}

    full, _ = _offline(repo, name, "full")
    full = full["vda"]
    assert full["kind"] == "full" and full["disk"] == f"{name}-vda" and full["source"] == f"libvirt:{name}/vda"
    assert full["checkpoint"]
    snaps[full["id"]] = snapshot_raw(img, tmp_path / "full.raw")
    assert list(_bitmaps(img)) == [prefix + full["checkpoint"]]
    # libvirt knows the checkpoint the images now hold: redefined on the inactive domain
    assert _checkpoints(name) == [prefix + full["checkpoint"]]
    assert _checkpoint_disks(name, prefix + full["checkpoint"]) == {"vda": "bitmap"}

    qio(img, "write -q -P 0x22 8M 64K")                       # written while shut off
    inc1, _ = _offline(repo, name, "incremental")
    inc1 = inc1["vda"]
    assert inc1["kind"] == "incremental" and inc1["parent"] == full["id"]
    assert 0 < inc1["read_bytes"] <= 64 * 1024, inc1
    snaps[inc1["id"]] = snapshot_raw(img, tmp_path / "inc1.raw")
    assert list(_bitmaps(img)) == [prefix + inc1["checkpoint"]]
    assert _checkpoints(name) == [prefix + inc1["checkpoint"]]      # the old one's metadata went

    # start: libvirt validates the checkpoint against the running qemu's bitmaps
    dom.start()
    assert _reconcile(name, repo, inc1["checkpoint"]) is None
    assert _checkpoints(name) == [prefix + inc1["checkpoint"]]
    guest_write(dom, "vda", 0x33, 20 * MiB, 64 * 1024)
    dom.stop()
    flags = _bitmaps(img)[prefix + inc1["checkpoint"]]
    assert "auto" in flags and "in-use" not in flags, flags     # saved by qemu on SIGTERM

    inc2, _ = _offline(repo, name, "incremental")
    inc2 = inc2["vda"]
    assert inc2["kind"] == "incremental" and inc2["parent"] == inc1["id"]
    assert 0 < inc2["read_bytes"] <= 64 * 1024, inc2        # exactly the guest's write
    snaps[inc2["id"]] = snapshot_raw(img, tmp_path / "inc2.raw")
    assert _checkpoints(name) == [prefix + inc2["checkpoint"]]

    for backup_id, snap in snaps.items():
        assert restore_equals(repo, backup_id, snap, tmp_path), backup_id


def test_lost_bitmap_means_a_full_and_13_with_no_fallback(shut_off, tmp_path):
    dom = shut_off([("qcow2", 32 * MiB)])
    name, images = dom.name, dom.disks
    img = images["vda"]
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    full, _ = _offline(repo, name, "full")
    qio(img, "write -q -P 0x44 1M 64K")
    support.run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", str(img), prefix + full["vda"]["checkpoint"]])

    p = _offline(repo, name, "incremental", "--no-fallback", check=False)
    assert p.returncode == 13, p.stdout + p.stderr
    assert "no dirty bitmap of this repository" in p.stderr, p.stderr
    assert _bitmaps(img) == {}                                  # the refused run left nothing
    assert _checkpoints(name) == [prefix + full["vda"]["checkpoint"]]

    again, err = _offline(repo, name, "incremental")
    assert again["vda"]["kind"] == "full" and "taking a full backup instead" in err, err
    assert restore_equals(repo, again["vda"]["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)
    assert _checkpoints(name) == [prefix + again["vda"]["checkpoint"]]
    # the running domain's reconcile says why an older checkpoint is no base, and drops it
    dom.start()
    why = _reconcile(name, repo, full["vda"]["checkpoint"])
    assert why and "missing or broken bitmap" in why, why
    assert _checkpoints(name) == [prefix + again["vda"]["checkpoint"]]
    assert _reconcile(name, repo, again["vda"]["checkpoint"]) is None


def test_raw_disk_is_full_each_time_beside_an_incremental_qcow2(shut_off, tmp_path):
    dom = shut_off([("qcow2", 32 * MiB), ("raw", 8 * MiB)])
    name, images = dom.name, dom.disks
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    full, _ = _offline(repo, name, "full")
    assert full["vda"]["set_id"] and full["vda"]["set_id"] == full["vdb"]["set_id"]
    assert full["vda"]["created"] == full["vdb"]["created"]
    assert full["vda"]["checkpoint"] and full["vdb"]["checkpoint"] is None
    assert _checkpoint_disks(name, prefix + full["vda"]["checkpoint"]) == {"vda": "bitmap", "vdb": "no"}

    qio(images["vda"], "write -q -P 0x55 3M 64K")
    qio(images["vdb"], "write -q -P 0x66 5M 64K", fmt="raw")
    inc, err = _offline(repo, name, "incremental", "--no-fallback")      # a raw disk is no broken chain
    assert inc["vda"]["kind"] == "incremental" and inc["vda"]["read_bytes"] <= 64 * 1024
    # a full: every allocated byte again (the first MiB and the new write), not just the change
    assert inc["vdb"]["kind"] == "full" and inc["vdb"]["read_bytes"] >= 1 * MiB + 64 * 1024, inc["vdb"]
    assert "vdb" in err and "not qcow2" in err, err
    for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):
        snap = tmp_path / f"{target}.raw"
        support.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(images[target]), str(snap)])
        assert restore_equals(repo, inc[target]["id"], snap, tmp_path), target
    assert _checkpoints(name) == [prefix + inc["vda"]["checkpoint"]]
    dom.start()
    assert _reconcile(name, repo, inc["vda"]["checkpoint"]) is None


def test_killed_offline_run_loses_nothing(shut_off, tmp_path):
    dom = shut_off([("qcow2", 96 * MiB)])
    name, img = dom.name, dom.disks["vda"]
    data = random_file(tmp_path / "data.raw", 96 * MiB, seed=14)
    qio(img, f"write -q -s {data} 0 96M")
    data.unlink()
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    full, _ = _offline(repo, name, "full")
    full = full["vda"]
    # change most of the disk so that the incremental reads long enough to be killed
    change = random_file(tmp_path / "change.raw", 80 * MiB, seed=15)
    qio(img, f"write -q -s {change} 0 80M", "write -q -P 0x77 90M 64K")

    _kill_when_served(_offline(repo, name, "incremental", popen=True), img, delay=0.2)    # into the read
    assert [b["id"] for b in json.loads(nbb(repo, "--json", "list").stdout)] == [full["id"]]
    leftover = set(_bitmaps(img)) - {prefix + full["checkpoint"]}
    assert len(leftover) == 1, _bitmaps(img)

    qio(img, "write -q -P 0x78 91M 64K")
    inc, _ = _offline(repo, name, "incremental")
    inc = inc["vda"]
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"]
    assert restore_equals(repo, inc["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)
    assert list(_bitmaps(img)) == [prefix + inc["checkpoint"]]     # the killed run's bitmap is gone
    assert _checkpoints(name) == [prefix + inc["checkpoint"]]
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("nbdbackup-nbd-")
                and _owner_gone(Path(tempfile.gettempdir(), n))]

    # killed again, and then the domain is started: the running side removes the leftover
    qio(img, f"write -q -s {change} 0 80M")
    _kill_when_served(_offline(repo, name, "incremental", popen=True), img)
    assert len(set(_bitmaps(img)) - {prefix + inc["checkpoint"]}) == 1, _bitmaps(img)
    dom.start()
    assert _reconcile(name, repo, inc["checkpoint"]) is None
    guest_write(dom, "vda", 0x79, 92 * MiB, 64 * 1024)
    dom.stop()
    assert list(_bitmaps(img)) == [prefix + inc["checkpoint"]]
    assert _checkpoints(name) == [prefix + inc["checkpoint"]]
    last, _ = _offline(repo, name, "incremental")
    assert last["vda"]["kind"] == "incremental" and last["vda"]["parent"] == inc["id"]
    assert restore_equals(repo, last["vda"]["id"], snapshot_raw(img, tmp_path / "last.raw"), tmp_path)


def _kill_when_served(proc: subprocess.Popen, img: Path, delay: float = 0.0) -> None:
    deadline = time.monotonic() + 60
    while not _served(img):                                     # bitmap added, qemu-nbd serving
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _served(img: Path) -> bool:
    """Whether a qemu-nbd of a backup run serves *img* (its private dir names the image)."""
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob("nbdbackup-nbd-*"):
        try:
            if (d / "image").read_text() == os.path.realpath(img) and (d / "nbd.sock").exists():
                return True
        except OSError:
            continue
    return False


def _owner_gone(d: Path) -> bool:
    try:
        os.kill(int((d / "owner").read_text()), 0)
        return False
    except (OSError, ValueError):
        return True


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
